// Test support: run the real `ferry` CLI against a private state directory and clean up every
// task it started, also when a test fails.
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { connect, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../../src/config.js';

export const CLI = join(repoRoot, 'dist', 'src', 'cli', 'main.js');
export const NATIVE = join(repoRoot, 'build', 'native');
export const WORKLOAD = join(NATIVE, 'ferry-workload');
export const SOCKETS = join(NATIVE, 'ferry-sockets');

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function runCli(args: string[], env: NodeJS.ProcessEnv = {}, timeoutMs = 120_000): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c));
    child.stderr.on('data', (c: Buffer) => (stderr += c));
    const t = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(t);
      resolve({ code: code ?? -1, stdout, stderr });
    });
  });
}

/** A private Ferry state directory whose tasks are all killed and removed by cleanup(). */
export class TestHost {
  readonly stateDir = mkdtempSync(join(tmpdir(), 'ferry-test-'));
  constructor(readonly env: NodeJS.ProcessEnv = {}) {}

  cli(args: string[], env: NodeJS.ProcessEnv = {}): Promise<CliResult> {
    return runCli(['--state-dir', this.stateDir, ...args], { ...this.env, ...env });
  }

  async ok(args: string[], env: NodeJS.ProcessEnv = {}): Promise<string> {
    const r = await this.cli(args, env);
    if (r.code !== 0) throw new Error(`ferry ${args.join(' ')} failed (${r.code}): ${r.stderr}${r.stdout}`);
    return r.stdout;
  }

  async json<T = Record<string, unknown>>(args: string[]): Promise<T> {
    return JSON.parse(await this.ok([...args, '--json'])) as T;
  }

  async task(name: string): Promise<TaskInfo> {
    const all = await this.json<TaskInfo[]>(['ps']);
    const t = all.find((x) => x.name === name);
    if (!t) throw new Error(`no task ${name}`);
    return t;
  }

  logPath(name: string): string {
    return join(this.stateDir, 'tasks', name, 'task.log');
  }

  log(name: string): string {
    try {
      return readFileSync(this.logPath(name), 'utf8');
    } catch {
      return '';
    }
  }

  async cleanup(): Promise<void> {
    const r = await this.cli(['ps', '--json']);
    if (r.code === 0) {
      for (const t of JSON.parse(r.stdout) as TaskInfo[]) {
        // Stops (by its PID) and removes each task this test started.
        const rmr = await this.cli(['rm', '--force', t.name]);
        if (rmr.code !== 0 && t.pid) {
          try {
            process.kill(t.pid, 'SIGKILL');
          } catch {
            /* gone */
          }
        }
      }
    }
    await rm(this.stateDir, { recursive: true, force: true, maxRetries: 5 });
  }
}

export interface TaskInfo {
  name: string;
  state: string;
  status: string;
  pid: number | null;
  mainPid?: number | null;
  processes?: number | null;
  incarnation: number;
  command: string[];
  exit: { exitCode?: number; signal?: string } | null;
}

export async function waitFor<T>(what: string, fn: () => T | undefined | Promise<T | undefined>, timeoutMs = 20_000, everyMs = 50): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined && v !== false) return v as T;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/**
 * Waits until a task's command has exited and left its daemon behind: the command is the child of
 * the task's init (pid initPid) until then, the daemon after. The command must outlive this call's
 * start (the tests' commands sleep 1 s after forking the daemon).
 */
export async function commandExited(initPid: number): Promise<void> {
  const children = () => readFileSync(`/proc/${initPid}/task/${initPid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean);
  const [command] = children();
  await waitFor('the command to exit', () => (children().length > 0 && !children().includes(command!) ? true : undefined));
}

export function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, host, () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

/** One line to a ferry-sockets task, its answer back. */
export function ask(host: string, port: number, line: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = connect({ port, host }, () => s.write(line + '\n'));
    let data = '';
    s.setTimeout(5000, () => s.destroy(new Error('timeout')));
    s.on('data', (c) => (data += c));
    s.on('end', () => resolve(data.trim()));
    s.on('error', reject);
  });
}
