// Which connections of a task without its own network can move with it (parsing and policy).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { classify, hostNetArgs, lockRules, lockTable, markedConnections, parseEnd, parseProcNetTcp, type TcpEnds } from '../../src/net/tcp.js';

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

test('ends read as packets name them: IPv4, IPv6 word by word, ports in hex', () => {
  assert.deepEqual(parseEnd('0100007F:22B0'), { family: 4, addr: '127.0.0.1', port: 8880 });
  assert.deepEqual(parseEnd('0A0000C0:0050'), { family: 4, addr: '192.0.0.10', port: 80 });
  assert.deepEqual(parseEnd('00000000000000000000000001000000:1F90'), { family: 6, addr: '0:0:0:0:0:0:0:1', port: 8080 });
  assert.deepEqual(parseEnd('B80D0120000000000000000001000000:0001'), { family: 6, addr: '2001:db8:0:0:0:0:0:1', port: 1 });
  assert.equal(parseEnd('0100007F'), undefined);
  assert.equal(parseEnd('XYZ:0001'), undefined);
});

test('the lock drops each connection both ways, lets CRIU\'s own packets through, and is one table per task', () => {
  const conns: TcpEnds[] = [
    { family: 4, src: '127.0.0.1', sport: 8880, dst: '127.0.0.1', dport: 44494 },
    { family: 6, src: '0:0:0:0:0:0:0:1', sport: 8080, dst: '0:0:0:0:0:0:0:1', dport: 50000 },
  ];
  const text = lockRules('cache', [...conns, conns[0]!]);
  assert.match(text, new RegExp(`^table inet ${lockTable('cache')} \\{`));
  assert.match(text, /set c4 \{ type ipv4_addr \. inet_service \. ipv4_addr \. inet_service; elements = \{ 127\.0\.0\.1 \. 8880 \. 127\.0\.0\.1 \. 44494 \}; \}/, 'each connection once');
  assert.match(text, /set c6 \{ type ipv6_addr \. inet_service \. ipv6_addr \. inet_service; elements = \{ 0:0:0:0:0:0:0:1 \. 8080 \. 0:0:0:0:0:0:0:1 \. 50000 \}; \}/);
  for (const hook of ['output', 'input']) assert.match(text, new RegExp(`hook ${hook} priority -300; meta mark 0xc114 accept; ip saddr \\. tcp sport \\. ip daddr \\. tcp dport @c4 drop; ip6 saddr \\. tcp sport \\. ip6 daddr \\. tcp dport @c6 drop; }`));
  assert.doesNotMatch(lockRules('cache', [conns[0]!]), /c6/, 'no empty set');
  assert.match(lockTable('a task with spaces/and slashes'), /^ferry_tcp_[0-9a-f]{16}$/);
  assert.notEqual(lockTable('a'), lockTable('b'));
});

test('a marker gives back the connections it holds, and nothing that is not one', () => {
  const c: TcpEnds = { family: 4, src: '127.0.0.1', sport: 1, dst: '127.0.0.1', dport: 2 };
  assert.deepEqual(markedConnections(JSON.stringify([c])), [c]);
  assert.deepEqual(markedConnections(''), [], 'older dumps left an empty marker');
  assert.deepEqual(markedConnections('{"family":4}'), []);
  assert.deepEqual(markedConnections(JSON.stringify([{ ...c, src: '127.0.0.1; flush ruleset' }, { ...c, sport: 70000 }, { ...c, family: 5 }])), [], 'nothing reaches nft but addresses and ports');
});
