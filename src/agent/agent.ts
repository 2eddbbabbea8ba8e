// `ferry agent`: owns the tasks of its host and serves one TLS port with mutual authentication,
// for the CLI and for other agents. Shutting it down leaves tasks running: each task's shim, not
// the agent, is its parent. Every request is checked at the edge: the peer's certificate role
// against the endpoint, its body against a schema, names before any file is touched.
import { appendFile, readFile, rm } from 'node:fs/promises';
import type { Server as NetServer } from 'node:net';
import tls from 'node:tls';
import { availableParallelism, totalmem } from 'node:os';
import { join } from 'node:path';
import type { z } from 'zod';
import { FerryError, httpStatus, ioError } from '../errors.js';
import { Destination } from '../migrate/destination.js';
import { Journal } from '../migrate/journal.js';
import { Resolver } from '../migrate/resolver.js';
import { migrateOut, outgoingDir, type MigrateContext, type MigrationReport, type ProgressEvent } from '../migrate/source.js';
import type { Runtime } from '../runtime/runtime.js';
import { allows, identify, type Permission, type PeerIdentity } from '../tls/identity.js';
import { RevocationList, type LoadedTls } from '../tls/pki.js';
import { MuxSession, type Headers, type MuxStream } from '../wire/mux.js';
import { abortBody, checkpointBody, emptyBody, incomingRestoreBody, migrateBody, migrationId, parse, prepareBody, runBody, stopBody, killBody, settleBody, taskName } from '../wire/schemas.js';
import { CODEC_HEADER, streamCodec } from '../wire/codec.js';
import { releaseLeftThrottles } from '../precopy/throttle.js';
import { MAX_BODY, jsonHeaders, parseAddress, readAll, serverOptions } from '../wire/session.js';
import { door, HANDSHAKE_TIMEOUT_MS, RefusalLog } from '../wire/door.js';

/** Sessions one agent serves at once; more are refused at the door. */
const MAX_SESSIONS = 128;
/** Sessions of one certificate: a peer, however trusted, cannot take all of them from the others. */
const MAX_SESSIONS_PER_PEER = MAX_SESSIONS / 2;

/**
 * Node options an agent runs with (the `ferry` command's shebang has them too). Pages streamed
 * through an agent made V8 mark its small old heap again and again: a stop-copy of 1 GiB cost the
 * source agent 46-51 full collections (they start at the old generation's allocation limit, 25 MB
 * by default) and 4.1-4.8 s of CPU; with a 64 MB initial old space, none and 3.0 s.
 */
export const AGENT_NODE_FLAGS = ['--initial-old-space-size=64'];

export interface AgentOptions {
  name: string;
  listen: string;
  tls: LoadedTls;
  runtime: Runtime;
  /** Serials refused even with a valid certificate; re-read when it changes. */
  revoked?: string;
  /** What this host offers tasks, as the cluster's controller places them (default: the machine's). */
  capacity?: { memBytes: number; cpus: number };
  log?: (line: string) => void;
}

interface Request {
  stream: MuxStream;
  params: string[];
  headers: Headers;
  peer: PeerIdentity;
  /** The JSON body, parsed against its schema. */
  body<S extends z.ZodType>(schema: S): Promise<z.infer<S>>;
}
type Handler = (r: Request) => Promise<void>;
interface Route {
  method: string;
  pattern: RegExp;
  need: Permission;
  handler: Handler;
}

export class Agent {
  /** Accepts connections and hands them to TLS (see door()). */
  private server?: NetServer;
  private readonly sessions = new Map<MuxSession, PeerIdentity>();
  private readonly dest: Destination;
  private readonly routes: Route[] = [];
  private readonly revoked: RevocationList;
  private readonly ctx: MigrateContext;
  private readonly resolver: Resolver;
  private revocationTimer?: NodeJS.Timeout;
  private readonly refusals = new RefusalLog((l) => this.log(l));
  readonly historyFile: string;

  constructor(private readonly o: AgentOptions) {
    this.historyFile = join(o.runtime.stateDir, 'history.jsonl');
    this.dest = new Destination(o.runtime, o.name, (e) => this.log(JSON.stringify(e)));
    this.revoked = new RevocationList(o.revoked);
    this.ctx = { rt: o.runtime, tls: o.tls, self: o.name, journal: new Journal(o.runtime.stateDir), active: new Map() };
    this.resolver = new Resolver(this.ctx, (l) => this.log(l), (e) => this.history(e));
    this.defineRoutes();
  }

