// The destination side of a migration, inside the receiving agent: pre-checks, a CRIU page
// server or lazy-pages daemon behind the session's streams, the images, rsync, the restore, and
// removal of everything received when the source aborts or goes away before the task runs here.
//
// The restore is the first phase of a two-phase commit: the restored tree stays stopped (and its
// directory keeps incoming.json) until the source, which decides, says commit — then it resumes —
// or abort — then it is killed and removed. So the task never runs on both hosts, and a decision
// that arrives after this agent restarted still finds its migration by id on disk.
import type { Socket } from 'node:net';
import { existsSync, statSync } from 'node:fs';
import { mkdir, readFile, readdir, rename, rm, statfs, symlink, truncate, writeFile } from 'node:fs/promises';
import { jsonHeaders, type MuxSession, type MuxStream } from '../wire/session.js';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import type { ServerHandle } from '../criu/driver.js';
import { FerryError } from '../errors.js';
import { startProgram } from '../exec/run.js';
import type { Runtime } from '../runtime/runtime.js';
import { isValidName, validateName, type TaskRecord } from '../runtime/task-store.js';
import { readJson, writeJsonAtomic } from '../util/fs.js';
import { isAlive, killAndWait, resumeTree, sleep, startTime, waitUntil } from '../util/proc.js';
import { createTaskNet } from '../net/tasknet.js';
import { stoppedAtDump } from '../criu/task-state.js';
import { netClash } from '../runtime/runtime.js';
import type { PrepareRequest } from '../wire/schemas.js';
import { debugFillHold, debugIndexAfterResume, faultPoint, holdKernelReads } from './fault-points.js';
import { ResumableTunnel } from './resumable.js';
import { PAGE, PRECOPY_PAGES, PageStore, STORE_INDEX_SUFFIX } from '../precopy/store.js';
import { Decompressor } from '../wire/codec.js';
import { ImageBundleWriter } from '../wire/image-bundle.js';
import { MemPageHolder, serveLazy, type FrontStats, type LazyFront } from '../precopy/front.js';
import { lazyRuns } from '../criu/image.js';
import { GHOST_LIMIT_MIB, readErrorLines, readStoredFill } from '../criu/log.js';
import { bridgeProgram, connectWhenListening, localPair, ownLoopbackEndpoint, splice, type LoopbackEndpoint } from './tunnel.js';

export type { Mode, PrepareRequest } from '../wire/schemas.js';

/** incoming.json in the task's directory: this host holds an uncommitted migration of it. */
interface IncomingMark {
  id: string;
  from: string;
  /** receiving: images and files arrive; restored: the task is here, stopped, awaiting the decision. */
  phase: 'receiving' | 'restored';
  /** The task's own address: its namespace here goes with the migration if it fails. */
  address?: string;
  /** Restored for lazy pages: its memory comes through this agent (and, post-copy, from the source). */
  lazy?: boolean;
}

interface Incoming {
  id: string;
  req: PrepareRequest;
  session: MuxSession;
  dir: string;
  imagesDir: string;
  pageServer?: ServerHandle;
  /** Where the page server listens: a loopback address of this migration's own. */
  pageServerAt?: LoopbackEndpoint;
  /** The dump's page stream arrived (there is one). */
  pageStreamTaken?: boolean;
  /** The source's end of the lazy-pages link, held until the local daemon and its tunnel exist. */
  lazyStream?: MuxStream;
  restored?: TaskRecord;
  /** Namespace pids CRIU found stopped at the dump: the resume leaves them stopped. */
  stopped?: Set<number>;
  /** Set while CRIU restores here: an abort waits for it rather than pull files from under it. */
  restoring?: Promise<unknown>;
  committed: boolean;
  /** The images arrived (they come once, in one stream). */
  imagesIn: boolean;
  /** Pre-copy: the pages that arrived while the task still ran on the source. */
  store?: PageStore;
  /** Pre-copy: every page record, the last delta's too, is in the store. */
  storeDone?: Promise<void>;
  /** The lazy-pages daemon: started at the prepare where it may start early, else once the images are here. */
  lazyReady?: Promise<void>;
  /** The restore's shim, started at the prepare and waiting for the restore request. */
  restoreAhead?: ReturnType<Runtime['startRestore']>;
  /** The lazy pages the pagemap images list, read once the images are here (see lazyRunsOf). */
  runs?: ReturnType<typeof lazyRuns>;
  /** What stoppedAtDump() found in the images, read as soon as they are here. */
  stoppedReady?: Promise<Set<number>>;
  /** Pre-copy with every page in the store: the daemon fills the task without the source (see restore()). */
  alone?: boolean;
  /** Times the task was restored again here after its daemon failed in the fill (see refill()). */
  refills?: number;
}

/** Restores again after a failed fill from pre-copy's store, before the task counts as lost. */
const MAX_REFILLS = 2;

/** How long a post-copy task waits for its source to come back after a cut (the source waits longer). */
const POSTCOPY_GRACE_MS = 110_000;

/** postcopy.json in a task's directory: it arrived by post-copy; complete once every page is here. */
interface PostCopyMark {
  id: string;
  from: string;
  complete: boolean;
  /** Every page was in pre-copy's store here: the daemon (this process) fills the task by itself. */
  alone?: { pid: number; start?: number };
}

/** A post-copy pages link; it lives until every page is here, across connections. */
interface LazyLink {
  id: string;
  from: string;
  task: string;
  daemon?: ServerHandle & { socket: Socket };
  tunnel?: ResumableTunnel;
  /** The task was resumed here: losing the link now means losing the task's pages. */
  committed: boolean;
  grace?: NodeJS.Timeout;
  close: () => void;
  /** Restored, stopped until the decision: the daemon's background fill waits (LazyFront.quiet). */
  quiet?: boolean;
  /** The task runs: the front may prefetch (a front served after that prefetches at once). */
  running?: boolean;
  front?: LazyFront;
  /** Starts the front on the daemon's socket (once the images are here). */
  serve?: () => void;
  /** The task runs here: the daemon may fill it from pre-copy's store by itself. */
  onRunning?: () => void;
  /** The task is about to run: the store's index is written now if it can be (see startLazyDaemon). */
  beforeRunning?: () => void;
  /** Settles once the store's index is written (or could not be): from then on the daemon needs no agent. */
  indexed?: Promise<void>;
  /** Every page is in the store: the source let go at the resume and the daemon needs no link. */
  alone?: boolean;
  /** When the task ran here (performance.now()). */
  resumedAt?: number;
  /** Its log's size then: a task restored again here (refill()) starts from there. */
  logAtResume?: number;
  /** The task's root here, once committed: ended the moment its daemon fails. */
  root?: { pid: number; start?: number };
}

/** Milliseconds since t (performance.now()), to a tenth: how long ago the task resumed here. */
function msSince(t: number): number {
  return Math.round((performance.now() - t) * 10) / 10;
}

