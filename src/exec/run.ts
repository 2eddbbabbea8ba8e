// One way to run external programs (criu, rsync, ip, tc, ...): own process group, bounded output
// capture, SIGTERM then SIGKILL on timeout or abort, and the whole command line in the error.
import { spawn, type ChildProcess, type SpawnOptions, type StdioOptions } from 'node:child_process';
import { FerryError, abortError } from '../errors.js';
import type { Duplex } from 'node:stream';

const MAX_CAPTURE = 64 * 1024;
const KILL_GRACE_MS = 2000;

export interface RunOptions {
  signal?: AbortSignal;
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  input?: string | Buffer;
  /** Return a non-zero exit instead of throwing. */
  reject?: boolean;
  /** Extra descriptors (index 3 onward) handed to the child. */
  extraFds?: SpawnOptions['stdio'];
}

export interface RunResult {
  command: string;
  exitCode: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  durationMs: number;
  timedOut: boolean;
}

export function commandLine(file: string, args: readonly string[]): string {
  return [file, ...args].map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(' ');
}

/** Keeps the head and tail of a stream without growing past a bound. */
class Capture {
  private head = '';
  private tail = '';
  private dropped = 0;
  push(chunk: Buffer): void {
    const s = chunk.toString('utf8');
    if (this.head.length < MAX_CAPTURE / 2) {
      const room = MAX_CAPTURE / 2 - this.head.length;
      this.head += s.slice(0, room);
      if (s.length <= room) return;
      this.tail += s.slice(room);
    } else {
      this.tail += s;
    }
    if (this.tail.length > MAX_CAPTURE / 2) {
      this.dropped += this.tail.length - MAX_CAPTURE / 2;
      this.tail = this.tail.slice(-MAX_CAPTURE / 2);
    }
  }
  text(): string {
    return this.dropped ? `${this.head}\n[... ${this.dropped} bytes ...]\n${this.tail}` : this.head + this.tail;
  }
}

/** Kills the child's whole process group: SIGTERM, then SIGKILL after a grace period. */
export function terminateGroup(child: ChildProcess, graceMs = KILL_GRACE_MS): void {
  const pid = child.pid;
  if (pid === undefined || child.exitCode !== null || child.signalCode !== null) return;
  const send = (sig: NodeJS.Signals) => {
    try {
      process.kill(-pid, sig);
    } catch {
      try {
        child.kill(sig);
      } catch {
        /* already gone */
      }
    }
  };
  send('SIGTERM');
  const t = setTimeout(() => send('SIGKILL'), graceMs);
  t.unref();
  child.once('exit', () => clearTimeout(t));
}

export async function run(file: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  const command = commandLine(file, args);
  if (opts.signal?.aborted) throw abortError(opts.signal, command);
  const started = performance.now();
  const stdio: SpawnOptions['stdio'] = ['pipe', 'pipe', 'pipe', ...((opts.extraFds as unknown[]) ?? [])] as SpawnOptions['stdio'];
  const child = spawn(file, args, { stdio, detached: true, env: opts.env ?? process.env, cwd: opts.cwd });
  const out = new Capture();
  const err = new Capture();
  child.stdout?.on('data', (c: Buffer) => out.push(c));
  child.stderr?.on('data', (c: Buffer) => err.push(c));
  child.stdin?.on('error', () => {});
  child.stdin?.end(opts.input ?? '');

  let timedOut = false;
  let aborted = false;
  const timer = opts.timeoutMs
    ? setTimeout(() => {
        timedOut = true;
        terminateGroup(child);
      }, opts.timeoutMs)
    : undefined;
  const onAbort = () => {
    aborted = true;
    terminateGroup(child);
  };
  opts.signal?.addEventListener('abort', onAbort, { once: true });

  try {
    const [exitCode, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve, reject) => {
      child.once('error', (e: NodeJS.ErrnoException) => {
        reject(
          new FerryError('PROGRAM_FAILED', `cannot run ${file}: ${e.code === 'ENOENT' ? 'not found' : e.message}`, {
            cause: e,
            hint: e.code === 'ENOENT' ? 'run scripts/bootstrap.sh to install what Ferry needs' : undefined,
          } as { cause: unknown; hint?: string }),
        );
      });
      child.once('close', (code, sig) => resolve([code, sig]));
    });
    const result: RunResult = {
      command,
      exitCode,
      signal,
      stdout: out.text(),
      stderr: err.text(),
      durationMs: performance.now() - started,
      timedOut,
    };
    if (aborted) throw abortError(opts.signal, command);
    if (timedOut) throw new FerryError('TIMEOUT', `${command} did not finish within ${opts.timeoutMs} ms`);
    if (exitCode !== 0 && opts.reject !== false) throw programError(result);
    return result;
  } finally {
    if (timer) clearTimeout(timer);
    opts.signal?.removeEventListener('abort', onAbort);
  }
}

