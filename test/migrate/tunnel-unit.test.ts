// The bridge between a stream of the session and a program on this host (rsync's receiving
// server): a program that exits before its peer ends must still have all it wrote delivered.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { test } from 'node:test';
import { createServer } from 'node:net';
import { bridgeProgram, connectWhenListening, localPair, ownLoopbackEndpoint } from '../../src/migrate/tunnel.js';

/** Runs `sh -c script` bridged to one side of a pair; the other side is the peer. */
async function bridged(script: string, peerSends: number, endFirst = false): Promise<{ got: number; text: string; ended: boolean; code: number | null }> {
  const [mine, peer] = localPair();
  const child = spawn('sh', ['-c', script], { stdio: ['pipe', 'pipe', 'ignore'] });
  const exited = once(child, 'close');
  const done = bridgeProgram(mine, child.stdin, child.stdout);
  let got = 0;
  let text = '';
  let ended = false;
  // A slow reader (a link that grants credit late): the program's output backs up behind it.
  peer.on('data', (c: Buffer) => {
    got += c.length;
    if (text.length < 100) text += c.toString('latin1');
    peer.pause();
    setTimeout(() => peer.resume(), 1);
  });
  const end = new Promise<void>((resolve) => {
    peer.once('end', () => {
      ended = true;
      resolve();
    });
    peer.once('close', () => resolve());
  });
  // The peer keeps talking while (and after) the program answers, and (unless endFirst) ends its
  // side only once it has read the program's end, as rsync's sender does.
  const chunk = Buffer.alloc(64 * 1024, 7);
  for (let sent = 0; sent < peerSends && !peer.destroyed; sent += chunk.length) {
    if (!peer.write(chunk)) await Promise.race([once(peer, 'drain'), once(peer, 'close')]);
  }
  if (endFirst) peer.end();
  await end;
  peer.end();
  await done;
  const [code] = (await exited) as [number | null];
  return { got, text, ended, code };
}

test('a program that exits without reading its peer to the end has all its output delivered, then a clean end', async () => {
  for (let i = 0; i < 5; i++) {
    const r = await bridged('head -c 3000000 /dev/zero', 0);
    assert.equal(r.code, 0);
    assert.equal(r.got, 3_000_000, `run ${i}: the peer got ${r.got} of 3000000 bytes`);
    assert.ok(r.ended, `run ${i}: the stream ended cleanly`);
  }
});

test('what the peer sends after the program stopped reading is drained, not a stall', async () => {
  // Reads a little, answers, exits: the peer's other 4 MB meet a closed stdin.
  const r = await bridged('head -c 1000 >/dev/null; head -c 2000000 /dev/zero', 4 * 1024 * 1024);
  assert.equal(r.got, 2_000_000);
  assert.ok(r.ended);
});

test('a program that reads all its peer sends sees it whole and its end', async () => {
  const r = await bridged('wc -c', 3 * 64 * 1024, true);
  assert.equal(r.text.trim(), String(3 * 64 * 1024));
  assert.ok(r.ended);
});

test('a stream cut off ends the program: it does not wait for a peer that is gone', async () => {
  const [mine, peer] = localPair();
  // cat would copy for ever; the peer vanishes after its first answer.
  const child = spawn('cat', [], { stdio: ['pipe', 'pipe', 'ignore'] });
  const exited = once(child, 'close');
  const done = bridgeProgram(mine, child.stdin, child.stdout);
  peer.write(Buffer.from('hello'));
  await once(peer, 'data');
  peer.destroy();
  await done;
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  const [code, signal] = (await exited) as [number | null, string | null];
  clearTimeout(timer);
  assert.notEqual(signal, 'SIGKILL', 'the program had to be killed: its pipes stayed open');
  assert.ok(code !== null || signal !== null);
});

test('a program told its loopback address and port is reached there, and not through another migration holding the same port', async () => {
  // Two migrations whose ports came out the same: each listens on its own address, both bind.
  const first = await ownLoopbackEndpoint();
  const [a, b] = [first.address, (await ownLoopbackEndpoint()).address];
  assert.notEqual(a, b);
  assert.match(a, /^127\.77\.\d+\.\d+$/);
  const port = first.port;
  const servers = [a, b].map((host) => {
    const srv = createServer((s) => s.end(host));
    return { srv, listening: new Promise<void>((resolve, reject) => srv.once('error', reject).listen(port, host, () => resolve())) };
  });
  try {
    await Promise.all(servers.map((x) => x.listening));
    for (const host of [a, b]) {
      const sock = await connectWhenListening({ address: host, port }, 2000, () => true);
      let said = '';
      for await (const c of sock) said += String(c);
      assert.equal(said, host);
    }
  } finally {
    await Promise.all(servers.map((x) => new Promise((r) => x.srv.close(r))));
  }
});
