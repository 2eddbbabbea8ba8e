// Ferry's multiplexer: many streams over one TLS connection, with per-stream credit-based flow
// control. Node's HTTP/2 moved at most ~250 MB/s between two lab hosts where the same TLS socket
// carried ~700 MB/s, so a migration's pages would have been bound by the framing, not the link.
//
// Frame: type u8 | flags u8 | reserved u16 | stream id u32 | length u32 | payload.
// Either side may open streams: the connecting side uses odd ids, the accepting side even ones.
import { EventEmitter } from 'node:events';
import { Duplex } from 'node:stream';
import type { TLSSocket } from 'node:tls';

const enum T {
  Open = 1,
  Response = 2,
  Data = 3,
  End = 4,
  Reset = 5,
  Credit = 6,
  Ping = 7,
  Pong = 8,
}

const HEADER = 12;
const MAX_FRAME = 256 * 1024;
/** Bytes a receiver lets a stream send before the sender must wait for credit. */
const WINDOW = 16 * 1024 * 1024;

export type Headers = Record<string, string | number | undefined>;

export class MuxStream extends Duplex {
  headersSent = false;
  private credit = WINDOW;
  private owed = 0;
  private pending?: { chunk: Buffer; cb: (e?: Error | null) => void };
  private localEnded = false;
  private remoteEnded = false;

  constructor(
    readonly session: MuxSession,
    readonly id: number,
  ) {
    super({ highWaterMark: WINDOW, allowHalfOpen: true });
    // A broken connection errors every stream at once; whoever uses a stream learns of it through
    // its own listeners or its close. One unlistened stream must not take the agent down.
    this.on('error', () => {});
  }

  /** Answers a stream the peer opened (the counterpart of HTTP/2's respond). */
  respond(headers: Headers): void {
    if (this.headersSent) return;
    this.headersSent = true;
    this.session.send(T.Response, this.id, Buffer.from(JSON.stringify(headers)));
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (e?: Error | null) => void): void {
    this.sendData(chunk, cb);
  }

  private sendData(chunk: Buffer, cb: (e?: Error | null) => void): void {
    if (this.destroyed) return cb(new Error('stream closed'));
    while (chunk.length > 0 && this.credit > 0) {
      const n = Math.min(chunk.length, this.credit, MAX_FRAME);
      this.session.send(T.Data, this.id, chunk.subarray(0, n));
      this.credit -= n;
      chunk = chunk.subarray(n);
    }
    if (chunk.length > 0) {
      this.pending = { chunk, cb };
      return;
    }
    this.session.whenWritable(cb);
  }

  override _final(cb: (e?: Error | null) => void): void {
    this.localEnded = true;
    this.session.send(T.End, this.id, Buffer.alloc(0));
    this.maybeDone();
    cb();
  }

  override _read(): void {
    this.flushCredit();
  }

  override _destroy(err: Error | null, cb: (e?: Error | null) => void): void {
    if (!(this.localEnded && this.remoteEnded)) this.session.send(T.Reset, this.id, Buffer.from(err?.message ?? 'cancelled'));
    this.session.forget(this.id);
    const p = this.pending;
    this.pending = undefined;
    p?.cb(err ?? new Error('stream closed'));
    cb(err);
  }

  /** @internal frames from the session */
  onFrame(type: T, payload: Buffer): void {
    switch (type) {
      case T.Response:
        this.emit('response', JSON.parse(payload.toString()) as Headers);
        break;
      case T.Data:
        this.owed += payload.length;
        if (this.push(payload)) this.flushCredit(false);
        break;
      case T.End:
        this.remoteEnded = true;
        this.push(null);
        this.maybeDone();
        break;
      case T.Reset:
        this.remoteEnded = true;
        this.localEnded = true;
        this.destroy(new Error(`stream reset by peer: ${payload.toString()}`));
        break;
      case T.Credit: {
        this.credit += payload.readUInt32BE(0);
        const p = this.pending;
        if (p) {
          this.pending = undefined;
          this.sendData(p.chunk, p.cb);
        }
        break;
      }
      default:
        break;
    }
  }

  private flushCredit(force = true): void {
    if (this.owed === 0 || this.remoteEnded) return;
    if (!force && this.owed < WINDOW / 4) return;
    const b = Buffer.alloc(4);
    b.writeUInt32BE(this.owed, 0);
    this.owed = 0;
    this.session.send(T.Credit, this.id, b);
  }

  private maybeDone(): void {
    if (this.localEnded && this.remoteEnded) {
      this.session.forget(this.id);
      setImmediate(() => this.destroy());
    }
  }
}

export class MuxSession extends EventEmitter {
  private readonly streams = new Map<number, MuxStream>();
  private nextId: number;
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiters: Array<(e?: Error | null) => void> = [];
  private pings = new Map<string, (err: Error | null) => void>();
  destroyed = false;
  closed = false;

