// Live migration between two test hosts (network namespaces with their own agents), real CRIU.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, lstatSync, mkdtempSync, readFileSync, readdirSync, realpathSync, rmSync } from 'node:fs';
import tls from 'node:tls';
import { MuxSession, type Headers } from '../../src/wire/mux.js';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { caInit, certIssue } from '../../src/tls/pki.js';
import { checkBeats, parseBeats, readySum, sums } from '../support/heartbeat.js';
import { SOCKETS, WORKLOAD, ask, runCli, waitFor, type CliResult, type TaskInfo } from '../support/ferry.js';

const LAB = 't';
const SUBNET = 77;
const labDir = join('/var/tmp', `ferry-lab-${LAB}`);
const cluster = join(labDir, 'cluster.json');
const addr = (h: string) => `10.213.${SUBNET}.${h.slice(1)}`;

const ferry = (args: string[]) => runCli(['--cluster', cluster, ...args]);
async function ok(args: string[]): Promise<string> {
  const r = await ferry(args);
  if (r.code !== 0) throw new Error(`ferry ${args.join(' ')} failed: ${r.stderr}${r.stdout}`);
  return r.stdout;
}
async function tasksOn(host: string): Promise<TaskInfo[]> {
  return JSON.parse(await ok(['--host', host, 'ps', '--json'])) as TaskInfo[];
}
const taskDir = (host: string, name: string) => join(labDir, host, 'state', 'tasks', name);
const logOf = (host: string, name: string) => {
  try {
    return readFileSync(join(taskDir(host, name), 'task.log'), 'utf8');
  } catch {
    return '';
  }
};
function oneLine(r: CliResult, re: RegExp): void {
  assert.notEqual(r.code, 0);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.match(r.stderr, re);
}

