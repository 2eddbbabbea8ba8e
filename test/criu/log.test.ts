import assert from 'node:assert/strict';
import { test } from 'node:test';
import { errorLines, hintFor } from '../../src/criu/log.js';
import { parseVersion, isSupported } from '../../src/criu/driver.js';
import { parseDumpStats, parseRestoreStats } from '../../src/criu/stats.js';

test('error lines skip the harmless lines and strip prefixes', () => {
  const log = [
    '(00.038277) Error (criu/util.c:1534): rlimit: Can\'t setup RLIMIT_NOFILE for self: Operation not permitted',
    '(00.039000) Error (criu/mem.c:1): Pid-reuse detection failed: no parent inventory, check warnings in get_parent_inventory',
    '(00.040000) Warn  (criu/foo.c:1): something',
    '(00.047751) Error (criu/files-reg.c:2172): File /var/lib/ferry/tasks/x/task.log has bad size 100 (expect 200)',
    '(00.050000) Error (criu/cr-restore.c:1): Restoring FAILED.',
  ].join('\n');
  const lines = errorLines(log);
  assert.deepEqual(lines, ['File /var/lib/ferry/tasks/x/task.log has bad size 100 (expect 200)', 'Restoring FAILED.']);
  assert.match(hintFor(lines) ?? '', /changed after the checkpoint/);
  assert.equal(hintFor(['something unknown']), undefined);
  assert.match(hintFor(["(00.001) Error (criu/pstree.c:801): Can't find a session leader for 7"]) ?? '', /child subreaper/);
});

test('the errors seen moving other projects\' test programs get a hint that names the cause', () => {
  // Lines as CRIU 4.2.1 (with patches/criu/0013) printed them for CRIU's own zdtm tests run through Ferry.
  const cases: Array<[string, RegExp]> = [
    ["Can't dump ghost file /tmp/x/ghost.test of 2097152 size, increase limit", /deleted file larger than 256 MiB/],
    ['Unseizable non-zombie 19863 found, state t, err -1/10', /traced by another/],
    ['Timeout reached. Try to interrupt: 0', /uninterruptible wait/],
    ['Unseizable non-zombie 20001 found, state D, err -1/10', /uninterruptible wait/],
    ['Zombies with threads are not supported', /zombie with threads/],
    ['pidfd: PIDFD_THREAD flag is currently not supported', /pidfd of a thread/],
    ['0x20e095: Error splicing data: Resource temporarily unavailable', /FIFO/],
    ['Can not set flock (fd 3): another process holds a conflicting lock: Resource temporarily unavailable', /locked by another process/],
    ['Can not set posix lock (fd 4): another process holds a conflicting lock: Resource temporarily unavailable', /locked by another process/],
    ['Can not set ofd lock!', /locked by another process/],
    ["Can't set lease: Resource temporarily unavailable", /leased by another process/],
    ["inet: Can't create inet socket: Permission denied", /ping_group_range/],
    ["Can't open file /proc/1/ns/net on restore: Permission denied", /holds open a \/proc file/],
    ["Can't create link remap for /tmp/x/unlink_fstat03.test. Use link-remap option.", /another hard link/],
    // A PostgreSQL task with pgbench connected to its socket file from outside the task.
    ['unix: Unix socket 116484 not found', /connected to a process outside it/],
    ['External socket is used. Consider using --ext-unix-sk option.', /connected to a process outside it/],
    // A descriptor the kernel will not pass over a Unix socket (an io_uring instance).
    ['pie: 2: Error (criu/pie/parasite.c:588): send_fds failed (-22)', /io_uring instance is one/],
    ['sockets: BUG! Unknown socket collected (family 40)', /AF_VSOCK/],
    ['tun: Net namespace is required to dump tun link', /start the task with --net/],
  ];
  for (const [line, hint] of cases) assert.match(hintFor(errorLines(`(00.1) Error (criu/x.c:1): ${line}`)) ?? '', hint, line);
  // Advice to use a CRIU option the user cannot pass through Ferry is left out of the message.
  assert.deepEqual(errorLines("(00.1) Error (criu/files-reg.c:1): Can't create link remap for /tmp/x/a.test. Use link-remap option."), ["Can't create link remap for /tmp/x/a.test."]);
});

test('CRIU versions are parsed and compared against 4.2', () => {
  assert.deepEqual(parseVersion('Version: 4.2.1\n'), { text: '4.2.1', major: 4, minor: 2, patch: 1 });
  assert.equal(isSupported(parseVersion('Version: 4.2')!), true);
  assert.equal(isSupported(parseVersion('Version: 3.17.1')!), false);
  assert.equal(isSupported(parseVersion('Version: 4.1.1')!), false);
  assert.equal(isSupported(parseVersion('Version: 5.0')!), true);
  assert.equal(parseVersion('nonsense'), undefined);
});

test('stats images decode (bytes from a real CRIU 4.2.1 dump and restore)', () => {
  const dump = Buffer.from('40591055063309572900' + '00000a2708f9011' + '0aebe0918c1ab0820898508' + '28d08001300038b58001400048005' + '00e580e600068007000', 'hex');
  const d = parseDumpStats(dump);
  assert.ok(d);
  assert.equal(d.freezingTimeUs, 249);
  assert.equal(d.pagesWritten, 16437);
  assert.equal(d.pagesScanned, 16464);
  const restore = Buffer.from('4059105506330957110000001' + '20f0800100018820320d59e0228b58001', 'hex');
  const r = parseRestoreStats(restore);
  assert.ok(r);
  assert.equal(r.forkingTimeUs, 386);
  assert.equal(r.pagesRestored, 16437);
  assert.throws(() => parseDumpStats(Buffer.from('not an image at all')));
});
