// Where tasks go: placing a new task, making room for a higher-priority one by migrating
// lower-priority tasks (stopping one only when no host can take it), and emptying a host. Pure
// functions over a snapshot of the cluster, so the controller and the simulator run the same code.

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

/** Memory taken on each host: tasks there, and tasks on their way there. */
export function usedMemory(s: Snapshot): Map<string, number> {
  const used = new Map<string, number>(s.hosts.map((h) => [h.name, 0]));
  for (const t of s.tasks) {
    if (t.host !== undefined) used.set(t.host, (used.get(t.host) ?? 0) + t.memBytes);
    if (t.to !== undefined) used.set(t.to, (used.get(t.to) ?? 0) + t.memBytes);
  }
  return used;
}

const usable = (h: HostState) => h.healthy && !h.cordoned;

/**
 * The host with room that is left fullest by the task (best fit: big holes stay open for big
 * tasks); ties go to the name, so a plan is the same every time.
 */
function bestFit(hosts: HostState[], free: Map<string, number>, mem: number, except?: string): HostState | undefined {
  let best: HostState | undefined;
  let bestLeft = Number.POSITIVE_INFINITY;
  for (const h of hosts) {
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

function freeMemory(s: Snapshot): Map<string, number> {
  const used = usedMemory(s);
  return new Map(s.hosts.map((h) => [h.name, h.memBytes - used.get(h.name)!]));
}

/**
 * A place for a task of this priority and size. Without room anywhere, on the host where the
 * fewest lower-priority tasks must stop (then the fewest must move, then the least memory moves),
 * lower-priority tasks are migrated away — smallest priority first, then largest — and stopped
 * only when no other host can take them. Throws NoRoom when not even that makes room.
 */
export function place(s: Snapshot, task: { priority: number; memBytes: number }): Placement {
  const free = freeMemory(s);
  const direct = bestFit(s.hosts, free, task.memBytes);
  if (direct) return { host: direct.name, moves: [], stops: [] };
  const largest = Math.max(0, ...s.hosts.filter(usable).map((h) => h.memBytes));
  if (task.memBytes > largest) throw new NoRoom(`it needs ${gib(task.memBytes)} and the largest host that takes tasks has ${gib(largest)}`);
  let best: { plan: Placement; moved: number } | undefined;
  const mem = new Map(s.tasks.map((t) => [t.name, t.memBytes]));
  const byHost = new Map<string, TaskState[]>();
  for (const t of s.tasks) {
    if (t.host === undefined || t.to !== undefined) continue;
    const list = byHost.get(t.host);
    if (list) list.push(t);
    else byHost.set(t.host, [t]);
  }
  for (const h of s.hosts) {
    if (!usable(h)) continue;
    const plan = makeRoom(s.hosts, byHost.get(h.name) ?? [], free, h, task);
    if (!plan) continue;
    const moved = plan.moves.reduce((sum, m) => sum + mem.get(m.task)!, 0);
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
function makeRoom(hosts: HostState[], here: TaskState[], free: Map<string, number>, h: HostState, task: { priority: number; memBytes: number }): Placement | undefined {
  // Only tasks that run here now, and are not already on their way somewhere.
  const victims = here.filter((t) => t.priority < task.priority).sort((a, b) => a.priority - b.priority || b.memBytes - a.memBytes || (a.name < b.name ? -1 : 1));
  let room = free.get(h.name)!;
  const chosen: TaskState[] = [];
  for (const v of victims) {
    if (room >= task.memBytes) break;
    chosen.push(v);
    room += v.memBytes;
  }
  if (room < task.memBytes) return undefined;
  // The fewest victims: drop any whose memory is not needed after all (largest last chosen first).
  for (let i = chosen.length - 1; i >= 0; i--) {
    if (room - chosen[i]!.memBytes >= task.memBytes) {
      room -= chosen[i]!.memBytes;
      chosen.splice(i, 1);
    }
  }
  const after = new Map(free);
  const moves: Move[] = [];
  const stops: string[] = [];
  // The most important victims find a place first.
  for (const v of [...chosen].sort((a, b) => b.priority - a.priority || b.memBytes - a.memBytes)) {
    const to = bestFit(hosts, after, v.memBytes, h.name);
    if (to) {
      after.set(to.name, after.get(to.name)! - v.memBytes);
      moves.push({ task: v.name, from: h.name, to: to.name });
    } else stops.push(v.name);
  }
  return { host: h.name, moves, stops };
}

/**
 * Every task off a host, each to the host it fits best on (the largest first: they are the
 * hardest to fit). Throws NoRoom, before anything moves, when some task fits nowhere.
 */
export function drainPlan(s: Snapshot, host: string): Move[] {
  const free = freeMemory(s);
  const moves: Move[] = [];
  const leaving = s.tasks.filter((t) => t.host === host && t.to === undefined).sort((a, b) => b.memBytes - a.memBytes || b.priority - a.priority || (a.name < b.name ? -1 : 1));
  const stuck: string[] = [];
  for (const t of leaving) {
    const to = bestFit(s.hosts, free, t.memBytes, host);
    if (!to) {
      stuck.push(`${t.name} (${gib(t.memBytes)})`);
      continue;
    }
    free.set(to.name, free.get(to.name)! - t.memBytes);
    moves.push({ task: t.name, from: host, to: to.name });
  }
  if (stuck.length) throw new NoRoom(`no other host has room for ${stuck.length === 1 ? stuck[0] : `${stuck.length} of its tasks: ${stuck.slice(0, 3).join(', ')}${stuck.length > 3 ? ', ...' : ''}`}`);
  return moves;
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

function gib(b: number): string {
  return b >= 2 ** 30 ? `${(b / 2 ** 30).toFixed(1)} GiB` : `${Math.round(b / 2 ** 20)} MiB`;
}
