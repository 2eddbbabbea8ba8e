// Typed access to the criu binary. Every run goes through exec/run.ts; failures become
// FerryError('CRIU_FAILED') carrying the first error lines of CRIU's own log and a hint.
import type { ChildProcess } from 'node:child_process';
import type { Socket } from 'node:net';
import { setPriority } from 'node:os';
import { readFileSync, writeFileSync } from 'node:fs';
import { access, constants, mkdir } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { FerryError } from '../errors.js';
import { run, startProgram, type RunResult } from '../exec/run.js';
import { GHOST_LIMIT_MIB, hintFor, readErrorLines } from './log.js';
import { keepKdat, type KdatState } from './kdat.js';
import { readDumpStats, type DumpStats } from './stats.js';

export const MIN_CRIU = [4, 2] as const;

export interface CriuVersion {
  text: string;
  major: number;
  minor: number;
  patch: number;
}

export function parseVersion(out: string): CriuVersion | undefined {
  const m = /Version:\s*(\d+)\.(\d+)(?:\.(\d+))?/.exec(out);
  if (!m) return undefined;
  return { text: `${m[1]}.${m[2]}${m[3] ? `.${m[3]}` : ''}`, major: +m[1]!, minor: +m[2]!, patch: +(m[3] ?? 0) };
}

export function isSupported(v: CriuVersion): boolean {
  return v.major > MIN_CRIU[0] || (v.major === MIN_CRIU[0] && v.minor >= MIN_CRIU[1]);
}

/**
 * Requests a lazy-pages daemon may have in flight per process (see lazyPages()): for pages from
 * the source, and for a fill from pre-copy's store on this host. FERRY_LAZY_INFLIGHT overrides both.
 */
const LAZY_INFLIGHT = Number(process.env.FERRY_LAZY_INFLIGHT ?? 4);
const LAZY_INFLIGHT_STORED = Number(process.env.FERRY_LAZY_INFLIGHT ?? 2);
/** The nice level of a lazy-pages daemon (see lazyPages()). */
const LAZY_DAEMON_NICE = 10;
/** Never the OOM killer's choice (see lazyPages()). */
export const LAZY_DAEMON_OOM_SCORE_ADJ = -1000;

/** Options common to dump and restore of Ferry tasks. */
const COMMON = ['--file-locks'];
/**
 * A file the task deleted but still holds goes into the images whole (a "ghost"); CRIU refuses
 * one over 1 MiB unless told, so a service holding a rotated-away 2 MiB log could not move. The
 * content crosses during the freeze (256 MiB: ~2.2 s on a 1 Gbit/s link): a longer pause, not a
 * failed migration.
 */
export const DUMP_OPTIONS = [...COMMON, '--ghost-limit', `${GHOST_LIMIT_MIB}M`];
/** A task in its host's network namespace cannot keep connections: they close (see tasknet.ts for the others). */
const HOST_NET = ['--tcp-close'];

export interface DumpOptions {
  pid: number;
  imagesDir: string;
  leaveRunning?: boolean;
  /** Stream pages to a `criu page-server` instead of writing them here. */
  pageServer?: { address: string; port: number };
  /** Leave pages in place and serve them to the destination's lazy-pages daemon. */
  lazyPages?: { address: string; port: number };
  /** Runs at CRIU's hook points (post-dump holds the frozen task). */
  actionScript?: string;
  /** A task with its own network namespace: replaces --tcp-close. */
  netArgs?: string[];
  /** The task's mounts (see src/runtime/mounts.ts). */
  mountArgs?: string[];
  env?: NodeJS.ProcessEnv;
  signal?: AbortSignal;
  timeoutMs?: number;
}

export interface DumpResult {
  durationMs: number;
  stats: DumpStats | undefined;
}

export class Criu {
  private kdat?: Promise<KdatState>;

  constructor(readonly bin: string) {}