/**
 * Pre-copy's store is indexed just before the resume up to this many pages: the index takes
 * ~3-5 ms per GiB of the pause. A larger store is indexed a turn after the resume.
 */
const INDEX_BEFORE_RESUME_MAX_PAGES = (4 * 2 ** 30) / PAGE;

export class Destination {
  private readonly incoming = new Map<string, Incoming>();
  private readonly lazyLinks = new Map<string, LazyLink>();
  /** Why post-copy copies were dropped, for a source that comes back to ask (this agent's lifetime). */
  private readonly dropped = new Map<string, string>();

  constructor(
    private readonly rt: Runtime,
    private readonly self: string,
    private readonly onEvent: (e: Record<string, unknown>) => void = () => {},
  ) {}

  /**
   * Waits while a task that arrived here still gets its memory filled (the window after the
   * resume, in post-copy, auto and pre-copy alike): it cannot be dumped before every page is in it.
   */
  async untilFilled(task: string, signal?: AbortSignal): Promise<void> {
    await this.adopted.get(task)?.catch(() => {});
    const daemon = [...this.lazyLinks.values()].find((l) => l.task === task && l.committed)?.daemon;
    if (!daemon) return;
    signal?.throwIfAborted();
    await new Promise<void>((resolve, reject) => {
      const onAbort = () => reject(signal?.reason);
      signal?.addEventListener('abort', onAbort, { once: true });
      void daemon.exited.then(() => {
        signal?.removeEventListener('abort', onAbort);
        resolve();
      });
    });
  }

  /**
   * After a restart: removes migrations that never got as far as a restore; keeps restored ones,
   * stopped, for the source's decision (it retries until this agent hears it).
   */
  async sweep(): Promise<{ removed: string[]; inDoubt: string[] }> {
    const removed: string[] = [];
    const inDoubt: string[] = [];
    // Post-copy tasks whose pages were still arriving when this agent died: they cannot arrive now.
    for (const { name, dir, mark } of await this.marks<PostCopyMark>('postcopy.json')) {
      if (mark.complete) continue;
      if (mark.alone) {
        this.adoptFill(name, dir, mark, mark.alone);
        continue;
      }
      await this.endHere(name, dir);
      removed.push(`${name} (post-copy, pages lost with the previous agent)`);
    }
    for (const { name, dir, mark } of await this.marks<IncomingMark>('incoming.json')) {
      if (mark.phase === 'restored' && existsSync(join(dir, 'task.json'))) {
        inDoubt.push(`${name} (migration ${mark.id} from ${mark.from})`);
        continue;
      }
      await this.rt.netGone(name, mark.address);
      await this.rt.store.scratch.removeTaskDir(dir);
      removed.push(name);
    }
    return { removed, inDoubt };
  }

  /**
   * The previous agent's daemon fills a task from pre-copy's store by itself (its page server,
   * that agent, went with it): once it is gone its log says whether every page went in. A task
   * whose fill did not finish may have read zeros for its memory: it must not run on.
   */
  private adoptFill(name: string, dir: string, mark: PostCopyMark, daemon: { pid: number; start?: number }): void {
    const done = (async () => {
      while (isAlive(daemon.pid, daemon.start)) await sleep(100);
      const filled = await readStoredFill(join(this.rt.store.imagesDir(name), 'lazy-pages.log'));
      if (filled) {
        await writeJsonAtomic(join(dir, 'postcopy.json'), { ...mark, complete: true } satisfies PostCopyMark);
        await rm(join(dir, PRECOPY_PAGES), { force: true });
        await rm(join(dir, PRECOPY_PAGES + STORE_INDEX_SUFFIX), { force: true });
        this.onEvent({ event: 'lazy pages served', id: mark.id, task: name, filledByDaemon: filled.pages, faultsFilledByDaemon: filled.faults, afterRestart: true });
        return;
      }
      await this.endHere(name, dir);
      this.onEvent({ event: 'warning', task: name, message: `its memory was being filled from pre-copy's store when the previous agent ended, and the fill did not finish: the task was ended (its memory would not be whole)` });
    })();
    this.adopted.set(name, done);
    this.background(done.finally(() => this.adopted.delete(name)), name, 'waiting for the fill of its memory');
  }

  /** Fills a previous agent's daemon still does, by task (see adoptFill). */
  private readonly adopted = new Map<string, Promise<void>>();

  /** Every task directory holding a migration marker (incoming.json, postcopy.json), with it. */
  private async marks<M>(file: string): Promise<Array<{ name: string; dir: string; mark: M }>> {
    const names = await readdir(this.rt.store.tasksDir).catch(() => [] as string[]);
    const out: Array<{ name: string; dir: string; mark: M }> = [];
    for (const name of names) {
      if (!isValidName(name)) continue;
      const dir = this.rt.store.dir(name);
      const mark = await readJson<M>(join(dir, file)).catch(() => undefined);
      if (mark) out.push({ name, dir, mark });
    }
    return out;
  }

  /** The uncommitted incoming migration with this id, from disk. */
  private async incomingMark(id: string): Promise<{ name: string; dir: string; mark: IncomingMark } | undefined> {
    return (await this.marks<IncomingMark>('incoming.json')).find((x) => x.mark.id === id);
  }

  get(id: string): Incoming {
    const m = this.incoming.get(id);
    if (!m) throw new FerryError('PEER', `no incoming migration ${id} on this host`);
    return m;
  }

