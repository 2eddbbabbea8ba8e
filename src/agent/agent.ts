// `ferry agent`: owns the tasks of its host and serves one TLS port with mutual authentication,
// for the CLI and for other agents. Shutting it down leaves tasks running: each task's shim, not
// the agent, is its parent.
import { appendFile, readFile, rm } from 'node:fs/promises';
import tls from 'node:tls';
import { join } from 'node:path';
import { FerryError } from '../errors.js';
import { Destination, type PrepareRequest } from '../migrate/destination.js';
import { migrateOut, outgoingDir, type MigrationReport, type ProgressEvent } from '../migrate/source.js';
import type { Runtime } from '../runtime/runtime.js';
import type { LoadedTls } from '../tls/pki.js';
import { MuxSession, type Headers, type MuxStream } from '../wire/mux.js';
import { jsonHeaders, parseAddress, serverOptions } from '../wire/session.js';

export interface AgentOptions {
  name: string;
  listen: string;
  tls: LoadedTls;
  runtime: Runtime;
  log?: (line: string) => void;
}

type Handler = (stream: MuxStream, params: string[], headers: Headers, body: () => Promise<unknown>) => Promise<void>;

export class Agent {
  private server?: tls.Server;
  private readonly sessions = new Set<MuxSession>();
  private readonly dest: Destination;
  private readonly routes: Array<[string, RegExp, Handler, boolean]> = [];
  readonly historyFile: string;

  constructor(private readonly o: AgentOptions) {
    this.historyFile = join(o.runtime.stateDir, 'history.jsonl');
    this.dest = new Destination(o.runtime, (e) => this.log(JSON.stringify(e)));
    this.defineRoutes();
  }

  private log(line: string): void {
    this.o.log?.(`${new Date().toISOString()} ${line}`);
  }

