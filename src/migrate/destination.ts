// The destination side of a migration, inside the receiving agent: pre-checks, a CRIU page
// server or lazy-pages daemon behind the session's streams, the images, rsync, the restore, and
// removal of everything received when the source aborts or goes away before the task runs here.
import { spawn } from 'node:child_process';
import { existsSync, createWriteStream } from 'node:fs';
import { mkdir, readFile, readdir, rm, statfs, writeFile } from 'node:fs/promises';
import type { MuxSession, MuxStream } from '../wire/session.js';
import { join } from 'node:path';
import type { Socket } from 'node:net';
import { Duplex } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { ServerHandle } from '../criu/driver.js';
import { FerryError } from '../errors.js';
import type { Runtime } from '../runtime/runtime.js';
import { validateName, type TaskRecord } from '../runtime/task-store.js';
import { isAlive, sleep } from '../util/proc.js';
import { connectWhenListening, freeLocalPort, listenLocal, splice } from './tunnel.js';

export type Mode = 'stop-copy' | 'post-copy';

export interface PrepareRequest {
  id: string;
  from: string;
  task: TaskRecord;
  mode: Mode;
  /** criu cpuinfo image of the source, base64. */
  cpuinfo: string;
  memBytes: number;
  diskBytes: number;
}

interface Incoming {
  id: string;
  req: PrepareRequest;
  session: MuxSession;
  dir: string;
  imagesDir: string;
  pageServer?: ServerHandle;
  pageServerPort?: number;
  lazy?: { daemon: ServerHandle; close: () => void };
  /** The two ends of the lazy-pages link; spliced when both exist. */
  lazyStream?: MuxStream;
  lazySock?: Socket;
  restored?: TaskRecord;
  /** Set while CRIU restores here: an abort waits for it rather than pull files from under it. */
  restoring?: Promise<unknown>;
  committed: boolean;
}

export class Destination {
  private readonly incoming = new Map<string, Incoming>();

  constructor(private readonly rt: Runtime, private readonly onEvent: (e: Record<string, unknown>) => void = () => {}) {}

  /** Leftovers of migrations that were never finished (the agent died mid-transfer). */
  async sweep(): Promise<string[]> {
    const removed: string[] = [];
    let names: string[] = [];
    try {
      names = await readdir(this.rt.store.tasksDir);
    } catch {
      return removed;
    }
    for (const n of names) {
      const dir = this.rt.store.dir(n);
      if (existsSync(join(dir, 'incoming.json')) && !existsSync(join(dir, 'task.json'))) {
        await rm(dir, { recursive: true, force: true });
        removed.push(n);
      }
    }
    return removed;
  }

  get(id: string): Incoming {
    const m = this.incoming.get(id);
    if (!m) throw new FerryError('PEER', `no incoming migration ${id} on this host`);
    return m;
  }

