// Post-copy's pages served from the frozen task's memory (TaskPages): answers in CRIU's
// page-server format, cut at the end of a lazy run, and everything it cannot answer (the end of
// the transfer, a page outside the runs) relayed to CRIU's own connection in order.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createServer, connect, type Socket } from 'node:net';
import { test } from 'node:test';
import { TaskMemory, TaskPages, pidsByVpid } from '../../src/migrate/task-pages.js';
import { PS_IOV_CLOSE, PS_IOV_GET, psRequest } from '../support/page-server.js';

const PAGE = 4096;
const req = psRequest;

/** Reads exactly n bytes from a readable. */
async function take(r: TaskPages, n: number): Promise<Buffer> {
  for (;;) {
    const b = r.read(n) as Buffer | null;
    if (b) return b;
    await once(r, 'readable');
  }
}

test('pages are read from the task, cut at the end of a lazy run; the rest goes to CRIU in order', async (t) => {
  // A process holding three private pages of known content: 'A', 'B', 'C'.
  const py = spawn('python3', ['-c', "import mmap,ctypes,sys\nm=mmap.mmap(-1,3*4096,flags=mmap.MAP_PRIVATE|mmap.MAP_ANONYMOUS)\nfor i in range(3): m[i*4096:(i+1)*4096]=bytes([65+i])*4096\nprint(ctypes.addressof(ctypes.c_char.from_buffer(m)),flush=True)\nsys.stdin.read()"], { stdio: ['pipe', 'pipe', 'inherit'] });
  t.after(() => py.kill('SIGKILL'));
  const [line] = (await once(py.stdout, 'data')) as [Buffer];
  const addr = Number(line.toString().trim());
  assert.ok(addr > 0 && addr % PAGE === 0, `page-aligned address: ${line}`);

  // CRIU's page server, as far as the end of a transfer goes: it records what it gets and
  // answers a close with a 4-byte status.
  const toCriu: Buffer[] = [];
  const server = createServer((s) => {
    s.on('data', (c: Buffer) => {
      toCriu.push(c);
      const all = Buffer.concat(toCriu);
      if (all.length >= 64 && all.readUInt32LE(32) === PS_IOV_CLOSE) s.end(Buffer.alloc(4));
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.after(() => server.close());
  const criu: Socket = connect((server.address() as { port: number }).port, '127.0.0.1');
  await once(criu, 'connect');

  const pids = pidsByVpid(py.pid!);
  const vpid = [...pids.entries()].find(([, pid]) => pid === py.pid)![0];
  // Only the first two pages are lazy: CRIU would cut an answer at the run's end.
  const mem = new TaskMemory([{ vpid, first: addr / PAGE, n: 2 }], pids);
  const pages = new TaskPages(criu, mem);

  // Three asked from the first: two come, with CRIU's header.
  pages.write(req(PS_IOV_GET, 3, addr, vpid));
  const h = await take(pages, 32);
  assert.equal(h.readUInt32LE(0), 6 | (4 << 16), 'PS_IOV_ADD_F with PE_PRESENT');
  assert.equal(Number(h.readBigUInt64LE(8)), 2);
  assert.equal(Number(h.readBigUInt64LE(16)), addr);
  assert.equal(Number(h.readBigUInt64LE(24)), vpid);
  const d = await take(pages, 2 * PAGE);
  assert.ok(d.subarray(0, PAGE).every((b) => b === 65) && d.subarray(PAGE).every((b) => b === 66), 'the task\'s pages');

  // A request that arrives in pieces.
  const r2 = req(PS_IOV_GET, 1, addr + PAGE, vpid);
  pages.write(r2.subarray(0, 5));
  pages.write(r2.subarray(5));
  const h2 = await take(pages, 32 + PAGE);
  assert.equal(Number(h2.readBigUInt64LE(8)), 1);
  assert.ok(h2.subarray(32).every((b) => b === 66));

  // A page outside the runs is not answered here: it and all after it go to CRIU, which
  // answers the close; its end ends the stream.
  const outside = req(PS_IOV_GET, 1, addr + 2 * PAGE, vpid);
  pages.write(Buffer.concat([outside, req(PS_IOV_CLOSE, 0, 0, 0)]));
  assert.deepEqual(await take(pages, 4), Buffer.alloc(4));
  const ended = once(pages, 'end');
  pages.resume();
  await ended;
  assert.deepEqual(Buffer.concat(toCriu).subarray(0, 32), outside, 'CRIU got the request it must answer');
  assert.equal(pages.answered, 2);
  assert.equal(pages.pagesSent, 3);
  pages.destroy();
});

test('a process of the dump that is not in the task cannot be served: said at once', () => {
  assert.throws(() => new TaskMemory([{ vpid: 999_999, first: 1, n: 1 }], new Map()), /process 999999 of the dump is not in the task's tree/);
});
