// The task runtime of one host: start tasks under a shim in their own namespaces, stop them,
// checkpoint them to images and restore them. The CLI uses it directly on a host; the agent uses
// it for migrations.
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { constants, createReadStream, existsSync, readFileSync, rmSync } from 'node:fs';
import { access, mkdir, open, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { delimiter, isAbsolute, join, resolve } from 'node:path';
import { Criu } from '../criu/driver.js';
import { dumpSlot } from '../criu/dump-slot.js';
import { hintFor, readErrorLines } from '../criu/log.js';
import { readRestoreStats } from '../criu/stats.js';
import { FerryError } from '../errors.js';
import { isAlive, nsPid, sleep, startTime, treePids } from '../util/proc.js';
import { dumpBlocker } from '../criu/blockers.js';
import { attach, createTaskNet, detach, pickAddress, publish, unpublish, criuDumpNetArgs, criuRestoreNetArgs, destroyTaskNet, inPool, lock, netnsInode, netnsPath, prepareHost, unlock, type NetConfig } from '../net/tasknet.js';
import { dumpMountArgs, removeRestoreYard, restoreMountArgs } from './mounts.js';
import { TCP_MARKER, hostNetArgs, lockConnections, markedConnections, tcpConnections, unlockConnections, type TcpEnds } from '../net/tcp.js';
import { Scratch } from './scratch.js';
import type { TaskSignal } from '../wire/schemas.js';
import { TaskStore, validateName, type Publish, type TaskRecord, describeState } from './task-store.js';

function notKilled(rec: TaskRecord): never {
  throw new FerryError('TIMEOUT', `task '${rec.name}' (pid ${rec.pid}) did not exit after SIGKILL`);
}

export interface RunSpec {
  name?: string;
  command: string[];
  cwd?: string;
  env?: Record<string, string>;
  /** Its own network namespace: this address, or the lowest free one of the pool not in avoid. */
  net?: { address?: string; avoid?: string[]; publish?: Publish[] };
}

const INVENTORY_MAGIC = 0x58313116;
/** No CRIU run may hang a task for ever: a dump or restore still running after this is killed. */
export const CRIU_TIMEOUT_MS = 10 * 60_000;

/** In a task's directory while its own TCP connections are held still (see Runtime.holdTcp). */
const TCP_HELD = 'tcp-held';
const DEFAULT_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

export interface RestoreOptions {
  lazyPages?: boolean;
  leaveStopped?: boolean;
  /** CRIU's restore is done: called before the records are written. */
  onRestored?: () => void;
}

export class Runtime {
  readonly store: TaskStore;

  constructor(
    readonly stateDir: string,
    readonly criu: Criu,
    readonly nativeDir: string,
    /** Set when this host gives tasks their own address (agent --net-pool/--net-uplink). */
    readonly netConfig?: NetConfig,
    /** Where migrations keep CRIU's images while they run (see scratch.ts). */
    scratchDir = '/run/ferry',
  ) {
    this.store = new TaskStore(stateDir, new Scratch(scratchDir));
  }

  get garpPath(): string {
    return join(this.nativeDir, 'ferry-garp');
  }

  /** The host can give tasks an address from the pool; says how to fix it when not. */
  requireNet(address?: string): NetConfig {
    const cfg = this.netConfig;
    if (!cfg) throw new FerryError('NET_UNCONFIGURED', 'this host has no address pool for tasks with their own network', { hint: 'start the agent with --net-pool CIDR --net-uplink IFACE' });
    if (address !== undefined && !inPool(cfg.pool, address)) throw new FerryError('USAGE', `address ${address} is not in this host's pool ${cfg.pool}`, { hint: `pick an address in ${cfg.pool}, or leave it to Ferry (--net without an address)` });
    return cfg;
  }

  /** Addresses of this host's tasks (also stopped ones: they keep theirs until removed). */
  async usedAddresses(): Promise<string[]> {
    return (await this.store.list()).flatMap((t) => (t.net ? [t.net.address] : []));
  }

  /** The task runs here: its address routes here and its namespace is open. Idempotent. */
  async netHere(rec: TaskRecord): Promise<void> {
    await this.releaseTcp(rec.name);
    if (!rec.net || !this.netConfig) return;
    await prepareHost(this.netConfig);
    await attach(this.netConfig, rec.name, rec.net.address, this.garpPath);
    await publish(rec.name, rec.net.address, rec.net.publish ?? []);
    await unlock(netnsPath(this.stateDir, rec.name));
  }

  /** The task's own connections held still (see src/net/tcp.ts), recorded so that any path lets go. */
  async holdTcp(name: string, conns: TcpEnds[]): Promise<void> {
    if (!conns.length) return;
    await writeFile(join(this.store.dir(name), TCP_HELD), '');
    await lockConnections(name, conns);
  }

  /**
   * A task in its host's network keeps the connections between its own sockets (they move with
   * it, held still from now until releaseTcp); any other connection makes them all close, as
   * before. The images' marker names the connections for the restore's lock.
   */
  async hostTcpArgs(rec: TaskRecord, imagesDir: string): Promise<string[]> {
    const { kind, ends } = tcpConnections(rec.pid!);
    if (kind !== 'external') await writeFile(join(imagesDir, TCP_MARKER), JSON.stringify(ends));
    await this.holdTcp(rec.name, ends);
    return hostNetArgs(kind);
  }

  /** The task runs again, or is gone: its connections flow. Nothing to do when none were held. */
  async releaseTcp(name: string): Promise<void> {
    const held = join(this.store.dir(name), TCP_HELD);
    if (!existsSync(held)) return;
    await unlockConnections(name);
    await rm(held, { force: true });
  }

  /** The task is about to run elsewhere: this host stops answering for its address. */
  async netAway(rec: TaskRecord): Promise<void> {
    if (!rec.net) return;
    await unpublish(rec.name);
    await detach(rec.name, rec.net.address);
  }

  /** The task left or was removed: its namespace, veth and route go. */
  async netGone(name: string, address: string | undefined): Promise<void> {
    await this.releaseTcp(name);
    if (address) await destroyTaskNet(this.stateDir, name, address);
  }

  /** The environment CRIU and the shim need for a task with its own network. */
  netEnv(rec: TaskRecord): NodeJS.ProcessEnv {
    return rec.net ? { FERRY_NETNS: netnsPath(this.stateDir, rec.name) } : {};
  }

  get shimPath(): string {
    return join(this.nativeDir, 'ferry-shim');
  }

  async run(spec: RunSpec): Promise<TaskRecord> {
    if (spec.command.length === 0) throw new FerryError('USAGE', 'no command given: use `ferry run [options] -- CMD ARGS...`');
    await this.store.init();
    const name = spec.name ?? `${spec.command[0]!.split('/').pop()!.replace(/[^A-Za-z0-9_.-]/g, '')}-${randomBytes(3).toString('hex')}`;
    validateName(name);
    const cwd = resolve(spec.cwd ?? process.cwd());
    if (!(await stat(cwd).catch(() => undefined))?.isDirectory()) {
      throw new FerryError('USAGE', `working directory ${cwd} does not exist`, { hint: 'pass an existing directory to --cwd' });
    }
    const env: Record<string, string> = { PATH: DEFAULT_PATH, HOME: '/root', FERRY_TASK: name, ...(spec.env ?? {}) };
    await resolveCommand(spec.command[0]!, env['PATH']!, cwd);
    await access(this.shimPath, constants.X_OK).catch(() => {
      throw new FerryError('CONFIG', `Ferry's task shim is missing at ${this.shimPath}`, { hint: 'run `npm run build` (or scripts/bootstrap.sh)' });
    });

    const dir = this.store.dir(name);
    try {
      await mkdir(dir, { mode: 0o700 });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EEXIST') {
        throw new FerryError('TASK_EXISTS', `a task named '${name}' already exists on this host`, { hint: `pick another --name or remove it with \`ferry rm ${name}\`` });
      }
      throw e;
    }
    const rec: TaskRecord = {
      name,
      command: spec.command,
      cwd,
      env: spec.env ?? {},
      createdAt: new Date().toISOString(),
      incarnation: 1,
      state: 'running',
    };
    let netMade = false;
    try {
      if (spec.net) {
        const cfg = this.requireNet(spec.net.address);
        const address = spec.net.address ?? pickAddress(cfg.pool, [...(await this.usedAddresses()), ...(spec.net.avoid ?? [])]);
        rec.net = { address, ...(spec.net.publish?.length ? { publish: spec.net.publish } : {}) };
        // Saved first, so the address counts as taken while the namespace is being made.
        await this.store.save(rec);
        const clash = netClash(rec, (await this.store.list()).filter((t) => t.name !== name));
        if (clash) throw new FerryError('NET_ADDRESS_IN_USE', clash, { hint: 'pick another address or host port, or leave the address to Ferry (--net alone)' });
        netMade = true;
        await createTaskNet(this.stateDir, name, address);
        await this.netHere(rec);
      }
      const { rootPid, shimPid } = await this.spawnShim(['run', dir, '1', name.slice(0, 63), cwd, '--', ...spec.command], { ...env, ...this.netEnv(rec) });
      rec.pid = rootPid;
      rec.pidStart = startTime(rootPid);
      rec.shimPid = shimPid;
      rec.shimStart = startTime(shimPid);
      await this.store.save(rec);
      return rec;
    } catch (e) {
      if (netMade) await destroyTaskNet(this.stateDir, name, rec.net!.address);
      await rm(dir, { recursive: true, force: true });
      throw e;
    }
  }

  /** Starts the shim and reads its one status line from fd 3. */
  private async spawnShim(args: string[], env: NodeJS.ProcessEnv, timeoutMs = CRIU_TIMEOUT_MS): Promise<{ rootPid: number; shimPid: number }> {
    return this.startShim(args, env, timeoutMs).result;
  }

  /**
   * The shim, started; with a gate (restore only) it runs CRIU once go() is called, and cancel()
   * (or this agent's end) ends it before CRIU ran.
   */
  private startShim(args: string[], env: NodeJS.ProcessEnv, timeoutMs: number, gated = false): { result: Promise<{ rootPid: number; shimPid: number }>; go: (command?: string[]) => void; cancel: () => void } {
    const child = spawn(this.shimPath, args, { stdio: ['ignore', 'ignore', 'ignore', 'pipe', ...(gated ? (['pipe'] as const) : [])], detached: true, env: gated ? { ...env, FERRY_SHIM_GATE: '1' } : env });
    const gate = gated ? (child.stdio[4] as NodeJS.WritableStream & { destroy(): void }) : undefined;
    gate?.on('error', () => {}); // a shim that ended reports why on its status pipe
    let timer: NodeJS.Timeout | undefined;
    const arm = () => {
      // The shim and what it runs (criu restore) share its process group: a hung restore goes with it.
      timer = setTimeout(() => {
        try {
          process.kill(-child.pid!, 'SIGKILL');
        } catch {
          /* gone */
        }
      }, timeoutMs);
      timer.unref();
    };
    if (!gated) arm();
    return {
      result: this.shimResult(child, () => clearTimeout(timer)),
      go: (command: string[] = []) => {
        if (!gate || timer) return;
        arm();
        // The CRIU command, each argument ended by a NUL (see native/ferry-shim.c).
        gate.end(Buffer.from(command.map((a) => `${a}\0`).join('')));
      },
      cancel: () => gate?.destroy(),
    };
  }

  private async shimResult(child: ReturnType<typeof spawn>, done: () => void): Promise<{ rootPid: number; shimPid: number }> {
    const status = child.stdio[3] as NodeJS.ReadableStream;
    let text = '';
    status.setEncoding('utf8');
    status.on('data', (c: string) => (text += c));
    const settled = await new Promise<{ line: string } | { error: Error }>((resolveP) => {
      child.once('error', (error) => resolveP({ error }));
      status.once('end', () => resolveP({ line: text.trim() }));
      status.once('close', () => resolveP({ line: text.trim() }));
    });
    done();
    child.unref();
    (status as unknown as { destroy?: () => void }).destroy?.();
    if ('error' in settled) throw new FerryError('PROGRAM_FAILED', `cannot start the task shim: ${settled.error.message}`);
    const m = /^ok (\d+)$/.exec(settled.line);
    if (!m) {
      const reason = settled.line.replace(/^err /, '') || 'it exited without a word';
      throw new FerryError('PROGRAM_FAILED', `the task shim failed: ${reason}`);
    }
    return { rootPid: Number(m[1]), shimPid: child.pid! };
  }

  async list(): Promise<TaskRecord[]> {
    return this.store.list();
  }

  async get(name: string): Promise<TaskRecord> {
    return this.store.get(name);
  }

  /** The tasks as users see them: with the main process and the process count of running ones. */
  async listLive(): Promise<TaskRecord[]> {
    return (await this.store.list()).map(withLive);
  }

  async getLive(name: string): Promise<TaskRecord> {
    return withLive(await this.store.get(name));
  }

  /** SIGTERM, then SIGKILL after the grace period. Returns the final record. */
  async stop(name: string, opts: { graceMs?: number; signal?: AbortSignal } = {}): Promise<TaskRecord> {
    return this.store.withLock(name, 'stop', async () => {
      const rec = await this.store.get(name);
      if (rec.state === 'checkpointed') {
        throw new FerryError('TASK_STATE', `task '${name}' is not running: it is checkpointed`, { hint: `restore it with \`ferry restore ${name}\` or remove it with \`ferry rm ${name}\`` });
      }
      if (rec.state === 'exited') {
        throw new FerryError('TASK_STATE', `task '${name}' is not running: it has ${describeState(rec)}`, { hint: `remove it with \`ferry rm ${name}\`` });
      }
      return this.terminate(rec, opts.graceMs ?? 10_000, opts.signal);
    });
  }

  /**
   * Sends a signal to the task through its init: KILL ends every process of it; TERM, INT and
   * QUIT reach them all; the others reach the command while it runs, then every process left (a
   * daemon it forked). KILL waits until the task has exited; the others return at once. With
   * opts.pid, any signal goes to the one process whose pid inside the task is that (as its
   * programs and pidfiles name it), and returns at once.
   */
  async kill(name: string, sig: TaskSignal | NodeJS.Signals, opts: { pid?: number; signal?: AbortSignal } = {}): Promise<TaskRecord> {
    return this.store.withLock(name, 'kill', async () => {
      const rec = await this.getLive(name);
      if (rec.state !== 'running' || rec.pid === undefined) {
        throw new FerryError('TASK_STATE', `task '${name}' is not running: it ${rec.state === 'exited' ? 'has' : 'is'} ${describeState(rec)}`, { hint: rec.state === 'checkpointed' ? `restore it with \`ferry restore ${name}\` first` : `see \`ferry ps\`` });
      }
      if (opts.pid !== undefined) {
        const target = treePids(rec.pid).find((p) => nsPid(p) === opts.pid);
        if (target !== undefined) {
          try {
            process.kill(target, sig);
            return this.getLive(name);
          } catch {
            /* exited meanwhile: as if not found */
          }
        }
        throw new FerryError('USAGE', `task '${name}' has no process ${opts.pid}`, { hint: "give the pid as the task's own programs see it (from its pidfile, say); the process may have exited" });
      }
      try {
        if (isAlive(rec.pid, rec.pidStart)) process.kill(rec.pid, sig);
      } catch {
        /* exited meanwhile: seen below */
      }
      if (sig !== 'SIGKILL') return this.getLive(name);
      return (await this.exitedWithin(name, 10_000, opts.signal)) ?? notKilled(rec);
    });
  }

  /** The task's record once it has exited, or undefined if it still runs after ms. */
  private async exitedWithin(name: string, ms: number, signal?: AbortSignal): Promise<TaskRecord | undefined> {
    const deadline = Date.now() + ms;
    for (;;) {
      const cur = await this.store.get(name);
      if (cur.state === 'exited') return cur;
      if (Date.now() >= deadline) return undefined;
      await sleep(50, signal);
    }
  }

  private async terminate(rec: TaskRecord, graceMs: number, signal?: AbortSignal): Promise<TaskRecord> {
    const send = (sig: NodeJS.Signals) => {
      if (rec.pid !== undefined && isAlive(rec.pid, rec.pidStart)) {
        try {
          process.kill(rec.pid, sig);
        } catch {
          /* exited meanwhile */
        }
      }
    };
    send('SIGTERM');
    const ended = await this.exitedWithin(rec.name, graceMs, signal);
    if (ended) return ended;
    send('SIGKILL');
    return (await this.exitedWithin(rec.name, 10_000, signal)) ?? notKilled(rec);
  }

  async remove(name: string, opts: { force?: boolean } = {}): Promise<void> {
    await this.store.withLock(name, 'rm', async () => {
      const rec = await this.store.get(name);
      if (rec.state === 'running' || rec.state === 'frozen') {
        if (!opts.force) {
          throw new FerryError('TASK_STATE', `task '${name}' is still running`, { hint: `stop it first with \`ferry stop ${name}\`, or use \`ferry rm --force ${name}\`` });
        }
        await this.terminate(rec, 0);
      }
      if (rec.net) await destroyTaskNet(this.stateDir, name, rec.net.address);
      await this.store.remove(name);
    });
  }

  /** Streams the task's log; with follow, keeps going until the task stops running. */
  async logs(name: string, out: NodeJS.WritableStream, opts: { follow?: boolean; signal?: AbortSignal } = {}): Promise<void> {
    await this.store.get(name);
    const path = this.store.logPath(name);
    let pos = 0;
    const pump = async () => {
      const fh = await open(path, 'r').catch(() => undefined);
      if (!fh) return;
      try {
        const { size } = await fh.stat();
        if (size < pos) pos = 0;
        if (size === pos) return;
        await new Promise<void>((res, rej) => {
          const s = createReadStream('', { fd: fh.fd, start: pos, end: size - 1, autoClose: false });
          s.on('error', rej);
          s.on('end', res);
          s.pipe(out, { end: false });
        });
        pos = size;
      } finally {
        await fh.close();
      }
    };
    await pump();
    if (!opts.follow) return;
    for (;;) {
      if (opts.signal?.aborted) return;
      const rec = await this.store.get(name).catch(() => undefined);
      await pump();
      if (!rec || rec.state === 'exited' || rec.state === 'checkpointed') return;
      await sleep(200, opts.signal).catch(() => undefined);
    }
  }

  /** Dumps the task to images in its directory; without leaveRunning the task stops. */
  async checkpoint(name: string, opts: { leaveRunning?: boolean; signal?: AbortSignal } = {}): Promise<TaskRecord> {
    return this.store.withLock(name, 'checkpoint', async () => {
      const rec = await this.store.get(name);
      requireRunning(rec, 'checkpoint');
      await this.criu.ensureUsable(opts.signal);
      const blocker = dumpBlocker(rec.pid!, name);
      if (blocker) throw blocker;
      const final = this.store.imagesDir(name);
      // Dump next to the old images and swap on success, so a failed checkpoint loses nothing.
      const fresh = `${final}.new`;
      await rm(fresh, { recursive: true, force: true });
      await mkdir(fresh, { recursive: true });
      rec.state = 'frozen';
      await this.store.save(rec);
      const releaseSlot = await dumpSlot(rec.pid, rec.cwd);
      try {
        // Connections are dumped established; nothing may reach or leave them meanwhile.
        const ns = rec.net ? netnsPath(this.stateDir, name) : undefined;
        if (ns) await lock(ns);
        const netArgs = rec.net ? criuDumpNetArgs(await netnsInode(rec.pid!)) : await this.hostTcpArgs(rec, fresh);
        const mountArgs = await dumpMountArgs(rec.pid!, fresh);
        let stopped = false;
        const res = await this.criu
          .dump({ pid: rec.pid!, imagesDir: fresh, leaveRunning: opts.leaveRunning, signal: opts.signal, timeoutMs: CRIU_TIMEOUT_MS, ...(netArgs ? { netArgs } : {}), mountArgs })
          .then((r) => ((stopped = !opts.leaveRunning), r))
          .finally(async () => {
            releaseSlot();
            // Running on, its connections flow again; ended, its sockets closed without a sound.
            await this.releaseTcp(name);
            // Stopped, the namespace stays locked until the restore opens it: no reset escapes.
            // (Deciding by whether the task still lives raced with its exit.)
            if (ns && !stopped) await unlock(ns);
          });
        await this.store.scratch.removeImages(final);
        await rename(fresh, final);
        rec.checkpoint = { at: new Date().toISOString(), leftRunning: !!opts.leaveRunning, durationMs: Math.round(res.durationMs), ...(res.stats ? { stats: res.stats } : {}) };
        if (opts.leaveRunning) {
          rec.state = 'running';
        } else {
          rec.state = 'checkpointed';
          delete rec.pid;
          delete rec.pidStart;
          delete rec.shimPid;
          delete rec.shimStart;
        }
        await this.store.save(rec);
        return rec;
      } catch (e) {
        // Also when the dump never started (its slot and the connection lock are taken before).
        releaseSlot();
        await this.releaseTcp(name);
        await rm(fresh, { recursive: true, force: true });
        // CRIU resumes the task when a dump fails; the record must say what is true.
        const now = await this.store.get(name).catch(() => undefined);
        if (now && now.state === 'frozen') {
          now.state = now.pid !== undefined && isAlive(now.pid, now.pidStart) ? 'running' : 'exited';
          await this.store.save(now);
        }
        throw e;
      }
    });
  }

  /** Restores a checkpointed task from its images on this host. */
  async restore(name: string, opts: { signal?: AbortSignal } = {}): Promise<TaskRecord> {
    return this.store.withLock(name, 'restore', async () => {
      const rec = await this.store.get(name);
      if (rec.state === 'running' || rec.state === 'frozen') {
        throw new FerryError('TASK_STATE', `task '${name}' is running: only a stopped task can be restored`, { hint: `stop it first with \`ferry stop ${name}\`` });
      }
      await this.criu.ensureUsable(opts.signal);
      const imagesDir = this.store.imagesDir(name);
      await checkImages(imagesDir, name);
      const restored = await this.restoreFrom(rec, imagesDir);
      // A checkpoint that stopped the task left its namespace locked (no reset could escape).
      await this.netHere(restored);
      return restored;
    });
  }

  /**
   * Runs `criu restore` under a new shim; the caller holds the task's lock. With leaveStopped the
   * restored tree stays stopped (state 'frozen') until resumeTree: a migration's destination copy
   * must not run before the source has let go of its own.
   */
  async restoreFrom(rec: TaskRecord, imagesDir: string, opts: RestoreOptions = {}): Promise<TaskRecord> {
    return this.startRestore(rec, imagesDir, opts).go();
  }

  /**
   * A restore whose shim is started now and waits for go(), where CRIU runs: so it can be started
   * ahead of the restore (a migration's destination does, while the images still arrive), and
   * CRIU starts only after the task's own connections are held still. cancel() ends it before
   * CRIU ran.
   */
  startRestore(rec: TaskRecord, imagesDir: string, opts: RestoreOptions = {}): { go: () => Promise<TaskRecord>; cancel: () => void } {
    const dir = this.store.dir(rec.name);
    const incarnation = rec.incarnation + 1;
    const pidfile = join(dir, `restore-${incarnation}.pid`);
    // CRIU's command depends on the images (a marker among them says how to restore connections):
    // it is made only at go().
    const command = (): string[] => {
      rmSync(pidfile, { force: true });
      rmSync(join(imagesDir, 'stats-restore'), { force: true });
      const netArgs = rec.net ? criuRestoreNetArgs() : existsSync(join(imagesDir, TCP_MARKER)) ? hostNetArgs('internal') : undefined;
      const mountArgs = restoreMountArgs(imagesDir, this.stateDir);
      return this.criu.restoreArgs({ imagesDir, pidfile, lazyPages: opts.lazyPages, leaveStopped: opts.leaveStopped, ...(netArgs ? { netArgs } : {}), mountArgs });
    };
    const shim = this.startShim(['restore', dir, String(incarnation), pidfile, '--'], { ...process.env, ...this.netEnv(rec) }, CRIU_TIMEOUT_MS, true);
    shim.result.catch(() => {}); // awaited by go()
    const go = async (): Promise<TaskRecord> => {
      const started = performance.now();
      // The task's own connections come back one end at a time, each sending what it had not
      // sent yet: held still until both ends are there (see src/net/tcp.ts).
      const marker = join(imagesDir, TCP_MARKER);
      let argv: string[];
      try {
        argv = command();
        if (!rec.net && existsSync(marker)) await this.holdTcp(rec.name, markedConnections(readFileSync(marker, 'utf8')));
      } catch (e) {
        shim.cancel(); // the shim would wait for its command for ever
        await this.releaseTcp(rec.name);
        throw e;
      }
      shim.go(argv);
      let rootPid: number, shimPid: number;
      try {
        ({ rootPid, shimPid } = await shim.result.finally(() => this.releaseTcp(rec.name)));
      } catch (e) {
        await removeRestoreYard(join(imagesDir, 'restore.log'));
        const lines = await readErrorLines(join(imagesDir, 'restore.log'));
        if (!lines.length) throw e;
        const hint = hintFor(lines);
        throw new FerryError('CRIU_FAILED', `criu restore of task '${rec.name}' failed: ${lines[0]}`, {
          details: [...lines, `log: ${join(imagesDir, 'restore.log')}`],
          ...(hint ? { hint } : {}),
        });
      }
      opts.onRestored?.();
      const durationMs = Math.round(performance.now() - started);
      rec.incarnation = incarnation;
      rec.state = opts.leaveStopped ? 'frozen' : 'running';
      rec.pid = rootPid;
      rec.pidStart = startTime(rootPid);
      rec.shimPid = shimPid;
      rec.shimStart = startTime(shimPid);
      delete rec.exit;
      const stats = await readRestoreStats(imagesDir);
      if (rec.checkpoint) rec.checkpoint.restore = { at: new Date().toISOString(), durationMs, ...(stats ? { stats } : {}) };
      await this.store.save(rec);
      return rec;
    };
    return { go, cancel: shim.cancel };
  }
}

