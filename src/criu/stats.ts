// CRIU's stats-dump and stats-restore images: two magic words, then one length-prefixed
// protobuf message (images/stats.proto). Only varint fields occur, so a small reader suffices.
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';

const SERVICE_MAGIC = 0x55105940;
const STATS_MAGIC = 0x57093306;

export interface DumpStats {
  freezingTimeUs: number;
  frozenTimeUs: number;
  memdumpTimeUs: number;
  memwriteTimeUs: number;
  pagesScanned: number;
  pagesSkippedParent: number;
  pagesWritten: number;
  pagesLazy: number;
}

export interface RestoreStats {
  pagesCompared: number;
  pagesSkippedCow: number;
  forkingTimeUs: number;
  restoreTimeUs: number;
  pagesRestored: number;
}

type Fields = Map<number, number | Buffer>;

function readVarint(buf: Buffer, pos: number): [number, number] {
  let result = 0;
  let mul = 1;
  for (;;) {
    if (pos >= buf.length) throw new Error('truncated varint');
    const b = buf[pos++]!;
    result += (b & 0x7f) * mul;
    if (!(b & 0x80)) return [result, pos];
    mul *= 128;
  }
}

export function decodeMessage(buf: Buffer): Fields {
  const fields: Fields = new Map();
  let pos = 0;
  while (pos < buf.length) {
    let key: number;
    [key, pos] = readVarint(buf, pos);
    const field = Math.floor(key / 8);
    const wire = key & 7;
    if (wire === 0) {
      let v: number;
      [v, pos] = readVarint(buf, pos);
      fields.set(field, v);
    } else if (wire === 2) {
      let len: number;
      [len, pos] = readVarint(buf, pos);
      if (pos + len > buf.length) throw new Error('truncated field');
      fields.set(field, buf.subarray(pos, pos + len));
      pos += len;
    } else if (wire === 5) {
      fields.set(field, buf.readUInt32LE(pos));
      pos += 4;
    } else if (wire === 1) {
      fields.set(field, Number(buf.readBigUInt64LE(pos)));
      pos += 8;
    } else {
      throw new Error(`unsupported wire type ${wire}`);
    }
  }
  return fields;
}

/** Returns the stats entry message (StatsEntry) of a stats image. */
export function decodeStatsImage(img: Buffer): Fields {
  if (img.length < 12) throw new Error('stats image too short');
  if (img.readUInt32LE(0) !== SERVICE_MAGIC || img.readUInt32LE(4) !== STATS_MAGIC) throw new Error('not a CRIU stats image');
  const len = img.readUInt32LE(8);
  if (12 + len > img.length) throw new Error('stats image truncated');
  return decodeMessage(img.subarray(12, 12 + len));
}

const num = (f: Fields, n: number): number => {
  const v = f.get(n);
  return typeof v === 'number' ? v : 0;
};

export function parseDumpStats(img: Buffer): DumpStats | undefined {
  const entry = decodeStatsImage(img).get(1);
  if (!Buffer.isBuffer(entry)) return undefined;
  const d = decodeMessage(entry);
  return {
    freezingTimeUs: num(d, 1),
    frozenTimeUs: num(d, 2),
    memdumpTimeUs: num(d, 3),
    memwriteTimeUs: num(d, 4),
    pagesScanned: num(d, 5),
    pagesSkippedParent: num(d, 6),
    pagesWritten: num(d, 7),
    pagesLazy: num(d, 9),
  };
}

export function parseRestoreStats(img: Buffer): RestoreStats | undefined {
  const entry = decodeStatsImage(img).get(2);
  if (!Buffer.isBuffer(entry)) return undefined;
  const r = decodeMessage(entry);
  return {
    pagesCompared: num(r, 1),
    pagesSkippedCow: num(r, 2),
    forkingTimeUs: num(r, 3),
    restoreTimeUs: num(r, 4),
    pagesRestored: num(r, 5),
  };
}

async function readOptional(path: string): Promise<Buffer | undefined> {
  try {
    return await readFile(path);
  } catch {
    return undefined;
  }
}

export async function readDumpStats(imagesDir: string): Promise<DumpStats | undefined> {
  const b = await readOptional(join(imagesDir, 'stats-dump'));
  try {
    return b ? parseDumpStats(b) : undefined;
  } catch {
    return undefined;
  }
}

export async function readRestoreStats(imagesDir: string): Promise<RestoreStats | undefined> {
  const b = await readOptional(join(imagesDir, 'stats-restore'));
  try {
    return b ? parseRestoreStats(b) : undefined;
  } catch {
    return undefined;
  }
}