  async prepare(req: PrepareRequest, session: MuxSession): Promise<{ freeMemBytes: number; freeDiskBytes: number }> {
    const name = req.task.name;
    validateName(name);
    const criu = this.rt.criu;
    await criu.ensureUsable().catch((e: FerryError) => {
      throw new FerryError('PRECHECK', `destination: ${e.message}`, { hint: e.hint ?? 'run scripts/bootstrap.sh there' });
    });
    const check = await criu.check();
    if (!check.ok) throw new FerryError('PRECHECK', `destination: criu check fails: ${check.output.split('\n').pop()}`, { hint: 'run `ferry doctor` on the destination' });
    await this.rt.store.init();
    const dir = this.rt.store.dir(name);
    if (existsSync(dir)) {
      throw new FerryError('PRECHECK', `destination already has a task named '${name}'`, { hint: 'remove it there, or migrate to another host' });
    }
    const free = await freeResources(this.rt.stateDir);
    const needMem = Math.ceil(req.memBytes * 1.1) + (64 << 20);
    if (free.memBytes < needMem) {
      throw new FerryError('PRECHECK', `destination has ${mib(free.memBytes)} MiB of memory available, the task needs ${mib(needMem)} MiB`, { hint: 'free memory there or pick another host' });
    }
    // Stop-copy images and pre-copy's page store hold the task's memory on disk here.
    const needDisk = req.diskBytes + (req.mode === 'stop-copy' || req.mode === 'pre-copy' || req.mode === 'auto' ? req.memBytes : 0);
    if (free.diskBytes < needDisk) {
      throw new FerryError('PRECHECK', `destination has ${mib(free.diskBytes)} MiB of disk free in ${this.rt.stateDir}, the task needs ${mib(needDisk)} MiB`, { hint: 'free disk there or pick another host' });
    }
    const address = req.task.net?.address;
    if (address) {
      try {
        this.rt.requireNet(address);
      } catch (e) {
        throw new FerryError('PRECHECK', `destination: ${(e as FerryError).message}`, { hint: 'give the destination agent the same --net-pool, or pick a host that has it' });
      }
      const clash = netClash(req.task, await this.rt.store.list(), true);
      if (clash) throw new FerryError('PRECHECK', `destination: ${clash}`, { hint: 'remove that task or migrate to another host' });
    }
    const imagesDir = this.rt.store.imagesDir(name);
    // Lazy modes: the images live in scratch (memory; see runtime/scratch.ts), reached through a
    // link where they would be. Stop-copy's hold the task's memory: they stay on disk.
    const scratch = req.mode === 'stop-copy' ? undefined : await this.rt.store.scratch.make('incoming', name, req.memBytes + (GHOST_LIMIT_MIB << 20));
    await mkdir(scratch ? dir : imagesDir, { recursive: true, mode: 0o700 });
    if (scratch) await symlink(scratch, imagesDir);
    await writeJsonAtomic(join(dir, 'incoming.json'), { id: req.id, from: req.from, phase: 'receiving', ...(address ? { address } : {}) } satisfies IncomingMark);
    const m: Incoming = { id: req.id, req, session, dir, imagesDir, committed: false, imagesIn: false };
    this.incoming.set(req.id, m);
    try {
      await writeFile(join(imagesDir, 'cpuinfo.img'), Buffer.from(req.cpuinfo, 'base64'));
      await criu.cpuinfoCheck(imagesDir);
      // The namespace waits, cut off and unrouted, until the decision: the source still answers.
      if (address) await createTaskNet(this.rt.stateDir, name, address);
      if (req.mode === 'stop-copy') {
        m.pageServerAt = await ownLoopbackEndpoint();
        m.pageServer = criu.pageServer({ imagesDir, ...m.pageServerAt });
      } else if (criu.lazyPagesEarly) {
        // Up and listening long before the restore: its start (~20-70 ms) was inside the pause.
        m.lazyReady = this.startLazyDaemon(m);
        m.lazyReady.catch(() => {});
      }
      // The restore's shim starts now and waits for the restore request (and CRIU's command,
      // made from the images then): a fork+exec from this agent blocks it ~15 ms, which was
      // inside the pause.
      m.restoreAhead = this.rt.startRestore(this.restoreRecord(m), imagesDir, { lazyPages: req.mode !== 'stop-copy', leaveStopped: true, onRestored: () => this.quiet(req.id) });
    } catch (e) {
      await this.abort(req.id);
      throw e;
    }
    session.once('close', () => {
      // The source went away: what has not started running here is removed. A task that is
      // being restored or runs here is kept: the source may already have let go of its copy.
      if (this.incoming.get(req.id) === m && !m.restored && !m.restoring) this.background(this.abort(req.id), m.req.task.name, 'removing a migration whose source went away');
    });
    this.onEvent({ event: 'incoming', id: req.id, task: name, from: req.from, mode: req.mode });
    return { freeMemBytes: free.memBytes, freeDiskBytes: free.diskBytes };
  }

  /** The page stream of a stop-copy dump, handed to the local `criu page-server`. */
  async pages(id: string, stream: MuxStream, codec: 'lz4' | undefined): Promise<void> {
    const m = this.get(id);
    if (!m.pageServer || !m.pageServerAt) throw new FerryError('PEER', 'this migration has no page server');
    // One page stream per dump: a second would wait unanswered behind the first.
    if (m.pageStreamTaken) throw new FerryError('PEER', 'this migration already has its page stream');
    m.pageStreamTaken = true;
    const server = m.pageServer;
    const sock = await connectWhenListening(m.pageServerAt, 10_000, () => server.child.exitCode === null && server.child.signalCode === null);
    stream.respond({ ':status': 200 });
    await splice(stream, sock, undefined, undefined, codec ? new Decompressor() : undefined);
  }

  /**
   * The lazy-pages link from the source: the first time it waits for the local daemon; after a
   * cut the source comes back with a new stream and each side resends what the other missed.
   */
  lazyStream(id: string, stream: MuxStream, peerReceived: number, from: string): void {
    const link = this.lazyLinks.get(id);
    if (link && link.from !== from) throw new FerryError('FORBIDDEN', `migration ${id} is not from '${from}'`);
    if (!link && !this.incoming.has(id)) {
      // A source that reconnects after the last page arrived must learn that, not take the task back.
      void this.postCopyMark(id).then(
        (found) => {
          if (found?.mark.from === from && found.mark.complete) {
            stream.respond({ ':status': 200, 'x-ferry-done': 1 });
            stream.end();
          } else {
            const why = this.dropped.get(id);
            stream.respond(jsonHeaders(404));
            stream.end(JSON.stringify({ error: new FerryError('TASK_NOT_FOUND', why ? `it dropped its copy: ${why}` : 'it no longer has the pages link (it restarted)').toJSON() }));
          }
        },
        (e: Error) => stream.destroy(e),
      );
      return;
    }
    if (link?.tunnel && link.tunnel.attaches > 0) {
      clearTimeout(link.grace);
      stream.respond({ ':status': 200, 'x-ferry-received': link.tunnel.received });
      link.tunnel.attach(stream, peerReceived);
      this.onEvent({ event: 'pages link resumed', id, task: link.task });
      return;
    }
    // The daemon may already be up (it starts at the prepare, or once the images are here; and
    // pre-copy joins the source's CRIU only after the commit); else it takes the stream then.
    if (link?.tunnel) {
      stream.respond({ ':status': 200, 'x-ferry-received': 0 });
      link.tunnel.attach(stream, 0);
      return;
    }
    const m = this.get(id);
    if (m.req.from !== from) throw new FerryError('FORBIDDEN', `migration ${id} is not from '${from}'`);
    stream.respond({ ':status': 200, 'x-ferry-received': 0 });
    m.lazyStream = stream;
  }

  /** Pre-copy rounds: page records into the store; answered once the last one is stored. */
  async precopy(id: string, stream: MuxStream, codec: 'lz4' | undefined): Promise<void> {
    const m = this.get(id);
    if (m.req.mode !== 'pre-copy' && m.req.mode !== 'auto') throw new FerryError('USAGE', `migration ${id} is not a pre-copy`);
    if (m.store) throw new FerryError('USAGE', `migration ${id} already has its pre-copy stream`);
    // On disk beside the images (which may be in memory): it holds the task's memory.
    const store = new PageStore(join(m.dir, PRECOPY_PAGES));
    m.store = store;
    await faultPoint(this.self, 'precopy'); // tests: a destination that takes no record
    const done = codec ? pipeline(stream, new Decompressor(), store.writer()) : pipeline(stream, store.writer());
    m.storeDone = done;
    done.catch(() => {}); // also awaited here
    await done;
    stream.respond(jsonHeaders(200));
    stream.end(JSON.stringify({ pages: store.size }));
  }

