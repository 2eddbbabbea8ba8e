// Which processes CRIU found stopped (SIGSTOP, job control) when it dumped them: a migration
// restores the whole tree stopped and resumes it, and must leave those stopped as they were.
import { readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { IMG_COMMON_MAGIC, fields } from './image.js';

const CORE_MAGIC = 0x55053847;
const TASK_STOPPED = 3;

/** core_entry.tc (3).task_state (1) of a core-N.img, if it has one. */
export function taskState(img: Buffer): number | undefined {
  if (img.length < 12 || img.readUInt32LE(0) !== IMG_COMMON_MAGIC || img.readUInt32LE(4) !== CORE_MAGIC) return undefined;
  const core = fields(img.subarray(12, 12 + img.readUInt32LE(8)));
  const tc = core.get(3);
  if (!(tc instanceof Buffer)) return undefined;
  const state = fields(tc).get(1);
  return typeof state === 'number' ? state : undefined;
}

/** Namespace pids of the processes that were stopped at the dump. */
export async function stoppedAtDump(imagesDir: string): Promise<Set<number>> {
  const out = new Set<number>();
  for (const f of await readdir(imagesDir).catch(() => [] as string[])) {
    const m = /^core-(\d+)\.img$/.exec(f);
    if (!m) continue;
    const state = taskState(await readFile(join(imagesDir, f)).catch(() => Buffer.alloc(0)));
    if (state === TASK_STOPPED) out.add(Number(m[1]));
  }
  return out;
}
