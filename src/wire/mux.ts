// Ferry's multiplexer: many streams over one TLS connection, with per-stream credit-based flow
// control. Node's HTTP/2 moved at most ~250 MB/s between two lab hosts where the same TLS socket
// carried ~700 MB/s, so a migration's pages would have been bound by the framing, not the link.
//
// Frame: type u8 | flags u8 | reserved u16 | stream id u32 | length u32 | payload.
// Either side may open streams: the connecting side uses odd ids, the accepting side even ones.
//
// The peer is not trusted to be well-behaved: every frame is checked (type, length for its type,
// stream id and parity, credit) and anything malformed ends that session with a protocol error
// and nothing else. What one session can make us hold is bounded: one frame being parsed, a
// receive window per stream, at most MAX_PEER_STREAMS streams, and SESSION_BUDGET of windows in all.
import { EventEmitter } from 'node:events';
import { Duplex } from 'node:stream';
import { FerryError } from '../errors.js';

export const FrameType = {
  Open: 1,
  Response: 2,
  Data: 3,
  End: 4,
  Reset: 5,
  Credit: 6,
  Ping: 7,
  Pong: 8,
  GoAway: 9,
} as const;
export type FrameType = (typeof FrameType)[keyof typeof FrameType];

export const HEADER = 12;
export const LIMITS = {
  /** Payload of one data frame. */
  maxData: 256 * 1024,
  /** JSON headers of an Open or Response frame. */
  maxHeaders: 16 * 1024,
  maxHeaderFields: 64,
  /** Reset and GoAway reasons. */
  maxReason: 1024,
  maxPing: 64,
  /** Bytes a new stream may receive before the receiver grants more. */
  initialWindow: 256 * 1024,
  /** A stream whose reader keeps up grows its window up to this. */
  maxWindow: 16 * 1024 * 1024,
  /** All streams' windows of one session together. */
  sessionBudget: 64 * 1024 * 1024,
  /** Streams the peer may have open at once. */
  maxPeerStreams: 64,
  /** Control frames we owe a peer that does not read are not queued past this. */
  maxUnreadByPeer: 32 * 1024 * 1024,
} as const;

const MAX_CREDIT = 2 ** 31;

export type Headers = Record<string, string | number | undefined>;
export interface Frame {
  type: FrameType;
  id: number;
  payload: Buffer;
}

/** The peer broke the protocol; the session ends, the process goes on. */
export class ProtocolError extends FerryError {
  constructor(message: string) {
    super('PEER', `protocol error: ${message}`);
  }
}

function maxPayload(type: number): number | undefined {
  switch (type) {
    case FrameType.Open:
    case FrameType.Response:
      return LIMITS.maxHeaders;
    case FrameType.Data:
      return LIMITS.maxData;
    case FrameType.End:
      return 0;
    case FrameType.Reset:
    case FrameType.GoAway:
      return LIMITS.maxReason;
    case FrameType.Credit:
      return 4;
    case FrameType.Ping:
    case FrameType.Pong:
      return LIMITS.maxPing;
    default:
      return undefined;
  }
}

export function encodeFrame(type: FrameType, id: number, payload: Buffer): Buffer[] {
  const h = Buffer.allocUnsafe(HEADER);
  h.writeUInt8(type, 0);
  h.writeUInt8(0, 1);
  h.writeUInt16BE(0, 2);
  h.writeUInt32BE(id, 4);
  h.writeUInt32BE(payload.length, 8);
  return payload.length ? [h, payload] : [h];
}

/**
 * Splits a byte stream into frames. A header is judged before its payload is buffered, so a
 * peer cannot make us wait for (or hold) more than one frame of the largest allowed size.
 */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  private buffered = 0;

  /** Feeds bytes; calls emit for each whole frame until it returns false. Throws ProtocolError. */
  push(c: Buffer, emit: (f: Frame) => boolean): void {
    if (c.length) {
      this.chunks.push(c);
      this.buffered += c.length;
    }
    while (this.buffered >= HEADER) {
      const head = this.peek(HEADER);
      const type = head.readUInt8(0);
      const len = head.readUInt32BE(8);
      const max = maxPayload(type);
      if (max === undefined) throw new ProtocolError(`unknown frame type ${type}`);
      if (head.readUInt8(1) !== 0 || head.readUInt16BE(2) !== 0) throw new ProtocolError('reserved header bits set');
      if (len > max) throw new ProtocolError(`frame of type ${type} is ${len} bytes, more than ${max}`);
      if (this.buffered < HEADER + len) return;
      const id = head.readUInt32BE(4);
      this.take(HEADER);
      const payload = len ? this.take(len) : Buffer.alloc(0);
      if (!emit({ type: type as FrameType, id, payload })) return;
    }
  }

  /** Bytes held waiting for the rest of a frame. */
  get pending(): number {
    return this.buffered;
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
}

