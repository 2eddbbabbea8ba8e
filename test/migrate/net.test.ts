// Tasks with their own address (ferry run --net): reachable from other hosts and the machine's
// root namespace, the address moves with the task, and an established connection survives every
// migration mode. Nothing of a task's network outlives it.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, test } from 'node:test';
import { run } from '../../src/exec/run.js';
import { hostIf } from '../../src/net/tasknet.js';
import { Lab, oneLine } from '../support/lab.js';
import { waitFor, type TaskInfo } from '../support/ferry.js';

const here = dirname(fileURLToPath(import.meta.url));
const ECHO = join(here, '..', 'support', 'echo-server.js');
const CLIENT = join(here, '..', 'support', 'tcp-client.js');
const PORT = 7300;

const lab = new Lab('n', 81);
const clients: ChildProcess[] = [];
before(async () => {
  await lab.down().catch(() => {});
  await lab.up();
});
after(async () => {
  for (const c of clients) if (c.exitCode === null) c.kill('SIGKILL');
  await lab.down();
});

async function task(host: string, name: string): Promise<TaskInfo & { address: string | null }> {
  const t = (await lab.tasksOn(host)).find((x) => x.name === name) as (TaskInfo & { address: string | null }) | undefined;
  assert.ok(t, `${name} must be listed on ${host}`);
  return t;
}

async function startEcho(name: string, extra: string[] = []): Promise<string> {
  await lab.ok(['--host', 'h1', 'run', '--name', name, '--net', ...extra, '--', process.execPath, ECHO, String(PORT)]);
  await waitFor('listening', () => lab.logOf('h1', name).includes('listening') || undefined, 20_000);
  const t = await task('h1', name);
  assert.ok(t.address, 'the task has an address');
  return t.address;
}

/** A client holding one connection; from the root namespace, or from inside a lab host. */
function client(address: string, fromHost?: string): { proc: ChildProcess; connected: Promise<unknown>; finish: () => Promise<{ answers: number; wrong: number; broke: string; maxWaitMs: number }> } {
  const argv = [process.execPath, CLIENT, address, String(PORT), '5'];
  const proc = fromHost ? spawn('ip', ['netns', 'exec', lab.netns(fromHost), ...argv], { stdio: ['ignore', 'pipe', 'inherit'] }) : spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'inherit'] });
  clients.push(proc);
  let out = '';
  proc.stdout!.on('data', (c: Buffer) => (out += c));
  const connected = waitFor('the client to connect', () => out.includes('connected') || undefined, 10_000);
  const finish = async () => {
    proc.kill('SIGTERM');
    await new Promise((r) => proc.once('close', r));
    return JSON.parse(out.trim().split('\n').pop()!) as { answers: number; wrong: number; broke: string; maxWaitMs: number };
  };
  return { proc, connected, finish };
}

async function linksOn(host: string): Promise<string> {
  return (await run('ip', ['-n', lab.netns(host), '-o', 'link'], { reject: false })).stdout + (await run('ip', ['-n', lab.netns(host), 'route'], { reject: false })).stdout;
}

test('a task with --net gets an address of the pool, reachable from the root namespace and from other hosts', async (t) => {
  const name = 'n-reach';
  t.after(() => lab.removeEverywhere(name));
  const address = await startEcho(name);
  assert.match(address, /^10\.213\.81\.(6[5-9]|[7-9]\d|1[01]\d|12[0-6])$/);
  assert.match(await lab.ok(['--host', 'h1', 'ps']), new RegExp(`${name}\\s+running.*${address.replace(/\./g, '\\.')}`));
  for (const from of [undefined, 'h2', 'h1']) {
    const c = client(address, from);
    await c.connected;
    await new Promise((r) => setTimeout(r, 200));
    const r = await c.finish();
    assert.ok(r.answers > 5, `answers from ${from ?? 'the root namespace'}: ${JSON.stringify(r)}`);
    assert.equal(r.broke, '');
  }
  // A second task gets another address.
  const other = await startEcho(`${name}-2`);
  t.after(() => lab.removeEverywhere(`${name}-2`));
  assert.notEqual(other, address);
});

for (const mode of ['stop-copy', 'post-copy', 'pre-copy'] as const) {
  test(`an established connection survives A -> B -> A with ${mode}: no reset, no reconnect`, async (t) => {
    const name = `n-${mode}`;
    t.after(() => lab.removeEverywhere(name));
    const address = await startEcho(name);
    const c = client(address);
    await c.connected;
    await new Promise((r) => setTimeout(r, 300));
    for (const [from, to] of [['h1', 'h2'], ['h2', 'h1']] as const) {
      await lab.ok(['--host', from, 'migrate', name, '--to', to, '--mode', mode]);
      assert.equal((await task(to, name)).address, address, 'the address moved with the task');
      assert.doesNotMatch(await linksOn(from), new RegExp(hostIf(name)), `${from} keeps nothing of the task's network`);
      await new Promise((r) => setTimeout(r, 300));
    }
    const r = await c.finish();
    assert.equal(r.broke, '', 'the connection must not break');
    assert.equal(r.wrong, 0);
    assert.ok(r.answers > 50, JSON.stringify(r));
    t.diagnostic(`${mode}: ${r.answers} answers over one connection, longest wait the client saw ${r.maxWaitMs} ms`);
  });
}

test('bad --net input gets one line and leaves nothing behind', async (t) => {
  const name = 'n-bad';
  t.after(() => lab.removeEverywhere(name));
  oneLine(await lab.ferry(['--host', 'h1', 'run', '--name', name, '--net', 'not-an-ip', '--', 'sleep', '100']), /--net takes an IPv4 address/);
  oneLine(await lab.ferry(['--host', 'h1', 'run', '--name', name, '--net', '192.0.2.7', '--', 'sleep', '100']), /not in this host's pool 10\.213\.81\.64\/26/);
  const address = await startEcho(`${name}-a`);
  t.after(() => lab.removeEverywhere(`${name}-a`));
  oneLine(await lab.ferry(['--host', 'h1', 'run', '--name', name, '--net', address, '--', 'sleep', '100']), /address .* is in use by task/);
  assert.equal((await lab.tasksOn('h1')).some((x) => x.name === name), false);
  assert.equal(existsSync(join(lab.stateDir('h1'), 'netns', name)), false);
  assert.doesNotMatch(await linksOn('h1'), new RegExp(hostIf(name)));
  // The same address taken on the destination: the migration is refused before anything freezes.
  const there = 'n-bad-b';
  await lab.ok(['--host', 'h2', 'run', '--name', there, '--net', address, '--', 'sleep', '100']);
  t.after(() => lab.removeEverywhere(there));
  oneLine(await lab.ferry(['--host', 'h1', 'migrate', `${name}-a`, '--to', 'h2']), /address .* is in use there/);
  assert.equal((await task('h1', `${name}-a`)).state, 'running');
});

test('a removed task leaves no namespace, veth or route', async () => {
  const name = 'n-rm';
  const address = await startEcho(name);
  assert.match(await linksOn('h1'), new RegExp(hostIf(name)));
  await lab.ok(['--host', 'h1', 'rm', '--force', name]);
  const left = await linksOn('h1');
  assert.doesNotMatch(left, new RegExp(hostIf(name)));
  assert.doesNotMatch(left, new RegExp(address.replace(/\./g, '\\.')));
  assert.equal(existsSync(join(lab.stateDir('h1'), 'netns', name)), false);
});
