// Which processes CRIU found stopped (SIGSTOP, job control) when it dumped them: a migration
// restores the whole tree stopped and resumes it, and must leave those stopped as they were.
import { readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';

const IMG_COMMON_MAGIC = 0x54564319;
const CORE_MAGIC = 0x55053847;
const TASK_STOPPED = 3;

function varint(b: Buffer, at: number): [number, number] {
  let v = 0;
  let mul = 1;
  for (let i = at; i < b.length && i < at + 10; i++) {
    v += (b[i]! & 0x7f) * mul;
    if ((b[i]! & 0x80) === 0) return [v, i + 1];
    mul *= 128;
  }
  throw new Error('truncated varint');
}

/** The fields of one protobuf message: number -> first value (varint) or bytes (length-delimited). */
function fields(b: Buffer): Map<number, number | Buffer> {
  const out = new Map<number, number | Buffer>();
  let at = 0;
  while (at < b.length) {
    const [key, next] = varint(b, at);
    at = next;
    const [num, wire] = [Math.floor(key / 8), key % 8];
    let value: number | Buffer;
    if (wire === 0) [value, at] = varint(b, at);
    else if (wire === 2) {
      const [len, start] = varint(b, at);
      value = b.subarray(start, start + len);
      at = start + len;
    } else if (wire === 1) [value, at] = [0, at + 8];
    else if (wire === 5) [value, at] = [0, at + 4];
    else throw new Error(`unsupported wire type ${wire}`);
    if (!out.has(num)) out.set(num, value);
  }
  return out;
}

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