export function requireRunning(rec: TaskRecord, what: string): void {
  if (rec.state === 'running') return;
  if (rec.state === 'checkpointed') {
    throw new FerryError('TASK_STATE', `cannot ${what} task '${rec.name}': it is already checkpointed`, { hint: `restore it first with \`ferry restore ${rec.name}\`` });
  }
  if (rec.state === 'frozen') {
    throw new FerryError('TASK_BUSY', `cannot ${what} task '${rec.name}': it is frozen by another operation`, { hint: 'wait for that operation to finish' });
  }
  throw new FerryError('TASK_STATE', `cannot ${what} task '${rec.name}': it has ${describeState(rec)}`, { hint: `see its output with \`ferry logs ${rec.name}\`` });
}

/** A restore needs at least CRIU's inventory image with the right magic. */
export async function checkImages(imagesDir: string, name: string): Promise<void> {
  let inv: Buffer;
  try {
    inv = await readFile(join(imagesDir, 'inventory.img'));
  } catch {
    throw new FerryError('IMAGES', `task '${name}' has no checkpoint images at ${imagesDir}`, { hint: `checkpoint it with \`ferry checkpoint ${name}\` while it runs` });
  }
  if (inv.length < 8 || inv.readUInt32LE(0) !== INVENTORY_MAGIC) {
    throw new FerryError('IMAGES', `checkpoint images of task '${name}' at ${imagesDir} are corrupt (bad inventory.img)`, { hint: 'the images cannot be used; take a new checkpoint of a running task' });
  }
}

