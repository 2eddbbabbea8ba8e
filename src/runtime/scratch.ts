// Where a migration's CRIU images (all but the task's memory) live while it runs: in memory
// (a tmpfs, /run/ferry by default), not on disk. A dump or a restore writes ~7 files per process
// inside the task's pause, and creating a file on a disk can cost far more than writing it:
// on the lab's ext4 (no journal, where the allocator skips recently deleted inodes) ~1 ms each,
// so a tree of 100 processes paused 1.8-2.0 s in auto against ~0.6 s with the images in memory.
// CRIU's P.Haul keeps its images on a tmpfs for the same reason.
//
// Memory never lands here: stop-copy pages go to the destination's page server (on disk, in the
// task's directory), pre-copy's pages to its store on disk; only what a lazy dump keeps out of
// lazy memory (shared memory, a few stack pages) does. When the scratch directory cannot be
// made safe or lacks room, the images stay in the task's directory, as before.
import { lstatSync, readlinkSync, statfsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, rm } from 'node:fs/promises';
import { isAbsolute, join, resolve, sep } from 'node:path';
import { removeTree } from '../util/fs.js';

/** Room left on the scratch filesystem besides the images themselves. */
const SCRATCH_SPARE = 256 << 20;

export type ScratchKind = 'outgoing' | 'incoming';

export class Scratch {
  constructor(readonly dir: string) {}

  /**
   * A fresh directory for one migration's images, or undefined when the scratch directory is
   * not usable (then the caller keeps them on disk): it must be a real directory of this user,
   * closed to others, with room for `bytes` and some to spare.
   */
  async make(kind: ScratchKind, name: string, bytes: number): Promise<string | undefined> {
    try {
      await mkdir(this.dir, { recursive: true, mode: 0o700 });
      const st = lstatSync(this.dir);
      if (!st.isDirectory() || st.uid !== process.getuid!() || (st.mode & 0o077) !== 0) return undefined;
      const fs = statfsSync(this.dir);
      if (fs.bavail * fs.bsize < bytes + SCRATCH_SPARE) return undefined;
      const parent = join(this.dir, kind);
      await mkdir(parent, { recursive: true, mode: 0o700 });
      // Short: CRIU's lazy-pages socket lives in it (a Unix socket's path has at most 107 bytes).
      return await mkdtemp(join(parent, `${name.slice(0, 12)}-`));
    } catch {
      return undefined;
    }
  }

  /** Whether path lies inside this scratch directory (so Ferry made it and may remove it). */
  owns(path: string): boolean {
    const root = resolve(this.dir) + sep;
    return isAbsolute(path) && resolve(path).startsWith(root);
  }

  /**
   * Removes an images directory: a link into scratch goes with what it points to. Only a link
   * into scratch: a task may put a link of its own where its images were.
   */
  async removeImages(imagesDir: string): Promise<void> {
    await this.removeLinked(imagesDir);
    await removeTree(imagesDir);
  }

  /** A task's directory, and its images in scratch if they are there. */
  async removeTaskDir(dir: string): Promise<void> {
    await this.removeLinked(join(dir, 'images'));
    await removeTree(dir);
  }

  private async removeLinked(link: string): Promise<void> {
    const target = linkTarget(link);
    if (target && this.owns(target)) await removeTree(target);
  }

  /**
   * After a restart: outgoing images are never needed again (the journal settles those
   * migrations), incoming ones only where a task's directory still links to them.
   */
  async sweep(linked: (path: string) => boolean): Promise<void> {
    await rm(join(this.dir, 'outgoing'), { recursive: true, force: true }).catch(() => {});
    let names: string[] = [];
    try {
      names = await readdir(join(this.dir, 'incoming'));
    } catch {
      return;
    }
    for (const n of names) {
      const p = join(this.dir, 'incoming', n);
      if (!linked(p)) await removeTree(p).catch(() => {});
    }
  }
}

/** Where a symbolic link points (resolved against its directory), or undefined if it is none. */
export function linkTarget(path: string): string | undefined {
  try {
    if (!lstatSync(path).isSymbolicLink()) return undefined;
    return resolve(join(path, '..'), readlinkSync(path));
  } catch {
    return undefined;
  }
}
