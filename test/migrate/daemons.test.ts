// Tasks that daemonize: the main process forks and exits, the daemon carries on. The task lives
// while any of its processes does, and such trees checkpoint, restore and migrate in every mode.
// Also what daemons tend to do besides: drop their privileges, lock files, hold deleted ones.
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, readlinkSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { Lab, comm, oneLine } from '../support/lab.js';
import { WORKLOAD, commandExited, waitFor, type TaskInfo } from '../support/ferry.js';
import { parseBeats, readySum } from '../support/heartbeat.js';
import { treePids } from '../../src/util/proc.js';

const lab = new Lab('d', 80);
before(async () => {
  await lab.down().catch(() => {});
  await lab.up();
});
after(() => lab.down());

async function task(host: string, name: string): Promise<TaskInfo> {
  const t = (await lab.tasksOn(host)).find((x) => x.name === name);
  assert.ok(t, `${name} must be listed on ${host}`);
  return t;
}

/** A classic daemon: fork, setsid in the child, fork again, both parents exit. */
const daemonized = (cmd: string) => ['sh', '-c', `setsid sh -c '${cmd} & exit 0' & exit 0`];

async function startDaemonHeartbeat(name: string, mib: number, shape: string[]): Promise<string> {
  await lab.ok(['--host', 'h1', 'run', '--name', name, '--', ...shape]);
  const sum = await waitFor('workload ready', () => readySum(lab.logOf('h1', name)), 60_000);
  await waitFor('heartbeats', () => parseBeats(lab.logOf('h1', name)).length > 20 || undefined);
  return sum;
}

test('a task whose main process forks a daemon and exits keeps running until the daemon ends', async (t) => {
  const name = 'bg';
  t.after(() => lab.removeEverywhere(name));
  await lab.ok(['--host', 'h1', 'run', '--name', name, '--', 'sh', '-c', 'sleep 1000 & exit 3']);
  await new Promise((r) => setTimeout(r, 1500));
  const info = await task('h1', name);
  assert.equal(info.state, 'running', `${name}: ${info.status}`);
  assert.equal(info.processes, 1);
  assert.ok(info.mainPid, 'the daemon is the main process now');
  assert.equal(comm(info.mainPid), 'sleep');
  const ps = await lab.ok(['--host', 'h1', 'ps']);
  assert.match(ps, new RegExp(`^${name}\\s+running\\s+${info.mainPid}\\s+1\\s`, 'm'), ps);
  // stop reaches the daemon, not only the process Ferry started.
  const stopped = JSON.parse(await lab.ok(['--host', 'h1', 'stop', '--time', '5', name, '--json'])) as TaskInfo;
  assert.equal(stopped.state, 'exited');
  assert.equal(stopped.exit?.exitCode, 128 + 15, 'the status is the last process\'s (sleep, SIGTERM)');
});

test('a task ends when its last process does, with that process\'s status', async (t) => {
  const name = 'bg-end';
  t.after(() => lab.removeEverywhere(name));
  await lab.ok(['--host', 'h1', 'run', '--name', name, '--', 'sh', '-c', '(sleep 1; exit 7) & exit 0']);
  const done = await waitFor('the task to end', async () => {
    const i = await task('h1', name);
    return i.state === 'exited' ? i : undefined;
  }, 15_000, 100);
  assert.equal(done.exit?.exitCode, 7);
});

test('a daemonized task checkpoints and restores on its host', async (t) => {
  const name = 'd-ckpt';
  t.after(() => lab.removeEverywhere(name));
  const sum = await startDaemonHeartbeat(name, 32, daemonized(`${WORKLOAD} --mib 32`));
  await lab.ok(['--host', 'h1', 'checkpoint', name]);
  assert.equal((await task('h1', name)).state, 'checkpointed');
  await lab.ok(['--host', 'h1', 'restore', name]);
  await lab.assertIntact('h1', name, sum);
});

