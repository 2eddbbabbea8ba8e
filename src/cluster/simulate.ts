// The cluster at scale, without the cluster: the placement and drain code of placement.ts over
// 1,000 hosts and 100,000 tasks, with migrations that take the time the benchmark measured
// (a fixed cost, plus memory at the link's rate shared by a host's outbound migrations).
import { ClusterState, DEFAULT_LIMITS, NoRoom, startable, type Limits, type Move } from './placement.js';

export interface SimOptions {
  hosts: number;
  tasks: number;
  hostMemGiB: number;
  rackSize: number;
  /** Each host's link, MiB/s, shared by its outbound migrations. */
  linkMiBps: number;
  /** Per migration besides the memory: checks, freeze, restore, local fill (seconds). */
  overheadS: number;
  limits: Limits;
  /** Rolling upgrade: this share of the hosts, this many at a time, this long each. */
  upgradeShare: number;
  upgradeBatch: number;
  upgradeS: number;
  seed: number;
}

/** Measured on the lab's 1 Gbit/s link (README, pre-copy at 1 GiB): ~112 MiB/s during rounds, ~3.5 s besides. */
export const DEFAULT_SIM: SimOptions = {
  hosts: 1000,
  tasks: 100_000,
  hostMemGiB: 256,
  rackSize: 40,
  linkMiBps: 112,
  overheadS: 3.5,
  limits: DEFAULT_LIMITS,
  upgradeShare: 0.1,
  upgradeBatch: 10,
  upgradeS: 600,
  seed: 1,
};

export interface Scenario {
  name: string;
  hosts: number;
  migrated: number;
  stopped: number;
  movedGiB: number;
  /** From the first migration to the host(s) being empty (and, for the upgrade, back in use). */
  seconds: number;
  /** The controller's own cost: placement and scheduling CPU, and its heap. */
  controllerCpuMs: number;
  controllerHeapMiB: number;
}

export interface SimResult {
  options: SimOptions;
  placed: number;
  unplaced: number;
  fillPercent: number;
  placeCpuMs: number;
  scenarios: Scenario[];
}

/** A small deterministic generator (mulberry32), so runs can be compared. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const GiB = 2 ** 30;
const MiB = 2 ** 20;

function build(o: SimOptions): { c: ClusterState; placed: number; unplaced: number; cpuMs: number } {
  const random = rng(o.seed);
  const c = new ClusterState();
  for (let i = 0; i < o.hosts; i++) {
    const name = `h${String(i).padStart(4, '0')}`;
    c.addHost({ name, memBytes: o.hostMemGiB * GiB, cordoned: false, healthy: true, rack: `r${Math.floor(i / o.rackSize)}` });
  }
  let placed = 0;
  let unplaced = 0;
  const cpu0 = process.cpuUsage();
  for (let i = 0; i < o.tasks; i++) {
    // Sizes spread from 64 MiB to 8 GiB (log-uniform), most tasks at low priority.
    const memBytes = Math.round(64 * MiB * 2 ** (random() * 7) / 4096) * 4096;
    const r = random();
    const priority = r < 0.6 ? 0 : r < 0.85 ? 1 : r < 0.97 ? 2 : 3;
    try {
      const p = c.place({ priority, memBytes });
      if (p.moves.length || p.stops.length) throw new NoRoom('full');
      c.addTask({ name: `t${i}`, priority, memBytes, host: p.host });
      placed++;
    } catch (e) {
      if (!(e instanceof NoRoom)) throw e;
      unplaced++;
    }
  }
  const d = process.cpuUsage(cpu0);
  return { c, placed, unplaced, cpuMs: Math.round((d.user + d.system) / 1000) };
}

/**
 * Drains the given hosts at once: plans every move first, then runs them under the limits,
 * each taking the modelled time; returns when all are done.
 */
function drain(c: ClusterState, hosts: string[], o: SimOptions, clock: { now: number }): { migrated: number; stopped: number; movedBytes: number } {
  for (const h of hosts) c.hosts.get(h)!.cordoned = true;
  const queue: Move[] = [];
  let stopped = 0;
  for (const h of hosts) {
    const plan = c.drainPlan(h, true);
    for (const s of plan.stops) c.removeTask(s);
    stopped += plan.stops.length;
    // Reserve at once, so the next host's plan sees the room taken.
    for (const m of plan.moves) c.startMove(m);
    queue.push(...plan.moves);
  }
  const running: Array<{ m: Move; end: number }> = [];
  let migrated = 0;
  let movedBytes = 0;
  while (queue.length || running.length) {
    const go = startable(queue, running.map((r) => r.m), o.limits);
    for (const m of go) {
      queue.splice(queue.indexOf(m), 1);
      const outbound = running.filter((r) => r.m.from === m.from).length + 1;
      const mem = c.tasks.get(m.task)!.memBytes;
      running.push({ m, end: clock.now + o.overheadS + mem / MiB / (o.linkMiBps / outbound) });
    }
    running.sort((a, b) => a.end - b.end);
    const next = running.shift();
    if (!next) break;
    clock.now = next.end;
    movedBytes += c.tasks.get(next.m.task)!.memBytes;
    c.endMove(next.m, true);
    migrated++;
  }
  return { migrated, stopped, movedBytes };
}

