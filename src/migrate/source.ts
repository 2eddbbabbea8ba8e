// The source side of a migration, driven by the agent that runs the task. Everything between the
// two agents goes over one TLS connection (wire/mux.ts). The task stays frozen on the source (CRIU's
// post-dump hook holds it) until the destination has restored it, stopped; then the source decides
// (journal first), lets go, and tells the destination to resume it. On any failure before the
// decision the source resumes its copy and the destination removes what it received. The source
// is the one that decides; its journal (journal.ts) lets a restarted agent finish the job.
import type { ChildProcess } from 'node:child_process';
import type { Duplex, Readable } from 'node:stream';
import { randomUUID } from 'node:crypto';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { copyFile, mkdir, mkdtemp, readFile, readdir, rm, stat } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { FerryError, ioError } from '../errors.js';
import { PRECOPY_PAGES } from '../precopy/store.js';
import type { Runtime } from '../runtime/runtime.js';
import { requireRunning } from '../runtime/runtime.js';
import type { TaskRecord } from '../runtime/task-store.js';
import type { LoadedTls } from '../tls/pki.js';
import { connect, readAll, decodeAnswer, requestJson, type Headers, type MuxSession, type MuxStream } from '../wire/session.js';
import { run, startProgram } from '../exec/run.js';
import { dumpSlot } from '../criu/dump-slot.js';
import { GHOST_LIMIT_MIB, hintFor, readErrorLines, untilSeized } from '../criu/log.js';
import { dumpBlocker } from '../criu/blockers.js';
import { DUMP_OPTIONS } from '../criu/driver.js';
import { dumpMountArgs } from '../runtime/mounts.js';
import { isAlive, sleep, startTime, treePids, waitUntil } from '../util/proc.js';
import type { MigrateOptions, Mode, PrepareRequest } from '../wire/schemas.js';
import { criuDumpNetArgs } from '../net/tasknet.js';
import { hostNetArgs, tcpConnections } from '../net/tcp.js';
import { Tracker, expectedDowntimeMs, verdict, type RoundStat, type Verdict } from '../precopy/tracker.js';
import { CODEC, CODEC_HEADER, Compressor, type CodecStats } from '../wire/codec.js';
import { imageHeader, imageNameOk } from '../wire/image-bundle.js';
import { THROTTLE_MAX, Throttle, nextThrottle, watchedMs, writeRateMBps } from '../precopy/throttle.js';
import { Hold } from './hold.js';
import { debugDropRound, debugThrottleGate, debugTrackMethod, debugTrackSlowEnd, faultPoint } from './fault-points.js';
import { Journal, type JournalEntry } from './journal.js';
import { ResumableTunnel } from './resumable.js';
import { TaskMemory, TaskPages, pidsByVpid } from './task-pages.js';
import { lazyRuns } from '../criu/image.js';
import { ByteCounter, closeLazyDump, connectWhenListening, listenLocal, ownLoopbackEndpoint, resetOnClose, splice, type LoopbackEndpoint } from './tunnel.js';

export type Phase = 'checks' | 'presync' | 'precopy' | 'freeze+dump' | 'transfer' | 'restore' | 'resume' | 'postcopy';

export interface MigrationReport {
  id: string;
  task: string;
  from: string;
  to: string;
  mode: Mode;
  ok: boolean;
  error?: string;
  startedAt: string;
  phasesMs: Partial<Record<Phase, number>>;
  blackoutMs?: number;
  /** Wall-clock time the destination resumed the task (to line the report up with logs). */
  resumedAt?: string;
  totalMs: number;
  /** Post-copy: from resume on the destination until every page was local there. */
  postCopyWindowMs?: number;
  bytes: { pages: number; images: number; files: number };
  pageRateMBps?: number;
  pid?: number;
  /** Things that went wrong after the task was safely on the destination. */
  warnings?: string[];
  /** Pre-copy and auto: each round while the task ran, why they stopped, and how it finished. */
  precopy?: {
    rounds: RoundStat[];
    verdict: Verdict;
    /** 'residue sent': all memory was on the destination before it resumed; 'post-copy': the rest followed. */
    finish: 'residue sent' | 'post-copy';
    finalPages: number;
    finalBytes: number;
    expectedDowntimeMs: number;
    method: string;
    /** Auto-converge: the largest share of the task's CPU taken away. */
    maxThrottle?: number;
    /** CRIU was started while the rounds ran and waited for them (see startAhead). */
    dumpAhead?: true;
  };
  /** Memory streams compressed on the way (bytes.pages counts what crossed the link). */
  compression?: CodecStats;
  /** On the destination: waiting for the last pages to land, and CRIU's restore itself. */
  destination?: { pageWaitMs: number; criuRestoreMs: number; fillsAlone?: true };
  /** Inside the pause: how long each step took (they overlap where they run at once). */
  stepsMs?: Record<string, number>;
}

export type ProgressEvent =
  | { type: 'start'; id: string }
  | { type: 'phase'; phase: Phase; elapsedMs: number }
  | { type: 'bytes'; pages: number; images: number; files: number; elapsedMs: number }
  | { type: 'round'; round: RoundStat }
  | { type: 'note'; message: string };

export interface MigrateContext {
  rt: Runtime;
  tls: LoadedTls;
  self: string;
  journal: Journal;
  /** Migrations under way on this agent, by id, so they can be cancelled. */
  active: Map<string, OutgoingMigration>;
}

const HOLD_TIMEOUT_S = 120;
/**
 * How long the destination may take to confirm the restore. Shorter than the hold, so the source
 * gives up (and tells the destination to drop its copy) before CRIU resumes the task on its own.
 */
const CONFIRM_TIMEOUT_MS = (HOLD_TIMEOUT_S - 15) * 1000;
/** The most of the last delta held back for the restore request (~35 ms of a 1 Gbit/s link). */
const DELTA_HOLD_BYTES = 4 << 20;
/** One rsync of the task's files, from its start (or from its release when held). */
const RSYNC_TIMEOUT_MS = 120_000;
/** How long post-copy waits for a cut link to come back before the source takes the task back. */
const POSTCOPY_GRACE_MS = 120_000;
/**
 * How long the source keeps telling the destination to resume before leaving that to the
 * resolver (the user waits with the CLI meanwhile: past the decision there is only forward).
 * FERRY_COMMIT_RETRY_S sets it (tests).
 */
const COMMIT_RETRY_MS = envSeconds(process.env.FERRY_COMMIT_RETRY_S, 180) * 1000;
/** CRIU must reach post-dump within this (pages included) or it is killed and the task rolled back. */
const DUMP_TIMEOUT_MS = 10 * 60_000;
/**
 * A page stream that moves no byte for this long ends the migration: in stop-copy while the task
 * is frozen, in pre-copy while the destination takes no record. FERRY_PAGE_STALL_S sets it (tests).
 */
const PAGE_STALL_MS = envSeconds(process.env.FERRY_PAGE_STALL_S, 30) * 1000;
const STALL_CHECK_MS = 1000;
/**
 * Post-copy: no page leaving for this long while the destination still lacks some (its
 * lazy-pages daemon hung or stopped asking) takes the task back here, rather than leaving it
 * frozen here and waiting on a fault there for ever. Long, because pages pre-copy already brought
 * are filled there without asking (0.5-1 GiB/s here). FERRY_POSTCOPY_STALL_S sets it (tests).
 */
const POSTCOPY_STALL_MS = envSeconds(process.env.FERRY_POSTCOPY_STALL_S, 120) * 1000;

function envSeconds(v: string | undefined, fallback: number): number {
  const n = Number(v);
  return v !== undefined && Number.isInteger(n) && n > 0 ? n : fallback;
}

/**
 * Calls onStall once the page counter has stood still for limitMs while counting() holds
 * (checked every STALL_CHECK_MS); ends when over() does, or after onStall.
 */
function watchStall(pages: ByteCounter, limitMs: number, over: () => boolean, counting: () => boolean, onStall: () => void): NodeJS.Timeout {
  let moved = pages.bytes;
  let still = 0;
  const watch = setInterval(() => {
    if (over()) return clearInterval(watch);
    still = counting() && pages.bytes === moved ? still + STALL_CHECK_MS : 0;
    moved = pages.bytes;
    if (still < limitMs) return;
    clearInterval(watch);
    onStall();
  }, STALL_CHECK_MS);
  watch.unref();
  return watch;
}
/** A file sync started ahead and held until the task is seized (see holdSync()). */
interface HeldSync {
  go: () => Promise<void>;
  cancel: () => void;
  done: Promise<void>;
}
function trackMethod(armed: boolean, hashed: boolean): string {
  const wp = 'userfaultfd write-protect + PAGEMAP_SCAN';
  if (!hashed) return wp;
  return armed ? `${wp}; content hash for processes that could not be armed` : 'content hash';
}

/** QEMU's default downtime limit; P.Haul's round limit. */
export const DEFAULT_MAX_DOWNTIME_MS = 300;
export const DEFAULT_MAX_ROUNDS = 8;

export async function migrateOut(
  ctx: MigrateContext,
  name: string,
  target: { name: string; address: string },
  opts: MigrateOptions,
  onProgress: (e: ProgressEvent) => void,
  signal?: AbortSignal,
): Promise<MigrationReport> {
  const { rt } = ctx;
  if (target.name === ctx.self) throw new FerryError('USAGE', `task '${name}' is already on ${ctx.self}: pick another host to migrate to`);
  return rt.store.withLock(name, `migration to ${target.name}`, async () => {
    const rec = await rt.store.get(name);
    requireRunning(rec, 'migrate');
    const m = new OutgoingMigration(ctx, rec, target, opts, onProgress);
    ctx.active.set(m.id, m);
    const onAbort = () => m.cancel(signal?.reason);
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      if (signal?.aborted) m.cancel(signal.reason);
      return await m.run();
    } finally {
      signal?.removeEventListener('abort', onAbort);
      ctx.active.delete(m.id);
    }
  });
}

