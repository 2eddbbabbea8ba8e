// The lazy-pages front between CRIU's lazy-pages daemon and the source's page server, against
// models of both that follow CRIU's rules (criu/uffd.c, criu/page-xfer.c): the daemon keeps one
// background request per process, asks single pages on faults, takes answers in order and accepts
// fewer pages than it asked for; the page server answers up to the end of one of its buffers and
// dies on a request for a page it does not hold. The real thing runs in test/migrate.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { mkdtempSync, openSync, readSync, closeSync, rmSync } from 'node:fs';
import { createServer, connect, type AddressInfo, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { MemPageHolder, PREFETCH_WINDOW, PrefetchWindow, serveLazy, type FrontStats, type LazyFront } from '../../src/precopy/front.js';
import type { PageRun } from '../../src/criu/image.js';
import { PAGE, PageStore } from '../../src/precopy/store.js';
import { psRequest } from '../support/page-server.js';

const GET = 7;
const CLOSE = 0x1023;

function header(cmd: number, n: number, page: number, vpid: number): Buffer {
  return psRequest(cmd, n, page * PAGE, vpid);
}

/** What the source's memory holds at a page: its own identity, so a misplaced page shows. */
function content(vpid: number, page: number): Buffer {
  const b = Buffer.alloc(PAGE, (page * 7 + vpid) & 0xff);
  b.writeUInt32LE(vpid, 0);
  b.writeUInt32LE(page, 4);
  return b;
}

/**
 * CRIU's page server on the source: answers from buffers of `buf` pages; a stray request kills
 * it. Answers leave at `mbps` MB/s, as over a link.
 */
function pageServer(runs: PageRun[], buf: number, mbps = 200) {
  const state = { pagesSent: 0, died: '', log: [] as Array<[number, number]> };
  const holds = (vpid: number, page: number) => runs.some((r) => r.vpid === vpid && page >= r.first && page < r.first + r.n);
  const server = createServer((s) => {
    s.setNoDelay(true);
    let inb = Buffer.alloc(0);
    // One queue, one timer at a time: answers must leave in the order they were asked for.
    const out: Array<{ b: Buffer; end: boolean }> = [];
    let busy = false;
    const drain = () => {
      const next = out.shift();
      if (!next) return void (busy = false);
      busy = true;
      setTimeout(() => {
        if (next.end) s.end(next.b);
        else s.write(next.b);
        drain();
      }, next.b.length / (mbps * 1000));
    };
    const send = (b: Buffer, end = false) => {
      out.push({ b, end });
      if (!busy) drain();
    };
    s.on('error', () => {});
    s.on('data', (d: Buffer) => {
      inb = Buffer.concat([inb, d]);
      for (; inb.length >= 32; inb = inb.subarray(32)) {
        const cmd = inb.readUInt32LE(0);
        if (cmd === CLOSE) {
          send(Buffer.alloc(4), true);
          return;
        }
        const n = Number(inb.readBigUInt64LE(8));
        const page = Number(inb.readBigUInt64LE(16)) / PAGE;
        const vpid = Number(inb.readBigUInt64LE(24));
        if (cmd !== GET || !holds(vpid, page)) {
          state.died = `asked for page ${page} of ${vpid}`;
          s.destroy();
          return;
        }
        state.log.push([page, n]);
        const run = runs.find((r) => r.vpid === vpid && page >= r.first && page < r.first + r.n)!;
        const bufEnd = Math.min(run.first + run.n, run.first + (Math.floor((page - run.first) / buf) + 1) * buf);
        const k = Math.min(n, bufEnd - page);
        const parts = [header((4 << 16) | 6, k, page, vpid)];
        for (let i = 0; i < k; i++) parts.push(content(vpid, page + i));
        state.pagesSent += k;
        send(Buffer.concat(parts));
      }
    });
  });
  return { server, state };
}

/**
 * CRIU's lazy-pages daemon: fills every lazy page once, one background request per process at a
 * time (64 KiB after a fault, growing by 64 KiB to 4 MiB). The task touches `touches` pages in
 * order, ten per millisecond; one that is not there yet is a fault (asked for alone unless a
 * request already covers it) and the task waits for it.
 */
async function daemon(port: number, runs: PageRun[], touches: Array<[number, number]>, anyOrder = false): Promise<{ got: number }> {
  const missing = new Map<number, Set<number>>();
  for (const r of runs) {
    const s = missing.get(r.vpid) ?? new Set<number>();
    for (let i = 0; i < r.n; i++) s.add(r.first + i);
    missing.set(r.vpid, s);
  }
  const sock = connect(port, '127.0.0.1');
  await once(sock, 'connect');
  // As CRIU's daemon: answers fill its requests' places in the order it asked, each into a buffer
  // of that place's process, no longer than the place asked for; the answer's address says which
  // request of that process it completes (criu/uffd.c, uffd_io_complete). In any order
  // (patches/criu/0011) an answer goes to a request of its process and address that asked for at
  // least as many pages, the fewest such.
  type Req = { vpid: number; page: number; n: number; fault?: true };
  const pending: Req[] = [];
  const places: Array<{ vpid: number; n: number }> = [];
  const queued = (vpid: number, page: number) => pending.some((q) => q.vpid === vpid && page >= q.page && page < q.page + q.n);
  const xfer = new Map<number, number>();
  let got = 0;
  let arrived = () => {};
  let closing = false;
  const ask = (q: Req) => {
    pending.push(q);
    places.push({ vpid: q.vpid, n: q.n });
    sock.write(header(GET, q.n, q.page, q.vpid));
  };
  const background = () => {
    for (const [vpid, set] of missing) {
      if (!set.size || pending.some((q) => q.vpid === vpid)) continue; // CRIU: none while the process has a request out
      const pages = [...set].filter((p) => !queued(vpid, p)).sort((a, b) => a - b);
      if (!pages.length) continue;
      const len = xfer.get(vpid) ?? 16;
      let n = 1;
      while (n < len && pages[n] === pages[0]! + n) n++;
      xfer.set(vpid, Math.min(1024, len + 16));
      ask({ vpid, page: pages[0]!, n });
      return;
    }
    if (!pending.length && [...missing.values()].every((s) => !s.size) && !closing) {
      closing = true;
      sock.write(header(CLOSE, 0, 0, 0));
    }
  };
  let inb = Buffer.alloc(0);
  const done = new Promise<void>((resolve, reject) => {
    sock.on('error', reject);
    sock.on('close', () => reject(new Error(`the front closed the daemon's socket with ${[...missing.values()].reduce((a, s) => a + s.size, 0)} pages missing`)));
    sock.on('data', (d: Buffer) => {
      inb = Buffer.concat([inb, d]);
      for (;;) {
        if (closing && !pending.length) {
          if (inb.length >= 4) resolve();
          return;
        }
        if (inb.length < 32) return;
        const n = Number(inb.readBigUInt64LE(8));
        if (inb.length < 32 + n * PAGE) return;
        const page = Number(inb.readBigUInt64LE(16)) / PAGE;
        const vpid = Number(inb.readBigUInt64LE(24));
        if (!anyOrder) {
          const place = places.shift()!;
          assert.equal(vpid, place.vpid, 'an answer fills a place of its own process');
          assert.ok(n >= 1 && n <= place.n, `answered ${n} pages in a place for ${place.n}`);
        }
        let at = -1;
        for (let i = 0; i < pending.length; i++) {
          const q = pending[i]!;
          if (q.vpid === vpid && q.page === page && q.n >= n && (at < 0 || q.n < pending[at]!.n)) at = i;
        }
        assert.ok(at >= 0, `page ${page} of ${vpid} answers a request made`);
        const q = pending.splice(at, 1)[0]!;
        assert.ok(n <= q.n, `answered ${n} of ${q.n} pages`);
        for (let i = 0; i < n; i++) {
          assert.ok(missing.get(q.vpid)!.delete(q.page + i), `page ${q.page + i} answered twice`);
          assert.ok(inb.subarray(32 + i * PAGE, 32 + (i + 1) * PAGE).equals(content(q.vpid, q.page + i)), `page ${q.page + i} of ${q.vpid} intact`);
          got++;
        }
        arrived();
        inb = inb.subarray(32 + n * PAGE);
        background();
      }
    });
  });
  background();
  for (let i = 0; i < touches.length; i++) {
    const [vpid, page] = touches[i]!;
    if (i % 10 === 0) await new Promise((r) => setTimeout(r, 1));
    if (!missing.get(vpid)!.has(page)) continue;
    if (!queued(vpid, page)) {
      xfer.set(vpid, 16);
      ask({ vpid, page, n: 1, fault: true });
    }
    while (missing.get(vpid)!.has(page)) await new Promise<void>((r) => (arrived = r));
  }
  await done;
  sock.destroy();
  return { got };
}

/** Test names: the daemon takes answers in any order (patches/criu/0011), or in the order it asked. */
const inAnyOrder = (anyOrder: boolean) => (anyOrder ? ' (answers in any order)' : '');

function newStats(): FrontStats {
  return { localPages: 0, forwardedPages: 0, prefetchedPages: 0, faultsForwarded: 0, faultWaitMs: 0, faultWaitMaxMs: 0, faultsWaited: 0 };
}

/** Pre-copy: every page already in the store. */
function filledHolder(runs: PageRun[]): MemPageHolder {
  const holder = new MemPageHolder();
  for (const r of runs) for (let i = 0; i < r.n; i++) holder.put(r.vpid, (r.first + i) * PAGE, 1, content(r.vpid, r.first + i));
  return holder;
}

async function listen(s: Server): Promise<number> {
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  return (s.address() as AddressInfo).port;
}

for (const anyOrder of [false, true])
  test(`lazy-pages front: every page once and intact, prefetch within its window, faults answered in order${inAnyOrder(anyOrder)}`, async () => {
  // Two processes, runs of odd sizes, CRIU buffers of 48 pages (answers stop at their ends).
  const runs: PageRun[] = [
    { vpid: 1, first: 0x400, n: 700 },
    { vpid: 1, first: 0x1000, n: 3 },
    { vpid: 1, first: 0x2000, n: 1500 },
    { vpid: 7, first: 0x10, n: 900 },
  ];
  const total = runs.reduce((a, r) => a + r.n, 0);
  const src = pageServer(runs, 48);
  const srcPort = await listen(src.server);
  const stats = newStats();
  const holder = new MemPageHolder();
  const sockets: Socket[] = [];
  let maxHeld = 0;
  const front = createServer((d) => {
    const up = connect(srcPort, '127.0.0.1');
    sockets.push(d, up);
    serveLazy(d, holder, up, runs, stats, { anyOrder }).prefetch();
  });
  const frontPort = await listen(front);
  const probe = setInterval(() => (maxHeld = Math.max(maxHeld, holder.heldBytes)), 1);
  try {
    const touches: Array<[number, number]> = [];
    for (let i = 0; i < 40; i++) touches.push(i % 2 ? [7, 0x10 + ((i * 37) % 900)] : [1, 0x2000 + ((i * 113) % 1500)]);
    const r = await daemon(frontPort, runs, touches, anyOrder);
    assert.equal(r.got, total);
    assert.equal(src.state.died, '');
    // Nothing crossed twice: what the daemon got from the front's memory was prefetched once.
    assert.equal(src.state.pagesSent, stats.prefetchedPages + stats.forwardedPages);
    assert.equal(stats.localPages + stats.forwardedPages, total);
    assert.ok(src.state.pagesSent <= total, `${src.state.pagesSent} pages sent for ${total}`);
    assert.ok(stats.prefetchedPages > total / 2, `prefetch carried ${stats.prefetchedPages} of ${total} pages`);
    assert.equal(holder.heldBytes, 0, 'every prefetched page was taken');
  } finally {
    clearInterval(probe);
    for (const s of sockets) s.destroy();
    front.close();
    src.server.close();
  }
  assert.ok(maxHeld > 0 && maxHeld < 64 << 20);
  assert.ok(PREFETCH_WINDOW <= 4 << 20);
});

for (const anyOrder of [false, true])
  test(`lazy-pages front: the prefetch follows a fault${inAnyOrder(anyOrder)}`, async () => {
  const runs: PageRun[] = [{ vpid: 3, first: 0x100, n: 4096 }];
  const src = pageServer(runs, 256, 80);
  const srcPort = await listen(src.server);
  const stats = newStats();
  const sockets: Socket[] = [];
  const front = createServer((d) => {
    const up = connect(srcPort, '127.0.0.1');
    sockets.push(d, up);
    serveLazy(d, new MemPageHolder(), up, runs, stats, { anyOrder }).prefetch();
  });
  const frontPort = await listen(front);
  try {
    // The task touches a page in the middle, then reads on from there: after the fault the
    // prefetch goes on from the page after it, not from where it was.
    const touches: Array<[number, number]> = [];
    for (let p = 0x100 + 2048; p < 0x100 + 2048 + 200; p++) touches.push([3, p]);
    const r = await daemon(frontPort, runs, touches, anyOrder);
    assert.equal(r.got, 4096);
    const fault = src.state.log.findIndex(([p, n]) => p === 0x100 + 2048 && n === 1);
    assert.ok(fault >= 0, 'the fault went to the source');
    const next = src.state.log.slice(fault + 1).find(([, n]) => n > 1)!;
    assert.equal(next[0], 0x100 + 2049, `the prefetch after the fault asked for page ${next[0]}`);
    assert.equal(stats.faultsForwarded, 1, 'the pages after the fault were prefetched');
  } finally {
    for (const s of sockets) s.destroy();
    front.close();
    src.server.close();
  }
});

for (const anyOrder of [false, true])
  test(`lazy-pages front: random faults, every page once and intact${inAnyOrder(anyOrder)}`, async () => {
  const runs: PageRun[] = [{ vpid: 5, first: 0x800, n: 3000 }];
  const total = 3000;
  const src = pageServer(runs, 256, 80);
  const srcPort = await listen(src.server);
  const stats = newStats();
  const sockets: Socket[] = [];
  const holder = new MemPageHolder();
  const front = createServer((d) => {
    const up = connect(srcPort, '127.0.0.1');
    sockets.push(d, up);
    serveLazy(d, holder, up, runs, stats, { anyOrder }).prefetch();
  });
  const frontPort = await listen(front);
  try {
    const touches: Array<[number, number]> = [];
    for (let i = 0; i < 120; i++) touches.push([5, 0x800 + ((i * 1237 + 311) % total)]);
    const r = await daemon(frontPort, runs, touches, anyOrder);
    assert.equal(r.got, total);
    assert.equal(src.state.died, '');
    assert.equal(src.state.pagesSent, stats.prefetchedPages + stats.forwardedPages, 'nothing crossed twice');
    assert.equal(stats.localPages + stats.forwardedPages, total);
    assert.equal(holder.heldBytes, 0, 'every page held for the daemon was taken');
  } finally {
    for (const s of sockets) s.destroy();
    front.close();
    src.server.close();
  }
});

test('lazy-pages front: the prefetch window drops at a fault and stays down while faults come, grows while answers do not queue, shrinks when they do', () => {
  const w = new PrefetchWindow();
  const start = w.bytes;
  let t = 0;
  w.fault(t);
  // While faults come, the window stays at its minimum.
  for (let i = 0; i < 10; i++) w.answered(1, (t += 1));
  assert.equal(w.bytes, start, 'held at the minimum right after a fault');
  t += 100;
  for (let i = 0; i < 10; i++) w.answered(1, (t += 1));
  const grown = w.bytes;
  assert.ok(grown > start, `${grown} after quick answers, from ${start}`);
  // Answers that queue 5 ms behind the others (more than the 2 ms allowed) take it back down.
  for (let i = 0; i < 5; i++) w.answered(6, (t += 1));
  assert.ok(w.bytes < grown, `${w.bytes} after queued answers, from ${grown}`);
  for (let i = 0; i < 1000; i++) w.answered(6, (t += 1));
  assert.equal(w.bytes, start, 'never below the minimum');
  for (let i = 0; i < 1000; i++) w.answered(1.5, (t += 1));
  assert.equal(w.bytes, PREFETCH_WINDOW, 'never above the maximum');
  w.fault((t += 1));
  assert.equal(w.bytes, start);
});

test('lazy-pages front: once the restore is over, background requests the store could answer wait for the resume; a fault behind one gets it answered with one page; at the resume the rest follow in fault-sized shares, then in full', async () => {
  // Pre-copy: every page is in the store (no link to the source). CRIU's daemon starts its
  // background fill when the restore has finished, while the task still waits for the decision.
  const runs: PageRun[] = [
    { vpid: 1, first: 0x100, n: 256 },
    { vpid: 2, first: 0x900, n: 64 },
  ];
  const holder = filledHolder(runs);
  const stats = newStats();
  const sockets: Socket[] = [];
  let lazyFront: ReturnType<typeof serveLazy> | undefined;
  const front = createServer((d) => {
    sockets.push(d);
    lazyFront = serveLazy(d, holder, undefined, runs, stats);
  });
  const port = await listen(front);
  try {
    const { sock, answers } = await rawDaemon(port);
    sockets.push(sock);
    const settle = () => new Promise((r) => setTimeout(r, 50));
    // During the restore (CRIU's last steps fault on the task's memory) requests are answered.
    sock.write(header(GET, 8, 0x140, 1));
    await settle();
    assert.deepEqual(answers(), [[1, 0x140, 8]]);
    lazyFront!.quiet();
    sock.write(header(GET, 64, 0x100, 1));
    await settle();
    assert.equal(answers().length, 1, 'a background request waits while the task is stopped');
    // A fault (one page) of the other process, queued behind the waiting request.
    sock.write(header(GET, 1, 0x920, 2));
    await settle();
    assert.deepEqual(answers().slice(1), [
      [1, 0x100, 1],
      [2, 0x920, 1],
    ]);
    // The daemon asks again for the rest; it waits until the task runs.
    sock.write(header(GET, 63, 0x101, 1));
    await settle();
    assert.equal(answers().length, 3);
    lazyFront!.prefetch();
    await settle();
    // A task that runs again faults at once: the held request is answered with a fault-sized share.
    assert.deepEqual(answers().slice(3), [[1, 0x101, 16]]);
    // Once the task runs, background requests are answered at once, in full when no fault came.
    sock.write(header(GET, 32, 0x900, 2));
    await settle();
    assert.deepEqual(answers().slice(4), [[2, 0x900, 32]]);
    assert.equal(stats.localPages, 8 + 1 + 1 + 16 + 32);
  } finally {
    for (const s of sockets) s.destroy();
    front.close();
  }
});

/** A raw daemon connection to a front: requests written by hand, answers parsed and checked. */
async function rawDaemon(port: number): Promise<{ sock: Socket; answers: () => Array<[number, number, number]> }> {
  const sock = connect(port, '127.0.0.1');
  await once(sock, 'connect');
  let inb = Buffer.alloc(0);
  sock.on('data', (c: Buffer) => (inb = Buffer.concat([inb, c])));
  const answers = (): Array<[number, number, number]> => {
    const out: Array<[number, number, number]> = [];
    let off = 0;
    while (inb.length - off >= 32) {
      const n = Number(inb.readBigUInt64LE(off + 8));
      if (inb.length - off < 32 + n * PAGE) break;
      const page = Number(inb.readBigUInt64LE(off + 16)) / PAGE;
      const vpid = Number(inb.readBigUInt64LE(off + 24));
      for (let i = 0; i < n; i++) assert.ok(inb.subarray(off + 32 + i * PAGE, off + 32 + (i + 1) * PAGE).equals(content(vpid, page + i)), `page ${page + i} of ${vpid} intact`);
      out.push([vpid, page, n]);
      off += 32 + n * PAGE;
    }
    return out;
  };
  return { sock, answers };
}

test('lazy-pages front: a background request gets at most 256 pages at once, 16 while faults come (a fault waits behind every answer the daemon has not copied)', async () => {
  const runs: PageRun[] = [{ vpid: 1, first: 0x1000, n: 4096 }];
  const holder = new MemPageHolder();
  for (let i = 0; i < 4096; i++) holder.put(1, (0x1000 + i) * PAGE, 1, content(1, 0x1000 + i));
  const stats = newStats();
  const sockets: Socket[] = [];
  const front = createServer((d) => {
    sockets.push(d);
    serveLazy(d, holder, undefined, runs, stats).prefetch();
  });
  const port = await listen(front);
  try {
    const { sock, answers } = await rawDaemon(port);
    sockets.push(sock);
    const settle = (ms = 50) => new Promise((r) => setTimeout(r, ms));
    // Right after the task runs the front cuts answers as if a fault had come (see above).
    await settle(20);
    sock.write(header(GET, 1024, 0x1000, 1));
    await settle();
    assert.deepEqual(answers(), [[1, 0x1000, 256]]);
    // A fault, then at once the daemon's next background request.
    sock.write(Buffer.concat([header(GET, 1, 0x1800, 1), header(GET, 768, 0x1100, 1)]));
    await settle();
    assert.deepEqual(answers().slice(1), [
      [1, 0x1800, 1],
      [1, 0x1100, 16],
    ]);
    // Faults stopped: full shares again.
    sock.write(header(GET, 752, 0x1110, 1));
    await settle();
    assert.deepEqual(answers().slice(3), [[1, 0x1110, 256]]);
  } finally {
    for (const s of sockets) s.destroy();
    front.close();
  }
});

test('lazy-pages front: once the restore is over, a background request for pages only the source has waits for the resume too; a fault behind it is not held', async () => {
  const runs: PageRun[] = [{ vpid: 1, first: 0x100, n: 512 }];
  const src = pageServer(runs, 64);
  const srcPort = await listen(src.server);
  const holder = new MemPageHolder();
  const stats = newStats();
  const sockets: Socket[] = [];
  let lazyFront: ReturnType<typeof serveLazy> | undefined;
  const front = createServer((d) => {
    const up = connect(srcPort, '127.0.0.1');
    sockets.push(d, up);
    lazyFront = serveLazy(d, holder, up, runs, stats);
  });
  const port = await listen(front);
  try {
    const { sock, answers } = await rawDaemon(port);
    sockets.push(sock);
    const settle = () => new Promise((r) => setTimeout(r, 50));
    await settle();
    lazyFront!.quiet();
    sock.write(header(GET, 64, 0x100, 1));
    await settle();
    assert.deepEqual(answers(), []);
    assert.deepEqual(src.state.log, [], 'nothing asked of the source while the task is stopped');
    // A fault behind it: the waiting request goes (cut to what the front forwards), then the fault.
    sock.write(header(GET, 1, 0x200, 1));
    await settle();
    assert.deepEqual(answers(), [
      [1, 0x100, 16],
      [1, 0x200, 1],
    ]);
    // The task runs: the front's prefetch and the daemon's requests go to the source.
    lazyFront!.prefetch();
    sock.write(header(GET, 48, 0x110, 1));
    await settle();
    const [next] = answers().slice(2);
    assert.ok(next && next[0] === 1 && next[1] === 0x110 && next[2] >= 1 && next[2] <= 48, `answer ${String(next)}`);
    assert.equal(src.state.died, '');
  } finally {
    for (const s of sockets) s.destroy();
    front.close();
    src.server.close();
  }
});

/**
 * A front for each daemon that connects; its upstream is the page server at srcPort, if any.
 * close() ends every socket and the listener.
 */
async function frontServer(holder: MemPageHolder, runs: PageRun[], stats: FrontStats, opts: { srcPort?: number; anyOrder?: boolean; prefetch?: boolean }) {
  const sockets: Socket[] = [];
  let lazy: LazyFront | undefined;
  const server = createServer((d) => {
    const up = opts.srcPort === undefined ? undefined : connect(opts.srcPort, '127.0.0.1');
    sockets.push(d, ...(up ? [up] : []));
    lazy = serveLazy(d, holder, up, runs, stats, { anyOrder: opts.anyOrder });
    if (opts.prefetch) lazy.prefetch();
  });
  const port = await listen(server);
  return {
    daemon: async () => {
      const d = await rawDaemon(port);
      sockets.push(d.sock);
      return d;
    },
    front: () => lazy!,
    close: () => {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

const settle = (ms = 50) => new Promise((r) => setTimeout(r, ms));

test('lazy-pages front, answers in any order: once the restore is over, a fault is answered at once while a background request waits for the resume, whole', async () => {
  const runs: PageRun[] = [
    { vpid: 1, first: 0x100, n: 256 },
    { vpid: 2, first: 0x900, n: 64 },
  ];
  const stats = newStats();
  const f = await frontServer(filledHolder(runs), runs, stats, { anyOrder: true });
  try {
    const { sock, answers } = await f.daemon();
    f.front().quiet();
    sock.write(Buffer.concat([header(GET, 64, 0x100, 1), header(GET, 1, 0x920, 2), header(GET, 1, 0x1a0, 1)]));
    await settle();
    // In order the waiting request had to go first, cut to one page.
    assert.deepEqual(answers(), [
      [2, 0x920, 1],
      [1, 0x1a0, 1],
    ]);
    f.front().prefetch();
    await settle();
    assert.deepEqual(answers().slice(2), [[1, 0x100, 16]]);
    assert.equal(stats.localPages, 1 + 1 + 16);
  } finally {
    f.close();
  }
});

test('lazy-pages front, answers in any order: a fault does not wait for the background requests before it, and a held one asks nothing of the source until the resume', async () => {
  const runs: PageRun[] = [{ vpid: 1, first: 0x100, n: 512 }];
  const src = pageServer(runs, 64);
  const stats = newStats();
  const f = await frontServer(new MemPageHolder(), runs, stats, { srcPort: await listen(src.server), anyOrder: true });
  try {
    const { sock, answers } = await f.daemon();
    await settle();
    f.front().quiet();
    sock.write(Buffer.concat([header(GET, 64, 0x100, 1), header(GET, 1, 0x200, 1)]));
    await settle();
    assert.deepEqual(answers(), [[1, 0x200, 1]]);
    assert.deepEqual(src.state.log, [[0x200, 1]], 'only the fault went to the source');
    f.front().prefetch();
    await settle();
    const [next] = answers().slice(1);
    assert.ok(next && next[0] === 1 && next[1] === 0x100 && next[2] >= 1 && next[2] <= 64, `answer ${String(next)}`);
    assert.equal(stats.faultsForwarded, 1);
    assert.equal(src.state.died, '');
  } finally {
    f.close();
    src.server.close();
  }
});

for (const anyOrder of [false, true])
  test(`lazy-pages front: pages the daemon had and asks for again (a range unmapped while its answer was on the way) come again from the source${inAnyOrder(anyOrder)}`, async () => {
    const runs: PageRun[] = [{ vpid: 1, first: 0x100, n: 64 }];
    const src = pageServer(runs, 64);
    const f = await frontServer(new MemPageHolder(), runs, newStats(), { srcPort: await listen(src.server), anyOrder, prefetch: true });
    try {
      const { sock, answers } = await f.daemon();
      await settle(100);
      sock.write(header(GET, 16, 0x100, 1));
      await settle(100);
      assert.deepEqual(answers(), [[1, 0x100, 16]]);
      sock.write(Buffer.concat([header(GET, 16, 0x100, 1), header(GET, 1, 0x105, 1)]));
      await settle(100);
      const again = answers().slice(1);
      assert.equal(again.length, 2, `answers ${JSON.stringify(again)}`);
      assert.ok(again.some(([, p, n]) => p === 0x100 && n >= 1) && again.some(([, p, n]) => p === 0x105 && n === 1));
      assert.equal(src.state.died, '');
    } finally {
      f.close();
      src.server.close();
    }
  });

test('lazy-pages front with stored answers (patches/criu/0016): pages in the store\'s file go as their slot, cut where the slots stop following each other; zero pages and pages only held in memory go as data', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-front-'));
  const store = new PageStore(join(dir, 'precopy.pages'));
  const sockets: Socket[] = [];
  const front = createServer((d) => {
    sockets.push(d);
    serveLazy(d, store, undefined, runs, stats, { anyOrder: true, stored: true }).prefetch();
  });
  const runs: PageRun[] = [{ vpid: 3, first: 0x200, n: 64 }];
  const stats = newStats();
  try {
    // Pages 0x200-0x20f in slots 0-15, then 0x218-0x21f (slots 16-23) before 0x210-0x217 (24-31):
    // a rewrite keeps its slot. 0x220-0x23f are zero.
    const put = (first: number, n: number) => store.put(3, first * PAGE, n, Buffer.concat(Array.from({ length: n }, (_, i) => content(3, first + i))));
    put(0x200, 16);
    put(0x218, 8);
    put(0x210, 8);
    put(0x204, 2);
    store.put(3, 0x220 * PAGE, 32);
    const port = await listen(front);
    const sock = connect(port, '127.0.0.1');
    sockets.push(sock);
    await once(sock, 'connect');
    let inb = Buffer.alloc(0);
    sock.on('data', (c: Buffer) => (inb = Buffer.concat([inb, c])));
    const fd = openSync(join(dir, 'precopy.pages'), 'r');
    const got: Array<[string, number, number]> = [];
    /** Parses answers as the patched daemon does: a stored one is read from the file at its slot. */
    const parse = () => {
      while (inb.length >= 32) {
        const flags = inb.readUInt32LE(0) >>> 16;
        const n = Number(inb.readBigUInt64LE(8));
        const page = Number(inb.readBigUInt64LE(16)) / PAGE;
        assert.equal(Number(inb.readBigUInt64LE(24)), 3);
        const stored = (flags & (1 << 7)) !== 0;
        if (!stored && inb.length < 32 + n * PAGE) return;
        const data = Buffer.alloc(n * PAGE);
        if (stored) assert.equal(readSync(fd, data, 0, n * PAGE, inb.readUInt32LE(4) * PAGE), n * PAGE);
        else inb.copy(data, 0, 32, 32 + n * PAGE);
        for (let i = 0; i < n; i++) {
          const want = page + i >= 0x220 ? Buffer.alloc(PAGE) : content(3, page + i);
          assert.ok(data.subarray(i * PAGE, (i + 1) * PAGE).equals(want), `page 0x${(page + i).toString(16)} intact`);
        }
        got.push([stored ? 'stored' : 'data', page, n]);
        inb = inb.subarray(stored ? 32 : 32 + n * PAGE);
      }
    };
    const ask = async (page: number, n: number) => {
      sock.write(header(GET, n, page, 3));
      await new Promise((r) => setTimeout(r, 30));
      parse();
    };
    await new Promise((r) => setTimeout(r, 20));
    await ask(0x200, 64);
    await ask(0x210, 48);
    await ask(0x218, 40);
    await ask(0x220, 32);
    closeSync(fd);
    assert.deepEqual(got, [
      ['stored', 0x200, 16],
      ['stored', 0x210, 8],
      ['stored', 0x218, 8],
      ['data', 0x220, 32],
    ]);
    assert.equal(stats.storedPages, 32);
    assert.equal(stats.localPages, 64);
  } finally {
    for (const s of sockets) s.destroy();
    front.close();
    store.remove();
    rmSync(dir, { recursive: true, force: true });
  }
});
