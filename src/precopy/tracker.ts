// Pre-copy on the source: native/ferry-track finds the pages the task writes (userfaultfd
// write-protect + PAGEMAP_SCAN, armed from outside through ptrace) and writes them as page records
// on its stdout, which the migration carries to the destination. Its replies come on fd 3, one
// JSON line per command. The task is disarmed when the helper exits, however it exits: the kernel
// drops the registrations with the helper's last descriptor.
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import type { Readable, Writable } from 'node:stream';
import { join } from 'node:path';
import { FerryError } from '../errors.js';

export interface TrackReply {
  pages: number;
  zero: number;
  bytes: number;
  dropped: number;
  counted: number;
  fullVmas: number;
  /** Processes whose writes are found by userfaultfd write-protect, by content hash, by neither. */
  armed: number;
  hashed: number;
  unarmed: number;
  ms: number;
  note: string;
}

/** How long an ended helper's stderr may take to arrive after its exit. */
const EXIT_GRACE_MS = 500;

export class Tracker {
  private readonly child: ChildProcess;
  private readonly replies: Array<(r: TrackReply) => void> = [];
  private exitedWith?: string;
  readonly exited: Promise<void>;

  constructor(nativeDir: string, env: NodeJS.ProcessEnv = process.env) {
    this.child = spawn(join(nativeDir, 'ferry-track'), [], { stdio: ['pipe', 'pipe', 'pipe', 'pipe'], env });
    this.child.stdin!.on('error', () => {});
    let err = '';
    this.child.stderr!.on('data', (c: Buffer) => (err = (err + c.toString()).slice(-500)));
    const ctl = createInterface({ input: this.child.stdio[3] as Readable });
    ctl.on('line', (l) => this.replies.shift()?.(JSON.parse(l) as TrackReply));
    this.exited = new Promise((res) => {
      this.child.once('error', (e) => {
        this.exitedWith = e.message;
        res();
      });
      const ended = (code: number | null, sig: NodeJS.Signals | null) => {
        this.exitedWith ??= `ferry-track ended (${sig ?? `code ${code}`})${err ? `: ${err.trim()}` : ''}`;
        res();
      };
      // 'close' waits for its stderr's last words, but also for its page records to be read:
      // records nobody takes any more (the destination reset the stream) would hold it for ever.
      this.child.once('close', ended);
      this.child.once('exit', (code, sig) => setTimeout(() => ended(code, sig), EXIT_GRACE_MS).unref());
    });
  }

  /** Page records: carry them to the destination as they come. */
  get pages(): Readable {
    return this.child.stdout!;
  }

  private command(line: string): Promise<TrackReply> {
    if (this.exitedWith) return Promise.reject(new FerryError('PRECOPY', this.exitedWith));
    return new Promise((resolve, reject) => {
      this.replies.push(resolve);
      void this.exited.then(() => reject(new FerryError('PRECOPY', this.exitedWith ?? 'ferry-track ended')));
      (this.child.stdin as Writable).write(`${line}\n`);
    });
  }

  /** Sends what the processes wrote since the last round (everything the first time). */
  round(pids: number[]): Promise<TrackReply> {
    return this.command(`round ${pids.join(' ')}`);
  }

  /** Pages written since the last round, without sending or re-arming anything. */
  async written(): Promise<number> {
    return (await this.command('count')).counted;
  }

  /**
   * The task is frozen and CRIU's images are in dir: sends the last delta (or, with drop, tells
   * the destination which of its pages are stale), then ends the page records.
   */
  async final(dir: string, drop: boolean): Promise<TrackReply> {
    if (/\s/.test(dir)) throw new FerryError('PRECOPY', `images directory with white space: ${dir}`);
    const r = await this.command(`final ${dir}${drop ? ' drop' : ''}`);
    this.child.stdin!.end('quit\n');
    return r;
  }

  /**
   * Disarms the task (the helper's descriptors close) and waits for that. SIGTERM first: the
   * helper holds it while it has a thread of the task stopped with borrowed registers.
   */
  async stop(): Promise<void> {
    // Records still unread stay unread: a helper blocked writing them ends on the broken pipe.
    this.child.stdout?.destroy();
    if (this.child.exitCode !== null || this.child.signalCode !== null) return this.exited;
    this.child.kill('SIGTERM');
    const hard = setTimeout(() => this.child.kill('SIGKILL'), 5000);
    await this.exited;
    clearTimeout(hard);
  }
}

/** How a pre-copy ends its rounds. */
export type Verdict = 'continue' | 'converged' | 'round-limit' | 'stalled' | 'too-fast' | 'too-slow';

