// Pre-copy's stop policy and the destination's page store and CRIU page-server answers (parsing
// and policy only; the migration itself is tested between real hosts in test/migrate).
import assert from 'node:assert/strict';
import { closeSync, existsSync, fstatSync, mkdtempSync, openSync, readFileSync, rmSync, statSync } from 'node:fs';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { PAGE, PageStore, REC_DATA, REC_DROP, REC_HEADER, REC_ZERO, STORE_INDEX_SUFFIX } from '../../src/precopy/store.js';
import { serveLazy } from '../../src/precopy/front.js';
import { psRequest } from '../support/page-server.js';
import { expectedDowntimeMs, verdict, type RoundStat } from '../../src/precopy/tracker.js';
import { THROTTLE_MAX, THROTTLE_START, nextThrottle, watchedMs, writeRateMBps } from '../../src/precopy/throttle.js';

const round = (n: number, dirtyPages: number, expectedDowntimeMs: number, dirtyRateMBps = 10, linkMBps = 110): RoundStat => ({ round: n, pages: 0, bytes: 0, zeroPages: 0, ms: 100, dirtyPages, dirtyRateMBps, linkMBps, expectedDowntimeMs });
const policy = { maxDowntimeMs: 300, maxRounds: 8 };
const expectedDowntimeMsOf = (pages: number) => expectedDowntimeMs(pages, 110);

test('stop policy: a fitting delta that still shrinks fast gets one more round, a small one does not', () => {
  const r = (n: number, pages: number, dirtyPages: number): RoundStat => ({ ...round(n, dirtyPages, expectedDowntimeMsOf(dirtyPages)), pages });
  // 137 MiB sent, 10 MiB written meanwhile: another round takes ~85 ms off the pause.
  assert.equal(verdict([r(1, 262_144, 35_000), r(2, 35_000, 2621)], policy), 'continue');
  // 10 MiB sent, 1.5 MiB written: another round would save ~12 ms.
  assert.equal(verdict([r(1, 262_144, 35_000), r(2, 35_000, 2621), r(3, 2621, 380)], policy), 'converged');
  // Not shrinking by half: the set is what the task writes in any round.
  assert.equal(verdict([r(1, 262_144, 35_000), r(2, 4000, 2500)], policy), 'converged');
  // The round limit wins.
  assert.equal(verdict([r(1, 262_144, 35_000), r(2, 35_000, 2621)], { ...policy, maxRounds: 2 }), 'converged');
});

test('stop policy: a set that shrinks too slowly to fit before the round limit is given up early', () => {
  const r = (n: number, dirtyPages: number): RoundStat => ({ ...round(n, dirtyPages, expectedDowntimeMsOf(dirtyPages), 78, 119) });
  // 1 GiB written at ~80 MB/s over a 119 MB/s link: 230k, then 162k pages (x0.7 a round); ~12 more rounds to fit.
  assert.equal(verdict([r(1, 230_000), r(2, 162_000)], policy), 'too-slow');
  // Shrinking x0.25 a round: fits in time.
  assert.equal(verdict([r(1, 230_000), r(2, 57_000)], policy), 'continue');
});

test('stop policy: converged, round limit, stalled, faster than the link', () => {
  assert.equal(verdict([round(1, 100_000, 5000)], policy), 'continue');
  assert.equal(verdict([round(1, 100_000, 5000), round(2, 2000, 280)], policy), 'converged');
  assert.equal(verdict([round(1, 100_000, 5000), round(2, 40, 900)], policy), 'converged', 'a handful of pages is not worth a round');
  assert.equal(verdict([round(1, 100_000, 5000), round(2, 95_000, 4800)], policy), 'stalled');
  assert.equal(verdict([round(1, 100_000, 5000), round(2, 50_000, 2500, 120)], policy), 'too-fast');
  // After one round, the task's own write rate decides (its written set's growth reads low then).
  assert.equal(verdict([{ ...round(1, 153_000, 5600, 66), writeRateMBps: 180 }], policy), 'too-fast');
  assert.equal(verdict([{ ...round(1, 153_000, 5600, 66), writeRateMBps: 100 }], policy), 'continue');
  assert.equal(verdict([round(1, 153_000, 5600, 120)], policy), 'continue');
  // No round measured the link: that is not a task faster than the link.
  assert.equal(verdict([round(1, 5000, 5000, 30, 0), round(2, 2000, 2500, 30, 0)], policy), 'continue');
  const shrinking = Array.from({ length: 8 }, (_, i) => round(i + 1, 100_000 / 2 ** i, 5000 / 2 ** i));
  assert.equal(verdict(shrinking, { maxDowntimeMs: 1, maxRounds: 8 }), 'round-limit');
});

