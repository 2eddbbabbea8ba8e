// The controller's doors. The API (JSON over HTTPS, versioned under /v1, described by
// docs/openapi.json) takes the same mutual TLS and certificate roles as the agents: a reader may
// look, an operator may act. The dashboard door is plain HTTP, read-only (the page, the cluster's
// picture, /metrics), and listens on loopback unless told otherwise.
import { readFile } from 'node:fs/promises';
import http from 'node:http';
import https from 'node:https';
import type { TLSSocket } from 'node:tls';
import type { Server as NetServer } from 'node:net';
import { join } from 'node:path';
import { z } from 'zod';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import { repoRoot } from '../config.js';
import { FerryError, httpStatus } from '../errors.js';
import { allows, identify, type Permission, type PeerIdentity } from '../tls/identity.js';
import type { LoadedTls, RevocationList } from '../tls/pki.js';
import { hostName, modeSchema, parse, taskName } from '../wire/schemas.js';
import { MAX_BODY, parseAddress } from '../wire/session.js';
import { door, HANDSHAKE_TIMEOUT_MS, RefusalLog } from '../wire/door.js';
import type { Controller, MigrationRecord } from './controller.js';

/** Connections each door serves at once; more wait in the kernel's backlog or are refused. */
const MAX_CONNECTIONS = 256;
const BODY_MS = 10_000;

const submitBody = z.strictObject({
  name: taskName.optional(),
  priority: z.number().int().min(-1_000_000).max(1_000_000),
  memBytes: z.number().int().positive().max(2 ** 50),
  command: z.array(z.string().max(65_536)).min(1).max(4096),
  env: z.record(z.string().max(1024), z.string().max(65_536)).optional(),
  net: z.boolean().optional(),
  mode: modeSchema.optional(),
});
const migrateBody = z.strictObject({ to: hostName.optional() });

interface Req {
  method: string;
  path: string;
  params: string[];
  peer: PeerIdentity | undefined;
  body<S extends z.ZodType>(schema: S): Promise<z.infer<S>>;
}
interface Route {
  method: string;
  pattern: RegExp;
  need: Permission;
  handler: (r: Req) => Promise<{ status?: number; json?: unknown; text?: string; type?: string }>;
}

export class Metrics {
  readonly registry = new Registry();
  private readonly migrations: Counter;
  private readonly blackout: Histogram;
  private readonly duration: Histogram;
  private readonly bytes: Counter;

  constructor(c: Controller) {
    const registers = [this.registry];
    collectDefaultMetrics({ register: this.registry, prefix: 'ferry_controller_' });
    this.migrations = new Counter({ name: 'ferry_migrations_total', help: 'Migrations the controller ran, by mode, outcome and why', labelNames: ['mode', 'outcome', 'reason'], registers });
    this.blackout = new Histogram({ name: 'ferry_migration_blackout_seconds', help: 'Pause of migrated tasks (freeze to resume)', labelNames: ['mode'], buckets: [0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30], registers });
    this.duration = new Histogram({ name: 'ferry_migration_duration_seconds', help: 'Total time of migrations', labelNames: ['mode', 'outcome'], buckets: [0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300], registers });
    this.bytes = new Counter({ name: 'ferry_migration_bytes_total', help: 'Bytes migrations moved between hosts', labelNames: ['mode'], registers });
    new Gauge({
      name: 'ferry_migrations_in_flight',
      help: 'Migrations under way',
      registers,
      collect() {
        this.set(c.inflight.size);
      },
    });
    new Gauge({
      name: 'ferry_tasks',
      help: 'Tasks by state',
      labelNames: ['state'],
      registers,
      collect() {
        this.reset();
        for (const s of ['pending', 'running', 'exited', 'stopped', 'migrating']) this.set({ state: s }, 0);
        for (const t of c.tasks.values()) this.inc({ state: c.inflight.has(t.name) ? 'migrating' : t.state });
      },
    });
    new Gauge({
      name: 'ferry_hosts',
      help: 'Hosts by state',
      labelNames: ['state'],
      registers,
      collect() {
        this.reset();
        for (const s of ['up', 'down', 'cordoned', 'draining']) this.set({ state: s }, 0);
        for (const h of c.hosts.values()) {
          this.inc({ state: h.healthy ? 'up' : 'down' });
          if (h.cordoned) this.inc({ state: 'cordoned' });
          if (c.drains.get(h.name)?.state === 'running') this.inc({ state: 'draining' });
        }
      },
    });
    new Gauge({
      name: 'ferry_host_free_bytes',
      help: 'Memory not taken by tasks, per host',
      labelNames: ['host'],
      registers,
      collect() {
        const free = c.snapshot().free;
        for (const [h, b] of free) this.set({ host: h }, b);
      },
    });
  }

