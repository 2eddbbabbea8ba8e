// Where the fault tests act. With FERRY_FAULT_POINTS=DIR in an agent's environment (only the
// fault-matrix tests set it), every migration phase on either host leaves DIR/HOST.POINT.reached;
// the point named in DIR/arm (e.g. "h1.restore") also waits there until DIR/HOST.POINT.go exists,
// so a test injects its fault at exactly that phase and shows that it did.
import { existsSync, readFileSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import type { Socket } from 'node:net';
import { join } from 'node:path';
import { waitUntil } from '../util/proc.js';

export type FaultPoint = 'checks' | 'presync' | 'precopy' | 'freeze' | 'transfer' | 'restore' | 'commit' | 'resumed' | 'postcopy' | 'fill';

export async function faultPoint(host: string, point: FaultPoint): Promise<void> {
  const dir = process.env['FERRY_FAULT_POINTS'];
  if (!dir) return;
  const name = `${host}.${point}`;
  await writeFile(join(dir, `${name}.reached`), `${Date.now()}\n`).catch(() => undefined);
  let armed = '';
  try {
    armed = readFileSync(join(dir, 'arm'), 'utf8').trim();
  } catch {
    return;
  }
  if (armed !== name) return;
  await waitUntil(() => existsSync(join(dir, `${name}.go`)), 120_000, 5);
}

/** A test switch: the content of DIR/name, only under FERRY_FAULT_POINTS. */
function debugSetting(name: string): string | undefined {
  const dir = process.env['FERRY_FAULT_POINTS'];
  if (!dir) return undefined;
  try {
    return readFileSync(join(dir, name), 'utf8').trim() || undefined;
  } catch {
    return undefined;
  }
}

/**
 * The pre-copy round whose written pages are re-armed but not sent (DIR/drop-round; "late": the
 * pages a process changed before its late arming), so a test can show that a lost write is
 * caught by its memory check.
 */
export function debugDropRound(): string | undefined {
  return debugSetting('drop-round');
}

/**
 * DIR/track-method holding "hash" makes pre-copy track every process by content hash, the
 * method of hosts where write-protect cannot arm a task.
 */
export function debugTrackMethod(): string | undefined {
  return debugSetting('track-method');
}

/**
 * DIR/track-slow-end holding a number of ms: the write tracker lingers that long after it ended
 * the pages stream at the freeze, as a helper the scheduler left waiting would.
 */
export function debugTrackSlowEnd(): string | undefined {
  return debugSetting('track-slow-end');
}

/** DIR/throttle-gate holding "fail": lifting the throttle at CRIU's pre-dump fails, once. */
export function debugThrottleGate(): boolean {
  return debugSetting('throttle-gate') === 'fail';
}

/**
 * DIR/fill-hold holding "requests": from the resume on, the destination agent of a task its
 * daemon fills from the store reads no more of the daemon's page requests, so the daemon has
 * some out, never answered, when a test then kills the agent; those sent after the resume stay
 * unread in the agent's socket (see holdKernelReads()).
 */
export function debugFillHold(): boolean {
  return debugSetting('fill-hold') === 'requests';
}

/**
 * DIR/fill-hold holding "index": the store's index is written after the resume, not before it, so
 * the daemon fills the task through the agent until then, as it does when the store is not
 * complete at the resume; the agent reads the daemon's requests as ever.
 */
export function debugIndexAfterResume(): boolean {
  return debugSetting('fill-hold') === 'index';
}

/**
 * For debugFillHold(): the socket takes nothing more from the kernel. A paused stream still reads
 * ahead up to its high-water mark, which holds hundreds of page requests; an agent killed while
 * busy leaves them in the kernel, and its peer then reads a reset instead of an end. The handle
 * is told directly: the stream, still taking itself for reading, does not start it again.
 */
export function holdKernelReads(sock: Socket | undefined): void {
  (sock as unknown as { _handle?: { readStop?: () => number } } | undefined)?._handle?.readStop?.();
}