  private log(line: string): void {
    this.o.log?.(`${new Date().toISOString()} ${line}`);
  }

  async start(): Promise<{ port: number }> {
    await this.o.runtime.store.init();
    const swept = await this.dest.sweep();
    const unthrottled = releaseLeftThrottles(this.o.name);
    if (unthrottled.length) this.log(`lifted CPU throttles left by an earlier run: ${unthrottled.join(', ')}`);
    if (swept.removed.length) this.log(`removed unfinished incoming migrations: ${swept.removed.join(', ')}`);
    if (swept.inDoubt.length) this.log(`restored, stopped, awaiting the source's decision: ${swept.inDoubt.join(', ')}`);
    // Outgoing migrations of an agent that died are settled from the journal before serving.
    await this.resolver.start();
    await rm(outgoingDir(this.o.runtime.stateDir), { recursive: true, force: true });
    await this.o.runtime.store.scratch.sweep((p) => this.o.runtime.store.linksTo(p));
    await this.revoked.refresh();
    // Revocation takes effect without a restart: sessions of a revoked certificate are dropped.
    this.revocationTimer = setInterval(() => {
      void this.revoked.refresh().then((changed) => {
        if (!changed) return;
        for (const [session, peer] of this.sessions) {
          if (this.revoked.has(peer.serial)) session.destroy(new FerryError('TLS', `certificate of '${peer.name}' revoked`));
        }
      });
    }, 1000);
    this.revocationTimer.unref();
    const { host, port } = parseAddress(this.o.listen);
    const secure = tls.createServer({ ...serverOptions(this.o.tls), handshakeTimeout: HANDSHAKE_TIMEOUT_MS }, (socket) => {
      const peer = identify(socket.getPeerCertificate());
      const refuse = (why: string) => {
        this.refusals.note(why.replace(/'[^']*'|\(serial \w+\)/g, '…'), `refused a peer from ${socket.remoteAddress}: ${why}`);
        socket.destroy();
      };
      if (typeof peer === 'string') return refuse(peer);
      if (!peer.client) return refuse(`the certificate of '${peer.name}' is not for clients`);
      if (this.revoked.has(peer.serial)) return refuse(`the certificate of '${peer.name}' (serial ${peer.serial}) is revoked`);
      if (this.sessions.size >= MAX_SESSIONS) return refuse(`${MAX_SESSIONS} sessions are open already`);
      let own = 0;
      for (const p of this.sessions.values()) if (p.serial === peer.serial) own++;
      if (own >= MAX_SESSIONS_PER_PEER) return refuse(`'${peer.name}' has ${MAX_SESSIONS_PER_PEER} sessions open already, the most one certificate may hold`);
      const session = new MuxSession(socket, false);
      this.sessions.set(session, peer);
      session.on('stream', (stream: MuxStream, headers: Headers) => void this.dispatch(stream, headers, peer));
      session.on('protocolError', (e: Error) => this.log(`closed the session of '${peer.name}' (${peer.role}): ${e.message}`));
      // A peer behind a cut link is noticed in seconds, so its unfinished migration is undone.
      session.keepalive(1000, 4);
      session.once('close', () => this.sessions.delete(session));
    });
    const server = door(secure, { closed: (kind, line) => this.refusals.note(kind, line) });
    secure.on('tlsClientError', (e) => this.refusals.note(e.message, `refused a peer: ${e.message}`));
    await new Promise<void>((resolve, reject) => {
      server.once('error', (e: NodeJS.ErrnoException) =>
        reject(new FerryError('CONFIG', `cannot listen on ${this.o.listen}: ${e.code === 'EADDRINUSE' ? 'address in use' : e.message}`, { hint: 'pick another --listen address or stop what holds it' })),
      );
      server.listen(port, host, () => resolve());
    });
    this.server = server;
    this.log(`agent ${this.o.name} listening on ${host}:${(server.address() as { port: number }).port}`);
    return { port: (server.address() as { port: number }).port };
  }

  /** Stops accepting; running tasks keep running. */
  async close(): Promise<void> {
    clearInterval(this.revocationTimer);
    await this.resolver.close();
    await new Promise<void>((resolve) => {
      if (!this.server) return resolve();
      this.server.close(() => resolve());
      for (const s of this.sessions.keys()) s.close();
      const t = setTimeout(() => resolve(), 5000);
      t.unref();
    });
  }

  private route(method: string, pattern: RegExp, need: Permission, handler: Handler): void {
    this.routes.push({ method, pattern, need, handler });
  }

  private async dispatch(stream: MuxStream, headers: Headers, peer: PeerIdentity): Promise<void> {
    const method = String(headers[':method']);
    const path = String(headers[':path'] ?? '').split('?')[0]!;
    let bodyRead = false;
    const body = <S extends z.ZodType>(schema: S): Promise<z.infer<S>> => {
      bodyRead = true;
      return readBody(stream).then((v) => parse(schema, v, `request body for ${method} ${path}`));
    };
    try {
      const route = this.routes.find((r) => r.method === method && r.pattern.test(path));
      if (!route) throw new FerryError('USAGE', `no such endpoint: ${method} ${path.slice(0, 200)}`);
      if (!allows(peer.role, route.need)) {
        throw new FerryError('FORBIDDEN', `'${peer.name}' has role ${peer.role}, which may not ${method} ${path.slice(0, 200)}`, { hint: 'use a certificate with the role this needs (`ferry cert issue --role`)' });
      }
      const params = route.pattern.exec(path)!.slice(1);
      await route.handler({ stream, params, headers, peer, body });
    } catch (e) {
      // Expected failures go back to the peer; anything else is a bug and is logged with its stack.
      const err = e instanceof FerryError ? e : (ioError(e, this.o.name) ?? new FerryError('PEER', `agent ${this.o.name}: internal error: ${(e as Error).message}`));
      if (!(e instanceof FerryError) && err.code !== 'IO') this.log(`internal error on ${method} ${path}: ${(e as Error).stack}`);
      else if (peer.role === 'agent' || err.code === 'FORBIDDEN') this.log(`refused ${method} ${path.slice(0, 200)} from '${peer.name}': ${err.message}`);
      if (stream.destroyed || stream.closed) return;
      if (!stream.headersSent) stream.respond(jsonHeaders(httpStatus(err.code)));
      stream.end(JSON.stringify({ error: err.toJSON() }));
      // What the peer still sends on this stream is not wanted.
      if (!bodyRead) stream.resume();
    }
  }

  private defineRoutes(): void {
    const rt = this.o.runtime;
    const reply = (stream: MuxStream, value: unknown) => {
      stream.respond(jsonHeaders(200));
      stream.end(JSON.stringify(value ?? {}));
    };
    // Path parameters are checked as they came, never decoded: '..%2F' is simply not a name.
    const NAME = '([^/]+)';
    const name = (r: Request) => parse(taskName, r.params[0], 'task name');
    const id = (r: Request) => parse(migrationId, r.params[0], 'migration id');
    const task = (suffix = '') => new RegExp(`^/v1/tasks/${NAME}${suffix}$`);
    const incoming = (suffix: string) => new RegExp(`^/v1/incoming/${NAME}${suffix}$`);

    const capacity = this.o.capacity ?? { memBytes: totalmem(), cpus: availableParallelism() };
    this.route('GET', /^\/v1\/info$/, 'info', async (r) => reply(r.stream, { name: this.o.name, criu: (await rt.criu.version()).text, capacity, peer: { name: r.peer.name, role: r.peer.role } }));
    this.route('GET', /^\/v1\/tasks$/, 'read', async (r) => reply(r.stream, await this.dest.annotate(await rt.listLive())));
    this.route('POST', /^\/v1\/tasks$/, 'operate', async (r) => reply(r.stream, await rt.run(await r.body(runBody))));
    this.route('GET', task(), 'read', async (r) => reply(r.stream, await this.dest.annotate(await rt.getLive(name(r)))));
    this.route('GET', task('/logs'), 'read', async (r) => {
      const n = name(r);
      await rt.get(n);
      r.stream.respond({ ':status': 200, 'content-type': 'text/plain' });
      await rt.logs(n, r.stream);
      r.stream.end();
    });
    this.route('POST', task('/stop'), 'operate', async (r) => {
      const b = await r.body(stopBody);
      reply(r.stream, await rt.stop(name(r), { graceMs: b.graceMs ?? 10_000 }));
    });
    this.route('POST', task('/kill'), 'operate', async (r) => {
      const b = await r.body(killBody);
      reply(r.stream, await rt.kill(name(r), b.signal as NodeJS.Signals, b.pid !== undefined ? { pid: b.pid } : {}));
    });
    // A restored copy whose source host is gone for good: the operator decides in its place.
    this.route('POST', task('/settle'), 'operate', async (r) => {
      const b = await r.body(settleBody);
      reply(r.stream, await this.dest.settleByHand(name(r), b.outcome, !!b.dryRun));
    });
    this.route('DELETE', task(), 'operate', async (r) => {
      await rt.remove(name(r), { force: r.headers['x-ferry-force'] === '1' });
      reply(r.stream, {});
    });
    this.route('POST', task('/checkpoint'), 'operate', async (r) => {
      const b = await r.body(checkpointBody);
      await this.dest.untilFilled(name(r));
      reply(r.stream, await rt.checkpoint(name(r), { leaveRunning: !!b.leaveRunning }));
    });
    this.route('POST', task('/restore'), 'operate', async (r) => reply(r.stream, await rt.restore(name(r))));
    this.route('GET', /^\/v1\/history$/, 'read', async (r) => {
      const text = await readFile(this.historyFile, 'utf8').catch(() => '');
      reply(r.stream, text.split('\n').filter(Boolean).map((l) => JSON.parse(l) as unknown));
    });

    // Migration out: progress as JSON lines, the report last.
    this.route('POST', task('/migrate'), 'operate', async (r) => {
      const n = name(r);
      const b = await r.body(migrateBody);
      const mode = b.mode ?? 'auto';
      await rt.get(n);
      const s = r.stream;
      const ac = new AbortController();
      // The client went away (Ctrl-C, a killed CLI): cancel, unless past the point of no return,
      // or unless it asked the migration to carry on without it (the controller does).
      s.once('close', () => {
        if (!s.writableEnded && !b.detach) ac.abort(new FerryError('ABORTED', 'the client went away'));
      });
      let started = false;
      const send = (v: unknown) => {
        if (s.destroyed) return; // a detached migration whose client left
        if (!started) {
          s.respond({ ':status': 200, 'content-type': 'application/x-ndjson' });
          started = true;
        }
        s.write(JSON.stringify(v) + '\n');
      };
      let report: MigrationReport;
      try {
        const { to: _to, mode: _mode, detach: _detach, ...rest } = b;
        await this.dest.untilFilled(n, ac.signal);
        report = await migrateOut(this.ctx, n, b.to, { ...rest, mode }, (e: ProgressEvent) => send({ progress: e }), ac.signal);
      } catch (e) {
        if (e instanceof FerryError && (e.code === 'MIGRATION' || e.code === 'ABORTED')) {
          await this.history({ id: migrationIdOf(e), task: n, from: this.o.name, to: b.to.name, mode, ok: false, error: e.message, at: new Date().toISOString() });
        }
        if (!started) throw e;
        send({ error: (e instanceof FerryError ? e : new FerryError('MIGRATION', (e as Error).message)).toJSON() });
        s.end();
        return;
      }
      await this.history(report);
      this.log(`migrated ${n} to ${b.to.name}: blackout ${report.blackoutMs} ms, total ${report.totalMs} ms`);
      send({ report });
      s.end();
    });
    this.route('GET', /^\/v1\/migrations$/, 'read', async (r) => {
      reply(r.stream, [...this.ctx.active.values()].map((m) => m.summary()));
    });
    // Where a migration stands: under way, being resolved after a restart, or ended (history).
    this.route('GET', /^\/v1\/migrations\/([^/]+)$/, 'read', async (r) => {
      const mid = id(r);
      const m = this.ctx.active.get(mid);
      if (m) return reply(r.stream, { ...m.summary(), state: 'running' });
      if (await this.ctx.journal.get(mid)) return reply(r.stream, { id: mid, state: 'resolving' });
      const text = await readFile(this.historyFile, 'utf8').catch(() => '');
      const done = text
        .split('\n')
        .filter(Boolean)
        .map((l) => JSON.parse(l) as { id?: string; ok?: boolean; from?: string; to?: string; error?: string; task?: string })
        .reverse()
        .find((h) => h.id === mid);
      if (!done) throw new FerryError('TASK_NOT_FOUND', `no migration ${mid} is known on ${this.o.name}`);
      reply(r.stream, { id: mid, state: 'done', ok: !!done.ok, task: done.task, where: done.ok ? done.to : done.from, error: done.error });
    });
    this.route('POST', /^\/v1\/migrations\/([^/]+)\/cancel$/, 'operate', async (r) => {
      const m = this.ctx.active.get(id(r));
      if (!m) throw new FerryError('TASK_NOT_FOUND', `no migration ${r.params[0]} is under way on ${this.o.name}`, { hint: 'see `ferry migrations` for those under way' });
      const res = m.cancel(new FerryError('ABORTED', `cancelled by '${r.peer.name}'`));
      if (!res.cancelled) throw new FerryError('TASK_STATE', res.message);
      reply(r.stream, res);
    });

    // Migration in (agent to agent). The source is the peer's certificate, not what it claims.
    this.route('POST', /^\/v1\/incoming$/, 'migrate-in', async (r) => {
      const req = await r.body(prepareBody);
      if (req.from !== r.peer.name) throw new FerryError('FORBIDDEN', `the peer '${r.peer.name}' claims to be '${req.from}'`);
      reply(r.stream, await this.dest.prepare(req, r.stream.session));
    });
    const own = (r: Request) => {
      const m = this.dest.get(id(r));
      if (m.req.from !== r.peer.name) throw new FerryError('FORBIDDEN', `migration ${m.id} is not from '${r.peer.name}'`);
      return m.id;
    };
    this.route('POST', incoming('/pages'), 'migrate-in', async (r) => this.dest.pages(own(r), r.stream, streamCodec(r.headers[CODEC_HEADER])));
    this.route('POST', incoming('/precopy'), 'migrate-in', async (r) => this.dest.precopy(own(r), r.stream, streamCodec(r.headers[CODEC_HEADER])));
    // The lazy-pages link; after a cut the source reattaches with what it has received so far.
    this.route('POST', incoming('/lazy'), 'migrate-in', async (r) => {
      const received = Number(r.headers['x-ferry-received'] ?? 0);
      if (!Number.isSafeInteger(received) || received < 0) throw new FerryError('USAGE', 'x-ferry-received must be a byte count');
      this.dest.lazyStream(id(r), r.stream, received, r.peer.name);
    });
    this.route('PUT', incoming('/images'), 'migrate-in', async (r) => {
      await this.dest.images(own(r), r.stream);
      reply(r.stream, {});
    });
    this.route('POST', incoming('/rsync'), 'migrate-in', async (r) => {
      let args: unknown;
      try {
        args = JSON.parse(String(r.headers['x-ferry-rsync'] ?? ''));
      } catch {
        args = undefined;
      }
      await this.dest.rsync(own(r), args, r.stream);
    });
    this.route('POST', incoming('/restore'), 'migrate-in', async (r) => {
      const b = await r.body(incomingRestoreBody);
      reply(r.stream, await this.dest.restore(own(r), { lazy: !!b.lazy, pagesThere: !!b.pagesThere }));
    });
    // The decision may come from a later session (the source retries it), so it is checked
    // against what the destination recorded, in memory or on disk.
    this.route('POST', incoming('/commit'), 'migrate-in', async (r) => {
      await r.body(emptyBody);
      reply(r.stream, await this.dest.commit(id(r), r.peer.name));
    });
    this.route('POST', incoming('/abort'), 'migrate-in', async (r) => {
      const b = await r.body(abortBody);
      await this.dest.abort(id(r), r.peer.name, b.sourceRuns === true);
      reply(r.stream, {});
    });
  }

  private async history(entry: unknown): Promise<void> {
    await appendFile(this.historyFile, JSON.stringify(entry) + '\n');
  }
}

/** A request body: JSON of at most MAX_BODY bytes. */
async function readBody(stream: MuxStream): Promise<unknown> {
  const [, text] = await readAll(stream, undefined, MAX_BODY);
  try {
    return text ? (JSON.parse(text) as unknown) : {};
  } catch {
    throw new FerryError('USAGE', 'request body is not JSON');
  }
}

/** The id a failed migration's error carries, when it got that far. */
function migrationIdOf(e: FerryError): string | undefined {
  const d = e.details.find((x) => x.startsWith('migration id: '));
  return d?.slice('migration id: '.length);
}
