// A real `ferry agent` process on loopback with real certificates: roles, claimed names,
// revocation, and thousands of malformed frames and requests that must not hurt it.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { chmodSync, copyFileSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import net from 'node:net';
import tls from 'node:tls';
import { after, before, test } from 'node:test';
import { FerryError } from '../../src/errors.js';
import { caInit, certIssue, certRevoke, loadTls } from '../../src/tls/pki.js';
import type { Role } from '../../src/tls/identity.js';
import { FrameType, encodeFrame, MuxSession } from '../../src/wire/mux.js';
import { connect, requestJson, serverOptions } from '../../src/wire/session.js';
import { CLI, freePort, waitFor } from '../support/ferry.js';
import { AGENT_NODE_FLAGS } from '../../src/agent/agent.js';
import { RefusalLog } from '../../src/wire/door.js';

const dir = mkdtempSync(join(tmpdir(), 'ferry-agent-test-'));
const caDir = join(dir, 'ca');
let port = 0;
let agent: ChildProcess | undefined;
let agentLog = '';
const certs: Record<string, { role: Role }> = { a1: { role: 'agent' }, a2: { role: 'agent' }, op: { role: 'operator' }, rd: { role: 'reader' }, rd2: { role: 'reader' } };

before(async () => {
  await caInit(caDir);
  for (const [name, c] of Object.entries(certs)) await certIssue(caDir, name, join(dir, 'certs'), c.role);
  port = await freePort();
  agent = spawn(process.execPath, [CLI, 'agent', '--name', 'a1', '--listen', `127.0.0.1:${port}`, '--ca', join(caDir, 'ca.crt'), '--cert', join(dir, 'certs', 'a1.crt'), '--key', join(dir, 'certs', 'a1.key'), '--state-dir', join(dir, 'state')], { stdio: ['ignore', 'pipe', 'pipe'] });
  agent.stdout!.on('data', (c: Buffer) => (agentLog += c));
  agent.stderr!.on('data', (c: Buffer) => (agentLog += c));
  await waitFor('the agent to listen', () => (agentLog.includes('listening') ? true : undefined), 20_000);
});

after(async () => {
  if (agent && agent.exitCode === null) {
    agent.kill('SIGTERM');
    await once(agent, 'exit');
  }
  rmSync(dir, { recursive: true, force: true });
});

