// Bad input gets one line naming the problem, a non-zero exit, no stack trace, and loses nothing.
import assert from 'node:assert/strict';
import { chmodSync, existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { parseBeats } from '../support/heartbeat.js';
import { TestHost, WORKLOAD, waitFor, type CliResult } from '../support/ferry.js';

function assertOneLineError(r: CliResult, pattern: RegExp): void {
  assert.notEqual(r.code, 0, 'must exit non-zero');
  const lines = r.stderr.trim().split('\n');
  assert.equal(lines.length, 1, `one line expected, got:\n${r.stderr}`);
  assert.match(lines[0]!, /^ferry: /);
  assert.match(lines[0]!, pattern);
  assert.doesNotMatch(r.stderr, /\n\s+at |Error:/, 'no stack trace');
}

test('unknown task, exited task, double checkpoint and bad names are refused', async (t) => {
  const host = new TestHost();
  t.after(() => host.cleanup());
  assertOneLineError(await host.cli(['checkpoint', 'ghost']), /no task named 'ghost'/);
  assertOneLineError(await host.cli(['restore', 'ghost']), /no task named 'ghost'/);
  assertOneLineError(await host.cli(['stop', 'ghost']), /no task named 'ghost'/);
  assertOneLineError(await host.cli(['run', '--name', '../evil', '--', '/bin/true']), /invalid task name/);
  assertOneLineError(await host.cli(['run', '--', '/no/such/program']), /command not found/);
  assertOneLineError(await host.cli(['frobnicate']), /unknown command/);
  // A host without an address pool cannot give a task its own network; nothing is left of it.
  assertOneLineError(await host.cli(['run', '--name', 'netless', '--net', '--', '/bin/true']), /no address pool/);
  assertOneLineError(await host.cli(['run', '--name', 'netless', '--net', '300.1.2.3', '--', '/bin/true']), /--net takes an IPv4 address/);
  assert.equal(existsSync(join(host.stateDir, 'tasks', 'netless')), false);

  await host.ok(['run', '--name', 'short', '--', '/bin/sh', '-c', 'exit 3']);
  await waitFor('the task to exit', async () => ((await host.task('short')).state === 'exited' ? true : undefined));
  assert.equal((await host.task('short')).exit?.exitCode, 3);
  assertOneLineError(await host.cli(['checkpoint', 'short']), /has exited \(code 3\)/);

  await host.ok(['run', '--name', 'twice', '--', WORKLOAD, '--mib', '8']);
  await waitFor('heartbeats', () => parseBeats(host.log('twice')).length > 3 || undefined);
  assertOneLineError(await host.cli(['run', '--name', 'twice', '--', WORKLOAD]), /already exists/);
  await host.ok(['checkpoint', 'twice']);
  assertOneLineError(await host.cli(['checkpoint', 'twice']), /already checkpointed/);
  assert.ok(existsSync(join(host.stateDir, 'tasks', 'twice', 'images', 'inventory.img')), 'images must survive the refused checkpoint');
  await host.ok(['restore', 'twice']);
  assert.equal((await host.task('twice')).state, 'running');
});

test('missing or corrupt images are refused and the task record is kept', async (t) => {
  const host = new TestHost();
  t.after(() => host.cleanup());
  await host.ok(['run', '--name', 'img', '--', WORKLOAD, '--mib', '8']);
  await waitFor('heartbeats', () => parseBeats(host.log('img')).length > 3 || undefined);
  await host.ok(['checkpoint', 'img']);
  const images = join(host.stateDir, 'tasks', 'img', 'images');

  const inv = join(images, 'inventory.img');
  writeFileSync(inv, 'garbage that is not a CRIU image');
  assertOneLineError(await host.cli(['restore', 'img']), /corrupt/);
  assert.equal((await host.task('img')).state, 'checkpointed');

  rmSync(images, { recursive: true });
  assertOneLineError(await host.cli(['restore', 'img']), /has no checkpoint images/);
  assert.equal((await host.task('img')).state, 'checkpointed', 'the task record must be kept');
});

test('a missing or too old CRIU is named and the task keeps running', async (t) => {
  const host = new TestHost();
  const fakeDir = mkdtempSync(join(tmpdir(), 'ferry-oldcriu-'));
  t.after(async () => {
    await host.cleanup();
    rmSync(fakeDir, { recursive: true, force: true });
  });
  await host.ok(['run', '--name', 'keep', '--', WORKLOAD, '--mib', '8']);
  await waitFor('heartbeats', () => parseBeats(host.log('keep')).length > 3 || undefined);

  assertOneLineError(await host.cli(['checkpoint', 'keep'], { FERRY_CRIU: '/nonexistent/criu' }), /CRIU not found at \/nonexistent\/criu/);
  // A stand-in that reports the CRIU version Debian bookworm ships.
  const old = join(fakeDir, 'criu');
  writeFileSync(old, '#!/bin/sh\necho "Version: 3.17.1"\n');
  chmodSync(old, 0o755);
  assertOneLineError(await host.cli(['checkpoint', 'keep'], { FERRY_CRIU: old }), /CRIU 3\.17\.1 .* too old/);
  const doc = await host.cli(['doctor'], { FERRY_CRIU: old });
  assert.equal(doc.code, 1, 'doctor must fail when CRIU is too old');

  const t1 = await host.task('keep');
  assert.equal(t1.state, 'running');
  const n = parseBeats(host.log('keep')).length;
  await waitFor('heartbeats to continue', () => parseBeats(host.log('keep')).length > n + 3 || undefined);
});
