// CRIU probes the kernel at the start of every run (~25 ms here) unless it finds what it probed
// before in /run/criu.kdat. It writes that file only where /run is a tmpfs, so that a reboot into
// another kernel cannot leave it stale. On hosts whose /run is not a tmpfs every dump, lazy-pages
// daemon and restore probes again: two of those three runs are inside a migration's pause.
// There Ferry keeps the file itself, stamped with the boot it was probed in and the CRIU that
// probed it, and probes again when either changed.
import { copyFileSync, mkdtempSync, readFileSync, renameSync, rmSync, statfsSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { run } from '../exec/run.js';

const RUN = '/run';
const KDAT = `${RUN}/criu.kdat`;
const STAMP = `${RUN}/criu.kdat.ferry`;
const TMPFS_MAGIC = 0x01021994;

export type KdatState = 'criu keeps it' | 'kept' | 'probed' | 'unavailable';

function read(path: string): string | undefined {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return undefined;
  }
}

/** Makes sure /run/criu.kdat holds this boot's probe by this CRIU; never throws. */
export async function keepKdat(bin: string, version: string): Promise<KdatState> {
  try {
    if (process.getuid?.() !== 0) return 'unavailable';
    if (statfsSync(RUN).type === TMPFS_MAGIC) return 'criu keeps it';
    const stamp = `boot ${read('/proc/sys/kernel/random/boot_id')?.trim()}\ncriu ${bin} ${version}\n`;
    if (read(STAMP) === stamp && read(KDAT) !== undefined) return 'kept';
    rmSync(KDAT, { force: true });
    rmSync(STAMP, { force: true });
    // CRIU writes the file when /run is a tmpfs: give it one in a mount namespace of its own.
    const out = mkdtempSync(join(tmpdir(), 'ferry-kdat-'));
    try {
      const script = 'mount -t tmpfs ferry-kdat /run && "$0" check >/dev/null 2>&1; cp /run/criu.kdat "$1/criu.kdat"';
      const r = await run('unshare', ['-m', '--propagation', 'private', 'sh', '-c', script, bin, out], { timeoutMs: 60_000, reject: false });
      if (r.exitCode !== 0) return 'unavailable';
      // Agents of one machine (a lab) may probe at once: each renames its own copy into place.
      const fresh = `${KDAT}.ferry-${process.pid}`;
      copyFileSync(join(out, 'criu.kdat'), fresh);
      renameSync(fresh, KDAT);
      writeFileSync(STAMP, stamp);
      return 'probed';
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  } catch {
    return 'unavailable';
  }
}