export function programError(r: RunResult): FerryError {
  const why = r.signal ? `was killed by ${r.signal}` : `exited with code ${r.exitCode}`;
  const lines = lastLines(r.stderr || r.stdout, 5);
  const first = lines[lines.length - 1];
  return new FerryError('PROGRAM_FAILED', `${r.command} ${why}${first ? `: ${first}` : ''}`, { details: lines });
}

export function lastLines(text: string, n: number): string[] {
  return text
    .split('\n')
    .map((l) => l.trimEnd())
    .filter((l) => l.length > 0)
    .slice(-n);
}

export interface Program {
  child: ChildProcess;
  command: string;
  /** Resolves once the program ended: its exit code, or null when a signal ended it. */
  exited: Promise<number | null>;
  /** The last lines it wrote to stderr (when stderr is captured). */
  stderrTail(): string[];
  /** SIGTERM to its whole process group, SIGKILL after graceMs. */
  stop(graceMs?: number): void;
  /** SIGKILL to its whole process group now. */
  kill(): void;
}

/**
 * A program that runs alongside Ferry (a CRIU page server, a dump, an rsync server): its own
 * process group so it and its children end together, bounded capture of stderr, and one promise
 * for its end. run() is for programs Ferry waits on; this is for those it works beside.
 */
export function startProgram(file: string, args: readonly string[], opts: { env?: NodeJS.ProcessEnv; stdin?: 'pipe' | 'ignore'; stdout?: 'pipe' | 'ignore'; captureStderr?: boolean; fd3?: boolean } = {}): Program {
  // fd3: a Unix stream socket to the program as its fd 3 (child.stdio[3]).
  const stdio: StdioOptions = [opts.stdin ?? 'ignore', opts.stdout ?? 'ignore', opts.captureStderr === false ? 'ignore' : 'pipe', ...(opts.fd3 ? ['pipe' as const] : [])];
  const child: ChildProcess = spawn(file, args, { stdio, detached: true, env: opts.env ?? process.env });
  // Its exit ends the socket too ('close' waits for it): nothing it sent is wanted after that.
  if (opts.fd3) child.once('exit', () => setImmediate(() => (child.stdio[3] as Duplex | null)?.destroy()));
  const err = new Capture();
  child.stderr?.on('data', (c: Buffer) => err.push(c));
  child.stdin?.on('error', () => {}); // a program that exits early closes its stdin: seen on exit
  const exited = new Promise<number | null>((resolve) => {
    child.once('error', () => resolve(-1));
    child.once('close', (code) => resolve(code));
  });
  return {
    child,
    command: commandLine(file, args),
    exited,
    stderrTail: () => lastLines(err.text(), 5),
    stop: (graceMs = 500) => terminateGroup(child, graceMs),
    kill: () => {
      if (child.pid === undefined || child.exitCode !== null || child.signalCode !== null) return;
      try {
        process.kill(-child.pid, 'SIGKILL');
      } catch {
        child.kill('SIGKILL');
      }
    },
  };
}