  constructor(
    readonly socket: TLSSocket,
    initiator: boolean,
  ) {
    super();
    this.nextId = initiator ? 1 : 2;
    socket.setNoDelay(true);
    socket.on('data', (c: Buffer) => this.onData(c));
    socket.on('drain', () => {
      const w = this.waiters;
      this.waiters = [];
      for (const cb of w) cb();
    });
    socket.on('error', (e) => this.destroy(e));
    socket.on('close', () => this.destroy());
  }

  /** Opens a stream; the peer sees it as a 'stream' event with these headers. */
  request(headers: Headers): MuxStream {
    const id = this.nextId;
    this.nextId += 2;
    const s = new MuxStream(this, id);
    this.streams.set(id, s);
    if (this.destroyed) {
      process.nextTick(() => s.destroy(new Error('session closed')));
      return s;
    }
    this.send(T.Open, id, Buffer.from(JSON.stringify(headers)));
    return s;
  }

  ping(cb: (err: Error | null) => void): boolean {
    if (this.destroyed) return false;
    const key = `${Date.now()}-${Math.random()}`;
    this.pings.set(key, cb);
    this.send(T.Ping, 0, Buffer.from(key));
    return true;
  }

  /** Ends the session once its streams are done. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.streams.size === 0) this.socket.end();
    else this.once('idle', () => this.socket.end());
  }

  destroy(err?: Error): void {
    if (this.destroyed) return;
    this.destroyed = true;
    this.closed = true;
    for (const s of this.streams.values()) s.destroy(err ?? new Error('session closed'));
    this.streams.clear();
    for (const cb of this.pings.values()) cb(err ?? new Error('session closed'));
    this.pings.clear();
    const w = this.waiters;
    this.waiters = [];
    for (const cb of w) cb(err ?? new Error('session closed'));
    this.socket.destroy();
    this.emit('close');
  }

  /** @internal */
  send(type: T, id: number, payload: Buffer): void {
    if (this.destroyed) return;
    const h = Buffer.allocUnsafe(HEADER);
    h.writeUInt8(type, 0);
    h.writeUInt8(0, 1);
    h.writeUInt16BE(0, 2);
    h.writeUInt32BE(id, 4);
    h.writeUInt32BE(payload.length, 8);
    this.socket.cork();
    this.socket.write(h);
    if (payload.length) this.socket.write(payload);
    this.socket.uncork();
  }

  /** @internal calls back once the socket accepts more (backpressure for every stream). */
  whenWritable(cb: (e?: Error | null) => void): void {
    if (this.destroyed) return cb(new Error('session closed'));
    if (!this.socket.writableNeedDrain) return cb();
    this.waiters.push(cb);
  }

  /** @internal */
  forget(id: number): void {
    this.streams.delete(id);
    if (this.streams.size === 0) this.emit('idle');
  }

  private onData(c: Buffer): void {
    this.chunks.push(c);
    this.buffered += c.length;
    while (this.buffered >= HEADER) {
      const head = this.peek(HEADER);
      const len = head.readUInt32BE(8);
      if (this.buffered < HEADER + len) return;
      this.take(HEADER);
      const payload = len ? this.take(len) : Buffer.alloc(0);
      this.onFrame(head.readUInt8(0) as T, head.readUInt32BE(4), payload);
      if (this.destroyed) return;
    }
  }

  private peek(n: number): Buffer {
    if (this.chunks[0]!.length >= n) return this.chunks[0]!.subarray(0, n);
    const b = Buffer.concat(this.chunks);
    this.chunks = [b];
    return b.subarray(0, n);
  }

  private take(n: number): Buffer {
    const first = this.chunks[0]!;
    if (first.length === n) {
      this.chunks.shift();
      this.buffered -= n;
      return first;
    }
    if (first.length > n) {
      this.chunks[0] = first.subarray(n);
      this.buffered -= n;
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    let off = 0;
    while (off < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - off);
      c.copy(out, off, 0, k);
      off += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.buffered -= n;
    return out;
  }

  private onFrame(type: T, id: number, payload: Buffer): void {
    if (type === T.Ping) return this.send(T.Pong, 0, payload);
    if (type === T.Pong) {
      const key = payload.toString();
      const cb = this.pings.get(key);
      this.pings.delete(key);
      cb?.(null);
      return;
    }
    if (type === T.Open) {
      if (this.closed) return this.send(T.Reset, id, Buffer.from('session closing'));
      const s = new MuxStream(this, id);
      this.streams.set(id, s);
      this.emit('stream', s, JSON.parse(payload.toString()) as Headers);
      return;
    }
    this.streams.get(id)?.onFrame(type, payload);
  }
}
