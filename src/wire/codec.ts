// Page streams compressed on the way: lz4 (lz4-napi, the LZ4 block format, with the raw length
// in front), in frames that each say whether they are compressed, so a sender can stop
// compressing where it does not pay (incompressible pages, or a link faster than the codec)
// without telling the receiver.
//
// A frame: u8 kind (0 raw, 1 lz4), u32 raw length, u32 wire length, then the wire bytes.
import { Transform, type TransformCallback } from 'node:stream';
import { compress, uncompress } from 'lz4-napi';
import { FerryError } from '../errors.js';
import { ChunkQueue } from '../precopy/store.js';

export type CompressMode = 'off' | 'auto' | 'on';
export const COMPRESS_MODES: readonly CompressMode[] = ['off', 'auto', 'on'];
/** The header naming a stream's codec; absent means raw bytes. */
export const CODEC_HEADER = 'x-ferry-codec';
export const CODEC = 'lz4';

const FRAME_HEADER = 9;
const RAW = 0;
const LZ4 = 1;
/** Bytes gathered into one frame: big enough for lz4 to find repeats, small enough to pipeline. */
const FRAME_BYTES = 256 << 10;
/** A receiver refuses frames above this: a hostile peer must not make it allocate much. */
const MAX_FRAME = 4 << 20;
/** Compressed below this share of the raw size, a frame is worth sending compressed. */
const WORTH = 0.9;
/** In auto, while not compressing, one frame in this many is compressed to see whether it would pay now. */
const PROBE_EVERY = 32;
/** After the stream first looks codec-bound, the next look comes this soon, then ever later up to PROBE_EVERY: one unlucky frame must not send the next 32 raw. */
const FIRST_RECHECK = 4;
/** A partial frame waits at most this long for more bytes. */
const IDLE_MS = 1;

/** What a compressor did: the report's bytes in and out, and how often it chose to compress. */
export interface CodecStats {
  mode: 'auto' | 'on';
  rawBytes: number;
  wireBytes: number;
  frames: number;
  compressedFrames: number;
  /** Measured codec rate (MB/s of raw input), 0 before the first compressed frame. */
  codecMBps: number;
}

/**
 * The sender's half. In auto it compresses while the codec is faster than the link (so
 * compressing never slows the stream) and the data shrinks; linkMBps is the caller's latest
 * measure of the link (undefined: not known yet, so compress and measure). A link measured
 * while compressing shows the codec's pace, not the link's: so a compressed frame that left at
 * once (the link took it) while more input waited says the codec is the bottleneck, and the
 * frames after it go raw until the next probe.
 */
export class Compressor extends Transform {
  readonly stats: CodecStats;
  /** Bytes not yet framed, as the chunks they came in (a raw frame sends them without a copy). */
  private readonly pending = new ChunkQueue();
  private ratio = 0.5;
  private sinceProbe = 0;
  private probeEvery = PROBE_EVERY;
  private codecBound = false;
  /** Frames this compressor sent: the first finds the link idle whatever its speed. */
  private sent = 0;
  /** Frames go out one after another, whoever started them. */
  private chain: Promise<void> = Promise.resolve();
  private idle?: NodeJS.Timeout;

  constructor(
    private readonly mode: 'auto' | 'on',
    private readonly linkMBps: () => number | undefined = () => undefined,
    /** Counts shared by the compressors of one migration (CRIU opens a page stream per process). */
    stats?: CodecStats,
  ) {
    // A few frames each way: a full readable side is the link pushing back.
    super({ readableHighWaterMark: 4 * FRAME_BYTES, writableHighWaterMark: 4 * FRAME_BYTES });
    this.stats = stats ?? { mode, rawBytes: 0, wireBytes: 0, frames: 0, compressedFrames: 0, codecMBps: 0 };
  }

  /** Whether the next frame is compressed. */
  private worthIt(): boolean {
    if (this.mode === 'on') return true;
    const link = this.linkMBps();
    const wouldPay = this.ratio < WORTH && (link === undefined || this.stats.codecMBps === 0 || this.stats.codecMBps > link);
    if (wouldPay && !this.codecBound) return true;
    // The data or the link may change: look again now and then.
    if (++this.sinceProbe >= (wouldPay ? this.probeEvery : PROBE_EVERY)) {
      this.sinceProbe = 0;
      return true;
    }
    return false;
  }

  /** One frame of n bytes made of parts: compressed if worth it, else the parts as they came. */
  private async frame(parts: Buffer[], n: number): Promise<Buffer[]> {
    this.stats.frames++;
    this.stats.rawBytes += n;
    if (this.worthIt()) {
      const raw = parts.length === 1 ? parts[0]! : Buffer.concat(parts, n);
      const t0 = performance.now();
      const z = await compress(raw);
      const ms = Math.max(performance.now() - t0, 0.01);
      const rate = n / 1e6 / (ms / 1000);
      // A small frame measures the call's overhead, not the codec.
      if (n >= FRAME_BYTES / 4) this.stats.codecMBps = this.stats.codecMBps ? 0.8 * this.stats.codecMBps + 0.2 * rate : rate;
      const ratio = z.length / n;
      this.ratio = 0.7 * this.ratio + 0.3 * ratio;
      if (ratio < 1) {
        this.stats.compressedFrames++;
        return this.framed(LZ4, n, [z]);
      }
    }
    return this.framed(RAW, n, parts);
  }

