// The page-stream codec: what goes in comes out, in any chunking; a hostile stream is refused
// with a clear error; auto sends incompressible data raw.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { test } from 'node:test';
import { compressSync } from 'lz4-napi';
import { Compressor, Decompressor } from '../../src/wire/codec.js';

/** Pages like a task's: some zero, some text, some random, in pieces of odd sizes. */
function memory(pages: number): Buffer {
  const b = Buffer.alloc(pages * 4096);
  for (let p = 0; p < pages; p++) {
    const page = b.subarray(p * 4096, (p + 1) * 4096);
    if (p % 3 === 1) page.write(`key:${p} value:${'abc'.repeat(100)}`.repeat(4));
    if (p % 3 === 2) randomBytes(4096).copy(page);
  }
  return b;
}

function chunks(b: Buffer): Buffer[] {
  const out: Buffer[] = [];
  for (let off = 0; off < b.length; ) {
    const n = 1 + Math.floor(Math.random() * 70_000);
    out.push(b.subarray(off, off + n));
    off += n;
  }
  return out;
}

async function collect(src: Readable): Promise<Buffer> {
  const got: Buffer[] = [];
  await pipeline(src, new Writable({ write: (c: Buffer, _e, cb) => (got.push(c), cb()) }));
  return Buffer.concat(got);
}

test('codec: a round trip gives back every byte, whatever the chunking', async () => {
  for (const mode of ['on', 'auto'] as const) {
    const data = memory(700);
    const c = new Compressor(mode, () => 100);
    const wire = await collect(Readable.from(chunks(data)).pipe(c));
    const back = await collect(Readable.from(chunks(wire)).pipe(new Decompressor()));
    assert.ok(back.equals(data), `${mode}: decoded stream differs`);
    assert.equal(c.stats.rawBytes, data.length);
    assert.equal(c.stats.wireBytes, wire.length);
    if (mode === 'on') {
      assert.ok(wire.length < data.length * 0.8, `${mode}: ${wire.length} of ${data.length} bytes`);
      assert.ok(c.stats.compressedFrames > 0);
    }
  }
});

test('codec: a partial frame goes out without waiting for more (request-answer protocols)', async () => {
  const c = new Compressor('on');
  const d = new Decompressor();
  c.pipe(d);
  const got = new Promise<Buffer>((res) => d.once('data', res));
  c.write(Buffer.from('hello page server'));
  const first = await Promise.race([got, new Promise<null>((r) => setTimeout(() => r(null), 2000))]);
  assert.equal(first?.toString(), 'hello page server');
  c.destroy();
});

test('codec: auto sends incompressible pages raw, probing now and then', async () => {
  const data = randomBytes(16 << 20);
  const c = new Compressor('auto', () => 100);
  const wire = await collect(Readable.from(chunks(data)).pipe(c));
  assert.ok(c.stats.compressedFrames === 0, 'random data never shrinks');
  assert.ok(c.stats.frames >= 64);
  assert.ok(wire.length <= data.length + c.stats.frames * 9);
});

test('codec: auto stops compressing when the link is faster than the codec', async () => {
  const data = memory(4096);
  const c = new Compressor('auto', () => 1e9);
  await collect(Readable.from(chunks(data)).pipe(c));
  // The first frame measures the codec; after that, only probes.
  assert.ok(c.stats.compressedFrames <= 1 + Math.ceil(c.stats.frames / 32), `${c.stats.compressedFrames} of ${c.stats.frames}`);
});

test('codec: auto sends raw while the codec, not the link, is what the stream waits for', async (t) => {
  const data = memory(16384); // 64 MiB, a third of it text
  // A link that takes everything at once: compressing could only slow the stream.
  const fast = new Compressor('auto', () => 100);
  await collect(Readable.from(chunks(data)).pipe(fast));
  t.diagnostic(`fast link: ${fast.stats.compressedFrames} of ${fast.stats.frames}`);
  assert.ok(fast.stats.compressedFrames <= 2 + Math.ceil(fast.stats.frames / 16), `fast link: ${fast.stats.compressedFrames} of ${fast.stats.frames} frames compressed`);
  // A link that pushes back (about 25 MB/s of frames: 2 ms a write, header and body apart),
  // measured as such: every frame that shrinks is worth compressing.
  const slow = new Compressor('auto', () => 25);
  const sink = new Writable({ highWaterMark: 64 << 10, write: (_c: Buffer, _e, cb) => setTimeout(cb, 2) });
  await pipeline(Readable.from(chunks(data.subarray(0, 16 << 20))), slow, sink);
  t.diagnostic(`slow link: ${slow.stats.compressedFrames} of ${slow.stats.frames}`);
  assert.ok(slow.stats.compressedFrames >= slow.stats.frames * 0.5, `slow link: ${slow.stats.compressedFrames} of ${slow.stats.frames} frames compressed`);
});

function frame(kind: number, rawLen: number, body: Buffer): Buffer {
  const h = Buffer.alloc(9);
  h.writeUInt8(kind, 0);
  h.writeUInt32LE(rawLen, 1);
  h.writeUInt32LE(body.length, 5);
  return Buffer.concat([h, body]);
}

test('codec: hostile frames are refused before anything big is allocated', async () => {
  const z = compressSync(Buffer.alloc(8192, 7));
  const lie = Buffer.from(z);
  lie.writeUInt32LE(1 << 30, 0);
  const cases: Array<[string, Buffer, RegExp]> = [
    ['unknown kind', frame(9, 4, Buffer.alloc(4)), /unknown frame kind 9/],
    ['huge frame', frame(1, 1 << 30, Buffer.alloc(4)), /at most/],
    ['raw lengths differ', frame(0, 10, Buffer.alloc(4)), /lengths differ/],
    ['size prefix lies', frame(1, 8192, lie), /does not match/],
    ['garbage body', frame(1, 8192, Buffer.concat([z.subarray(0, 4), randomBytes(60)])), /does not decode|wrong length/],
    ['cut inside a frame', frame(0, 100, Buffer.alloc(100)).subarray(0, 50), /ends inside a frame/],
  ];
  for (const [what, bytes, re] of cases) {
    await assert.rejects(collect(Readable.from([bytes]).pipe(new Decompressor())), (e: Error) => re.test(e.message) && /compressed page stream/.test(e.message), what);
  }
});
