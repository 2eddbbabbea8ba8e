// Pre-copy on the destination: the pages that arrive in rounds while the task still runs on the
// source are kept in one file, a slot per page (a later round overwrites in place), and served to
// CRIU's lazy-pages daemon when the restored task is filled (through the front, front.ts; what
// the store lacks comes from the source's CRIU: post-copy of a residue).
import { closeSync, openSync, readSync, renameSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { Writable } from 'node:stream';
import { FerryError } from '../errors.js';

export const PAGE = 4096;
/** The destination's store, in the task's directory (the source's file sync leaves it alone). */
export const PRECOPY_PAGES = 'precopy.pages';
/** Where the store's pages are, for CRIU's lazy-pages daemon (patches/criu/0017): see writeIndex(). */
export const STORE_INDEX_SUFFIX = '.index';
const INDEX_MAGIC = 'FERRYIX1';
/** An index entry: {u64 vaddr, u32 vpid, u32 npages, i64 first slot or -1 for zero pages}. */
const INDEX_ENTRY = 24;
/** Page records from ferry-track: {u32 kind, u32 vpid, u64 vaddr, u32 npages, u32 pad}. */
export const REC_HEADER = 24;
export const REC_DATA = 1;
export const REC_ZERO = 2;
export const REC_DROP = 3;
/** ferry-track sends at most 256 pages per record; a little slack, then it is a hostile peer. */
const MAX_RECORD_PAGES = 1024;

const ZERO_SLOT = -1;
const ABSENT = -2;
/**
 * A page dropped from the store keeps its slot for when it comes again (auto's post-copy drops
 * the last delta and then stores it as it arrives): -(slot + 3), absent to every reader. With a
 * new slot each time, the file outgrew the task by the residue (1.6 GiB for a 1 GiB task).
 * Its own inverse: it also turns a reserved entry back into its slot.
 */
const reserved = (slot: number) => -(slot + 3);
const isAbsent = (v: number) => v <= ABSENT;
/**
 * The index holds a page's slot in arrays of this many pages (2 MiB of memory each), found by
 * process and the page number's high bits: a Map entry per page cost ~0.3 s of the agent's CPU
 * per GiB served (one core is all a 2-core host has for the fill).
 */
const INDEX_PAGES = 512;

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
  private fd: number;
  private readonly index = new Map<number, Int32Array>();
  private count = 0;
  private next = 0;
  pagesIn = 0;
  zeroIn = 0;
  /** Pages served stay here (a failed fill may be retried from them). */
  readonly keepsServed = true;

  constructor(readonly path: string) {
    this.fd = openSync(path, 'w+', 0o600);
    // One left by an earlier migration of this task would send the daemon to the wrong slots.
    rmSync(path + STORE_INDEX_SUFFIX, { force: true });
  }

  /**
   * Writes where every stored page is (runs of a process's pages in consecutive slots, or zero),
   * sorted by process and address, for CRIU's lazy-pages daemon to fill the task from the file
   * itself (patches/criu/0017): a fault then costs no round trip through this agent. Only once
   * the store is complete (the daemon takes it as final) and the task runs (from then on the
   * daemon fills without asking: before, that would take the CPU the pause needs). Returns the
   * number of runs; a removed store (the daemon ended) writes none.
   */
  writeIndex(): number {
    if (this.fd < 0) return 0;
    const keys = [...this.index.keys()].sort((a, b) => a - b);
    // Entries as 32-bit halves in one typed array (little-endian, as the machine it is read on).
    let out = new Int32Array(2 + 4096 * (INDEX_ENTRY / 4));
    Buffer.from(out.buffer).write(INDEX_MAGIC, 0, 'latin1');
    let at = 2;
    let runs = 0;
    // The open run: its process, first page, length and first slot (runs stay below 2^32 pages: 16 TiB).
    let rVpid = -1;
    let rPage = 0;
    let rN = 0;
    let rSlot = 0;
    const close = () => {
      if (!rN) return;
      if (at + 6 > out.length) {
        const bigger = new Int32Array(out.length * 2);
        bigger.set(out.subarray(0, at));
        out = bigger;
      }
      const vaddr = rPage * PAGE;
      out[at] = vaddr % 2 ** 32;
      out[at + 1] = Math.floor(vaddr / 2 ** 32);
      out[at + 2] = rVpid;
      out[at + 3] = rN;
      out[at + 4] = rSlot;
      out[at + 5] = rSlot < 0 ? -1 : 0;
      at += 6;
      runs++;
      rN = 0;
    };
    for (const k of keys) {
      const vpid = Math.floor(k / 2 ** 27);
      const base = (k % 2 ** 27) * INDEX_PAGES;
      const c = this.index.get(k)!;
      let i = 0;
      if (vpid !== rVpid || base !== rPage + rN) close();
      while (i < INDEX_PAGES) {
        const slot = c[i]!;
        if (isAbsent(slot)) {
          close();
          i++;
          continue;
        }
        if (rN === 0 || (slot === ZERO_SLOT ? rSlot !== ZERO_SLOT : rSlot < 0 || slot !== rSlot + rN)) {
          close();
          rVpid = vpid;
          rPage = base + i;
          rSlot = slot;
        }
        // The run goes on while the slots follow (or stay zero): a tight scan, 1 GiB in ~2 ms.
        let j = i + 1;
        if (slot === ZERO_SLOT) while (j < INDEX_PAGES && c[j] === ZERO_SLOT) j++;
        else while (j < INDEX_PAGES && c[j] === slot + (j - i)) j++;
        rN += j - i;
        i = j;
      }
    }
    close();
    // Whole or not at all: the daemon reads it as soon as the name exists.
    const path = this.path + STORE_INDEX_SUFFIX;
    writeFileSync(path + '.tmp', new Uint8Array(out.buffer, 0, at * 4), { mode: 0o600 });
    renameSync(path + '.tmp', path);
    return runs;
  }

  /** Pages below 2^36 (48-bit addresses), vpids below 2^22: a key below 2^49, exact in a double. */
  private chunk(vpid: number, page: number, make: boolean): Int32Array | undefined {
    const k = vpid * 2 ** 27 + Math.floor(page / INDEX_PAGES);
    let c = this.index.get(k);
    if (!c && make) {
      // One more entry at the end: how many of the chunk's pages are here (see presentRun).
      c = new Int32Array(INDEX_PAGES + 1).fill(ABSENT);
      c[INDEX_PAGES] = 0;
      this.index.set(k, c);
    }
    return c;
  }

  private slot(vpid: number, page: number): number {
    const v = this.chunk(vpid, page, false)?.[page % INDEX_PAGES] ?? ABSENT;
    return isAbsent(v) ? ABSENT : v;
  }

  get size(): number {
    return this.count;
  }

  /** Pages [vaddr, vaddr + n) of process vpid; data undefined: they are zero. */
  put(vpid: number, vaddr: number, n: number, data?: Buffer): void {
    const first = vaddr / PAGE;
    this.pagesIn += n;
    if (!data) this.zeroIn += n;
    // Runs of consecutive slots go out in one write.
    let runStart = 0;
    let runSlot = -2;
    let c: Int32Array | undefined;
    for (let i = 0; i <= n; i++) {
      let slot = -2;
      if (i < n) {
        const page = first + i;
        if (!c || page % INDEX_PAGES === 0) c = this.chunk(vpid, page, true)!;
        const had = c[page % INDEX_PAGES]!;
        if (isAbsent(had)) {
          this.count++;
          c[INDEX_PAGES]!++;
        }
        if (!data) {
          c[page % INDEX_PAGES] = ZERO_SLOT;
          continue;
        }
        slot = had >= 0 ? had : had < ABSENT ? reserved(had) : this.next++;
        c[page % INDEX_PAGES] = slot;
      }
      if (i === n || slot !== runSlot + (i - runStart)) {
        if (data && i > runStart) writeSync(this.fd, data, runStart * PAGE, (i - runStart) * PAGE, runSlot * PAGE);
        runStart = i;
        runSlot = slot;
      }
    }
  }

  drop(vpid: number, vaddr: number, n: number): void {
    const first = vaddr / PAGE;
    for (let i = 0; i < n; i++) {
      const c = this.chunk(vpid, first + i, false);
      if (!c) continue;
      const had = c[(first + i) % INDEX_PAGES]!;
      if (isAbsent(had)) continue;
      c[(first + i) % INDEX_PAGES] = had >= 0 ? reserved(had) : ABSENT;
      c[INDEX_PAGES]!--;
      this.count--;
    }
  }

  hasPage(vpid: number, page: number): boolean {
    return this.slot(vpid, page) !== ABSENT;
  }

  /**
   * How many pages from `page` on (at most max) are here, one after another. A chunk that holds
   * all its pages is passed whole: page by page, 1 GiB took ~8 ms of the pause.
   */
  presentRun(vpid: number, page: number, max: number): number {
    let k = 0;
    let c: Int32Array | undefined;
    while (k < max) {
      const p = page + k;
      if (!c || p % INDEX_PAGES === 0) {
        c = this.chunk(vpid, p, false);
        if (!c) break;
        if (c[INDEX_PAGES] === INDEX_PAGES) {
          k += Math.min(INDEX_PAGES - (p % INDEX_PAGES), max - k);
          c = undefined;
          continue;
        }
      }
      if (isAbsent(c[p % INDEX_PAGES]!)) break;
      k++;
    }
    return k;
  }

  /** The daemon reads data pages from this file itself (patches/criu/0016); zero pages are sent. */
  storedRun(vpid: number, page: number, max: number): { slot: number; n: number } | undefined {
    const slot = this.slot(vpid, page);
    if (slot < 0) return undefined;
    let k = 1;
    let c: Int32Array | undefined;
    while (k < max) {
      const p = page + k;
      if (!c || p % INDEX_PAGES === 0) c = this.chunk(vpid, p, false);
      if (!c || c[p % INDEX_PAGES] !== slot + k) break;
      k++;
    }
    return { slot, n: k };
  }

  /** The file keeps what it served (a failed fill may be retried from it): nothing to free. */
  served(): void {}

  readonly heldBytes = 0;

  /** Copies n stored pages into out (all must be there: see hasPage()). */
  read(vpid: number, vaddr: number, n: number, out: Buffer, outOffset: number): void {
    const first = vaddr / PAGE;
    let i = 0;
    while (i < n) {
      const slot = this.slot(vpid, first + i);
      let j = i + 1;
      if (slot === ZERO_SLOT) {
        while (j < n && this.slot(vpid, first + j) === ZERO_SLOT) j++;
        out.fill(0, outOffset + i * PAGE, outOffset + j * PAGE);
      } else {
        while (j < n && this.slot(vpid, first + j) === slot + (j - i)) j++;
        readSync(this.fd, out, outOffset + i * PAGE, (j - i) * PAGE, slot * PAGE);
      }
      i = j;
    }
  }

  /**
   * Closes and deletes the store; again is a no-op. (An aborted post-copy removes it twice: a
   * second close of the same number closed whatever had it by then, once the connection to
   * another agent, whose first bytes were then a file's.)
   */
  remove(): void {
    const fd = this.fd;
    if (fd < 0) return;
    this.fd = -1;
    closeSync(fd);
    rmSync(this.path, { force: true });
    rmSync(this.path + STORE_INDEX_SUFFIX, { force: true });
    rmSync(this.path + STORE_INDEX_SUFFIX + '.tmp', { force: true });
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
