// The controller's parts that need no lab: DNS answers (and hostile packets), the SQLite store,
// the API's refusals over real mutual TLS, and the OpenAPI file against the routes served.
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { once } from 'node:events';
import https from 'node:https';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import dnsPacket from 'dns-packet';
import fc from 'fast-check';
import { Controller } from '../../src/cluster/controller.js';
import { answer } from '../../src/cluster/dns.js';
import { ControllerServer, Metrics } from '../../src/cluster/server.js';
import { SqliteStore } from '../../src/cluster/store.js';
import { controllerRequest } from '../../src/cluster/client.js';
import { caInit, certIssue, loadTls, type LoadedTls } from '../../src/tls/pki.js';
import { repoRoot } from '../../src/config.js';

const dir = mkdtempSync(join(tmpdir(), 'ferry-ctl-unit-'));
after(() => rm(dir, { recursive: true, force: true }));

const lookup = (n: string) => ({ web: '10.0.8.65', cache: '10.213.0.2' })[n];
const query = (name: string, type: dnsPacket.RecordType = 'A', id = 7) => dnsPacket.encode({ type: 'query', id, flags: dnsPacket.RECURSION_DESIRED, questions: [{ type, name, class: 'IN' }] });
const decode = (b: Buffer | undefined) => dnsPacket.decode(b!) as dnsPacket.DecodedPacket & { rcode: string };

test('DNS: NAME.ferry. answers A with a one-second TTL; unknown names NXDOMAIN, other zones REFUSED, other types NODATA', () => {
  const a = decode(answer(query('web.ferry'), lookup));
  assert.equal(a.id, 7);
  assert.equal(a.rcode, 'NOERROR');
  assert.equal(a.flag_aa, true);
  assert.deepEqual(a.answers?.map((x) => [x.type, (x as { data: string }).data, (x as { ttl: number }).ttl]), [['A', '10.0.8.65', 1]]);
  assert.equal(decode(answer(query('CACHE.Ferry.'), lookup)).answers?.length, 1, 'names are case-insensitive');
  assert.equal(decode(answer(query('nobody.ferry'), lookup)).rcode, 'NXDOMAIN');
  assert.equal(decode(answer(query('a.web.ferry'), lookup)).rcode, 'NXDOMAIN');
  assert.equal(decode(answer(query('example.com'), lookup)).rcode, 'REFUSED');
  const aaaa = decode(answer(query('web.ferry', 'AAAA'), lookup));
  assert.equal(aaaa.rcode, 'NOERROR');
  assert.equal(aaaa.answers?.length, 0);
});

test('DNS: packets that are not one well-formed query get no answer, and none throws', () => {
  assert.equal(answer(Buffer.alloc(0), lookup), undefined);
  assert.equal(answer(query('web.ferry').subarray(0, 15), lookup), undefined, 'truncated');
  assert.equal(answer(dnsPacket.encode({ type: 'response', id: 1, questions: [{ type: 'A', name: 'web.ferry' }] }), lookup), undefined, 'a response');
  assert.equal(answer(dnsPacket.encode({ type: 'query', id: 1, questions: [{ type: 'A', name: 'web.ferry' }, { type: 'A', name: 'cache.ferry' }] }), lookup), undefined, 'two questions');
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 600 }), (bytes) => {
      const out = answer(Buffer.from(bytes), lookup);
      if (out) decode(out); // whatever it answers is a well-formed packet
    }),
    { numRuns: 3000 },
  );
  // Real queries with a byte flipped somewhere.
  fc.assert(
    fc.property(fc.nat(40), fc.integer({ min: 0, max: 255 }), (at, v) => {
      const q = Buffer.from(query('web.ferry'));
      q[at % q.length] = v;
      const out = answer(q, lookup);
      if (out) decode(out);
    }),
    { numRuns: 3000 },
  );
});

test('store: records survive closing and reopening the file; put replaces, delete removes', async () => {
  const path = join(dir, 'c.db');
  const s = new SqliteStore(path);
  await s.put('task', 'a', { name: 'a', priority: 1 });
  await s.put('task', 'b', { name: 'b', priority: 2 });
  await s.put('task', 'a', { name: 'a', priority: 3 });
  await s.put('host', 'h1', { name: 'h1' });
  await s.delete('task', 'b');
  await s.close();
  const again = new SqliteStore(path);
  assert.deepEqual(await again.list('task'), [{ name: 'a', priority: 3 }]);
  assert.deepEqual(await again.list('host'), [{ name: 'h1' }]);
  assert.deepEqual(await again.list('drain'), []);
  await again.close();
});

// ---- the API over real mutual TLS -----------------------------------------------------------