  private framed(kind: number, rawLen: number, body: Buffer[]): Buffer[] {
    const wireLen = body.reduce((sum, b) => sum + b.length, 0);
    const h = Buffer.alloc(FRAME_HEADER);
    h.writeUInt8(kind, 0);
    h.writeUInt32LE(rawLen, 1);
    h.writeUInt32LE(wireLen, 5);
    this.stats.wireBytes += FRAME_HEADER + wireLen;
    return [h, ...body];
  }

  /** Frames what is pending: whole frames only, or (all) the rest too. */
  private async flushPending(all: boolean): Promise<void> {
    while (this.pending.length >= FRAME_BYTES || (all && this.pending.length > 0)) {
      const n = Math.min(FRAME_BYTES, this.pending.length);
      const before = this.stats.compressedFrames;
      // Whatever was pushed before is still queued here when the link is what holds the stream up.
      const linkIdle = this.readableLength === 0;
      for (const b of await this.frame(this.pending.take(n), n)) this.push(b);
      if (this.stats.compressedFrames > before && this.sent > 0) this.judge(linkIdle && (this.writableLength > 0 || this.pending.length > 0));
      this.sent++;
    }
  }

  /** After a compressed frame: whether the codec held the stream up; a second look backs off. */
  private judge(bound: boolean): void {
    if (bound) {
      this.probeEvery = this.codecBound ? Math.min(2 * this.probeEvery, PROBE_EVERY) : FIRST_RECHECK;
      this.sinceProbe = 0;
    }
    this.codecBound = bound;
  }

  /**
   * A sender that waits for an answer (CRIU's page-server protocol), or the end of a round,
   * must not wait for a full frame: what sits here a moment goes out as it is.
   */
  private armIdle(): void {
    if (this.pending.length === 0) return;
    this.idle = setTimeout(() => {
      this.chain = this.chain.then(() => this.flushPending(true)).catch((e: Error) => {
        this.destroy(e);
      });
    }, IDLE_MS);
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    this.pending.push(chunk);
    clearTimeout(this.idle);
    if (this.pending.length < FRAME_BYTES) {
      this.armIdle();
      done();
      return;
    }
    // Whole frames now; the rest waits for more input, or for the idle timer.
    this.chain = this.chain.then(() => this.flushPending(false));
    this.chain.then(() => {
      this.armIdle();
      done();
    }, done);
  }

  override _flush(done: TransformCallback): void {
    clearTimeout(this.idle);
    this.chain = this.chain.then(() => this.flushPending(true));
    this.chain.then(() => done(), done);
  }

  override _destroy(err: Error | null, cb: (e: Error | null) => void): void {
    clearTimeout(this.idle);
    cb(err);
  }
}

/** The receiver's half: checks every frame before it allocates for it. */
export class Decompressor extends Transform {
  /** What arrived, kept as the chunks it came in: a frame split over many is copied once. */
  private readonly q = new ChunkQueue();

  constructor() {
    super({ readableHighWaterMark: 4 * FRAME_BYTES, writableHighWaterMark: 4 * FRAME_BYTES });
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    this.q.push(chunk);
    this.drain().then(() => done(), done);
  }

  private async drain(): Promise<void> {
    while (this.q.length >= FRAME_HEADER) {
      const h = this.q.peek(FRAME_HEADER);
      const kind = h.readUInt8(0);
      const rawLen = h.readUInt32LE(1);
      const wireLen = h.readUInt32LE(5);
      if (kind !== RAW && kind !== LZ4) throw bad(`unknown frame kind ${kind}`);
      if (rawLen > MAX_FRAME || wireLen > MAX_FRAME + 64) throw bad(`frame of ${rawLen} bytes (at most ${MAX_FRAME})`);
      if (kind === RAW && wireLen !== rawLen) throw bad('raw frame whose lengths differ');
      if (this.q.length < FRAME_HEADER + wireLen) return;
      this.q.take(FRAME_HEADER);
      const parts = this.q.take(wireLen);
      if (kind === RAW) {
        // Slices of what arrived go on as they are: no copy.
        for (const p of parts) this.push(p);
        continue;
      }
      const body = parts.length === 1 ? parts[0]! : Buffer.concat(parts, wireLen);
      // lz4-napi's block starts with the raw length: it must be the one the frame declared.
      if (wireLen < 4 || body.readUInt32LE(0) !== rawLen) throw bad('lz4 frame whose length does not match');
      let raw: Buffer;
      try {
        raw = await uncompress(body);
      } catch (e) {
        throw bad(`lz4 frame does not decode (${(e as Error).message})`);
      }
      if (raw.length !== rawLen) throw bad('lz4 frame decoded to the wrong length');
      this.push(raw);
    }
  }

  override _flush(done: TransformCallback): void {
    done(this.q.length ? bad(`stream ends inside a frame (${this.q.length} bytes left)`) : undefined);
  }
}

function bad(what: string): FerryError {
  return new FerryError('PEER', `compressed page stream: ${what}`);
}

/** The codec a stream's headers name, checked: raw, or lz4. */
export function streamCodec(value: unknown): 'lz4' | undefined {
  if (value === undefined) return undefined;
  if (value === CODEC) return CODEC;
  throw new FerryError('USAGE', `unknown page stream codec '${String(value)}' (this agent knows '${CODEC}')`);
}
