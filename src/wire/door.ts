// The door of a TLS server that peers must authenticate to (an agent, the controller's API):
// connections are counted as they come, before TLS takes them, and counted out once through
// their handshake. Before a peer is known, at most so many connections from one address and in
// all may be in their handshake; over that the oldest of them is closed (from that address,
// else from any), not the newcomer, so a peer of the cluster, whose handshake takes
// milliseconds, gets through even beside a flood from its own address. Without a bound, 22,000
// connections from one lab host that never said a word held every descriptor an agent may open
// (2026-12-03): the CLI and other agents were turned away, and CRIU could not have been started,
// until the flood stopped.
import { createServer, type Server, type Socket } from 'node:net';
import type tls from 'node:tls';

export const MAX_HANDSHAKES = 512;
export const MAX_HANDSHAKES_FROM_ONE = 64;
/** What a connection gets to finish its handshake (tls.Server's own default is 120 s). */
export const HANDSHAKE_TIMEOUT_MS = 5_000;

export interface DoorOptions {
  maxHandshakes?: number;
  maxFromOne?: number;
  /** An old connection was closed to make room: `kind` says why, without addresses. */
  closed?: (kind: string, line: string) => void;
}

/** A server to listen on in place of `secure`, which serves what passes (tls.Server takes connections handed to it with emit('connection')). */
export function door(secure: tls.Server, o: DoorOptions = {}): Server {
  const max = o.maxHandshakes ?? MAX_HANDSHAKES;
  const maxFromOne = o.maxFromOne ?? MAX_HANDSHAKES_FROM_ONE;
  /** Connections in their TLS handshake, oldest first. */
  const handshaking = new Map<string, { raw: Socket; from: string }>();
  const fromOne = new Map<string, number>();
  /** The connection is through its handshake or closed (raw: only if it is still that one). */
  const gone = (key: string, raw?: Socket) => {
    const e = handshaking.get(key);
    if (!e || (raw && e.raw !== raw)) return;
    handshaking.delete(key);
    const left = (fromOne.get(e.from) ?? 1) - 1;
    if (left > 0) fromOne.set(e.from, left);
    else fromOne.delete(e.from);
  };
  secure.prependListener('secureConnection', (s: tls.TLSSocket) => gone(`${s.remoteAddress}:${s.remotePort}`));
  return createServer((raw: Socket) => {
    const from = raw.remoteAddress ?? '';
    const key = `${from}:${raw.remotePort}`;
    const n = fromOne.get(from) ?? 0;
    const why = n >= maxFromOne ? `${maxFromOne} connections from one address were in their TLS handshake` : handshaking.size >= max ? `${max} connections were in their TLS handshake` : undefined;
    if (why) {
      let oldest: [string, { raw: Socket; from: string }] | undefined;
      for (const e of handshaking) {
        if (n < maxFromOne || e[1].from === from) {
          oldest = e;
          break;
        }
      }
      if (oldest) {
        o.closed?.(why, `closed the oldest connection from ${oldest[1].from} still in its TLS handshake: ${why}`);
        oldest[1].raw.destroy();
        gone(oldest[0]);
      }
    }
    gone(key);
    handshaking.set(key, { raw, from });
    fromOne.set(from, (fromOne.get(from) ?? 0) + 1);
    raw.once('close', () => gone(key, raw));
    secure.emit('connection', raw);
  });
}

/**
 * Refused peers are logged once per kind of refusal and window, then counted: a flood of them
 * must not flood the log (or the disk under it).
 */
export class RefusalLog {
  private readonly more = new Map<string, number>();
  private timer?: NodeJS.Timeout;

  constructor(
    private readonly log: (line: string) => void,
    private readonly windowMs = 10_000,
  ) {}

  /** `kind` says why (without the peer's address, so a flood from many is one kind); `line` is logged. */
  note(kind: string, line: string): void {
    const n = this.more.get(kind);
    if (n === undefined) {
      this.more.set(kind, 0);
      this.log(line);
    } else {
      this.more.set(kind, n + 1);
    }
    if (!this.timer) {
      this.timer = setTimeout(() => this.flush(), this.windowMs);
      this.timer.unref();
    }
  }

  flush(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
    const kinds = [...this.more].filter(([, n]) => n > 0);
    this.more.clear();
    if (!kinds.length) return;
    const total = kinds.reduce((a, [, n]) => a + n, 0);
    this.log(`turned away ${total} more connection${total === 1 ? '' : 's'} in ${this.windowMs / 1000} s: ${kinds.map(([k, n]) => `${k} (${n})`).join('; ')}`);
  }
}
