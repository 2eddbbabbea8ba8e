// The CLI's view of a cluster: a small file naming hosts and the client certificate to use.
//   { "hosts": { "h1": "10.0.0.1:7443" }, "controller": "10.0.0.254:7450", "ca": "...", "cert": "...", "key": "..." }
import { readFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { FerryError } from '../errors.js';
import { loadTls, type LoadedTls } from '../tls/pki.js';
import { connect, type MuxSession } from '../wire/session.js';

export interface ClusterFile {
  hosts: Record<string, string>;
  /** The cluster controller's API address, where there is one. */
  controller?: string;
  ca: string;
  cert: string;
  key: string;
}

export interface Cluster {
  file: string;
  hosts: Record<string, string>;
  controller?: string;
  tls: LoadedTls;
}

export async function loadCluster(path: string): Promise<Cluster> {
  let raw: ClusterFile;
  try {
    raw = JSON.parse(await readFile(path, 'utf8')) as ClusterFile;
  } catch (e) {
    throw new FerryError('CONFIG', `cannot read the cluster file ${path}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (e as Error).message}`, {
      hint: 'pass --cluster FILE (or FERRY_CLUSTER), or start a test lab with `ferry lab up`',
    });
  }
  if (!raw || typeof raw.hosts !== 'object') throw new FerryError('CONFIG', `cluster file ${path} has no "hosts" map`);
  const base = dirname(path);
  const tls = await loadTls({ ca: resolve(base, raw.ca), cert: resolve(base, raw.cert), key: resolve(base, raw.key) });
  return { file: path, hosts: raw.hosts, ...(typeof raw.controller === 'string' ? { controller: raw.controller } : {}), tls };
}

export function hostAddress(c: Cluster, name: string): string {
  const a = c.hosts[name];
  if (!a) {
    throw new FerryError('HOST_UNKNOWN', `no host named '${name}' in ${c.file}`, { hint: `known hosts: ${Object.keys(c.hosts).join(', ') || 'none'}` });
  }
  return a;
}

export async function connectHost(c: Cluster, name: string): Promise<MuxSession> {
  return connect(hostAddress(c, name), { tls: c.tls, expectName: name });
}
