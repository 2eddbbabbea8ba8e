// `ferry controller`: the one process that knows the cluster. It polls every agent (health,
// capacity, the tasks there), places submitted tasks with placement.ts, makes room for a
// higher-priority task by migrating lower-priority ones, drains hosts within KubeVirt-style
// limits, and keeps what it decided in its store so that a restarted controller carries on.
//
// It never guesses where a task is: the agents' task lists are the truth, read every second. A
// migration it started is followed to its end; one that failed left the task on its source (the
// agents guarantee that), and the next poll says so.
import { randomBytes } from 'node:crypto';
import { FerryError } from '../errors.js';
import type { LoadedTls } from '../tls/pki.js';
import type { TaskRecord } from '../runtime/task-store.js';
import type { Mode } from '../wire/schemas.js';
import type { MigrationReport } from '../migrate/source.js';
import { readMigrationStream } from '../migrate/progress-stream.js';
import { AgentLink, unreachable } from './agents.js';
import { ClusterState, DEFAULT_LIMITS, NoRoom, gib, startable, type Limits, type Move, type Snapshot } from './placement.js';
import type { Store } from './store.js';

export interface ControllerHost {
  name: string;
  address: string;
  cordoned: boolean;
  healthy: boolean;
  memBytes: number;
  cpus: number;
  lastSeen?: string;
  /** Why the last poll failed. */
  error?: string;
}

export type ControllerTaskState = 'pending' | 'running' | 'exited' | 'stopped';

export interface ControllerTask {
  name: string;
  priority: number;
  memBytes: number;
  command: string[];
  env?: Record<string, string>;
  /** Its own network namespace and address, which moves with it. */
  net: boolean;
  /** How the controller migrates it. */
  mode: Mode;
  host?: string;
  address?: string;
  state: ControllerTaskState;
  /** Why it is in that state, when the controller put it there. */
  reason?: string;
  submittedAt: string;
  /** Found running on an agent, not submitted: priority 0, its resident memory as its size. */
  adopted?: boolean;
}

export interface DrainRecord {
  host: string;
  state: 'running' | 'done' | 'failed' | 'cancelled';
  startedAt: string;
  endedAt?: string;
  /** Tasks on the host when the drain started (their names), and moved off it since. */
  tasks?: string[];
  total: number;
  moved: number;
  /** Migrations that failed and were tried again elsewhere. */
  retries: number;
  error?: string;
}

export interface MigrationRecord {
  id: string;
  /** The source agent's id for it, once it has one. */
  agentId?: string;
  task: string;
  from: string;
  to: string;
  mode: Mode;
  /** Why the controller moved it: "drain h1", "room for web (priority 10)", "asked by op". */
  reason: string;
  attempt: number;
  state: 'running' | 'ok' | 'failed';
  startedAt: string;
  endedAt?: string;
  /** Where it is now, and when each phase began (ms after the start). */
  phase?: string;
  phases: Array<{ phase: string; atMs: number }>;
  bytes: number;
  elapsedMs: number;
  blackoutMs?: number;
  totalMs?: number;
  error?: string;
  /** The error's code: TASK_BUSY means it never started (another operation held the task). */
  errorCode?: string;
}

export interface SubmitSpec {
  name?: string;
  priority: number;
  memBytes: number;
  command: string[];
  env?: Record<string, string>;
  net?: boolean;
  mode?: Mode;
}

export interface ControllerOptions {
  store: Store;
  /** Agents by host name: their addresses. */
  hosts: Record<string, string>;
  /** The controller's own certificate (role controller). */
  tls: LoadedTls;
  limits?: Limits;
  pollMs?: number;
  /** Tries per task before a drain gives up on it (the task stays where it is). */
  maxAttempts?: number;
  log?: (line: string) => void;
  /** Told of every migration that ends (metrics). */
  onMigration?: (m: MigrationRecord) => void;
}

/** Polls a host may miss before it counts as down. */
const MISSES = 3;
/** How long a restarted controller asks a source agent how an interrupted migration ended. */
const SETTLE_MS = 120_000;
/** A drain tries a host where a task's migration failed again only after this pause. */
const RETRY_PAUSE_MS = 3000;
/** Past migrations kept in the store for the timeline. */
const HISTORY = 500;

