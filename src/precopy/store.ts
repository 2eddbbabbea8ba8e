// Pre-copy on the destination: the pages that arrive in rounds while the task still runs on the
// source are kept in one file, a slot per page (a later round overwrites in place), and served to
// CRIU's lazy-pages daemon when the restored task is filled (through the front, front.ts; what
// the store lacks comes from the source's CRIU: post-copy of a residue).
import { closeSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { Writable } from 'node:stream';
import { FerryError } from '../errors.js';

export const PAGE = 4096;
/** Page records from ferry-track: {u32 kind, u32 vpid, u64 vaddr, u32 npages, u32 pad}. */
export const REC_HEADER = 24;
export const REC_DATA = 1;
export const REC_ZERO = 2;
export const REC_DROP = 3;
/** ferry-track sends at most 256 pages per record; a little slack, then it is a hostile peer. */
const MAX_RECORD_PAGES = 1024;

const ZERO_SLOT = -1;

/** Bytes as they arrived, taken from the front without copying them all on every chunk. */
export class ChunkQueue {
  private chunks: Buffer[] = [];
  length = 0;

  push(c: Buffer): void {
    this.chunks.push(c);
    this.length += c.length;
  }

  /** The first n bytes (n <= length), one copy at most; they stay queued. */
  peek(n: number): Buffer {
    if (this.chunks[0]!.length >= n) return this.chunks[0]!.subarray(0, n);
    const head = Buffer.concat(this.chunks, this.length);
    this.chunks = [head];
    return head.subarray(0, n);
  }

  /** Removes up to n bytes from the front, as the slices they were. */
  take(n: number): Buffer[] {
    const out: Buffer[] = [];
    while (n > 0 && this.chunks.length) {
      const c = this.chunks[0]!;
      if (c.length <= n) {
        out.push(c);
        this.chunks.shift();
        n -= c.length;
        this.length -= c.length;
      } else {
        out.push(c.subarray(0, n));
        this.chunks[0] = c.subarray(n);
        this.length -= n;
        n = 0;
      }
    }
    return out;
  }
}

export class PageStore {
  private readonly fd: number;
  private readonly slots = new Map<number, number>();
  private next = 0;
  pagesIn = 0;
  zeroIn = 0;

  constructor(readonly path: string) {
    this.fd = openSync(path, 'w+', 0o600);
  }

  private static key(vpid: number, page: number): number {
    return vpid * 2 ** 36 + page;
  }

  get size(): number {
    return this.slots.size;
  }

  /** Pages [vaddr, vaddr + n) of process vpid; data undefined: they are zero. */
  put(vpid: number, vaddr: number, n: number, data?: Buffer): void {
    const first = vaddr / PAGE;
    this.pagesIn += n;
    if (!data) {
      this.zeroIn += n;
      for (let i = 0; i < n; i++) this.slots.set(PageStore.key(vpid, first + i), ZERO_SLOT);
      return;
    }
    // Runs of consecutive slots go out in one write.
    let runStart = 0;
    let runSlot = -2;
    for (let i = 0; i <= n; i++) {
      let slot = -2;
      if (i < n) {
        const k = PageStore.key(vpid, first + i);
        const had = this.slots.get(k);
        slot = had !== undefined && had !== ZERO_SLOT ? had : this.next++;
        this.slots.set(k, slot);
      }
      if (i === n || slot !== runSlot + (i - runStart)) {
        if (i > runStart) writeSync(this.fd, data, runStart * PAGE, (i - runStart) * PAGE, runSlot * PAGE);
        runStart = i;
        runSlot = slot;
      }
    }
  }

  drop(vpid: number, vaddr: number, n: number): void {
    const first = vaddr / PAGE;
    for (let i = 0; i < n; i++) this.slots.delete(PageStore.key(vpid, first + i));
  }

  hasPage(vpid: number, page: number): boolean {
    return this.slots.has(PageStore.key(vpid, page));
  }

  /** The file keeps what it served (a failed fill may be retried from it): nothing to free. */
  served(): void {}

  readonly heldBytes = 0;

  /** Copies n stored pages into out (all must be there: see hasPage()). */
  read(vpid: number, vaddr: number, n: number, out: Buffer, outOffset: number): void {
    const first = vaddr / PAGE;
    let i = 0;
    while (i < n) {
      const slot = this.slots.get(PageStore.key(vpid, first + i))!;
      let j = i + 1;
      if (slot === ZERO_SLOT) {
        while (j < n && this.slots.get(PageStore.key(vpid, first + j)) === ZERO_SLOT) j++;
        out.fill(0, outOffset + i * PAGE, outOffset + j * PAGE);
      } else {
        while (j < n && this.slots.get(PageStore.key(vpid, first + j)) === slot + (j - i)) j++;
        readSync(this.fd, out, outOffset + i * PAGE, (j - i) * PAGE, slot * PAGE);
      }
      i = j;
    }
  }

  remove(): void {
    try {
      closeSync(this.fd);
    } catch {
      /* closed */
    }
    rmSync(this.path, { force: true });
  }

  /** Takes the page records of a pre-copy stream. */
  writer(): Writable {
    const q = new ChunkQueue();
    return new Writable({
      write: (chunk: Buffer, _enc, cb) => {
        try {
          q.push(chunk);
          while (q.length >= REC_HEADER) {
            const h = q.peek(REC_HEADER);
            const kind = h.readUInt32LE(0);
            const vpid = h.readUInt32LE(4);
            const vaddr = Number(h.readBigUInt64LE(8));
            const n = h.readUInt32LE(16);
            if (n === 0 || n > MAX_RECORD_PAGES || vaddr % PAGE !== 0 || vaddr + n * PAGE > 2 ** 48 || vpid === 0 || vpid > 2 ** 22 || (kind !== REC_DATA && kind !== REC_ZERO && kind !== REC_DROP)) {
              throw new FerryError('PEER', `malformed page record (kind ${kind}, ${n} pages at 0x${vaddr.toString(16)})`);
            }
            const len = REC_HEADER + (kind === REC_DATA ? n * PAGE : 0);
            if (q.length < len) break;
            if (kind === REC_DATA) this.put(vpid, vaddr, n, q.peek(len).subarray(REC_HEADER));
            else if (kind === REC_ZERO) this.put(vpid, vaddr, n);
            else this.drop(vpid, vaddr, n);
            q.take(len);
          }
          cb();
        } catch (e) {
          cb(e as Error);
        }
      },
      final: (cb) => cb(q.length ? new FerryError('PEER', 'the page records ended mid-record') : null),
    });
  }
}
