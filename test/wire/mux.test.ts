// The multiplexer on real loopback sockets, and its frame decoder under generated input.
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { Duplex } from 'node:stream';
import { after, test } from 'node:test';
import fc from 'fast-check';
import { FrameDecoder, FrameType, HEADER, LIMITS, MuxSession, ProtocolError, encodeFrame, type Frame, type Headers, type MuxStream } from '../../src/wire/mux.js';

const servers: Server[] = [];
after(() => {
  for (const s of servers) s.close();
});

/** Both ends of a real TCP connection on loopback. */
async function tcpPair(): Promise<{ raw: Socket; sock: Socket }> {
  const server = createServer();
  servers.push(server);
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const accepted = once(server, 'connection') as Promise<[Socket]>;
  const raw = connect((server.address() as { port: number }).port, '127.0.0.1');
  await once(raw, 'connect');
  const [sock] = await accepted;
  return { raw, sock };
}

/** Two sessions joined by a real TCP connection. */
async function pair(): Promise<{ client: MuxSession; server: MuxSession; raw: Socket }> {
  const { raw, sock } = await tcpPair();
  return { client: new MuxSession(raw, true), server: new MuxSession(sock, false), raw };
}

/** A raw socket to a server session, to send it frames by hand. */
async function rawPeer(): Promise<{ server: MuxSession; raw: Socket; closed: Promise<Error | undefined> }> {
  const { raw, sock } = await tcpPair();
  raw.on('error', () => {});
  raw.resume();
  const s = new MuxSession(sock, false);
  const closed = new Promise<Error | undefined>((r) => s.once('close', r));
  return { server: s, raw, closed };
}

function send(raw: Socket, type: number, id: number, payload: Buffer | string = Buffer.alloc(0)): void {
  for (const b of encodeFrame(type as FrameType, id, Buffer.from(payload))) raw.write(b);
}

const json = (v: unknown) => Buffer.from(JSON.stringify(v));

test('a stream carries 64 MiB each way intact, with flow control', async () => {
  const { client, server } = await pair();
  const size = 64 * 1024 * 1024;
  const data = randomBytes(size);
  const want = createHash('sha256').update(data).digest('hex');
  server.on('stream', (s: MuxStream, h: Headers) => {
    assert.equal(h[':path'], '/echo');
    s.respond({ ':status': 200 });
    s.pipe(s); // echo
  });
  const st = client.request({ ':path': '/echo' });
  const got = createHash('sha256');
  let n = 0;
  st.on('data', (c: Buffer) => {
    got.update(c);
    n += c.length;
  });
  st.end(data);
  await once(st, 'end');
  assert.equal(n, size);
  assert.equal(got.digest('hex'), want);
  client.destroy();
  server.destroy();
});

test('a reader that does not read stops the sender: what is buffered stays within the window', async () => {
  const { client, server } = await pair();
  let remote: MuxStream | undefined;
  server.on('stream', (s: MuxStream) => {
    remote = s;
    s.pause();
  });
  const st = client.request({ ':path': '/slow' });
  const chunk = Buffer.alloc(1024 * 1024);
  let written = 0;
  for (let i = 0; i < 64; i++) {
    written += chunk.length;
    if (!st.write(chunk)) break;
  }
  await new Promise((r) => setTimeout(r, 300));
  assert.ok(remote);
  // Unread: the window never grew past its first size, so at most that (plus one frame) is held.
  assert.ok(remote.readableLength <= LIMITS.initialWindow + LIMITS.maxData, `held ${remote.readableLength}`);
  assert.ok(written < 64 * 1024 * 1024, 'the writer was told to wait');
  client.destroy();
  server.destroy();
});

test('frames split at every byte decode to the same frames', () => {
  const frames: Frame[] = [
    { type: FrameType.Open, id: 1, payload: json({ ':path': '/a' }) },
    { type: FrameType.Data, id: 1, payload: randomBytes(1000) },
    { type: FrameType.End, id: 1, payload: Buffer.alloc(0) },
    { type: FrameType.Ping, id: 0, payload: Buffer.from('k') },
  ];
  const bytes = Buffer.concat(frames.flatMap((f) => encodeFrame(f.type, f.id, f.payload)));
  const out: Frame[] = [];
  const d = new FrameDecoder();
  for (let i = 0; i < bytes.length; i++) d.push(bytes.subarray(i, i + 1), (f) => (out.push(f), true));
  assert.deepEqual(
    out.map((f) => [f.type, f.id, f.payload.toString('hex')]),
    frames.map((f) => [f.type, f.id, f.payload.toString('hex')]),
  );
  assert.equal(d.pending, 0);
});

