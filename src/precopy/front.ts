// The destination's end of the lazy-pages link: it stands between CRIU's lazy-pages daemon and
// the source's CRIU page server, speaking CRIU's page-server protocol (criu/page-xfer.c:
// 32-byte requests {u32 cmd, pad, u64 nr_pages, u64 vaddr, u64 pid}; a GET is answered with the
// same header (cmd PS_IOV_ADD_F|PE_PRESENT, nr_pages possibly fewer) and the pages; CLOSE with a
// 4-byte status).
//
// Left alone, the daemon pulls the pages it has not faulted on one request at a time per process,
// 64 KiB after every fault: through two agents and TLS each request costs a round trip, so a task
// that faults often gets its memory at a fraction of the link's rate. The front instead keeps a
// bounded amount of prefetch in flight on the same link (the pagemap images say which pages are
// lazy), follows the task's faults with it, and answers the daemon from what arrived. What the
// daemon asks for and the front does not have goes to the source at once; its answer waits behind
// at most PREFETCH_WINDOW of prefetched pages (QEMU's postcopy-preempt gets the same from a second
// channel; Ferry's rule is one connection). The daemon accepts fewer pages than it asked for
// (uffd_io_complete re-queues the rest), which lets the front answer the prefix it has. A stock
// daemon takes answers in the order it asked; with patches/criu/0011 it takes them in any order
// (each finds its request by image and address). Then the front answers a request as soon as
// its first page is here, faults first, and sends the source only faults at once: the daemon's
// background requests are fetched within the prefetch window, so a fault's page no longer waits
// behind them on the link (a 1 GiB task writing 256 MiB/s: a fault waited ~0.85 ms instead of
// ~2 ms, its largest pause 1.2-1.9 s instead of 3.1-3.6 s).
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { FerryError } from '../errors.js';
import type { PageRun } from '../criu/image.js';
import { ChunkQueue, PAGE } from './store.js';

const PS_IOV_GET = 7;
const PS_IOV_ADD_F = 6;
const PE_PRESENT = 1 << 2;
/**
 * Ferry's flag (patches/criu/0016): the answer's pages are in the store file the daemon was given,
 * from the slot in the header's second word on; no data follows the header.
 */
const PE_STORED = 1 << 7;
const PS_IOV_CLOSE = 0x1023;
const PS_IOV_FORCE_CLOSE = 0x1024;
const PS_HEADER = 32;
/** CRIU's lazy-pages daemon asks for at most 4 MiB at once; more is a broken daemon. */
const MAX_DAEMON_PAGES = 1024;
/** Answer buffers kept for reuse (1 MiB each): the daemon has a few requests in flight per process. */
const SPARE_ANSWERS = 8;
/**
 * Prefetch in flight, at least and at most. A fault's answer waits behind it: the minimum is
 * ~1 ms at 1 Gbit/s. While faults keep coming the window stays at the minimum, and in any order
 * (patches/criu/0011) it is all the bulk there is, so the minimum sets how fast a task that
 * keeps faulting gets its memory. 1 GiB, 2-3 runs each: at 64 KiB, post-copy took 13.5-16.2 s for
 * a task writing 16 MiB/s and 12.5-12.9 s at 256 MiB/s; at 128 KiB 11.6-13.5 and 11.0-11.1 s,
 * largest pauses alike (308-421 against 315-368 ms, 1.29-1.44 against 1.39-1.65 s). Earlier,
 * in order, a 256 KiB minimum made a redis client wait 1.6 s instead of 1.1 s (service bench).
 */
const MIN_WINDOW = 128 << 10;
export const PREFETCH_WINDOW = 4 << 20;
/** Queueing the prefetch may add to a round trip before its window shrinks. */
const QUEUE_TARGET_MS = 2;
/** After a fault the window stays at the minimum this long: faults tend to come in bursts. */
const FAULT_HOLD_MS = 20;
const PREFETCH_PAGES = 16;
/** After a fault, how far the prefetch follows it before it serves the daemon's own requests (any order). */
const FOLLOW_PAGES = 256;
/** A request the front forwards for the daemon is cut to this; the daemon asks again for the rest. */
const FORWARD_PAGES = 16;
/**
 * Pages of a background request answered from here at once, and while faults come (within
 * FAULT_GAP_MS of the last): a fault's answer waits behind every answer the daemon has not
 * copied yet, and with several requests in flight (patches/criu/0006) those add up. Also when
 * every page is in pre-copy's store: without the cut its fill took 1.5 s instead of 2.4 s (1 GiB,
 * 16 MiB/s), but a task writing 256 MiB/s, faulting on nearly every write after the resume,
 * paused 0.76-1.29 s against 0.49-0.9 s with it (pre-copy, 3 runs each, twice).
 */
