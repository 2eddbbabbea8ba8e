// `ferry kill`: a signal reaches the task's command, or the daemon it left behind; KILL ends
// the task; a signal the task's init cannot pass on is refused with a clear error.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { nsPid, treePids } from '../../src/util/proc.js';
import { TestHost, commandExited, waitFor } from '../support/ferry.js';

test('kill passes HUP and USR1 to the command, refuses what cannot reach it, and KILL ends the task', async (t) => {
  const host = new TestHost();
  t.after(() => host.cleanup());
  await host.ok(['run', '--name', 'sig', '--', 'sh', '-c', 'trap "echo got-HUP" HUP; trap "echo got-USR1" USR1; echo ready; while :; do sleep 0.1; done']);
  await waitFor('the task to start', () => host.log('sig').includes('ready') || undefined);

  assert.equal((await host.ok(['kill', '--signal', 'HUP', 'sig'])).trim(), 'sig: sent SIGHUP');
  await waitFor('the command to get SIGHUP', () => host.log('sig').includes('got-HUP') || undefined);
  await host.ok(['kill', '-s', 'usr1', 'sig']);
  await waitFor('the command to get SIGUSR1', () => host.log('sig').includes('got-USR1') || undefined);
  assert.equal((await host.task('sig')).state, 'running', 'a caught signal must leave the task running');

  for (const bad of ['STOP', 'SIGALRM', '99', 'nonsense']) {
    const r = await host.cli(['kill', '-s', bad, 'sig']);
    assert.notEqual(r.code, 0, `kill -s ${bad} must fail`);
    assert.match(r.stderr, new RegExp(`cannot send signal '${bad}' to a task`));
    assert.equal(r.stderr.trim().split('\n').length <= 2, true, `one clear error, no stack: ${r.stderr}`);
    assert.doesNotMatch(r.stderr, /\n\s+at /);
  }
  assert.equal((await host.task('sig')).state, 'running');

  const killed = await host.json<{ state: string; exit?: { signal?: string } }>(['kill', 'sig']);
  assert.equal(killed.state, 'exited');
  const again = await host.cli(['kill', '-s', 'HUP', 'sig']);
  assert.notEqual(again.code, 0);
  assert.match(again.stderr, /task 'sig' is not running: it has exited/);
});

test("kill reaches the daemon a task's command left behind when it exited", async (t) => {
  const host = new TestHost();
  t.after(() => host.cleanup());
  // The first process forks a daemon and exits, as a service started by an init script does.
  await host.ok(['run', '--name', 'dmn', '--', 'sh', '-c', '(trap "echo daemon-USR1" USR1; trap "echo daemon-HUP" HUP; echo daemon-up; while :; do sleep 0.1; done) & sleep 1; exit 0']);
  await waitFor('the daemon to start', () => host.log('dmn').includes('daemon-up') || undefined);
  await commandExited((await host.task('dmn')).pid!);
  await host.ok(['kill', '-s', 'USR1', 'dmn']);
  await waitFor('the daemon to get SIGUSR1', () => host.log('dmn').includes('daemon-USR1') || undefined);
  await host.ok(['kill', '-s', '1', 'dmn']); // HUP by number
  await waitFor('the daemon to get SIGHUP', () => host.log('dmn').includes('daemon-HUP') || undefined);
  assert.equal((await host.task('dmn')).state, 'running');
  assert.equal((await host.json<{ state: string }>(['kill', 'dmn'])).state, 'exited');
});

test('kill --pid signals the one process with that pid inside the task, any signal, and says when there is none', async (t) => {
  const host = new TestHost();
  t.after(() => host.cleanup());
  // Two workers, each printing its pid as the task sees it (what a pidfile holds).
  const worker = (n: string) => `sh -c 'trap "echo ${n}-TERM; exit 0" TERM; echo ${n}=$$; while :; do sleep 0.1; done' &`;
  await host.ok(['run', '--name', 'two', '--', 'sh', '-c', `${worker('a')} ${worker('b')} wait`]);
  const pidOf = (n: string) => Number(new RegExp(`^${n}=(\\d+)$`, 'm').exec(host.log('two'))?.[1]);
  await waitFor('both workers to start', () => (pidOf('a') && pidOf('b')) || undefined);
  const [a, b] = [pidOf('a'), pidOf('b')];
  assert.ok(a < 100 && b < 100 && a !== b, `pids inside the task's namespace: ${a}, ${b}`);

  assert.equal((await host.ok(['kill', '-s', 'TERM', '--pid', String(a), 'two'])).trim(), `two: sent SIGTERM to process ${a}`);
  await waitFor('worker a to get SIGTERM', () => host.log('two').includes('a-TERM') || undefined);
  await sleep(300);
  assert.doesNotMatch(host.log('two'), /b-TERM/, 'only the process named gets the signal');
  assert.equal((await host.task('two')).state, 'running');

  // A signal the task's init would not pass on reaches one process: b stops, then goes on.
  const root = (await host.task('two')).pid!;
  const state = () => {
    const p = treePids(root).find((x) => nsPid(x) === b);
    return p === undefined ? '?' : /^State:\s+(\S)/m.exec(readFileSync(`/proc/${p}/status`, 'utf8'))?.[1];
  };
  await host.ok(['kill', '-s', 'STOP', '--pid', String(b), 'two']);
  await waitFor('worker b to stop', () => state() === 'T' || undefined);
  await host.ok(['kill', '-s', '18', '--pid', String(b), 'two']); // CONT by number
  await waitFor('worker b to run again', () => state() !== 'T' || undefined);

  for (const [args, err] of [
    [['--pid', '4000'], /task 'two' has no process 4000/],
    [['--pid', String(a)], new RegExp(`task 'two' has no process ${a}`)], // exited
    [['--pid', 'x1'], /--pid takes a process id inside the task, got 'x1'/],
    [['-s', 'NOPE', '--pid', String(b)], /cannot send signal 'NOPE'/],
  ] as const) {
    const r = await host.cli(['kill', ...args, 'two']);
    assert.notEqual(r.code, 0, `kill ${args.join(' ')} must fail`);
    assert.match(r.stderr, err);
    assert.doesNotMatch(r.stderr, /\n\s+at /);
  }
  assert.equal((await host.task('two')).state, 'running');
});
