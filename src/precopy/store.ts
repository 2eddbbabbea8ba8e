// Pre-copy on the destination: the pages that arrive in rounds while the task still runs on the
// source are kept in one file, a slot per page (a later round overwrites in place), and served to
// CRIU's lazy-pages daemon when the restored task is filled: requests the store can answer are
// answered here, the rest go on to the source's CRIU (post-copy of a residue). The daemon speaks
// CRIU's page-server protocol (criu/page-xfer.c): 32-byte requests {u32 cmd, pad, u64 nr_pages,
// u64 vaddr, u64 dst_id}; a GET is answered with the same header (cmd PS_IOV_ADD_F|PE_PRESENT)
// and the pages; CLOSE with a 4-byte status.
import { closeSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import type { Socket } from 'node:net';
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
class ChunkQueue {
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

  has(vpid: number, vaddr: number, n: number): boolean {
    const first = vaddr / PAGE;
    for (let i = 0; i < n; i++) if (!this.slots.has(PageStore.key(vpid, first + i))) return false;
    return true;
  }

  /** Copies n stored pages into out (all must be there: see has()). */
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

const PS_IOV_GET = 7;
const PS_IOV_ADD_F = 6;
const PE_PRESENT = 1 << 2;
const PS_IOV_CLOSE = 0x1023;
const PS_IOV_FORCE_CLOSE = 0x1024;
const PS_HEADER = 32;
/** CRIU's lazy-pages daemon asks for at most 4 MiB at once. */
const MAX_GET_PAGES = 4096;

type Answer = { kind: 'ready'; data: Buffer } | { kind: 'remote'; need: 'get' | 'close' };

export interface ServeStats {
  localPages: number;
  forwardedPages: number;
}

/**
 * Answers a lazy-pages daemon from the store; what the store lacks goes to `upstream` (the
 * source's CRIU, through the migration's pages link) when there is one. Answers leave in the
 * order the requests came, as the daemon expects.
 */
export function servePages(daemon: Socket, store: PageStore, upstream: Socket | undefined, stats: ServeStats): void {
  const queue: Answer[] = [];
  let inbuf: Buffer = Buffer.alloc(0);
  const up = new ChunkQueue();
  /** Bytes of the answer at the head of the queue still to pass from upstream to the daemon. */
  let passing = 0;
  const fail = (why: string) => {
    daemon.destroy(new FerryError('PEER', why));
    upstream?.destroy();
  };
  const flush = () => {
    while (queue.length) {
      const head = queue[0]!;
      if (head.kind === 'ready') {
        daemon.write(head.data);
        queue.shift();
        continue;
      }
      // Upstream answers, passed on as they come: a header and its pages, or a close status.
      if (passing === 0) {
        const need = head.need === 'close' ? 4 : PS_HEADER;
        if (up.length < need) return;
        const n = head.need === 'close' ? 0 : Number(up.peek(PS_HEADER).readBigUInt64LE(8));
        if (n > MAX_GET_PAGES) return fail(`the source answered with ${n} pages`);
        stats.forwardedPages += n;
        passing = need + n * PAGE;
      }
      for (const c of up.take(passing)) {
        daemon.write(c);
        passing -= c.length;
      }
      if (passing > 0) return;
      queue.shift();
    }
  };
  upstream?.on('data', (c: Buffer) => {
    up.push(c);
    flush();
  });
  upstream?.on('error', () => daemon.destroy());
  daemon.on('data', (c: Buffer) => {
    inbuf = inbuf.length ? Buffer.concat([inbuf, c]) : c;
    let off = 0;
    for (; inbuf.length - off >= PS_HEADER; off += PS_HEADER) {
      const req = inbuf.subarray(off, off + PS_HEADER);
      const cmd = req.readUInt32LE(0) & 0xffff;
      if (cmd === PS_IOV_GET) {
        const n = Number(req.readBigUInt64LE(8));
        const vaddr = Number(req.readBigUInt64LE(16));
        const vpid = Number(req.readBigUInt64LE(24));
        if (n < 1 || n > MAX_GET_PAGES) return fail(`lazy-pages asked for ${n} pages`);
        if (store.has(vpid, vaddr, n)) {
          const out = Buffer.allocUnsafe(PS_HEADER + n * PAGE);
          req.copy(out, 0);
          out.writeUInt32LE((PE_PRESENT << 16) | PS_IOV_ADD_F, 0);
          store.read(vpid, vaddr, n, out, PS_HEADER);
          stats.localPages += n;
          queue.push({ kind: 'ready', data: out });
        } else if (upstream) {
          upstream.write(Buffer.from(req));
          queue.push({ kind: 'remote', need: 'get' });
        } else {
          return fail(`page 0x${vaddr.toString(16)} of process ${vpid} never arrived`);
        }
      } else if (cmd === PS_IOV_CLOSE || cmd === PS_IOV_FORCE_CLOSE) {
        if (upstream) {
          upstream.write(Buffer.from(req));
          queue.push({ kind: 'remote', need: 'close' });
        } else {
          queue.push({ kind: 'ready', data: Buffer.alloc(4) });
        }
      } else {
        return fail(`lazy-pages sent an unknown command ${cmd}`);
      }
    }
    inbuf = Buffer.from(inbuf.subarray(off));
    flush();
  });
  daemon.on('end', () => upstream?.end());
  daemon.on('error', () => upstream?.destroy());
  daemon.on('close', () => upstream?.end());
}
