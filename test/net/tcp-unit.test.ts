// Which connections of a task without its own network can move with it (parsing and policy).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { classify, hostNetArgs, parseProcNetTcp } from '../../src/net/tcp.js';

const HEAD = '  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode';
const row = (local: string, remote: string, st: string, inode: number) => `   0: ${local} ${remote} ${st} 00000000:00000000 00:00000000 00000000     0        0 ${inode} 1 0000000000000000 20 4 30 10 -1`;

test('a loopback connection between two of the task\'s sockets is internal; one to anything else is not', () => {
  const v4 = parseProcNetTcp([HEAD, row('0100007F:22B0', '0100007F:ADCE', '01', 11), row('0100007F:ADCE', '0100007F:22B0', '01', 12), row('00000000:22B0', '00000000:0000', '0A', 13)].join('\n'));
  assert.equal(v4.size, 2, 'listening sockets are not connections');
  assert.equal(classify([...v4.values()]), 'internal');
  assert.equal(classify([v4.get('11')!]), 'external', 'the other end is not the task\'s');
  assert.equal(classify([]), 'none');
  assert.deepEqual(hostNetArgs('internal'), ['--tcp-established', '--network-lock', 'skip']);
  assert.deepEqual(hostNetArgs('external'), ['--tcp-close']);
  assert.deepEqual(hostNetArgs('none'), hostNetArgs('internal'), 'closed sockets keep their addresses');
});

test('an IPv4 end and an IPv4-mapped IPv6 end of one connection match; closed sockets do not count against', () => {
  const v6 = parseProcNetTcp([HEAD, row('0000000000000000FFFF00000100007F:1F90', '0000000000000000FFFF00000100007F:C350', '01', 21)].join('\n'));
  const v4 = parseProcNetTcp([HEAD, row('0100007F:C350', '0100007F:1F90', '01', 22), row('0100007F:C351', '0A00000A:0050', '07', 23)].join('\n'));
  assert.equal(classify([...v6.values(), ...v4.values()]), 'internal');
});