export interface RoundStat {
  round: number;
  pages: number;
  bytes: number;
  zeroPages: number;
  ms: number;
  /** Pages written while this round was sent: the next round, or the pause. */
  dirtyPages: number;
  /** How fast the written set grew: dirtyPages over the round (what convergence depends on). */
  dirtyRateMBps: number;
  /**
   * How fast the task itself writes, estimated (see writeRateMBps in throttle.ts): a page written
   * twice counts twice, and a page the round sent counts from its read. Higher than
   * dirtyRateMBps, 2-3x for a task writing all over 1 GiB; what the throttle steps from.
   */
  writeRateMBps?: number;
  linkMBps: number;
  expectedDowntimeMs: number;
  /** Auto-converge: the share of the task's CPU taken away during this round. */
  throttle?: number;
}

export interface StopPolicy {
  maxDowntimeMs: number;
  maxRounds: number;
}

/** Below this many written pages a round costs more than it saves (P.Haul's threshold). */
export const FEW_PAGES = 64;

/**
 * QEMU's rule: switch over once what is left fits the allowed downtime at the measured link
 * rate; P.Haul's limits: a round limit, and a round that grew by more than 10 % means no progress.
 * A task that writes faster than the link carries will never converge: said after one round or two.
 */
export function verdict(rounds: RoundStat[], p: StopPolicy): Verdict {
  const last = rounds.at(-1);
  if (!last) return 'continue';
  if (last.dirtyPages <= FEW_PAGES) return 'converged';
  if (last.expectedDowntimeMs <= p.maxDowntimeMs) return rounds.length < p.maxRounds && worthAnotherRound(last) ? 'continue' : 'converged';
  if (rounds.length >= p.maxRounds) return 'round-limit';
  if (rounds.length >= 2 && last.linkMBps > 0 && last.dirtyRateMBps >= 0.9 * last.linkMBps) return 'too-fast';
  // A first round that found the task writing at least as fast as the link carries (its own
  // rate: writes to a page already written count) says so already: a second round would send
  // as much again and leave as much written (1 GiB at 256 MiB/s: 5.4 s more, 142k pages left
  // against 153k). The written set's own growth reads low in a first round: it counts a page once.
  if (rounds.length === 1 && last.linkMBps > 0 && (last.writeRateMBps ?? 0) >= last.linkMBps) return 'too-fast';
  // P.Haul gives up when a round grows by 10 %; a set that does not shrink by 10 % will not fit either.
  const prev = rounds.at(-2);
  if (prev && last.dirtyPages > prev.dirtyPages * 0.9) return 'stalled';
  // Shrinking, but at this pace it would not fit before the round limit: say so now rather than
  // after the rounds (1 GiB written at ~80 MB/s: 4.3 GB sent in 8 rounds for nothing).
  if (prev && roundsToFit(prev, last, p.maxDowntimeMs) > p.maxRounds - rounds.length) return 'too-slow';
  return 'continue';
}

/** Rounds until the written set fits the pause, if it keeps shrinking as it did in the last round. */
export function roundsToFit(prev: RoundStat, last: RoundStat, maxDowntimeMs: number): number {
  if (last.linkMBps <= 0) return 0; // no round measured the link: nothing to project from
  const shrink = last.dirtyPages / prev.dirtyPages;
  const fits = Math.max(FEW_PAGES, (((maxDowntimeMs - SWITCH_OVERHEAD_MS) / 1000) * last.linkMBps * 1e6) / 4096);
  if (last.dirtyPages <= fits) return 0;
  if (!(shrink < 1)) return Number.POSITIVE_INFINITY;
  return Math.ceil(Math.log(fits / last.dirtyPages) / Math.log(shrink));
}

/** A round must take at least this much off the pause to be run once the pause fits. */
const WORTH_MS = 20;

/**
 * The pause fits, but the set is still shrinking fast: one more round (while the task runs)
 * sends the delta now, and what is written meanwhile is roughly the same share of it again.
 * Measured at 1 GiB, 16 MiB/s: the pause's last delta went from 11 MiB to under 2 MiB.
 */
function worthAnotherRound(last: RoundStat): boolean {
  if (last.pages <= 0 || last.linkMBps <= 0 || last.dirtyPages >= 0.5 * last.pages) return false;
  const next = (last.dirtyPages * last.dirtyPages) / last.pages;
  const savedMs = (((last.dirtyPages - next) * 4096) / 1e6 / last.linkMBps) * 1000;
  return savedMs >= WORTH_MS;
}

/**
 * What a switch-over costs besides the last delta: CRIU's freeze and dump without memory, the
 * other images, the restore, the resume (measured: 180-250 ms for a one-process task here).
 */
const SWITCH_OVERHEAD_MS = 200;

/**
 * The pause if the task froze now with `pages` written: the switch-over plus sending them at
 * `MBps` (all written pages count as data: the worst case; a handful costs nothing extra).
 */
export function expectedDowntimeMs(pages: number, MBps: number): number {
  if (pages <= FEW_PAGES) return SWITCH_OVERHEAD_MS;
  if (MBps <= 0) return Number.POSITIVE_INFINITY;
  return SWITCH_OVERHEAD_MS + Math.round(((pages * 4096) / 1e6 / MBps) * 1000);
}
