import { randomBytes } from 'node:crypto';
import { renameSync, writeFileSync } from 'node:fs';
import { readFile, rm } from 'node:fs/promises';

/**
 * Writes through a temporary file and a rename, so readers never see half a file. Synchronous
 * inside: these records are small, and several are written inside a migration's pause, where
 * an asynchronous write waited ~2-10 ms each for a thread behind the pause's other work.
 */
export async function writeJsonAtomic(path: string, value: unknown): Promise<void> {
  const tmp = `${path}.${randomBytes(4).toString('hex')}.tmp`;
  writeFileSync(tmp, JSON.stringify(value, null, 2) + '\n');
  renameSync(tmp, path);
}

export async function readJson<T>(path: string): Promise<T | undefined> {
  try {
    return JSON.parse(await readFile(path, 'utf8')) as T;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
}

/**
 * Removes a task's directory tree. A process on its way out (a shim recording its task's exit,
 * CRIU writing its stats) may add a file meanwhile: rmdir then fails with ENOTEMPTY, and the
 * removal is tried again.
 */
export async function removeTree(dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true, maxRetries: 10, retryDelay: 20 });
}
