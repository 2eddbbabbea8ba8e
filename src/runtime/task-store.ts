// Ferry's record of each task, one directory per task under <stateDir>/tasks. The record is the
// truth for what Ferry did (started, checkpointed, migrated away); the shim's exit file and /proc
// are the truth for whether the task still runs. Together they survive restarts of Ferry.
import { closeSync, openSync, readFileSync, readdirSync, unlinkSync, writeSync } from 'node:fs';
import { mkdir, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { FerryError } from '../errors.js';
import type { DumpStats, RestoreStats } from '../criu/stats.js';
import { readJson, writeJsonAtomic } from '../util/fs.js';
import { linkTarget, type Scratch } from './scratch.js';
import { isAlive, signalName } from '../util/proc.js';

export type TaskState =
  /** running under its shim */
  | 'running'
  /** frozen by CRIU during a checkpoint or migration */
  | 'frozen'
  /** dumped and stopped; images in the task's directory */
  | 'checkpointed'
  /** ended by itself or by `ferry stop` */
  | 'exited';

export interface ExitStatus {
  exitCode?: number;
  signal?: string;
  /** Set when the task vanished without its shim recording why. */
  unknown?: boolean;
  at: string;
}

export interface CheckpointInfo {
  at: string;
  leftRunning: boolean;
  durationMs: number;
  stats?: DumpStats;
  restore?: { at: string; durationMs: number; stats?: RestoreStats };
}

export interface TaskRecord {
  name: string;
  command: string[];
  cwd: string;
  env: Record<string, string>;
  createdAt: string;
  /** Each start or restore is a new incarnation with its own shim and exit file. */
  incarnation: number;
  state: TaskState;
  pid?: number;
  pidStart?: number;
  shimPid?: number;
  shimStart?: number;
  exit?: ExitStatus;
  checkpoint?: CheckpointInfo;
  /** Where the task came from, when it arrived by migration. */
  origin?: string;
  /** The task's own network namespace and address (ferry run --net); moves with the task. */
  net?: { address: string; publish?: Publish[] };
  /** Read live, never stored: the user's main process (host pid), how many processes the task has, their resident memory. */
  mainPid?: number;
  processes?: number;
  rssBytes?: number;
  /** Read live: a restored copy that waits, stopped, for its source's decision on this migration. */
  awaiting?: { from: string; migration: string };
}

/** A port of the host forwarded to the task's own address (ferry run --net --publish). */
export interface Publish {
  hostPort: number;
  port: number;
  proto: 'tcp' | 'udp';
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;

export function isValidName(name: string): boolean {
  return NAME_RE.test(name);
}

export function validateName(name: string): void {
  if (!NAME_RE.test(name)) {
    throw new FerryError('USAGE', `invalid task name '${name}': use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit`);
  }
}

interface ShimExit {
  incarnation: number;
  pid: number;
  exitCode?: number;
  signal?: number;
}

export class TaskStore {
  readonly tasksDir: string;

  constructor(
    readonly stateDir: string,
    readonly scratch: Scratch,
  ) {
    this.tasksDir = join(stateDir, 'tasks');
  }

  /** Every path of a task derives from here, so a name is checked before any file is touched. */
  dir(name: string): string {
    validateName(name);
    return join(this.tasksDir, name);
  }

  imagesDir(name: string): string {
    return join(this.dir(name), 'images');
  }

  logPath(name: string): string {
    return join(this.dir(name), 'task.log');
  }

  async init(): Promise<void> {
    await mkdir(this.tasksDir, { recursive: true, mode: 0o700 });
  }

  async exists(name: string): Promise<boolean> {
    return (await readJson<TaskRecord>(join(this.dir(name), 'task.json'))) !== undefined;
  }

  async save(rec: TaskRecord): Promise<void> {
    await writeJsonAtomic(join(this.dir(rec.name), 'task.json'), rec);
  }

  /** The record with its state brought up to date from the shim's exit file and /proc. */
  async get(name: string): Promise<TaskRecord> {
    validateName(name);
    const rec = await readJson<TaskRecord>(join(this.dir(name), 'task.json'));
    if (!rec) throw new FerryError('TASK_NOT_FOUND', `no task named '${name}' on this host`, { hint: 'see `ferry ps` for the tasks here' });
    return this.refresh(rec);
  }

  async list(): Promise<TaskRecord[]> {
    let names: string[];
    try {
      names = await readdir(this.tasksDir);
    } catch {
      return [];
    }
    const out: TaskRecord[] = [];
    for (const n of names.sort()) {
      if (!NAME_RE.test(n)) continue;
      const rec = await readJson<TaskRecord>(join(this.dir(n), 'task.json')).catch(() => undefined);
      if (rec) out.push(await this.refresh(rec));
    }
    return out;
  }

  /** Whether some task's images are the directory at path (a link into scratch). */
  linksTo(path: string): boolean {
    let names: string[] = [];
    try {
      names = readdirSync(this.tasksDir);
    } catch {
      return false;
    }
    return names.some((n) => NAME_RE.test(n) && linkTarget(join(this.tasksDir, n, 'images')) === path);
  }

  async remove(name: string): Promise<void> {
    await this.scratch.removeTaskDir(this.dir(name));
  }

  private async refresh(rec: TaskRecord): Promise<TaskRecord> {
    if (rec.state !== 'running' && rec.state !== 'frozen') return rec;
    const ex = await readJson<ShimExit>(join(this.dir(rec.name), `exit-${rec.incarnation}.json`)).catch(() => undefined);
    if (ex) {
      rec.state = 'exited';
      rec.exit = {
        ...(ex.exitCode !== undefined ? { exitCode: ex.exitCode } : {}),
        ...(ex.signal !== undefined ? { signal: signalName(ex.signal) } : {}),
        at: new Date().toISOString(),
      };
    } else if (rec.shimPid !== undefined && isAlive(rec.shimPid, rec.shimStart)) {
      // The shim outlives the task root only for the moment it takes to record the exit.
      return rec;
    } else if (rec.pid === undefined || !isAlive(rec.pid, rec.pidStart)) {
      // The shim was killed too: the exit status is lost, but the task is gone.
      rec.state = 'exited';
      rec.exit = { unknown: true, at: new Date().toISOString() };
    } else {
      return rec;
    }
    delete rec.pid;
    delete rec.pidStart;
    await this.save(rec);
    return rec;
  }

  /**
   * Holds the task's lock for one operation; a second operation on the same task is refused
   * while the first one's process lives.
   */
  async withLock<T>(name: string, op: string, fn: () => Promise<T>): Promise<T> {
    const path = join(this.dir(name), 'lock');
    for (let attempt = 0; ; attempt++) {
      try {
        const fd = openSync(path, 'wx', 0o600);
        writeSync(fd, JSON.stringify({ pid: process.pid, op }));
        closeSync(fd);
        break;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'ENOENT') {
          throw new FerryError('TASK_NOT_FOUND', `no task named '${name}' on this host`, { hint: 'see `ferry ps` for the tasks here' });
        }
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST' || attempt > 2) throw e;
        let holder: { pid: number; op: string } | undefined;
        try {
          holder = JSON.parse(readFileSync(path, 'utf8')) as { pid: number; op: string };
        } catch {
          holder = undefined;
        }
        if (holder && isAlive(holder.pid)) {
          throw new FerryError('TASK_BUSY', `task '${name}' is busy: ${holder.op} in progress (pid ${holder.pid})`, {
            hint: 'wait for it to finish and try again',
          });
        }
        try {
          unlinkSync(path); // left by a Ferry process that died
        } catch {
          /* raced with another cleaner */
        }
      }
    }
    try {
      return await fn();
    } finally {
      try {
        unlinkSync(path);
      } catch {
        /* the task directory was removed by the operation */
      }
    }
  }
}

export function describeState(rec: TaskRecord): string {
  if (rec.state === 'frozen' && rec.awaiting) return `frozen (restored, awaiting ${rec.awaiting.from}'s decision)`;
  if (rec.state !== 'exited') return rec.state;
  const e = rec.exit;
  if (!e || e.unknown) return 'exited';
  if (e.signal) return `exited (${e.signal})`;
  return `exited (code ${e.exitCode})`;
}
