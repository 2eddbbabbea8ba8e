// The simulator runs the placement and drain code at a small scale: deterministic, every task on
// a drained host migrated or counted as stopped, and time that follows the modelled link.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { DEFAULT_SIM, simulate, type SimOptions } from '../../src/cluster/simulate.js';

const small: SimOptions = { ...DEFAULT_SIM, hosts: 40, tasks: 800, hostMemGiB: 64, rackSize: 8, upgradeBatch: 2 };

test('simulation: same seed, same result; drains migrate what fits and say what stops', () => {
  const a = simulate(small);
  const b = simulate(small);
  assert.deepEqual(
    a.scenarios.map(({ controllerCpuMs: _c, controllerHeapMiB: _h, ...s }) => s),
    b.scenarios.map(({ controllerCpuMs: _c, controllerHeapMiB: _h, ...s }) => s),
  );
  assert.ok(a.placed > 0 && a.fillPercent > 0 && a.fillPercent <= 100);
  const [one, rack, upgrade] = a.scenarios;
  assert.ok(one!.migrated > 0 && one!.seconds > 0, JSON.stringify(one));
  // One host's tasks go out at most 2 at a time over its link: at least their memory's link time.
  assert.ok(one!.seconds >= (one!.movedGiB * 1024) / small.linkMiBps / 1, `${one!.seconds} s for ${one!.movedGiB} GiB`);
  assert.equal(rack!.hosts, 8);
  assert.ok(rack!.migrated >= one!.migrated);
  assert.equal(upgrade!.hosts, 4);
  // The upgrade waits the modelled time per batch on top of the drains.
  assert.ok(upgrade!.seconds >= 2 * small.upgradeS);
});

test('simulation: a full cluster stops what fits nowhere instead of overfilling a host', () => {
  const full = simulate({ ...small, hosts: 8, tasks: 4000, rackSize: 4, upgradeBatch: 1, upgradeShare: 0.25 });
  assert.ok(full.fillPercent >= 90, `${full.fillPercent} %`);
  assert.ok(full.scenarios.some((s) => s.stopped > 0), JSON.stringify(full.scenarios));
});
