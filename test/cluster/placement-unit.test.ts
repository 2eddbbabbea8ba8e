// Placement policy: where a task goes, what a higher-priority task displaces, how a host is
// emptied, and how many migrations run at once (policy only; the controller drives real agents).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { DEFAULT_LIMITS, NoRoom, drainPlan, place, startable, usedMemory, type HostState, type Snapshot, type TaskState } from '../../src/cluster/placement.js';

const G = 2 ** 30;
const host = (name: string, gib: number, extra: Partial<HostState> = {}): HostState => ({ name, memBytes: gib * G, cordoned: false, healthy: true, ...extra });
const task = (name: string, gib: number, priority: number, on?: string): TaskState => ({ name, memBytes: gib * G, priority, ...(on ? { host: on } : {}) });

test('place: best fit among hosts with room; cordoned and unhealthy hosts take nothing', () => {
  const s: Snapshot = { hosts: [host('h1', 16), host('h2', 16), host('h3', 16, { cordoned: true }), host('h4', 16, { healthy: false })], tasks: [task('a', 10, 1, 'h1'), task('b', 4, 1, 'h2')] };
  assert.deepEqual(place(s, { priority: 1, memBytes: 5 * G }), { host: 'h1', moves: [], stops: [] });
  assert.deepEqual(place(s, { priority: 1, memBytes: 7 * G }), { host: 'h2', moves: [], stops: [] });
});

test('place: a higher-priority task migrates lower ones away instead of stopping them', () => {
  const s: Snapshot = { hosts: [host('h1', 16), host('h2', 16), host('h3', 16)], tasks: [task('low1', 8, 0, 'h1'), task('low2', 8, 0, 'h1'), task('mid', 12, 1, 'h2'), task('x', 12, 5, 'h3')] };
  const p = place(s, { priority: 3, memBytes: 8 * G });
  // No other host has 8 GiB free for a displaced task: one must stop, on h1 as on h2.
  assert.equal(p.host, 'h1');
  assert.equal(p.stops.length, 1);
  const roomy: Snapshot = { ...s, hosts: [...s.hosts, host('h4', 16)] };
  const q = place(roomy, { priority: 3, memBytes: 8 * G });
  assert.deepEqual(q, { host: 'h4', moves: [], stops: [] }, 'room somewhere: nothing moves');
  // Nowhere 10 GiB free; on h1 a 6 GiB low task makes room, and h2 or h3 can take it.
  const full: Snapshot = { hosts: [host('h1', 16), host('h2', 16), host('h3', 16)], tasks: [task('low', 6, 0, 'h1'), task('fill', 6, 5, 'h1'), task('x', 10, 5, 'h2'), task('y', 10, 5, 'h3')] };
  assert.deepEqual(place(full, { priority: 3, memBytes: 10 * G }), { host: 'h1', moves: [{ task: 'low', from: 'h1', to: 'h2' }], stops: [] });
});

test('place: the same or higher priority is never displaced; too big is said plainly', () => {
  const s: Snapshot = { hosts: [host('h1', 16)], tasks: [task('a', 16, 3, 'h1')] };
  assert.throws(() => place(s, { priority: 3, memBytes: 1 * G }), NoRoom);
  assert.throws(() => place(s, { priority: 9, memBytes: 32 * G }), /needs 32.0 GiB and the largest host that takes tasks has 16.0 GiB/);
});

test('drain: every task to a host with room, or refused before anything moves', () => {
  const s: Snapshot = { hosts: [host('h1', 16), host('h2', 16), host('h3', 16)], tasks: [task('a', 6, 1, 'h1'), task('b', 6, 1, 'h1'), task('c', 10, 1, 'h2'), task('d', 4, 1, 'h3')] };
  const moves = drainPlan(s, 'h1');
  assert.equal(moves.length, 2);
  const after: Snapshot = { ...s, tasks: s.tasks.map((t) => ({ ...t, host: moves.find((m) => m.task === t.name)?.to ?? t.host })) };
  for (const [h, used] of usedMemory(after)) assert.ok(used <= 16 * G, `${h} over capacity`);
  assert.equal(usedMemory(after).get('h1'), 0);
  assert.throws(() => drainPlan({ hosts: [host('h1', 16), host('h2', 8)], tasks: [task('big', 12, 1, 'h1')] }, 'h1'), /no other host has room for big \(12.0 GiB\)/);
  assert.throws(() => drainPlan({ hosts: [host('h1', 16)], tasks: [task('a', 1, 1, 'h1')] }, 'h1'), NoRoom);
});

test('limits: at most 2 outbound per host and 5 in the cluster, one migration per task', () => {
  const q = ['a', 'b', 'c'].flatMap((h) => [1, 2, 3].map((i) => ({ task: `${h}${i}`, from: h, to: 'z' })));
  const go = startable(q, [], DEFAULT_LIMITS);
  assert.equal(go.length, 5);
  assert.deepEqual(go.map((m) => m.task), ['a1', 'a2', 'b1', 'b2', 'c1']);
  assert.deepEqual(startable(q, [{ task: 'a1', from: 'a', to: 'z' }], DEFAULT_LIMITS).map((m) => m.task), ['a2', 'b1', 'b2', 'c1']);
});

test('property: a drain plan never overfills a host, and a placement fits after its moves', () => {
  const arb = fc.record({
    hosts: fc.array(fc.integer({ min: 4, max: 64 }), { minLength: 2, maxLength: 8 }),
    tasks: fc.array(fc.record({ gib: fc.integer({ min: 1, max: 16 }), prio: fc.integer({ min: 0, max: 3 }), on: fc.nat() }), { maxLength: 30 }),
    newGib: fc.integer({ min: 1, max: 32 }),
  });
  fc.assert(
    fc.property(arb, ({ hosts, tasks, newGib }) => {
      const hs = hosts.map((g, i) => host(`h${i}`, g));
      const free = new Map(hs.map((h) => [h.name, h.memBytes]));
      const ts: TaskState[] = [];
      tasks.forEach((t, i) => {
        const h = hs[t.on % hs.length]!;
        if (free.get(h.name)! >= t.gib * G) {
          free.set(h.name, free.get(h.name)! - t.gib * G);
          ts.push(task(`t${i}`, t.gib, t.prio, h.name));
        }
      });
      const s: Snapshot = { hosts: hs, tasks: ts };
      const apply = (moves: { task: string; to: string }[], stops: string[] = []): Snapshot => ({
        hosts: hs,
        tasks: ts.filter((t) => !stops.includes(t.name)).map((t) => ({ ...t, host: moves.find((m) => m.task === t.name)?.to ?? t.host })),
      });
      try {
        const moves = drainPlan(s, 'h0');
        for (const [h, used] of usedMemory(apply(moves))) assert.ok(used <= hs.find((x) => x.name === h)!.memBytes);
      } catch (e) {
        if (!(e instanceof NoRoom)) throw e;
      }
      try {
        const p = place(s, { priority: 2, memBytes: newGib * G });
        const after = apply(p.moves, p.stops);
        for (const m of p.moves) assert.ok(ts.find((t) => t.name === m.task)!.priority < 2, 'only lower priority moves');
        const used = usedMemory(after);
        assert.ok(used.get(p.host)! + newGib * G <= hs.find((x) => x.name === p.host)!.memBytes, 'the task fits after the moves');
        for (const [h, u] of used) assert.ok(u <= hs.find((x) => x.name === h)!.memBytes, `${h} overfilled by the moves`);
      } catch (e) {
        if (!(e instanceof NoRoom)) throw e;
      }
    }),
    { numRuns: 300 },
  );
});
