// The lazy-pages link's two in-process parts: the stream pair that joins the destination's
// front to its tunnel, and the resumable tunnel itself, over carrying streams that cut its
// messages at arbitrary bytes (as the connection's frames may) and that are lost mid-transfer.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { randomBytes } from 'node:crypto';
import type { Duplex } from 'node:stream';
import { test } from 'node:test';
import { ResumableTunnel } from '../../src/migrate/resumable.js';
import { localPair } from '../../src/migrate/tunnel.js';

const tick = () => new Promise((r) => setImmediate(r));

function collect(s: Duplex): { bytes: () => Buffer } {
  const parts: Buffer[] = [];
  s.on('data', (c: Buffer) => parts.push(c));
  return { bytes: () => Buffer.concat(parts) };
}

async function until(cond: () => boolean, what: string, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

test('localPair carries bytes both ways in order, with backpressure, ends and resets', async () => {
  const [a, b] = localPair();
  const got = collect(b);
  const back = collect(a);
  const sent = [randomBytes(100), randomBytes(70_000), randomBytes(1)];
  for (const c of sent) a.write(c);
  b.write(Buffer.from('pong'));
  await until(() => got.bytes().length === 70_101 && back.bytes().length === 4, 'both directions');
  assert.deepEqual(got.bytes(), Buffer.concat(sent));
  assert.equal(back.bytes().toString(), 'pong');

  // A reader that stops reading holds the writer back.
  const [c, d] = localPair();
  d.pause();
  let full = false;
  for (let i = 0; i < 64 && !full; i++) full = !c.write(randomBytes(64 * 1024));
  assert.ok(full, 'a writer whose peer does not read must see backpressure');
  const drained = once(c, 'drain');
  d.resume();
  await drained;

  // Ending one side ends the other's reading; destroying one closes both.
  const ended = once(b, 'end');
  a.end();
  await ended;
  const closed = once(d, 'close');
  c.destroy();
  await closed;
  assert.ok(d.destroyed);
});

/**
 * Two tunnels over a carrying link that re-cuts every chunk into pieces of 1-7 bytes or up to
 * 20 KiB, so message headers and payloads arrive split anywhere.
 */
function carrier(): { left: Duplex; right: Duplex; cut: () => void } {
  const [left, l2] = localPair();
  const [r1, right] = localPair();
  const chop = (from: Duplex, to: Duplex) =>
    from.on('data', (c: Buffer) => {
      let off = 0;
      while (off < c.length) {
        const n = Math.random() < 0.5 ? 1 + Math.floor(Math.random() * 7) : 1 + Math.floor(Math.random() * 20_000);
        if (!to.destroyed) to.write(c.subarray(off, off + n));
        off += n;
      }
    });
  chop(l2, r1);
  chop(r1, l2);
  // A lost connection: each tunnel sees its stream close.
  return { left, right, cut: () => (left.destroy(), right.destroy()) };
}

test('the tunnel passes bytes both ways exactly once, across split messages and a lost connection', async () => {
  const [srcProgram, srcLocal] = localPair();
  const [dstLocal, dstProgram] = localPair();
  const src = new ResumableTunnel(srcLocal);
  const dst = new ResumableTunnel(dstLocal, { holdEnd: true });
  const atDst = collect(dstProgram);
  const atSrc = collect(srcProgram);
  let link = carrier();
  src.attach(link.left, 0);
  dst.attach(link.right, 0);

  const down = randomBytes(3 * 1024 * 1024);
  const up = randomBytes(200_000);
  // Written in pieces, half before the cut and half after.
  for (let off = 0; off < down.length / 2; off += 50_000) srcProgram.write(down.subarray(off, Math.min(off + 50_000, down.length / 2)));
  for (let off = 0; off < up.length / 2; off += 3_000) dstProgram.write(up.subarray(off, Math.min(off + 3_000, up.length / 2)));
  await until(() => atDst.bytes().length > 100_000, 'some bytes across');

  link.cut();
  await tick();
  assert.equal(src.attached, false);
  assert.equal(dst.attached, false);
  for (let off = down.length / 2; off < down.length; off += 50_000) srcProgram.write(down.subarray(off, Math.min(off + 50_000, down.length)));
  for (let off = up.length / 2; off < up.length; off += 3_000) dstProgram.write(up.subarray(off, off + 3_000));

  // The resume: each side says how much it received; the other resends from there.
  link = carrier();
  src.attach(link.left, dst.received);
  dst.attach(link.right, src.received);
  await until(() => atDst.bytes().length >= down.length && atSrc.bytes().length >= up.length, 'everything across');
  await tick();
  assert.equal(atDst.bytes().length, down.length, 'no byte twice');
  assert.ok(atDst.bytes().equals(down), 'source to destination in order');
  assert.equal(atSrc.bytes().length, up.length, 'no byte back twice');
  assert.ok(atSrc.bytes().equals(up), 'destination to source in order');

  // The destination's program closing is passed on only once confirmed.
  let srcSawEnd = false;
  src.on('peerEnded', () => (srcSawEnd = true));
  dstProgram.end();
  await new Promise((r) => setTimeout(r, 30));
  assert.equal(srcSawEnd, false, 'an unconfirmed end must not reach the peer');
  dst.confirmEnd();
  await until(() => srcSawEnd, "the source's peerEnded");
  src.destroy();
  dst.destroy();
});

test('the tunnel drops a connection that sends a malformed message, and keeps its program', async () => {
  const [, local] = localPair();
  const t = new ResumableTunnel(local);
  const [ours, theirs] = localPair();
  t.attach(ours, 0);
  const errors: Error[] = [];
  t.on('protocolError', (e: Error) => errors.push(e));
  const detached = once(t, 'detached');
  theirs.write(Buffer.from('D\x00\x20\x00\x00')); // 2 MiB: more than a message may be
  await detached;
  assert.match(errors[0]!.message, /message of 2097152 bytes/);
  assert.equal(t.attached, false);
  assert.equal(local.destroyed, false);
  t.destroy();
});