  migrationEnded(m: MigrationRecord): void {
    const reason = m.reason.startsWith('drain') ? 'drain' : m.reason.startsWith('room for') ? 'preemption' : 'operator';
    this.migrations.inc({ mode: m.mode, outcome: m.state, reason });
    if (m.totalMs !== undefined) this.duration.observe({ mode: m.mode, outcome: m.state }, m.totalMs / 1000);
    if (m.state === 'ok') {
      if (m.blackoutMs !== undefined) this.blackout.observe({ mode: m.mode }, m.blackoutMs / 1000);
      this.bytes.inc({ mode: m.mode }, m.bytes);
    }
  }
}

export class ControllerServer {
  private api?: https.Server;
  private apiDoor?: NetServer;
  private board?: http.Server;
  private readonly routes: Route[] = [];
  /** While set, this controller stands by (another leads) and answers every request with it. */
  standby: string | undefined;

  constructor(
    private readonly c: Controller,
    private readonly metrics: Metrics,
    private readonly o: { tls: LoadedTls; revoked?: RevocationList; log?: (l: string) => void },
  ) {
    this.define();
  }

  /** The API on listen (mutual TLS); the dashboard on dashboard (plain, read-only), if given. */
  async start(listen: string, dashboard?: string): Promise<{ api: number; dashboard?: number }> {
    const api = https.createServer({ key: this.o.tls.key, cert: this.o.tls.cert, ca: this.o.tls.ca, requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.3', handshakeTimeout: HANDSHAKE_TIMEOUT_MS }, (req, res) => {
      const peer = identify((req.socket as TLSSocket).getPeerCertificate());
      if (typeof peer === 'string') return this.fail(res, new FerryError('FORBIDDEN', peer));
      if (this.o.revoked?.has(peer.serial)) return this.fail(res, new FerryError('FORBIDDEN', `the certificate of '${peer.name}' (serial ${peer.serial}) is revoked`));
      void this.handle(req, res, peer, false);
    });
    // A submission that makes room waits for its migrations, so requests have no overall limit;
    // headers and bodies have theirs (readBody), and connections are counted.
    api.headersTimeout = 10_000;
    api.requestTimeout = 0;
    // Connections still in their handshake are bounded at the door (the oldest gives way), the
    // rest by number: a flood of silent connections held every one of them for tls.Server's
    // default handshake time (120 s), and the cluster's own peers were turned away.
    const refusals = new RefusalLog((l) => this.o.log?.(l));
    const apiDoor = door(api, { maxHandshakes: MAX_CONNECTIONS / 2, maxFromOne: MAX_CONNECTIONS / 8, closed: (kind, line) => refusals.note(kind, line) });
    apiDoor.maxConnections = MAX_CONNECTIONS;
    api.on('tlsClientError', (e) => refusals.note(e.message, `refused a client: ${e.message}`));
    this.api = api;
    this.apiDoor = apiDoor;
    const out: { api: number; dashboard?: number } = { api: await listenOn(apiDoor, listen, 7450) };
    if (dashboard) {
      const board = http.createServer((req, res) => void this.handle(req, res, undefined, true));
      board.headersTimeout = 10_000;
      board.requestTimeout = 30_000;
      board.maxConnections = MAX_CONNECTIONS;
      this.board = board;
      out.dashboard = await listenOn(board, dashboard, 7480);
    }
    return out;
  }

