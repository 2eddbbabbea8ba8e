// Where tasks go: placing a new task, making room for a higher-priority one by migrating
// lower-priority tasks (stopping one only when no host can take it), and emptying a host. One
// incremental state of the cluster, so the controller and the simulator (1,000 hosts, 100,000
// tasks) run the same code.

export interface HostState {
  name: string;
  memBytes: number;
  cordoned: boolean;
  healthy: boolean;
  rack?: string;
}

export interface TaskState {
  name: string;
  priority: number;
  memBytes: number;
  /** Where it runs; undefined while it waits for a place. */
  host?: string;
  /** Moving: it holds memory on both hosts until the migration ends. */
  to?: string;
}

export interface Snapshot {
  hosts: HostState[];
  tasks: TaskState[];
}

export interface Move {
  task: string;
  from: string;
  to: string;
}

/** A task's place, and what must move or stop first to make room for it. */
export interface Placement {
  host: string;
  moves: Move[];
  stops: string[];
}

export class NoRoom extends Error {}

const usable = (h: HostState) => h.healthy && !h.cordoned;

export class ClusterState {
  readonly hosts = new Map<string, HostState>();
  readonly tasks = new Map<string, TaskState>();
  /** Memory not taken by tasks there or on their way there. */
  readonly free = new Map<string, number>();
  /** Tasks that run on a host and are not leaving it. */
  private readonly settled = new Map<string, Set<TaskState>>();

  static of(s: Snapshot): ClusterState {
    const c = new ClusterState();
    for (const h of s.hosts) c.addHost({ ...h });
    for (const t of s.tasks) c.addTask({ ...t });
    return c;
  }

  addHost(h: HostState): void {
    this.hosts.set(h.name, h);
    this.free.set(h.name, h.memBytes);
    this.settled.set(h.name, new Set());
  }

  addTask(t: TaskState): void {
    this.tasks.set(t.name, t);
    if (t.host !== undefined) this.take(t.host, t.memBytes);
    if (t.to !== undefined) this.take(t.to, t.memBytes);
    else if (t.host !== undefined) this.settled.get(t.host)?.add(t);
  }

  removeTask(name: string): void {
    const t = this.tasks.get(name);
    if (!t) return;
    if (t.host !== undefined) this.take(t.host, -t.memBytes);
    if (t.to !== undefined) this.take(t.to, -t.memBytes);
    if (t.host !== undefined) this.settled.get(t.host)?.delete(t);
    this.tasks.delete(name);
  }

  /** The task starts moving: it holds memory on both hosts. */
  startMove(m: Move): void {
    const t = this.tasks.get(m.task)!;
    t.to = m.to;
    this.take(m.to, t.memBytes);
    this.settled.get(m.from)?.delete(t);
  }

  /** The task runs on its new host; done false: it stayed where it was. */
  endMove(m: Move, done: boolean): void {
    const t = this.tasks.get(m.task)!;
    this.take(m.to, -t.memBytes);
    t.to = undefined;
    if (done) {
      this.take(m.from, -t.memBytes);
      this.take(m.to, t.memBytes);
      t.host = m.to;
    }
    this.settled.get(t.host!)?.add(t);
  }

  private take(host: string, bytes: number): void {
    this.free.set(host, (this.free.get(host) ?? 0) - bytes);
  }

  /**
   * The usable host with room that is left fullest by the task (best fit: big holes stay open for
   * big tasks); ties go to the name, so a plan is the same every time.
   */
  bestFit(mem: number, except?: string, free: Map<string, number> = this.free): HostState | undefined {
    let best: HostState | undefined;
    let bestLeft = Number.POSITIVE_INFINITY;
    for (const h of this.hosts.values()) {
      if (h.name === except || !usable(h)) continue;
      const left = free.get(h.name)! - mem;
      if (left < 0) continue;
      if (left < bestLeft || (left === bestLeft && best && h.name < best.name)) {
        best = h;
        bestLeft = left;
      }
    }
    return best;
  }

  /**
   * A place for a task of this priority and size. Without room anywhere, on the host where the
   * fewest lower-priority tasks must stop (then the fewest must move, then the least memory
   * moves), lower-priority tasks are migrated away — smallest priority first, then largest — and
   * stopped only when no other host can take them. Throws NoRoom when not even that makes room.
   */
  place(task: { priority: number; memBytes: number }): Placement {
    const direct = this.bestFit(task.memBytes);
    if (direct) return { host: direct.name, moves: [], stops: [] };
    const largest = Math.max(0, ...[...this.hosts.values()].filter(usable).map((h) => h.memBytes));
    if (task.memBytes > largest) throw new NoRoom(`it needs ${gib(task.memBytes)} and the largest host that takes tasks has ${gib(largest)}`);
    let best: { plan: Placement; moved: number } | undefined;
    for (const h of this.hosts.values()) {
      if (!usable(h)) continue;
      const plan = this.makeRoom(h, task);
      if (!plan) continue;
      const moved = plan.moves.reduce((sum, m) => sum + this.tasks.get(m.task)!.memBytes, 0);
      const better =
        !best ||
        plan.stops.length < best.plan.stops.length ||
        (plan.stops.length === best.plan.stops.length && (plan.moves.length < best.plan.moves.length || (plan.moves.length === best.plan.moves.length && moved < best.moved)));
      if (better) best = { plan, moved };
    }
    if (!best) throw new NoRoom('every host is full of tasks of the same or higher priority');
    return best.plan;
  }

