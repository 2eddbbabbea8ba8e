// Local checkpoint/restore of real tasks with real CRIU.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { checkBeats, parseBeats, readySum, sums } from '../support/heartbeat.js';
import { SOCKETS, TestHost, WORKLOAD, ask, freePort, waitFor } from '../support/ferry.js';

test('a 256 MiB heartbeat task survives checkpoint and restore with its memory and clocks', async (t) => {
  const host = new TestHost();
  t.after(() => host.cleanup());
  await host.ok(['run', '--name', 'hb', '--', WORKLOAD, '--mib', '256']);
  const ready = await waitFor('the workload to fill its memory', () => readySum(host.log('hb')), 60_000);
  await waitFor('heartbeats', () => parseBeats(host.log('hb')).length > 20 || undefined);

  const cp = await host.json<{ state: string; checkpoint: { stats: { pagesWritten: number } } }>(['checkpoint', 'hb']);
  assert.equal(cp.state, 'checkpointed');
  assert.ok(cp.checkpoint.stats.pagesWritten >= 65536, `pages written: ${cp.checkpoint.stats.pagesWritten}`);
  const before = parseBeats(host.log('hb')).length;
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(parseBeats(host.log('hb')).length, before, 'a checkpointed task must not run');

  const restored = await host.json<{ state: string; pid: number; incarnation: number }>(['restore', 'hb']);
  assert.equal(restored.state, 'running');
  assert.equal(restored.incarnation, 2);
  await waitFor('heartbeats after restore', () => parseBeats(host.log('hb')).length > before + 20 || undefined);

  process.kill(restored.pid, 'SIGUSR1'); // the task's init forwards it to the workload
  const sum = await waitFor('checksum', () => sums(host.log('hb'))[0]);
  assert.equal(sum, ready, 'memory checksum changed across checkpoint/restore');

  const beats = checkBeats(parseBeats(host.log('hb')));
  assert.deepEqual(beats.seqErrors, [], 'heartbeat sequence has gaps or repeats');
  assert.equal(beats.monoBackwards, 0, 'CLOCK_MONOTONIC went backwards');
  t.diagnostic(`largest heartbeat gap (task-observed pause incl. 300 ms wait): ${beats.maxGapS.toFixed(3)} s`);

  const stopped = await host.json<{ state: string; exit: { exitCode: number } }>(['stop', '--time', '5', 'hb']);
  assert.equal(stopped.state, 'exited');
  assert.equal(stopped.exit.exitCode, 128 + 15, 'the restored task exit status must be known to Ferry');
});


test('a task with a listening socket, a pipe, a socket pair and an open file survives checkpoint/restore', async (t) => {
  const host = new TestHost();
  t.after(() => host.cleanup());
  const port = await freePort();
  const logFile = `${host.stateDir}/sockets-out.log`;
  await host.ok(['run', '--name', 'sk', '--', SOCKETS, String(port), logFile]);
  await waitFor('listening', () => host.log('sk').includes('listening') || undefined);
  assert.equal(await ask('127.0.0.1', port, 'one'), 'pong one');

  await host.ok(['checkpoint', 'sk']);
  await assert.rejects(ask('127.0.0.1', port, 'nobody'), /ECONNREFUSED/);

  await host.ok(['restore', 'sk']);
  assert.equal(await ask('127.0.0.1', port, 'two'), 'pong two', 'the restored processes must still talk through the pipe and socket pair');
  assert.equal(await ask('127.0.0.1', port, 'three'), 'pong three');
  const { readFileSync } = await import('node:fs');
  assert.equal(readFileSync(logFile, 'utf8'), 'pong one\npong two\npong three\n', 'the open log file continues where it was');
});

test('checkpoint --leave-running keeps the task running and leaves usable images', async (t) => {
  const host = new TestHost();
  t.after(() => host.cleanup());
  await host.ok(['run', '--name', 'lr', '--', WORKLOAD, '--mib', '16']);
  await waitFor('heartbeats', () => parseBeats(host.log('lr')).length > 5 || undefined);
  const r = await host.json<{ state: string; pid: number; checkpoint: { leftRunning: boolean } }>(['checkpoint', '--leave-running', 'lr']);
  assert.equal(r.state, 'running');
  assert.equal(r.checkpoint.leftRunning, true);
  const n = parseBeats(host.log('lr')).length;
  await waitFor('heartbeats after the dump', () => parseBeats(host.log('lr')).length > n + 5 || undefined);
  const restore = await host.cli(['restore', 'lr']);
  assert.equal(restore.code, 1);
  assert.match(restore.stderr, /is running/);
});
