// Cgroups as the throttle tests see them: whether this machine lets a cgroup be made under the
// cpu controller (a container may not), and which cpu cgroup a process is in.
import { mkdirSync, readFileSync, rmdirSync } from 'node:fs';
import { join } from 'node:path';

export function cgroupWritable(): boolean {
  for (const dir of ['/sys/fs/cgroup/cpu', '/sys/fs/cgroup']) {
    const probe = join(dir, `ferry-probe-${process.pid}`);
    try {
      mkdirSync(probe);
      rmdirSync(probe);
      return true;
    } catch {
      // not this layout, or not writable
    }
  }
  return false;
}

/** The process's cpu cgroup line (v1 cpu controller, or the v2 unified line). */
export function cpuCgroupOf(pid: number): string {
  return readFileSync(`/proc/${pid}/cgroup`, 'utf8').split('\n').find((l) => /^\d+:([^:]*,)?cpu(,[^:]*)?:/.test(l) || l.startsWith('0::')) ?? '';
}