  async prepare(req: PrepareRequest, session: MuxSession): Promise<{ freeMemBytes: number; freeDiskBytes: number }> {
    const name = req.task.name;
    validateName(name);
    const criu = this.rt.criu;
    await criu.ensureUsable().catch((e: FerryError) => {
      throw new FerryError('PRECHECK', `destination: ${e.message}`, { hint: e.hint ?? 'run scripts/bootstrap.sh there' });
    });
    const check = await criu.check();
    if (!check.ok) throw new FerryError('PRECHECK', `destination: criu check fails: ${check.output.split('\n').pop()}`, { hint: 'run `ferry doctor` on the destination' });
    await this.rt.store.init();
    const dir = this.rt.store.dir(name);
    if (existsSync(dir)) {
      throw new FerryError('PRECHECK', `destination already has a task named '${name}'`, { hint: 'remove it there, or migrate to another host' });
    }
    const free = await freeResources(this.rt.stateDir);
    const needMem = Math.ceil(req.memBytes * 1.1) + (64 << 20);
    if (free.memBytes < needMem) {
      throw new FerryError('PRECHECK', `destination has ${mib(free.memBytes)} MiB of memory available, the task needs ${mib(needMem)} MiB`, { hint: 'free memory there or pick another host' });
    }
    const needDisk = req.diskBytes + (req.mode === 'stop-copy' ? req.memBytes : 0);
    if (free.diskBytes < needDisk) {
      throw new FerryError('PRECHECK', `destination has ${mib(free.diskBytes)} MiB of disk free in ${this.rt.stateDir}, the task needs ${mib(needDisk)} MiB`, { hint: 'free disk there or pick another host' });
    }
    const imagesDir = this.rt.store.imagesDir(name);
    await mkdir(imagesDir, { recursive: true, mode: 0o700 });
    await writeFile(join(dir, 'incoming.json'), JSON.stringify({ id: req.id, from: req.from }));
    const m: Incoming = { id: req.id, req, session, dir, imagesDir, committed: false };
    this.incoming.set(req.id, m);
    try {
      await writeFile(join(imagesDir, 'cpuinfo.img'), Buffer.from(req.cpuinfo, 'base64'));
      await criu.cpuinfoCheck(imagesDir);
      if (req.mode === 'stop-copy') {
        const port = await freeLocalPort();
        m.pageServerPort = port;
        m.pageServer = criu.pageServer({ imagesDir, address: '127.0.0.1', port });
      }
    } catch (e) {
      await this.abort(req.id);
      throw e;
    }
    session.once('close', () => {
      // The source went away: what has not started running here is removed. A task that is
      // being restored or runs here is kept: the source may already have let go of its copy.
      if (this.incoming.get(req.id) === m && !m.restored && !m.restoring) void this.abort(req.id);
    });
    this.onEvent({ event: 'incoming', id: req.id, task: name, from: req.from, mode: req.mode });
    return { freeMemBytes: free.memBytes, freeDiskBytes: free.diskBytes };
  }

  /** The page stream of a stop-copy dump, handed to the local `criu page-server`. */
  async pages(id: string, stream: MuxStream): Promise<void> {
    const m = this.get(id);
    if (!m.pageServer || !m.pageServerPort) throw new FerryError('PEER', 'this migration has no page server');
    const server = m.pageServer;
    const sock = await connectWhenListening(m.pageServerPort, 10_000, () => server.child.exitCode === null);
    stream.respond({ ':status': 200 });
    await splice(stream, sock);
  }

  /** The lazy-pages link: held until the local lazy-pages daemon connects. */
  lazyStream(id: string, stream: MuxStream): void {
    const m = this.get(id);
    stream.respond({ ':status': 200 });
    m.lazyStream = stream;
    pairLazy(m);
  }

  async image(id: string, file: string, stream: MuxStream): Promise<void> {
    const m = this.get(id);
    if (!/^[A-Za-z0-9_.-]+$/.test(file) || file.startsWith('.')) throw new FerryError('PEER', `refusing image name '${file}'`);
    await pipeline(stream, createWriteStream(join(m.imagesDir, file), { mode: 0o600 }));
  }

  /** Runs `rsync --server` into the task's directory, speaking through the stream. */
  async rsync(id: string, args: string[], stream: MuxStream): Promise<void> {
    const m = this.get(id);
    if (args[0] !== 'rsync' || args[1] !== '--server' || args.includes('--sender') || args.some((a) => a.includes('\0'))) {
      throw new FerryError('PEER', 'refusing an rsync command that is not a receiving server');
    }
    // The target is always this task's directory, whatever the sender named.
    const serverArgs = [...args.slice(1, -1), `${m.dir}/`];
    const child = spawn('rsync', serverArgs, { stdio: ['pipe', 'pipe', 'inherit'] });
    stream.respond({ ':status': 200 });
    const duplex = Duplex.from({ readable: child.stdout, writable: child.stdin });
    await splice(stream, duplex);
    await new Promise((r) => (child.exitCode !== null ? r(null) : child.once('close', r)));
  }