export class OutgoingMigration {
  readonly id = randomUUID();
  private readonly t0 = performance.now();
  private phaseStart = this.t0;
  private readonly report: MigrationReport;
  private readonly pages = new ByteCounter();
  private readonly files = new ByteCounter();
  private imageBytes = 0;
  private session?: MuxSession;
  private hold?: Hold;
  private dump?: ChildProcess;
  private dumpExit?: Promise<number | null>;
  private workDir?: string;
  private holdMade?: Promise<Hold>;
  private imagesDir?: string;
  /** Post-copy: where CRIU serves lazy pages on this host. */
  private lazyAt?: LoopbackEndpoint;
  private frozenAt?: number;
  /** The dump was ended because its page stream stopped moving (see startDump). */
  private pageStall = false;
  /** Held from the dump's start until CRIU is past its parasite (see criu/dump-slot.ts). */
  private releaseDumpSlot: () => void = () => {};
  private resumedAt?: number;
  /** The destination runs the task: from here on the source copy is never resumed. */
  private confirmed = false;
  /** Written to the journal before the hold lets go; from then on there is no rollback. */
  private decision?: 'commit' | 'abort';
  private cancelled?: FerryError;
  private readonly abortCtl = new AbortController();
  private readonly entry: JournalEntry;
  /** CRIU's lazy-pages connection, kept apart: it must not close before the outcome is known. */
  private lazy?: ResumableTunnel<Duplex>;
  /** Rejects when the pages can no longer reach the destination (the grace ran out, or it refused). */
  private lazyFailed?: Promise<never>;
  private failLazy?: (e: FerryError) => void;
  private readonly servers: Server[] = [];
  private readonly sockets = new Set<Socket>();
  private progressTimer?: NodeJS.Timeout;
  private readonly mode: Mode;
  /** Pre-copy: the helper that tracks written pages, and the stream its pages go out on. */
  private tracker?: Tracker;
  /** How the task's writes were found: some process armed, some tracked by content hash (it could not be armed). */
  private armedProcs = false;
  private hashedProcs = false;
  /** The files' last sync, started as soon as CRIU has seized the task (it runs while CRIU dumps). */
  private earlyFiles?: Promise<void>;
  /** That sync's rsync, started and held since the presync (see holdSync). */
  private lastSync?: HeldSync;
  private lastLogSync?: HeldSync;
  /** Auto with --allow-throttle: the task's CPU quota and sleep while it does not converge. */
  private throttle?: Throttle;
  private precopyStream?: MuxStream;
  private precopyStored?: Promise<unknown>;
  private precopyError?: Error;
  /** The pre-copy records on their way to precopyStream (the codec's output, or the helper's). */
  private precopyWire?: Readable;
  /** Lets the last delta's records held back by holdDelta() go. */
  private releaseDelta?: () => void;
  /** Auto that did not converge and may post-copy: the residue follows the running task. */
  private residueLazy = false;

  constructor(
    private readonly ctx: MigrateContext,
    private readonly rec: TaskRecord,
    private readonly target: { name: string; address: string },
    private readonly opts: MigrateOptions,
    private readonly onProgress: (e: ProgressEvent) => void,
  ) {
    const mode = opts.mode;
    this.mode = mode;
    this.entry = { id: this.id, task: rec.name, to: target, mode, phase: 'checks', taskPid: rec.pid!, ...(rec.pidStart !== undefined ? { taskPidStart: rec.pidStart } : {}), taskIncarnation: rec.incarnation, at: '' };
    this.report = {
      id: this.id,
      task: rec.name,
      from: ctx.self,
      to: target.name,
      mode,
      ok: false,
      startedAt: new Date().toISOString(),
      phasesMs: {},
      totalMs: 0,
      bytes: { pages: 0, images: 0, files: 0 },
    };
  }

  private get signal(): AbortSignal {
    return this.abortCtl.signal;
  }

  /**
   * Stops the migration and rolls back, unless the source already let go of the task. Returns
   * where the task is: cancelled means it runs here again (once the rollback is done).
   */
  cancel(reason?: unknown): { cancelled: boolean; message: string } {
    if (this.decision === 'commit') {
      return { cancelled: false, message: `migration ${this.id} of '${this.rec.name}' is past the point of no return: the task is handed to ${this.target.name}` };
    }
    if (!this.cancelled) {
      this.cancelled = reason instanceof FerryError ? reason : new FerryError('ABORTED', 'cancelled');
      this.abortCtl.abort(this.cancelled);
      this.session?.destroy(this.cancelled);
      for (const sock of this.sockets) sock.destroy();
    }
    return { cancelled: true, message: `migration ${this.id} of '${this.rec.name}' is cancelled; the task stays on ${this.ctx.self}` };
  }

  /** What `ferry migrations` shows of a migration under way. */
  summary(): { id: string; task: string; to: string; mode: Mode; phase: string; elapsedMs: number; decided: boolean } {
    return { id: this.id, task: this.rec.name, to: this.target.name, mode: this.mode, phase: this.currentPhase, elapsedMs: this.elapsed(), decided: this.decision === 'commit' };
  }

  private async journal(patch: Partial<JournalEntry>): Promise<void> {
    Object.assign(this.entry, patch);
    await this.ctx.journal.write(this.entry);
  }

  private elapsed(): number {
    return Math.round(performance.now() - this.t0);
  }

  private currentPhase: Phase = 'checks';

  private phase(next: Phase): void {
    this.currentPhase = next;
    this.onProgress({ type: 'phase', phase: next, elapsedMs: this.elapsed() });
  }

  /** Times one step of the frozen phases for the report. */
  private async step<T>(name: string, p: Promise<T>): Promise<T> {
    const t0 = performance.now();
    const v = await p;
    (this.report.stepsMs ??= {})[name] = Math.round(performance.now() - t0);
    return v;
  }

  private endPhase(p: Phase): void {
    const now = performance.now();
    this.report.phasesMs[p] = Math.round(now - this.phaseStart);
    this.phaseStart = now;
  }

  /**
   * The phases in order. Until the decision a failure rolls back (the task resumes here); after
   * it the task is the destination's; fail() picks the one way back for the state reached.
   */
  async run(): Promise<MigrationReport> {
    this.onProgress({ type: 'start', id: this.id });
    this.progressTimer = setInterval(() => this.onProgress({ type: 'bytes', pages: this.pages.bytes, images: this.imageBytes, files: this.files.bytes, elapsedMs: this.elapsed() }), 250);
    try {
      await this.checks();
      await this.presync();
      if (this.precopying) await this.precopy();
      await this.freeze();
      await this.transfer();
      await this.restoreThere();
      await this.handOver();
      if (this.lazyFlow && !this.alone) await this.pushPages();
      await this.letGo();
      this.report.ok = true;
      return this.finish();
    } catch (e) {
      return await this.fail(e);
    } finally {
      await this.release();
    }
  }

  /** Both hosts can take the task; nothing is frozen yet, so a failure only refuses. */
  private async checks(): Promise<void> {
    const { rt } = this.ctx;
    await this.journal({ phase: 'checks' });
    this.phase('checks');
    await faultPoint(this.ctx.self, 'checks');
    await rt.criu.ensureUsable(this.signal);
    const blocker = dumpBlocker(this.rec.pid!, this.rec.name);
    if (blocker) throw blocker;
    await mkdir(outgoingDir(rt.stateDir), { recursive: true, mode: 0o700 });
    // A short path: rsync's socket lives in it, and a Unix socket's path has at most 107 bytes
    // (a task named with 60 characters could not move).
    this.workDir = await mkdtemp(join(outgoingDir(rt.stateDir), `${this.rec.name.slice(0, 12)}-`));
    const cpuDir = join(this.workDir, 'cpu');
    await rt.criu.cpuinfoDump(cpuDir, this.signal);
    const cpuinfo = (await readFile(join(cpuDir, 'cpuinfo.img'))).toString('base64');
    this.session = await connect(this.target.address, { tls: this.ctx.tls, expectName: this.target.name, signal: this.signal });
    if (this.cancelled) throw this.cancelled;
    this.watchSession(this.session);
    const { checkpoint, ...task } = this.rec;
    const prep: PrepareRequest = {
      id: this.id,
      from: this.ctx.self,
      task: { ...task, ...(checkpoint ? { checkpoint: { at: checkpoint.at, leftRunning: checkpoint.leftRunning, durationMs: checkpoint.durationMs } } : {}) },
      mode: this.mode,
      cpuinfo,
      memBytes: treeRss(this.rec.pid!),
      diskBytes: await dirSize(rt.store.dir(this.rec.name)),
    };
    await requestJson(this.session, 'POST', '/v1/incoming', prep, { timeoutMs: 60_000 });
    this.endPhase('checks');
  }

  /** The task's files, while it runs. */
  private async presync(): Promise<void> {
    this.phase('presync');
    await this.journal({ phase: 'presync' });
    await faultPoint(this.ctx.self, 'presync');
    await this.rsync();
    this.lastSync = this.holdSync('rest');
    // The log too: two spawns and two connections less inside the pause.
    if (existsSync(this.ctx.rt.store.logPath(this.rec.name))) this.lastLogSync = this.holdSync('log');
    this.endPhase('presync');
  }

  /**
   * The files' last sync is started now and held until CRIU has seized the task: rsync here and
   * its server there start while the task runs (each spawn from an agent is ~15 ms of a blocked
   * event loop, inside the pause before). Held, rsync has said its protocol version and waits for
   * the server's, so it has not looked at a file yet: it makes its file list once released.
   */
  private holdSync(what: 'rest' | 'log'): HeldSync {
    let open!: () => void;
    let refuse!: (e: Error) => void;
    const gate = new Promise<void>((res, rej) => {
      open = res;
      refuse = rej;
    });
    gate.catch(() => {});
    const done = this.rsync(gate, what);
    // One that ended while held (the destination lets a quiet rsync live 10 minutes; the rounds
    // can take longer) is replaced by a new one when released.
    let released = false;
    let endedHeld = false;
    done.catch(() => (endedHeld = !released));
    return {
      go: () => {
        if (!released && endedHeld) {
          released = true;
          return this.rsync(undefined, what);
        }
        released = true;
        open();
        return done;
      },
      cancel: () => refuse(new FerryError('ABORTED', 'the migration stopped before the last file sync')),
      done,
    };
  }