function measure(name: string, hosts: number, f: () => { migrated: number; stopped: number; movedBytes: number; seconds: number }): Scenario {
  const cpu0 = process.cpuUsage();
  const r = f();
  const d = process.cpuUsage(cpu0);
  return {
    name,
    hosts,
    migrated: r.migrated,
    stopped: r.stopped,
    movedGiB: Math.round((r.movedBytes / GiB) * 10) / 10,
    seconds: Math.round(r.seconds),
    controllerCpuMs: Math.round((d.user + d.system) / 1000),
    controllerHeapMiB: Math.round(process.memoryUsage().heapUsed / MiB),
  };
}

export function simulate(o: SimOptions = DEFAULT_SIM): SimResult {
  const { c, placed, unplaced, cpuMs } = build(o);
  const used = [...c.free.values()].reduce((sum, f) => sum + (o.hostMemGiB * GiB - f), 0);
  const scenarios: Scenario[] = [];
  const names = [...c.hosts.keys()];
  const uncordon = (hs: string[]) => hs.forEach((h) => (c.hosts.get(h)!.cordoned = false));
  scenarios.push(
    measure('drain one host', 1, () => {
      const clock = { now: 0 };
      const r = drain(c, [names[0]!], o, clock);
      uncordon([names[0]!]);
      return { ...r, seconds: clock.now };
    }),
  );
  const rack = names.filter((h) => c.hosts.get(h)!.rack === 'r1');
  scenarios.push(
    measure(`drain one rack (${rack.length} hosts)`, rack.length, () => {
      const clock = { now: 0 };
      const r = drain(c, rack, o, clock);
      uncordon(rack);
      return { ...r, seconds: clock.now };
    }),
  );
  // Spread over the cluster (every n-th host), as an upgrade of a share of the fleet would be.
  const count = Math.round(o.hosts * o.upgradeShare);
  const step = Math.max(1, Math.floor(o.hosts / count));
  const upgrade = names.filter((_, i) => i % step === step - 1).slice(0, count);
  scenarios.push(
    measure(`rolling upgrade of ${Math.round(o.upgradeShare * 100)} % (${count} hosts, ${o.upgradeBatch} at a time, ${o.upgradeS / 60} min each)`, count, () => {
      const clock = { now: 0 };
      let migrated = 0;
      let stopped = 0;
      let movedBytes = 0;
      for (let i = 0; i < upgrade.length; i += o.upgradeBatch) {
        const batch = upgrade.slice(i, i + o.upgradeBatch);
        const r = drain(c, batch, o, clock);
        migrated += r.migrated;
        stopped += r.stopped;
        movedBytes += r.movedBytes;
        clock.now += o.upgradeS;
        uncordon(batch);
      }
      return { migrated, stopped, movedBytes, seconds: clock.now };
    }),
  );
  return { options: o, placed, unplaced, fillPercent: Math.round((used / (o.hosts * o.hostMemGiB * GiB)) * 100), placeCpuMs: cpuMs, scenarios };
}

export function renderSimulation(r: SimResult): string {
  const o = r.options;
  const dur = (s: number) => (s >= 3600 ? `${(s / 3600).toFixed(1)} h` : s >= 60 ? `${(s / 60).toFixed(1)} min` : `${s} s`);
  return [
    `Simulated cluster: ${o.hosts} hosts of ${o.hostMemGiB} GiB in racks of ${o.rackSize}, ${r.placed} tasks placed (${r.unplaced} found no room), ${r.fillPercent} % of memory used; placing them took the controller ${r.placeCpuMs} ms of CPU.`,
    `Migrations modelled from the benchmark: ${o.overheadS} s each plus memory at ${o.linkMiBps} MiB/s per host link, shared by its outbound migrations; at most ${o.limits.perHost} outbound per host and ${o.limits.perCluster} in the cluster.`,
    '',
    '| scenario | migrated | stopped | memory moved | time | controller CPU | controller heap |',
    '| --- | --- | --- | --- | --- | --- | --- |',
    ...r.scenarios.map((s) => `| ${s.name} | ${s.migrated} | ${s.stopped} | ${s.movedGiB} GiB | ${dur(s.seconds)} | ${s.controllerCpuMs} ms | ${s.controllerHeapMiB} MiB |`),
    '',
  ].join('\n');
}