  /** CRIU's other images, in one stream (see image-bundle.ts). */
  async images(id: string, stream: MuxStream): Promise<void> {
    const m = this.get(id);
    if (m.imagesIn) throw new FerryError('USAGE', `migration ${id} already has its images`);
    m.imagesIn = true;
    await pipeline(stream, new ImageBundleWriter(m.imagesDir));
    // What the restore needs from the images is made ready while the rest of the transfer (the
    // last delta, the files) still runs: the daemon's start alone is ~40 ms of the pause.
    m.stoppedReady = stoppedAtDump(m.imagesDir);
    m.stoppedReady.catch(() => {});
    if (m.req.mode !== 'stop-copy') {
      this.lazyRunsOf(m).catch(() => {});
      m.lazyReady ??= this.startLazyDaemon(m);
      m.lazyReady.catch(() => {});
    }
  }

  /** Runs `rsync --server` into the task's directory, speaking through the stream. */
  async rsync(id: string, args: unknown, stream: MuxStream): Promise<void> {
    const m = this.get(id);
    // The target is always this task's directory, whatever the sender named.
    const serverArgs = [...rsyncServerArgs(args), `${m.dir}/`];
    const rsync = startProgram('rsync', serverArgs, { stdin: 'pipe', stdout: 'pipe' });
    stream.respond({ ':status': 200 });
    // A sender that goes quiet does not keep an rsync server here for ever.
    const limit = setTimeout(() => {
      rsync.kill();
      stream.destroy();
    }, 10 * 60_000);
    limit.unref();
    await bridgeProgram(stream, rsync.child.stdin!, rsync.child.stdout!);
    const code = await rsync.exited;
    clearTimeout(limit);
    // The sender ends its side once it has read ours; one that does not is not waited for.
    const linger = setTimeout(() => stream.destroy(), 30_000).unref();
    stream.once('close', () => clearTimeout(linger));
    // The sender only sees a broken stream; why the receiver stopped is said here.
    if (code !== 0) this.onEvent({ event: 'warning', task: m.req.task.name, message: `rsync receiving its files ended (${code === null ? 'killed' : `code ${code}`}): ${rsync.stderrTail() || 'no output'}` });
  }

  /** What a restore here records: the source's record, checkpointed. */
  private restoreRecord(m: Incoming): TaskRecord {
    return { ...m.req.task, state: 'checkpointed', origin: m.req.from };
  }

  /**
   * CRIU's daemon starts its background fill as soon as CRIU's restore ends: from then until the
   * task runs the front holds it, or its reads and writes take the CPU and the I/O threads the
   * rest of the pause needs (the restore's records took ~150 ms behind it).
   */
  private quiet(id: string): void {
    const link = this.lazyLinks.get(id);
    if (!link) return;
    link.quiet = true;
    link.front?.quiet();
  }

  async restore(id: string, opts: { lazy: boolean; pagesThere?: boolean }): Promise<{ pid: number; restoreMs: number; pageWaitMs: number; alone?: true }> {
    const m = this.get(id);
    // The shim started at the prepare, unless this restore is not the one it was started for.
    const ahead = m.restoreAhead;
    m.restoreAhead = undefined;
    const prepared = ahead && opts.lazy === (m.req.mode !== 'stop-copy') ? ahead : undefined;
    if (ahead && !prepared) ahead.cancel();
    try {
      return await this.restoreNow(m, opts, prepared);
    } finally {
      // A failure before CRIU ran: its shim ends.
      if (prepared && !m.restoring) prepared.cancel();
    }
  }

  private async restoreNow(m: Incoming, opts: { lazy: boolean; pagesThere?: boolean }, prepared: Incoming['restoreAhead']): Promise<{ pid: number; restoreMs: number; pageWaitMs: number; alone?: true }> {
    const id = m.id;
    // Pre-copy sent every page: with a daemon that fills from the store and finishes without its
    // page server (patches/criu/0017, 0018), the task needs nothing of the source once it runs.
    m.alone = opts.lazy && !!opts.pagesThere && !!m.store && this.rt.criu.lazyFinishesAlone;
    const started = performance.now();
    if (m.pageServer) {
      // The page server exits once the source's dump closed the page stream.
      const done = await Promise.race([m.pageServer.wait().then(() => true), sleep(30_000).then(() => false)]);
      if (!done) throw new FerryError('TIMEOUT', 'the destination page server did not finish receiving pages');
    }
    const pageWaitMs = Math.round(performance.now() - started);
    if (opts.lazy) {
      await Promise.all([(m.lazyReady ??= this.startLazyDaemon(m)), this.lazyRunsOf(m)]);
      const link = this.lazyLinks.get(id);
      if (link) link.alone = m.alone;
      link?.serve?.();
    } else if (m.lazyReady) {
      await m.lazyReady.catch(() => {});
      const link = this.lazyLinks.get(id);
      if (link) this.closeLazy(link);
    }
    await faultPoint(this.self, 'restore');
    const restoring = prepared ? prepared.go() : this.rt.restoreFrom(this.restoreRecord(m), m.imagesDir, { lazyPages: opts.lazy, leaveStopped: true, onRestored: () => this.quiet(id) });
    m.restoring = restoring.catch(() => {
      // Failed with nobody left to tell us to clean up.
      if (m.session.destroyed) setImmediate(() => this.background(this.abort(id), m.req.task.name, 'removing a failed restore'));
    });
    // The source lets go at the resume: a page the store lacks would be lost with it, so the
    // copy here is refused now, while the source can still take the task back (checked while
    // CRIU restores).
    const stored = m.alone ? this.everyPageStored(m) : undefined;
    stored?.catch(() => {}); // awaited below
    const restored = await restoring;
    m.restored = restored;
    // Read now, not at the decision: the resume is inside the task's pause.
    m.stopped = await (m.stoppedReady ?? stoppedAtDump(m.imagesDir));
    await stored;
    await writeJsonAtomic(join(m.dir, 'incoming.json'), { id, from: m.req.from, phase: 'restored', lazy: opts.lazy, ...(m.req.task.net ? { address: m.req.task.net.address } : {}) } satisfies IncomingMark);
    return { pid: restored.pid!, restoreMs: Math.round(performance.now() - started) - pageWaitMs, pageWaitMs, ...(m.alone ? { alone: true as const } : {}) };
  }

