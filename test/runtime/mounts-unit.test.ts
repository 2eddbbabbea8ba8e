// Which of a task's mounts CRIU is told are the host's, and how the restore binds them.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { MOUNTS_MARKER, externalMounts, parseMountinfo, removeRestoreYard, restoreMountArgs } from '../../src/runtime/mounts.js';

const HOST = [
  '26 1 254:0 / / rw,relatime - ext4 /dev/vda rw',
  '21 26 0:20 / /proc rw,relatime - proc proc rw',
  '23 26 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw',
  '24 23 0:22 / /dev/shm rw,relatime - tmpfs tmpfs rw',
  '29 24 0:26 / /dev/shm rw,relatime - tmpfs tmpfs rw',
  '44 26 254:0 /run/netns /run/netns rw,relatime shared:1 - ext4 /dev/vda rw',
  '45 26 0:50 / /mnt/my\\040disk rw - ext4 /dev/vdb rw',
].join('\n');

// As the shim leaves it: the host's mounts copied, a proc of its own; then the task mounted a
// tmpfs and bound a directory of the root file system elsewhere.
const TASK = [
  '73 70 254:0 / / rw,relatime - ext4 /dev/vda rw',
  '74 73 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw',
  '75 74 0:22 / /dev/shm rw,relatime - tmpfs tmpfs rw',
  '76 75 0:26 / /dev/shm rw,relatime - tmpfs tmpfs rw',
  '77 73 254:0 /run/netns /run/netns rw,relatime - ext4 /dev/vda rw',
  '78 73 0:50 / /mnt/my\\040disk rw - ext4 /dev/vdb rw',
  '79 73 0:44 / /proc rw,nosuid,nodev,noexec - proc proc rw',
  '80 73 0:60 / /tmp/own rw - tmpfs own rw',
  '81 73 254:0 /srv /tmp/bound rw - ext4 /dev/vda rw',
  'garbage line',
].join('\n');

test('mountinfo: place, filesystem, root and type, with escapes undone', () => {
  const m = parseMountinfo(TASK);
  assert.equal(m.length, 9);
  assert.deepEqual(m[5], { dev: '0:50', root: '/', path: '/mnt/my disk', fstype: 'ext4' });
  assert.deepEqual(m[8], { dev: '254:0', root: '/srv', path: '/tmp/bound', fstype: 'ext4' });
});

test("external: the host's mounts the task has at the same place; not the root, its own proc, or what it mounted", () => {
  const ext = externalMounts(parseMountinfo(TASK), parseMountinfo(HOST));
  assert.deepEqual(ext, ['/dev', '/dev/shm', '/run/netns', '/mnt/my disk']);
});

test('restore: each external mount bound from the same place, a stand-in where this host has none', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-mounts-unit-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const state = join(dir, 'state');
  assert.deepEqual(restoreMountArgs(dir, state), [], 'no marker: a task in the host mount namespace');
  writeFileSync(join(dir, 'f'), '');
  const marker = [
    { path: dir, dir: true },
    { path: join(dir, 'f'), dir: false },
    { path: join(dir, 'missing'), dir: true },
    { path: join(dir, 'f'), dir: true }, // a directory there, a file here: does not fit
  ];
  writeFileSync(join(dir, MOUNTS_MARKER), JSON.stringify(marker));
  const args = restoreMountArgs(dir, state);
  assert.deepEqual(args.slice(0, 2), ['--root', '/']);
  const standDir = join(state, 'mount-stand-ins', 'dir');
  assert.deepEqual(args.slice(2), [
    '--external', `mnt[${dir}]:${dir}`,
    '--external', `mnt[${join(dir, 'f')}]:${join(dir, 'f')}`,
    '--external', `mnt[${join(dir, 'missing')}]:${standDir}`,
    '--external', `mnt[${join(dir, 'f')}]:${standDir}`,
  ]);
  assert.ok(statSync(standDir).isDirectory());
  for (const bad of ['{', '{}', '[{"path":"relative","dir":true}]', '[{"path":"/a]:b","dir":true}]', '[{"path":"/a"}]']) {
    writeFileSync(join(dir, MOUNTS_MARKER), bad);
    assert.throws(() => restoreMountArgs(dir, state), /unreadable ferry-mounts\.json/, bad);
  }
});

test("a failed restore's working directory in /tmp, named by its log, is removed; nothing else", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-mounts-unit-'));
  const yard = mkdtempSync('/tmp/.criu.mntns.');
  t.after(() => {
    rmSync(dir, { recursive: true, force: true });
    rmSync(yard, { recursive: true, force: true });
  });
  mkdirSync(join(yard, 'mnt-0000000136'));
  const log = join(dir, 'restore.log');
  writeFileSync(log, `(00.004780) mnt: \t\tWill mount 136 @ ${yard}/mnt-0000000136 /proc\n`);
  await removeRestoreYard(join(dir, 'none.log'));
  assert.ok(existsSync(yard), 'no log: nothing removed');
  await removeRestoreYard(log);
  assert.equal(existsSync(yard), false);
  assert.ok(existsSync(dir));
});