before(async () => {
  await runCli(['lab', 'down', '--name', LAB]);
  const r = await runCli(['lab', 'up', '--name', LAB, '--hosts', '2', '--subnet', String(SUBNET)]);
  assert.equal(r.code, 0, r.stderr);
});
after(async () => {
  const r = await runCli(['lab', 'down', '--name', LAB]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(existsSync(labDir), false);
});

async function removeEverywhere(name: string): Promise<void> {
  for (const h of ['h1', 'h2']) await ferry(['--host', h, 'rm', '--force', name]);
}

async function startHeartbeat(name: string, mib: number): Promise<string> {
  await ok(['--host', 'h1', 'run', '--name', name, '--', WORKLOAD, '--mib', String(mib)]);
  const sum = await waitFor('workload ready', () => readySum(logOf('h1', name)), 60_000);
  await waitFor('heartbeats', () => parseBeats(logOf('h1', name)).length > 20 || undefined);
  return sum;
}

async function assertIntact(host: string, name: string, sum: string): Promise<number> {
  const t = (await tasksOn(host)).find((x) => x.name === name);
  assert.ok(t, `task ${name} must be listed on ${host}`);
  assert.equal(t.state, 'running');
  const n = parseBeats(logOf(host, name)).length;
  await waitFor('heartbeats to continue', () => parseBeats(logOf(host, name)).length > n + 10 || undefined, 10_000);
  const before = sums(logOf(host, name)).length;
  process.kill(t.pid!, 'SIGUSR1');
  const s = await waitFor('checksum', () => sums(logOf(host, name))[before]);
  assert.equal(s, sum, 'memory checksum changed');
  const c = checkBeats(parseBeats(logOf(host, name)));
  assert.deepEqual(c.seqErrors, []);
  assert.equal(c.monoBackwards, 0, 'CLOCK_MONOTONIC went backwards');
  return c.maxGapS;
}

for (const mode of ['stop-copy', 'post-copy'] as const) {
  test(`a 256 MiB task migrates A -> B -> A with ${mode}, state and clocks intact`, async (t) => {
    const name = `hb-${mode}`;
    t.after(() => removeEverywhere(name));
    const sum = await startHeartbeat(name, 256);
    for (const [from, to] of [['h1', 'h2'], ['h2', 'h1']] as const) {
      const before = parseBeats(logOf(from, name)).length;
      const report = JSON.parse(await ok(['--host', from, 'migrate', name, '--to', to, '--mode', mode, '--json'])) as { ok: boolean; blackoutMs: number; bytes: { pages: number } };
      assert.equal(report.ok, true);
      assert.ok(report.bytes.pages >= 256 * 1024 * 1024, `pages moved: ${report.bytes.pages}`);
      assert.equal((await tasksOn(from)).some((x) => x.name === name), false, `${from} must no longer list the task`);
      assert.equal(existsSync(taskDir(from, name)), false);
      await assertIntact(to, name, sum);
      const beats = parseBeats(logOf(to, name));
      const gap = Math.max(...beats.slice(before).map((b, i) => (i === 0 ? 0 : b.real - beats[before + i - 1]!.real)));
      t.diagnostic(`${mode} ${from}->${to}: task-observed pause ${gap.toFixed(3)} s, reported blackout ${report.blackoutMs} ms`);
    }
    const logs = await ok(['--host', 'h1', 'logs', name]);
    assert.match(logs, /^hb \d+/m, 'a migrated task can be logged');
    const stopped = JSON.parse(await ok(['--host', 'h1', 'stop', '--time', '2', name, '--json'])) as { state: string };
    assert.equal(stopped.state, 'exited');
  });
}


test('a migration out of a task whose pages are still arriving by post-copy waits for them, then moves it intact', async (t) => {
  // A narrow link from h1 keeps the first migration's post-copy window open for seconds.
  const shape = (rate: string) => spawn('ip', ['netns', 'exec', `ferry-${LAB}-h1`, 'tc', 'qdisc', 'replace', 'dev', 'eth0', 'root', 'tbf', 'rate', rate, 'burst', '1mb', 'latency', '50ms'], { stdio: 'ignore' });
  const shaped = async (rate: string) => {
    const p = shape(rate);
    await new Promise((r) => p.once('close', r));
  };
  t.after(async () => {
    await shaped('1gbit');
    await removeEverywhere('fill');
  });
  const sum = await startHeartbeat('fill', 128);
  await shaped('200mbit');
  const first = ferry(['--host', 'h1', 'migrate', 'fill', '--to', 'h2', '--mode', 'post-copy']);
  let firstDone = false;
  void first.then(() => (firstDone = true));
  await waitFor('the task to run on h2 while its pages arrive', async () => ((await tasksOn('h2')).find((x) => x.name === 'fill')?.state === 'running' ? true : undefined), 30_000);
  assert.equal(firstDone, false, 'the first migration must still be moving pages');
  const second = await ferry(['--host', 'h2', 'migrate', 'fill', '--to', 'h1', '--mode', 'pre-copy']);
  assert.equal((await first).code, 0, (await first).stderr);
  assert.equal(second.code, 0, second.stderr);
  await assertIntact('h1', 'fill', sum);
});

test('a task with the longest name moves in every mode; its images live in scratch memory and leave with it', async (t) => {
  // Sockets live in a migration's directories: a Unix socket's path has at most 107 bytes.
  const name = `n${'x'.repeat(62)}`;
  t.after(() => removeEverywhere(name));
  const sum = await startHeartbeat(name, 16);
  const scratchOf = (h: string) => join('/dev/shm', `ferry-lab-${LAB}`, h);
  const leftIn = (dir: string) => (existsSync(dir) ? readdirSync(dir) : []);
  let from = 'h1';
  for (const mode of ['stop-copy', 'post-copy', 'auto', 'pre-copy'] as const) {
    const to = from === 'h1' ? 'h2' : 'h1';
    await ok(['--host', from, 'migrate', name, '--to', to, '--mode', mode]);
    await assertIntact(to, name, sum);
    const images = join(taskDir(to, name), 'images');
    if (mode === 'stop-copy') assert.ok(lstatSync(images).isDirectory(), 'stop-copy images hold the memory: on disk');
    else assert.ok(realpathSync(images).startsWith(join(scratchOf(to), 'incoming') + '/'), `${mode}: the images are in scratch`);
    assert.deepEqual(leftIn(join(scratchOf(from), 'incoming')), [], `${from} kept no images of the task that left`);
    assert.deepEqual(leftIn(join(scratchOf(from), 'outgoing')), [], `${from} kept no dump images`);
    from = to;
  }
  await ok(['--host', from, 'rm', '--force', name]);
  assert.deepEqual(leftIn(join(scratchOf(from), 'incoming')), [], 'removing the task removes its images in scratch');
});

test("a task's log arrives whole, every line once, however large it grew", async (t) => {
  // The last sync sends the log by what it grew (rsync --append); the rest of the directory by rsync's comparison.
  const name = 'biglog';
  t.after(() => removeEverywhere(name));
  await ok(['--host', 'h1', 'run', '--name', name, '--', 'sh', '-c', 'head -c 50000000 /dev/zero | tr "\\0" a | fold -w 100; echo; i=0; while :; do i=$((i+1)); echo "line $i"; sleep 0.005; done']);
  await waitFor('the log', () => (logOf('h1', name).includes('line 50\n') ? true : undefined), 30_000);
  let from = 'h1';
  for (const mode of ['auto', 'stop-copy', 'post-copy'] as const) {
    const to = from === 'h1' ? 'h2' : 'h1';
    await ok(['--host', from, 'migrate', name, '--to', to, '--mode', mode]);
    const n = (logOf(to, name).match(/^line \d+$/gm) ?? []).length;
    await waitFor('more lines', () => ((logOf(to, name).match(/^line \d+$/gm) ?? []).length > n + 20 ? true : undefined), 10_000);
    from = to;
  }
  const log = logOf(from, name);
  const head = log.slice(0, log.indexOf('line'));
  assert.equal(head.replaceAll('\n', '').length, 50_000_000, 'the 50 MB the task wrote first are all there');
  assert.match(head, /^[a\n]+$/);
  const nums = (log.match(/^line (\d+)$/gm) ?? []).map((l) => Number(l.slice(5)));
  assert.ok(nums.length > 100);
  nums.forEach((v, i) => assert.equal(v, i + 1, `line ${i + 1} of the log is 'line ${v}'`));
});

test("a task has its own /proc and mounts, and keeps them in every mode", async (t) => {
  // /proc/PID by the pid a process sees must name that process (Python's and CRIU's test suites
  // read it); a tmpfs the task mounted moves with its content and stays out of the hosts' view.
  const name = 'mounts';
  const dir = mkdtempSync(join(tmpdir(), 'ferry-mounts-'));
  t.after(async () => {
    await removeEverywhere(name);
    rmSync(dir, { recursive: true, force: true });
  });
  const script = [
    `mount -t tmpfs -o size=1m own ${dir} && echo kept > ${dir}/x || echo 'mount failed'`,
    'i=0',
    `while :; do i=$((i+1)); echo "tick $i comm=$(cat /proc/$$/comm) procs=$(ls /proc | grep -c '^[0-9]') own=$(cat ${dir}/x)"; sleep 0.1; done`,
  ].join('; ');
  await ok(['--host', 'h1', 'run', '--name', name, '--', 'sh', '-c', script]);
  const ticks = (h: string) => logOf(h, name).match(/^tick \d+ .*$/gm) ?? [];
  await waitFor('ticks', () => ticks('h1').length > 3 || undefined);
  let from = 'h1';
  for (const mode of ['stop-copy', 'pre-copy', 'post-copy', 'auto'] as const) {
    const to = from === 'h1' ? 'h2' : 'h1';
    await ok(['--host', from, 'migrate', name, '--to', to, '--mode', mode]);
    const n = ticks(to).length;
    await waitFor(`ticks on ${to} after ${mode}`, () => ticks(to).length > n + 3 || undefined, 10_000);
    from = to;
  }
  const lines = ticks(from);
  assert.doesNotMatch(logOf(from, name), /mount failed|No such file/);
  // The task's pid 1 (Ferry's init), the shell, and what the shell runs at that moment.
  for (const l of lines) assert.match(l, /^tick \d+ comm=sh procs=[2-6] own=kept$/, l);
  assert.deepEqual(readdirSync(dir), [], "the task's tmpfs is not the host's");
});

test('a listening TCP socket keeps listening at the new host', async (t) => {
  t.after(() => removeEverywhere('srv'));
  await ok(['--host', 'h1', 'run', '--name', 'srv', '--', SOCKETS, '7100', '/dev/null']);
  await waitFor('listening', () => logOf('h1', 'srv').includes('listening') || undefined);
  assert.equal(await ask(addr('h1'), 7100, 'a'), 'pong a');
  await ok(['--host', 'h1', 'migrate', 'srv', '--to', 'h2']);
  assert.equal(await ask(addr('h2'), 7100, 'b'), 'pong b');
  await assert.rejects(ask(addr('h1'), 7100, 'c'), /ECONNREFUSED/);
});

for (const mode of ['stop-copy', 'post-copy'] as const) {
  test(`fault: a restore that fails on the destination leaves the task on the source (${mode})`, async (t) => {
  // The port the task listens on is taken on the destination: CRIU cannot restore the socket.
  const blocker: ChildProcess = spawn('ip', ['netns', 'exec', `ferry-${LAB}-h2`, SOCKETS, '7200', '/dev/null'], { stdio: 'ignore' });
  t.after(async () => {
    blocker.kill('SIGKILL');
    await removeEverywhere('busy');
  });
  await waitFor('blocker listening', () => ask(addr('h2'), 7200, 'x').then(() => true, () => undefined));
  await ok(['--host', 'h1', 'run', '--name', 'busy', '--', SOCKETS, '7200', '/dev/null']);
  await waitFor('listening', () => logOf('h1', 'busy').includes('listening') || undefined);
  const r = await ferry(['--host', 'h1', 'migrate', 'busy', '--to', 'h2', '--mode', mode]);
  oneLine(r, /migration of 'busy' to h2 failed: .*running on h1 again/);
  assert.equal(await ask(addr('h1'), 7200, 'still'), 'pong still');
  assert.equal((await tasksOn('h1')).find((x) => x.name === 'busy')?.state, 'running');
  assert.equal((await tasksOn('h2')).some((x) => x.name === 'busy'), false);
  await waitFor('destination to remove what it received', () => (!existsSync(taskDir('h2', 'busy')) ? true : undefined), 10_000);
});
}

async function migrateInBackground(name: string): Promise<Promise<CliResult>> {
  // The page transfer these faults strike is stop-copy's (auto moves memory before the freeze).
  return ferry(['--host', 'h1', 'migrate', name, '--to', 'h2', '--mode', 'stop-copy']);
}

test('fault: the link cut during the page transfer leaves the task on the source', async (t) => {
  const veth = `fv-${LAB}-2`;
  t.after(async () => {
    await runCli([]).catch(() => undefined);
    spawn('ip', ['link', 'set', veth, 'up']);
    await removeEverywhere('cut');
  });
  const sum = await startHeartbeat('cut', 768);
  const migration = migrateInBackground('cut');
  await waitFor('the page transfer', () => (existsSync(join(taskDir('h2', 'cut'), 'images', 'page-server.log')) ? true : undefined), 20_000, 10);
  await new Promise((r) => setTimeout(r, 300));
  spawn('ip', ['link', 'set', veth, 'down']);
  const r = await migration;
  oneLine(r, /migration of 'cut' to h2 failed/);
  spawn('ip', ['link', 'set', veth, 'up']);
  const gap = await assertIntact('h1', 'cut', sum);
  t.diagnostic(`task-observed pause during the failed migration: ${gap.toFixed(3)} s`);
  await waitFor('destination to remove what it received', () => (!existsSync(taskDir('h2', 'cut')) ? true : undefined), 20_000);
});

test('fault: the destination agent killed during the transfer leaves the task on the source', async (t) => {
  t.after(() => removeEverywhere('kill'));
  const sum = await startHeartbeat('kill', 768);
  const lab = JSON.parse(readFileSync(join(labDir, 'lab.json'), 'utf8')) as { hosts: Array<{ name: string; agentPid: number }> };
  const h2 = lab.hosts.find((h) => h.name === 'h2')!;
  const migration = migrateInBackground('kill');
  await waitFor('the page transfer', () => (existsSync(join(taskDir('h2', 'kill'), 'images', 'page-server.log')) ? true : undefined), 20_000, 10);
  await new Promise((r) => setTimeout(r, 300));
  process.kill(h2.agentPid, 'SIGKILL'); // the lab agent this test file started
  const r = await migration;
  oneLine(r, /migration of 'kill' to h2 failed/);
  await assertIntact('h1', 'kill', sum);
  // A restarted agent removes what the dead one had received.
  assert.equal((await runCli(['lab', 'up', '--name', LAB, '--hosts', '2', '--subnet', String(SUBNET)])).code, 0);
  assert.equal(existsSync(taskDir('h2', 'kill')), false);
  assert.equal((await tasksOn('h2')).some((x) => x.name === 'kill'), false);
});

test('fault: a failed pre-check refuses the migration before anything is frozen', async (t) => {
  t.after(() => removeEverywhere('dup'));
  const sum = await startHeartbeat('dup', 16);
  await ok(['--host', 'h2', 'run', '--name', 'dup', '--', '/bin/sleep', '300']);
  const r = await ferry(['--host', 'h1', 'migrate', 'dup', '--to', 'h2']);
  oneLine(r, /destination already has a task named 'dup'/);
  const gap = await assertIntact('h1', 'dup', sum);
  assert.ok(gap < 0.5, `the task must never have been frozen (largest gap ${gap.toFixed(3)} s)`);
  assert.equal((await tasksOn('h2')).find((x) => x.name === 'dup')?.command[0], '/bin/sleep', 'the destination task is untouched');
});

test('a task holding an io_uring instance is refused before anything is frozen, with what and why', async (t) => {
  t.after(() => removeEverywhere('uring'));
  // io_uring_setup(8, params) through libc's syscall(): CRIU cannot dump the descriptor it returns.
  const py = "import ctypes,time\nfd=ctypes.CDLL(None).syscall(425,8,(ctypes.c_char*120)())\nprint('io_uring', fd, flush=True)\ntime.sleep(600)";
  await ok(['--host', 'h1', 'run', '--name', 'uring', '--', 'python3', '-c', py]);
  const fd = Number(await waitFor('the io_uring descriptor', () => /io_uring (-?\d+)/.exec(logOf('h1', 'uring'))?.[1], 20_000));
  if (fd < 0) return t.skip('this kernel gives no io_uring (kernel.io_uring_disabled)');
  const was = (await tasksOn('h1')).find((x) => x.name === 'uring')!;
  const r = await ferry(['--host', 'h1', 'migrate', 'uring', '--to', 'h2']);
  oneLine(r, /process \d+ of task 'uring' holds an io_uring instance \(descriptor 3\), which CRIU cannot checkpoint; the task is running on h1 again .*UV_USE_IO_URING=0/);
  const c = await ferry(['--host', 'h1', 'checkpoint', 'uring']);
  oneLine(c, /holds an io_uring instance/);
  const now = (await tasksOn('h1')).find((x) => x.name === 'uring');
  assert.equal(now?.status, 'running');
  assert.equal(now?.pid, was.pid, 'the same task runs on');
  assert.equal((await tasksOn('h2')).find((x) => x.name === 'uring'), undefined, 'nothing of it on h2');
});

test('bad input to migrate is refused with one line and changes nothing', async (t) => {
  t.after(() => removeEverywhere('bad'));
  await startHeartbeat('bad', 16);
  oneLine(await ferry(['--host', 'h1', 'migrate', 'ghost', '--to', 'h2']), /no task named 'ghost'/);
  oneLine(await ferry(['--host', 'h1', 'migrate', 'bad', '--to', 'h9']), /no host named 'h9'/);
  oneLine(await ferry(['--host', 'h1', 'migrate', 'bad', '--to', 'h1']), /already|another host/);
  oneLine(await ferry(['--host', 'h1', 'migrate', 'bad', '--to', 'h2', '--mode', 'teleport']), /unknown --mode/);
  // Two clients race for the same task: whichever reaches the agent first migrates it, the
  // other is refused (on a loaded machine the later-started client can win the race).
  const first = ferry(['--host', 'h1', 'migrate', 'bad', '--to', 'h2']);
  await new Promise((r) => setTimeout(r, 100));
  const second = ferry(['--host', 'h1', 'migrate', 'bad', '--to', 'h2']);
  const both = await Promise.all([first, second]);
  const won = both.filter((r) => r.code === 0);
  assert.equal(won.length, 1, `exactly one migration must go through: ${both.map((r) => `exit ${r.code}: ${r.stderr.trim()}`).join(' | ')}`);
  oneLine(both.find((r) => r.code !== 0)!, /busy: migration to h2 in progress|no task named 'bad'/);
  assert.equal((await tasksOn('h2')).find((x) => x.name === 'bad')?.state, 'running');
});

test('an agent refuses a client without a certificate or with one from another CA', async (t) => {
  const other = mkdtempSync(join(tmpdir(), 'ferry-otherca-'));
  t.after(() => rmSync(other, { recursive: true, force: true }));
  await caInit(join(other, 'ca'));
  const c = await certIssue(join(other, 'ca'), 'intruder', other, 'operator');
  const attempt = (opts: { cert?: Buffer; key?: Buffer }) =>
    new Promise<string>((resolve) => {
      const sock = tls.connect({ host: addr('h1'), port: 7443, ...opts, rejectUnauthorized: false });
      sock.on('error', (e) => resolve(`refused: ${e.message}`));
      sock.on('secureConnect', () => {
        const session = new MuxSession(sock, true);
        const req = session.request({ ':method': 'GET', ':path': '/v1/tasks' });
        let body = '';
        let status = 'none';
        req.on('response', (h: Headers) => (status = String(h[':status'])));
        req.on('data', (d) => (body += d));
        req.on('error', (e) => resolve(`refused: ${e.message}`));
        req.on('close', () => resolve(status === '200' ? `answered: ${body}` : `refused: no answer (status ${status})`));
        req.end();
      });
    });
  const none = await attempt({});
  assert.match(none, /^refused/, none);
  const foreign = await attempt({ cert: readFileSync(c.cert), key: readFileSync(c.key) });
  assert.match(foreign, /^refused/, foreign);
  assert.doesNotMatch(none + foreign, /hb-|"name"/, 'a refused peer learns nothing about tasks');
});