  /** Every lazy page of the images is in pre-copy's store (1 GiB: a few ms). */
  private async everyPageStored(m: Incoming): Promise<void> {
    await m.storeDone;
    for (const r of await this.lazyRunsOf(m)) {
      const k = m.store!.presentRun(r.vpid, r.first, r.n);
      if (k < r.n) {
        throw new FerryError('PRECOPY', `pre-copy's store on ${this.self} lacks page 0x${((r.first + k) * PAGE).toString(16)} of process ${r.vpid}: the task cannot be filled here`, { hint: 'migrate it again; if this repeats, migrate it with --mode stop-copy' });
      }
    }
  }

  /** The lazy pages of the pagemap images; only once the images are here. */
  private lazyRunsOf(m: Incoming): NonNullable<Incoming['runs']> {
    return (m.runs ??= lazyRuns(m.imagesDir).catch((e: Error) => {
      throw new FerryError('PEER', `the pagemap images from ${m.req.from} cannot be read: ${e.message}`);
    }));
  }

  private async startLazyDaemon(m: Incoming): Promise<void> {
    const link: LazyLink = { id: m.id, from: m.req.from, task: m.req.task.name, committed: false, close: () => {} };
    const stats: FrontStats = { localPages: 0, forwardedPages: 0, prefetchedPages: 0, faultsForwarded: 0, faultWaitMs: 0, faultWaitMaxMs: 0, faultsWaited: 0 };
    const early = this.rt.criu.lazyPagesEarly;
    // The front's link to the source is the tunnel itself, in-process (a loopback socket between
    // the two cost every page two more trips through the kernel).
    const [tunnelEnd, frontEnd] = localPair();
    // The daemon closing its socket means "every page is here" only if it then exits with 0.
    const tunnel = new ResumableTunnel(tunnelEnd, { holdEnd: true });
    link.tunnel = tunnel;
    // The source's CRIU served everything and closed: so does the daemon's link.
    tunnel.on('peerEnded', () => tunnel.endLocal());
    tunnel.on('detached', () => {
      if (this.lazyLinks.get(link.id) !== link || !link.committed || link.grace) return;
      // The task runs here and waits on its missing pages; the source has this long to come back.
      link.grace = setTimeout(() => this.background(this.dropLazy(link, `the source did not come back within ${POSTCOPY_GRACE_MS / 1000} s`), link.task, 'dropping a copy whose pages cannot come'), POSTCOPY_GRACE_MS);
      link.grace.unref();
    });
    const serveFront = (sock: Socket, runs: Awaited<ReturnType<typeof lazyRuns>>): void => {
      // The daemon asks a front: pre-copy's store or prefetched pages first, then the source.
      const holder = m.store ?? new MemPageHolder();
      // Alone, every page is here and the source is gone after the resume: nothing goes to it.
      const front = serveLazy(sock, holder, m.alone ? undefined : frontEnd, runs, stats, { anyOrder: this.rt.criu.lazyAnswersAnyOrder, stored: this.rt.criu.lazyStoredAnswers });
      link.front = front;
      // The restore starts while the last delta still arrives: no page is served before the
      // store has it (a page served from an earlier round would be stale). A store complete
      // already lets go in a microtask, before the daemon's first request can be read.
      if (m.storeDone) {
        front.hold();
        void m.storeDone.then(
          () => front.release(),
          () => {},
        );
      }
      if (link.running) front.prefetch();
      else if (link.quiet) link.front.quiet();
    };
    // Where pre-copy's store will be (it may not exist yet: the daemon opens it at its first
    // stored answer). Only pre-copy and auto have one (see precopy()): post-copy's pages all
    // come from the source.
    const fromStore = m.req.mode === 'pre-copy' || m.req.mode === 'auto';
    const storePath = join(m.dir, PRECOPY_PAGES);
    const fillsItself = fromStore && this.rt.criu.lazyStoredFill;
    const daemon = this.rt.criu.lazyPages({ imagesDir: m.imagesDir, early, ...(fromStore ? { store: storePath, ...(fillsItself ? { storeIndex: storePath + STORE_INDEX_SUFFIX } : {}) } : {}) });
    if (fillsItself) {
      // Once the task runs the daemon fills it from the store by itself (patches/criu/0017).
      // The index is written just before the resume (1 GiB: ~3-5 ms inside the pause): the
      // task's first faults are then filled by the daemon, not through this agent, which is busy
      // with the resume. 1 GiB writing 256 MiB/s, auto with the throttle: pause 321-476 ms
      // against 282-653 (6 runs each), the first tick after the resume ~95 against ~190 ms. Not
      // earlier: with the index the daemon fills the stopped task during the rest of the pause,
      // which then took longer (see README). The commit's answer waits for it (see commit()).
      let stored = false;
      m.storeDone?.then(
        () => (stored = true),
        () => {},
      );
      const unindexed = (e: Error) => this.onEvent({ event: 'warning', task: m.req.task.name, message: `the daemon fills the task through this agent: ${e.message}` });
      link.beforeRunning = () => {
        // The test switches that hold the fill keep the index for after the resume, and so does a
        // store so large that writing its index would lengthen the pause more than it saves.
        if (!stored || debugFillHold() || debugIndexAfterResume() || (m.store?.size ?? 0) > INDEX_BEFORE_RESUME_MAX_PAGES) return;
        try {
          m.store?.writeIndex();
        } catch {
          return; // tried again after the resume, where a failure is reported
        }
        link.indexed = faultPoint(this.self, 'fill').catch(unindexed);
      };
      link.onRunning = () => {
        if (link.indexed) return;
        // After this turn: the task's first faults go first.
        link.indexed = m.storeDone
          ?.then(() => new Promise((r) => setImmediate(r)))
          .then(() => faultPoint(this.self, 'fill'))
          .then(() => {
            m.store?.writeIndex();
          })
          .catch(unindexed);
      };
    }
    link.daemon = daemon;
    const sock = daemon.socket;
    sock.on('error', () => {}); // the daemon's exit says how it ended
    // Served once the images (and so the runs) are here, before the restore hands the task over.
    link.serve = () => {
      link.serve = undefined;
      void this.lazyRunsOf(m).then(
        (runs) => serveFront(sock, runs),
        () => sock.destroy(),
      );
    };
    link.close = () => {
      sock.destroy();
    };
    this.lazyLinks.set(m.id, link);
    // From here a pages link that arrives finds the tunnel (lazyStream()); one that came before waits in m.
    if (m.lazyStream) tunnel.attach(m.lazyStream, 0);
    // A daemon that fails leaves the task's missing pages reading as zeros: the task ends at
    // once, not after the stream's end and the records are read ('close').
    daemon.child.once('exit', (code) => {
      if (code === 0 || !link.committed || !link.root || this.lazyLinks.get(m.id) !== link) return;
      try {
        if (isAlive(link.root.pid, link.root.start)) process.kill(link.root.pid, 'SIGKILL');
      } catch {
        // gone already
      }
    });
    void daemon.exited.then(async (code) => {
      sock.destroy();
      // Filling alone, every page is in the store: a daemon that fails there leaves what the
      // task needs to start again here (see refill()).
      const again = code !== 0 && this.lazyLinks.get(m.id) === link && !!link.alone && link.committed && !!m.store && (m.refills ?? 0) < MAX_REFILLS;
      if (again) this.refill(m, link, code);
      else m.store?.remove();
      const filled = fillsItself ? await readStoredFill(join(m.imagesDir, 'lazy-pages.log')) : undefined;
      this.onEvent({ event: 'lazy pages served', id: m.id, task: m.req.task.name, ...(code === 0 && link.resumedAt !== undefined ? { fillMs: Math.round(performance.now() - link.resumedAt) } : {}), ...(filled ? { filledByDaemon: filled.pages, faultsFilledByDaemon: filled.faults } : {}), local: stats.localPages, prefetched: stats.prefetchedPages, asked: stats.forwardedPages, faultsAsked: stats.faultsForwarded, faultsWaited: stats.faultsWaited, faultWaitMeanMs: stats.faultsForwarded + stats.faultsWaited ? Math.round((stats.faultWaitMs / (stats.faultsForwarded + stats.faultsWaited)) * 100) / 100 : 0, faultWaitMaxMs: Math.round(stats.faultWaitMaxMs), ...(stats.storedPages ? { stored: stats.storedPages } : {}), ...(stats.prefetchMinRttMs !== undefined ? { prefetchMinRttMs: Math.round(stats.prefetchMinRttMs * 100) / 100 } : {}) });
      if (this.lazyLinks.get(m.id) !== link) return;
      // The daemon ends with 0 once every page is here. Otherwise pages are missing and the task
      // would read them as zeros: it must not run on.
      if (code === 0) {
        // Every page is here. The link ends by itself once the source has seen that (its 'E').
        clearTimeout(link.grace);
        this.lazyLinks.delete(m.id);
        link.tunnel?.confirmEnd();
        if (link.committed) void writeJsonAtomic(join(this.rt.store.dir(link.task), 'postcopy.json'), { id: link.id, from: link.from, complete: true } satisfies PostCopyMark);
      } else {
        if (again) return;
        // What CRIU said goes with the reason: the task's directory, its log with it, goes next.
        const said = code === null ? undefined : (await readErrorLines(join(m.imagesDir, 'lazy-pages.log')).catch(() => []))[0];
        // Alone, the source let go at the resume: nothing can take the task back (see README).
        const lost = link.alone && link.committed ? `; ${link.from} had let go of it, so the task is lost: start it again, from its last checkpoint if it has one` : '';
        await this.dropLazy(link, `criu lazy-pages ended with ${code === null ? 'a signal' : `code ${code}`} before every page arrived${said ? ` (${said})` : ''}${lost}`);
      }
    }).catch((e: Error) => this.onEvent({ event: 'warning', task: m.req.task.name, message: `cleaning up after its lazy pages: ${e.message}` }));
    // The restore talks to the daemon through this socket; wait until it exists.
    const sockPath = join(m.imagesDir, 'lazy-pages.socket');
    const end = Date.now() + 10_000;
    while (!existsSync(sockPath)) {
      if (daemon.child.exitCode !== null || daemon.child.signalCode !== null || Date.now() > end) {
        await daemon.wait();
        throw new FerryError('CRIU_FAILED', 'criu lazy-pages did not start on the destination');
      }
      await sleep(2);
    }
  }