  /**
   * The files' last sync: the held one (released now), or a new one; beside it the task's log,
   * which only grows, by what it grew since the presync.
   */
  private async lastFiles(): Promise<void> {
    const log = this.lastLogSync ? this.lastLogSync.go() : existsSync(this.ctx.rt.store.logPath(this.rec.name)) ? this.rsync(undefined, 'log') : undefined;
    log?.catch(() => {}); // awaited below
    await Promise.all([this.step('files rest', this.lastSync ? this.lastSync.go() : this.rsync(undefined, 'rest')), log && this.step('files log', log)]);
  }

  /** Pre-copy and auto send memory in rounds first; post-copy and pre-copy restore through lazy pages. */
  private get precopying(): boolean {
    return this.mode === 'pre-copy' || this.mode === 'auto';
  }

  private get lazyFlow(): boolean {
    return this.mode !== 'stop-copy';
  }

  /**
   * Memory while the task runs: the first round sends all of it, each next one what was written
   * during the one before, until what is left fits the allowed pause (or it will not get there).
   */
  private async precopy(): Promise<void> {
    this.phase('precopy');
    // Made while the rounds run (~30 ms of FIFOs and a script): the task writes on until it
    // freezes, and the last delta is what it wrote after the last round.
    this.holdMade = Hold.create(join(this.workDir!, 'hold'));
    this.holdMade.catch(() => {});
    await this.journal({ phase: 'precopy' });
    await faultPoint(this.ctx.self, 'precopy');
    const maxDowntimeMs = this.opts.maxDowntimeMs ?? DEFAULT_MAX_DOWNTIME_MS;
    const maxRounds = this.opts.maxRounds ?? DEFAULT_MAX_ROUNDS;
    const drop = debugDropRound();
    const method = debugTrackMethod();
    const slowEnd = debugTrackSlowEnd();
    this.tracker = new Tracker(this.ctx.rt.nativeDir, { ...process.env, ...(drop ? { FERRY_DEBUG_DROP_ROUND: drop } : {}), ...(method ? { FERRY_TRACK_METHOD: method } : {}), ...(slowEnd ? { FERRY_DEBUG_TRACK_SLOW_END: slowEnd } : {}) });
    const stream = this.session!.request({ ':method': 'POST', ':path': `/v1/incoming/${this.id}/precopy`, ...this.codecHeaders() });
    this.precopyStream = stream;
    this.precopyStored = readAll(stream, 0).then(([h, text]) => decodeAnswer(h, text, 'pre-copy pages'));
    this.precopyStored.catch((e: Error) => {
      // Refused or failed there: nothing reads the records any more, so a round would block.
      this.precopyError = e;
      void this.tracker?.stop();
    });
    // The destination refused or dropped the stream: nothing reads the records any more.
    stream.once('close', () => void this.tracker?.stop());
    const wire = this.compressing(this.tracker.pages);
    this.precopyWire = wire;
    wire.on('data', (c: Buffer) => this.pages.add(c.length));
    wire.pipe(stream);
    // A codec failure ends the stream, and with it the rounds (the destination sees it cut).
    if (wire !== this.tracker.pages) wire.once('error', (e: Error) => stream.destroy(e));
    // A destination that stops taking records without breaking the stream (its disk hung) would
    // hold the rounds for ever, or the task frozen while the last delta waits: the migration
    // fails instead, and the task runs on here.
    watchStall(
      this.pages,
      PAGE_STALL_MS,
      () => stream.readableEnded || stream.destroyed, // answered (every record stored), or gone
      () => stream.writableNeedDrain,
      () => stream.destroy(new FerryError('PEER', `the pre-copy stream to ${this.target.name} took no page for ${PAGE_STALL_MS / 1000} s`, { hint: `check ${this.target.name}'s agent and its free disk space, then migrate again` })),
    );
    const rounds: RoundStat[] = [];
    let v: Verdict = 'continue';
    if (this.mode === 'auto' && this.opts.allowThrottle) this.throttle = new Throttle(this.ctx.self, this.id);
    while (v === 'continue') {
      if (this.cancelled) throw this.cancelled;
      // From the second round on CRIU waits, started, for the rounds to end (see startAhead).
      if (rounds.length > 0) this.startAhead();
      const t0 = performance.now();
      const pids = treePids(this.rec.pid!);
      this.throttle?.sample(pids);
      const r = await this.tracked(this.tracker.round(pids));
      if (r.hashed) this.hashedProcs = true;
      if (r.armed) this.armedProcs = true;
      if (r.armed + r.hashed === 0) throw new FerryError('PRECOPY', `cannot track the pages of '${this.rec.name}': ${r.note || 'no process could be armed'}`, { hint: 'use --mode stop-copy or post-copy' });
      const ms = performance.now() - t0;
      const dirtyPages = await this.tracked(this.tracker.written());
      const since = performance.now() - t0;
      // The first round sent every page the task had: what the rate's correction is against.
      const tracked = rounds.length > 0 ? rounds[0]!.pages + rounds[0]!.zeroPages : r.pages + r.zero;
      const writeMBps = writeRateMBps(dirtyPages, tracked, watchedMs(since, ms, (r.pages + r.zero) / Math.max(tracked, 1)));
      // A round under 1 MiB says little about the link; until a bigger one, its rate stands in
      // (small transfers understate the link, so the expected pause errs long, not short).
      const linkMBps = r.bytes > 1 << 20 ? r.bytes / 1e6 / (ms / 1000) : rounds.at(-1)?.linkMBps || (r.bytes > 0 && ms > 0 ? r.bytes / 1e6 / (ms / 1000) : 0);
      const round: RoundStat = {
        round: rounds.length + 1,
        pages: r.pages,
        bytes: r.bytes,
        zeroPages: r.zero,
        ms: Math.round(ms),
        dirtyPages,
        dirtyRateMBps: Math.round(((dirtyPages * 4096) / 1e6 / (since / 1000)) * 10) / 10,
        linkMBps: Math.round(linkMBps * 10) / 10,
        expectedDowntimeMs: expectedDowntimeMs(dirtyPages, linkMBps),
        writeRateMBps: Math.round(writeMBps * 10) / 10,
        ...(this.throttle?.level ? { throttle: this.throttle.level } : {}),
      };
      rounds.push(round);
      this.onProgress({ type: 'round', round });
      v = verdict(rounds, { maxDowntimeMs, maxRounds });
      // QEMU's auto-converge rule: a round in which the task wrote more than half what the link
      // carried raises the throttle, each step aiming at half the link at once. A verdict that
      // it will not converge (too slow, stalled) raises it too, while it can go higher.
      const giveUp = v === 'too-slow' || v === 'stalled' || v === 'too-fast';
      if (this.throttle && this.throttle.level < THROTTLE_MAX && (giveUp || (v === 'continue' && writeMBps > 0.5 * round.linkMBps))) {
        const level = nextThrottle(this.throttle.level, writeMBps, round.linkMBps);
        try {
          this.throttle.set(level, treePids(this.rec.pid!));
          this.onProgress({ type: 'note', message: `pre-copy does not converge (the task writes ${Math.round(writeMBps * 10) / 10} MB/s, the link carries ${round.linkMBps} MB/s): throttling it to ${Math.round((1 - this.throttle.level) * 100)} % of its CPU` });
          v = 'continue';
        } catch (e) {
          this.onProgress({ type: 'note', message: `cannot throttle the task (${(e as Error).message}): it finishes without` });
          this.throttle.release();
          this.throttle = undefined;
        }
      }
    }
    const throttled = this.throttle?.level;
    const last = rounds.at(-1)!;
    this.residueLazy = v !== 'converged' && this.mode === 'auto' && !!this.opts.allowPostCopy;
    this.report.precopy = { rounds, verdict: v, finish: this.residueLazy ? 'post-copy' : 'residue sent', finalPages: 0, finalBytes: 0, expectedDowntimeMs: last.expectedDowntimeMs, method: trackMethod(this.armedProcs, this.hashedProcs), ...(throttled ? { maxThrottle: throttled } : {}) };
    if (v !== 'converged') {
      const why =
        v === 'too-fast'
          ? `the task writes ${last.writeRateMBps ?? last.dirtyRateMBps} MB/s, the link carries ${last.linkMBps} MB/s`
          : v === 'stalled'
            ? 'the written set stopped shrinking'
            : v === 'too-slow'
              ? `the written set shrinks too slowly to fit within ${maxRounds} rounds`
              : `${rounds.length} rounds, the limit`;
      this.onProgress({
        type: 'note',
        message: this.residueLazy ? `pre-copy does not converge (${why}): the last ${Math.round((last.dirtyPages * 4096) / 2 ** 20)} MiB follow by post-copy` : `pre-copy does not converge (${why}): expect a pause of about ${(last.expectedDowntimeMs / 1000).toFixed(1)} s${this.mode === 'auto' ? ' (--allow-post-copy would shorten it)' : ''}`,
      });
    }
    this.endPhase('precopy');
  }

  /** A compressor for one of this migration's memory streams, if it compresses (CRIU opens one per process). */
  private compressor(): Compressor | undefined {
    const mode = this.opts.compress ?? 'auto';
    if (mode === 'off') return undefined;
    // One count for all of the migration's streams, filled in as they go.
    this.report.compression ??= { mode, rawBytes: 0, wireBytes: 0, frames: 0, compressedFrames: 0, codecMBps: 0 };
    return new Compressor(mode, () => this.pages.rateMBps(), this.report.compression);
  }

  private compressing(raw: Readable): Readable {
    const c = this.compressor();
    return c ? raw.pipe(c) : raw;
  }

