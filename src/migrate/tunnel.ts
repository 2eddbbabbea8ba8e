// Bridges between local TCP sockets (CRIU's page server, lazy pages) and the multiplexed streams of the
// one agent-to-agent session, counting the bytes that cross.
import { spawn } from 'node:child_process';
import { randomInt } from 'node:crypto';
import { join } from 'node:path';
import { createServer, connect as tcpConnect, type Server, type Socket } from 'node:net';
import { Duplex, type Readable, type Transform, type Writable } from 'node:stream';
import { finished } from 'node:stream/promises';

/** Bytes through a stream, and when the first and the last of them passed. */
export class ByteCounter {
  bytes = 0;
  firstAt?: number;
  lastAt?: number;

  add(n: number): void {
    const now = performance.now();
    this.firstAt ??= now;
    this.lastAt = now;
    this.bytes += n;
  }

  /** MB/s from first to last byte; undefined for too little data to say. */
  rateMBps(): number | undefined {
    if (this.firstAt === undefined || this.lastAt === undefined || this.lastAt - this.firstAt < 10) return undefined;
    return Math.round((this.bytes / 1e6 / ((this.lastAt - this.firstAt) / 1000)) * 10) / 10;
  }
}

/**
 * Joins two streams both ways until both ends finish; a→b may pass through a transform (a
 * compressor or decompressor), and counter counts what b is given.
 */
export function splice(a: Duplex, b: Duplex, counter?: ByteCounter, counterBack?: ByteCounter, through?: Transform): Promise<void> {
  return new Promise((resolve) => {
    let open = 2;
    const done = () => {
      if (--open === 0) resolve();
    };
    const fail = () => {
      a.destroy();
      b.destroy();
      through?.destroy();
      resolve();
    };
    const ab: Readable = through ? a.pipe(through) : a;
    if (counter) ab.on('data', (c: Buffer) => counter.add(c.length));
    if (counterBack) b.on('data', (c: Buffer) => counterBack.add(c.length));
    if (through) through.once('error', fail);
    ab.pipe(b).on('finish', done);
    b.pipe(a).on('finish', done);
    a.once('error', fail);
    b.once('error', fail);
    a.once('close', () => setImmediate(() => (open > 0 ? fail() : undefined)));
    b.once('close', () => setImmediate(() => (open > 0 ? fail() : undefined)));
  });
}

/**
 * Joins a stream to a program's stdin and stdout (rsync's receiving server). The program may exit
 * before its peer ends its side (rsync does, once it has said its last): what it wrote still goes
 * out whole and the stream then ends cleanly; what the peer sends after that is read and dropped.
 * (Its exit closes its stdin, and a stream reset then lost the tail of its answer.) Resolves when
 * its output has all been handed to the stream, or the stream is gone.
 */
export async function bridgeProgram(stream: Duplex, stdin: Writable, stdout: Readable): Promise<void> {
  stdin.on('error', () => {});
  stream.pipe(stdin);
  stdin.once('close', () => {
    stream.unpipe(stdin);
    stream.resume();
  });
  stdout.pipe(stream);
  // A stream cut off (the peer or the session gone) ends the program's pipes too: it sees the
  // end of its input or a broken pipe and exits, instead of waiting for a peer that is gone.
  stream.once('close', () => {
    if (stream.readableEnded && stream.writableFinished) return;
    stdin.destroy();
    stdout.destroy();
  });
  await finished(stream, { readable: false }).catch(() => {});
}

/**
 * Two connected in-process streams (what one writes the other reads), for two parts of one agent
 * that would otherwise talk through a loopback socket: every byte would cross the kernel twice
 * more. A write completes when the other side reads it, so backpressure works as on a socket;
 * ending one side ends the other's reading, and destroying one destroys both (an 'error' on
 * neither: nobody may be left without a listener for it).
 * (Node 22 has stream.duplexPair; Node 20 does not.)
 */
export function localPair(): [Duplex, Duplex] {
  const a = new PairSide();
  const b = new PairSide();
  a.other = b;
  b.other = a;
  return [a, b];
}

class PairSide extends Duplex {
  other!: PairSide;
  /** The write waiting for this side's reader. */
  pendingWrite?: (e?: Error | null) => void;

  override _read(): void {
    const cb = this.pendingWrite;
    this.pendingWrite = undefined;
    cb?.();
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (e?: Error | null) => void): void {
    // The pair goes down together: a write caught in between is dropped, as by a closed socket.
    if (this.other.destroyed) return cb();
    if (chunk.length === 0) return process.nextTick(cb);
    this.other.pendingWrite = cb;
    this.other.push(chunk);
  }

  override _final(cb: (e?: Error | null) => void): void {
    if (!this.other.destroyed) this.other.push(null);
    cb();
  }

