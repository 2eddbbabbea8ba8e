// Auto-converge (QEMU's name): a task that writes memory faster than the link carries it is slowed
// through a CPU quota until pre-copy converges. Ferry moves the task's processes into a cgroup of
// its own under the one they are in (the cpu controller of cgroup v1, or cgroup v2's cpu.max),
// sets the quota, and moves them back and removes that cgroup before the freeze, so CRIU dumps
// the task in the cgroups it had. A cgroup left by an agent that died is emptied at its start.
import { existsSync, readFileSync, readdirSync, rmdirSync, writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { FerryError } from '../errors.js';

const ROOT = '/sys/fs/cgroup';
const PERIOD_US = 100_000;
/** QEMU's defaults: start by taking 20 %, then 10 % more per round that does not converge; Ferry steps faster (rounds are few). */
export const THROTTLE_START = 0.2;
export const THROTTLE_STEP = 0.2;
export const THROTTLE_MAX = 0.95;
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

/** The cgroup (path under the mount) holding pid for the cpu controller. */
function cpuCgroup(pid: number, l: Layout): string {
  for (const line of readFileSync(`/proc/${pid}/cgroup`, 'utf8').split('\n')) {
    const [id, ctrls, path] = line.split(':', 3) as [string, string, string];
    if (path === undefined) continue;
    if (l.v2 ? id === '0' : ctrls.split(',').includes('cpu')) return path;
  }
  throw new Error(`process ${pid} is in no cpu cgroup`);
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

  constructor(
    private readonly host: string,
    private readonly id: string,
  ) {}

  /** Whether this host can throttle a task: empty when it can, else why not. */
  static unavailable(): string {
    const l = layout();
    if (!l) return 'no cgroup cpu controller is mounted';
    return '';
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
      const parent = cpuCgroup(pids[0]!, l);
      this.dir = join(l.mount, parent, `${PREFIX}.${this.host}.${this.id}`);
      mkdirSync(this.dir);
      if (l.v2) writeFileSync(join(l.mount, parent, 'cgroup.subtree_control'), '+cpu');
    }
    for (const pid of pids) {
      if (this.origin.has(pid)) continue;
      try {
        this.origin.set(pid, join(l.mount, cpuCgroup(pid, l)));
        writeFileSync(join(this.dir, 'cgroup.procs'), String(pid));
      } catch {
        this.origin.delete(pid); // ended meanwhile
      }
    }
    this.level = Math.min(level, THROTTLE_MAX);
    const quota = Math.max(1000, Math.round(PERIOD_US * this.cores * (1 - this.level)));
    if (l.v2) writeFileSync(join(this.dir, 'cpu.max'), `${quota} ${PERIOD_US}`);
    else {
      writeFileSync(join(this.dir, 'cpu.cfs_period_us'), String(PERIOD_US));
      writeFileSync(join(this.dir, 'cpu.cfs_quota_us'), String(quota));
    }
  }

  /** Puts every process back where it was (children born meanwhile go with their tree's root) and removes the cgroup. */
  release(): void {
    if (!this.dir) return;
    const dir = this.dir;
    const home = this.origin.values().next().value as string | undefined;
    for (const pid of members(dir)) {
      try {
        writeFileSync(join(this.origin.get(pid) ?? home ?? join(dir, '..'), 'cgroup.procs'), String(pid));
      } catch {
        // ended meanwhile
      }
    }
    rmdirSync(dir);
    this.dir = undefined;
    this.level = 0;
  }
}

function members(dir: string): number[] {
  return readFileSync(join(dir, 'cgroup.procs'), 'utf8').split('\n').filter(Boolean).map(Number);
}

/**
 * At an agent's start: a throttle cgroup of this host's left by an agent that died holds a task
 * that would stay slow for ever. Its processes go to the parent and the cgroup is removed.
 */
export function releaseLeftThrottles(host: string): string[] {
  const l = layout();
  if (!l) return [];
  const found: string[] = [];
  const walk = (dir: string, depth: number): void => {
    let entries: string[];
    try {
      entries = readdirSync(dir, { withFileTypes: true }).filter((e) => e.isDirectory()).map((e) => e.name);
    } catch {
      return;
    }
    for (const e of entries) {
      const sub = join(dir, e);
      if (e.startsWith(`${PREFIX}.${host}.`)) {
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
      } else if (depth < 4) walk(sub, depth + 1);
    }
  };
  walk(l.mount, 0);
  return found;
}
