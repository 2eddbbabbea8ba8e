// Auto-converge's CPU throttle on real processes and real cgroups: a busy process gets less CPU,
// goes back where it was, and a throttle left by an agent that died is lifted at the next start.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import { cgroupWritable, cpuCgroupOf } from '../support/cgroup.js';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { Throttle, releaseLeftThrottles } from '../../src/precopy/throttle.js';

const CPU = '/sys/fs/cgroup/cpu';

/** The path of a process's v1 cpu cgroup ('/' for the root). */
const cpuCgroup = (pid: number) => cpuCgroupOf(pid).split(':')[2] ?? '';

function ticks(pid: number): number {
  const s = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
  return Number(f[11]) + Number(f[12]);
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A process that burns CPU until the test ends, and the cpu cgroup it started in. */
function busy(t: TestContext): { pid: number; home: string } {
  const child: ChildProcess = spawn('sh', ['-c', 'while :; do :; done'], { stdio: 'ignore' });
  t.after(() => child.kill('SIGKILL'));
  return { pid: child.pid!, home: cpuCgroup(child.pid!) };
}

test('throttle: a busy process gets a fraction of its CPU, then goes back to its own cgroup', async (t) => {
  if (!cgroupWritable() || !existsSync(CPU)) return t.skip('no writable cgroup v1 cpu controller on this machine');
  const { pid, home } = busy(t);
  const th = new Throttle('testhost', `t${process.pid}`);
  t.after(() => th.release());
  th.sample([pid]);
  await sleep(1000);
  th.sample([pid]);
  let t0 = ticks(pid);
  await sleep(1000);
  const free = ticks(pid) - t0;
  th.set(0.9, [pid]);
  assert.notEqual(cpuCgroup(pid), home, 'moved into the throttle cgroup');
  t0 = ticks(pid);
  await sleep(1000);
  const throttled = ticks(pid) - t0;
  t.diagnostic(`CPU ticks per second: ${free} free, ${throttled} throttled to 10 %`);
  assert.ok(throttled < free * 0.3, `throttled ${throttled} vs free ${free}`);
  th.release();
  assert.equal(cpuCgroup(pid), home, 'back in its own cgroup');
  assert.equal(existsSync(join(CPU, home, `ferry-throttle.testhost.t${process.pid}`)), false, 'the throttle cgroup is gone');
});

test('throttle: one left by an agent that died is lifted when it starts again, and only its own host\'s', async (t) => {
  if (!cgroupWritable() || !existsSync(CPU)) return t.skip('no writable cgroup v1 cpu controller on this machine');
  const { pid, home } = busy(t);
  const mine = join(CPU, home, `ferry-throttle.deadhost.m${process.pid}`);
  const other = join(CPU, home, `ferry-throttle.otherhost.m${process.pid}`);
  mkdirSync(mine);
  mkdirSync(other);
  t.after(() => {
    for (const d of [mine, other]) if (existsSync(d)) rmdirSync(d);
  });
  writeFileSync(join(mine, 'cpu.cfs_quota_us'), '1000');
  writeFileSync(join(mine, 'cgroup.procs'), String(pid));
  assert.match(cpuCgroup(pid), /ferry-throttle\.deadhost/);
  const lifted = releaseLeftThrottles('deadhost');
  assert.deepEqual(lifted, [mine]);
  assert.equal(cpuCgroup(pid), home);
  assert.equal(existsSync(mine), false);
  assert.equal(existsSync(other), true, "another host's throttle is not this agent's to lift");
});