  override _destroy(err: Error | null, cb: (e?: Error | null) => void): void {
    const w = this.pendingWrite;
    this.pendingWrite = undefined;
    w?.();
    // Closed after both ways ended (autoDestroy), the other side still reads what it was sent.
    const clean = !err && this.readableEnded && this.writableFinished;
    if (!this.other.destroyed && !clean) this.other.destroy();
    cb(err);
  }
}

/** A loopback listener whose every connection is handed to onConnection. */
export async function listenLocal(onConnection: (s: Socket) => void, host = '127.0.0.1'): Promise<{ server: Server; port: number }> {
  const server = createServer((s) => {
    s.setNoDelay(true);
    onConnection(s);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, host, () => resolve());
  });
  return { server, port: (server.address() as { port: number }).port };
}

export function connectLocal(port: number, timeoutMs = 5000, host = '127.0.0.1'): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = tcpConnect({ host, port });
    const t = setTimeout(() => s.destroy(new Error(`connect to ${host}:${port} timed out`)), timeoutMs);
    s.once('connect', () => {
      clearTimeout(t);
      s.setNoDelay(true);
      resolve(s);
    });
    s.once('error', (e) => {
      clearTimeout(t);
      reject(e);
    });
  });
}

/** Where a program on this host listens: its own loopback address (see ownLoopbackEndpoint) and port. */
export interface LoopbackEndpoint {
  address: string;
  port: number;
}

/** CRIU's page-server command that ends a lazy dump (criu/page-xfer.c): its 4-byte answer says it is done. */
const PS_IOV_CLOSE = 0x1023;

/**
 * Tells CRIU's lazy dump at `at` what the destination's lazy-pages daemon would say once every
 * page is in: CRIU then ends the frozen copy here and exits 0. Resolves once CRIU answered.
 */
export async function closeLazyDump(at: LoopbackEndpoint, deadlineMs: number, isAlive: () => boolean): Promise<void> {
  const sock = await connectWhenListening(at, deadlineMs, isAlive);
  sock.setNoDelay(true);
  try {
    const close = Buffer.alloc(32);
    close.writeUInt32LE(PS_IOV_CLOSE, 0);
    sock.write(close);
    await new Promise<void>((res, rej) => {
      let got = 0;
      sock.on('data', (c: Buffer) => {
        got += c.length;
        if (got >= 4) res();
      });
      sock.once('error', rej);
      sock.once('close', () => rej(new Error('CRIU closed its page connection without an answer')));
    });
  } finally {
    sock.destroy();
  }
}

/** Connects once the endpoint listens, retrying while the program behind it starts. */
export async function connectWhenListening(at: LoopbackEndpoint, deadlineMs: number, isAlive: () => boolean): Promise<Socket> {
  const end = Date.now() + deadlineMs;
  for (;;) {
    try {
      return await connectLocal(at.port, 1000, at.address);
    } catch (e) {
      if (Date.now() > end || !isAlive()) throw e;
      // Inside the task's pause (CRIU starts listening once told to go on): a refused try costs little.
      await new Promise((r) => setTimeout(r, 2));
    }
  }
}

let nextLoopback = randomInt(0, 250 * 250);

/**
 * An address and port for a program that must be told where to listen before it binds: a
 * loopback address (127.77.x.y) no other such program of this agent has now, and a port that
 * was free on it a moment ago. A port picked on 127.0.0.1 was taken in between by another
 * migration's CRIU, and one migration's pages were asked of the other's. On an address of its
 * own the port can only be taken by a listener on every address, and then CRIU fails to bind
 * instead of another program answering.
 */
export async function ownLoopbackEndpoint(): Promise<LoopbackEndpoint> {
  const n = nextLoopback++ % (250 * 250);
  const address = `127.77.${1 + Math.floor(n / 250)}.${1 + (n % 250)}`;
  const l = await listenLocal(() => {}, address);
  await new Promise((r) => l.server.close(r));
  return { address, port: l.port };
}

/**
 * Makes the socket's last close reset the connection (on) or end it cleanly again (off), through
 * native/ferry-linger: Node cannot set SO_LINGER itself. Resolves with why it could not, if so.
 */
export function resetOnClose(nativeDir: string, sock: Socket, on: boolean): Promise<string | undefined> {
  return new Promise((resolve) => {
    let err = '';
    let child;
    try {
      // Throws at once for a socket already closed (no descriptor to hand over).
      child = spawn(join(nativeDir, 'ferry-linger'), [on ? 'on' : 'off'], { stdio: ['ignore', 'ignore', 'pipe', sock] });
    } catch (e) {
      resolve((e as Error).message.split('\n')[0]);
      return;
    }
    child.stderr!.on('data', (c: Buffer) => (err += c.toString()));
    child.on('error', (e) => resolve(e.message));
    child.on('close', (code, sig) => resolve(code === 0 ? undefined : err.trim() || `ferry-linger ended (${sig ?? `code ${code}`})`));
  });
}