  private codecHeaders(): Record<string, string> {
    return (this.opts.compress ?? 'auto') === 'off' ? {} : { [CODEC_HEADER]: CODEC };
  }

  /** A tracker step; when it fails because the destination dropped the page stream, that is the reason given. */
  private async tracked<T>(step: Promise<T>): Promise<T> {
    try {
      return await step;
    } catch (e) {
      await new Promise((r) => setImmediate(r)); // the stream's own error settles first
      throw this.precopyError ?? e;
    }
  }

  /** Frozen: the pages written since the last round (or, for a post-copy residue, which are stale). */
  private async finalDelta(): Promise<void> {
    if (!this.tracker) return;
    this.holdDelta();
    const r = await this.tracked(this.tracker.final(this.imagesDir!, this.residueLazy));
    if (r.note) throw new FerryError('PRECOPY', `last pre-copy round: ${r.note}`);
    this.report.precopy!.finalPages = r.pages;
    this.report.precopy!.finalBytes = r.bytes;
    // The helper disarms and exits on its own meanwhile; release() waits for it.
    await this.precopyStored;
  }

  /**
   * The last delta waits (up to DELTA_HOLD_BYTES) until the restore request is on the wire: the
   * session is one connection, and a request behind 1-2 MB of records reached the destination
   * 50-75 ms after it was sent. The restore needs no page before the task runs, and the decision
   * waits for the delta anyway (restoreThere); a larger delta goes at once.
   */
  private holdDelta(): void {
    const wire = this.precopyWire;
    const stream = this.precopyStream;
    if (!wire || !stream || stream.destroyed) return;
    const chunks: Buffer[] = [];
    let bytes = 0;
    let ended = false;
    const onData = (c: Buffer) => {
      chunks.push(c);
      bytes += c.length;
      if (bytes > DELTA_HOLD_BYTES) release();
    };
    const onEnd = () => (ended = true);
    const release = () => {
      if (this.releaseDelta !== release) return;
      this.releaseDelta = undefined;
      wire.off('data', onData);
      wire.off('end', onEnd);
      for (const c of chunks) stream.write(c);
      if (ended) stream.end();
      else wire.pipe(stream);
    };
    wire.unpipe(stream);
    wire.on('data', onData);
    wire.once('end', onEnd);
    this.releaseDelta = release;
  }

  /** CRIU freezes and dumps the task, then holds it at post-dump until the decision. */
  private async freeze(): Promise<void> {
    if (!(await this.goAhead())) {
      const dumpArgs = await this.prepareDump();
      // The task freezes in the cgroups it had: CRIU dumps them, the destination rebuilds them. Its
      // throttle is lifted at CRIU's pre-dump, just before the freeze (nothing frozen or held yet,
      // so a failure still fails cleanly): lifted before CRIU started, the task wrote 24 MiB more
      // at 256 MiB/s, the last delta grew ~15-fold and the pause by ~0.2 s.
      if (this.throttle?.level) this.hold!.gate(() => this.liftThrottle());
      this.releaseDumpSlot = await dumpSlot(this.rec.pid, this.rec.cwd);
      if (this.cancelled) throw this.cancelled;
      await this.markFrozen();
      // A task with its own network keeps its connections (the hold script locks its namespace);
      // one in the host's network keeps those among its own sockets, held still from here.
      const net = this.rec.net ? this.ownNetArgs() : await this.ctx.rt.hostTcpArgs(this.rec, this.imagesDir!);
      const mounts = await dumpMountArgs(this.rec.pid!, this.imagesDir!);
      this.phase('freeze+dump');
      this.phaseStart = this.frozenAt = performance.now();
      await this.launchDump([...net, ...mounts, ...dumpArgs], true);
    }
    await faultPoint(this.ctx.self, 'freeze');
    this.syncFilesOnceSeized();
    await this.untilFrozen();
    this.releaseDumpSlot();
    this.endPhase('freeze+dump');
  }

  private liftThrottle(): void {
    if (!this.throttle?.level) return;
    if (debugThrottleGate()) throw new Error('a test made it fail');
    this.throttle.release();
  }

  private ownNetArgs(): string[] {
    return criuDumpNetArgs(statSync(`/proc/${this.rec.pid}/ns/net`).ino);
  }

  /** The images' directory, the hold, and CRIU's memory arguments. */
  private async prepareDump(): Promise<string[]> {
    const { rt } = this.ctx;
    // Everything that can be made ready is made ready before the task freezes.
    // In scratch (memory) when it can: CRIU creates ~7 files per process inside the pause. A lazy
    // dump keeps what is not lazy memory (shared memory) in its images: room for all of it, and
    // for a deleted file the task holds (copied whole).
    const room = (this.mode === 'stop-copy' ? 0 : treeRss(this.rec.pid!)) + (GHOST_LIMIT_MIB << 20);
    this.imagesDir ??= (await rt.store.scratch.make('outgoing', this.rec.name, room)) ?? join(this.workDir!, 'images');
    await mkdir(this.imagesDir, { recursive: true });
    this.hold = await (this.holdMade ?? Hold.create(join(this.workDir!, 'hold')));
    this.holdMade = undefined; // a second dump (see goAhead) gets a hold of its own
    if (this.mode === 'stop-copy') {
      const tunnel = await this.listen(async (sock) => {
        const stream = this.session!.request({ ':method': 'POST', ':path': `/v1/incoming/${this.id}/pages`, ...this.codecHeaders() });
        // Refused (its page server already gone): the destination answers but reads no more, and
        // CRIU would wait for ever to write the rest. Breaking the stream fails the dump instead.
        stream.once('response', (h: Headers) => {
          if (Number(h[':status']) !== 200) stream.destroy(new FerryError('PEER', `${this.target.name} refused the page stream (status ${h[':status']})`));
        });
        await splice(sock, stream, this.pages, undefined, this.compressor());
      });
      return ['--page-server', '--address', '127.0.0.1', '--port', String(tunnel)];
    }
    // CRIU runs post-dump before it serves lazy pages, and ends the task once it served
    // them: so the hold is answered only after the destination restored the task.
    this.lazyAt ??= await ownLoopbackEndpoint();
    return ['--lazy-pages', '--address', this.lazyAt.address, '--port', String(this.lazyAt.port)];
  }

  private async markFrozen(): Promise<void> {
    await this.journal({ phase: 'frozen', holdDir: this.hold!.dir });
    this.rec.state = 'frozen';
    await this.ctx.rt.store.save(this.rec);
  }

  private async launchDump(args: string[], deadline: boolean): Promise<void> {
    this.startDump(this.imagesDir!, args, deadline);
    await this.journal({ dump: { pid: this.dump!.pid!, ...optional('start', startTime(this.dump!.pid!)) } });
  }

  /**
   * Pre-copy starts CRIU while its later rounds run: CRIU's start (~40-70 ms to its pre-dump
   * hook on a busy host) and Ferry's own steps before it (~35-80 ms) no longer lie between the
   * last round and the freeze, where everything the task writes is in the last delta. CRIU waits
   * at its pre-dump hook, before it touches the task, until freeze() lets it go (goAhead). Not
   * when the rounds may end in post-copy: CRIU's environment differs then.
   */
  private startAhead(): void {
    if (this.ahead || this.mode === 'stop-copy' || (this.mode === 'auto' && this.opts.allowPostCopy) || process.env['FERRY_DUMP_AHEAD'] === '0') return;
    let go!: () => void;
    let stop!: (e: Error) => void;
    let stoppedWith: Error | undefined;
    const released = new Promise<void>((res, rej) => {
      go = res;
      stop = (e) => {
        stoppedWith ??= e;
        rej(e);
      };
    });
    released.catch(() => {});
    const started = (async () => {
      const dumpArgs = await this.prepareDump();
      if (stoppedWith) throw stoppedWith;
      // Let go once the rounds are over; the throttle (if any by then) is lifted just before.
      this.hold!.gate(async () => {
        await released;
        this.liftThrottle();
      });
      await this.markFrozen();
      // Without side effects here: the connections' lock and the markers come at the freeze.
      const net = this.rec.net ? this.ownNetArgs() : hostNetArgs(tcpConnections(this.rec.pid!).kind);
      const mounts = await dumpMountArgs(this.rec.pid!, this.imagesDir!);
      // Rolled back meanwhile: no CRIU is started after the rollback looked for one.
      if (stoppedWith) throw stoppedWith;
      await this.launchDump([...net, ...mounts, ...dumpArgs], false);
      return [...net, ...mounts];
    })();
    started.catch(() => {});
    this.ahead = { started, go, stop };
  }

  /**
   * Lets the dump started ahead freeze the task, if it is waiting and its arguments still hold;
   * false when it is not there (or was stopped) and freeze() must start one now. A task that
   * made a connection elsewhere or changed its mounts since needs other arguments: that dump is
   * stopped at its hook, before it touched anything.
   */
  private async goAhead(): Promise<boolean> {
    const a = this.ahead;
    if (!a) return false;
    const had = await a.started.catch(() => undefined);
    const dump = this.dump;
    const stopped = async (why: string) => {
      this.ahead = undefined;
      a.stop(new Error(why));
      if (dump && dump.exitCode === null && dump.signalCode === null) {
        // Told to stop at its hook, it ends there; one that never reached the hook is ended (it
        // cannot pass the hook without a "go", so it has touched nothing).
        if ((await Promise.race([this.dumpExit, sleep(10_000).then(() => 'slow' as const)])) === 'slow') this.killDump();
        await this.dumpExit;
      }
      await this.hold?.dispose().catch(() => undefined);
      this.hold = undefined;
      return false;
    };
    if (!had || !dump || dump.exitCode !== null || dump.signalCode !== null) return stopped('the dump started ahead is gone');
    // Until it is let go, a failure here (or a cancel) leaves it to the rollback to stop.
    const net = this.rec.net ? this.ownNetArgs() : await this.ctx.rt.hostTcpArgs(this.rec, this.imagesDir!);
    const mounts = await dumpMountArgs(this.rec.pid!, this.imagesDir!);
    if ([...net, ...mounts].join('\0') !== had.join('\0')) return stopped('the task changed its connections or mounts');
    // Taken last: a dump started anew after a stop takes the slot itself (release() frees it).
    this.releaseDumpSlot = await dumpSlot(this.rec.pid, this.rec.cwd);
    if (this.cancelled) throw this.cancelled;
    this.ahead = undefined;
    this.phase('freeze+dump');
    this.phaseStart = this.frozenAt = performance.now();
    this.armDumpDeadline?.();
    a.go();
    if (this.report.precopy) this.report.precopy.dumpAhead = true;
    return true;
  }

