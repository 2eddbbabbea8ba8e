// Post-copy's pages on the source, served from the frozen task itself. CRIU's page server
// answers each request by tee()ing its pipe from the start of the buffer that holds the page and
// splicing that prefix away (criu/page-pipe.c: page_pipe_read), ~0.26 ms a fault here, and every
// answer crosses a socket into this agent before it goes on. The task's memory is what that pipe
// holds: CRIU froze the task before it collected the pages and keeps it frozen until the
// destination has them all. So this agent reads a requested page from /proc/PID/mem and answers
// in CRIU's format (criu/page-xfer.c); CRIU's connection is kept for the end of the transfer
// (PS_IOV_CLOSE, whose answer lets CRIU end the copy here) and for anything else, which from
// then on goes to CRIU as it comes.
import { closeSync, openSync, readSync } from 'node:fs';
import type { Socket } from 'node:net';
import { Duplex } from 'node:stream';
import type { PageRun } from '../criu/image.js';
import { nsPids, treePids } from '../util/proc.js';

const PS_HEADER = 32;
const PS_IOV_GET = 7;
const PS_IOV_ADD_F = 6;
const PE_PRESENT = 1 << 2;
const PAGE = 4096;
/** The most one answer carries (CRIU's daemon asks for at most 4 MiB at once; fewer is allowed). */
const MAX_PAGES = 1024;

/** The lazy runs of one process, sorted, with the descriptor its memory is read through. */
interface Proc {
  fd: number;
  firsts: number[];
  ends: number[];
}

/**
 * The namespace pid CRIU names each process of the tree by (its pid in the root's namespace),
 * to its pid here.
 */
export function pidsByVpid(root: number): Map<number, number> {
  const level = nsPids(root).length - 1;
  const out = new Map<number, number>();
  for (const pid of treePids(root)) {
    try {
      const v = nsPids(pid)[level];
      if (v !== undefined) out.set(v, pid);
    } catch {
      // a thread list entry that is gone; the dump froze the tree, so none should be
    }
  }
  return out;
}

/**
 * The frozen task's memory, opened once CRIU has dumped it (a process that cannot be opened
 * fails the migration there, before anything was decided), with the runs CRIU's pagemap images
 * mark lazy.
 */
export class TaskMemory {
  readonly procs = new Map<number, Proc>();

  constructor(runs: PageRun[], pids: Map<number, number>) {
    try {
      for (const r of runs) {
        let p = this.procs.get(r.vpid);
        if (!p) {
          const pid = pids.get(r.vpid);
          if (pid === undefined) throw new Error(`process ${r.vpid} of the dump is not in the task's tree`);
          p = { fd: openSync(`/proc/${pid}/mem`, 'r'), firsts: [], ends: [] };
          this.procs.set(r.vpid, p);
        }
        p.firsts.push(r.first);
        p.ends.push(r.first + r.n);
      }
    } catch (e) {
      this.close();
      throw e;
    }
  }

  close(): void {
    for (const p of this.procs.values()) {
      try {
        closeSync(p.fd);
      } catch {
        // closed already
      }
    }
    this.procs.clear();
  }
}

export class TaskPages extends Duplex {
  private pending = Buffer.alloc(0);
  /** From the first request not answered here on, every byte goes to CRIU. */
  private passthrough = false;
  private waitingRead?: () => void;
  /** Requests answered from the task's memory, and pages sent so. */
  answered = 0;
  pagesSent = 0;

  constructor(
    readonly criu: Socket,
    private readonly mem: TaskMemory,
  ) {
    super({ readableHighWaterMark: 1 << 20 });
    criu.on('data', (c: Buffer) => {
      if (!this.push(c)) criu.pause();
    });
    criu.once('end', () => this.push(null));
    criu.on('error', (e) => this.destroy(e));
    criu.once('close', () => {
      if (!this.readableEnded) this.destroy();
    });
    criu.pause();
  }

  /** Pages of the lazy run holding `page` from it on, at most max; 0 when no run holds it. */
  private runFrom(p: Proc, page: number, max: number): number {
    let lo = 0;
    let hi = p.firsts.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (p.firsts[mid]! <= page) lo = mid + 1;
      else hi = mid - 1;
    }
    if (hi < 0 || page >= p.ends[hi]!) return 0;
    return Math.min(max, p.ends[hi]! - page);
  }

  /** One request answered from memory; false if it is not one this can answer. */
  private answer(req: Buffer): boolean {
    if (req.readUInt32LE(0) !== PS_IOV_GET) return false;
    const nr = Number(req.readBigUInt64LE(8));
    const vaddr = Number(req.readBigUInt64LE(16));
    const p = this.mem.procs.get(Number(req.readBigUInt64LE(24)));
    if (!p || nr < 1 || vaddr % PAGE !== 0) return false;
    // CRIU answers fewer pages than asked when the run ends first; the daemon asks for the rest.
    const n = this.runFrom(p, vaddr / PAGE, Math.min(nr, MAX_PAGES));
    if (n === 0) return false;
    const out = Buffer.allocUnsafe(PS_HEADER + n * PAGE);
    req.copy(out, 0, 0, PS_HEADER);
    out.writeUInt32LE(PS_IOV_ADD_F | (PE_PRESENT << 16), 0);
    out.writeBigUInt64LE(BigInt(n), 8);
    let got = 0;
    while (got < n * PAGE) {
      const k = readSync(p.fd, out, PS_HEADER + got, n * PAGE - got, vaddr + got);
      if (k <= 0) throw new Error(`reading the task's memory at 0x${(vaddr + got).toString(16)} gave ${k} bytes`);
      got += k;
    }
    this.push(out);
    this.answered++;
    this.pagesSent += n;
    return true;
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (e?: Error | null) => void): void {
    if (this.passthrough) {
      this.criu.write(chunk, cb);
      return;
    }
    let buf = this.pending.length ? Buffer.concat([this.pending, chunk]) : chunk;
    let at = 0;
    try {
      while (buf.length - at >= PS_HEADER) {
        if (!this.answer(buf.subarray(at, at + PS_HEADER))) {
          // Whatever CRIU would say to it (the end, or a failure), it says.
          this.passthrough = true;
          this.mem.close();
          this.pending = Buffer.alloc(0);
          this.criu.write(buf.subarray(at), cb);
          return;
        }
        at += PS_HEADER;
      }
    } catch (e) {
      cb(e as Error);
      return;
    }
    buf = buf.subarray(at);
    this.pending = buf.length ? Buffer.from(buf) : Buffer.alloc(0);
    // Answers wait to be read: take no more requests until they are.
    if (this.readableLength > this.readableHighWaterMark) this.waitingRead = () => cb();
    else cb();
  }

  override _read(): void {
    const w = this.waitingRead;
    this.waitingRead = undefined;
    w?.();
    if (!this.criu.destroyed) this.criu.resume();
  }

  override _final(cb: (e?: Error | null) => void): void {
    this.criu.end();
    cb();
  }

  override _destroy(e: Error | null, cb: (e: Error | null) => void): void {
    this.mem.close();
    this.criu.destroy();
    cb(e);
  }
}