const tlsOf = (name: string) => loadTls({ ca: join(caDir, 'ca.crt'), cert: join(dir, 'certs', `${name}.crt`), key: join(dir, 'certs', `${name}.key`) });
async function session(name: string): Promise<MuxSession> {
  return connect(`127.0.0.1:${port}`, { tls: await tlsOf(name), expectName: 'a1' });
}
async function refusal(p: Promise<unknown>): Promise<FerryError> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof FerryError, `expected a FerryError, got ${String(e)}`);
    return e;
  }
  assert.fail('the request was not refused');
}
function agentRss(): number {
  return Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${agent!.pid}/status`, 'utf8'))?.[1] ?? 0) * 1024;
}

const prepare = (from: string) => ({
  id: randomUUID(),
  from,
  task: { name: 'x', command: ['/bin/true'], cwd: '/', env: {}, createdAt: new Date().toISOString(), incarnation: 1, state: 'running' },
  mode: 'stop-copy',
  cpuinfo: 'AA==',
  memBytes: 0,
  diskBytes: 0,
});

test('each certificate role may do what it is for, and nothing else', async () => {
  const rd = await session('rd');
  const op = await session('op');
  const a2 = await session('a2');
  try {
    assert.deepEqual(await requestJson(rd, 'GET', '/v1/tasks'), []);
    assert.equal((await refusal(requestJson(rd, 'POST', '/v1/tasks', { command: ['/bin/true'] }))).code, 'FORBIDDEN');
    assert.equal((await refusal(requestJson(op, 'POST', '/v1/incoming', prepare('op')))).code, 'FORBIDDEN');
    assert.equal((await refusal(requestJson(a2, 'GET', '/v1/tasks'))).code, 'FORBIDDEN');
    assert.equal((await refusal(requestJson(a2, 'POST', '/v1/tasks', { command: ['/bin/true'] }))).code, 'FORBIDDEN');
    // An agent is who its certificate says, not who it claims to be.
    const claimed = await refusal(requestJson(a2, 'POST', '/v1/incoming', prepare('h9')));
    assert.equal(claimed.code, 'FORBIDDEN');
    assert.match(claimed.message, /'a2' claims to be 'h9'/);
    // A decision for a migration it never sent is refused or a no-op, never applied to another's.
    assert.deepEqual(await requestJson(a2, 'POST', `/v1/incoming/${randomUUID()}/abort`, {}), {});
  } finally {
    rd.close();
    op.close();
    a2.close();
  }
});

test('names and bodies are checked before anything is touched', async () => {
  const op = await session('op');
  try {
    for (const bad of ['..%2F..%2Fetc', '%2e%2e', '.hidden', 'a%00b', 'x'.repeat(80)]) {
      const e = await refusal(requestJson(op, 'POST', `/v1/tasks/${bad}/stop`, {}));
      assert.equal(e.code, 'USAGE', `${bad}: ${e.message}`);
      assert.match(e.message, /invalid task name/);
    }
    assert.match((await refusal(requestJson(op, 'POST', '/v1/tasks', { command: 'sh' }))).message, /invalid request body .* at command/);
    assert.match((await refusal(requestJson(op, 'POST', '/v1/tasks', { command: [] }))).message, /at command/);
    assert.match((await refusal(requestJson(op, 'POST', '/v1/tasks/x/stop', { graceMs: -1 }))).message, /at graceMs/);
    const st = op.request({ ':method': 'POST', ':path': '/v1/tasks' });
    st.end('{"command": [');
    const [h, text] = await new Promise<[Record<string, unknown>, string]>((r) => {
      let hh: Record<string, unknown> = {};
      let t = '';
      st.on('response', (x: Record<string, unknown>) => (hh = x));
      st.on('data', (c: Buffer) => (t += c));
      st.on('end', () => r([hh, t]));
    });
    assert.equal(h[':status'], 400);
    assert.match(text, /not JSON/);
    assert.match((await refusal(requestJson(op, 'POST', '/v1/tasks', { command: ['x'.repeat(2 * 1024 * 1024)] }))).message, /larger than/);
  } finally {
    op.close();
  }
});

test('an operator certificate cannot answer as an agent', async () => {
  const op = await tlsOf('op');
  const server = tls.createServer(serverOptions(op), (s) => s.destroy());
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  try {
    const e = await refusal(connect(`127.0.0.1:${(server.address() as { port: number }).port}`, { tls: await tlsOf('rd'), expectName: 'op' }));
    // OpenSSL refuses it for its key usage (client only) before Ferry checks its role.
    assert.match(e.message, /not an agent|unsuitable certificate purpose/);
  } finally {
    server.close();
  }
});

test('a private key that others can read is refused', async () => {
  const loose = join(dir, 'loose.key');
  copyFileSync(join(dir, 'certs', 'op.key'), loose);
  chmodSync(loose, 0o644);
  const e = await refusal(loadTls({ ca: join(caDir, 'ca.crt'), cert: join(dir, 'certs', 'op.crt'), key: loose }));
  assert.match(e.message, /readable by others \(mode 0644\)/);
  assert.equal(readFileSync(join(dir, 'certs', 'op.key')).length > 0, true);
});

test('thousands of malformed frames and requests: the agent stays up, bounded, and serves others', async (t) => {
  const good = await session('op');
  let served = 0;
  let failed = 0;
  let polling = true;
  const poller = (async () => {
    while (polling) {
      await requestJson(good, 'GET', '/v1/tasks').then(
        () => served++,
        () => failed++,
      );
      await new Promise((r) => setTimeout(r, 20));
    }
  })();
  const rssBefore = agentRss();
  const opTls = await tlsOf('op');
  let frames = 0;
  // Raw connections, each sending a burst of random frames (some valid, most not).
  for (let c = 0; c < 150; c++) {
    const sock = tls.connect({ host: '127.0.0.1', port, ca: opTls.ca, cert: opTls.cert, key: opTls.key, checkServerIdentity: () => undefined });
    sock.on('error', () => {});
    await once(sock, 'secureConnect');
    sock.resume();
    for (let i = 0; i < 20; i++) {
      const type = 1 + Math.floor(Math.random() * 10);
      const id = Math.floor(Math.random() * 8);
      const payload = Math.random() < 0.5 ? randomBytes(Math.floor(Math.random() * 200)) : Buffer.from(JSON.stringify({ ':method': 'POST', ':path': `/v1/tasks/${randomBytes(4).toString('hex')}/stop` }));
      for (const b of encodeFrame(type as FrameType, id, payload)) sock.write(b);
      frames++;
    }
    // Sometimes a header that claims a huge frame and then nothing.
    if (c % 10 === 0) sock.write(Buffer.from([3, 0, 0, 0, 0, 0, 0, 1, 0, 3, 0xff, 0xff]));
    sock.end();
  }
  // Valid sessions sending hostile requests.
  const hostile = await session('op');
  const bodies = ['{', '[]', '{"command":[1,2]}', '{"name":"../x","command":["sh"]}', 'null', '"x"', JSON.stringify({ to: { name: '..', address: 'x' } })];
  const paths = ['/v1/tasks', '/v1/tasks/%2e%2e/stop', '/v1/tasks/a/migrate', '/v1/incoming', '/v1/nothing', '/v1/migrations/zzz/cancel', '/'];
  const reqs: Array<Promise<unknown>> = [];
  for (let i = 0; i < 1000; i++) {
    const st = hostile.request({ ':method': i % 3 ? 'POST' : 'GET', ':path': paths[i % paths.length]! });
    st.on('error', () => {});
    st.end(bodies[i % bodies.length]);
    st.resume();
    reqs.push(new Promise((r) => st.once('close', r)));
    if (reqs.length >= 40) await Promise.all(reqs.splice(0));
  }
  await Promise.all(reqs);
  hostile.close();
  await new Promise((r) => setTimeout(r, 500));
  polling = false;
  await poller;
  const rssAfter = agentRss();
  assert.equal(agent!.exitCode, null, 'the agent must still run');
  assert.equal(failed, 0, 'a well-behaved session kept working throughout');
  assert.ok(served > 10, `served ${served}`);
  assert.ok(rssAfter - rssBefore < 150 * 1024 * 1024, `agent memory grew by ${((rssAfter - rssBefore) / 1048576).toFixed(0)} MiB`);
  assert.match(agentLog, /protocol error/);
  assert.doesNotMatch(agentLog, /internal error/);
  // A new session after all that is served.
  const fresh = await session('rd');
  assert.deepEqual(await requestJson(fresh, 'GET', '/v1/tasks'), []);
  fresh.close();
  good.close();
  t.diagnostic(`${frames} random frames on 150 connections and 1000 hostile requests; agent RSS ${(rssBefore / 1048576).toFixed(0)} -> ${(rssAfter / 1048576).toFixed(0)} MiB`);
});

test('connections that never finish their TLS handshake are bounded: the agent keeps its descriptors, serves the cluster beside them, logs little', async () => {
  const fds = () => readdirSync(`/proc/${agent!.pid}/fd`).length;
  const before = fds();
  const logFrom = agentLog.length;
  const flood: net.Socket[] = [];
  // Silent connections from a loopback address; the cluster's peers here come from 127.0.0.1.
  const open = async (from: string, n: number) => {
    const opened: Array<Promise<unknown>> = [];
    for (let i = 0; i < n; i++) {
      const s = net.connect({ host: '127.0.0.1', port, localAddress: from });
      s.on('error', () => {});
      flood.push(s);
      opened.push(once(s, 'connect').catch(() => undefined));
    }
    await Promise.all(opened);
    await new Promise((r) => setTimeout(r, 300));
  };
  const served = async (why: string) => {
    const s = await session('rd');
    assert.deepEqual(await requestJson(s, 'GET', '/v1/tasks'), [], why);
    s.close();
  };
  try {
    await open('127.0.0.1', 500);
    assert.ok(fds() - before <= 64 + 4, `500 silent connections from one address: the agent holds ${fds() - before} more descriptors`);
    await served('a peer from the same address is served beside them');
    await Promise.all(Array.from({ length: 40 }, (_x, a) => open(`127.0.0.${a + 2}`, 20)));
    assert.ok(fds() - before <= 512 + 4, `800 more from 40 addresses: the agent holds ${fds() - before} more descriptors`);
    await served('and beside 800 from 40 addresses');
    const lines = agentLog.slice(logFrom).split('\n').filter((l) => /refused|closed the oldest|turned away/.test(l));
    assert.ok(lines.length <= 10, `${lines.length} log lines of refusals:\n${lines.slice(0, 12).join('\n')}`);
    assert.equal(agent!.exitCode, null);
  } finally {
    for (const s of flood) s.destroy();
  }
  await waitFor('the agent to let go of the flood', () => (fds() <= before + 2 ? true : undefined), 10_000);
  await served('served once the flood is gone');
});

test('handshakes as fast as one address can make them: a peer from that address is served meanwhile', async (t) => {
  const cpu = () => readFileSync(`/proc/${agent!.pid}/stat`, 'utf8').split(') ')[1]!.split(' ').slice(11, 13).reduce((a, x) => a + Number(x), 0);
  const cpu0 = cpu();
  const t0 = performance.now();
  let through = 0;
  const until = t0 + 3000;
  // Eight at a time, each closed once through, without a certificate.
  const worker = async () => {
    while (performance.now() < until) {
      await new Promise<void>((resolve) => {
        const s = tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false, minVersion: 'TLSv1.3' });
        s.once('secureConnect', () => {
          through++;
          s.destroy();
        });
        s.once('error', () => {});
        s.once('close', () => resolve());
      });
    }
  };
  const served: Array<Promise<unknown>> = [];
  for (const ms of [500, 1500, 2500]) {
    served.push(
      new Promise((r) => setTimeout(r, ms)).then(async () => {
        const s = await session('rd');
        const tasks = await requestJson(s, 'GET', '/v1/tasks');
        s.close();
        return tasks;
      }),
    );
  }
  await Promise.all(Array.from({ length: 8 }, worker));
  const secs = (performance.now() - t0) / 1000;
  assert.deepEqual(await Promise.all(served), [[], [], []], 'three requests, each on a new session, during the flood');
  assert.equal(agent!.exitCode, null);
  t.diagnostic(`${through} handshakes in ${secs.toFixed(1)} s; the agent ${((cpu() - cpu0) / secs).toFixed(0)} % busy`);
});

test('refusals are logged once per kind and window, then counted', async () => {
  const lines: string[] = [];
  const log = new RefusalLog((l) => lines.push(l), 50);
  for (let i = 0; i < 1000; i++) log.note('TLS handshake timeout', `refused a peer from 10.0.0.${i % 250}: TLS handshake timeout`);
  log.note('revoked', 'refused a peer from 10.0.0.1: revoked');
  assert.deepEqual(lines, ['refused a peer from 10.0.0.0: TLS handshake timeout', 'refused a peer from 10.0.0.1: revoked']);
  await new Promise((r) => setTimeout(r, 120));
  assert.deepEqual(lines.slice(2), ['turned away 999 more connections in 0.05 s: TLS handshake timeout (999)']);
  log.note('revoked', 'refused a peer from 10.0.0.2: revoked');
  assert.equal(lines.at(-1), 'refused a peer from 10.0.0.2: revoked', 'a new window logs again');
  log.flush();
  assert.equal(lines.length, 4, 'nothing more to count');
});

test('a revoked certificate is refused within seconds, without restarting the agent', async () => {
  const rd = await session('rd2');
  assert.deepEqual(await requestJson(rd, 'GET', '/v1/tasks'), []);
  const closed = new Promise((r) => rd.once('close', r));
  await certRevoke(caDir, { name: 'rd2' });
  await Promise.race([closed, new Promise((_r, rej) => setTimeout(() => rej(new Error('the open session was not dropped')), 5000))]);
  await refusal(session('rd2').then((s) => requestJson(s, 'GET', '/v1/tasks')));
  // Others are unaffected.
  const rd1 = await session('rd');
  assert.deepEqual(await requestJson(rd1, 'GET', '/v1/tasks'), []);
  rd1.close();
  assert.match(agentLog, /revoked/);
});

test('one certificate holds at most half of the agent\'s sessions: the others are still served', async () => {
  await certIssue(caDir, 'many', join(dir, 'certs'), 'reader');
  const held: MuxSession[] = [];
  try {
    // Sessions of one certificate, each used, until the agent turns one away.
    let refused: FerryError | undefined;
    for (let i = 0; i < 70 && !refused; i++) {
      const s = await session('many').catch((e: FerryError) => e);
      if (s instanceof MuxSession) held.push(s);
      refused = s instanceof MuxSession ? await requestJson(s, 'GET', '/v1/tasks').then(() => undefined, (e: FerryError) => e) : s;
    }
    assert.ok(refused, 'the agent never turned a session of that certificate away');
    assert.equal(held.filter((s) => !s.destroyed).length, 64, 'sessions of one certificate the agent kept');
    assert.match(agentLog, /'many' has 64 sessions open already/);
    // Another peer is served beside them.
    const rd = await session('rd');
    assert.deepEqual(await requestJson(rd, 'GET', '/v1/tasks'), []);
    rd.close();
    // One of them closed leaves room for one more.
    held.shift()!.close();
    await waitFor('the agent to count the closed session out', async () => {
      const s = await session('many').catch(() => undefined);
      if (!s) return undefined;
      held.push(s);
      return (await requestJson(s, 'GET', '/v1/tasks').then(() => true, () => undefined)) ?? undefined;
    }, 10_000);
  } finally {
    for (const s of held) s.close();
  }
});

test("the ferry command's shebang starts node with the agents' options (deployed agents run through it)", () => {
  const shebang = readFileSync(CLI, 'utf8').split('\n')[0]!;
  for (const flag of AGENT_NODE_FLAGS) assert.ok(shebang.split(' ').includes(flag), `${CLI} starts with '${shebang}', without ${flag}`);
});