let server: ControllerServer;
let controller: Controller;
let store: SqliteStore;
let port = 0;
const certs: Record<string, LoadedTls> = {};
before(async () => {
  const ca = join(dir, 'ca');
  await caInit(ca);
  for (const [name, role] of [['ctl', 'controller'], ['op', 'operator'], ['viewer', 'reader'], ['h1', 'agent']] as const) {
    const c = await certIssue(ca, name, join(dir, 'certs'), role);
    certs[name] = await loadTls({ ca: c.ca, cert: c.cert, key: c.key });
  }
  store = new SqliteStore(join(dir, 'api.db'));
  controller = new Controller({ store, hosts: {}, tls: certs['ctl']!, pollMs: 60_000 });
  await controller.start();
  server = new ControllerServer(controller, new Metrics(controller), { tls: certs['ctl']! });
  port = (await server.start('127.0.0.1:0')).api;
});
after(async () => {
  await server?.close();
  await controller?.close();
  await store?.close();
});

const ask = (who: string, method: string, path: string, body?: unknown) => controllerRequest(`127.0.0.1:${port}`, certs[who]!, method, path, body);

test('API: roles, bad bodies and unknown names are refused with one clear error; nothing is placed without room', async () => {
  assert.deepEqual(await ask('viewer', 'GET', '/v1/hosts'), []);
  await assert.rejects(ask('viewer', 'POST', '/v1/hosts/h1/cordon'), (e: Error & { code?: string }) => e.code === 'FORBIDDEN' && /'viewer' has role reader/.test(e.message));
  await assert.rejects(ask('h1', 'GET', '/v1/hosts'), (e: Error & { code?: string }) => e.code === 'FORBIDDEN', 'an agent certificate reads nothing here');
  await assert.rejects(ask('op', 'POST', '/v1/hosts/h9/drain'), (e: Error & { code?: string }) => e.code === 'HOST_UNKNOWN');
  await assert.rejects(ask('op', 'POST', '/v1/tasks', { priority: 'high', command: [] }), (e: Error & { code?: string }) => e.code === 'USAGE' && /request body/.test(e.message));
  await assert.rejects(ask('op', 'POST', '/v1/tasks', { priority: 1, memBytes: 1, command: ['x'], extra: 1 }), (e: Error & { code?: string }) => e.code === 'USAGE');
  await assert.rejects(ask('op', 'POST', '/v1/tasks', { priority: 1, memBytes: 2 ** 20, command: ['/bin/true'] }), (e: Error & { code?: string }) => e.code === 'NO_ROOM');
  await assert.rejects(ask('op', 'GET', '/v1/resolve/..%2Fetc'), (e: Error & { code?: string }) => e.code === 'USAGE');
  await assert.rejects(ask('op', 'GET', '/v1/nothing'), (e: Error & { code?: string }) => e.code === 'USAGE');
  await assert.rejects(ask('op', 'POST', '/v1/tasks', 'x'.repeat(2 * 1024 * 1024)), (e: Error & { code?: string }) => e.code === 'USAGE' || e.code === 'CONTROLLER');
  assert.deepEqual(controller.tasks.size, 0);
});

test('API: a client without a certificate of the cluster CA is refused at the handshake', async () => {
  await assert.rejects(
    new Promise((resolve, reject) => {
      const req = https.request({ host: '127.0.0.1', port, path: '/v1/hosts', ca: certs['op']!.ca, checkServerIdentity: () => undefined }, resolve);
      req.on('error', reject);
      req.end();
    }),
  );
});

test('API: beside 600 silent connections from its own address a client is served; the flood is bounded', async () => {
  const flood: net.Socket[] = [];
  try {
    await Promise.all(
      Array.from({ length: 600 }, () => {
        const s = net.connect(port, '127.0.0.1');
        s.on('error', () => {});
        flood.push(s);
        return once(s, 'connect').catch(() => undefined);
      }),
    );
    await new Promise((r) => setTimeout(r, 300));
    const open = flood.filter((s) => !s.destroyed && s.readyState === 'open').length;
    assert.ok(open <= 32 + 2, `${open} of the silent connections are still held`);
    assert.ok(Array.isArray(await ask('viewer', 'GET', '/v1/hosts')));
  } finally {
    for (const s of flood) s.destroy();
  }
});

test('OpenAPI: docs/openapi.json describes every endpoint the controller serves, and nothing else', () => {
  const doc = JSON.parse(readFileSync(join(repoRoot, 'docs', 'openapi.json'), 'utf8')) as { paths: Record<string, Record<string, unknown>> };
  const documented = Object.entries(doc.paths).flatMap(([p, ops]) => Object.keys(ops).map((m) => ({ method: m.toUpperCase(), path: p.replace(/\{[^}]+\}/g, 'x1') })));
  for (const e of server.endpoints) {
    assert.ok(documented.some((d) => d.method === e.method && e.pattern.test(d.path)), `${e.method} ${e.pattern} is not in docs/openapi.json`);
  }
  for (const d of documented) assert.ok(server.endpoints.some((e) => e.method === d.method && e.pattern.test(d.path)), `docs/openapi.json lists ${d.method} ${d.path}, which is not served`);
});
