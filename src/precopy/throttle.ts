// Auto-converge (QEMU's name): a task that writes memory faster than the link carries it is slowed
// until pre-copy converges. Ferry moves the task's processes into a cgroup of its own under the
// one they are in (the cpu controller of cgroup v1, or cgroup v2's cpu.max), sets a CPU quota,
// and moves them back and removes that cgroup before the freeze, so CRIU dumps the task in the
// cgroups it had. A quota only slows a task that spends CPU to write: one that writes a word per
// page on a schedule (the benchmark's workload: 256 MiB/s with ~1 % of a CPU) never reaches it.
// So the task is also put to sleep for the same share of every 100 ms through the freezer
// (v1's freezer.state, v2's cgroup.freeze), as QEMU's auto-converge sleeps its vCPUs: that slows
// any writer. A cgroup left by an agent that died is thawed and emptied at its start.
import { existsSync, readFileSync, readdirSync, rmdirSync, writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { FerryError } from '../errors.js';

const ROOT = '/sys/fs/cgroup';
const PERIOD_US = 100_000;
const PERIOD_MS = PERIOD_US / 1000;
/** QEMU's default first step: take 20 % (more if the first round's rate asks for it, see nextThrottle). */
export const THROTTLE_START = 0.2;
export const THROTTLE_MAX = 0.95;
/** QEMU's increment: the least a round that does not converge adds. */
export const THROTTLE_MIN_STEP = 0.1;

/**
 * The next throttle level. The task's writes shrink with the share of its CPU it keeps, so each
 * step aims at once at half the link's rate (QEMU's line for raising it) rather than creeping up
 * a fixed step a round: at 1 GiB rounds last seconds, and at +20 % a round a task writing
 * 256 MiB/s took four rounds (~27 s on a 1 Gbit/s link) to converge.
 */
export function nextThrottle(level: number, writeMBps: number, linkMBps: number): number {
  const keep = ((1 - level) * 0.5 * linkMBps) / Math.max(writeMBps, 0.1);
  return Math.min(THROTTLE_MAX, Math.max(level > 0 ? level + THROTTLE_MIN_STEP : THROTTLE_START, 1 - keep));
}

/**
 * How fast the task writes, from the distinct pages out of `tracked` found written by a count
 * that watched them for `ms` on average (see watchedMs). A long round counts a page written
 * twice once (writes spread over 1 GiB for the 9 s of a first round found 58 % of its pages
 * written, by writes that would have covered 87 % of them once each). The correction assumes writes spread evenly: for writes bunched on a few pages, the
 * count is low against the memory and it changes little.
 */
export function writeRateMBps(distinct: number, tracked: number, ms: number): number {
  if (ms <= 0) return 0;
  const share = tracked > 0 ? Math.min(distinct / tracked, 0.95) : 0;
  const writes = Math.max(distinct, -tracked * Math.log(1 - share));
  return (writes * 4096) / 1e6 / (ms / 1000);
}

/**
 * How long, on average over the task's pages, the count that ended a round watched for writes.
 * The tracker re-arms each page the round sent as it reads it, so a write before that went with
 * the round and only later ones count: those pages were watched from their read (half-way through
 * the round's sending, on average), the others for the whole round. A first round sends every
 * page, so it watched about half as long as it lasted (1 GiB at 256 MiB/s: 153k pages counted
 * after 9 s unthrottled, 142k after the next 5.4 s with 43 % of the task's time taken).
 */
export function watchedMs(sinceMs: number, sendMs: number, sentShare: number): number {
  return Math.max(sinceMs - Math.min(Math.max(sentShare, 0), 1) * (sendMs / 2), sinceMs / 2, 1);
}

const PREFIX = 'ferry-throttle';

interface Layout {
  v2: boolean;
  /** Where the cpu controller's hierarchy is mounted. */
  mount: string;
}

function layout(): Layout | undefined {
  if (existsSync(join(ROOT, 'cgroup.controllers'))) {
    return readFileSync(join(ROOT, 'cgroup.controllers'), 'utf8').split(/\s+/).includes('cpu') ? { v2: true, mount: ROOT } : undefined;
  }
  for (const m of ['cpu', 'cpu,cpuacct', 'cpuacct,cpu']) if (existsSync(join(ROOT, m, 'cpu.cfs_quota_us'))) return { v2: false, mount: join(ROOT, m) };
  return undefined;
}

/** The cgroup (path under the mount) holding pid for the cpu controller (or the freezer). */
function cgroupOf(pid: number, l: Layout, controller = 'cpu'): string {
  for (const line of readFileSync(`/proc/${pid}/cgroup`, 'utf8').split('\n')) {
    const [id, ctrls, path] = line.split(':', 3) as [string, string, string];
    if (path === undefined) continue;
    if (l.v2 ? id === '0' : ctrls.split(',').includes(controller)) return path;
  }
  throw new Error(`process ${pid} is in no ${controller} cgroup`);
}

/** cgroup v1's freezer hierarchy, if mounted (v2 freezes through the cgroup's own cgroup.freeze). */
function freezerMount(): string | undefined {
  const m = join(ROOT, 'freezer');
  return existsSync(join(m, 'cgroup.procs')) ? m : undefined;
}

/** Freezes or thaws a throttle cgroup; an error (it is gone) is ignored. */
function freeze(dir: string, v2: boolean, frozen: boolean): void {
  try {
    if (v2) writeFileSync(join(dir, 'cgroup.freeze'), frozen ? '1' : '0');
    else writeFileSync(join(dir, 'freezer.state'), frozen ? 'FROZEN' : 'THAWED');
  } catch {
    // removed meanwhile
  }
}

/** Jiffies of CPU the processes used, as /proc says (utime + stime, threads included). */
function cpuTicks(pids: number[]): number {
  let t = 0;
  for (const pid of pids) {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      t += Number(f[11]) + Number(f[12]);
    } catch {
      // gone since the list was read
    }
  }
  return t;
}

