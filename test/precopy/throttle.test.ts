// Auto-converge's CPU throttle on real processes and real cgroups: a busy process gets less CPU,
// goes back where it was, and a throttle left by an agent that died is lifted at the next start.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import { cgroupWritable, cpuCgroupOf } from '../support/cgroup.js';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { Throttle, releaseLeftThrottles } from '../../src/precopy/throttle.js';
import { NATIVE } from '../support/ferry.js';

const CPU = '/sys/fs/cgroup/cpu';
const FREEZER = '/sys/fs/cgroup/freezer';
const WORKLOAD = join(NATIVE, 'ferry-workload');

/** The path of a process's v1 freezer cgroup. */
const freezerCgroup = (pid: number) => readFileSync(`/proc/${pid}/cgroup`, 'utf8').split('\n').find((l) => /^\d+:freezer:/.test(l))?.split(':')[2] ?? '';

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

test('throttle: a process that writes on a schedule with little CPU sleeps for the same share (freezer), and wakes at release', async (t) => {
  if (!cgroupWritable() || !existsSync(CPU)) return t.skip('no writable cgroup v1 cpu controller on this machine');
  if (!existsSync(FREEZER)) return t.skip('no cgroup v1 freezer on this machine');
  // A heartbeat every millisecond, next to no CPU: a CPU quota alone never slows it.
  const child = spawn(WORKLOAD, ['--mib', '1', '--interval-ms', '1'], { stdio: ['ignore', 'pipe', 'ignore'] });
  t.after(() => child.kill('SIGKILL'));
  let beats = 0;
  child.stdout!.on('data', (c: Buffer) => {
    for (const b of c) if (b === 10) beats++;
  });
  await sleep(500);
  const th = new Throttle('testhost', `s${process.pid}`);
  t.after(() => th.release());
  th.sample([child.pid!]);
  await sleep(200);
  th.sample([child.pid!]);
  let b0 = beats;
  await sleep(1000);
  const free = beats - b0;
  const home = freezerCgroup(child.pid!);
  th.set(0.8, [child.pid!]);
  assert.notEqual(freezerCgroup(child.pid!), home, 'moved into the throttle freezer cgroup');
  b0 = beats;
  await sleep(1000);
  const slowed = beats - b0;
  t.diagnostic(`heartbeats per second: ${free} free, ${slowed} asleep 80 % of the time`);
  assert.ok(slowed < free * 0.45, `throttled ${slowed} vs free ${free}`);
  th.release();
  assert.equal(freezerCgroup(child.pid!), home, 'back in its own freezer cgroup');
  assert.match(readFileSync(`/proc/${child.pid}/status`, 'utf8'), /State:\s+[SR]/, 'awake');
  // Its own pace in some half second of the next three (a busy host may hold it up for one):
  // still asleep 80 % of the time it would beat ~0.1 of its free rate per half second.
  let best = 0;
  for (let i = 0; i < 6 && best <= free * 0.3; i++) {
    b0 = beats;
    await sleep(500);
    best = Math.max(best, beats - b0);
  }
  assert.ok(best > free * 0.3, `beats again at its own pace: at best ${best} in half a second, ${free} a second free`);
  assert.equal(existsSync(join(FREEZER, home, `ferry-throttle.testhost.s${process.pid}`)), false, 'the freezer cgroup is gone');
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
  // It died while the task was asleep in its freezer cgroup.
  const frozenHome = existsSync(FREEZER) ? freezerCgroup(pid) : undefined;
  const asleep = frozenHome !== undefined ? join(FREEZER, frozenHome, `ferry-throttle.deadhost.m${process.pid}`) : undefined;
  if (asleep) {
    mkdirSync(asleep);
    t.after(() => existsSync(asleep) && rmdirSync(asleep));
    writeFileSync(join(asleep, 'cgroup.procs'), String(pid));
    writeFileSync(join(asleep, 'freezer.state'), 'FROZEN');
  }
  const lifted = releaseLeftThrottles('deadhost');
  assert.deepEqual(lifted, asleep ? [mine, asleep] : [mine]);
  assert.equal(cpuCgroup(pid), home);
  if (asleep) {
    assert.equal(freezerCgroup(pid), frozenHome);
    assert.doesNotMatch(readFileSync(`/proc/${pid}/status`, 'utf8'), /State:\s+D/, 'thawed');
  }
  assert.equal(existsSync(mine), false);
  assert.equal(existsSync(other), true, "another host's throttle is not this agent's to lift");
});
