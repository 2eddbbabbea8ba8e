// Ferry's wire: HTTP/2 over TLS with mutual certificate authentication. One session between two
// agents carries every stream of a migration (control, pages, images, file sync), multiplexed
// with HTTP/2's own flow control.
import http2, { type ClientHttp2Session, type ClientHttp2Stream, type IncomingHttpHeaders, type OutgoingHttpHeaders } from 'node:http2';
import type { TLSSocket } from 'node:tls';
import { FerryError, type SerializedError } from '../errors.js';
import type { LoadedTls } from '../tls/pki.js';

/** Large windows: the default 64 KiB window caps one stream far below a 1 Gbit/s link. */
export const WINDOW = 32 * 1024 * 1024;
export const SETTINGS = { initialWindowSize: WINDOW, maxFrameSize: 1 << 20 } as const;

export function serverOptions(tls: LoadedTls): http2.SecureServerOptions {
  return {
    key: tls.key,
    cert: tls.cert,
    ca: tls.ca,
    requestCert: true,
    rejectUnauthorized: true,
    allowHTTP1: false,
    settings: SETTINGS,
    minVersion: 'TLSv1.3',
  };
}

export function parseAddress(addr: string, defaultPort = 7443): { host: string; port: number } {
  const m = /^\[?([^\]]+?)\]?(?::(\d+))?$/.exec(addr.trim());
  if (!m || !m[1]) throw new FerryError('USAGE', `invalid address '${addr}': use HOST or HOST:PORT`);
  const port = m[2] ? Number(m[2]) : defaultPort;
  if (!(port > 0 && port < 65536)) throw new FerryError('USAGE', `invalid port in '${addr}'`);
  return { host: m[1], port };
}

export interface ConnectOptions {
  tls: LoadedTls;
  /** The peer's certificate must name this host (CN), when given. */
  expectName?: string;
  signal?: AbortSignal;
  timeoutMs?: number;
}

export async function connect(address: string, o: ConnectOptions): Promise<ClientHttp2Session> {
  const { host, port } = parseAddress(address);
  return new Promise((resolve, reject) => {
    const session = http2.connect(`https://${host}:${port}`, {
      ca: o.tls.ca,
      cert: o.tls.cert,
      key: o.tls.key,
      settings: SETTINGS,
      minVersion: 'TLSv1.3',
      // Peers are identified by the cluster CA and their certificate's name, not by DNS.
      checkServerIdentity: (_h, cert) => {
        if (o.expectName && cert.subject?.CN !== o.expectName) {
          return new Error(`the agent at ${address} is '${cert.subject?.CN}', not '${o.expectName}'`);
        }
        return undefined;
      },
    });
    const timer = setTimeout(() => fail(new FerryError('TIMEOUT', `no answer from the agent at ${address} within ${o.timeoutMs ?? 5000} ms`, { hint: 'is `ferry agent` running there and the address right?' })), o.timeoutMs ?? 5000);
    const fail = (e: Error) => {
      clearTimeout(timer);
      session.destroy();
      reject(e instanceof FerryError ? e : connectError(address, e));
    };
    session.once('error', fail);
    session.once('connect', () => {
      clearTimeout(timer);
      session.off('error', fail);
      session.on('error', () => {}); // reported through the streams that fail
      session.setLocalWindowSize(WINDOW * 4);
      resolve(session);
    });
  });
}

function connectError(address: string, e: Error & { code?: string }): FerryError {
  if (e.code === 'ECONNREFUSED') return new FerryError('PEER', `no agent listens at ${address}`, { hint: 'start it with `ferry agent`' });
  if (/certificate|alert|handshake|TLS|SSL/i.test(e.message) || e.code?.startsWith('ERR_SSL') || e.code?.startsWith('ERR_TLS')) {
    return new FerryError('TLS', `TLS with the agent at ${address} failed: ${e.message}`, { hint: 'use certificates issued by the same cluster CA (`ferry cert issue`)' });
  }
  return new FerryError('PEER', `cannot reach the agent at ${address}: ${e.message}`);
}

export interface JsonResponse<T> {
  status: number;
  body: T;
}

/** One request with a JSON body and a JSON answer; errors come back as FerryError. */
export async function requestJson<T>(session: ClientHttp2Session, method: string, path: string, body?: unknown, o: { signal?: AbortSignal; timeoutMs?: number } = {}): Promise<T> {
  const stream = session.request({ ':method': method, ':path': path, 'content-type': 'application/json' }, o.signal ? { signal: o.signal } : {});
  stream.end(body === undefined ? undefined : JSON.stringify(body));
  const [headers, text] = await readAll(stream, o.timeoutMs);
  return decodeAnswer<T>(headers, text, path);
}

export function decodeAnswer<T>(headers: IncomingHttpHeaders, text: string, path: string): T {
  const status = Number(headers[':status']);
  let parsed: unknown;
  try {
    parsed = text ? JSON.parse(text) : undefined;
  } catch {
    throw new FerryError('PEER', `the agent sent a malformed answer to ${path} (status ${status})`);
  }
  if (status >= 400) {
    const err = (parsed as { error?: SerializedError } | undefined)?.error;
    throw err ? FerryError.fromJSON(err) : new FerryError('PEER', `the agent answered ${status} to ${path}`);
  }
  return parsed as T;
}

export function readAll(stream: ClientHttp2Stream, timeoutMs?: number): Promise<[IncomingHttpHeaders, string]> {
  return new Promise((resolve, reject) => {
    let headers: IncomingHttpHeaders = {};
    let text = '';
    const timer = timeoutMs ? setTimeout(() => stream.close(http2.constants.NGHTTP2_CANCEL), timeoutMs) : undefined;
    stream.setEncoding('utf8');
    stream.on('response', (h) => (headers = h));
    stream.on('data', (c: string) => (text += c));
    stream.on('end', () => {
      if (timer) clearTimeout(timer);
      resolve([headers, text]);
    });
    stream.on('error', (e) => {
      if (timer) clearTimeout(timer);
      reject(e instanceof FerryError ? e : new FerryError('PEER', `the connection to the agent broke: ${e.message}`, { cause: e }));
    });
    stream.on('close', () => {
      if (timer) clearTimeout(timer);
      if (!stream.readableEnded) reject(new FerryError('PEER', timeoutMs ? 'the agent did not answer in time' : 'the connection to the agent closed'));
    });
  });
}

export function peerName(socket: TLSSocket): string | undefined {
  const cn = socket.getPeerCertificate()?.subject?.CN;
  return typeof cn === 'string' ? cn : undefined;
}

export function jsonHeaders(status: number): OutgoingHttpHeaders {
  return { ':status': status, 'content-type': 'application/json' };
}