export class Controller {
  readonly hosts = new Map<string, ControllerHost>();
  readonly tasks = new Map<string, ControllerTask>();
  readonly drains = new Map<string, DrainRecord>();
  /** In flight, by task name. */
  readonly inflight = new Map<string, MigrationRecord>();
  readonly history: MigrationRecord[] = [];
  /**
   * Migrations the agents are running, by task, whoever started them (a controller that died, an
   * operator's `ferry migrate`): such a task is on neither host for sure until it ends.
   */
  readonly moving = new Map<string, { from: string; to: string; id: string }>();
  private readonly links = new Map<string, AgentLink>();
  /** When the controller last placed or moved each task itself (performance.now()). */
  private readonly touched = new Map<string, number>();
  private readonly misses = new Map<string, number>();
  private readonly limits: Limits;
  private readonly maxAttempts: number;
  private pollTimer?: NodeJS.Timeout;
  private polling?: Promise<void>;
  private closed = false;
  /** Placements run one at a time, so two submissions never count the same free memory. */
  private placing: Promise<unknown> = Promise.resolve();
  private readonly drainLoops = new Map<string, Promise<void>>();
  private readonly wake = new Set<() => void>();
  readonly started = Date.now();

  constructor(private readonly o: ControllerOptions) {
    this.limits = o.limits ?? DEFAULT_LIMITS;
    this.maxAttempts = o.maxAttempts ?? 3;
  }

  private log(line: string): void {
    this.o.log?.(`${new Date().toISOString()} ${line}`);
  }

  async start(): Promise<void> {
    const stored = await this.o.store.list<ControllerHost>('host');
    for (const [name, address] of Object.entries(this.o.hosts)) {
      const old = stored.find((h) => h.name === name);
      this.hosts.set(name, { name, address, cordoned: old?.cordoned ?? false, healthy: false, memBytes: old?.memBytes ?? 0, cpus: old?.cpus ?? 0 });
      this.links.set(name, new AgentLink(name, address, this.o.tls));
    }
    for (const t of await this.o.store.list<ControllerTask>('task')) this.tasks.set(t.name, t);
    for (const d of await this.o.store.list<DrainRecord>('drain')) this.drains.set(d.host, d);
    const past = await this.o.store.list<MigrationRecord>('migration');
    await this.poll();
    for (const m of past) {
      if (m.state === 'running') void this.settle(m);
      this.history.push(m);
    }
    this.history.sort((a, b) => (a.startedAt < b.startedAt ? -1 : a.startedAt > b.startedAt ? 1 : 0));
    this.pollTimer = setInterval(() => void this.poll(), this.o.pollMs ?? 1000);
    this.pollTimer.unref();
    // Drains the last controller left unfinished carry on from what the agents say now.
    for (const d of this.drains.values()) if (d.state === 'running') this.runDrain(d.host);
    this.log(`controller started: ${this.hosts.size} hosts, ${this.tasks.size} tasks, store ${this.o.store.where}`);
  }