  /**
   * The source let go: the stopped copy resumes. Idempotent; also for a migration this agent only
   * knows from disk (it restarted in between). Returns false for a migration it never restored.
   */
  async commit(id: string, from: string): Promise<{ known: boolean; resumedAgoMs?: number }> {
    // A copy dropped before it was committed (its lazy pages failed) must not be taken for one
    // that ran and was cleaned up: the source still has the task and takes it back.
    const why = this.dropped.get(id);
    if (why !== undefined && !this.lazyLinks.has(id)) throw new FerryError('DROPPED', `${this.self} dropped its copy: ${why}`);
    const m = this.incoming.get(id);
    if (m && m.req.from !== from) throw new FerryError('FORBIDDEN', `migration ${id} is not from '${from}'`);
    if (m) {
      if (!m.restored) throw new FerryError('USAGE', `migration ${id} has not been restored here: it cannot be committed`);
      m.committed = true;
      this.incoming.delete(id);
    }
    const found = await this.incomingMark(id);
    if (!found) return { known: !!m };
    if (found.mark.from !== from) throw new FerryError('FORBIDDEN', `migration ${id} is not from '${from}'`);
    const link = this.lazyLinks.get(id);
    // Held until the task runs: then its faults must be answered at once.
    link?.front?.hold();
    let resumed: Awaited<ReturnType<Destination['resumeHere']>>;
    try {
      resumed = await this.resumeHere(id, found, link, m?.stopped);
    } finally {
      link?.front?.release();
      if (link?.alone && debugFillHold()) {
        link.front?.hold();
        holdKernelReads(link.daemon?.socket);
      }
    }
    // Filling alone, the source lets go when it hears this: not before the daemon has the store's
    // index. Without it, this agent dying would leave the daemon nothing to fill from (it fails,
    // the task's missing pages read as zeros) and the source without its copy. The index is
    // written a turn after the resume (the task's first faults go first): ~3-5 ms for 1 GiB.
    if (link?.alone && link.indexed) {
      await link.indexed;
      if (resumed.resumedAgoMs !== undefined && link.resumedAt !== undefined) resumed = { ...resumed, resumedAgoMs: msSince(link.resumedAt) };
    }
    // The task runs here; the source has not heard it yet.
    await faultPoint(this.self, 'commit');
    return resumed;
  }

  /**
   * Work nobody awaits (a timer's, a closed session's): a failure is reported, never left to
   * end the agent and every task it holds with it.
   */
  private background(p: Promise<unknown>, task: string, what: string): void {
    p.catch((e: Error) => this.onEvent({ event: 'warning', task, message: `${what}: ${e.message}` }));
  }