  /** The other images and the files, while frozen; both at once: every round trip counts. */
  private async transfer(): Promise<void> {
    this.phase('transfer');
    await faultPoint(this.ctx.self, 'transfer');
    // The journal says 'restore' from here (a resolver then tells the destination the outcome,
    // harmless if it never restored): one write less between the transfer and the restore.
    // The last delta goes on while the destination restores: its front answers no page before
    // the delta is stored, and the decision waits for it (restoreThere).
    this.deltaStored = this.step('last delta', this.finalDelta());
    this.deltaStored.catch(() => {});
    await Promise.all([this.step('images', this.sendImages(this.imagesDir!)), this.earlyFiles ?? this.step('files', this.lastFiles()), this.journal({ phase: 'restore' }), this.openTaskMemory()]);
    this.endPhase('transfer');
  }

  /** The destination restores the task, stopped until the decision. */
  private async restoreThere(): Promise<void> {
    this.phase('restore');
    // Pre-copy that sent every page: CRIU's page connection, if the destination needs it at all,
    // opens after the commit (handOver), out of the pause.
    const lazyStream = this.lazyAt && !this.pagesThere ? this.lazyRequest() : undefined;
    const asks = requestJson<{ pid: number; restoreMs: number; pageWaitMs: number; alone?: unknown }>(this.session!, 'POST', `/v1/incoming/${this.id}/restore`, { lazy: this.lazyFlow, ...(this.pagesThere ? { pagesThere: true } : {}) }, { timeoutMs: CONFIRM_TIMEOUT_MS });
    // The request's end goes out in a later tick of the event loop; then the delta follows it.
    setImmediate(() => this.releaseDelta?.());
    // Restored means restored on every page of the last delta; a delta that fails fails it now.
    const restoreP = Promise.all([asks, this.deltaStored]).then(([r]) => r);
    restoreP.catch(() => {}); // awaited below; an early way out must not leave it unhandled
    if (this.lazyAt && lazyStream) {
      // The restore cannot finish without pages, and CRIU serves them only after the hold
      // lets go; so let go once the destination's lazy-pages daemon asks for the first page.
      // If the restore then fails, killing the dump (past post-dump, no parasite left in the
      // task) detaches CRIU and the task runs on here.
      const asked = new Promise<void>((res) => lazyStream.once('readable', () => res()));
      await Promise.race([asked.then(() => this.deltaStored), restoreP]);
      await this.decide('commit');
      await this.connectLazy(lazyStream);
    }
    // CRIU gone before the decision means the source copy is running again: abort.
    const r = await Promise.race([restoreP, this.dumpExit!.then(async () => Promise.reject(await this.dumpEnded()))]);
    this.report.pid = r.pid;
    this.report.destination = { pageWaitMs: r.pageWaitMs, criuRestoreMs: r.restoreMs };
    // The destination checked its store holds every page the task will read and fills the task
    // from it without this host (patches/criu/0018): once it runs there, this host is done.
    this.alone = this.pagesThere && r.alone === true;
    if (this.alone) this.report.destination.fillsAlone = true;
    // Journaled with the decision: an agent that dies before ending the copy here must not let
    // it run again once the destination runs the task (see Resolver.settle).
    if (this.alone) this.entry.fillsAlone = { ...this.lazyAt! };
    // Every page is in the destination's store: its restore needed nothing of CRIU here.
    if (this.pagesThere) await this.decide('commit');
    this.endPhase('restore');
  }

  /** Pre-copy that sent every page itself: the destination asks CRIU here for none. */
  private get pagesThere(): boolean {
    return !!this.tracker && !this.residueLazy;
  }

  /** Pre-copy's last delta, stored on the destination (see transfer()). */
  private deltaStored?: Promise<void>;

  /** Pre-copy whose destination fills the task by itself: see restoreThere(). */
  private alone = false;

  /** That destination was told to resume and did not answer in time (see handOver). */
  private commitUnanswered = false;

  /** Set while CRIU's page connection here is joined to the destination after the commit (see handOver). */
  private lazyStream?: MuxStream;

  private lazyRequest(): MuxStream {
    return this.session!.request({ ':method': 'POST', ':path': `/v1/incoming/${this.id}/lazy`, 'x-ferry-received': 0 });
  }

  /**
   * CRIU here could not be reached after the commit, while the destination runs the task with
   * every page: the copy here is ended, never run again.
   */
  private endWithoutLazy(e: Error): void {
    this.warn(`CRIU's page connection here failed after the hand-over (${e.message}); ${this.target.name} has every page, the copy here was ended`);
    this.lazyDone = true;
    this.lazyStream?.destroy();
    if (isAlive(this.rec.pid!, this.rec.pidStart)) process.kill(this.rec.pid!, 'SIGKILL');
    this.killDump();
  }

  /**
   * The destination needs nothing more of this host: CRIU here is told what its lazy-pages
   * daemon would say once every page is in: it then ends the copy here and exits 0.
   */
  private async closeLazyHere(): Promise<void> {
    await closeLazyDump(this.lazyAt!, 30_000, () => this.dump?.exitCode === null && this.dump.signalCode === null);
    this.lazyDone = true;
  }

  /** CRIU's lazy port here, joined to the destination through the session. */
  private async connectLazy(stream: MuxStream): Promise<void> {
    const sock = await connectWhenListening(this.lazyAt!, 30_000, () => this.dump?.exitCode === null && this.dump.signalCode === null).catch(async () => {
      throw await this.dumpFailure();
    });
    this.startLazy(sock, stream);
  }

  /** The decision: the source lets go of its copy, then the destination resumes its own. */
  private async handOver(): Promise<void> {
    this.phase('resume');
    if (this.mode === 'stop-copy') {
      await this.decide('commit');
      // The destination resumes only once CRIU has ended the source copy: never two.
      const code = await this.dumpExit;
      if (code !== 0 || isAlive(this.rec.pid!, this.rec.pidStart)) throw await this.dumpEnded();
    } else if (this.dump?.exitCode !== null || this.dump.signalCode !== null) {
      throw await this.dumpEnded();
    }
    await faultPoint(this.ctx.self, 'commit');
    // From here the address answers on the destination: this host stops routing it first.
    await this.step('address away', this.ctx.rt.netAway(this.rec));
    const resumedAgoMs = await this.step(
      'commit',
      this.tellCommit().catch((e: unknown) => {
        // The destination may have resumed the task with every page and only its answer was
        // lost: the frozen copy here must not run again unless it says it dropped its own.
        if (this.alone && !(e instanceof FerryError && e.code === 'DROPPED')) this.commitUnanswered = true;
        throw e;
      }),
    );
    this.confirmed = true;
    this.resumedAt = performance.now() - (resumedAgoMs ?? 0);
    // The blackout runs from CRIU's freeze (its pre-dump hook) until the destination runs the task.
    const froze = await this.hold!.freezingAt();
    const resumedWall = Date.now() - (resumedAgoMs ?? 0);
    this.report.resumedAt = new Date(resumedWall).toISOString();
    this.report.blackoutMs = Math.round(froze !== undefined ? resumedWall - froze : this.resumedAt - this.frozenAt!);
    await faultPoint(this.ctx.self, 'resumed');
    if (this.alone) await this.closeLazyHere().catch((e: Error) => this.endWithoutLazy(e));
    else if (this.pagesThere) await this.connectLazy((this.lazyStream = this.lazyRequest())).catch((e: Error) => this.endWithoutLazy(e));
    this.endPhase('resume');
  }

  /** Post-copy: the pages follow the running task; CRIU exits (0) once the destination has them all. */
  private async pushPages(): Promise<void> {
    this.phase('postcopy');
    await faultPoint(this.ctx.self, 'postcopy');
    const code = await Promise.race([this.dumpExit!, this.lazyFailed ?? this.dumpExit!]).catch((e: FerryError) => (this.lazyDone ? this.dumpExit! : this.takeBack(e)));
    if (code !== 0 && !this.lazyDone) await this.takeBack(new FerryError('CRIU_FAILED', `criu dump on ${this.ctx.self} ended (${code === null ? 'killed' : `code ${code}`}) before every page reached ${this.target.name}`));
    // Every page is there: the destination's copy is the task, whatever CRIU did here after.
    if (isAlive(this.rec.pid!, this.rec.pidStart)) process.kill(this.rec.pid!, 'SIGKILL');
    this.report.postCopyWindowMs = Math.round(performance.now() - this.resumedAt!);
  }

  /** The source copy is gone: its record and directory go too. */
  private async letGo(): Promise<void> {
    const code = await this.dumpExit;
    if (code !== 0) this.warn(`criu dump on ${this.ctx.self} ended with code ${code} after the task was handed over`);
    await this.ctx.journal.remove(this.id);
    // Let the source shim record the exit before its directory goes.
    await waitUntil(() => this.rec.shimPid === undefined || !isAlive(this.rec.shimPid, this.rec.shimStart), 2000);
    await this.ctx.rt.netGone(this.rec.name, this.rec.net?.address).catch((e: Error) => this.warn(`could not remove the task's old network on ${this.ctx.self}: ${e.message}`));
    await this.ctx.rt.store.remove(this.rec.name).catch((e: Error) => this.warn(`could not remove the task's old directory on ${this.ctx.self}: ${e.message}`));
    if (this.lazyFlow && !this.alone) this.endPhase('postcopy');
  }