test('a reset reaches the other side as an error; the session lives on', async () => {
  const { client, server } = await pair();
  server.on('stream', (s: MuxStream) => s.destroy(new Error('no thanks')));
  const st = client.request({ ':path': '/x' });
  const [err] = (await once(st, 'error')) as [Error];
  assert.match(err.message, /stream reset by peer: no thanks/);
  // Another stream on the same session still works.
  server.removeAllListeners('stream');
  server.on('stream', (s: MuxStream) => {
    s.respond({ ':status': 200 });
    s.end('ok');
  });
  const st2 = client.request({ ':path': '/y' });
  st2.end();
  let text = '';
  st2.on('data', (c: Buffer) => (text += c));
  await once(st2, 'end');
  assert.equal(text, 'ok');
  client.destroy();
  server.destroy();
});

test('what arrived for a stream before its connection closed is read before the error', async () => {
  const { client, server } = await pair();
  server.on('stream', (s: MuxStream) => {
    s.respond({ ':status': 200 });
    s.write('{"progress":{"type":"start","id":"m1"}}\n');
  });
  const st = client.request({ ':path': '/x' });
  st.end();
  st.pause();
  for (let i = 0; i < 200 && st.readableLength === 0; i++) await new Promise((r) => setTimeout(r, 5));
  assert.ok(st.readableLength > 0, 'the line arrived');
  const closed = once(client, 'close');
  server.destroy();
  await closed;
  let text = '';
  let err: Error | undefined;
  try {
    for await (const c of st) text += String(c);
  } catch (e) {
    err = e as Error;
  }
  assert.equal(text, '{"progress":{"type":"start","id":"m1"}}\n', 'the line the peer sent is read');
  assert.match(String(err?.message), /session closed|reset|closed/, 'then the error');
});

test('close() ends the connection once the open streams are done', async () => {
  const { client, server } = await pair();
  server.on('stream', (s: MuxStream) => {
    s.respond({ ':status': 200 });
    setTimeout(() => s.end('late'), 100);
    s.resume();
  });
  const st = client.request({ ':path': '/z' });
  st.end();
  client.close();
  let text = '';
  st.on('data', (c: Buffer) => (text += c));
  await once(st, 'end');
  assert.equal(text, 'late');
  const [err] = (await once(server, 'close')) as [Error | undefined];
  assert.equal(err, undefined);
});

// Each of these is one hostile frame (or a few); every one must end that session with a
// protocol error and nothing else.
const hostile: Array<[string, (raw: Socket) => void]> = [
  ['headers that are not JSON', (r) => send(r, FrameType.Open, 1, '{not json')],
  ['headers that are an array', (r) => send(r, FrameType.Open, 1, '[1,2]')],
  ['a header value that is an object', (r) => send(r, FrameType.Open, 1, '{"a":{"b":1}}')],
  ['an oversized length', (r) => r.write(Buffer.from([FrameType.Data, 0, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]))],
  ['an unknown frame type', (r) => send(r, 42, 1)],
  ['reserved bits set', (r) => r.write(Buffer.from([FrameType.Ping, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]))],
  ['a stream opened twice', (r) => (send(r, FrameType.Open, 1, '{}'), send(r, FrameType.Open, 1, '{}'))],
  ['a stream opened with the wrong parity', (r) => send(r, FrameType.Open, 2, '{}')],
  ['data for a stream never opened', (r) => send(r, FrameType.Data, 7, 'x')],
  ['a response to a stream it opened itself', (r) => (send(r, FrameType.Open, 1, '{}'), send(r, FrameType.Response, 1, '{}'))],
  ['data past the credit', (r) => (send(r, FrameType.Open, 1, '{}'), Array.from({ length: 2 }, () => send(r, FrameType.Data, 1, Buffer.alloc(LIMITS.maxData))))],
  ['zero credit', (r) => (send(r, FrameType.Open, 1, '{}'), send(r, FrameType.Credit, 1, Buffer.alloc(4)))],
  ['a ping on a stream', (r) => send(r, FrameType.Ping, 3, 'x')],
  ['data on stream 0', (r) => send(r, FrameType.Data, 0, 'x')],
  ['data after the end', (r) => (send(r, FrameType.Open, 1, '{}'), send(r, FrameType.End, 1), send(r, FrameType.Data, 1, 'x'))],
];

for (const [what, attack] of hostile) {
  test(`protocol error closes only that session: ${what}`, async () => {
    const { raw, closed } = await rawPeer();
    // Streams are left unread: no credit goes back, so a sender past its window is caught.
    attack(raw);
    const err = await closed;
    assert.ok(err instanceof ProtocolError, `expected a protocol error, got ${err?.message}`);
    assert.match(err.message, /^protocol error: /);
    raw.destroy();
  });
}

