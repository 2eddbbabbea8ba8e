// CRIU's parasite, dumping a task whose /proc is not its own (every Ferry task has its own PID
// namespace), mounts proc for a moment at `proc.crtools` in the task's working directory
// (criu/pie/parasite.c, get_proc_fd). Two such dumps of tasks that share a working directory
// collide there ("Can't create a directory (-17)"), and a dump killed at that moment leaves the
// directory behind for every later one. So this host dumps one task per working directory at a
// time, and clears a leftover before it starts.
import { rmdir } from 'node:fs/promises';
import { join } from 'node:path';
import { run } from '../exec/run.js';

const queues = new Map<string, Promise<void>>();

/** Waits for the working directory's turn; call the returned function once CRIU is past its parasite. */
export async function dumpSlot(cwd: string): Promise<() => void> {
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
  // Nobody of ours uses it now; if it is still mounted, unmount it first. Only an empty directory goes.
  await run('umount', ['-l', dir], { reject: false, timeoutMs: 10_000 }).catch(() => undefined);
  await rmdir(dir).catch(() => undefined);
}
