// CRIU's image files: a magic pair, then protobuf messages each after a u32 length
// (criu/protobuf.c). Only the few fields Ferry reads are decoded.
import { readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';

export const IMG_COMMON_MAGIC = 0x54564319;
const PAGEMAP_MAGIC = 0x56084025;
const PE_LAZY = 1 << 1;

function varint(b: Buffer, at: number): [number, number] {
  let v = 0;
  let mul = 1;
  for (let i = at; i < b.length && i < at + 10; i++) {
    v += (b[i]! & 0x7f) * mul;
    if ((b[i]! & 0x80) === 0) return [v, i + 1];
    mul *= 128;
  }
  throw new Error('truncated varint');
}

/** The fields of one protobuf message: number -> first value (varint) or bytes (length-delimited). */
export function fields(b: Buffer): Map<number, number | Buffer> {
  const out = new Map<number, number | Buffer>();
  let at = 0;
  while (at < b.length) {
    const [key, next] = varint(b, at);
    at = next;
    const [num, wire] = [Math.floor(key / 8), key % 8];
    let value: number | Buffer;
    if (wire === 0) [value, at] = varint(b, at);
    else if (wire === 2) {
      const [len, start] = varint(b, at);
      value = b.subarray(start, start + len);
      at = start + len;
    } else if (wire === 1) [value, at] = [0, at + 8];
    else if (wire === 5) [value, at] = [0, at + 4];
    else throw new Error(`unsupported wire type ${wire}`);
    if (!out.has(num)) out.set(num, value);
  }
  return out;
}

/** A run of pages of one process: [first, first + n) in page numbers (address / 4096). */
export interface PageRun {
  vpid: number;
  first: number;
  n: number;
}

/** The runs a pagemap-VPID.img marks lazy (served by the source's CRIU after the restore). */
export function lazyRunsOf(img: Buffer, vpid: number): PageRun[] {
  if (img.length < 8 || img.readUInt32LE(0) !== IMG_COMMON_MAGIC || img.readUInt32LE(4) !== PAGEMAP_MAGIC) throw new Error(`pagemap-${vpid}.img is not a pagemap image`);
  const out: PageRun[] = [];
  let first = true;
  for (let at = 8; at < img.length; ) {
    if (at + 4 > img.length) throw new Error(`pagemap-${vpid}.img ends mid-entry`);
    const len = img.readUInt32LE(at);
    const msg = img.subarray(at + 4, at + 4 + len);
    if (msg.length !== len) throw new Error(`pagemap-${vpid}.img ends mid-entry`);
    at += 4 + len;
    if (first) {
      first = false; // pagemap_head
      continue;
    }
    // pagemap_entry: vaddr 1, compat_nr_pages 2, flags 4, nr_pages 5
    const f = fields(msg);
    const vaddr = f.get(1);
    const n = f.get(5) ?? f.get(2);
    const flags = f.get(4) ?? 0;
    if (typeof vaddr !== 'number' || typeof n !== 'number' || typeof flags !== 'number') continue;
    if (flags & PE_LAZY && n > 0) out.push({ vpid, first: vaddr / 4096, n });
  }
  return out;
}

/** Every lazy run of the dump in imagesDir, by process, then address. */
export async function lazyRuns(imagesDir: string): Promise<PageRun[]> {
  const out: PageRun[] = [];
  for (const f of await readdir(imagesDir)) {
    const m = /^pagemap-(\d+)\.img$/.exec(f);
    if (m) out.push(...lazyRunsOf(await readFile(join(imagesDir, f)), Number(m[1])));
  }
  return out.sort((a, b) => a.vpid - b.vpid || a.first - b.first);
}
