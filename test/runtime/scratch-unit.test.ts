// Scratch: where a migration's images live while it runs. What it may make, and what it may
// remove: never more than it made, whatever a task leaves where its images were.
import assert from 'node:assert/strict';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { Scratch, linkTarget } from '../../src/runtime/scratch.js';

function tempRoot(t: { after: (fn: () => void) => void }): string {
  const root = mkdtempSync(join(tmpdir(), 'ferry-scratch-'));
  t.after(() => rmSync(root, { recursive: true, force: true }));
  return root;
}

test('scratch makes a directory per migration, and none without room or when others may enter', async (t) => {
  const root = tempRoot(t);
  const s = new Scratch(join(root, 'run'));
  const a = await s.make('outgoing', 'web', 1 << 20);
  const b = await s.make('outgoing', 'web', 1 << 20);
  assert.ok(a && b && a !== b, 'two migrations of one task get two directories');
  assert.ok(s.owns(a!) && a!.startsWith(join(root, 'run', 'outgoing', 'web-')));
  const long = await s.make('incoming', 'x'.repeat(63), 0);
  assert.ok(long && long.length - join(root, 'run', 'incoming').length < 24, 'a long task name is cut: sockets live in these directories');
  assert.equal(await s.make('incoming', 'web', Number.MAX_SAFE_INTEGER), undefined, 'no room: the caller keeps its images on disk');
  chmodSync(join(root, 'run'), 0o777);
  assert.equal(await s.make('incoming', 'web', 0), undefined, 'a scratch directory others may enter is not used');
  const file = join(root, 'file');
  writeFileSync(file, '');
  assert.equal(await new Scratch(file).make('incoming', 'web', 0), undefined, 'a file is no scratch directory');
});

test('removing images follows a link only into scratch', async (t) => {
  const root = tempRoot(t);
  const s = new Scratch(join(root, 'run'));
  const made = (await s.make('incoming', 'db', 0))!;
  writeFileSync(join(made, 'core-1.img'), 'x');
  const task = join(root, 'tasks', 'db');
  mkdirSync(task, { recursive: true });
  symlinkSync(made, join(task, 'images'));
  assert.equal(linkTarget(join(task, 'images')), made);
  await s.removeTaskDir(task);
  assert.ok(!existsSync(task) && !existsSync(made), 'the task directory and its images in scratch are gone');

  // A task that put a link of its own where its images were: what it points to stays.
  const elsewhere = join(root, 'precious');
  mkdirSync(elsewhere);
  writeFileSync(join(elsewhere, 'keep'), 'x');
  const other = join(root, 'tasks', 'other');
  mkdirSync(other, { recursive: true });
  symlinkSync(elsewhere, join(other, 'images'));
  await s.removeImages(join(other, 'images'));
  assert.ok(!existsSync(join(other, 'images')), 'the link itself goes');
  assert.ok(existsSync(join(elsewhere, 'keep')), 'nothing outside scratch is removed');
  symlinkSync(join(root, 'run', '..', 'precious'), join(other, 'images'));
  await s.removeTaskDir(other);
  assert.ok(existsSync(join(elsewhere, 'keep')), 'a path that leaves scratch through .. is not scratch');
});

test('after a restart the sweep keeps only incoming images a task still links to', async (t) => {
  const root = tempRoot(t);
  const s = new Scratch(join(root, 'run'));
  const out = (await s.make('outgoing', 'a', 0))!;
  const kept = (await s.make('incoming', 'b', 0))!;
  const lost = (await s.make('incoming', 'c', 0))!;
  await s.sweep((p) => p === kept);
  assert.ok(!existsSync(out), 'outgoing images are never needed after a restart');
  assert.ok(existsSync(kept) && !existsSync(lost));
});