  /** The one way back for the state the migration reached; always throws, saying where the task is. */
  private async fail(e: unknown): Promise<never> {
    const lost = this.session?.destroyed && !this.cancelled ? new FerryError('PEER', `the connection to ${this.target.name} was lost${this.session.error ? ` (${this.session.error.message})` : ''}`) : undefined;
    const err = this.cancelled ?? lost ?? (e instanceof FerryError ? e : (ioError(e, this.ctx.self) ?? new FerryError('MIGRATION', (e as Error).message, { cause: e })));
    this.report.error = err.message;
    // Post-copy whose pages could not arrive: takeBack() already ran and says where the task is.
    if (this.takenBack) {
      this.finish();
      throw err;
    }
    // A destination that needs nothing of this host may run the task already: the copy here stays
    // frozen; the resolver goes on telling it, then has CRIU end the copy here (or lets it run
    // again, if the destination dropped its own).
    const keptFrozen = this.commitUnanswered && this.dump?.exitCode === null && this.dump.signalCode === null;
    if (this.decision === 'commit' && (keptFrozen || this.confirmedOrUndoable())) {
      // Past the point of no return: the source let go of its copy (or keeps it frozen, above).
      // The destination has the task, stopped until it hears the decision, which this agent keeps repeating.
      this.finish();
      const to = this.target.name;
      const state = keptFrozen
        ? `${to} has every page of it and runs it, or waits for the decision, which ${this.ctx.self} keeps sending; ${this.ctx.self} keeps its frozen copy until ${to} answers`
        : `the task is on ${to}, stopped until it hears the decision, which ${this.ctx.self} keeps sending`;
      throw new FerryError('MIGRATION', `migration of '${this.rec.name}' to ${to} was committed but ${to} has not confirmed it resumed the task: ${err.message}; ${state}`, { cause: err, details: [`migration id: ${this.id}`], hint: `check \`ferry --host ${to} ps\`` });
    }
    await this.rollback();
    this.finish();
    const where = (await this.ctx.rt.store.get(this.rec.name).catch(() => undefined))?.state === 'running' ? `the task is running on ${this.ctx.self} again` : `check \`ferry ps\` on ${this.ctx.self}`;
    throw new FerryError(err.code === 'ABORTED' ? 'ABORTED' : 'MIGRATION', `migration of '${this.rec.name}' to ${this.target.name} ${err.code === 'ABORTED' ? 'was cancelled' : 'failed'}: ${err.message}; ${where}`, {
      cause: err,
      details: [...err.details, `migration id: ${this.id}`],
      ...(err.hint ? { hint: err.hint } : {}),
    });
  }

  private warn(w: string): void {
    this.report.warnings = [...(this.report.warnings ?? []), w];
  }

  /**
   * After a commit decision the source copy can still be saved only in post-copy, while CRIU
   * serves pages and the destination has not confirmed (killing the dump lets the task run on).
   */
  private confirmedOrUndoable(): boolean {
    if (this.confirmed) return true;
    // Stop-copy: past the decision the source copy is gone once CRIU ended it.
    return this.mode === 'stop-copy' && !isAlive(this.rec.pid!, this.rec.pidStart);
  }

  /** Journals the decision, then tells CRIU's hold. */
  private async decide(d: 'commit' | 'abort'): Promise<void> {
    if (this.decision === d) return;
    if (d === 'commit' && this.cancelled) throw this.cancelled;
    this.decision = d;
    await this.journal({ decision: d, phase: 'decided' });
    await this.hold?.decide(d);
  }

  private finish(): MigrationReport {
    this.report.totalMs = this.elapsed();
    this.report.bytes = { pages: this.pages.bytes, images: this.imageBytes, files: this.files.bytes };
    const rate = this.pages.rateMBps();
    if (rate !== undefined) this.report.pageRateMBps = rate;
    return this.report;
  }

  /** A cut link or a dead peer ends the session within seconds, not at TCP's leisure. */
  private watchSession(s: MuxSession): void {
    s.keepalive(1000, 3);
    s.once('close', () => {
      for (const sock of this.sockets) sock.destroy(); // CRIU sees its page stream break
      void this.tracker?.stop(); // its page records have nowhere to go: a round would wait forever
    });
  }

  /** CRIU started during pre-copy's rounds, waiting at its pre-dump hook (see startAhead). */
  private ahead?: { started: Promise<string[]>; go: () => void; stop: (e: Error) => void };

  /** The deadline of a dump started ahead: from when it is let go (see goAhead). */
  private armDumpDeadline?: () => void;

  private startDump(imagesDir: string, extra: string[], deadlineNow: boolean): void {
    const { rt } = this.ctx;
    const args = ['dump', '-t', String(this.rec.pid), '-D', imagesDir, '-o', 'dump.log', '-v4', ...DUMP_OPTIONS, '--action-script', this.hold!.script, ...extra];
    // No lazy page is asked of CRIU here: pre-copy that sends the last delta itself puts every
    // one in the destination's store, and the others are read from the task (TaskPages). A CRIU
    // with patches/criu/0003 then leaves them out of its pipes (~25 ms of the freeze per GiB)
    // and fails a request for one rather than serve it.
    const elsewhere = this.lazyFlow ? { CRIU_LAZY_PAGES_ELSEWHERE: '1' } : {};
    const program = startProgram(rt.criu.bin, args, { env: { ...this.hold!.env(HOLD_TIMEOUT_S), ...rt.netEnv(this.rec), ...elsewhere }, captureStderr: false });
    const child = program.child;
    this.dump = child;
    // A CRIU that hangs before post-dump is killed: the migration then rolls back.
    let deadline: NodeJS.Timeout | undefined;
    const arm = () => {
      deadline = setTimeout(() => {
        if (!this.hold?.reachedPostDump) this.killDump();
      }, DUMP_TIMEOUT_MS);
      deadline.unref();
    };
    if (deadlineNow) arm();
    else this.armDumpDeadline = arm;
    // Stop-copy streams every page while the task is frozen: a stream that stops moving (the
    // destination neither takes pages nor breaks the stream) would hold the task frozen until
    // that deadline. Seen once with the destination's disk full at the freeze.
    const watch =
      this.mode === 'stop-copy'
        ? watchStall(
            this.pages,
            PAGE_STALL_MS,
            () => !!this.hold?.reachedPostDump,
            () => true,
            () => {
              this.pageStall = true;
              this.killDump();
            },
          )
        : undefined;
    child.once('close', () => {
      clearTimeout(deadline);
      clearInterval(watch);
    });
    this.dumpExit = program.exited;
    this.imagesDir = imagesDir;
  }

  /**
   * The task's files cannot change once CRIU has seized the whole tree, so their last sync runs
   * alongside the dump instead of after it (a sync takes ~70 ms, mostly rsync's start and round
   * trips: it was a third of the transfer inside the pause). Until CRIU says so, nothing starts.
   */
  private syncFilesOnceSeized(): void {
    const dump = this.dump!;
    const stop = () => dump.exitCode !== null || dump.signalCode !== null || !!this.hold?.reachedPostDump || !!this.cancelled;
    void untilSeized(join(this.imagesDir!, 'dump.log'), stop).then((seized) => {
      if (!seized || stop() || this.earlyFiles) return;
      this.earlyFiles = this.step('files', this.lastFiles());
      this.earlyFiles.catch(() => {}); // awaited by transfer() or rollback()
    });
  }

  private async untilFrozen(): Promise<void> {
    const r = await Promise.race([this.hold!.frozen.then(() => 'frozen' as const), this.dumpExit!.then(() => 'exited' as const)]);
    const gate = this.hold!.gateError;
    if (r === 'exited' && gate) throw new FerryError('PRECOPY', `could not lift the task's CPU throttle before the freeze: ${gate.message}`, { hint: 'migrate it again without --allow-throttle' });
    if (r === 'exited') throw await this.dumpFailure();
  }

  /** CRIU ended while it should hold (or serve) the task: it runs here again. */
  private async dumpEnded(): Promise<FerryError> {
    const e = await this.dumpFailure();
    return new FerryError('CRIU_FAILED', `criu dump ended before the hand-over (${e.message})`, { details: e.details });
  }

  private async dumpFailure(): Promise<FerryError> {
    if (this.pageStall) return new FerryError('PEER', `the page stream to ${this.target.name} stopped moving for ${PAGE_STALL_MS / 1000} s while the task was frozen; Ferry ended the dump`, { hint: `check ${this.target.name}'s agent and its free disk space, then migrate again` });
    const log = join(this.imagesDir ?? '', 'dump.log');
    const lines = await readErrorLines(log);
    const sessionGone = this.session?.destroyed || this.session?.closed;
    const first = sessionGone ? `the connection to the destination was lost${this.session?.error ? ` (${this.session.error.message})` : ''}` : (lines[0] ?? 'criu dump failed');
    const hint = hintFor(lines);
    return new FerryError('CRIU_FAILED', first, { details: lines, ...(hint ? { hint } : {}) });
  }

  private async listen(onConn: (s: Socket) => Promise<void>): Promise<number> {
    const l = await listenLocal((s) => {
      this.sockets.add(s);
      void onConn(s);
    });
    this.servers.push(l.server);
    return l.port;
  }

  /** CRIU's images besides memory, in one stream: one round trip, not one per file. */
  private async sendImages(dir: string): Promise<void> {
    const files = (await readdir(dir)).filter((f) => f !== 'dump.log');
    const s = this.session!.request({ ':method': 'PUT', ':path': `/v1/incoming/${this.id}/images` });
    const answer = readAll(s, 30_000);
    answer.catch(() => {}); // read below, after the last file went out
    try {
      for (const f of files) {
        if (!imageNameOk(f)) throw new FerryError('MIGRATION', `CRIU wrote an image Ferry cannot send: ${f}`);
        // Small files are read at once: async reads queue behind the pause's other work (~40 ms
        // for 22 files). A big one (pages CRIU keeps in the images) must not stall the agent.
        const path = join(dir, f);
        const data = statSync(path).size <= SYNC_IMAGE_BYTES ? readFileSync(path) : await readFile(path);
        this.imageBytes += data.length;
        s.write(imageHeader(f, data.length));
        if (!s.write(data) && !s.destroyed) await drained(s);
      }
    } catch (e) {
      s.destroy();
      throw e;
    }
    s.end();
    const [h, text] = await answer;
    decodeAnswer(h, text, 'images');
  }