  async start(): Promise<{ port: number }> {
    await this.o.runtime.store.init();
    const swept = await this.dest.sweep();
    if (swept.length) this.log(`removed unfinished incoming migrations: ${swept.join(', ')}`);
    // Outgoing work of an agent that died: CRIU's hold has timed out and resumed those tasks.
    await rm(outgoingDir(this.o.runtime.stateDir), { recursive: true, force: true });
    const { host, port } = parseAddress(this.o.listen);
    const server = tls.createServer(serverOptions(this.o.tls), (socket) => {
      const session = new MuxSession(socket, false);
      this.sessions.add(session);
      session.on('stream', (stream: MuxStream, headers: Headers) => void this.dispatch(stream, headers));
      // A peer behind a cut link is noticed in seconds, so its unfinished migration is undone.
      let missed = 0;
      const t = setInterval(() => {
        session.ping((err) => {
          if (!err) missed = 0;
        });
        if (++missed > 4) session.destroy(new Error('peer stopped answering'));
      }, 1000);
      t.unref();
      session.once('close', () => {
        clearInterval(t);
        this.sessions.delete(session);
      });
    });
    server.on('tlsClientError', (e) => this.log(`refused a peer: ${e.message}`));
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
  close(): Promise<void> {
    return new Promise((resolve) => {
      if (!this.server) return resolve();
      this.server.close(() => resolve());
      for (const s of this.sessions) s.close();
      const t = setTimeout(() => resolve(), 5000);
      t.unref();
    });
  }

  private route(method: string, pattern: RegExp, h: Handler, raw = false): void {
    this.routes.push([method, pattern, h, raw]);
  }

  private async dispatch(stream: MuxStream, headers: Headers): Promise<void> {
    stream.on('error', () => {});
    const method = String(headers[':method']);
    const path = String(headers[':path']).split('?')[0]!;
    // Not `for await`: ending the iteration would destroy the duplex before we answer.
    const body = () =>
      new Promise<unknown>((resolve, reject) => {
        let text = '';
        stream.setEncoding('utf8');
        stream.on('data', (c: string) => (text += c));
        stream.once('end', () => {
          try {
            resolve(text ? JSON.parse(text) : {});
          } catch {
            reject(new FerryError('PEER', `malformed request body for ${method} ${path}`));
          }
        });
        stream.once('error', reject);
      });
    try {
      for (const [m, re, h] of this.routes) {
        const match = m === method ? re.exec(path) : null;
        if (match) {
          await h(stream, match.slice(1).map(decodeURIComponent), headers, body);
          return;
        }
      }
      throw new FerryError('USAGE', `no such endpoint: ${method} ${path}`);
    } catch (e) {
      const err = e instanceof FerryError ? e : new FerryError('PEER', `agent ${this.o.name}: ${(e as Error).message}`);
      if (!(e instanceof FerryError)) this.log(`internal error on ${method} ${path}: ${(e as Error).stack}`);
      if (stream.destroyed || stream.closed) return;
      if (!stream.headersSent) stream.respond(jsonHeaders(statusFor(err.code)));
      stream.end(JSON.stringify({ error: err.toJSON() }));
    }
  }

  private defineRoutes(): void {
    const rt = this.o.runtime;
    const reply = (stream: MuxStream, value: unknown) => {
      stream.respond(jsonHeaders(200));
      stream.end(JSON.stringify(value ?? {}));
    };
    this.route('GET', /^\/v1\/info$/, async (s) => reply(s, { name: this.o.name, criu: (await rt.criu.version()).text }));
    this.route('GET', /^\/v1\/tasks$/, async (s) => reply(s, await rt.list()));
    this.route('POST', /^\/v1\/tasks$/, async (s, _p, _h, body) => {
      const b = (await body()) as { name?: string; command: string[]; cwd?: string; env?: Record<string, string> };
      reply(s, await rt.run(b));
    });
    this.route('GET', /^\/v1\/tasks\/([^/]+)$/, async (s, [n]) => reply(s, await rt.get(n!)));
    this.route('GET', /^\/v1\/tasks\/([^/]+)\/logs$/, async (s, [n]) => {
      await rt.get(n!);
      s.respond({ ':status': 200, 'content-type': 'text/plain' });
      await rt.logs(n!, s);
      s.end();
    });
    this.route('POST', /^\/v1\/tasks\/([^/]+)\/stop$/, async (s, [n], _h, body) => {
      const b = (await body()) as { graceMs?: number };
      reply(s, await rt.stop(n!, { graceMs: b.graceMs ?? 10_000 }));
    });
    this.route('DELETE', /^\/v1\/tasks\/([^/]+)$/, async (s, [n], h) => {
      await rt.remove(n!, { force: h['x-ferry-force'] === '1' });
      reply(s, {});
    });
    this.route('POST', /^\/v1\/tasks\/([^/]+)\/checkpoint$/, async (s, [n], _h, body) => {
      const b = (await body()) as { leaveRunning?: boolean };
      reply(s, await rt.checkpoint(n!, { leaveRunning: !!b.leaveRunning }));
    });
    this.route('POST', /^\/v1\/tasks\/([^/]+)\/restore$/, async (s, [n]) => reply(s, await rt.restore(n!)));
    this.route('GET', /^\/v1\/history$/, async (s) => {
      const text = await readFile(this.historyFile, 'utf8').catch(() => '');
      reply(s, text.split('\n').filter(Boolean).map((l) => JSON.parse(l) as unknown));
    });

    // Migration out: progress as JSON lines, the report last.
    this.route('POST', /^\/v1\/tasks\/([^/]+)\/migrate$/, async (s, [n], _h, body) => {
      const b = (await body()) as { to: { name: string; address: string }; mode?: 'stop-copy' | 'post-copy' };
      const mode = b.mode ?? 'stop-copy';
      if (mode !== 'stop-copy' && mode !== 'post-copy') throw new FerryError('USAGE', `unknown migration mode '${String(mode)}': use stop-copy or post-copy`);
      await rt.get(n!);
      const ac = new AbortController();
      s.once('close', () => {
        if (!s.writableEnded) ac.abort(new FerryError('ABORTED', 'the client went away'));
      });
      let started = false;
      const send = (v: unknown) => {
        if (!started) {
          s.respond({ ':status': 200, 'content-type': 'application/x-ndjson' });
          started = true;
        }
        if (!s.destroyed) s.write(JSON.stringify(v) + '\n');
      };
      let report: MigrationReport;
      try {
        report = await migrateOut({ rt, tls: this.o.tls, self: this.o.name }, n!, b.to, mode, (e: ProgressEvent) => send({ progress: e }), ac.signal);
      } catch (e) {
        if (e instanceof FerryError && e.code === 'MIGRATION') {
          await this.history({ task: n, from: this.o.name, to: b.to.name, mode, ok: false, error: e.message, at: new Date().toISOString() });
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

    // Migration in (agent to agent).
    this.route('POST', /^\/v1\/incoming$/, async (s, _p, _h, body) => {
      const req = (await body()) as PrepareRequest;
      reply(s, await this.dest.prepare(req, s.session));
    });
    this.route('POST', /^\/v1\/incoming\/([^/]+)\/pages$/, async (s, [id]) => this.dest.pages(id!, s));
    this.route('POST', /^\/v1\/incoming\/([^/]+)\/lazy$/, async (s, [id]) => this.dest.lazyStream(id!, s));
    this.route('PUT', /^\/v1\/incoming\/([^/]+)\/images\/([^/]+)$/, async (s, [id, file]) => {
      await this.dest.image(id!, file!, s);
      reply(s, {});
    });
    this.route('POST', /^\/v1\/incoming\/([^/]+)\/rsync$/, async (s, [id], h) => {
      const args = JSON.parse(String(h['x-ferry-rsync'] ?? '[]')) as string[];
      await this.dest.rsync(id!, args, s);
    });
    this.route('POST', /^\/v1\/incoming\/([^/]+)\/restore$/, async (s, [id], _h, body) => {
      const b = (await body()) as { lazy?: boolean };
      reply(s, await this.dest.restore(id!, { lazy: !!b.lazy }));
    });
    this.route('POST', /^\/v1\/incoming\/([^/]+)\/commit$/, async (s, [id]) => {
      this.dest.commit(id!);
      reply(s, {});
    });
    this.route('POST', /^\/v1\/incoming\/([^/]+)\/abort$/, async (s, [id]) => {
      await this.dest.abort(id!);
      reply(s, {});
    });
  }

  private async history(entry: unknown): Promise<void> {
    await appendFile(this.historyFile, JSON.stringify(entry) + '\n');
  }
}

function statusFor(code: string): number {
  switch (code) {
    case 'USAGE':
      return 400;
    case 'TASK_NOT_FOUND':
    case 'HOST_UNKNOWN':
      return 404;
    case 'TASK_EXISTS':
    case 'TASK_STATE':
    case 'TASK_BUSY':
      return 409;
    case 'PRECHECK':
      return 412;
    default:
      return 500;
  }
}