export class Throttle {
  /** Share of the task's CPU taken away now (0 = not throttled). */
  level = 0;
  private dir?: string;
  private readonly origin = new Map<number, string>();
  private lastTicks?: number;
  private lastAt = 0;
  /** CPU the task used unthrottled, in cores; what the quota is a share of. */
  private cores = 1;
  /** Where the task sleeps: v1's own freezer cgroup, or (v2) the throttle cgroup itself. */
  private freezeDir?: string;
  private v2 = false;
  private readonly freezeOrigin = new Map<number, string>();
  private cycle?: NodeJS.Timeout;

  constructor(
    private readonly host: string,
    private readonly id: string,
  ) {}

  /** How this host slows a task: a CPU quota, and whether it can also put it to sleep. */
  static means(): { quota: boolean; sleep: boolean } {
    const l = layout();
    return { quota: !!l, sleep: !!l && (l.v2 || !!freezerMount()) };
  }

  /** Called each round while the task runs unthrottled: how much CPU it uses. */
  sample(pids: number[]): void {
    const now = performance.now();
    const ticks = cpuTicks(pids);
    if (this.lastTicks !== undefined && this.level === 0 && now - this.lastAt > 50) {
      this.cores = Math.max(0.05, (ticks - this.lastTicks) / 100 / ((now - this.lastAt) / 1000));
    }
    this.lastTicks = ticks;
    this.lastAt = now;
  }

  /** Takes `level` of the task's CPU away (moving its processes into Ferry's cgroup the first time). */
  set(level: number, pids: number[]): void {
    const l = layout();
    if (!l) throw new FerryError('PRECOPY', 'cannot throttle the task: no cgroup cpu controller is mounted', { hint: 'use --allow-post-copy, or accept the pause' });
    if (!this.dir) {
      const parent = cgroupOf(pids[0]!, l);
      this.dir = join(l.mount, parent, `${PREFIX}.${this.host}.${this.id}`);
      mkdirSync(this.dir);
      if (l.v2) writeFileSync(join(l.mount, parent, 'cgroup.subtree_control'), '+cpu');
    }
    moveIn(this.dir, pids, this.origin, (pid) => join(l.mount, cgroupOf(pid, l)));
    this.level = Math.min(level, THROTTLE_MAX);
    const quota = Math.max(1000, Math.round(PERIOD_US * this.cores * (1 - this.level)));
    if (l.v2) writeFileSync(join(this.dir, 'cpu.max'), `${quota} ${PERIOD_US}`);
    else {
      writeFileSync(join(this.dir, 'cpu.cfs_period_us'), String(PERIOD_US));
      writeFileSync(join(this.dir, 'cpu.cfs_quota_us'), String(quota));
    }
    this.sleepShare(l, pids);
  }