  async restore(id: string, opts: { lazy: boolean }): Promise<{ pid: number; restoreMs: number; pageWaitMs: number }> {
    const m = this.get(id);
    const started = performance.now();
    if (m.pageServer) {
      // The page server exits once the source's dump closed the page stream.
      const done = await Promise.race([m.pageServer.wait().then(() => true), sleep(30_000).then(() => false)]);
      if (!done) throw new FerryError('TIMEOUT', 'the destination page server did not finish receiving pages');
    }
    const pageWaitMs = Math.round(performance.now() - started);
    if (opts.lazy) await this.startLazyDaemon(m);
    const rec: TaskRecord = { ...m.req.task, state: 'checkpointed', origin: m.req.from };
    delete rec.pid;
    delete rec.pidStart;
    delete rec.shimPid;
    delete rec.shimStart;
    delete rec.exit;
    const restoring = this.rt.restoreFrom(rec, m.imagesDir, { lazyPages: opts.lazy });
    m.restoring = restoring.catch(() => {
      // Failed with nobody left to tell us to clean up.
      if (m.session.destroyed) setImmediate(() => void this.abort(id));
    });
    const restored = await restoring;
    m.restored = restored;
    await rm(join(m.dir, 'incoming.json'), { force: true });
    return { pid: restored.pid!, restoreMs: Math.round(performance.now() - started) - pageWaitMs, pageWaitMs };
  }

  private async startLazyDaemon(m: Incoming): Promise<void> {
    const local = await listenLocal((sock) => {
      m.lazySock = sock;
      pairLazy(m);
    });
    const daemon = this.rt.criu.lazyPages({ imagesDir: m.imagesDir, address: '127.0.0.1', port: local.port });
    m.lazy = { daemon, close: () => local.server.close() };
    daemon.exited.then(() => local.server.close());
    // The restore talks to the daemon through this socket; wait until it exists.
    const sockPath = join(m.imagesDir, 'lazy-pages.socket');
    const end = Date.now() + 10_000;
    while (!existsSync(sockPath)) {
      if (daemon.child.exitCode !== null || Date.now() > end) {
        await daemon.wait();
        throw new FerryError('CRIU_FAILED', 'criu lazy-pages did not start on the destination');
      }
      await sleep(5);
    }
  }

  commit(id: string): void {
    const m = this.get(id);
    m.committed = true;
    this.incoming.delete(id);
    this.onEvent({ event: 'arrived', id, task: m.req.task.name, from: m.req.from, pid: m.restored?.pid });
  }

  /** Removes everything this migration brought here; kills a restored copy the source disowned. */
  async abort(id: string): Promise<void> {
    const m = this.incoming.get(id);
    if (!m || m.committed) return;
    this.incoming.delete(id);
    m.pageServer?.stop();
    m.lazy?.daemon.stop();
    m.lazy?.close();
    m.lazyStream?.destroy();
    m.lazySock?.destroy();
    await m.restoring;
    const r = m.restored;
    if (r?.pid && isAlive(r.pid, r.pidStart)) {
      try {
        process.kill(r.pid, 'SIGKILL');
      } catch {
        /* gone */
      }
      for (let i = 0; i < 100 && isAlive(r.pid, r.pidStart); i++) await sleep(20);
    }
    await m.pageServer?.exited;
    await rm(m.dir, { recursive: true, force: true });
    this.onEvent({ event: 'aborted', id, task: m.req.task.name, from: m.req.from });
  }
}

function pairLazy(m: Incoming): void {
  if (m.lazyStream && m.lazySock) void splice(m.lazyStream, m.lazySock);
}

async function freeResources(dir: string): Promise<{ memBytes: number; diskBytes: number }> {
  const meminfo = await readFile('/proc/meminfo', 'utf8');
  const avail = Number(/MemAvailable:\s+(\d+) kB/.exec(meminfo)?.[1] ?? 0) * 1024;
  const fs = await statfs(dir);
  return { memBytes: avail, diskBytes: fs.bavail * fs.bsize };
}

function mib(n: number): number {
  return Math.round(n / (1 << 20));
}
