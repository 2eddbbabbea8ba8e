// The cluster's certificates, made with openssl: one CA, and a certificate per host or client
// signed by it. Agents accept only peers that present a certificate from this CA.
import { existsSync } from 'node:fs';
import { mkdir, readFile, writeFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { FerryError } from '../errors.js';
import { run } from '../exec/run.js';

export interface TlsFiles {
  ca: string;
  cert: string;
  key: string;
}

export interface LoadedTls {
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
}

export async function loadTls(f: TlsFiles): Promise<LoadedTls> {
  const read = async (what: string, p: string) => {
    try {
      return await readFile(p);
    } catch {
      throw new FerryError('TLS', `cannot read the ${what} at ${p}`, { hint: 'create them with `ferry ca init` and `ferry cert issue NAME`' });
    }
  };
  return { ca: await read('CA certificate', f.ca), cert: await read('certificate', f.cert), key: await read('private key', f.key) };
}

export async function caInit(dir: string, opts: { name?: string; force?: boolean } = {}): Promise<{ cert: string; key: string }> {
  const cert = join(dir, 'ca.crt');
  const key = join(dir, 'ca.key');
  if (existsSync(cert) && !opts.force) {
    throw new FerryError('TLS', `a cluster CA already exists in ${dir}`, { hint: 'use it, or pass --force to replace it (every certificate must then be issued again)' });
  }
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await run('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', key, '-out', cert, '-days', '3650', '-subj', `/CN=${opts.name ?? 'ferry cluster CA'}`, '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
  return { cert, key };
}

/** Issues a certificate usable as TLS server and client, naming the host and its addresses. */
export async function certIssue(caDir: string, name: string, outDir: string, sans: string[] = []): Promise<TlsFiles> {
  if (!/^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/.test(name)) throw new FerryError('USAGE', `invalid certificate name '${name}'`);
  const caCert = join(caDir, 'ca.crt');
  const caKey = join(caDir, 'ca.key');
  if (!existsSync(caCert) || !existsSync(caKey)) {
    throw new FerryError('TLS', `no cluster CA in ${caDir}`, { hint: 'create one with `ferry ca init`' });
  }
  await mkdir(outDir, { recursive: true, mode: 0o700 });
  const key = join(outDir, `${name}.key`);
  const cert = join(outDir, `${name}.crt`);
  const csr = join(outDir, `${name}.csr`);
  const ext = join(outDir, `${name}.ext`);
  const alt = [`DNS:${name}`, 'DNS:localhost', 'IP:127.0.0.1', ...sans.map((s) => (/^[\d.]+$|:/.test(s) ? `IP:${s}` : `DNS:${s}`))];
  await writeFile(ext, `basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=${[...new Set(alt)].join(',')}\n`);
  try {
    await run('openssl', ['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', key, '-out', csr, '-subj', `/CN=${name}`]);
    await run('openssl', ['x509', '-req', '-in', csr, '-CA', caCert, '-CAkey', caKey, '-CAcreateserial', '-out', cert, '-days', '825', '-extfile', ext]);
  } finally {
    await rm(csr, { force: true });
    await rm(ext, { force: true });
  }
  return { ca: caCert, cert, key };
}
