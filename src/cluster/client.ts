// Talking to the controller's API: HTTPS with the cluster file's client certificate; only a
// certificate of role controller may answer as the controller.
import https from 'node:https';
import { FerryError, type SerializedError } from '../errors.js';
import { identify } from '../tls/identity.js';
import type { LoadedTls } from '../tls/pki.js';
import { MAX_BODY, parseAddress } from '../wire/session.js';

export async function controllerRequest<T>(address: string, tls: LoadedTls, method: string, path: string, body?: unknown, timeoutMs = 10_000): Promise<T> {
  const { host, port } = parseAddress(address, 7450);
  const data = body === undefined ? undefined : JSON.stringify(body);
  return new Promise<T>((resolve, reject) => {
    const req = https.request(
      {
        host,
        port,
        method,
        path,
        ca: tls.ca,
        cert: tls.cert,
        key: tls.key,
        minVersion: 'TLSv1.3',
        headers: data === undefined ? {} : { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) },
        checkServerIdentity: (_h, cert) => {
          const id = identify(cert);
          if (typeof id === 'string') return new Error(`the peer at ${address} is not a Ferry controller: ${id}`);
          if (id.role !== 'controller') return new Error(`the peer at ${address} is '${id.name}', a certificate of role ${id.role}, not the controller`);
          return undefined;
        },
      },
      (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => {
          text += c;
          if (text.length > 16 * MAX_BODY) res.destroy(new Error('answer too large'));
        });
        res.on('error', (e) => reject(new FerryError('CONTROLLER', `the controller at ${address} broke off its answer: ${e.message}`)));
        res.on('end', () => {
          let parsed: unknown;
          try {
            parsed = text ? JSON.parse(text) : undefined;
          } catch {
            return reject(new FerryError('CONTROLLER', `the controller at ${address} sent a malformed answer to ${path} (status ${res.statusCode})`));
          }
          if ((res.statusCode ?? 500) >= 400) {
            const err = (parsed as { error?: SerializedError } | undefined)?.error;
            return reject(err ? FerryError.fromJSON(err) : new FerryError('CONTROLLER', `the controller answered ${res.statusCode} to ${path}`));
          }
          resolve(parsed as T);
        });
      },
    );
    if (timeoutMs > 0) req.setTimeout(timeoutMs, () => req.destroy(Object.assign(new Error('timeout'), { code: 'ETIMEDOUT' })));
    req.on('error', (e: NodeJS.ErrnoException) => {
      const why =
        e.code === 'ECONNREFUSED'
          ? 'nothing listens there'
          : e.code === 'ETIMEDOUT'
            ? `no answer within ${timeoutMs / 1000} s`
            : e.code === 'EHOSTUNREACH' || e.code === 'ENETUNREACH'
              ? 'no route to it'
              : e.message;
      reject(new FerryError('CONTROLLER', `cannot reach the controller at ${address}: ${why}`, { hint: 'is `ferry controller` running, and the address in the cluster file (or --controller) right?' }));
    });
    req.end(data);
  });
}