  /** CRIU's kernel probe kept for this boot (see kdat.ts): once per process. */
  keepKdat(v: CriuVersion): Promise<KdatState> {
    return (this.kdat ??= keepKdat(this.bin, v.text));
  }

  async version(signal?: AbortSignal): Promise<CriuVersion> {
    if (this.bin.includes('/')) await access(this.bin, constants.X_OK).catch(() => Promise.reject(missing(this.bin)));
    let r: RunResult;
    try {
      r = await run(this.bin, ['--version'], { signal, timeoutMs: 10_000, reject: false });
    } catch (e) {
      if (e instanceof FerryError && e.code === 'PROGRAM_FAILED') throw missing(this.bin);
      throw e;
    }
    const v = parseVersion(r.stdout + r.stderr);
    if (!v) throw new FerryError('CRIU_MISSING', `${this.bin} does not report a CRIU version`, { hint: 'run scripts/bootstrap.sh to build CRIU >= 4.2' });
    return v;
  }

  /** Throws unless this CRIU is present and new enough. */
  async ensureUsable(signal?: AbortSignal): Promise<CriuVersion> {
    const v = await this.version(signal);
    if (!isSupported(v)) {
      throw new FerryError('CRIU_TOO_OLD', `CRIU ${v.text} at ${this.bin} is too old: Ferry needs ${MIN_CRIU.join('.')} or newer on this kernel`, {
        hint: 'run scripts/bootstrap.sh to build CRIU >= 4.2 and point Ferry at it',
      });
    }
    await this.keepKdat(v);
    return v;
  }

  async check(opts: { signal?: AbortSignal; all?: boolean } = {}): Promise<{ ok: boolean; output: string }> {
    const r = await run(this.bin, ['check', ...(opts.all ? ['--all'] : [])], { signal: opts.signal, timeoutMs: 60_000, reject: false });
    const output = (r.stdout + r.stderr).trim();
    return { ok: r.exitCode === 0, output };
  }

  async dump(o: DumpOptions): Promise<DumpResult> {
    await mkdir(o.imagesDir, { recursive: true });
    const args = ['dump', '-t', String(o.pid), '-D', o.imagesDir, '-o', 'dump.log', '-v4', ...DUMP_OPTIONS, ...(o.netArgs ?? HOST_NET), ...(o.mountArgs ?? [])];
    if (o.leaveRunning) args.push('--leave-running');
    if (o.pageServer) args.push('--page-server', '--address', o.pageServer.address, '--port', String(o.pageServer.port));
    if (o.lazyPages) args.push('--lazy-pages', '--address', o.lazyPages.address, '--port', String(o.lazyPages.port));
    if (o.actionScript) args.push('--action-script', o.actionScript);
    const r = await run(this.bin, args, { signal: o.signal, timeoutMs: o.timeoutMs, env: o.env, reject: false });
    if (r.exitCode !== 0) throw await this.failure('dump', r, join(o.imagesDir, 'dump.log'));
    return { durationMs: r.durationMs, stats: await readDumpStats(o.imagesDir) };
  }

  /** The argv of a detached restore; the task shim runs it so it becomes the restored tree's parent. */
  restoreArgs(o: { imagesDir: string; pidfile: string; lazyPages?: boolean; leaveStopped?: boolean; logName?: string; netArgs?: string[]; mountArgs?: string[] }): string[] {
    const args = ['restore', '-d', '-D', o.imagesDir, '-o', o.logName ?? 'restore.log', '-v4', '--pidfile', o.pidfile, ...COMMON, ...(o.netArgs ?? HOST_NET), ...(o.mountArgs ?? [])];
    if (o.lazyPages) args.push('--lazy-pages');
    if (o.leaveStopped) args.push('--leave-stopped');
    return [this.bin, ...args];
  }