  /** Lower-priority tasks that would leave h for the task: where each goes, or that it stops. */
  private makeRoom(h: HostState, task: { priority: number; memBytes: number }): Placement | undefined {
    const victims = [...this.settled.get(h.name)!].filter((t) => t.priority < task.priority).sort((a, b) => a.priority - b.priority || b.memBytes - a.memBytes || (a.name < b.name ? -1 : 1));
    let room = this.free.get(h.name)!;
    const chosen: TaskState[] = [];
    for (const v of victims) {
      if (room >= task.memBytes) break;
      chosen.push(v);
      room += v.memBytes;
    }
    if (room < task.memBytes) return undefined;
    // The fewest victims: drop any whose memory is not needed after all (last chosen first).
    for (let i = chosen.length - 1; i >= 0; i--) {
      if (room - chosen[i]!.memBytes >= task.memBytes) {
        room -= chosen[i]!.memBytes;
        chosen.splice(i, 1);
      }
    }
    const after = new Map(this.free);
    const moves: Move[] = [];
    const stops: string[] = [];
    // The most important victims find a place first.
    for (const v of [...chosen].sort((a, b) => b.priority - a.priority || b.memBytes - a.memBytes)) {
      const to = this.bestFit(v.memBytes, h.name, after);
      if (to) {
        after.set(to.name, after.get(to.name)! - v.memBytes);
        moves.push({ task: v.name, from: h.name, to: to.name });
      } else stops.push(v.name);
    }
    return { host: h.name, moves, stops };
  }

  /**
   * Every task off a host, each to the host it fits best on (the largest first: they are the
   * hardest to fit). Throws NoRoom, before anything moves, when some task fits nowhere; with
   * allowStops those are returned instead (the simulator's rolling upgrade counts them).
   */
  drainPlan(host: string, allowStops = false): { moves: Move[]; stops: string[] } {
    const free = new Map(this.free);
    const moves: Move[] = [];
    const stuck: TaskState[] = [];
    const leaving = [...(this.settled.get(host) ?? [])].sort((a, b) => b.memBytes - a.memBytes || b.priority - a.priority || (a.name < b.name ? -1 : 1));
    for (const t of leaving) {
      const to = this.bestFit(t.memBytes, host, free);
      if (!to) {
        stuck.push(t);
        continue;
      }
      free.set(to.name, free.get(to.name)! - t.memBytes);
      moves.push({ task: t.name, from: host, to: to.name });
    }
    if (stuck.length && !allowStops) {
      const names = stuck.map((t) => `${t.name} (${gib(t.memBytes)})`);
      throw new NoRoom(`no other host has room for ${names.length === 1 ? names[0] : `${names.length} of its tasks: ${names.slice(0, 3).join(', ')}${names.length > 3 ? ', ...' : ''}`}`);
    }
    return { moves, stops: stuck.map((t) => t.name) };
  }
}

/** Memory taken on each host: tasks there, and tasks on their way there. */
export function usedMemory(s: Snapshot): Map<string, number> {
  const c = ClusterState.of(s);
  return new Map(s.hosts.map((h) => [h.name, h.memBytes - c.free.get(h.name)!]));
}

export function place(s: Snapshot, task: { priority: number; memBytes: number }): Placement {
  return ClusterState.of(s).place(task);
}

export function drainPlan(s: Snapshot, host: string): Move[] {
  return ClusterState.of(s).drainPlan(host).moves;
}

/** KubeVirt's defaults: 2 outbound migrations per host, 5 in the whole cluster. */
export interface Limits {
  perHost: number;
  perCluster: number;
}
export const DEFAULT_LIMITS: Limits = { perHost: 2, perCluster: 5 };

/** Which queued moves may start now, in queue order, within the limits. */
export function startable(queue: Move[], running: Move[], limits: Limits): Move[] {
  const out = new Map<string, number>();
  const touched = new Set<string>();
  for (const m of running) {
    out.set(m.from, (out.get(m.from) ?? 0) + 1);
    touched.add(m.task);
  }
  let total = running.length;
  const go: Move[] = [];
  for (const m of queue) {
    if (total >= limits.perCluster) break;
    if ((out.get(m.from) ?? 0) >= limits.perHost || touched.has(m.task)) continue;
    go.push(m);
    touched.add(m.task);
    out.set(m.from, (out.get(m.from) ?? 0) + 1);
    total++;
  }
  return go;
}

export function gib(b: number): string {
  return b >= 2 ** 30 ? `${(b / 2 ** 30).toFixed(1)} GiB` : `${Math.round(b / 2 ** 20)} MiB`;
}
