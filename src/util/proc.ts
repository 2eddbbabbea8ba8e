// Process identity by PID plus start time, so a recycled PID is never mistaken for a task.
import { readFileSync, readdirSync } from 'node:fs';

export function startTime(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Field 22 (starttime); the command name in parentheses may hold spaces.
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const v = Number(rest[19]);
    return Number.isFinite(v) ? v : undefined;
  } catch {
    return undefined;
  }
}

export function isAlive(pid: number, start?: number): boolean {
  const s = startTime(pid);
  if (s === undefined) return false;
  if (start !== undefined && s !== start) return false;
  try {
    const st = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = st.slice(st.lastIndexOf(')') + 2, st.lastIndexOf(')') + 3);
    return state !== 'Z' && state !== 'X';
  } catch {
    return false;
  }
}

export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      reject(signal?.reason);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/**
 * Polls until done() is true or timeoutMs passes; returns whether it became true. The one place
 * Ferry waits on a condition it cannot be told about (a process ending, a file appearing).
 */
export async function waitUntil(done: () => boolean, timeoutMs: number, everyMs = 20): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    if (done()) return true;
    if (Date.now() >= end) return false;
    await sleep(everyMs);
  }
}

export function signalName(n: number): string {
  const names: Record<number, string> = { 1: 'SIGHUP', 2: 'SIGINT', 3: 'SIGQUIT', 6: 'SIGABRT', 9: 'SIGKILL', 11: 'SIGSEGV', 13: 'SIGPIPE', 15: 'SIGTERM' };
  return names[n] ?? `signal ${n}`;
}

/** SIGKILL to one process, if it is still the one started at `start`; resolves once it is gone (at most 2 s). */
export async function killAndWait(pid: number, start: number | undefined): Promise<void> {
  if (!isAlive(pid, start)) return;
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    /* gone */
  }
  await waitUntil(() => !isAlive(pid, start), 2000);
}

/** The pids of a process tree, root first (threads' children included). */
export function treePids(root: number): number[] {
  const out: number[] = [];
  const todo = [root];
  const seen = new Set<number>();
  while (todo.length) {
    const pid = todo.pop()!;
    if (seen.has(pid)) continue;
    seen.add(pid);
    out.push(pid);
    let tids: string[] = [];
    try {
      tids = readdirSync(`/proc/${pid}/task`);
    } catch {
      continue; // exited meanwhile
    }
    for (const tid of tids) {
      try {
        const kids = readFileSync(`/proc/${pid}/task/${tid}/children`, 'utf8').trim();
        if (kids) todo.push(...kids.split(/\s+/).map(Number));
      } catch {
        /* exited meanwhile */
      }
    }
  }
  return out;
}

/**
 * Resumes every process of a tree that CRIU restored stopped (--leave-stopped), except those
 * whose namespace pid is in keepStopped (they were stopped before the dump, and stay so).
 */
export function resumeTree(root: number, keepStopped: ReadonlySet<number> = new Set()): number {
  const pids = treePids(root).filter((p) => !keepStopped.size || !keepStopped.has(nsPid(p) ?? -1));
  for (const p of pids) {
    try {
      process.kill(p, 'SIGCONT');
    } catch {
      /* exited meanwhile */
    }
  }
  return pids.length;
}

/** The process's pids from the outermost PID namespace to its own (/proc's NSpid); throws if it is gone. */
export function nsPids(pid: number): number[] {
  const m = /^NSpid:\s+(.*)$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? m[1]!.trim().split(/\s+/).map(Number) : [pid];
}

/** The process's pid in its own (innermost) PID namespace. */
export function nsPid(pid: number): number | undefined {
  try {
    return nsPids(pid).pop();
  } catch {
    return undefined;
  }
}