  async cpuinfoDump(dir: string, signal?: AbortSignal): Promise<void> {
    await mkdir(dir, { recursive: true });
    const r = await run(this.bin, ['cpuinfo', 'dump', '-D', dir, '-o', 'cpuinfo.log'], { signal, timeoutMs: 30_000, reject: false });
    if (r.exitCode !== 0) throw await this.failure('cpuinfo dump', r, join(dir, 'cpuinfo.log'));
  }

  async cpuinfoCheck(dir: string, signal?: AbortSignal): Promise<void> {
    const r = await run(this.bin, ['cpuinfo', 'check', '-D', dir, '-o', 'cpuinfo-check.log'], { signal, timeoutMs: 30_000, reject: false });
    if (r.exitCode !== 0) {
      const lines = await readErrorLines(join(dir, 'cpuinfo-check.log'));
      throw new FerryError('PRECHECK', `CPU of the destination is not compatible with the source: ${lines[0] ?? 'criu cpuinfo check failed'}`, {
        details: lines,
        hint: 'pick a destination with the same or a newer CPU feature set',
      });
    }
  }

  /** A `criu page-server` receiving pages into dir, listening on address:port. */
  pageServer(o: { imagesDir: string; address: string; port: number }): ServerHandle {
    const args = ['page-server', '-D', o.imagesDir, '--address', o.address, '--port', String(o.port), '-o', 'page-server.log', '-v4'];
    return this.server(args, join(o.imagesDir, 'page-server.log'));
  }

  private patches?: Set<string>;

  /** Whether scripts/bootstrap.sh built this CRIU with one of Ferry's patches (patches/criu). */
  hasPatch(name: string): boolean {
    if (!this.patches) {
      try {
        const lines = readFileSync(join(dirname(this.bin), 'ferry-patches'), 'utf8').split('\n');
        this.patches = new Set(lines.filter((l) => l.startsWith('applied ')).map((l) => l.slice('applied '.length)));
      } catch {
        this.patches = new Set();
      }
    }
    return this.patches.has(name);
  }

  /** A lazy-pages daemon may start before the images are there (patches/criu/0008). */
  get lazyPagesEarly(): boolean {
    return this.hasPatch('0008-lazy-pages-listen-first');
  }

  /** The lazy-pages daemon takes answers in any order, each to its own request (patches/criu/0011). */
  get lazyAnswersAnyOrder(): boolean {
    return this.hasPatch('0011-lazy-pages-answers-any-order');
  }

  /** The lazy-pages daemon reads pages from pre-copy's store itself when an answer says where (patches/criu/0016). */
  get lazyStoredAnswers(): boolean {
    return this.hasPatch('0016-lazy-pages-stored-answers');
  }

  /** The lazy-pages daemon fills the task from pre-copy's store by itself once given its index (patches/criu/0017). */
  get lazyStoredFill(): boolean {
    return this.hasPatch('0017-lazy-pages-fill-from-store');
  }

  /** ... and finishes that fill without its page server once the store holds the rest (patches/criu/0018). */
  get lazyFinishesAlone(): boolean {
    return this.lazyStoredFill && this.hasPatch('0018-lazy-pages-finish-from-store-alone');
  }