  /**
   * rsync of the task's directory, carried inside the session (see native/ferry-rsh.c); with a
   * gate, its bytes wait for it. 'all' is the presync; the last sync is 'rest' (all but the log)
   * and 'log' (the task's log by what it grew: a task's 300 MB log, grown by a few lines, took
   * 0.23-0.31 s of the pause to compare whole, both copies read through).
   */
  private rsyncs = 0;
  private async rsync(gate?: Promise<void>, what: 'all' | 'rest' | 'log' = 'all'): Promise<void> {
    const sockPath = join(this.workDir!, `rsync-${++this.rsyncs}.sock`);
    const server = createServer((sock) => {
      this.sockets.add(sock);
      let head = '';
      const onData = (c: Buffer) => {
        head += c.toString('latin1');
        const nl = head.indexOf('\n');
        if (nl < 0) return;
        sock.off('data', onData);
        sock.pause();
        const args = JSON.parse(head.slice(0, nl)) as string[];
        const rest = Buffer.from(head.slice(nl + 1), 'latin1');
        const stream = this.session!.request({ ':method': 'POST', ':path': `/v1/incoming/${this.id}/rsync`, 'x-ferry-rsync': JSON.stringify(args) });
        const flow = () => {
          if (rest.length) stream.write(rest);
          void splice(sock, stream, this.files, this.files);
          sock.resume();
        };
        if (!gate) return flow();
        // Until the gate opens neither side hears the other: the server's version waits in the
        // stream, and rsync here waits for it before it reads the task's directory.
        gate.then(flow, () => {
          stream.destroy();
          sock.destroy();
        });
      };
      sock.on('data', onData);
    });
    await new Promise<void>((r) => server.listen(sockPath, r));
    this.servers.push(server);
    const src = `${this.ctx.rt.store.dir(this.rec.name)}/`;
    const ssh = ['-e', `${join(this.ctx.rt.nativeDir, 'ferry-rsh')} ${sockPath}`];
    const dest = `${this.target.name}:${src}`;
    const excluded = ['/images', '/images.new', `/${PRECOPY_PAGES}`, '/lock', '/task.json', '/incoming.json', '/migrate-dump.log', '/exit-*.json', '/restore-*.pid', '/proc.crtools', ...(what === 'rest' ? ['/task.log'] : [])];
    // --inplace: a changed file is patched where it is, not rebuilt whole beside it (a 300 MB
    // file was rewritten on the destination's disk inside the pause). Nothing uses the
    // destination's copies before the task runs there.
    const args = what === 'log' ? ['-a', '--append', ...ssh, this.ctx.rt.store.logPath(this.rec.name), dest] : ['-a', '--delete', '--inplace', ...excluded.map((x) => `--exclude=${x}`), ...ssh, src, dest];
    // A held sync waits as long as the rounds take; its time limit runs from the gate.
    const limit = new AbortController();
    const outer = this.signal;
    const onOuter = () => limit.abort(outer.reason);
    outer.addEventListener('abort', onOuter, { once: true });
    if (outer.aborted) onOuter();
    let timer: NodeJS.Timeout | undefined;
    let finished = false;
    void (gate ?? Promise.resolve()).then(
      () => {
        if (finished) return;
        timer = setTimeout(() => limit.abort(new FerryError('TIMEOUT', `rsync of the task's files to ${this.target.name} did not finish within ${RSYNC_TIMEOUT_MS / 1000} s`)), RSYNC_TIMEOUT_MS);
      },
      () => {},
    );
    try {
      await run('rsync', args, { signal: limit.signal });
    } catch (e) {
      // What failed, in the user's terms; rsync's command line stays in the details.
      if (!(e instanceof FerryError) || e.code !== 'PROGRAM_FAILED') throw e;
      throw new FerryError('PROGRAM_FAILED', `copying the task's ${what === 'log' ? 'log' : 'files'} to ${this.target.name} failed: ${e.details.at(-1) ?? e.message}`, { details: [e.message, ...e.details] });
    } finally {
      finished = true;
      clearTimeout(timer);
      outer.removeEventListener('abort', onOuter);
      server.close();
    }
  }

  /**
   * Carries CRIU's lazy-page traffic over a link that outlives the connection: after a cut the
   * source reconnects and both sides resend what the other missed; the destination task waits
   * meanwhile. If the link stays down past the grace, or the destination lost its pages, the
   * task is taken back here.
   */
  private startLazy(sock: Socket, stream: MuxStream): void {
    this.lazySock = sock;
    const tunnel = new ResumableTunnel(this.pagesFromTask(sock));
    this.lazy = tunnel;
    // If this agent dies, CRIU must see a broken connection, not a clean end: between two
    // requests it takes a clean end for "every page delivered" and ends the task here, while the
    // destination still waits for pages. Broken, it lets the task run on here (the resolver then
    // drops the destination's copy). Set alongside the first pages: the task waits on them.
    this.lingerSet = resetOnClose(this.ctx.rt.nativeDir, sock, true).then((why) => {
      if (why) this.warn(`CRIU's page connection may end cleanly if this agent dies: ${why}`);
    });
    this.lazyFailed = new Promise<never>((_res, rej) => (this.failLazy = rej));
    this.lazyFailed.catch(() => {});
    tunnel.local.on('data', (c: Buffer) => this.pages.add(c.length));
    // The destination's daemon has every page and closed its side: let CRIU finish. Never before
    // the destination confirmed: CRIU would end the source task as if the pages were delivered.
    tunnel.on('peerEnded', () => this.lazyComplete());
    // Before the destination confirmed, a cut is a failed migration (rolled back); after, it is waited out.
    tunnel.on('detached', () => {
      if (this.confirmed && !this.lazyDone && this.dump?.exitCode === null) void this.reattachLazy();
    });
    tunnel.attach(stream, 0);
    // Counted from the resume (the decision has its own limits); a cut link has its own grace (reattachLazy()).
    watchStall(
      this.pages,
      POSTCOPY_STALL_MS,
      () => this.lazyDone || this.takenBack || this.dump?.exitCode !== null,
      () => this.confirmed && tunnel.attached,
      () => this.failLazy!(new FerryError('PEER', `no page went to ${this.target.name} for ${POSTCOPY_STALL_MS / 1000} s though it still lacks some (its lazy-pages daemon stopped asking)`)),
    );
  }

  private reattaching = false;
  /** The destination has every page: from here nothing may take the task back. */
  private lazyDone = false;

  /** CRIU's lazy page connection here. */
  private lazySock?: Socket;

  /** The frozen task's memory, opened at the transfer; what post-copy's pages are read from. */
  private taskMem?: TaskMemory;

  /**
   * The pages the destination will ask for come from the frozen task itself (see TaskPages): its
   * memory is opened while frozen, where a failure still rolls the migration back.
   */
  private async openTaskMemory(): Promise<void> {
    if (!this.lazyFlow || this.pagesThere) return;
    try {
      this.taskMem = new TaskMemory(await lazyRuns(this.imagesDir!), pidsByVpid(this.rec.pid!));
    } catch (e) {
      throw new FerryError('CRIU_FAILED', `cannot read the memory of '${this.rec.name}' to serve its pages: ${(e as Error).message}`, { hint: 'migrate it with --mode stop-copy' });
    }
  }

  /**
   * Requests for pages answered from the frozen task's memory (see TaskPages), the rest relayed
   * to CRIU. Pre-copy that sent every page has none to serve: CRIU's connection only ends it.
   */
  private pagesFromTask(sock: Socket): Duplex {
    return this.taskMem ? new TaskPages(sock, this.taskMem) : sock;
  }

  private lingerSet?: Promise<void>;

  private lazyComplete(): void {
    if (this.lazyDone) return;
    this.lazyDone = true;
    // From here a clean end is the truth: clear the reset first, then end.
    const end = () =>
      void (this.lingerSet ?? Promise.resolve())
        .then(() => (this.lazySock ? resetOnClose(this.ctx.rt.nativeDir, this.lazySock, false) : undefined))
        .then((why) => {
          if (why) this.warn(`could not clear the reset on CRIU's page connection: ${why}`);
          this.lazy?.endLocal();
        });
    if (this.confirmed) end();
    else this.lazy?.once('confirmed', end);
  }
  private takenBack = false;

  private async reattachLazy(): Promise<void> {
    if (this.reattaching) return;
    this.reattaching = true;
    const deadline = Date.now() + POSTCOPY_GRACE_MS;
    try {
      while (Date.now() < deadline && this.dump?.exitCode === null && !this.lazy!.attached && !this.lazyDone) {
        try {
          const session = await this.ensureSession();
          const stream = session.request({ ':method': 'POST', ':path': `/v1/incoming/${this.id}/lazy`, 'x-ferry-received': this.lazy!.received });
          const h = await new Promise<Headers>((res, rej) => {
            stream.once('response', res);
            stream.once('error', rej);
            stream.once('close', () => rej(new FerryError('PEER', 'closed')));
          });
          if (Number(h[':status']) === 200 && h['x-ferry-done'] !== undefined) {
            // Every page reached the destination before the cut: CRIU may finish.
            this.lazyComplete();
            return;
          }
          if (Number(h[':status']) !== 200) {
            const [, text] = await readAll(stream, 10_000).catch(() => [{}, ''] as const);
            const why = (() => {
              try {
                return (JSON.parse(text) as { error?: { message?: string } }).error?.message;
              } catch {
                return undefined;
              }
            })();
            this.failLazy!(new FerryError('PEER', `${this.target.name} cannot take the pages any more: ${why ?? `it answered ${String(h[':status'])}`}`));
            return;
          }
          this.lazy!.attach(stream, Number(h['x-ferry-received']));
          this.warn(`the link to ${this.target.name} was cut during post-copy; page serving resumed`);
          return;
        } catch {
          await sleep(1000);
        }
      }
      if (!this.lazy!.attached && !this.lazyDone && this.dump?.exitCode === null) this.failLazy!(new FerryError('PEER', `the link to ${this.target.name} stayed down for ${POSTCOPY_GRACE_MS / 1000} s during post-copy`));
    } finally {
      this.reattaching = false;
    }
  }