/** Headers as JSON: an object of at most maxHeaderFields string or number values. */
export function parseHeaders(payload: Buffer): Headers {
  let v: unknown;
  try {
    v = JSON.parse(payload.toString('utf8'));
  } catch {
    throw new ProtocolError('headers are not JSON');
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new ProtocolError('headers are not an object');
  const entries = Object.entries(v);
  if (entries.length > LIMITS.maxHeaderFields) throw new ProtocolError('too many header fields');
  for (const [, val] of entries) {
    if (typeof val !== 'string' && !(typeof val === 'number' && Number.isFinite(val))) throw new ProtocolError('header values must be strings or numbers');
  }
  return v as Headers;
}

export class MuxStream extends Duplex {
  headersSent = false;
  private sendCredit: number = LIMITS.initialWindow;
  /** What the peer may still send before we grant more. */
  private recvAllowed: number = LIMITS.initialWindow;
  /** This stream's receive window, grown while its reader keeps up. */
  private window: number = LIMITS.initialWindow;
  /** Bytes received and handed on, not yet credited back. */
  private owed = 0;
  private pending?: { chunk: Buffer; cb: (e?: Error | null) => void };
  private localEnded = false;
  private remoteEnded = false;
  private gotResponse = false;

  constructor(
    readonly session: MuxSession,
    readonly id: number,
    /** Opened by this side (the peer answers it with a Response). */
    readonly local: boolean,
  ) {
    super({ highWaterMark: 64 * 1024, allowHalfOpen: true });
    // A broken connection errors every stream at once; users learn of it from their own
    // listeners or from 'close'. A stream nobody listens to must not take the process down.
    this.on('error', () => {});
  }

  /** Answers a stream the peer opened (the counterpart of HTTP/2's respond). */
  respond(headers: Headers): void {
    if (this.headersSent) return;
    this.headersSent = true;
    this.session.send(FrameType.Response, this.id, Buffer.from(JSON.stringify(headers)));
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (e?: Error | null) => void): void {
    this.sendData(chunk, cb);
  }

  private sendData(chunk: Buffer, cb: (e?: Error | null) => void): void {
    if (this.destroyed) return cb(new Error('stream closed'));
    while (chunk.length > 0 && this.sendCredit > 0) {
      const n = Math.min(chunk.length, this.sendCredit, LIMITS.maxData);
      this.session.send(FrameType.Data, this.id, chunk.subarray(0, n));
      this.sendCredit -= n;
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
    this.session.send(FrameType.End, this.id, Buffer.alloc(0));
    this.maybeDone();
    cb();
  }

  override _read(): void {
    // A sender that ran out of credit has us owing a whole window, so batching credit in
    // quarters of it never stalls the stream.
    this.flushCredit();
  }

  override _destroy(err: Error | null, cb: (e?: Error | null) => void): void {
    if (!(this.localEnded && this.remoteEnded)) this.session.send(FrameType.Reset, this.id, Buffer.from((err?.message ?? 'cancelled').slice(0, LIMITS.maxReason)));
    this.session.forget(this, this.window);
    const p = this.pending;
    this.pending = undefined;
    p?.cb(err ?? new Error('stream closed'));
    cb(err);
  }

  /** @internal a frame for this stream, already checked by the session. */
  onFrame(f: Frame): void {
    switch (f.type) {
      case FrameType.Response:
        if (!this.local || this.gotResponse) throw new ProtocolError(`unexpected response on stream ${this.id}`);
        this.gotResponse = true;
        this.emit('response', parseHeaders(f.payload));
        return;
      case FrameType.Data:
        if (this.remoteEnded) throw new ProtocolError(`data after end on stream ${this.id}`);
        if (f.payload.length > this.recvAllowed) throw new ProtocolError(`stream ${this.id} sent past its credit`);
        this.recvAllowed -= f.payload.length;
        this.owed += f.payload.length;
        if (this.push(f.payload)) this.flushCredit();
        return;
      case FrameType.End:
        if (this.remoteEnded) throw new ProtocolError(`second end on stream ${this.id}`);
        this.remoteEnded = true;
        this.push(null);
        this.maybeDone();
        return;
      case FrameType.Reset:
        this.remoteEnded = true;
        this.localEnded = true;
        this.destroy(new FerryError('PEER', `stream reset by peer: ${f.payload.toString('utf8')}`));
        return;
      case FrameType.Credit: {
        const n = f.payload.readUInt32BE(0);
        if (n === 0 || this.sendCredit + n > MAX_CREDIT) throw new ProtocolError(`bad credit ${n} on stream ${this.id}`);
        this.sendCredit += n;
        const p = this.pending;
        if (p) {
          this.pending = undefined;
          this.sendData(p.chunk, p.cb);
        }
        return;
      }
      default:
        throw new ProtocolError(`frame type ${f.type} on stream ${this.id}`);
    }
  }

  /** Gives back credit for what was consumed, and grows the window while the session has room. */
  private flushCredit(): void {
    if (this.remoteEnded || this.destroyed || this.owed < this.window / 4) return;
    let grow = 0;
    if (this.window < LIMITS.maxWindow && this.session.reserve(this.window)) {
      grow = this.window;
      this.window *= 2;
    }
    const n = this.owed + grow;
    this.owed = 0;
    this.recvAllowed += n;
    const b = Buffer.allocUnsafe(4);
    b.writeUInt32BE(n, 0);
    this.session.send(FrameType.Credit, this.id, b);
  }

  private maybeDone(): void {
    if (this.localEnded && this.remoteEnded) {
      this.session.forget(this, this.window);
      setImmediate(() => this.destroy());
    }
  }
}

export interface SessionSocket extends Duplex {
  setNoDelay?(noDelay?: boolean): unknown;
}

export class MuxSession extends EventEmitter {
  private readonly streams = new Map<number, MuxStream>();
  private readonly decoder = new FrameDecoder();
  private nextId: number;
  /** Highest id the peer opened; ids only grow, so a reused id is caught. */
  private lastPeerId = 0;
  private peerStreams = 0;
  private reserved = 0;
  private waiters: Array<(e?: Error | null) => void> = [];
  private pings = new Map<string, (err: Error | null) => void>();
  private keepaliveTimer?: NodeJS.Timeout;
  destroyed = false;
  closed = false;
  /** Why the session ended, once it has. */
  error?: Error;

  constructor(
    readonly socket: SessionSocket,
    readonly initiator: boolean,
  ) {
    super();
    this.nextId = initiator ? 1 : 2;
    socket.setNoDelay?.(true);
    socket.on('data', (c: Buffer) => this.onData(c));
    socket.on('drain', () => {
      const w = this.waiters;
      this.waiters = [];
      for (const cb of w) cb();
    });
    socket.on('error', (e) => this.destroy(new FerryError('PEER', `the connection broke: ${e.message}`, { cause: e })));
    socket.on('close', () => this.destroy());
  }

  /** Opens a stream; the peer sees it as a 'stream' event with these headers. */
  request(headers: Headers): MuxStream {
    const id = this.nextId;
    this.nextId += 2;
    const s = new MuxStream(this, id, true);
    this.reserved += LIMITS.initialWindow;
    this.streams.set(id, s);
    if (this.destroyed) {
      process.nextTick(() => s.destroy(new FerryError('PEER', 'session closed')));
      return s;
    }
    this.send(FrameType.Open, id, Buffer.from(JSON.stringify(headers)));
    return s;
  }

  ping(cb: (err: Error | null) => void): boolean {
    if (this.destroyed) return false;
    const key = `${Date.now()}-${Math.random()}`.slice(0, LIMITS.maxPing);
    this.pings.set(key, cb);
    this.send(FrameType.Ping, 0, Buffer.from(key));
    return true;
  }

  /** Pings every intervalMs; a peer that misses more than `misses` answers in a row is dropped. */
  keepalive(intervalMs = 1000, misses = 3): void {
    if (this.keepaliveTimer || this.destroyed) return;
    let missed = 0;
    this.keepaliveTimer = setInterval(() => {
      const sent = this.ping((err) => {
        if (!err) missed = 0;
      });
      if (!sent || ++missed > misses) this.destroy(new FerryError('PEER', 'the peer stopped answering'));
    }, intervalMs);
    this.keepaliveTimer.unref();
  }

  /** Ends the session once its streams are done. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.streams.size === 0) this.socket.end();
    else this.once('idle', () => this.socket.end());
  }

  destroy(err?: Error): void {
    if (this.teardown(err)) this.socket.destroy();
  }

  /** Tells the peer why, then drops the connection (after a moment to let the reason out). */
  private fail(err: ProtocolError): void {
    if (this.destroyed) return;
    this.send(FrameType.GoAway, 0, Buffer.from(err.message.slice(0, LIMITS.maxReason)));
    this.emit('protocolError', err);
    this.teardown(err);
    this.socket.end();
    const t = setTimeout(() => this.socket.destroy(), 1000);
    t.unref();
  }

  private teardown(err?: Error): boolean {
    if (this.destroyed) return false;
    this.destroyed = true;
    this.closed = true;
    this.error = err;
    clearInterval(this.keepaliveTimer);
    const why = err ?? new FerryError('PEER', 'session closed');
    // What already arrived for a stream is read before its error: the last lines a peer sent
    // before it died (a migration's id, its outcome) came in the same read as the close.
    for (const s of this.streams.values()) destroyWhenRead(s, why, Date.now() + READ_GRACE_MS);
    this.streams.clear();
    for (const cb of this.pings.values()) cb(why);
    this.pings.clear();
    const w = this.waiters;
    this.waiters = [];
    for (const cb of w) cb(why);
    this.emit('close', err);
    return true;
  }

  /** @internal */
  send(type: FrameType, id: number, payload: Buffer): void {
    if (this.destroyed) return;
    const [h, p] = encodeFrame(type, id, payload);
    this.socket.cork();
    this.socket.write(h);
    if (p) this.socket.write(p);
    this.socket.uncork();
  }

  /** @internal calls back once the socket accepts more (backpressure for every stream). */
  whenWritable(cb: (e?: Error | null) => void): void {
    if (this.destroyed) return cb(new FerryError('PEER', 'session closed'));
    if (!this.socket.writableNeedDrain) return cb();
    this.waiters.push(cb);
  }

  /** @internal a stream asks to grow its window by n bytes. */
  reserve(n: number): boolean {
    if (this.reserved + n > LIMITS.sessionBudget) return false;
    this.reserved += n;
    return true;
  }

  /** @internal */
  forget(s: MuxStream, window: number): void {
    if (this.streams.get(s.id) !== s) return;
    this.streams.delete(s.id);
    this.reserved -= window;
    if (!s.local) this.peerStreams--;
    if (this.streams.size === 0) this.emit('idle');
  }

  private onData(c: Buffer): void {
    if (this.destroyed) return;
    try {
      this.decoder.push(c, (f) => {
        this.onFrame(f);
        return !this.destroyed;
      });
    } catch (e) {
      // A malformed frame ends this session only; anything else is a bug and surfaces.
      if (e instanceof ProtocolError) this.fail(e);
      else throw e;
    }
  }

  private isPeerId(id: number): boolean {
    return id % 2 === (this.initiator ? 0 : 1);
  }

  private onFrame(f: Frame): void {
    const { type, id, payload } = f;
    if (type === FrameType.Ping || type === FrameType.Pong || type === FrameType.GoAway) {
      if (id !== 0) throw new ProtocolError(`frame type ${type} on stream ${id}`);
      if (type === FrameType.Ping) {
        if (this.socket.writableLength > LIMITS.maxUnreadByPeer) throw new ProtocolError('the peer does not read what it asks for');
        return this.send(FrameType.Pong, 0, payload);
      }
      if (type === FrameType.Pong) {
        const key = payload.toString();
        const cb = this.pings.get(key);
        this.pings.delete(key);
        cb?.(null);
        return;
      }
      this.destroy(new FerryError('PEER', `the peer closed the session: ${payload.toString('utf8')}`));
      return;
    }
    if (id === 0) throw new ProtocolError(`frame type ${type} on stream 0`);
    if (type === FrameType.Open) {
      if (!this.isPeerId(id)) throw new ProtocolError(`the peer opened stream ${id} with this side's parity`);
      if (id <= this.lastPeerId) throw new ProtocolError(`stream ${id} opened twice or out of order`);
      this.lastPeerId = id;
      const headers = parseHeaders(payload);
      if (this.closed || this.peerStreams >= LIMITS.maxPeerStreams) {
        if (this.socket.writableLength > LIMITS.maxUnreadByPeer) throw new ProtocolError('the peer does not read what it asks for');
        return this.send(FrameType.Reset, id, Buffer.from(this.closed ? 'session closing' : 'too many streams'));
      }
      const s = new MuxStream(this, id, false);
      this.peerStreams++;
      this.reserved += LIMITS.initialWindow;
      this.streams.set(id, s);
      this.emit('stream', s, headers);
      return;
    }
    const s = this.streams.get(id);
    if (s) return s.onFrame(f);
    // Frames for a stream that ended are dropped (they crossed our Reset); for one never opened,
    // the peer is confused or hostile.
    const neverOpened = this.isPeerId(id) ? id > this.lastPeerId : id >= this.nextId;
    if (neverOpened) throw new ProtocolError(`frame type ${type} for stream ${id}, which was never opened`);
  }
}

/** How long data a closed session left in a stream waits for its reader. */
const READ_GRACE_MS = 1000;

function destroyWhenRead(s: MuxStream, why: Error, until: number): void {
  if (s.destroyed) return;
  if (s.readableLength === 0 || s.readableEnded || Date.now() >= until) {
    s.destroy(why);
    return;
  }
  setTimeout(() => destroyWhenRead(s, why, until), 5);
}