  /** The committed task runs here from now on. */
  private async resumeHere(id: string, found: { name: string; dir: string; mark: IncomingMark }, link: LazyLink | undefined, stopped: Incoming['stopped']): Promise<{ known: true; resumedAgoMs?: number }> {
    const rec = await this.rt.store.get(found.name);
    if (link) {
      // Until the last page is here, a restart of this agent cannot feed the task: it is dropped
      // then, unless the daemon fills it alone (the next agent waits for that one to finish).
      link.committed = true;
      if (rec.pid !== undefined) link.root = { pid: rec.pid, ...(rec.pidStart !== undefined ? { start: rec.pidStart } : {}) };
      const pid = link.alone ? link.daemon?.child.pid : undefined;
      const start = pid !== undefined ? startTime(pid) : undefined;
      const alone = pid !== undefined ? { pid, ...(start !== undefined ? { start } : {}) } : undefined;
      await writeJsonAtomic(join(found.dir, 'postcopy.json'), { id, from: found.mark.from, complete: false, ...(alone ? { alone } : {}) } satisfies PostCopyMark);
    }
    // The address routes here and the namespace opens before the task runs (the source let go of it).
    await this.rt.netHere(rec).catch((e: Error) => this.onEvent({ event: 'warning', task: rec.name, message: `its address could not be routed here: ${e.message}` }));
    let resumedAt: number | undefined;
    if (link?.alone) link.logAtResume = logSize(this.rt.store.logPath(found.name)); // ~10 µs: inside the pause
    link?.beforeRunning?.();
    if (rec.pid !== undefined && isAlive(rec.pid, rec.pidStart)) {
      resumeTree(rec.pid, stopped ?? (await stoppedAtDump(this.rt.store.imagesDir(found.name))));
      resumedAt = performance.now();
    }
    if (link) {
      link.resumedAt = resumedAt ?? performance.now();
      link.running = true;
      link.front?.release();
      link.front?.prefetch();
      link.onRunning?.();
    }
    if (rec.state === 'frozen') {
      rec.state = 'running';
      await this.rt.store.save(rec);
    }
    await rm(join(found.dir, 'incoming.json'), { force: true });
    this.onEvent({ event: 'arrived', id, task: found.name, from: found.mark.from, pid: rec.pid });
    // The task ran before the records here were written: the source counts its pause to then.
    return { known: true, ...(resumedAt !== undefined ? { resumedAgoMs: msSince(resumedAt) } : {}) };
  }

  /**
   * An operator settles a restored copy whose source will never decide (that host is gone): run
   * it here, or drop it. Running is refused when the copy's memory is not all on this host.
   * Whether the source is really gone is the caller's to know: this host cannot tell a dead
   * source from a cut link.
   */
  async settleByHand(name: string, outcome: 'run' | 'drop', dryRun = false): Promise<{ id: string; from: string }> {
    validateName(name);
    const dir = this.rt.store.dir(name);
    const mark = await readJson<IncomingMark>(join(dir, 'incoming.json')).catch(() => undefined);
    const nothingWaits = () => new FerryError('USAGE', `no copy of '${name}' on ${this.self} is waiting for a decision`, { hint: mark?.phase === 'receiving' ? 'its migration is still under way: its source settles it' : 'see `ferry ps` for its state' });
    if (mark?.phase !== 'restored' || !existsSync(join(dir, 'task.json'))) throw nothingWaits();
    if (outcome === 'run' && mark.lazy && !(await this.everyPageHere(mark.id))) {
      throw new FerryError('USAGE', `the copy of '${name}' on ${this.self} cannot run: part of its memory was to come from ${mark.from}`, { hint: `if ${mark.from} is gone for good, drop it (--drop --source-gone) and start the task again, from its last checkpoint if it has one` });
    }
    const held = { id: mark.id, from: mark.from };
    if (dryRun) return held;
    if (outcome === 'drop') await this.abort(mark.id);
    else if (!(await this.commit(mark.id, mark.from)).known) throw nothingWaits();
    this.onEvent({ event: 'settled by hand', ...held, task: name, outcome });
    return held;
  }

  /** A lazy restore that needs nothing more from its source: pre-copy's store holds every lazy page, and this agent still serves it. */
  private async everyPageHere(id: string): Promise<boolean> {
    const m = this.incoming.get(id);
    const link = this.lazyLinks.get(id);
    if (!m?.store || !m.storeDone || !m.runs || !link?.front) return false;
    try {
      await m.storeDone;
      const runs = await m.runs;
      return runs.every((r) => m.store!.presentRun(r.vpid, r.first, r.n) === r.n);
    } catch {
      return false;
    }
  }

  /** Marks the restored copies among recs that wait for their source's decision (for `ferry ps`). */
  async annotate<T extends TaskRecord | TaskRecord[]>(recs: T): Promise<T> {
    for (const rec of Array.isArray(recs) ? recs : [recs]) {
      if (rec.state !== 'frozen') continue;
      const mark = await readJson<IncomingMark>(join(this.rt.store.dir(rec.name), 'incoming.json')).catch(() => undefined);
      if (mark?.phase === 'restored') rec.awaiting = { from: mark.from, migration: mark.id };
    }
    return recs;
  }

  /** Removes everything this migration brought here; kills a restored copy the source disowned. */
  async abort(id: string, from?: string, sourceRuns = false): Promise<void> {
    const link = this.lazyLinks.get(id);
    if (link?.committed) {
      // Post-copy after the resume: the source took the task back (its pages could not come).
      if (from !== undefined && link.from !== from) throw new FerryError('FORBIDDEN', `migration ${id} is not from '${from}'`);
      await this.dropLazy(link, `the source took it back`);
      return;
    }
    const m = this.incoming.get(id);
    if (m && from !== undefined && m.req.from !== from) throw new FerryError('FORBIDDEN', `migration ${id} is not from '${from}'`);
    if (!m) {
      // Known only from disk: this agent restarted after the restore. Or every page of a
      // post-copy came and the task runs here, yet its source runs its own copy again (its CRIU
      // ended before it heard the last page had come, or it gave up on a cut link): the copy
      // here ends, as the source told its user. Not when the source's copy is gone.
      const found = (await this.incomingMark(id)) ?? (sourceRuns ? await this.arrivedMark(id) : undefined);
      if (!found) return;
      if (from !== undefined && found.mark.from !== from) throw new FerryError('FORBIDDEN', `migration ${id} is not from '${from}'`);
      await this.endHere(found.name, found.dir, found.mark.address);
      this.onEvent({ event: 'aborted', id, task: found.name, from: found.mark.from });
      return;
    }
    if (m.committed) return;
    this.incoming.delete(id);
    m.restoreAhead?.cancel();
    // A daemon on its way up is stopped once it is.
    await m.lazyReady?.catch(() => {});
    m.pageServer?.stop();
    m.store?.remove();
    const started = this.lazyLinks.get(id);
    if (started) this.closeLazy(started);
    m.lazyStream?.destroy();
    await m.restoring;
    const r = m.restored;
    if (r?.pid) await killAndWait(r.pid, r.pidStart);
    await m.pageServer?.exited;
    await this.rt.netGone(m.req.task.name, m.req.task.net?.address);
    await this.rt.store.scratch.removeTaskDir(m.dir);
    this.onEvent({ event: 'aborted', id, task: m.req.task.name, from: m.req.from });
  }

  /** A post-copy of this id whose every page came. */
  private async arrivedMark(id: string): Promise<{ name: string; dir: string; mark: { from: string; address?: string } } | undefined> {
    return (await this.marks<PostCopyMark>('postcopy.json')).find((x) => x.mark.id === id && x.mark.complete);
  }

  private async postCopyMark(id: string): Promise<{ name: string; mark: PostCopyMark } | undefined> {
    return (await this.marks<PostCopyMark>('postcopy.json')).find((x) => x.mark.id === id);
  }

  private closeLazy(link: LazyLink): void {
    clearTimeout(link.grace);
    this.lazyLinks.delete(link.id);
    link.daemon?.stop();
    link.close();
    link.tunnel?.destroy();
  }