const LOCAL_PAGES = 256;
const LOCAL_PAGES_FAULTING = 16;
const FAULT_GAP_MS = 5;

/**
 * How much prefetch may be in flight. It drops to the minimum at a fault and stays there while
 * faults keep coming (FAULT_HOLD_MS); then it grows by a step per answer that came back about
 * as fast as the quickest one did, and shrinks by a step per answer that queued longer than
 * QUEUE_TARGET_MS behind the others (LEDBAT's rule). What is in flight then stays near what
 * keeps the link busy, and a fault waits behind little more than one round trip. Measured on
 * 1 GiB at 256 MiB/s (auto finishing by post-copy): a fault the source answered waited 35 ms on
 * average behind a window grown to 4 MiB, 4 ms with the queueing rule, 1.2 ms with the hold.
 */
export class PrefetchWindow {
  bytes = MIN_WINDOW;
  /** The quickest answer to a prefetch, from request to its last byte (ms). */
  minRtt = Number.POSITIVE_INFINITY;

  private lastFault = Number.NEGATIVE_INFINITY;

  fault(now = performance.now()): void {
    this.bytes = MIN_WINDOW;
    this.lastFault = now;
  }

  answered(rttMs: number, now = performance.now()): void {
    if (rttMs < this.minRtt) this.minRtt = rttMs;
    const step = PREFETCH_PAGES * PAGE;
    if (rttMs > this.minRtt + QUEUE_TARGET_MS) this.bytes = Math.max(MIN_WINDOW, this.bytes - step);
    else if (now - this.lastFault >= FAULT_HOLD_MS) this.bytes = Math.min(PREFETCH_WINDOW, this.bytes + step);
  }
}

/**
 * Prefetched pages held in memory, not yet taken by the daemon. The daemon takes pages only as
 * the task faults while faults keep coming, so a full holder stalls the prefetch: a 1 GiB task
 * writing 64 MiB/s then got its memory in 48 s (25 s with all of it held). Holding all of it
 * (a page object each) made the task's largest pause 2.8-3.5 s instead of 0.7-1.3 s at
 * 16 MiB/s: the pause counts for more.
 */
const HOLD_CAP = 64 << 20;

export interface LazyFront {
  /**
   * The restore is over and the task waits, stopped, for the decision: the daemon's background
   * requests for pages the store has wait too (until prefetch()), so the fill does not take the
   * CPU the rest of the pause needs. Not earlier: CRIU's last steps of a restore, after the daemon
   * began its background fill, fault on the task's memory, and a fault on a page a waiting
   * request covers is not asked for again.
   */
  quiet(): void;
  /** The task runs: the daemon's background requests are answered, and what it has not asked for yet is prefetched. */
  prefetch(): void;
  /**
   * Stops reading the daemon's requests for a moment: pre-copy's local fill keeps this agent
   * busy, and the resume of the task must not wait behind it.
   */
  hold(): void;
  release(): void;
}

/** Where pages that arrived wait for the daemon. */
export interface PageHolder {
  hasPage(vpid: number, page: number): boolean;
  /** How many pages from `page` on (at most max) are here, one after another. */
  presentRun(vpid: number, page: number, max: number): number;
  /** Whether served pages stay (then the front need not remember which the daemon has). */
  readonly keepsServed: boolean;
  /** Copies n pages (all present) into out. */
  read(vpid: number, vaddr: number, n: number, out: Buffer, outOffset: number): void;
  /**
   * Where pages from `page` on (at most max) lie one after another in a file the daemon can read
   * itself: the first one's slot and how many; undefined when the first is not in one.
   */
  storedRun?(vpid: number, page: number, max: number): { slot: number; n: number } | undefined;
  put(vpid: number, vaddr: number, n: number, data?: Buffer): void;
  /** The daemon has these pages now. */
  served(vpid: number, vaddr: number, n: number): void;
  readonly heldBytes: number;
}

