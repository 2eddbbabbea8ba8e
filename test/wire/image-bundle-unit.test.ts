// The images bundle: files arrive whole whatever the chunking, and bad bundles are refused.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { randomBytes } from 'node:crypto';
import { ImageBundleWriter, imageHeader } from '../../src/wire/image-bundle.js';

function bundle(files: Array<[string, Buffer]>): Buffer {
  return Buffer.concat(files.flatMap(([n, d]) => [imageHeader(n, d.length), d]));
}

async function receive(data: Buffer, chunk: number): Promise<{ dir: string; error?: Error }> {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-bundle-test-'));
  const chunks: Buffer[] = [];
  for (let i = 0; i < data.length; i += chunk) chunks.push(data.subarray(i, i + chunk));
  try {
    await pipeline(Readable.from(chunks), new ImageBundleWriter(dir));
    return { dir };
  } catch (e) {
    return { dir, error: e as Error };
  }
}

test('files arrive whole whatever the chunking, empty ones too', async () => {
  const files: Array<[string, Buffer]> = [
    ['inventory.img', randomBytes(37)],
    ['empty.img', Buffer.alloc(0)],
    ['pagemap-1.img', randomBytes(70_000)],
    ['core-2.img', randomBytes(1)],
  ];
  const data = bundle(files);
  for (const chunk of [1, 2, 3, 7, 64, 4096, data.length]) {
    const { dir, error } = await receive(data, chunk);
    try {
      assert.equal(error, undefined, `chunk ${chunk}: ${error?.message}`);
      assert.deepEqual(readdirSync(dir).sort(), files.map(([n]) => n).sort());
      for (const [n, d] of files) assert.ok(readFileSync(join(dir, n)).equals(d), `chunk ${chunk}: ${n}`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }
});

/** A header that claims 4 GiB - 1. */
function oversized(): Buffer {
  const h = imageHeader('a.img', 0);
  h.writeUInt32LE(0xffffffff, h.length - 4);
  return h;
}

test('bad bundles are refused with a reason', async () => {
  const cases: Array<[string, Buffer, RegExp]> = [
    ['a path', bundle([['../x', Buffer.from('a')]]), /refusing image name/],
    ['a hidden name', bundle([['.x', Buffer.from('a')]]), /refusing image name/],
    ["Ferry's own file", bundle([['precopy.pages', Buffer.from('a')]]), /refusing image name/],
    ['a name twice', bundle([['a.img', Buffer.from('a')], ['a.img', Buffer.from('b')]]), /sent twice/],
    ['an oversized file', oversized(), /larger than/],
    ['a cut file', bundle([['a.img', randomBytes(100)]]).subarray(0, 60), /middle of a file/],
    ['a cut header', bundle([['a.img', randomBytes(10)]]).subarray(0, 4), /middle of a file/],
  ];
  for (const [what, data, want] of cases) {
    const { dir, error } = await receive(data, 5);
    try {
      assert.ok(error, `${what} was accepted`);
      assert.match(error.message, want, what);
      assert.ok(!readdirSync(dir).some((f) => f.includes('..') || f.startsWith('.')), what);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }
});