// The daemon's session leader exited (its sid names a dead process) or is a zombie its parent
// never reaps: CRIU rebuilds such sessions with helpers, which it can only do for children of the
// tree's root — Ferry's init is that root, and it adopts every orphan.
const shapes: Array<[string, (cmd: string) => string[]]> = [
  ['double fork, dead session leader', daemonized],
  ['zombie session leader', (cmd) => ['sh', '-c', `setsid sh -c '${cmd} & exit 0' & trap '' USR1; exec sleep 100000`]],
];
for (const [shape, make] of shapes) {
  for (const mode of ['stop-copy', 'post-copy', 'pre-copy'] as const) {
    test(`${shape}: the daemon migrates A -> B -> A with ${mode}, memory intact`, async (t) => {
      const name = `d-${shape.split(' ')[0]}-${mode}`;
      t.after(() => lab.removeEverywhere(name));
      const sum = await startDaemonHeartbeat(name, 32, make(`${WORKLOAD} --mib 32`));
      const procs = (await task('h1', name)).processes;
      for (const [from, to] of [['h1', 'h2'], ['h2', 'h1']] as const) {
        await lab.ok(['--host', from, 'migrate', name, '--to', to, '--mode', mode]);
        await lab.assertIntact(to, name, sum);
        assert.equal((await task(to, name)).processes, procs, 'the same processes arrive');
      }
    });
  }
}

test('a task with a pseudo-terminal migrates and keeps writing to it', async (t) => {
  const name = 'pty';
  t.after(() => lab.removeEverywhere(name));
  // Python's pty.spawn runs the command on a new pty and copies its output to the task's log.
  const spawnOnPty = 'import pty; pty.spawn(["sh", "-c", "while :; do echo tick; sleep 0.05; done"])';
  await lab.ok(['--host', 'h1', 'run', '--name', name, '--', 'python3', '-c', spawnOnPty]);
  await waitFor('output through the pty', () => (lab.logOf('h1', name).match(/tick/g)?.length ?? 0) > 5 || undefined);
  const root = (await task('h1', name)).pid!;
  assert.ok(treePids(root).some((p) => readlinkSync(`/proc/${p}/fd/1`).startsWith('/dev/pts/')), 'the loop writes to a pty');
  for (const [from, to] of [['h1', 'h2'], ['h2', 'h1']] as const) {
    await lab.ok(['--host', from, 'migrate', name, '--to', to, '--mode', 'stop-copy']);
    const n = lab.logOf(to, name).match(/tick/g)?.length ?? 0;
    await waitFor(`output through the pty on ${to}`, () => (lab.logOf(to, name).match(/tick/g)?.length ?? 0) > n + 5 || undefined, 10_000);
  }
});