const key = (vpid: number, page: number) => vpid * 2 ** 36 + page;

const SLAB_PAGES = 1024;

/**
 * Post-copy: prefetched pages in memory until the daemon takes them, once. Pages live in 4 MiB
 * slabs, a slot each, reused once served: no object per page for the garbage collector to walk.
 */
export class MemPageHolder implements PageHolder {
  private readonly slots = new Map<number, number>();
  private readonly slabs: Buffer[] = [];
  private readonly freeSlots: number[] = [];
  private next = 0;
  heldBytes = 0;
  readonly keepsServed = false;

  hasPage(vpid: number, page: number): boolean {
    return this.slots.has(key(vpid, page));
  }

  presentRun(vpid: number, page: number, max: number): number {
    let k = 0;
    while (k < max && this.slots.has(key(vpid, page + k))) k++;
    return k;
  }

  read(vpid: number, vaddr: number, n: number, out: Buffer, outOffset: number): void {
    const first = vaddr / PAGE;
    for (let i = 0; i < n; i++) {
      const slot = this.slots.get(key(vpid, first + i))!;
      const at = (slot % SLAB_PAGES) * PAGE;
      this.slabs[Math.floor(slot / SLAB_PAGES)]!.copy(out, outOffset + i * PAGE, at, at + PAGE);
    }
  }

  put(vpid: number, vaddr: number, n: number, data: Buffer): void {
    const first = vaddr / PAGE;
    for (let i = 0; i < n; i++) {
      const k = key(vpid, first + i);
      let slot = this.slots.get(k);
      if (slot === undefined) {
        slot = this.freeSlots.pop() ?? this.next++;
        this.slots.set(k, slot);
        this.heldBytes += PAGE;
      }
      const s = Math.floor(slot / SLAB_PAGES);
      this.slabs[s] ??= Buffer.allocUnsafeSlow(SLAB_PAGES * PAGE);
      data.copy(this.slabs[s]!, (slot % SLAB_PAGES) * PAGE, i * PAGE, (i + 1) * PAGE);
    }
  }

  served(vpid: number, vaddr: number, n: number): void {
    const first = vaddr / PAGE;
    for (let i = 0; i < n; i++) {
      const k = key(vpid, first + i);
      const slot = this.slots.get(k);
      if (slot === undefined) continue;
      this.slots.delete(k);
      this.freeSlots.push(slot);
      this.heldBytes -= PAGE;
    }
  }
}

export interface FrontStats {
  /** Answered from what had arrived (pre-copy rounds or prefetch). */
  localPages: number;
  /** Asked of the source for the daemon (faults, and pages the prefetch had not reached). */
  forwardedPages: number;
  prefetchedPages: number;
  /** Single-page requests (the task's faults) that had to go to the source. */
  faultsForwarded: number;
  /** A fault's wait (forwarded, or on a prefetch in flight), from its request to its answer passed on to the daemon: sum and largest. */
  faultWaitMs: number;
  faultWaitMaxMs: number;
  /** Faults on pages whose prefetch was already in flight. */
  faultsWaited: number;
  /** Of localPages, those the daemon read from the store's file itself (patches/criu/0016). */
  storedPages?: number;
  prefetchMinRttMs?: number;
}

type Entry =
  | { kind: 'ready'; data: Buffer; release?: () => void }
  /**
   * A background request asked while the restored task waits: it waits for the resume (or for a
   * fault queued behind it, which then gets its page at once), from the store or the source.
   */
  | { kind: 'later'; req: Buffer; vpid: number; first: number; n: number }
  /** Waits for a prefetch already in flight for its first page. */
  | { kind: 'wait'; req: Buffer; vpid: number; first: number; n: number; faultAt?: number }
  /** Answered by the source: bytes as they come, passed on when this entry is at the head. */
  | { kind: 'remote'; q: ChunkQueue; left: number; faultAt?: number };