  /**
   * The daemon that filled a task from pre-copy's store ended before the fill did, after the
   * source let go: the task here may read zeros for pages it lacks, and no host has another copy.
   * Everything its restore used is still here (the images, and the store with every page), so it
   * is ended and restored again from them, as it was frozen on the source: what it did since it
   * ran here is lost, as when a source takes back a post-copy task. A file it wrote in between
   * (other than appended to) fails that restore (CRIU checks the sizes): then it is lost, as
   * before. untilFilled() waits for all of it, so nothing migrates the task meanwhile.
   */
  private refill(m: Incoming, link: LazyLink, code: number | null): void {
    m.refills = (m.refills ?? 0) + 1;
    const name = link.task;
    const ranFor = link.resumedAt !== undefined ? ` ${((performance.now() - link.resumedAt) / 1000).toFixed(1)} s` : '';
    // Set before anything awaits: untilFilled() must not let a migration take the copy meanwhile.
    const done = (async () => {
      this.closeLazy(link);
      const said = code === null ? undefined : (await readErrorLines(join(m.imagesDir, 'lazy-pages.log')).catch(() => []))[0];
      const why = `criu lazy-pages ended with ${code === null ? 'a signal' : `code ${code}`} while it filled the task${said ? ` (${said})` : ''}`;
      try {
        // Killed at the daemon's exit already (startLazyDaemon): gone before anything is restored.
        const rec = await this.rt.store.get(name);
        if (rec.pid !== undefined) await killAndWait(rec.pid, rec.pidStart);
        this.onEvent({ event: 'warning', task: name, message: `${why}: restoring it again here, as it was frozen on ${link.from} (what it did in the${ranFor} since it ran here is lost, and its output then is taken out of its log)` });
        // Its log goes back to where the restored copy will go on writing it (it appends).
        if (link.logAtResume !== undefined) await truncate(this.rt.store.logPath(name), link.logAtResume).catch(() => {});
        // A new daemon, on the same images and store; it alone fills (the source let go).
        m.lazyStream = undefined;
        await rm(join(m.imagesDir, 'lazy-pages.socket'), { force: true });
        await rename(join(m.imagesDir, 'lazy-pages.log'), join(m.imagesDir, `lazy-pages.failed-${m.refills}.log`)).catch(() => {});
        m.lazyReady = this.startLazyDaemon(m);
        await Promise.all([m.lazyReady, this.lazyRunsOf(m)]);
        const next = this.lazyLinks.get(m.id);
        if (!next) throw new FerryError('CRIU_FAILED', 'criu lazy-pages did not start again');
        next.alone = true;
        next.serve?.();
        const restored = await this.rt.restoreFrom({ ...rec, state: 'checkpointed' }, m.imagesDir, { lazyPages: true, leaveStopped: true, onRestored: () => this.quiet(m.id) });
        const stopped = m.stopped ?? (await stoppedAtDump(m.imagesDir));
        await this.resumeHere(m.id, { name, dir: m.dir, mark: { id: m.id, from: link.from, phase: 'restored', lazy: true } }, next, stopped);
        this.onEvent({ event: 'restored again', id: m.id, task: name, pid: restored.pid, attempt: m.refills });
      } catch (e) {
        const next = this.lazyLinks.get(m.id);
        if (next) this.closeLazy(next);
        m.store?.remove();
        await this.endHere(name, this.rt.store.dir(name));
        throw new FerryError('CRIU_FAILED', `${why}, and restoring it again here failed (${(e as Error).message}); ${link.from} had let go of it, so the task is lost: start it again, from its last checkpoint if it has one`);
      }
    })();
    this.adopted.set(name, done);
    this.background(done.finally(() => this.adopted.get(name) === done && this.adopted.delete(name)), name, 'restoring it after its fill failed');
  }

  /** A post-copy task whose pages cannot arrive any more: killed before it reads zeros, removed. */
  private async dropLazy(link: LazyLink, why: string): Promise<void> {
    if (this.lazyLinks.get(link.id) !== link) return;
    this.closeLazy(link);
    if (this.dropped.size > 1000) this.dropped.clear();
    this.dropped.set(link.id, why);
    this.onEvent({ event: 'post-copy dropped', id: link.id, task: link.task, from: link.from, why });
    // Before the decision the restore may still be running: it ends (the daemon is gone) before
    // anything of it is removed, or it would write into a directory on its way out.
    const m = this.incoming.get(link.id);
    if (m) {
      this.incoming.delete(link.id);
      m.restoreAhead?.cancel();
      await m.restoring?.catch(() => {});
    }
    await this.endHere(link.task, this.rt.store.dir(link.task));
  }

  /** Kills the task's copy here, if any, and removes it: its address and its directory. */
  private async endHere(name: string, dir: string, address?: string): Promise<void> {
    const rec = await this.rt.store.get(name).catch(() => undefined);
    if (rec?.pid !== undefined) await killAndWait(rec.pid, rec.pidStart);
    await this.rt.netGone(name, address ?? rec?.net?.address);
    await this.rt.store.scratch.removeTaskDir(dir);
  }
}

/**
 * The options of a receiving `rsync --server` that Ferry's own sender produces (`rsync -a
 * --delete --inplace`, and `-a --append` for the task's log), and nothing else: no option may name a file (--log-file, --temp-dir, ...)
 * or change how the receiver treats links. (--inplace patches files of the task's new directory
 * where they are; an existing link or other non-file is removed first, never written through.) The final argument (the target) is replaced by the caller.
 */
export function rsyncServerArgs(args: unknown): string[] {
  const refuse = () => new FerryError('USAGE', 'refusing an rsync command that is not the receiving server Ferry runs');
  if (!Array.isArray(args) || args.length < 4 || args.length > 8 || !args.every((a) => typeof a === 'string')) throw refuse();
  const [prog, server, ...rest] = args as string[];
  if (prog !== 'rsync' || server !== '--server') throw refuse();
  const opts = rest.slice(0, -1);
  for (const a of opts) {
    const ok = /^-[logDtpr]+e\.[A-Za-z]{1,16}$/.test(a) || a === '--delete' || a === '--inplace' || a === '--append' || a === '.';
    if (!ok) throw refuse();
  }
  return ['--server', ...opts];
}


async function freeResources(dir: string): Promise<{ memBytes: number; diskBytes: number }> {
  const meminfo = await readFile('/proc/meminfo', 'utf8');
  const avail = Number(/MemAvailable:\s+(\d+) kB/.exec(meminfo)?.[1] ?? 0) * 1024;
  const fs = await statfs(dir);
  return { memBytes: avail, diskBytes: fs.bavail * fs.bsize };
}

function logSize(path: string): number | undefined {
  try {
    return statSync(path).size;
  } catch {
    return undefined;
  }
}

function mib(n: number): number {
  return Math.round(n / (1 << 20));
}