test('a peer may not keep more than the stream limit open: the rest are refused, the session lives', async () => {
  const { server, raw } = await rawPeer();
  const opened: MuxStream[] = [];
  server.on('stream', (s: MuxStream) => opened.push(s));
  let resets = 0;
  const dec = new FrameDecoder();
  raw.on('data', (c: Buffer) => dec.push(c, (f) => (f.type === FrameType.Reset && resets++, true)));
  for (let i = 0; i < LIMITS.maxPeerStreams + 10; i++) send(raw, FrameType.Open, 1 + 2 * i, '{}');
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(opened.length, LIMITS.maxPeerStreams);
  assert.equal(resets, 10);
  assert.equal(server.destroyed, false);
  raw.destroy();
});

const frameArb = fc.oneof(
  fc.record({ type: fc.constant(FrameType.Open), id: fc.integer({ min: 1, max: 2 ** 32 - 1 }), payload: fc.dictionary(fc.string({ maxLength: 8 }), fc.string({ maxLength: 32 }), { maxKeys: 8 }).map(json) }),
  fc.record({ type: fc.constant(FrameType.Data), id: fc.integer({ min: 1, max: 2 ** 32 - 1 }), payload: fc.uint8Array({ maxLength: 4096 }).map((a) => Buffer.from(a)) }),
  fc.record({ type: fc.constantFrom(FrameType.End), id: fc.integer({ min: 1, max: 100 }), payload: fc.constant(Buffer.alloc(0)) }),
  fc.record({ type: fc.constantFrom(FrameType.Ping, FrameType.Pong), id: fc.constant(0), payload: fc.uint8Array({ maxLength: 64 }).map((a) => Buffer.from(a)) }),
  fc.record({ type: fc.constant(FrameType.Credit), id: fc.integer({ min: 1, max: 100 }), payload: fc.integer({ min: 1, max: 2 ** 31 }).map((n) => Buffer.from([n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255])) }),
) as fc.Arbitrary<Frame>;

test('property: any valid frames, split anywhere, decode to themselves', () => {
  fc.assert(
    fc.property(fc.array(frameArb, { maxLength: 20 }), fc.array(fc.integer({ min: 1, max: 64 }), { minLength: 1, maxLength: 20 }), (frames, cuts) => {
      const bytes = Buffer.concat(frames.flatMap((f) => encodeFrame(f.type, f.id, f.payload)));
      const d = new FrameDecoder();
      const out: Frame[] = [];
      let off = 0;
      for (let i = 0; off < bytes.length; i++) {
        const n = cuts[i % cuts.length]!;
        d.push(bytes.subarray(off, off + n), (f) => (out.push(f), true));
        off += n;
      }
      assert.equal(out.length, frames.length);
      out.forEach((f, i) => {
        assert.equal(f.type, frames[i]!.type);
        assert.equal(f.id, frames[i]!.id);
        assert.ok(f.payload.equals(frames[i]!.payload));
      });
    }),
    { numRuns: 300 },
  );
});

test('property: arbitrary bytes give frames or a protocol error, and never hold more than one frame', () => {
  fc.assert(
    fc.property(fc.array(fc.uint8Array({ minLength: 1, maxLength: 512 }), { maxLength: 30 }), (chunks) => {
      const d = new FrameDecoder();
      try {
        for (const c of chunks) {
          d.push(Buffer.from(c), () => true);
          assert.ok(d.pending <= HEADER + LIMITS.maxHeaders + 512 || d.pending <= HEADER + LIMITS.maxData + 512);
        }
      } catch (e) {
        assert.ok(e instanceof ProtocolError, `unexpected ${(e as Error).name}: ${(e as Error).message}`);
      }
    }),
    { numRuns: 2000 },
  );
});

test('property: a session fed arbitrary frames never throws out of its data handler', () => {
  const garbageFrame = fc.record({ type: fc.integer({ min: 0, max: 12 }), id: fc.integer({ min: 0, max: 9 }), payload: fc.oneof(fc.uint8Array({ maxLength: 300 }).map((a) => Buffer.from(a)), fc.json().map((j) => Buffer.from(j))) });
  fc.assert(
    fc.property(fc.array(garbageFrame, { maxLength: 40 }), fc.boolean(), (frames, initiator) => {
      const sock = new Duplex({ read() {}, write(_c, _e, cb) {
        cb();
      } });
      const s = new MuxSession(sock, initiator);
      s.on('stream', (st: MuxStream) => st.resume());
      for (const f of frames) {
        sock.push(Buffer.concat(encodeFrame(f.type as FrameType, f.id, f.payload.subarray(0, 300))));
        if (s.destroyed) break;
      }
      s.destroy();
    }),
    { numRuns: 1000 },
  );
});