type Sent = { kind: 'prefetch'; vpid: number; first: number; n: number; at: number; fault?: true } | { kind: 'daemon'; entry: Entry & { kind: 'remote' }; n: number; close: boolean };

/** Any order: a request of the daemon not answered yet. */
interface Pending {
  req: Buffer;
  vpid: number;
  first: number;
  n: number;
  fault: boolean;
  at: number;
  /** Asked while the restored task waits for the decision: answered once it runs. */
  held: boolean;
  /** Where the prefetch for this request goes on (pages before it are here or on their way). */
  next: number;
  /** The fault's page was already on its way (a prefetch) when it came. */
  waited?: true;
  /** The fault's page was asked of the source for it. */
  fetched?: true;
}

/**
 * Serves one lazy-pages daemon connection. `runs` are the lazy runs of the dump; `upstream` is
 * the link to the source's CRIU (none: every page must already be in `holder`). The prefetch
 * waits for `prefetch()`: before the task runs, the link carries the migration's own messages.
 */
export function serveLazy(daemon: Socket, holder: PageHolder, upstream: Duplex | undefined, runs: PageRun[], stats: FrontStats, opts: { anyOrder?: boolean; stored?: boolean } = {}): LazyFront {
  const anyOrder = !!opts.anyOrder;
  const storedRun = opts.stored ? holder.storedRun?.bind(holder) : undefined;
  // Requests and answers are small and each waits for the one before: no Nagle on either side.
  daemon.setNoDelay(true);
  if (upstream && 'setNoDelay' in upstream) (upstream as Socket).setNoDelay(true);
  const entries: Entry[] = [];
  const sent: Sent[] = [];
  const up = new ChunkQueue();
  let inbuf: Buffer = Buffer.alloc(0);
  /** Pages asked of the source: 1 by the prefetch (in flight), 2 for the daemon (it gets them directly). */
  const asked = new Map<number, 1 | 2>();
  let inflight = 0;
  const window = new PrefetchWindow();
  let closed = !upstream;
  let started = false;
  let quiet = false;
  // The prefetch walks the runs once, in order; a fault moves a second cursor (`follow`) to
  // just after it, so a task reading its memory in order finds its next pages already here.
  let cursor = { run: 0, page: runs[0]?.first ?? 0 };
  let follow: { run: number; page: number } | undefined;
  // In any order, the daemon's own requests come after FOLLOW_PAGES of it, and before it unless
  // the task faults in order (the fault just after the one before: a reader that outran the
  // prefetch). Measured on 1 GiB: following first, a task writing 256 MiB/s at random paused
  // 1.9-2.4 s, against 0.9-2.0 s with the daemon's requests first; one reading its memory in
  // order at 16 MiB/s paused 347-442 ms, against 445-618.
  let followLeft = 0;
  let inOrder = false;
  let lastFaultAt: { vpid: number; page: number } | undefined;
  const followFault = (vpid: number, page: number) => {
    const prev = lastFaultAt;
    lastFaultAt = { vpid, page };
    inOrder = prev !== undefined && prev.vpid === vpid && page > prev.page && page - prev.page <= 4 * FOLLOW_PAGES;
    const run = runOf(vpid, page);
    if (run < 0) return;
    follow = { run, page: page + 1 };
    followLeft = anyOrder ? FOLLOW_PAGES : Number.POSITIVE_INFINITY;
  };

  const fail = (why: string) => {
    daemon.destroy(new FerryError('PEER', why));
    upstream?.destroy();
  };
  const wanted = (vpid: number, page: number) => !holder.hasPage(vpid, page) && !asked.has(key(vpid, page));
  // Requests made in one turn go upstream as one write: each write is a message, a TLS record
  // and a system call on both hosts, and a turn makes up to a window's worth of them.
  let batch: Buffer[] = [];
  const sendBatch = () => {
    const b = batch;
    batch = [];
    if (b.length && !upstream!.destroyed && !upstream!.writableEnded) upstream!.write(b.length === 1 ? b[0]! : Buffer.concat(b));
  };
  const toUpstream = (b: Buffer) => {
    if (!batch.length) queueMicrotask(sendBatch);
    batch.push(b);
  };
  const request = (cmd: number, vpid: number, page: number, n: number) => {
    const b = Buffer.alloc(PS_HEADER);
    b.writeUInt32LE(cmd, 0);
    b.writeBigUInt64LE(BigInt(n), 8);
    b.writeBigUInt64LE(BigInt(page * PAGE), 16);
    b.writeBigUInt64LE(BigInt(vpid), 24);
    toUpstream(b);
  };
  const sendPrefetch = (vpid: number, first: number, n: number, fault?: true) => {
    for (let i = 0; i < n; i++) asked.set(key(vpid, first + i), 1);
    // A fault's page is not bulk: it does not count against the window (nor time it).
    if (!fault) inflight += n * PAGE;
    sent.push({ kind: 'prefetch', vpid, first, n, at: performance.now(), ...(fault ? { fault } : {}) });
    request(PS_IOV_GET, vpid, first, n);
  };
  /** Any order: the daemon's requests not answered yet, oldest first. */
  const pending: Pending[] = [];
  /** Any order: a fault's page asked of the source for it, outside the window. */
  const fetchFault = (p: Pending) => {
    sendPrefetch(p.vpid, p.first, 1, true);
    p.fetched = true;
    stats.faultsForwarded++;
  };
  /** The daemon asked for it and it is neither here nor on its way (it may have had it once: a range unmapped while its answer was on the way is asked for again). */
  const needed = (vpid: number, page: number) => !holder.hasPage(vpid, page) && asked.get(key(vpid, page)) !== 1;
  /** Any order: the next pages the daemon's background requests wait for, oldest request first. */
  const forPending = (): [number, number, number] | undefined => {
    for (const p of pending) {
      if (p.fault) {
        // Its page came but went to another request for it (a forked child asks for its
        // parent's pages under the same image): it is asked for again.
        if (needed(p.vpid, p.first)) fetchFault(p);
        continue;
      }
      if (p.held && !started) continue;
      const end = p.first + p.n;
      while (p.next < end && !needed(p.vpid, p.next)) p.next++;
      if (p.next >= end) continue;
      const start = p.next;
      while (p.next < end && p.next - start < PREFETCH_PAGES && needed(p.vpid, p.next)) p.next++;
      return [p.vpid, start, p.next - start];
    }
    return undefined;
  };
  /** The next pages to prefetch from a cursor, or undefined when its run (or all runs) are done. */
  const take = (c: { run: number; page: number }, oneRun: boolean): [number, number, number] | undefined => {
    while (c.run < runs.length) {
      const r = runs[c.run]!;
      const end = r.first + r.n;
      while (c.page < end && !wanted(r.vpid, c.page)) c.page++;
      if (c.page < end) {
        const start = c.page;
        while (c.page < end && c.page - start < PREFETCH_PAGES && wanted(r.vpid, c.page)) c.page++;
        return [r.vpid, start, c.page - start];
      }
      if (oneRun) return undefined;
      c.run++;
      c.page = runs[c.run]?.first ?? 0;
    }
    return undefined;
  };
  const pump = () => {
    while (!closed && inflight < window.bytes) {
      // What follows a fault first while the task reads in order, else what the daemon asked for
      // first (it takes those pages at once); then the rest in order.
      let next = anyOrder && !inOrder ? forPending() : undefined;
      if (!next && follow && started && followLeft > 0 && holder.heldBytes < HOLD_CAP) {
        next = take(follow, true);
        if (next) followLeft -= next[2];
        else follow = undefined;
      }
      if (!next && anyOrder) next = forPending();
      if (!next && started && holder.heldBytes < HOLD_CAP) next = take(cursor, false);
      if (!next) return;
      sendPrefetch(...next);
    }
  };
  const runOf = (vpid: number, page: number): number => {
    let lo = 0;
    let hi = runs.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const r = runs[mid]!;
      if (r.vpid < vpid || (r.vpid === vpid && r.first + r.n <= page)) lo = mid + 1;
      else if (r.vpid > vpid || r.first > page) hi = mid - 1;
      else return mid;
    }
    return -1;
  };
  let lastFault = Number.NEGATIVE_INFINITY;
  // Answers from here are read into buffers used again once written: a new 1 MiB buffer for each
  // took a page fault per page on the first write into it, ~40 % of this agent's CPU in a fill.
  // Small and rare large answers get a buffer of their own.
  const spare: Buffer[] = [];
  const pooled = (k: number) => k > LOCAL_PAGES_FAULTING && k <= LOCAL_PAGES;
  /** How much of a background request for n stored pages is answered now (the daemon asks again for the rest). */
  const share = (n: number) => Math.min(n, performance.now() - lastFault < FAULT_GAP_MS ? LOCAL_PAGES_FAULTING : LOCAL_PAGES);
  /** An answer with the first k (>= 1) pages of the request that are here. */
  const local = (req: Buffer, vpid: number, first: number, n: number, fetched = false): Entry => {
    // Pages in the store's file: the daemon reads them itself, this agent sends their place.
    const at = storedRun?.(vpid, first, n);
    const k = at?.n ?? Math.max(1, holder.presentRun(vpid, first, n));
    /** Pages that follow the header. */
    const carried = at ? 0 : k;
    const pool = pooled(carried);
    const whole = pool ? (spare.pop() ?? Buffer.allocUnsafeSlow(PS_HEADER + LOCAL_PAGES * PAGE)) : Buffer.allocUnsafe(PS_HEADER + carried * PAGE);
    const out = whole.subarray(0, PS_HEADER + carried * PAGE);
    req.copy(out, 0, 0, PS_HEADER);
    out.writeUInt32LE((((at ? PE_STORED : 0) | PE_PRESENT) << 16) | PS_IOV_ADD_F, 0);
    out.writeUInt32LE(at?.slot ?? 0, 4);
    out.writeBigUInt64LE(BigInt(k), 8);
    if (at) stats.storedPages = (stats.storedPages ?? 0) + k;
    else holder.read(vpid, first * PAGE, k, out, PS_HEADER);
    holder.served(vpid, first * PAGE, k);
    // A holder that forgets served pages: the prefetch must not ask for them again.
    if (!holder.keepsServed) for (let i = 0; i < k; i++) asked.set(key(vpid, first + i), 2);
    // A fault's page fetched for it counts as forwarded (when it arrived), as when it went through.
    if (!fetched) stats.localPages += k;
    return { kind: 'ready', data: out, ...(pool ? { release: () => spare.length < SPARE_ANSWERS && spare.push(whole) } : {}) };
  };
  const forward = (vpid: number, first: number, n: number, faultAt?: number): Entry => {
    let m = 1;
    while (m < n && m < FORWARD_PAGES && wanted(vpid, first + m)) m++;
    for (let i = 0; i < m; i++) asked.set(key(vpid, first + i), 2);
    const entry: Entry & { kind: 'remote' } = { kind: 'remote', q: new ChunkQueue(), left: -1 };
    sent.push({ kind: 'daemon', entry, n: m, close: false });
    request(PS_IOV_GET, vpid, first, m);
    if (n === 1) {
      entry.faultAt = faultAt ?? performance.now();
      stats.faultsForwarded++;
      window.fault();
      // A fault: what the task reads next is most likely what follows it.
      followFault(vpid, first);
    }
    return entry;
  };

  /**
   * A request's entry now: answered from here (localPages of it at most), waiting for a prefetch
   * in flight, or asked of the source; undefined when the page cannot come (the front failed).
   */
  const dispatch = (req: Buffer, vpid: number, first: number, n: number, localPages = share(n)): Entry | undefined => {
    if (holder.hasPage(vpid, first)) return local(req, vpid, first, localPages);
    if (asked.get(key(vpid, first)) === 1) {
      if (n === 1) window.fault();
      return { kind: 'wait', req, vpid, first, n, ...(n === 1 ? { faultAt: performance.now() } : {}) };
    }
    if (upstream) return forward(vpid, first, n);
    fail(`page 0x${(first * PAGE).toString(16)} of process ${vpid} never arrived`);
    return undefined;
  };

  const faultServed = (at: number) => {
    const ms = performance.now() - at;
    stats.faultWaitMs += ms;
    if (ms > stats.faultWaitMaxMs) stats.faultWaitMaxMs = ms;
  };
  /**
   * Any order: answers every request whose first page is here, faults first. The daemon finds an
   * answer's request by its process and address (patches/criu/0011), so a fault's page goes to
   * it as soon as it is here, not after the background answers asked for before it.
   */
  const answerPending = () => {
    for (const faults of [true, false]) {
      for (let i = 0; i < pending.length; ) {
        const p = pending[i]!;
        if (p.fault !== faults || (p.held && !started) || !holder.hasPage(p.vpid, p.first)) {
          i++;
          continue;
        }
        pending.splice(i, 1);
        const a = local(p.req, p.vpid, p.first, p.fault ? 1 : share(p.n), p.fetched) as Entry & { kind: 'ready' };
        daemon.write(a.data, a.release);
        // Served pages leave a holder that forgets them: another request for them (a forked
        // child's, under the same image) must have them asked for again.
        if (!holder.keepsServed) {
          const k = (a.data.length - PS_HEADER) / PAGE;
          for (const q of pending) if (q.vpid === p.vpid && q.first < p.first + k && p.first < q.first + q.n && q.next > p.first) q.next = Math.max(q.first, p.first);
        }
        if (p.waited) stats.faultsWaited++;
        if (p.fault && (p.waited || p.fetched)) faultServed(p.at);
      }
    }
  };
  /** Any order: a request of the daemon; false when its page cannot come (the front failed). */
  const askAny = (req: Buffer, vpid: number, first: number, n: number): boolean => {
    const now = performance.now();
    const p: Pending = { req: Buffer.from(req), vpid, first, n, fault: n === 1, at: now, held: n > 1 && quiet && !started, next: first };
    if (!holder.hasPage(vpid, first)) {
      if (!upstream) {
        fail(`page 0x${(first * PAGE).toString(16)} of process ${vpid} never arrived`);
        return false;
      }
      if (p.fault) {
        window.fault();
        if (asked.get(key(vpid, first)) === 1) p.waited = true;
        else fetchFault(p);
        // A fault: what the task reads next is most likely what follows it.
        followFault(vpid, first);
      }
    }
    pending.push(p);
    return true;
  };
  // Answers written in one pass leave in one system call.
  const flush = () => {
    daemon.cork();
    try {
      flushAnswers();
    } finally {
      daemon.uncork();
    }
  };
  const flushAnswers = () => {
    if (anyOrder) answerPending();
    while (entries.length) {
      const head = entries[0]!;
      if (head.kind === 'later') {
        if (!started && entries.length === 1) return;
        // The task runs, or a fault waits behind it: the daemon takes a shorter answer and asks
        // again for the rest.
        const now = dispatch(head.req, head.vpid, head.first, head.n, started ? share(head.n) : 1);
        if (!now) return;
        entries[0] = now;
        continue;
      }
      if (head.kind === 'wait') {
        if (holder.hasPage(head.vpid, head.first)) {
          entries[0] = local(head.req, head.vpid, head.first, head.n);
          if (head.faultAt !== undefined) {
            stats.faultsWaited++;
            faultServed(head.faultAt);
          }
        } else if (asked.get(key(head.vpid, head.first)) !== 1) entries[0] = forward(head.vpid, head.first, head.n, head.faultAt);
        else return;
        continue;
      }
      if (head.kind === 'ready') {
        daemon.write(head.data, head.release);
        entries.shift();
        continue;
      }
      for (const c of head.q.take(head.q.length)) daemon.write(c);
      if (head.left !== 0) return;
      if (head.faultAt !== undefined) faultServed(head.faultAt);
      entries.shift();
    }
  };

  /** Answers from the source, in the order they were asked for. */
  const onUpstream = () => {
    while (sent.length) {
      const s = sent[0]!;
      if (s.kind === 'daemon') {
        const e = s.entry;
        if (e.left < 0) {
          const need = s.close ? 4 : PS_HEADER;
          if (up.length < need) break;
          const n = s.close ? 0 : Number(up.peek(PS_HEADER).readBigUInt64LE(8));
          if (n > s.n) return fail(`the source answered a request for ${s.n} pages with ${n}`);
          stats.forwardedPages += n;
          e.left = need + n * PAGE;
        }
        for (const c of up.take(Math.min(e.left, up.length))) {
          e.q.push(c);
          e.left -= c.length;
        }
        if (e.left > 0) break;
        sent.shift();
        continue;
      }
      if (up.length < PS_HEADER) break;
      const got = Number(up.peek(PS_HEADER).readBigUInt64LE(8));
      if (got < 1 || got > s.n) return fail(`the source answered a prefetch of ${s.n} pages with ${got}`);
      if (up.length < PS_HEADER + got * PAGE) break;
      const parts = up.take(PS_HEADER + got * PAGE);
      // The holder copies the pages into its slabs: one buffer of the answer is enough.
      const data = (parts.length === 1 ? parts[0]! : Buffer.concat(parts)).subarray(PS_HEADER);
      sent.shift();
      if (s.fault) stats.forwardedPages += got;
      else {
        inflight -= s.n * PAGE;
        window.answered(performance.now() - s.at);
        stats.prefetchMinRttMs = window.minRtt;
        stats.prefetchedPages += got;
      }
      holder.put(s.vpid, s.first * PAGE, got, data);
      for (let i = 0; i < got; i++) {
        const k = key(s.vpid, s.first + i);
        if (asked.get(k) === 1) asked.delete(k);
      }
      // CRIU answers up to the end of one of its buffers: the rest right away (still marked).
      if (got < s.n && !closed) sendPrefetch(s.vpid, s.first + got, s.n - got);
      else for (let i = got; i < s.n; i++) asked.delete(key(s.vpid, s.first + i));
    }
    flush();
    pump();
  };

  upstream?.on('data', (c: Buffer) => {
    up.push(c);
    onUpstream();
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
        if (n < 1 || n > MAX_DAEMON_PAGES || vaddr % PAGE !== 0) return fail(`lazy-pages asked for ${n} pages at 0x${vaddr.toString(16)}`);
        const first = vaddr / PAGE;
        if (n === 1) lastFault = performance.now();
        if (anyOrder) {
          if (!askAny(req, vpid, first, n)) return;
          continue;
        }
        // The daemon's background fill while the restored task waits for the decision took the
        // CPU the pause needs (see quiet()). (No prefetch is in flight before the task runs.)
        const hold = n > 1 && quiet && !started && (upstream !== undefined || holder.hasPage(vpid, first));
        const entry = hold ? ({ kind: 'later', req: Buffer.from(req), vpid, first, n } as const) : dispatch(Buffer.from(req), vpid, first, n);
        if (!entry) return;
        entries.push(entry);
      } else if (cmd === PS_IOV_CLOSE || cmd === PS_IOV_FORCE_CLOSE) {
        // Every page is in the task: no more prefetch; the source answers after what is in flight.
        closed = true;
        if (upstream) {
          const entry = { kind: 'remote' as const, q: new ChunkQueue(), left: -1 };
          sent.push({ kind: 'daemon', entry, n: 0, close: true });
          toUpstream(Buffer.from(req));
          entries.push(entry);
        } else {
          entries.push({ kind: 'ready', data: Buffer.alloc(4) });
        }
      } else {
        return fail(`lazy-pages sent an unknown command ${cmd}`);
      }
    }
    inbuf = Buffer.from(inbuf.subarray(off));
    flush();
    pump();
  });
  // What this turn asked for goes before the end.
  const endUpstream = () => {
    if (!upstream) return;
    sendBatch();
    upstream.end();
  };
  daemon.on('end', endUpstream);
  daemon.on('error', () => upstream?.destroy());
  daemon.on('close', endUpstream);
  return {
    quiet: () => {
      quiet = true;
    },
    prefetch: () => {
      started = true;
      // A task that runs again faults at once: the answers to the requests held until now are
      // cut as if a fault had just come, or its first faults wait behind 1 MiB per request.
      lastFault = performance.now();
      flush();
      pump();
    },
    hold: () => daemon.pause(),
    release: () => daemon.resume(),
  };
}
