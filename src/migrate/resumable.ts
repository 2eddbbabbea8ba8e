// A byte stream between two local programs (CRIU's lazy-pages link) carried over the agents'
// connection, that survives losing that connection: the local sockets stay open, each side
// numbers the bytes it sends and keeps those the peer has not acknowledged, and on a new
// connection each side says how much it received and the other resends from there. While
// detached, CRIU on either side just sees a quiet socket: the destination task waits on its
// faults instead of dying.
//
// Messages on the carrying stream: 'D' u32 length, bytes | 'A' f64 bytes received | 'E' f64
// total bytes this side will ever send (its local program closed).
import { EventEmitter } from 'node:events';
import type { Duplex } from 'node:stream';
import { FerryError } from '../errors.js';

/** Unacknowledged bytes kept for a resend; reading from the local program pauses past this. */
const MAX_REPLAY = 64 * 1024 * 1024;
const ACK_EVERY = 256 * 1024;
const MAX_MESSAGE = 1024 * 1024;

export class ResumableTunnel<Local extends Duplex = Duplex> extends EventEmitter {
  /** Bytes read from the local program. */
  private sent = 0;
  /** Bytes the peer has acknowledged; replay holds [acked, sent). */
  private acked = 0;
  private replay: Buffer[] = [];
  private replayBytes = 0;
  /** Bytes from the peer written to the local program. */
  received = 0;
  private sinceAck = 0;
  private localEnded = false;
  /** Total the peer will send, once it said so. */
  private peerTotal?: number;
  private stream?: Duplex;
  /** A message header that arrived in pieces ('D' needs 5 bytes, 'A' and 'E' 9). */
  private head = Buffer.alloc(9);
  private headLen = 0;
  /** Bytes of the current 'D' message still to come: passed on as they arrive, never gathered. */
  private dataLeft = 0;
  private waitingDrain = false;
  private pausedForReplay = false;
  private finished = false;
  private peerEndSignalled = false;
  /** Whether the local program's end may be told to the peer (see confirmEnd). */
  private endConfirmed: boolean;

  /**
   * With holdEnd, the local program closing is not passed on until confirmEnd(): a program that
   * dies also closes its socket, and the peer must not take that for a finished transfer.
   */
  constructor(
    readonly local: Local,
    opts: { holdEnd?: boolean } = {},
  ) {
    super();
    this.endConfirmed = !opts.holdEnd;
    local.pause();
    local.on('data', (c: Buffer) => this.fromLocal(c));
    local.once('end', () => {
      this.localEnded = true;
      if (this.endConfirmed) this.sendEnd();
    });
    local.on('error', (e) => this.emit('localError', e));
    local.once('close', () => {
      this.finished = true;
      this.emit('localClosed');
    });
  }

  get attached(): boolean {
    return this.stream !== undefined;
  }

  /** How many streams have carried it: more than one means the link was cut and resumed. */
  attaches = 0;

  /** Carries the tunnel over a (new) stream; the peer has received peerReceived bytes of ours. */
  attach(stream: Duplex, peerReceived: number): void {
    this.detach();
    if (!(peerReceived >= this.acked && peerReceived <= this.sent)) {
      stream.destroy(new FerryError('PEER', `resume at byte ${peerReceived}, but ${this.acked}..${this.sent} is what can be resent`));
      throw new FerryError('PEER', `the peer cannot resume the link: it has ${peerReceived} bytes, this side kept ${this.acked}..${this.sent}`);
    }
    this.trim(peerReceived);
    this.attaches++;
    this.stream = stream;
    this.headLen = 0;
    this.dataLeft = 0;
    for (const b of this.replay) this.writeData(b);
    if (this.localEnded && this.endConfirmed) this.sendEnd();
    stream.on('data', this.onStreamData);
    stream.on('drain', this.onDrain);
    const gone = () => {
      if (this.stream !== stream) return;
      this.detach();
      this.emit('detached');
    };
    stream.once('close', gone);
    stream.once('error', gone);
    stream.once('end', gone);
    if (!this.pausedForReplay) this.local.resume();
  }

  /** Stops using the current stream; the local socket stays open and quiet. */
  detach(): void {
    const s = this.stream;
    if (!s) return;
    this.stream = undefined;
    s.off('data', this.onStreamData);
    s.off('drain', this.onDrain);
    this.local.pause();
    s.destroy();
  }

  /** The local program finished well: its end may now be passed on. */
  confirmEnd(): void {
    if (this.endConfirmed) return;
    this.endConfirmed = true;
    if (this.localEnded) this.sendEnd();
  }

