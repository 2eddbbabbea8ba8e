// The cluster's certificates, made with openssl: one CA, and a certificate per host or client
// signed by it, carrying one role. Agents accept only peers that present a certificate from this
// CA that is not on the CA's revocation list.
import { existsSync } from 'node:fs';
import { appendFile, chmod, mkdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { FerryError } from '../errors.js';
import { run } from '../exec/run.js';
import { ROLES, type Role } from './identity.js';

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
      throw new FerryError('TLS', `cannot read the ${what} at ${p}`, { hint: 'create them with `ferry ca init` and `ferry cert issue NAME --role ROLE`' });
    }
  };
  await checkKeyMode(f.key);
  return { ca: await read('CA certificate', f.ca), cert: await read('certificate', f.cert), key: await read('private key', f.key) };
}

/** A private key others can read is as good as theirs: refuse to use it. */
export async function checkKeyMode(path: string): Promise<void> {
  const st = await stat(path).catch(() => undefined);
  if (st && (st.mode & 0o077) !== 0) {
    throw new FerryError('TLS', `the private key ${path} is readable by others (mode ${(st.mode & 0o777).toString(8).padStart(4, '0')})`, { hint: `run \`chmod 600 ${path}\`` });
  }
}

export async function caInit(dir: string, opts: { name?: string; force?: boolean } = {}): Promise<{ cert: string; key: string }> {
  const cert = join(dir, 'ca.crt');
  const key = join(dir, 'ca.key');
  if (existsSync(cert) && !opts.force) {
    throw new FerryError('TLS', `a cluster CA already exists in ${dir}`, { hint: 'use it, or pass --force to replace it (every certificate must then be issued again)' });
  }
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await chmod(dir, 0o700);
  await run('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', key, '-out', cert, '-days', '3650', '-subj', `/CN=${opts.name ?? 'ferry cluster CA'}`, '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
  await chmod(key, 0o600);
  return { cert, key };
}

export interface IssuedCert extends TlsFiles {
  serial: string;
}

/**
 * Issues a certificate with one role (its subject's OU). Agents' and controllers' certificates
 * serve and connect (agents call each other, the controller calls agents); operators' and readers' only connect, so they cannot pose as an agent.
 */
export async function certIssue(caDir: string, name: string, outDir: string, role: Role, sans: string[] = []): Promise<IssuedCert> {
  if (!/^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/.test(name)) throw new FerryError('USAGE', `invalid certificate name '${name}': use 1-63 letters, digits, '.', '_' or '-'`);
  if (!ROLES.includes(role)) throw new FerryError('USAGE', `unknown role '${role}': use ${ROLES.join(', ')}`);
  const caCert = join(caDir, 'ca.crt');
  const caKey = join(caDir, 'ca.key');
  if (!existsSync(caCert) || !existsSync(caKey)) {
    throw new FerryError('TLS', `no cluster CA in ${caDir}`, { hint: 'create one with `ferry ca init`' });
  }
  if (!existsSync(outDir)) await mkdir(outDir, { recursive: true, mode: 0o700 });
  const key = join(outDir, `${name}.key`);
  const cert = join(outDir, `${name}.crt`);
  const csr = join(outDir, `${name}.csr`);
  const ext = join(outDir, `${name}.ext`);
  const alt = [`DNS:${name}`, 'DNS:localhost', 'IP:127.0.0.1', ...sans.map((s) => (/^[\d.]+$|:/.test(s) ? `IP:${s}` : `DNS:${s}`))];
  const eku = role === 'agent' || role === 'controller' ? 'serverAuth,clientAuth' : 'clientAuth';
  await writeFile(ext, `basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=${eku}\nsubjectAltName=${[...new Set(alt)].join(',')}\n`);
  try {
    await run('openssl', ['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', key, '-out', csr, '-subj', `/CN=${name}/OU=${role}`]);
    await chmod(key, 0o600);
    await run('openssl', ['x509', '-req', '-in', csr, '-CA', caCert, '-CAkey', caKey, '-CAcreateserial', '-out', cert, '-days', '825', '-extfile', ext]);
  } finally {
    await rm(csr, { force: true });
    await rm(ext, { force: true });
  }
  const serial = normalizeSerial((await run('openssl', ['x509', '-in', cert, '-noout', '-serial'])).stdout.replace(/^serial=/, ''));
  await appendFile(join(caDir, 'issued.jsonl'), JSON.stringify({ name, role, serial, at: new Date().toISOString() }) + '\n', { mode: 0o600 });
  return { ca: caCert, cert, key, serial };
}

export function normalizeSerial(s: string): string {
  return s.trim().toUpperCase().replace(/^0+(?=.)/, '');
}

/** The CA's revocation list: one serial (hex) per line, '#' starts a comment. */
export function revokedPath(caDir: string): string {
  return join(caDir, 'revoked.txt');
}

/** Revokes every certificate issued to NAME, or one serial. Returns the serials added. */
export async function certRevoke(caDir: string, what: { name?: string; serial?: string }): Promise<string[]> {
  let serials: string[];
  if (what.serial) {
    if (!/^[0-9A-Fa-f]{1,64}$/.test(what.serial)) throw new FerryError('USAGE', `invalid serial '${what.serial}': give it in hex, as \`openssl x509 -noout -serial\` prints it`);
    serials = [normalizeSerial(what.serial)];
  } else {
    const issued = (await readFile(join(caDir, 'issued.jsonl'), 'utf8').catch(() => ''))
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as { name: string; serial: string });
    serials = issued.filter((i) => i.name === what.name).map((i) => i.serial);
    if (!serials.length) throw new FerryError('USAGE', `the CA in ${caDir} issued no certificate named '${what.name}'`, { hint: 'revoke by --serial, or check the name' });
  }
  await appendFile(revokedPath(caDir), serials.map((s) => `${s} # ${what.name ?? 'by serial'} ${new Date().toISOString()}\n`).join(''), { mode: 0o644 });
  return serials;
}

/** Re-reads a revocation list when it changes, so revocation needs no restart. */
export class RevocationList {
  private serials = new Set<string>();
  private mtimeMs = -1;

  constructor(readonly path: string | undefined) {}

  /** Returns true when the list changed. */
  async refresh(): Promise<boolean> {
    if (!this.path) return false;
    const st = await stat(this.path).catch(() => undefined);
    const m = st ? st.mtimeMs : 0;
    if (m === this.mtimeMs) return false;
    this.mtimeMs = m;
    const text = st ? await readFile(this.path, 'utf8').catch(() => '') : '';
    this.serials = new Set(
      text
        .split('\n')
        .map((l) => l.replace(/#.*/, '').trim())
        .filter((l) => /^[0-9A-Fa-f]+$/.test(l))
        .map(normalizeSerial),
    );
    return true;
  }

  has(serial: string): boolean {
    return this.serials.has(normalizeSerial(serial));
  }
}