test('auto-converge: each throttle step aims at half the link, at least a tenth more, never past the maximum', () => {
  // Unthrottled, writing twice the link: half the link is a quarter of that.
  assert.equal(nextThrottle(0, 240, 120), 0.75);
  // A task already slower than half the link still gets QEMU's first step.
  assert.equal(nextThrottle(0, 40, 120), THROTTLE_START);
  // At 20 % off it still writes 129 MB/s over a 116 MB/s link: keep 0.8 x 58/129 of its CPU.
  assert.ok(Math.abs(nextThrottle(0.2, 129, 116) - (1 - (0.8 * 58) / 129)) < 1e-9);
  // Stalled though already under half the link: a tenth more.
  assert.ok(Math.abs(nextThrottle(0.4, 30, 120) - 0.5) < 1e-9);
  assert.equal(nextThrottle(0.9, 500, 100), THROTTLE_MAX);
  assert.equal(nextThrottle(0, 1e6, 100), THROTTLE_MAX);
});

test('auto-converge: the write rate counts pages written more than once in a long round', () => {
  const N = 262_144; // 1 GiB
  // Few pages of many: as counted.
  assert.ok(Math.abs(writeRateMBps(1000, N, 1000) - (1000 * 4096) / 1e6) < 0.01);
  // Writes spread evenly that would have covered 87 % of the pages once each found 58 % written.
  const found = Math.round(N * (1 - Math.exp(-0.87)));
  assert.ok(Math.abs(writeRateMBps(found, N, 9000) - (0.87 * N * 4096) / 1e6 / 9) < 0.5);
  // Every page written (or more pages than tracked: new mappings) is not an infinite rate.
  assert.ok(Number.isFinite(writeRateMBps(N, N, 1000)));
  assert.ok(writeRateMBps(2 * N, N, 1000) >= writeRateMBps(N, N, 1000));
  assert.ok(writeRateMBps(5 * N, N, 1000) >= (5 * N * 4096) / 1e6 - 1e-6, 'never fewer writes than pages found written');
  assert.equal(writeRateMBps(500, 0, 1000), (500 * 4096) / 1e6);
  assert.equal(writeRateMBps(500, N, 0), 0);
});

test('auto-converge: pages a round sent were watched for writes only from their read', () => {
  assert.equal(watchedMs(9100, 9060, 1), 9100 - 4530); // a first round: every page sent
  assert.equal(watchedMs(5400, 5300, 0.5), 5400 - 1325);
  assert.equal(watchedMs(1000, 0, 1), 1000); // nothing to send: watched throughout
  assert.equal(watchedMs(1000, 1000, 7), 500, 'a share above 1 (new memory) counts as 1');
  // Measured (1 GiB at 256 MiB/s): 152,928 pages written after a 9.06 s first round. Counted
  // against the whole round the first step took 43 %, and the next round at that throttle found
  // nearly as many pages written in 5.4 s; watched from each page's read, it takes ~70 %.
  const first = nextThrottle(0, writeRateMBps(152_928, 262_167, watchedMs(9100, 9061, 1)), 118.5);
  assert.ok(first > 0.65 && first < 0.8, `first step ${first}`);
});

function record(kind: number, vpid: number, vaddr: number, n: number, fillByte?: number): Buffer {
  const h = Buffer.alloc(REC_HEADER);
  h.writeUInt32LE(kind, 0);
  h.writeUInt32LE(vpid, 4);
  h.writeBigUInt64LE(BigInt(vaddr), 8);
  h.writeUInt32LE(n, 16);
  return kind === REC_DATA ? Buffer.concat([h, Buffer.alloc(n * PAGE, fillByte ?? 1)]) : h;
}