  async close(): Promise<void> {
    this.api?.closeAllConnections();
    this.board?.closeAllConnections();
    for (const s of [this.apiDoor, this.board]) {
      if (!s) continue;
      await new Promise<void>((r) => s.close(() => r()));
    }
  }

  /** What it serves, for the check that docs/openapi.json describes every endpoint. */
  get endpoints(): Array<{ method: string; pattern: RegExp; need: Permission }> {
    return this.routes.map(({ method, pattern, need }) => ({ method, pattern, need }));
  }

  private route(method: string, pattern: RegExp, need: Permission, handler: Route['handler']): void {
    this.routes.push({ method, pattern, need, handler });
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse, peer: PeerIdentity | undefined, readOnly: boolean): Promise<void> {
    const method = req.method ?? 'GET';
    const path = (req.url ?? '/').split('?')[0]!;
    let read = false;
    try {
      if (this.standby) throw new FerryError('STANDBY', `this controller stands by: ${this.standby}`, { hint: 'ask the leading controller (list every controller in the cluster file, comma-separated)' });
      const route = this.routes.find((r) => r.method === method && r.pattern.test(path));
      if (!route) throw new FerryError('USAGE', `no such endpoint: ${method} ${path.slice(0, 200)}`, { hint: 'see /openapi.json' });
      if (readOnly && route.need !== 'read' && route.need !== 'info') throw new FerryError('FORBIDDEN', 'the dashboard port is read-only', { hint: "use the API port with an operator's certificate" });
      if (peer && !allows(peer.role, route.need)) {
        throw new FerryError('FORBIDDEN', `'${peer.name}' has role ${peer.role}, which may not ${method} ${path.slice(0, 200)}`, { hint: 'use a certificate with the role this needs (`ferry cert issue --role`)' });
      }
      const out = await route.handler({
        method,
        path,
        params: route.pattern.exec(path)!.slice(1),
        peer,
        body: async (schema) => {
          read = true;
          return parse(schema, await readBody(req), `request body for ${method} ${path}`);
        },
      });
      res.writeHead(out.status ?? 200, { 'content-type': out.type ?? 'application/json', 'cache-control': 'no-store' });
      res.end(out.text ?? JSON.stringify(out.json ?? {}));
    } catch (e) {
      if (!read) req.resume();
      const err = e instanceof FerryError ? e : new FerryError('CONTROLLER', `controller: internal error: ${(e as Error).message}`);
      if (!(e instanceof FerryError)) this.o.log?.(`internal error on ${method} ${path}: ${(e as Error).stack}`);
      this.fail(res, err);
    }
  }