  /** The current session, or a new one if it broke. */
  private async ensureSession(): Promise<MuxSession> {
    if (this.session && !this.session.destroyed) return this.session;
    this.session = await connect(this.target.address, { tls: this.ctx.tls, expectName: this.target.name, timeoutMs: 3000 });
    this.session.keepalive(1000, 3);
    return this.session;
  }

  /**
   * Tells the destination to resume its copy. The source copy is gone by now, so a cut here is
   * waited out (new connections) rather than given up on; the agent's resolver keeps trying after.
   * Returns how long before its answer the destination resumed the task, when it says.
   */
  private async tellCommit(): Promise<number | undefined> {
    const deadline = Date.now() + COMMIT_RETRY_MS;
    for (let attempt = 0; ; attempt++) {
      try {
        const session = await this.ensureSession();
        const answer = await requestJson<{ resumedAgoMs?: unknown }>(session, 'POST', `/v1/incoming/${this.id}/commit`, {}, { timeoutMs: 30_000 });
        if (attempt > 0) this.warn(`${this.target.name} confirmed the resume after ${attempt} retries`);
        this.lazy?.emit('confirmed');
        if (this.lazy && !this.lazy.attached && this.dump?.exitCode === null) void this.reattachLazy();
        const ago = answer.resumedAgoMs;
        return typeof ago === 'number' && ago >= 0 && ago <= COMMIT_RETRY_MS ? ago : undefined;
      } catch (e) {
        // A destination that dropped its copy says so: there is nothing to wait for.
        if (Date.now() > deadline || (e instanceof FerryError && e.code === 'DROPPED')) throw e;
        await sleep(1000);
      }
    }
  }

  /**
   * Post-copy after the resume, when the pages can no longer reach the destination: its copy is
   * dropped and the source copy (whole in memory, frozen since the switch) runs again. Work the
   * task did on the destination since the switch is lost, its memory is not.
   */
  private async takeBack(why: FerryError): Promise<never> {
    this.killDump(); // past post-dump the task holds no parasite: it runs on once CRIU is gone
    await this.dumpExit;
    this.decision = 'abort';
    await this.journal({ decision: 'abort', phase: 'decided', settled: true });
    const alive = isAlive(this.rec.pid!, this.rec.pidStart);
    const now = await this.ctx.rt.store.get(this.rec.name).catch(() => undefined);
    if (now && now.state === 'frozen') {
      now.state = alive ? 'running' : 'exited';
      await this.ctx.rt.store.save(now);
    }
    if (alive) await this.ctx.rt.netHere(this.rec).catch((e: Error) => this.warn(`the task's address could not be routed back to ${this.ctx.self}: ${e.message}`));
    // Tell the destination to drop its copy now if it can be reached; the resolver goes on otherwise.
    const told = await this.ensureSession()
      .then((s) => requestJson(s, 'POST', `/v1/incoming/${this.id}/abort`, { sourceRuns: alive }, { timeoutMs: 10_000 }))
      .then(
        () => true,
        () => false,
      );
    if (told) await this.ctx.journal.remove(this.id);
    this.takenBack = true;
    const where = alive ? `the task is running on ${this.ctx.self} again (its work on ${this.target.name} since the switch is lost)` : `the task is lost: it had exited on ${this.ctx.self}`;
    throw new FerryError('MIGRATION', `post-copy of '${this.rec.name}' to ${this.target.name} failed: ${why.message}; ${where}`, { cause: why, details: [`migration id: ${this.id}`] });
  }

  private killDump(): void {
    if (!this.dump?.pid || this.dump.exitCode !== null) return;
    try {
      process.kill(-this.dump.pid, 'SIGKILL');
    } catch {
      this.dump.kill('SIGKILL');
    }
  }

  private async rollback(): Promise<void> {
    const { rt } = this.ctx;
    // A dump started ahead and never let go: stopped at its hook, it ends before touching the task.
    if (this.ahead) {
      this.ahead.stop(new Error('the migration is rolled back'));
      await this.ahead.started.catch(() => undefined);
    }
    // Keep CRIU's log of the failed dump where the user can read it.
    if (this.imagesDir) await copyFile(join(this.imagesDir, 'dump.log'), join(rt.store.dir(this.rec.name), 'migrate-dump.log')).catch(() => undefined);
    // A post-copy hold that already let go (the destination never confirmed): past post-dump the
    // task holds no parasite, so killing CRIU lets it run on here.
    const holdLetGo = this.decision === 'commit';
    this.decision = 'abort';
    await this.journal({ decision: 'abort', phase: 'decided' }).catch(() => undefined);
    if (holdLetGo) this.killDump();
    // Make CRIU let go of the task: at the hold, by refusing; mid-dump, by breaking its streams.
    await this.hold?.decide('abort');
    for (const s of this.sockets) s.destroy();
    this.lazyStream?.destroy();
    // An early file sync still running ends with its broken stream before the destination hears
    // the abort; a held one that was never released ends refused.
    this.lastSync?.cancel();
    this.lastLogSync?.cancel();
    await this.earlyFiles?.catch(() => undefined);
    await this.lastSync?.done.catch(() => undefined);
    await this.lastLogSync?.done.catch(() => undefined);
    if (this.dump && this.dump.exitCode === null) {
      // With --lazy-pages CRIU goes on past a refusing post-dump hook and waits to serve pages.
      const patience = this.hold?.reachedPostDump ? 3000 : 30_000;
      const code = await Promise.race([this.dumpExit, sleep(patience).then(() => 'slow' as const)]);
      if (code === 'slow') {
        this.killDump();
        await this.dumpExit;
      }
    }
    // A destination that restored the task keeps it, stopped, until it hears the decision; one
    // that did not removes what it got when the session ends. The agent retries what fails here.
    let told = this.entry.phase !== 'restore' && this.entry.phase !== 'decided';
    if (this.session && !this.session.destroyed) {
      const sourceRuns = isAlive(this.rec.pid!, this.rec.pidStart);
      told = await requestJson(this.session, 'POST', `/v1/incoming/${this.id}/abort`, { sourceRuns }, { timeoutMs: 10_000 }).then(
        () => true,
        () => told,
      );
    }
    if (told) await this.ctx.journal.remove(this.id);
    else await this.journal({ settled: true }).catch(() => undefined);
    const now = await rt.store.get(this.rec.name).catch(() => undefined);
    if (now && now.state === 'frozen') {
      now.state = now.pid !== undefined && isAlive(now.pid, now.pidStart) ? 'running' : 'exited';
      await rt.store.save(now);
    }
    // The task runs here again: its address too (CRIU's unlock hook opened it already, unless
    // the hand-over had begun and this host had let the address go).
    if (now?.state === 'running') await rt.netHere(now).catch((e: Error) => this.warn(`the task's address could not be routed back to ${this.ctx.self}: ${e.message}`));
  }

  private async release(): Promise<void> {
    clearInterval(this.progressTimer);
    // Disarms the task: the helper's descriptors go, and the kernel drops the write-protection.
    await this.tracker?.stop();
    try {
      this.throttle?.release();
    } catch (e) {
      this.onProgress({ type: 'note', message: `could not lift the task's CPU throttle: ${(e as Error).message}` });
    }
    this.precopyStream?.destroy();
    this.lastSync?.cancel();
    this.lastLogSync?.cancel();
    this.releaseDumpSlot();
    for (const s of this.sockets) s.destroy();
    this.lazy?.destroy();
    this.taskMem?.close();
    for (const srv of this.servers) srv.close();
    if (this.dump && this.dump.exitCode === null) {
      // After a commit CRIU is ending the source task: let it finish (the resolver settles what
      // it leaves). Before one, a CRIU still running here is ours to stop.
      if (this.decision === 'commit') await Promise.race([this.dumpExit, sleep(15_000)]);
      else this.killDump();
    }
    await this.hold?.dispose();
    this.session?.close();
    if (this.workDir) await rm(this.workDir, { recursive: true, force: true });
    if (this.imagesDir && this.ctx.rt.store.scratch.owns(this.imagesDir)) await rm(this.imagesDir, { recursive: true, force: true });
  }
}

/** Resident memory of the task's process tree: the destination must have room for it. */
function treeRss(root: number): number {
  let total = 0;
  for (const pid of treePids(root)) {
    try {
      total += Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0) * 1024;
    } catch {
      /* exited meanwhile */
    }
  }
  return total;
}

function optional<K extends string, V>(k: K, v: V | undefined): { [P in K]?: V } {
  return (v === undefined ? {} : { [k]: v }) as { [P in K]?: V };
}

async function dirSize(dir: string): Promise<number> {
  let total = 0;
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) total += await dirSize(p);
    else total += (await stat(p).catch(() => ({ size: 0 }))).size;
  }
  return total;
}

/** Image files up to this size are read synchronously inside the pause. */
const SYNC_IMAGE_BYTES = 4 << 20;

/** Work directories of migrations leaving this host (hold FIFOs, the small images). */
export function outgoingDir(stateDir: string): string {
  return join(stateDir, 'outgoing');
}

/** Until a stream wants more, or is gone. */
function drained(s: MuxStream): Promise<void> {
  return new Promise((res) => {
    const done = () => {
      s.off('drain', done);
      s.off('close', done);
      res();
    };
    s.on('drain', done);
    s.on('close', done);
  });
}