  /** Ends the local program's side (the peer's program is done with it). */
  endLocal(): void {
    this.local.end();
  }

  destroy(): void {
    this.detach();
    this.local.destroy();
  }

  private fromLocal(c: Buffer): void {
    this.replay.push(c);
    this.replayBytes += c.length;
    this.sent += c.length;
    const ok = this.stream ? this.writeData(c) : false;
    if (this.replayBytes > MAX_REPLAY) this.pausedForReplay = true;
    if (!ok || this.pausedForReplay) this.local.pause();
  }

  private readonly onDrain = (): void => {
    if (!this.pausedForReplay) this.local.resume();
  };

  private writeData(c: Buffer): boolean {
    // One buffer, so one frame on the connection rather than a tiny header frame and a data frame.
    const m = Buffer.allocUnsafe(5 + c.length);
    m.write('D', 0, 'latin1');
    m.writeUInt32BE(c.length, 1);
    c.copy(m, 5);
    return this.stream!.write(m);
  }

  private sendNumber(tag: 'A' | 'E', n: number): void {
    if (!this.stream) return;
    const b = Buffer.allocUnsafe(9);
    b.write(tag, 0, 'latin1');
    b.writeDoubleBE(n, 1);
    this.stream.write(b);
  }

  private sendEnd(): void {
    this.sendNumber('E', this.sent);
  }

  private readonly onStreamData = (c: Buffer): void => {
    try {
      this.parse(c);
    } catch (e) {
      if (!(e instanceof FerryError)) throw e;
      this.emit('protocolError', e);
      this.detach();
      this.emit('detached');
    }
  };

  private parse(c: Buffer): void {
    let off = 0;
    while (off < c.length && this.stream) {
      if (this.dataLeft > 0) {
        const n = Math.min(this.dataLeft, c.length - off);
        this.deliver(c.subarray(off, off + n));
        this.dataLeft -= n;
        off += n;
      } else {
        const tag = String.fromCharCode(this.headLen ? this.head[0]! : c[off]!);
        const need = tag === 'D' ? 5 : tag === 'A' || tag === 'E' ? 9 : 0;
        if (!need) throw new FerryError('PEER', `lazy-pages link: unknown message '${tag}'`);
        const n = Math.min(need - this.headLen, c.length - off);
        c.copy(this.head, this.headLen, off, off + n);
        this.headLen += n;
        off += n;
        if (this.headLen < need) return;
        this.headLen = 0;
        if (tag === 'D') {
          const len = this.head.readUInt32BE(1);
          if (len > MAX_MESSAGE) throw new FerryError('PEER', `lazy-pages link: message of ${len} bytes`);
          this.dataLeft = len;
        } else {
          const v = this.head.readDoubleBE(1);
          if (tag === 'A') {
            if (!(v >= this.acked && v <= this.sent)) throw new FerryError('PEER', `lazy-pages link: acknowledgement of byte ${v} out of range`);
            this.trim(v);
          } else {
            this.peerTotal = v;
          }
        }
      }
      if (this.peerTotal !== undefined && this.received === this.peerTotal && this.dataLeft === 0 && !this.peerEndSignalled) {
        // Everything the peer's program sent has reached ours.
        this.peerEndSignalled = true;
        this.emit('peerEnded');
      }
    }
  }

  /** Bytes of a 'D' message, on to the local program. */
  private deliver(data: Buffer): void {
    this.received += data.length;
    this.sinceAck += data.length;
    if (!this.local.write(data) && !this.waitingDrain) {
      this.waitingDrain = true;
      this.stream?.pause();
      this.local.once('drain', () => {
        this.waitingDrain = false;
        this.stream?.resume();
      });
    }
    if (this.sinceAck >= ACK_EVERY) {
      this.sinceAck = 0;
      this.sendNumber('A', this.received);
    }
  }

  private trim(upTo: number): void {
    let drop = upTo - this.acked;
    while (drop > 0 && this.replay.length) {
      const b = this.replay[0]!;
      if (b.length <= drop) {
        this.replay.shift();
        drop -= b.length;
        this.replayBytes -= b.length;
      } else {
        this.replay[0] = b.subarray(drop);
        this.replayBytes -= drop;
        drop = 0;
      }
    }
    this.acked = upTo;
    if (this.pausedForReplay && this.replayBytes <= MAX_REPLAY / 2) {
      this.pausedForReplay = false;
      if (this.stream) this.local.resume();
    }
  }
}