  /**
   * A migration that was under way when the last controller stopped: its source agent cancelled
   * it (the client went away) or carries it to its end past the point of no return. The agent
   * says which once it knows; meanwhile the record stays running (on the timeline too).
   */
  private async settle(m: MigrationRecord): Promise<void> {
    const link = this.links.get(m.from);
    type Outcome = { state: string; ok?: boolean; error?: string };
    let outcome: Outcome | undefined;
    // A host no longer in the cluster file cannot be asked: where the task is decides.
    for (const end = Date.now() + SETTLE_MS; link && !this.closed && Date.now() < end; await this.sleep(1000)) {
      try {
        if (!m.agentId) {
          // Killed before the agent's first line arrived: the agent's list of those under way knows it.
          const active = await link.json<Array<{ id: string; task: string; to: string }>>('GET', '/v1/migrations', undefined, 5000);
          const a = active.find((x) => x.task === m.task && x.to === m.to);
          if (!a) break;
          m.agentId = a.id;
        }
        outcome = await link.json<Outcome>('GET', `/v1/migrations/${m.agentId}`, undefined, 5000);
        if (outcome.state === 'done') break;
      } catch (e) {
        if (e instanceof FerryError && e.code === 'TASK_NOT_FOUND') break;
        /* the agent is away: ask again */
      }
    }
    if (m.state !== 'running') return;
    if (outcome?.state === 'done') {
      m.state = outcome.ok ? 'ok' : 'failed';
      if (!outcome.ok) m.error = `the controller stopped while it ran: ${outcome.error ?? 'rolled back'}`;
    } else {
      // The agent cannot say: where the task runs now tells how it ended.
      await this.poll();
      m.state = this.tasks.get(m.task)?.host === m.to ? 'ok' : 'failed';
      if (m.state === 'failed') m.error = 'the controller stopped while it ran; the task stayed on its source';
    }
    m.endedAt ??= new Date().toISOString();
    await this.o.store.put('migration', m.id, m);
    const d = this.drains.get(m.from);
    if (m.state === 'ok' && d?.state === 'running' && m.reason === `drain ${m.from}`) {
      d.moved++;
      await this.saveDrain(d);
    }
    // This controller counts it: the one that started it died before it could.
    this.o.onMigration?.(m);
    this.kick();
  }

  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.pollTimer);
    this.kick();
    await this.polling;
    for (const l of this.links.values()) l.close();
  }

  // ---- what the agents say -------------------------------------------------------------------

  /** Asks every agent for its health, capacity and tasks, and brings the picture up to date. */
  poll(): Promise<void> {
    this.polling ??= this.pollOnce().finally(() => (this.polling = undefined));
    return this.polling;
  }

  private async pollOnce(): Promise<void> {
    const began = performance.now();
    const lists = new Map<string, TaskRecord[]>();
    const moving = new Map<string, { from: string; to: string; id: string }>();
    await Promise.all(
      [...this.hosts.values()].map(async (h) => {
        const link = this.links.get(h.name)!;
        try {
          const info = await link.json<{ capacity?: { memBytes: number; cpus: number } }>('GET', '/v1/info', undefined, 2000);
          // Migrations first: a task that finishes moving between the two reads is then seen
          // as moving and on its new host, never as on neither.
          for (const m of await link.json<Array<{ id: string; task: string; to: string }>>('GET', '/v1/migrations', undefined, 5000)) moving.set(m.task, { from: h.name, to: m.to, id: m.id });
          lists.set(h.name, await link.json<TaskRecord[]>('GET', '/v1/tasks', undefined, 5000));
          const changed = !h.healthy || h.memBytes !== info.capacity?.memBytes;
          h.healthy = true;
          h.error = undefined;
          h.lastSeen = new Date().toISOString();
          if (info.capacity) {
            h.memBytes = info.capacity.memBytes;
            h.cpus = info.capacity.cpus;
          }
          this.misses.set(h.name, 0);
          if (changed) await this.saveHost(h);
        } catch (e) {
          const n = (this.misses.get(h.name) ?? 0) + 1;
          this.misses.set(h.name, n);
          h.error = (e as Error).message;
          if (n >= MISSES && h.healthy) {
            h.healthy = false;
            this.log(`host ${h.name} is down: ${h.error}`);
            await this.saveHost(h);
          }
        }
      }),
    );
    // A silent host's migrations are not known: keep what was last seen of them.
    for (const [task, m] of this.moving) if (!lists.has(m.from) && !moving.has(task)) moving.set(task, m);
    this.moving.clear();
    for (const [task, m] of moving) this.moving.set(task, m);
    await this.reconcile(lists, began);
    this.kick();
  }

  /** Whether a task is migrating: by this controller, or by an agent for someone else. */
  private inMotion(name: string): boolean {
    return this.inflight.has(name) || this.moving.has(name);
  }

  /** Where each task runs, from the lists of the hosts that answered. */
  private async reconcile(lists: Map<string, TaskRecord[]>, began: number): Promise<void> {
    // What the controller itself changed since these lists were read is newer than they are.
    const stale = (name: string) => (this.touched.get(name) ?? -1) >= began;
    const seen = new Map<string, { host: string; rec: TaskRecord }[]>();
    for (const [host, list] of lists) for (const rec of list) seen.set(rec.name, [...(seen.get(rec.name) ?? []), { host, rec }]);
    const everyone = lists.size === this.hosts.size;
    for (const [name, places] of seen) {
      // A migration in flight has the task on both ends for a moment; its end decides.
      if (this.inMotion(name) || stale(name)) continue;
      const t = this.tasks.get(name);
      // Listed on two hosts (a copy being cleaned up after a migration ended): where it was stays.
      const running = places.filter((p) => p.rec.state === 'running');
      const live = running.find((p) => p.host === t?.host) ?? running[0] ?? places.find((p) => p.rec.state === 'frozen');
      if (!t) {
        if (!live) continue;
        // A task started on an agent directly: the controller looks after it too (drains move it).
        const adopted: ControllerTask = {
          name,
          priority: 0,
          memBytes: Math.max(2 ** 20, Math.ceil((live.rec.rssBytes ?? 0) / 2 ** 20) * 2 ** 20),
          command: live.rec.command,
          net: !!live.rec.net,
          mode: 'auto',
          host: live.host,
          ...(live.rec.net ? { address: live.rec.net.address } : {}),
          state: 'running',
          submittedAt: live.rec.createdAt,
          adopted: true,
        };
        this.tasks.set(name, adopted);
        await this.saveTask(adopted);
        this.log(`adopted task ${name} running on ${live.host} (${gib(adopted.memBytes)} resident)`);
        continue;
      }
      if (t.state === 'pending') continue;
      if (live) {
        if (t.host !== live.host || t.state !== 'running' || t.address !== live.rec.net?.address) {
          if (t.host && t.host !== live.host) this.log(`task ${name} is on ${live.host} now (was ${t.host})`);
          t.host = live.host;
          t.state = 'running';
          if (live.rec.net) t.address = live.rec.net.address;
          await this.saveTask(t);
        }
      } else if (t.state === 'running' && places.some((p) => p.host === t.host && p.rec.state === 'exited')) {
        t.state = 'exited';
        t.reason = 'its main process exited';
        await this.saveTask(t);
      }
    }
    // A running task no answering host knows was removed outside the controller: forget it. With
    // a host silent it may be there, so nothing is decided.
    if (everyone) {
      for (const t of [...this.tasks.values()]) {
        if (t.state === 'running' && !seen.has(t.name) && !this.inMotion(t.name) && !stale(t.name)) {
          this.tasks.delete(t.name);
          await this.o.store.delete('task', t.name);
          this.log(`task ${t.name} is on no host any more: forgotten`);
        }
      }
    }
  }

  private async saveHost(h: ControllerHost): Promise<void> {
    const { error: _e, ...rest } = h;
    await this.o.store.put('host', h.name, rest);
  }

  private async saveTask(t: ControllerTask): Promise<void> {
    await this.o.store.put('task', t.name, t);
  }

  private async saveDrain(d: DrainRecord): Promise<void> {
    await this.o.store.put('drain', d.host, d);
  }

  // ---- the picture placement works on -------------------------------------------------------

  /** Hosts and the memory their tasks take, with migrations in flight holding both ends. */
  snapshot(extraCordoned: Iterable<string> = []): ClusterState {
    const off = new Set(extraCordoned);
    const s: Snapshot = {
      hosts: [...this.hosts.values()].map((h) => ({ name: h.name, memBytes: h.memBytes, cordoned: h.cordoned || off.has(h.name), healthy: h.healthy })),
      tasks: [...this.tasks.values()]
        .filter((t) => t.host !== undefined && (t.state === 'running' || t.state === 'pending'))
        .map((t) => {
          const to = this.inflight.get(t.name)?.to ?? this.moving.get(t.name)?.to;
          return { name: t.name, priority: t.priority, memBytes: t.memBytes, host: t.host, ...(to !== undefined && to !== t.host ? { to } : {}) };
        }),
    };
    return ClusterState.of(s);
  }

  host(name: string): ControllerHost {
    const h = this.hosts.get(name);
    if (!h) throw new FerryError('HOST_UNKNOWN', `no host named '${name}' in the cluster`, { hint: `known hosts: ${[...this.hosts.keys()].join(', ') || 'none'}` });
    return h;
  }

  task(name: string): ControllerTask {
    const t = this.tasks.get(name);
    if (!t) throw new FerryError('TASK_NOT_FOUND', `no task named '${name}' in the cluster`, { hint: 'see `ferry tasks`' });
    return t;
  }

  // ---- submit and preemption ----------------------------------------------------------------

  submit(spec: SubmitSpec, by: string): Promise<{ task: ControllerTask; moved: MigrationRecord[]; stopped: string[] }> {
    const run = this.placing.then(() => this.submitNow(spec, by));
    this.placing = run.catch(() => {});
    return run;
  }

  private async submitNow(spec: SubmitSpec, by: string): Promise<{ task: ControllerTask; moved: MigrationRecord[]; stopped: string[] }> {
    const name = spec.name ?? `t-${randomBytes(3).toString('hex')}`;
    const old = this.tasks.get(name);
    if (old && old.state !== 'exited' && old.state !== 'stopped') {
      throw new FerryError('TASK_EXISTS', `a task named '${name}' is in the cluster already (on ${old.host ?? 'no host'})`, { hint: 'pick another --name, or remove it with `ferry delete`' });
    }
    const moved: MigrationRecord[] = [];
    const stopped: string[] = [];
    for (let attempt = 1; ; attempt++) {
      let plan;
      try {
        plan = this.snapshot().place({ priority: spec.priority, memBytes: spec.memBytes });
      } catch (e) {
        if (!(e instanceof NoRoom)) throw e;
        const largest = Math.max(0, ...[...this.hosts.values()].map((h) => h.memBytes));
        throw new FerryError('NO_ROOM', `no host can take '${name}' (${gib(spec.memBytes)}, priority ${spec.priority}): ${e.message}`, {
          hint: spec.memBytes > largest ? 'no host is that large: ask for less --memory' : 'free memory, add a host, or submit it with a higher --priority',
        });
      }
      // Make room: the lower-priority tasks migrate (in parallel) and only the homeless stop.
      const results = await Promise.all(plan.moves.map((m) => this.migrate(m, `room for ${name} (priority ${spec.priority})`, attempt)));
      moved.push(...results.filter((r) => r.state === 'ok'));
      const failed = results.filter((r) => r.state === 'failed');
      if (failed.length) {
        if (attempt >= this.maxAttempts) {
          throw new FerryError('MIGRATION', `could not make room for '${name}' on ${plan.host}: ${failed.map((f) => `${f.task} -> ${f.to}: ${f.error}`).join('; ')}`, { hint: 'every task is still running where it was; see `ferry migrations`' });
        }
        continue;
      }
      for (const victim of plan.stops) {
        await this.stopTask(victim, `stopped to make room for '${name}' (priority ${spec.priority}): no other host had room`);
        stopped.push(victim);
      }
      const h = this.host(plan.host);
      const task: ControllerTask = {
        name,
        priority: spec.priority,
        memBytes: spec.memBytes,
        command: spec.command,
        ...(spec.env ? { env: spec.env } : {}),
        net: !!spec.net,
        mode: spec.mode ?? 'auto',
        host: h.name,
        state: 'pending',
        submittedAt: new Date().toISOString(),
      };
      this.tasks.set(name, task);
      this.touched.set(name, performance.now());
      await this.saveTask(task);
      try {
        const avoid = [...this.tasks.values()].flatMap((t) => (t.address ? [t.address] : []));
        const rec = await this.links.get(h.name)!.json<TaskRecord>('POST', '/v1/tasks', {
          name,
          command: spec.command,
          ...(spec.env ? { env: spec.env } : {}),
          ...(spec.net ? { net: { avoid } } : {}),
        });
        task.state = 'running';
        this.touched.set(name, performance.now());
        if (rec.net) task.address = rec.net.address;
      } catch (e) {
        this.tasks.delete(name);
        await this.o.store.delete('task', name);
        throw e instanceof FerryError ? new FerryError(e.code, `could not start '${name}' on ${h.name}: ${e.message}`, e.hint ? { hint: e.hint } : {}) : e;
      }
      await this.saveTask(task);
      this.log(`placed ${name} (${gib(spec.memBytes)}, priority ${spec.priority}) on ${h.name} for ${by}${moved.length ? `; moved ${moved.map((m) => `${m.task} -> ${m.to}`).join(', ')}` : ''}${stopped.length ? `; stopped ${stopped.join(', ')}` : ''}`);
      return { task, moved, stopped };
    }
  }

  private async stopTask(name: string, reason: string): Promise<void> {
    const t = this.task(name);
    if (t.host) await this.links.get(t.host)!.json('POST', `/v1/tasks/${encodeURIComponent(name)}/stop`, { graceMs: 10_000 });
    t.state = 'stopped';
    t.reason = reason;
    this.touched.set(name, performance.now());
    await this.saveTask(t);
    this.log(`${name}: ${reason}`);
  }

  /** Stops a task and removes it from its host and from the cluster. */
  async remove(name: string): Promise<void> {
    const t = this.task(name);
    if (this.inMotion(name)) throw new FerryError('TASK_BUSY', `task '${name}' is migrating`, { hint: 'try again when the migration ends' });
    if (t.host && t.state !== 'stopped' && t.state !== 'exited') {
      await this.links.get(t.host)!.json('POST', `/v1/tasks/${encodeURIComponent(name)}/stop`, { graceMs: 10_000 }).catch((e: FerryError) => {
        if (e.code !== 'TASK_STATE' && e.code !== 'TASK_NOT_FOUND') throw e;
      });
    }
    if (t.host) {
      await this.links.get(t.host)!.json('DELETE', `/v1/tasks/${encodeURIComponent(name)}`).catch((e: FerryError) => {
        if (e.code !== 'TASK_NOT_FOUND') throw e;
      });
    }
    this.tasks.delete(name);
    this.touched.set(name, performance.now());
    await this.o.store.delete('task', name);
  }

  // ---- migrations -----------------------------------------------------------------------------

  /** A migration of one task, followed to its end; it never throws, the record says how it went. */
  async migrate(m: Move, reason: string, attempt = 1): Promise<MigrationRecord> {
    const t = this.task(m.task);
    const rec: MigrationRecord = {
      id: `${Date.now().toString(36)}-${randomBytes(3).toString('hex')}`,
      task: m.task,
      from: m.from,
      to: m.to,
      mode: t.mode,
      reason,
      attempt,
      state: 'running',
      startedAt: new Date().toISOString(),
      phases: [],
      bytes: 0,
      elapsedMs: 0,
    };
    if (this.inflight.has(m.task)) {
      return this.ended(rec, `task '${m.task}' is migrating already`);
    }
    this.inflight.set(m.task, rec);
    await this.o.store.put('migration', rec.id, rec);
    this.log(`migrating ${m.task} ${m.from} -> ${m.to} (${t.mode}, ${reason})`);
    try {
      const to = this.host(m.to);
      const stream = await this.links.get(m.from)!.stream('POST', `/v1/tasks/${encodeURIComponent(m.task)}/migrate`, { to: { name: to.name, address: to.address }, mode: t.mode, detach: true });
      const report: MigrationReport = await readMigrationStream(stream, (p) => {
        if (p.type === 'start') {
          rec.agentId = p.id;
          // Kept, so that a controller that follows this one can ask the agent how it ended.
          void this.o.store.put('migration', rec.id, rec).catch(() => {});
        }
        else if (p.type === 'phase') {
          rec.phase = p.phase;
          rec.phases.push({ phase: p.phase, atMs: p.elapsedMs });
          rec.elapsedMs = p.elapsedMs;
        } else if (p.type === 'bytes') {
          rec.bytes = p.pages + p.images + p.files;
          rec.elapsedMs = p.elapsedMs;
        }
      });
      rec.bytes = report.bytes.pages + report.bytes.images + report.bytes.files;
      rec.totalMs = report.totalMs;
      if (report.blackoutMs !== undefined) rec.blackoutMs = report.blackoutMs;
      rec.elapsedMs = report.totalMs;
      t.host = m.to;
      this.touched.set(m.task, performance.now());
      t.state = 'running';
      await this.saveTask(t);
      return await this.ended(rec);
    } catch (e) {
      // The agents roll a failed migration back; a lost source agent settles it when it returns.
      // Either way the next poll says where the task runs.
      if (e instanceof FerryError) rec.errorCode = e.code;
      if (rec.errorCode === 'TASK_BUSY') {
        // It never started (another operation holds the task): not a migration to keep.
        rec.state = 'failed';
        rec.error = (e as Error).message;
        await this.o.store.delete('migration', rec.id);
        return rec;
      }
      return await this.ended(rec, (e as Error).message);
    } finally {
      this.inflight.delete(m.task);
      void this.poll();
    }
  }

  private async ended(rec: MigrationRecord, error?: string): Promise<MigrationRecord> {
    rec.state = error === undefined ? 'ok' : 'failed';
    if (error !== undefined) rec.error = error;
    rec.endedAt = new Date().toISOString();
    rec.phase = undefined;
    this.history.push(rec);
    await this.o.store.put('migration', rec.id, rec);
    while (this.history.length > HISTORY) await this.o.store.delete('migration', this.history.shift()!.id);
    this.log(
      rec.state === 'ok'
        ? `migrated ${rec.task} ${rec.from} -> ${rec.to}: pause ${rec.blackoutMs ?? '-'} ms, total ${rec.totalMs} ms`
        : `migration of ${rec.task} ${rec.from} -> ${rec.to} failed: ${rec.error}`,
    );
    this.o.onMigration?.(rec);
    this.kick();
    return rec;
  }

  /** Moves a task to a host (or the one it fits best), as an operator asked. */
  async migrateTask(name: string, to: string | undefined, by: string): Promise<MigrationRecord> {
    const t = this.task(name);
    if (t.state !== 'running' || !t.host) throw new FerryError('TASK_STATE', `task '${name}' is not running (${t.state})`);
    if (to !== undefined) {
      const h = this.host(to);
      if (to === t.host) throw new FerryError('USAGE', `task '${name}' is on ${to} already`);
      if (!h.healthy) throw new FerryError('PEER', `host ${to} is down: ${h.error ?? 'no answer'}`);
    } else {
      const best = this.snapshot().bestFit(t.memBytes, t.host);
      if (!best) throw new FerryError('NO_ROOM', `no other host has room for '${name}' (${gib(t.memBytes)})`);
      to = best.name;
    }
    const rec = await this.migrate({ task: name, from: t.host, to }, `asked by ${by}`);
    if (rec.state === 'failed') throw new FerryError('MIGRATION', `migration of '${name}' to ${to} failed: ${rec.error}`, { hint: `the task is running on ${t.host}` });
    return rec;
  }

  // ---- cordon and drain -----------------------------------------------------------------------

  async cordon(name: string, on: boolean): Promise<ControllerHost> {
    const h = this.host(name);
    h.cordoned = on;
    await this.saveHost(h);
    const d = this.drains.get(name);
    // Uncordoning ends a drain: what is under way finishes, nothing new starts.
    if (!on && d?.state === 'running') await this.endDrain(d, 'cancelled', 'the host was uncordoned');
    this.log(`${on ? 'cordoned' : 'uncordoned'} ${name}`);
    return h;
  }

  /** Starts emptying a host; refuses, before anything changes, when its tasks fit nowhere else. */
  async drain(name: string, by: string): Promise<DrainRecord> {
    const h = this.host(name);
    const d0 = this.drains.get(name);
    if (d0?.state === 'running') return d0;
    const leaving = [...this.tasks.values()].filter((t) => t.host === name && t.state === 'running');
    try {
      this.snapshot([name]).drainPlan(name);
    } catch (e) {
      if (!(e instanceof NoRoom)) throw e;
      throw new FerryError('NO_ROOM', `cannot drain ${name}: ${e.message}`, { hint: 'nothing was moved or cordoned; add a host or free memory, then drain again' });
    }
    h.cordoned = true;
    await this.saveHost(h);
    const d: DrainRecord = { host: name, state: 'running', startedAt: new Date().toISOString(), tasks: leaving.map((t) => t.name), total: leaving.length, moved: 0, retries: 0 };
    this.drains.set(name, d);
    await this.saveDrain(d);
    this.log(`draining ${name} for ${by}: ${leaving.length} tasks`);
    this.runDrain(name);
    return d;
  }

  private runDrain(host: string): void {
    if (this.drainLoops.has(host)) return;
    const loop = this.drainLoop(host)
      .catch(async (e: Error) => {
        const d = this.drains.get(host);
        if (d?.state === 'running') await this.endDrain(d, 'failed', e.message);
      })
      .finally(() => this.drainLoops.delete(host));
    this.drainLoops.set(host, loop);
  }

  private async drainLoop(host: string): Promise<void> {
    const tries = new Map<string, { n: number; failedTo: Set<string>; at: number; last: string }>();
    const running = new Map<string, Promise<MigrationRecord>>();
    for (;;) {
      const d = this.drains.get(host);
      if (this.closed || !d || d.state !== 'running') break;
      // Moving out by an agent for someone else (a migration the last controller started) counts
      // as still here until it ends; the next poll then says where it went.
      const left = [...this.tasks.values()].filter((t) => (t.host === host && t.state === 'running') || this.moving.get(t.name)?.from === host);
      const waiting = left.filter((t) => !this.inMotion(t.name)).sort((a, b) => b.memBytes - a.memBytes || (a.name < b.name ? -1 : 1));
      if (!left.length && !running.size) {
        await this.endDrain(d, 'done');
        return;
      }
      if (this.hosts.get(host)!.healthy && waiting.length) {
        // A destination for each task still there, best fit, avoiding where it failed before.
        const queue: Move[] = [];
        const state = this.snapshot([host]);
        for (const t of waiting) {
          const tr = tries.get(t.name);
          const avoid = tr?.failedTo ?? new Set<string>();
          const free = new Map(state.free);
          for (const a of avoid) free.set(a, -1);
          // Another host first; where none has room, the one that failed, after a pause (the
          // failure may have passed: an agent restarting, a migration still being undone).
          let to = state.bestFit(t.memBytes, host, free);
          if (!to && tr) {
            if (Date.now() - tr.at < RETRY_PAUSE_MS) continue;
            to = state.bestFit(t.memBytes, host);
          }
          if (!to) {
            if (running.size) continue; // room may come back when a move ends
            throw new Error(`no host has room for ${t.name} (${gib(t.memBytes)}); it is still running on ${host}`);
          }
          state.free.set(to.name, state.free.get(to.name)! - t.memBytes);
          queue.push({ task: t.name, from: host, to: to.name });
        }
        // Migrations the agents run for others count against the limits too.
        const all = [...this.inflight.values()].map((m) => ({ task: m.task, from: m.from, to: m.to }));
        for (const [task, m] of this.moving) if (!this.inflight.has(task)) all.push({ task, from: m.from, to: m.to });
        for (const m of startable(queue, all, this.limits)) {
          const attempt = (tries.get(m.task)?.n ?? 0) + 1;
          const p = this.migrate(m, `drain ${host}`, attempt);
          running.set(m.task, p);
          void p.then(async (r) => {
            running.delete(m.task);
            if (r.state === 'ok') {
              d.moved++;
              await this.saveDrain(d);
              return;
            }
            // Held by another operation (a migration the last controller left rolling back): try again.
            if (r.errorCode === 'TASK_BUSY') return;
            const tr = tries.get(m.task) ?? { n: 0, failedTo: new Set<string>(), at: 0, last: '' };
            tr.n++;
            tr.failedTo.add(m.to);
            tr.at = Date.now();
            tr.last = r.error ?? '';
            tries.set(m.task, tr);
            d.retries++;
            await this.saveDrain(d);
            if (tr.n >= this.maxAttempts && d.state === 'running') {
              await this.endDrain(d, 'failed', `${m.task} failed to migrate ${tr.n} times (last: ${r.error}); it is still running on ${host}`);
            }
          });
        }
      }
      await this.sleep(1000);
    }
    await Promise.all(running.values());
  }

  private async endDrain(d: DrainRecord, state: DrainRecord['state'], error?: string): Promise<void> {
    // Counted from where the tasks are, not from the migrations seen: one that a previous
    // controller started may have ended while nobody followed it.
    if (d.tasks) d.moved = d.tasks.filter((n) => this.tasks.get(n)?.state === 'running' && this.tasks.get(n)?.host !== d.host).length;
    d.state = state;
    d.endedAt = new Date().toISOString();
    if (error) d.error = error;
    await this.saveDrain(d);
    this.log(`drain of ${d.host} ${state}${error ? `: ${error}` : ''} (${d.moved} of ${d.total} moved, ${d.retries} retried)`);
    this.kick();
  }

  /** Waits until something changes (a poll, a migration ending) or ms pass. */
  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(t);
        this.wake.delete(done);
        resolve();
      };
      const t = setTimeout(done, ms);
      this.wake.add(done);
    });
  }

  private kick(): void {
    for (const w of [...this.wake]) w();
  }

  // ---- names ---------------------------------------------------------------------------------

  /** Where a task is: its own address if it has one, and its host. */
  resolve(name: string): { name: string; host: string; hostAddress: string; address?: string; state: ControllerTaskState; migrating: boolean } {
    const t = this.task(name);
    if (!t.host) throw new FerryError('TASK_STATE', `task '${name}' has no host (${t.state})`);
    const h = this.host(t.host);
    return { name, host: h.name, hostAddress: h.address.replace(/:\d+$/, ''), ...(t.address ? { address: t.address } : {}), state: t.state, migrating: this.inMotion(name) };
  }

  /** Everything the dashboard and `ferry hosts` show. */
  view(): { hosts: Array<ControllerHost & { freeBytes: number; tasks: string[] }>; tasks: ControllerTask[]; drains: DrainRecord[]; inflight: MigrationRecord[]; history: MigrationRecord[]; limits: Limits; uptimeMs: number } {
    const state = this.snapshot();
    return {
      hosts: [...this.hosts.values()].map((h) => ({
        ...h,
        freeBytes: state.free.get(h.name) ?? 0,
        tasks: [...this.tasks.values()].filter((t) => t.host === h.name && (t.state === 'running' || t.state === 'pending')).map((t) => t.name),
      })),
      tasks: [...this.tasks.values()],
      drains: [...this.drains.values()],
      inflight: [...this.inflight.values()],
      history: this.history.slice(-100),
      limits: this.limits,
      uptimeMs: Date.now() - this.started,
    };
  }
}
