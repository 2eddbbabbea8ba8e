// Ferry's wire: one TLS 1.3 connection with mutual certificate authentication between two
// parties, carrying many streams (see mux.ts). Between agents it carries every stream of a
// migration: control, pages, images, file sync.
import tls from 'node:tls';
import { FerryError, type SerializedError } from '../errors.js';
import type { LoadedTls } from '../tls/pki.js';
import { identify } from '../tls/identity.js';
import { MuxSession, type Headers, type MuxStream } from './mux.js';

export type { Headers, MuxSession, MuxStream };

export function serverOptions(t: LoadedTls): tls.TlsOptions {
  return { key: t.key, cert: t.cert, ca: t.ca, requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.3' };
}

/** HOST or HOST:PORT; a listening address may take port 0 (any free port) with ephemeral. */
export function parseAddress(addr: string, defaultPort = 7443, ephemeral = false): { host: string; port: number } {
  const m = /^\[?([^\]]+?)\]?(?::(\d+))?$/.exec(addr.trim());
  if (!m || !m[1]) throw new FerryError('USAGE', `invalid address '${addr}': use HOST or HOST:PORT`);
  const port = m[2] ? Number(m[2]) : defaultPort;
  if (!(port >= (ephemeral ? 0 : 1) && port < 65536)) throw new FerryError('USAGE', `invalid port in '${addr}'`);
  return { host: m[1], port };
}

export interface ConnectOptions {
  tls: LoadedTls;
  /** The peer's certificate must name this host (CN), when given. */
  expectName?: string;
  signal?: AbortSignal;
  timeoutMs?: number;
}

export async function connect(address: string, o: ConnectOptions): Promise<MuxSession> {
  const { host, port } = parseAddress(address);
  const timeoutMs = o.timeoutMs ?? 5000;
  return new Promise((resolve, reject) => {
    const socket = tls.connect({
      host,
      port,
      ca: o.tls.ca,
      cert: o.tls.cert,
      key: o.tls.key,
      minVersion: 'TLSv1.3',
      // Peers are identified by the cluster CA and their certificate's name and role, not by DNS:
      // only an agent's certificate may answer as an agent.
      checkServerIdentity: (_h, cert) => {
        const id = identify(cert);
        if (typeof id === 'string') return new Error(`the peer at ${address} is not a Ferry agent: ${id}`);
        if (id.role !== 'agent' || !id.server) return new Error(`the peer at ${address} is '${id.name}', a certificate of role ${id.role}, not an agent`);
        if (o.expectName && id.name !== o.expectName) return new Error(`the agent at ${address} is '${id.name}', not '${o.expectName}'`);
        return undefined;
      },
    });
    const timer = setTimeout(() => fail(new FerryError('TIMEOUT', `no answer from the agent at ${address} within ${timeoutMs} ms`, { hint: 'is `ferry agent` running there and the address right?' })), timeoutMs);
    const fail = (e: Error) => {
      clearTimeout(timer);
      socket.destroy();
      reject(e instanceof FerryError ? e : connectError(address, e));
    };
    socket.once('error', fail);
    socket.once('secureConnect', () => {
      clearTimeout(timer);
      socket.off('error', fail);
      resolve(new MuxSession(socket, true));
    });
  });
}

function connectError(address: string, e: Error & { code?: string }): FerryError {
  if (e.code === 'ECONNREFUSED') return new FerryError('PEER', `no agent listens at ${address}`, { hint: 'start it with `ferry agent`' });
  // The agent hung up before the handshake was through (connect() sees no error after it): it
  // closes the oldest handshakes when too many are open to it, and some TLS stacks close this
  // way on a certificate they do not trust.
  if (e.code === 'ECONNRESET') {
    return new FerryError('PEER', `the agent at ${address} closed the connection before the TLS handshake ended`, { hint: 'try again: it closes the oldest of its connections still in their handshake while too many are open to it (its log says so); else use certificates issued by the same cluster CA (`ferry cert issue`)' });
  }
  if (/certificate|alert|handshake|TLS|SSL/i.test(e.message) || e.code?.startsWith('ERR_SSL') || e.code?.startsWith('ERR_TLS')) {
    return new FerryError('TLS', `TLS with the agent at ${address} failed: ${e.message}`, { hint: 'use certificates issued by the same cluster CA (`ferry cert issue`)' });
  }
  return new FerryError('PEER', `cannot reach the agent at ${address}: ${e.message}`);
}

/** One request with a JSON body and a JSON answer; errors come back as FerryError. */
export async function requestJson<T>(session: MuxSession, method: string, path: string, body?: unknown, o: { signal?: AbortSignal; timeoutMs?: number } = {}): Promise<T> {
  const stream = session.request({ ':method': method, ':path': path, 'content-type': 'application/json' });
  const onAbort = () => stream.destroy(new FerryError('ABORTED', `${method} ${path} was cancelled`));
  o.signal?.addEventListener('abort', onAbort, { once: true });
  try {
    stream.end(body === undefined ? undefined : JSON.stringify(body));
    const [headers, text] = await readAll(stream, o.timeoutMs);
    return decodeAnswer<T>(headers, text, path);
  } finally {
    o.signal?.removeEventListener('abort', onAbort);
  }
}

export function decodeAnswer<T>(headers: Headers, text: string, path: string): T {
  const status = Number(headers[':status']);
  let parsed: unknown;
  try {
    parsed = text ? JSON.parse(text) : undefined;
  } catch {
    throw new FerryError('PEER', `the agent sent a malformed answer to ${path} (status ${status})`);
  }
  if (!(status >= 200)) throw new FerryError('PEER', `the agent closed ${path} without an answer`);
  if (status >= 400) {
    const err = (parsed as { error?: SerializedError } | undefined)?.error;
    throw err ? FerryError.fromJSON(err) : new FerryError('PEER', `the agent answered ${status} to ${path}`);
  }
  return parsed as T;
}

/** Answers and request bodies are JSON of at most this many bytes. */
export const MAX_BODY = 1024 * 1024;

/** A whole message on a stream (an answer, or a request body): its headers and its text, bounded. */
export function readAll(stream: MuxStream, timeoutMs?: number, maxBytes = 16 * MAX_BODY): Promise<[Headers, string]> {
  return new Promise((resolve, reject) => {
    let headers: Headers = {};
    let text = '';
    const timer = timeoutMs ? setTimeout(() => stream.destroy(new FerryError('TIMEOUT', 'the agent did not answer in time')), timeoutMs) : undefined;
    stream.setEncoding('utf8');
    stream.on('response', (h: Headers) => (headers = h));
    stream.on('data', (c: string) => {
      text += c;
      if (text.length > maxBytes) stream.destroy(new FerryError('USAGE', `a message larger than ${maxBytes} bytes`));
    });
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
      if (!stream.readableEnded) reject(new FerryError('PEER', 'the connection to the agent closed'));
    });
  });
}

export function jsonHeaders(status: number): Headers {
  return { ':status': status, 'content-type': 'application/json' };
}
