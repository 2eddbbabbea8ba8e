// A task's own mount namespace (made by ferry-shim: the host's mounts copied, its own /proc).
// CRIU dumps every mount of it. The ones copied from the host are named external: CRIU records
// only where they were, and the restore binds the destination's own mount at the same place (the
// root is the destination's "/"). Mounts the task made itself (a tmpfs, a bind) CRIU dumps and
// rebuilds as usual.
import { existsSync, mkdirSync, readFileSync, readlinkSync, statSync, writeFileSync } from 'node:fs';
import { readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { FerryError } from '../errors.js';

/** In a task's images: the mounts its dump named external, for the restore to bind. */
export const MOUNTS_MARKER = 'ferry-mounts.json';

export interface MountEntry {
  /** Where it is mounted, as the task sees it. */
  path: string;
  /** major:minor of the filesystem, and the directory of it that is mounted. */
  dev: string;
  root: string;
  fstype: string;
}

export interface ExternalMount {
  path: string;
  /** A directory (else a file: a bind-mounted file such as /dev/ptmx). */
  dir: boolean;
}

/** mountinfo escapes space, tab, newline and backslash as \ooo. */
function unescape(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/** Parses /proc/PID/mountinfo (proc(5)). */
export function parseMountinfo(text: string): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of text.split('\n')) {
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    const f = line.slice(0, sep).split(' ');
    const after = line.slice(sep + 3).split(' ');
    if (f.length < 5 || !after[0]) continue;
    out.push({ dev: f[2]!, root: unescape(f[3]!), path: unescape(f[4]!), fstype: after[0] });
  }
  return out;
}

/**
 * The task's mounts that are copies of this host's (same place, filesystem and root), except
 * the root itself, which the restore takes from --root.
 */
export function externalMounts(task: MountEntry[], host: MountEntry[]): string[] {
  const here = new Set(host.map((m) => `${m.path}\0${m.dev}\0${m.root}`));
  const paths = new Set<string>();
  for (const m of task) {
    if (m.path === '/') continue;
    if (here.has(`${m.path}\0${m.dev}\0${m.root}`)) paths.add(m.path);
  }
  return [...paths];
}

/** CRIU parses `mnt[PATH]:KEY`: a path with "]:" in it cannot be named. */
function nameable(path: string): boolean {
  return !path.includes(']:') && !path.includes('\n');
}

/** Whether the process lives in a mount namespace other than ours. */
function ownMountNamespace(pid: number): boolean {
  try {
    return readlinkSync(`/proc/${pid}/ns/mnt`) !== readlinkSync('/proc/self/ns/mnt');
  } catch {
    return false; // gone: CRIU will say so
  }
}

/**
 * CRIU's dump arguments for the task's mounts; writes the marker the restore reads. Nothing for
 * a task in the host's mount namespace (one started before Ferry gave tasks their own).
 */
export async function dumpMountArgs(pid: number, imagesDir: string): Promise<string[]> {
  if (!ownMountNamespace(pid)) return [];
  let task: MountEntry[];
  try {
    task = parseMountinfo(readFileSync(`/proc/${pid}/mountinfo`, 'utf8'));
  } catch {
    return []; // gone: CRIU will say so
  }
  const ext: ExternalMount[] = [];
  for (const path of externalMounts(task, parseMountinfo(readFileSync('/proc/self/mountinfo', 'utf8')))) {
    if (!nameable(path)) continue; // CRIU then says which mount it cannot dump
    let dir = true;
    try {
      dir = statSync(path).isDirectory();
    } catch {
      /* as the task sees it only */
    }
    ext.push({ path, dir });
  }
  await writeFile(join(imagesDir, MOUNTS_MARKER), JSON.stringify(ext));
  return ext.flatMap((m) => ['--external', `mnt[${m.path}]:${m.path}`]);
}

/**
 * CRIU's restore arguments for images with a mount namespace: each mount the source named external
 * is bound from the same place here. One this host lacks gets an empty stand-in (under
 * stateDir), so a mount the task never uses does not stop it from moving; a file it had open
 * there is then missing, and CRIU says which.
 */
export function restoreMountArgs(imagesDir: string, stateDir: string): string[] {
  const marker = join(imagesDir, MOUNTS_MARKER);
  if (!existsSync(marker)) return [];
  const ext = parseMarker(readFileSync(marker, 'utf8'));
  if (!ext) throw new FerryError('IMAGES', `the checkpoint images at ${imagesDir} have an unreadable ${MOUNTS_MARKER}`, { hint: 'the images cannot be used; take a new checkpoint of a running task' });
  const args = ['--root', '/'];
  for (const m of ext) {
    let target = m.path;
    let fits = false;
    try {
      fits = statSync(m.path).isDirectory() === m.dir;
    } catch {
      /* missing here */
    }
    if (!fits) target = standIn(stateDir, m.dir);
    args.push('--external', `mnt[${m.path}]:${target}`);
  }
  return args;
}

function parseMarker(text: string): ExternalMount[] | undefined {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return undefined;
  }
  const ok = (m: unknown): m is ExternalMount =>
    typeof m === 'object' && m !== null && typeof (m as ExternalMount).path === 'string' && (m as ExternalMount).path.startsWith('/') && nameable((m as ExternalMount).path) && typeof (m as ExternalMount).dir === 'boolean';
  return Array.isArray(v) && v.every(ok) ? v : undefined;
}

function standIn(stateDir: string, dir: boolean): string {
  const base = join(stateDir, 'mount-stand-ins');
  mkdirSync(join(base, 'dir'), { recursive: true, mode: 0o755 });
  const file = join(base, 'file');
  if (!existsSync(file)) writeFileSync(file, '', { mode: 0o644 });
  return dir ? join(base, 'dir') : file;
}

/**
 * A restore of a mount namespace works in /tmp/.criu.mntns.XXXXXX, which CRIU removes unless it is
 * killed: after a failed restore (CRIU has exited), the one its log names goes.
 */
export async function removeRestoreYard(restoreLog: string): Promise<void> {
  const log = await readFile(restoreLog, 'utf8').catch(() => '');
  const yard = /\/tmp\/\.criu\.mntns\.[A-Za-z0-9]{6}(?=\/|\s)/.exec(log)?.[0];
  if (yard) await rm(yard, { recursive: true, force: true }).catch(() => undefined);
}