  /** Puts the task to sleep for `level` of every period (the freezer), whatever CPU it uses. */
  private sleepShare(l: Layout, pids: number[]): void {
    this.v2 = l.v2;
    if (l.v2) this.freezeDir = this.dir;
    else {
      const mount = freezerMount();
      if (!mount) return; // the quota alone, then
      if (!this.freezeDir) {
        this.freezeDir = join(mount, cgroupOf(pids[0]!, l, 'freezer'), `${PREFIX}.${this.host}.${this.id}`);
        mkdirSync(this.freezeDir);
      }
      moveIn(this.freezeDir, pids, this.freezeOrigin, (pid) => join(mount, cgroupOf(pid, l, 'freezer')));
    }
    if (this.cycle) return;
    const sleepNow = () => {
      if (!this.freezeDir || this.level <= 0) return;
      freeze(this.freezeDir, this.v2, true);
      this.cycle = setTimeout(wake, this.level * PERIOD_MS);
      this.cycle.unref();
    };
    const wake = () => {
      if (!this.freezeDir) return;
      freeze(this.freezeDir, this.v2, false);
      this.cycle = setTimeout(sleepNow, (1 - this.level) * PERIOD_MS);
      this.cycle.unref();
    };
    sleepNow();
  }

  /** Puts every process back where it was (children born meanwhile go with their tree's root) and removes the cgroups. */
  release(): void {
    clearTimeout(this.cycle);
    this.cycle = undefined;
    if (this.freezeDir) {
      // Awake before anything moves: the task leaves as it came.
      freeze(this.freezeDir, this.v2, false);
      if (!this.v2) moveBack(this.freezeDir, this.freezeOrigin);
      this.freezeDir = undefined;
    }
    if (!this.dir) return;
    moveBack(this.dir, this.origin);
    this.dir = undefined;
    this.level = 0;
  }
}

/** Moves a throttle cgroup's processes back to where they came from and removes it. */
function moveBack(dir: string, origin: Map<number, string>): void {
  const home = origin.values().next().value as string | undefined;
  for (const pid of members(dir)) {
    try {
      writeFileSync(join(origin.get(pid) ?? home ?? join(dir, '..'), 'cgroup.procs'), String(pid));
    } catch {
      // ended meanwhile
    }
  }
  rmdirSync(dir);
}

/** Moves processes into a throttle cgroup, noting where each came from. */
function moveIn(dir: string, pids: number[], origin: Map<number, string>, from: (pid: number) => string): void {
  for (const pid of pids) {
    if (origin.has(pid)) continue;
    try {
      origin.set(pid, from(pid));
      writeFileSync(join(dir, 'cgroup.procs'), String(pid));
    } catch {
      origin.delete(pid); // ended meanwhile
    }
  }
}

function members(dir: string): number[] {
  return readFileSync(join(dir, 'cgroup.procs'), 'utf8').split('\n').filter(Boolean).map(Number);
}

/**
 * At an agent's start: a throttle cgroup of this host's left by an agent that died holds a task
 * that would stay slow (or asleep) for ever. It is thawed, its processes go to the parent and the
 * cgroup is removed.
 */
export function releaseLeftThrottles(host: string): string[] {
  const l = layout();
  if (!l) return [];
  const found: string[] = [];
  const walk = (dir: string, depth: number, v1freezer = false): void => {
    let entries: string[];
    try {
      entries = readdirSync(dir, { withFileTypes: true }).filter((e) => e.isDirectory()).map((e) => e.name);
    } catch {
      return;
    }
    for (const e of entries) {
      const sub = join(dir, e);
      if (e.startsWith(`${PREFIX}.${host}.`)) {
        if (v1freezer || l.v2) freeze(sub, l.v2, false);
        for (const pid of members(sub)) {
          try {
            writeFileSync(join(dir, 'cgroup.procs'), String(pid));
          } catch {
            // ended meanwhile
          }
        }
        try {
          rmdirSync(sub);
          found.push(sub);
        } catch {
          // still busy: the next start tries again
        }
      } else if (depth < 4) walk(sub, depth + 1, v1freezer);
    }
  };
  walk(l.mount, 0);
  const fm = l.v2 ? undefined : freezerMount();
  if (fm) walk(fm, 0, true);
  return found;
}