  /**
   * `criu lazy-pages`: fetches pages from the source's page server on fault and in the
   * background. Early (see lazyPagesEarly): it listens at once and reads the images only when
   * the restore connects.
   */
  lazyPages(o: { imagesDir: string; early?: boolean; store?: string; storeIndex?: string }): ServerHandle & { socket: Socket } {
    // Its page server is this agent, at the other end of a Unix socket it inherits (fd 3): through
    // TCP on loopback the same 1 GiB cost the writing side ~0.45 s more CPU (978 against 534 ms
    // in the socket writes, measured with the front serving a stand-in daemon).
    const args = ['lazy-pages', '--page-server', '--ps-socket', '3', '-D', o.imagesDir, '-o', 'lazy-pages.log', '-v4'];
    // More than one request in flight per process (patches/criu/0006; ignored by a CRIU without
    // it): with one, a task that kept faulting filled at ~180 MB/s from this host's own store.
    // From the store (pre-copy, auto) two: a fault's answer waits behind every answer the daemon
    // has not copied yet; with four the task's heartbeat in the fill was 5-10 points lower than
    // with two, the fill as long (256 MiB at 16 MiB/s, alternating runs; README, "Pre-copy").
    const inflight = o.store ? LAZY_INFLIGHT_STORED : LAZY_INFLIGHT;
    const h = this.server(args, join(o.imagesDir, 'lazy-pages.log'), { CRIU_LAZY_PAGES_INFLIGHT: String(inflight), CRIU_LAZY_PAGES_STEADY: '1', ...(o.early ? { CRIU_LAZY_PAGES_EARLY: '1' } : {}), ...(o.store ? { CRIU_LAZY_PAGES_STORE: o.store, ...(o.storeIndex ? { CRIU_LAZY_PAGES_STORE_INDEX: o.storeIndex } : {}) } : {}) }, true);
    // A stock daemon polls without sleeping while it has requests out (criu/uffd.c: a zero epoll
    // timeout once the restore finished; patches/criu/0002 makes it sleep): a whole core for the
    // whole fill. At a lower priority it leaves that core to the task and the agents; measured
    // with stock CRIU, 1 GiB at 16 MiB/s: post-copy window 16.8 -> 13.7 s, heartbeat in it
    // 48 -> 56 %, pre-copy's fill 2.7 -> 2.5 s. With the patch, nice 0 and 10 measured the same.
    if (h.child.pid) {
      try {
        setPriority(h.child.pid, LAZY_DAEMON_NICE);
      } catch {
        // it ended already: its exit is reported the usual way
      }
      // Once the task runs here the daemon alone holds its userfaultfd: killed, the pages not yet
      // filled would read as zeros and the task is ended. The OOM killer must pick another (the
      // daemon itself holds a few MiB).
      try {
        writeFileSync(`/proc/${h.child.pid}/oom_score_adj`, String(LAZY_DAEMON_OOM_SCORE_ADJ));
      } catch {
        // ended already, or not allowed here: it runs as before
      }
    }
    return { ...h, socket: h.child.stdio[3] as Socket };
  }

  private server(args: string[], logPath: string, env?: NodeJS.ProcessEnv, fd3 = false): ServerHandle {
    const p = startProgram(this.bin, args, { ...(env ? { env: { ...process.env, ...env } } : {}), fd3 });
    return {
      child: p.child,
      command: p.command,
      exited: p.exited,
      async wait(): Promise<void> {
        const code = await p.exited;
        if (code !== 0) {
          const lines = await readErrorLines(logPath);
          const hint = hintFor(lines);
          throw new FerryError('CRIU_FAILED', `${args[0]} failed (exit ${code}): ${lines[0] ?? p.stderrTail().pop() ?? 'no log'}`, { details: lines, ...(hint ? { hint } : {}) });
        }
      },
      stop: () => p.stop(),
    };
  }

  private async failure(what: string, r: RunResult, logPath: string): Promise<FerryError> {
    const lines = await readErrorLines(logPath);
    const first = lines[0] ?? (r.stderr.trim().split('\n').pop() || `exit code ${r.exitCode}`);
    const hint = hintFor(lines);
    return new FerryError('CRIU_FAILED', `criu ${what} failed: ${first}`, {
      details: [...lines, `command: ${r.command}`, `log: ${logPath}`],
      ...(hint ? { hint } : {}),
    });
  }
}

export interface ServerHandle {
  child: ChildProcess;
  command: string;
  exited: Promise<number | null>;
  /** Resolves when the server exits with 0; throws with CRIU's log otherwise. */
  wait(): Promise<void>;
  stop(): void;
}

function missing(bin: string): FerryError {
  return new FerryError('CRIU_MISSING', `CRIU not found at ${bin}`, {
    hint: 'run scripts/bootstrap.sh, or set FERRY_CRIU to a CRIU >= 4.2 binary',
  });
}
