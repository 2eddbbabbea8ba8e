// `ferry kill`: a signal reaches the task's command, or the daemon it left behind; KILL ends
// the task; a signal the task's init cannot pass on is refused with a clear error.
import assert from 'node:assert/strict';
import { test } from 'node:test';
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