async function feed(store: PageStore, bytes: Buffer, chunk: number): Promise<void> {
  const w = store.writer();
  w.on('error', () => {});
  for (let i = 0; i < bytes.length; i += chunk) await new Promise<void>((r, j) => w.write(bytes.subarray(i, i + chunk), (e) => (e ? j(e) : r())));
  await new Promise<void>((r, j) => w.end((e?: Error | null) => (e ? j(e) : r())));
}

test('page store: removed twice, it leaves alone the file that took its descriptor number, and it no longer writes', () => {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-store-'));
  try {
    const store = new PageStore(join(dir, 'pages'));
    store.remove();
    // The lowest free number is the one the store just gave back.
    const other = openSync(join(dir, 'other'), 'w+');
    try {
      store.remove();
      assert.doesNotThrow(() => fstatSync(other), "the second remove must not close another file's descriptor");
      assert.throws(() => store.put(1, 0x1000, 1, Buffer.alloc(PAGE, 0xcc)));
      assert.equal(fstatSync(other).size, 0, "the store's pages must not land in another file");
    } finally {
      closeSync(other);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('page store: records split anywhere, later rounds overwrite, zero and dropped pages', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-store-'));
  try {
    const store = new PageStore(join(dir, 'pages'));
    const base = 0x7f0000000000;
    const stream = Buffer.concat([record(REC_DATA, 7, base, 4, 0xaa), record(REC_ZERO, 7, base + 4 * PAGE, 2), record(REC_DATA, 7, base + PAGE, 1, 0xbb), record(REC_DROP, 7, base + 3 * PAGE, 1)]);
    await feed(store, stream, 1000);
    const has = (vpid: number, vaddr: number, n: number) => Array.from({ length: n }, (_, i) => store.hasPage(vpid, vaddr / PAGE + i)).every(Boolean);
    assert.equal(has(7, base, 3), true);
    assert.equal(has(7, base, 4), false, 'a dropped page is not served');
    assert.equal(has(8, base, 1), false);
    const out = Buffer.alloc(6 * PAGE, 0xff);
    store.read(7, base, 3, out, 0);
    assert.equal(out[0], 0xaa);
    assert.equal(out[PAGE], 0xbb, 'the later round wins');
    assert.equal(out[2 * PAGE], 0xaa);
    store.read(7, base + 4 * PAGE, 2, out, 0);
    assert.equal(out.subarray(0, 2 * PAGE).every((b) => b === 0), true);
    await assert.rejects(feed(new PageStore(join(dir, 'bad')), record(9, 1, 0, 1), 64), /malformed page record/);
    await assert.rejects(feed(new PageStore(join(dir, 'bad2')), record(REC_DATA, 1, 0x1001, 1), 64), /malformed page record/);
    store.remove();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('page store: a dropped page that comes again takes its old slot: the file stays the size of the memory', () => {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-store-'));
  try {
    const store = new PageStore(join(dir, 'pages'));
    const base = 0x7f0000000;
    const n = 1024;
    const fill = (v: number) => Buffer.alloc(n * PAGE, v);
    store.put(1, base * PAGE, n, fill(1));
    // Auto's post-copy end: the last delta is dropped, then stored again as it arrives, in pieces.
    store.drop(1, (base + 100) * PAGE, 600);
    assert.equal(store.hasPage(1, base + 100), false);
    assert.equal(store.size, n - 600);
    for (let p = 100; p < 700; p += 7) store.put(1, (base + p) * PAGE, Math.min(7, 700 - p), fill(2).subarray(0, Math.min(7, 700 - p) * PAGE));
    // Dropped twice, then zero, then data again: still within the memory's pages.
    store.drop(1, base * PAGE, 50);
    store.drop(1, base * PAGE, 50);
    store.put(1, base * PAGE, 10);
    store.put(1, (base + 10) * PAGE, 40, fill(3).subarray(0, 40 * PAGE));
    assert.equal(store.size, n);
    assert.ok(statSync(join(dir, 'pages')).size <= n * PAGE, `the file holds ${statSync(join(dir, 'pages')).size / PAGE} pages for ${n}`);
    const out = Buffer.alloc(n * PAGE);
    store.read(1, base * PAGE, n, out, 0);
    const at = (p: number) => out[p * PAGE + 123];
    assert.deepEqual([at(5), at(10), at(49), at(50), at(99), at(100), at(699), at(700), at(1023)], [0, 3, 3, 1, 1, 2, 2, 1, 1]);
    store.remove();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('page store: presentRun counts the pages here one after another, whole chunks and single pages alike', () => {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-store-'));
  try {
    const store = new PageStore(join(dir, 'pages'));
    let seed = 777;
    const rand = (n: number) => ((seed = (seed * 1103515245 + 12345) % 2 ** 31), seed % n);
    const data = Buffer.alloc(600 * PAGE, 0x11);
    const base = 0x7f0000000;
    // Whole 512-page chunks filled by large records, then holes punched and some filled again.
    for (let p = 0; p < 4096; p += 512) store.put(1, (base + p) * PAGE, 512, data.subarray(0, 512 * PAGE));
    for (let r = 0; r < 400; r++) {
      const at = base + rand(4200);
      const n = 1 + rand(rand(10) ? 3 : 600);
      const kind = rand(4);
      if (kind === 0) store.drop(1, at * PAGE, n);
      else if (kind === 1) store.put(1, at * PAGE, n);
      else store.put(1, at * PAGE, n, data.subarray(0, n * PAGE));
      // After each change: from many starting points, against a page-by-page count.
      for (let q = 0; q < 20; q++) {
        const from = base + rand(4300) - 50;
        const max = 1 + rand(1500);
        let want = 0;
        while (want < max && store.hasPage(1, from + want)) want++;
        assert.equal(store.presentRun(1, from, max), want, `from page 0x${from.toString(16)}, at most ${max}, after change ${r}`);
      }
    }
    store.remove();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("page store: its index for CRIU's daemon names every stored page's slot, and nothing else", () => {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-store-'));
  try {
    const store = new PageStore(join(dir, 'pages'));
    // A seeded mix of data, zero and dropped ranges over three processes, across the index's 512-page chunks.
    let seed = 12345;
    const rand = (n: number) => ((seed = (seed * 1103515245 + 12345) % 2 ** 31), seed % n);
    const data = Buffer.alloc(64 * PAGE, 0x5a);
    for (let r = 0; r < 3000; r++) {
      const vpid = 1 + rand(3);
      const vaddr = (0x7f0000000 + rand(3000)) * PAGE;
      const n = 1 + rand(40);
      const kind = rand(20);
      if (kind < 12) store.put(vpid, vaddr, n, data.subarray(0, n * PAGE));
      else if (kind < 17) store.put(vpid, vaddr, n);
      else store.drop(vpid, vaddr, n);
    }
    const runs = store.writeIndex();
    const b = readFileSync(join(dir, 'pages' + STORE_INDEX_SUFFIX));
    assert.equal(b.subarray(0, 8).toString('latin1'), 'FERRYIX1');
    assert.equal((b.length - 8) / 24, runs);
    const slots = new Map<string, number>();
    let prev: [number, number] | undefined;
    for (let o = 8; o < b.length; o += 24) {
      const vaddr = Number(b.readBigUInt64LE(o));
      const vpid = b.readUInt32LE(o + 8);
      const n = b.readUInt32LE(o + 12);
      const slot = Number(b.readBigInt64LE(o + 16));
      assert.ok(n > 0);
      assert.ok(!prev || prev[0] < vpid || (prev[0] === vpid && prev[1] <= vaddr), 'runs sorted by process and address, apart');
      prev = [vpid, vaddr + n * PAGE];
      for (let i = 0; i < n; i++) slots.set(`${vpid}:${vaddr / PAGE + i}`, slot < 0 ? -1 : slot + i);
    }
    let stored = 0;
    for (let vpid = 1; vpid <= 3; vpid++) {
      for (let page = 0x7f0000000; page < 0x7f0000000 + 3100; page++) {
        const got = slots.get(`${vpid}:${page}`);
        assert.equal(got !== undefined, store.hasPage(vpid, page), `page ${page} of ${vpid}: in the index iff stored`);
        if (got === undefined) continue;
        stored++;
        assert.equal(got, store.storedRun(vpid, page, 1)?.slot ?? -1, `page ${page} of ${vpid}: the slot the agent would answer with`);
      }
    }
    assert.equal(stored, store.size);
    assert.ok(runs < stored / 4, 'consecutive slots make one run');
    store.remove();
    assert.equal(existsSync(join(dir, 'pages' + STORE_INDEX_SUFFIX)), false, 'the index goes with the store');
    assert.equal(store.writeIndex(), 0);
    assert.equal(existsSync(join(dir, 'pages' + STORE_INDEX_SUFFIX)), false, 'a removed store writes no index');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});


test('page server: answers from the store, forwards what it lacks, keeps the order', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-store-'));
  const store = new PageStore(join(dir, 'pages'));
  // Also when an assertion fails: an open socket would keep this file's test process alive.
  const sockets: Socket[] = [];
  const servers: Server[] = [];
  t.after(() => {
    for (const s of sockets) s.destroy();
    for (const s of servers) s.close();
    store.remove();
    rmSync(dir, { recursive: true, force: true });
  });
  await feed(store, record(REC_DATA, 3, 0x10000, 2, 0x11), 4096);
  // A fake upstream: the source's CRIU answering one GET, then CLOSE.
  const up = createServer((s) => {
    sockets.push(s);
    let buf = Buffer.alloc(0);
    s.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      for (; buf.length >= 32; buf = buf.subarray(32)) {
        const req = buf.subarray(0, 32);
        if ((req.readUInt32LE(0) & 0xffff) !== 7) {
          s.write(Buffer.alloc(4));
          continue;
        }
        const ans = Buffer.from(req);
        ans.writeUInt32LE((4 << 16) | 6, 0);
        s.write(Buffer.concat([ans, Buffer.alloc(Number(req.readBigUInt64LE(8)) * PAGE, 0x22)]));
      }
    });
  });
  servers.push(up);
  await new Promise<void>((r) => up.listen(0, '127.0.0.1', r));
  const front = createServer((daemon) => {
    const upstream = connect((up.address() as { port: number }).port, '127.0.0.1');
    sockets.push(daemon, upstream);
    serveLazy(daemon, store, upstream, [], stats);
  });
  const stats = { localPages: 0, forwardedPages: 0, prefetchedPages: 0, faultsForwarded: 0, faultWaitMs: 0, faultWaitMaxMs: 0, faultsWaited: 0 };
  servers.push(front);
  await new Promise<void>((r) => front.listen(0, '127.0.0.1', r));
  const c: Socket = connect((front.address() as { port: number }).port, '127.0.0.1');
  sockets.push(c);
  const got: Buffer[] = [];
  c.on('data', (d: Buffer) => got.push(d));
  // Missing first (forwarded), then local: the local answer must wait for the forwarded one.
  c.write(Buffer.concat([psRequest(7, 1, 0x20000, 3), psRequest(7, 2, 0x10000, 3), psRequest(0x1023, 0, 0, 0)]));
  const want = 32 + PAGE + 32 + 2 * PAGE + 4;
  await new Promise<void>((r) => {
    const check = () => (Buffer.concat(got).length >= want ? r() : setTimeout(check, 10));
    check();
  });
  const all = Buffer.concat(got);
  assert.equal(all.readBigUInt64LE(16), 0x20000n);
  assert.equal(all[32], 0x22);
  assert.equal(all.readBigUInt64LE(32 + PAGE + 16), 0x10000n);
  assert.equal(all[32 + PAGE + 32], 0x11);
  const { localPages, forwardedPages, prefetchedPages, faultsForwarded, faultsWaited } = stats;
  assert.deepEqual({ localPages, forwardedPages, prefetchedPages, faultsForwarded, faultsWaited }, { localPages: 2, forwardedPages: 1, prefetchedPages: 0, faultsForwarded: 1, faultsWaited: 0 });
  assert.ok(stats.faultWaitMs > 0 && stats.faultWaitMaxMs === stats.faultWaitMs, 'the wait of the one forwarded fault is counted');
});