test('a process the task stopped stays stopped after a migration, the others run', async (t) => {
  const name = 'stopped';
  t.after(() => lab.removeEverywhere(name));
  await lab.ok(['--host', 'h1', 'run', '--name', name, '--', 'sh', '-c', 'sleep 1001 & sleep 0.3; kill -STOP $!; exec sleep 1002']);
  const states = async (h: string) => {
    const root = (await task(h, name)).pid!;
    const out: Record<string, string> = {};
    for (const p of treePids(root).slice(1)) {
      const stat = readFileSync(`/proc/${p}/stat`, 'utf8');
      out[readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0').join(' ').trim()] = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    }
    return out;
  };
  await waitFor('the stopped sleep', async () => ((await states('h1'))['sleep 1001'] === 'T' ? true : undefined), 10_000, 100);
  for (const [from, to, mode] of [['h1', 'h2', 'stop-copy'], ['h2', 'h1', 'post-copy'], ['h1', 'h2', 'pre-copy']] as const) {
    await lab.ok(['--host', from, 'migrate', name, '--to', to, '--mode', mode]);
    await new Promise((r) => setTimeout(r, 300));
    const s = await states(to);
    assert.equal(s['sleep 1001'], 'T', `${mode}: still stopped: ${JSON.stringify(s)}`);
    assert.equal(s['sleep 1002'], 'S', `${mode}: the other runs: ${JSON.stringify(s)}`);
  }
});

/** The numbers a counting loop printed as "n N", in order. */
const counts = (log: string) => [...log.matchAll(/^n (\d+)/gm)].map((m) => Number(m[1]));

/** The loop keeps counting on host from where it was: its state moved, it did not start over. */
async function assertCounting(host: string, name: string, before: number): Promise<void> {
  await waitFor(`counting on ${host}`, () => (counts(lab.logOf(host, name)).at(-1) ?? 0) > before + 5 || undefined, 10_000);
  const c = counts(lab.logOf(host, name));
  for (let i = 1; i < c.length; i++) assert.equal(c[i], c[i - 1]! + 1, `the count runs on without a restart: ${c.slice(Math.max(0, i - 3), i + 3).join(' ')}`);
}

test('a daemon that dropped its privileges migrates in every mode and keeps its user', async (t) => {
  const name = 'nobody';
  t.after(() => lab.removeEverywhere(name));
  // Its limits can be read only from /proc where root lacks CAP_SYS_RESOURCE (patches/criu/0012).
  await lab.ok(['--host', 'h1', 'run', '--name', name, '--', 'setpriv', '--reuid=65534', '--regid=65534', '--clear-groups', 'sh', '-c', 'i=0; while :; do i=$((i+1)); echo "n $i"; sleep 0.05; done']);
  await waitFor('counting', () => counts(lab.logOf('h1', name)).length > 10 || undefined);
  for (const [from, to, mode] of [['h1', 'h2', 'stop-copy'], ['h2', 'h1', 'post-copy'], ['h1', 'h2', 'pre-copy']] as const) {
    const before = counts(lab.logOf(from, name)).at(-1)!;
    await lab.ok(['--host', from, 'migrate', name, '--to', to, '--mode', mode]);
    await assertCounting(to, name, before);
    const pid = (await task(to, name)).mainPid!;
    assert.match(readFileSync(`/proc/${pid}/status`, 'utf8'), /^Uid:\s+65534\s+65534\s+65534\s+65534$/m, `${mode}: still nobody`);
  }
});

test("after a migration, kill reaches the daemon of a task whose command exited, and KILL ends it there", async (t) => {
  const name = 'sig-daemon';
  t.after(() => lab.removeEverywhere(name));
  await lab.ok(['--host', 'h1', 'run', '--name', name, '--', 'sh', '-c', `sh -c 'trap "echo daemon-USR1" USR1; trap "echo daemon-USR2" USR2; echo daemon-up=$$; while :; do sleep 0.1; done' & sleep 1; exit 0`]);
  await waitFor('the daemon to start', () => lab.logOf('h1', name).includes('daemon-up') || undefined);
  await commandExited((await task('h1', name)).pid!);
  await lab.ok(['--host', 'h1', 'migrate', name, '--to', 'h2', '--mode', 'stop-copy']);
  assert.equal((await lab.ok(['--host', 'h2', 'kill', '-s', 'USR1', name])).trim(), `${name}: sent SIGUSR1`);
  await waitFor('the daemon on h2 to get SIGUSR1', () => lab.logOf('h2', name).includes('daemon-USR1') || undefined);
  // By its pid inside the task, which the move kept.
  const pid = /daemon-up=(\d+)/.exec(lab.logOf('h2', name))![1]!;
  assert.equal((await lab.ok(['--host', 'h2', 'kill', '-s', 'USR2', '--pid', pid, name])).trim(), `${name}: sent SIGUSR2 to process ${pid}`);
  await waitFor('the daemon on h2 to get SIGUSR2 by its pid', () => lab.logOf('h2', name).includes('daemon-USR2') || undefined);
  const killed = JSON.parse(await lab.ok(['--host', 'h2', 'kill', name, '--json'])) as TaskInfo;
  assert.equal(killed.state, 'exited');
});

/** Whether /proc/locks lists a lock of this kind ("FLOCK" or "POSIX") held by pid. */
const holds = (kind: string, pid: number) => new RegExp(`^\\d+: ${kind}\\s+ADVISORY\\s+WRITE\\s+${pid} `, 'm').test(readFileSync('/proc/locks', 'utf8'));

test('a task keeps its flock and POSIX locks and a deleted file it holds when it migrates', async (t) => {
  const name = 'locks';
  t.after(() => lab.removeEverywhere(name));
  // Its own directory is its host's (the lab's hosts share every other path); a deleted 4 MiB
  // file is over CRIU's default limit for such files.
  const py = [
    'import fcntl, os, time',
    'd = "/var/lib/ferry/tasks/" + os.environ["FERRY_TASK"]',
    'a = open(d + "/a.lck", "w"); b = open(d + "/b.lck", "w")',
    'fcntl.flock(a, fcntl.LOCK_EX); fcntl.lockf(b, fcntl.LOCK_EX)',
    'g = open(d + "/gone", "wb+"); g.write(os.urandom(4 << 20)); g.flush(); os.unlink(d + "/gone")',
    'i = 0',
    'while True:',
    '    i += 1; g.seek(0, 2); print("n", i, "gone", g.tell(), flush=True); time.sleep(0.05)',
  ].join('\n');
  await lab.ok(['--host', 'h1', 'run', '--name', name, '--', 'python3', '-c', py]);
  await waitFor('counting', () => counts(lab.logOf('h1', name)).length > 10 || undefined);
  for (const [from, to, mode] of [['h1', 'h2', 'pre-copy'], ['h2', 'h1', 'stop-copy']] as const) {
    const before = counts(lab.logOf(from, name)).at(-1)!;
    await lab.ok(['--host', from, 'migrate', name, '--to', to, '--mode', mode]);
    await assertCounting(to, name, before);
    const pid = (await task(to, name)).mainPid!;
    assert.ok(holds('FLOCK', pid), `${mode}: the flock is held again`);
    assert.ok(holds('POSIX', pid), `${mode}: the POSIX lock is held again`);
    assert.match(lab.logOf(to, name).trimEnd().split('\n').at(-1)!, /gone 4194304$/, `${mode}: the deleted file came along`);
  }
});

test('a lock on a file the source still holds fails the restore at once; the task runs on at the source', async (t) => {
  const name = 'shared-lock';
  const dir = mkdtempSync(join(tmpdir(), 'ferry-lock-'));
  t.after(async () => {
    await lab.removeEverywhere(name);
    rmSync(dir, { recursive: true, force: true });
  });
  // The lab's hosts share this directory, as hosts share a network file system: the frozen
  // source keeps its lock until the destination runs, so the destination cannot take it.
  await lab.ok(['--host', 'h1', 'run', '--name', name, '--cwd', dir, '--', 'python3', '-c', 'import fcntl, time\na = open("held.lck", "w"); fcntl.flock(a, fcntl.LOCK_EX)\ni = 0\nwhile True:\n    i += 1; print("n", i, flush=True); time.sleep(0.05)']);
  await waitFor('counting', () => counts(lab.logOf('h1', name)).length > 10 || undefined);
  const t0 = performance.now();
  const r = await lab.ferry(['--host', 'h1', 'migrate', name, '--to', 'h2', '--mode', 'stop-copy']);
  oneLine(r, /lock/);
  assert.ok(performance.now() - t0 < 60_000, `it failed at once, not at a timeout (${Math.round(performance.now() - t0)} ms)`);
  const before = counts(lab.logOf('h1', name)).at(-1)!;
  await assertCounting('h1', name, before);
  assert.ok(holds('FLOCK', (await task('h1', name)).mainPid!), 'the source still holds its lock');
  assert.equal((await lab.tasksOn('h2')).some((x) => x.name === name), false, 'nothing is left on h2');
});