  private fail(res: http.ServerResponse, err: FerryError): void {
    if (res.headersSent) return void res.destroy();
    res.writeHead(httpStatus(err.code), { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: err.toJSON() }));
  }

  private define(): void {
    const c = this.c;
    const NAME = '([^/]+)';
    const host = (r: Req) => parse(hostName, r.params[0], 'host name');
    const task = (r: Req) => parse(taskName, r.params[0], 'task name');
    const who = (r: Req) => r.peer?.name ?? 'the dashboard';

    this.route('GET', /^\/$/, 'read', async () => ({ text: await readFile(join(repoRoot, 'web', 'dashboard.html'), 'utf8'), type: 'text/html; charset=utf-8' }));
    this.route('GET', /^\/openapi\.json$/, 'info', async () => ({ text: await readFile(join(repoRoot, 'docs', 'openapi.json'), 'utf8') }));
    this.route('GET', /^\/metrics$/, 'read', async () => ({ text: await this.metrics.registry.metrics(), type: this.metrics.registry.contentType }));
    this.route('GET', /^\/v1\/cluster$/, 'read', async () => ({ json: c.view() }));
    this.route('GET', /^\/v1\/hosts$/, 'read', async () => ({ json: c.view().hosts }));
    this.route('POST', new RegExp(`^/v1/hosts/${NAME}/cordon$`), 'operate', async (r) => ({ json: await c.cordon(host(r), true) }));
    this.route('POST', new RegExp(`^/v1/hosts/${NAME}/uncordon$`), 'operate', async (r) => ({ json: await c.cordon(host(r), false) }));
    this.route('POST', new RegExp(`^/v1/hosts/${NAME}/drain$`), 'operate', async (r) => ({ status: 202, json: await c.drain(host(r), who(r)) }));
    this.route('GET', new RegExp(`^/v1/drains/${NAME}$`), 'read', async (r) => {
      const h = host(r);
      c.host(h);
      const d = c.drains.get(h);
      if (!d) throw new FerryError('TASK_NOT_FOUND', `host ${h} has not been drained`, { hint: `start it with \`ferry drain ${h}\`` });
      return { json: { ...d, left: c.view().hosts.find((x) => x.name === h)!.tasks, inflight: [...c.inflight.values()].filter((m) => m.from === h) } };
    });
    this.route('GET', /^\/v1\/tasks$/, 'read', async () => ({ json: [...c.tasks.values()] }));
    this.route('POST', /^\/v1\/tasks$/, 'operate', async (r) => {
      const b = await r.body(submitBody);
      return { status: 201, json: await c.submit(b, who(r)) };
    });
    this.route('GET', new RegExp(`^/v1/tasks/${NAME}$`), 'read', async (r) => ({ json: c.task(task(r)) }));
    this.route('DELETE', new RegExp(`^/v1/tasks/${NAME}$`), 'operate', async (r) => {
      await c.remove(task(r));
      return { json: {} };
    });
    this.route('POST', new RegExp(`^/v1/tasks/${NAME}/migrate$`), 'operate', async (r) => {
      const b = await r.body(migrateBody);
      return { json: await c.migrateTask(task(r), b.to, who(r)) };
    });
    this.route('GET', new RegExp(`^/v1/resolve/${NAME}$`), 'read', async (r) => ({ json: c.resolve(task(r)) }));
    this.route('GET', /^\/v1\/migrations$/, 'read', async () => ({ json: { inflight: [...c.inflight.values()], history: c.history.slice(-100) } }));
  }
}

async function readBody(req: http.IncomingMessage): Promise<unknown> {
  let size = 0;
  const chunks: Buffer[] = [];
  // A body that trickles in holds a connection: it has BODY_MS to arrive whole.
  const timer = setTimeout(() => req.destroy(new FerryError('USAGE', `request body not received within ${BODY_MS / 1000} s`)), BODY_MS);
  try {
    for await (const chunk of req) {
      size += (chunk as Buffer).length;
      if (size > MAX_BODY) throw new FerryError('USAGE', `request body larger than ${MAX_BODY} bytes`);
      chunks.push(chunk as Buffer);
    }
  } finally {
    clearTimeout(timer);
  }
  const text = Buffer.concat(chunks).toString('utf8');
  try {
    return text ? (JSON.parse(text) as unknown) : {};
  } catch {
    throw new FerryError('USAGE', 'request body is not JSON');
  }
}

function listenOn(server: NetServer, addr: string, defaultPort: number): Promise<number> {
  const { host, port } = parseAddress(addr, defaultPort, true);
  return new Promise((resolve, reject) => {
    server.once('error', (e: NodeJS.ErrnoException) =>
      reject(new FerryError('CONFIG', `cannot listen on ${addr}: ${e.code === 'EADDRINUSE' ? 'address in use' : e.message}`, { hint: 'pick another address or stop what holds it' })),
    );
    server.listen(port, host, () => resolve((server.address() as { port: number }).port));
  });
}
