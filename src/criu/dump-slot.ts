// CRIU's parasite, dumping a task whose /proc is not its own (every Ferry task has its own PID
// namespace), mounts proc for a moment at `proc.crtools` in the working directory of the task's
// pid 1 (criu/pie/parasite.c, get_proc_fd). Two such dumps in one directory collide there
// ("Can't create a directory (-17)"), and a dump killed at that moment leaves the directory
// behind for every later one. Ferry's pid 1 now sits in its task's own directory; one started
// by an older shim sits in "/", shared by every such task. So this host dumps one task per such
// directory at a time, and clears a leftover before it starts.
import { existsSync, readlinkSync } from 'node:fs';
import { rmdir } from 'node:fs/promises';
import { join } from 'node:path';
import { run } from '../exec/run.js';

const queues = new Map<string, Promise<void>>();

/**
 * Waits for the turn of the directory where the task's pid 1 (host pid root) works, else of
 * fallback; call the returned function once CRIU is past its parasite.
 */
export async function dumpSlot(root: number | undefined, fallback: string): Promise<() => void> {
  let cwd = fallback;
  try {
    if (root !== undefined) cwd = readlinkSync(`/proc/${root}/cwd`);
  } catch {
    /* gone: CRIU will say so */
  }
  const prev = queues.get(cwd) ?? Promise.resolve();
  let release!: () => void;
  const mine = new Promise<void>((r) => (release = r));
  const tail = prev.then(() => mine);
  queues.set(cwd, tail);
  await prev;
  await clearLeftover(cwd);
  let done = false;
  return () => {
    if (done) return;
    done = true;
    release();
    if (queues.get(cwd) === tail) queues.delete(cwd);
  };
}

async function clearLeftover(cwd: string): Promise<void> {
  const dir = join(cwd, 'proc.crtools');
  // Nearly always absent: then no umount is spawned (~10 ms of the agent's event loop on a busy
  // host, just before the freeze).
  if (!existsSync(dir)) return;
  // Nobody of ours uses it now; if it is still mounted, unmount it first. Only an empty directory goes.
  await run('umount', ['-l', dir], { reject: false, timeoutMs: 10_000 }).catch(() => undefined);
  await rmdir(dir).catch(() => undefined);
}