async function resolveCommand(cmd: string, path: string, cwd: string): Promise<void> {
  const candidates = cmd.includes('/') ? [isAbsolute(cmd) ? cmd : resolve(cwd, cmd)] : path.split(delimiter).map((d) => join(d, cmd));
  for (const c of candidates) {
    try {
      await access(c, constants.X_OK);
      if ((await stat(c)).isFile()) return;
    } catch {
      /* next */
    }
  }
  throw new FerryError('USAGE', `command not found: ${cmd}`, { hint: 'give a path or a program on the task PATH' });
}

/**
 * The task's root is Ferry's init; the main process is its oldest child: the command, or once that
 * exited, the daemon it left behind.
 */
function withLive(rec: TaskRecord): TaskRecord {
  if (rec.pid === undefined || (rec.state !== 'running' && rec.state !== 'frozen')) return rec;
  const pids = treePids(rec.pid).slice(1);
  let kids: number[] = [];
  try {
    kids = readFileSync(`/proc/${rec.pid}/task/${rec.pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    /* exited meanwhile */
  }
  const oldest = kids.map((p) => ({ p, t: startTime(p) ?? Infinity })).sort((a, b) => a.t - b.t || a.p - b.p)[0]?.p;
  // Resident memory of the whole tree (shared pages counted per process): what a controller that
  // did not place the task takes as its size.
  let rss = 0;
  for (const p of pids) {
    try {
      rss += Number(readFileSync(`/proc/${p}/statm`, 'utf8').split(' ')[1]) * 4096;
    } catch {
      /* exited meanwhile */
    }
  }
  return { ...rec, processes: pids.length, rssBytes: rss, ...(oldest !== undefined ? { mainPid: oldest } : {}) };
}

/**
 * What of rec's network (its address, a published host port) another task here holds, said
 * from this host (or, with there, from the host asking to move the task here).
 */
export function netClash(rec: Pick<TaskRecord, 'net'>, others: TaskRecord[], there = false): string | undefined {
  if (!rec.net) return undefined;
  const holder = others.find((t) => t.net?.address === rec.net!.address);
  if (holder) return there ? `address ${rec.net.address} is in use there by task '${holder.name}'` : `address ${rec.net.address} is in use by task '${holder.name}' on this host`;
  for (const p of rec.net.publish ?? []) {
    const pub = others.find((t) => t.net?.publish?.some((q) => q.hostPort === p.hostPort && q.proto === p.proto));
    if (pub) return there ? `host port ${p.hostPort}/${p.proto} is published there by task '${pub.name}'` : `host port ${p.hostPort}/${p.proto} is published by task '${pub.name}' on this host`;
  }
  return undefined;
}
