// CRIU's images (all but memory) cross in one stream while the task is frozen: a request per file
// cost a round trip each inside the pause (8 at a time: ~50 ms for a two-process task). Records:
// {u16 name length, name (UTF-8), u32 size, size bytes}, one per file, until the stream ends.
import { closeSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { FerryError } from '../errors.js';

/** One image file may not be larger than this; pages go to the page server, not here. */
export const MAX_IMAGE_BYTES = 1 << 30;
export const MAX_IMAGES = 100_000;
/** Names Ferry itself uses in an images directory are not CRIU's to send. */
const RESERVED = new Set(['lazy-pages.socket', 'lazy-pages.log', 'precopy.pages']);

export function imageNameOk(name: string): boolean {
  return /^[A-Za-z0-9_.-]{1,128}$/.test(name) && !name.startsWith('.') && !RESERVED.has(name);
}

/** The head of one file's record. */
export function imageHeader(name: string, size: number): Buffer {
  const n = Buffer.from(name, 'utf8');
  const h = Buffer.alloc(2 + n.length + 4);
  h.writeUInt16LE(n.length, 0);
  n.copy(h, 2);
  h.writeUInt32LE(size, 2 + n.length);
  return h;
}

/**
 * Writes the records of a bundle as files into dir. Refuses bad names, a name twice, more than
 * MAX_IMAGES files or one larger than MAX_IMAGE_BYTES, and a stream that ends mid-record.
 * Synchronously: the images arrive inside the task's pause, where async opens, writes and closes
 * queued behind its other work (~40 ms for 22 files); a call writes no more than one chunk.
 */
export class ImageBundleWriter extends Writable {
  files = 0;
  bytes = 0;
  private pending: Buffer = Buffer.alloc(0);
  private file?: { fd: number; left: number; name: string };
  private readonly seen = new Set<string>();

  constructor(private readonly dir: string) {
    super();
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (e?: Error | null) => void): void {
    try {
      this.take(chunk);
    } catch (e) {
      cb(e as Error);
      return;
    }
    cb();
  }

  override _final(cb: (e?: Error | null) => void): void {
    if (this.file || this.pending.length) {
      this.closeFile();
      cb(new FerryError('PEER', 'the images ended in the middle of a file'));
      return;
    }
    cb();
  }

  override _destroy(e: Error | null, cb: (e?: Error | null) => void): void {
    this.closeFile();
    cb(e);
  }

  private take(chunk: Buffer): void {
    let c = this.pending.length ? Buffer.concat([this.pending, chunk]) : chunk;
    this.pending = Buffer.alloc(0);
    while (c.length) {
      if (this.file) {
        const n = Math.min(this.file.left, c.length);
        for (let off = 0; off < n; ) off += writeSync(this.file.fd, c, off, n - off);
        this.file.left -= n;
        this.bytes += n;
        c = c.subarray(n);
        if (this.file.left === 0) this.closeFile();
        continue;
      }
      if (c.length < 2) break;
      const nameLen = c.readUInt16LE(0);
      if (c.length < 2 + nameLen + 4) break;
      const name = c.toString('utf8', 2, 2 + nameLen);
      const size = c.readUInt32LE(2 + nameLen);
      if (!imageNameOk(name)) throw new FerryError('USAGE', `refusing image name '${name.slice(0, 130)}'`);
      if (this.seen.has(name)) throw new FerryError('USAGE', `image ${name} sent twice`);
      if (++this.files > MAX_IMAGES) throw new FerryError('USAGE', `more than ${MAX_IMAGES} image files`);
      if (size > MAX_IMAGE_BYTES) throw new FerryError('USAGE', `image ${name} is larger than ${MAX_IMAGE_BYTES} bytes`);
      this.seen.add(name);
      this.file = { fd: openSync(join(this.dir, name), 'w', 0o600), left: size, name };
      c = c.subarray(2 + nameLen + 4);
      if (size === 0) this.closeFile();
    }
    if (c.length) this.pending = Buffer.from(c);
  }

  private closeFile(): void {
    const f = this.file;
    this.file = undefined;
    if (f) closeSync(f.fd);
  }
}
