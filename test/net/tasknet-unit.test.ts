// The address pool's arithmetic and choices (no namespaces are made here).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { FerryError } from '../../src/errors.js';
import { hostIf, inPool, parseCidr, pickAddress, poolAddresses } from '../../src/net/tasknet.js';

test('a pool is its usable addresses, without network and broadcast', () => {
  assert.deepEqual(poolAddresses('10.1.2.64/30'), ['10.1.2.65', '10.1.2.66']);
  assert.equal(poolAddresses('10.1.2.64/26').length, 62);
  assert.deepEqual(parseCidr('10.1.2.70/26'), { base: parseCidr('10.1.2.64/26').base, bits: 26 }, 'host bits are ignored');
  assert.equal(inPool('10.1.2.64/26', '10.1.2.65'), true);
  assert.equal(inPool('10.1.2.64/26', '10.1.2.64'), false);
  assert.equal(inPool('10.1.2.64/26', '10.1.2.127'), false);
  assert.equal(inPool('10.1.2.64/26', '10.1.2.128'), false);
  assert.equal(inPool('10.1.2.64/26', 'nonsense'), false);
  for (const bad of ['10.1.2.0', '10.1.2.0/33', '10.1.2.0/4', '300.1.2.0/24', 'x/24']) assert.throws(() => parseCidr(bad), FerryError, bad);
});

test('the lowest free address is picked; an exhausted pool says so', () => {
  assert.equal(pickAddress('10.1.2.64/29', []), '10.1.2.65');
  assert.equal(pickAddress('10.1.2.64/29', ['10.1.2.65', '10.1.2.67']), '10.1.2.66');
  assert.throws(() => pickAddress('10.1.2.64/30', ['10.1.2.65', '10.1.2.66']), /every address of the pool 10\.1\.2\.64\/30 is in use/);
});

test("a task's host interface name fits IFNAMSIZ and is the same on every host", () => {
  const n = hostIf('a-very-long-task-name-that-would-not-fit-an-interface-name');
  assert.ok(n.length <= 15, n);
  assert.equal(n, hostIf('a-very-long-task-name-that-would-not-fit-an-interface-name'));
  assert.notEqual(hostIf('a'), hostIf('b'));
});
