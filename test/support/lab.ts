// A lab of test hosts for migration tests: start it, run heartbeat tasks on its hosts, read
// their logs, check their memory, and remove everything, also when a test fails.
import assert from 'node:assert/strict';
import { cpSync, existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { checkBeats, parseBeats, readySum, sums } from './heartbeat.js';
import { WORKLOAD, runCli, waitFor, type CliResult, type TaskInfo } from './ferry.js';
import { treePids } from '../../src/util/proc.js';

export function comm(pid: number): string | undefined {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  } catch {
    return undefined;
  }
}

export class Lab {
  readonly dir: string;
  readonly cluster: string;

  constructor(
    readonly name: string,
    readonly subnet: number,
    readonly hosts = 2,
    readonly bandwidth?: string,
    readonly env: NodeJS.ProcessEnv = {},
    /** More `lab up` options (--with-controller, --host-memory). */
    readonly upArgs: string[] = [],
  ) {
    this.dir = join('/var/tmp', `ferry-lab-${name}`);
    this.cluster = join(this.dir, 'cluster.json');
  }

  addr(h: string): string {
    return `10.213.${this.subnet}.${h.slice(1)}`;
  }

  veth(h: string): string {
    return `fv-${this.name}-${h.slice(1)}`;
  }

  netns(h: string): string {
    return `ferry-${this.name}-${h}`;
  }

  async up(): Promise<void> {
    const r = await runCli(['lab', 'up', '--name', this.name, '--hosts', String(this.hosts), '--subnet', String(this.subnet), ...(this.bandwidth ? ['--bandwidth', this.bandwidth] : []), ...this.upArgs], this.env);
    assert.equal(r.code, 0, r.stderr);
  }

  async down(): Promise<void> {
    // FERRY_TEST_LOGS=<dir> keeps each host's agent log for a look after the run.
    const keep = process.env.FERRY_TEST_LOGS;
    if (keep) {
      const to = join(keep, `${this.name}-${Date.now()}`);
      mkdirSync(to, { recursive: true });
      for (let i = 1; i <= this.hosts; i++) {
        const log = join(this.dir, `h${i}`, 'agent.log');
        if (existsSync(log)) cpSync(log, join(to, `h${i}.log`));
      }
    }
    const r = await runCli(['lab', 'down', '--name', this.name]);
    assert.equal(r.code, 0, r.stderr);
  }

  agentPid(h: string): number {
    const lab = JSON.parse(readFileSync(join(this.dir, 'lab.json'), 'utf8')) as { hosts: Array<{ name: string; agentPid: number }> };
    return lab.hosts.find((x) => x.name === h)!.agentPid;
  }

  ferry(args: string[], timeoutMs?: number): Promise<CliResult> {
    return runCli(['--cluster', this.cluster, ...args], {}, timeoutMs);
  }

  async ok(args: string[]): Promise<string> {
    const r = await this.ferry(args);
    if (r.code !== 0) throw new Error(`ferry ${args.join(' ')} failed: ${r.stderr}${r.stdout}`);
    return r.stdout;
  }

  async tasksOn(host: string): Promise<TaskInfo[]> {
    return JSON.parse(await this.ok(['--host', host, 'ps', '--json'])) as TaskInfo[];
  }

  stateDir(host: string): string {
    return join(this.dir, host, 'state');
  }

  taskDir(host: string, name: string): string {
    return join(this.stateDir(host), 'tasks', name);
  }

  logOf(host: string, name: string): string {
    try {
      return readFileSync(join(this.taskDir(host, name), 'task.log'), 'utf8');
    } catch {
      return '';
    }
  }

  async removeEverywhere(name: string): Promise<void> {
    for (let i = 1; i <= this.hosts; i++) await this.ferry(['--host', `h${i}`, 'rm', '--force', name]);
  }

  /** A task holding MiB of checksummed memory that writes a heartbeat every 10 ms. */
  async startHeartbeat(name: string, mib: number, host = 'h1'): Promise<string> {
    await this.ok(['--host', host, 'run', '--name', name, '--', WORKLOAD, '--mib', String(mib)]);
    return this.heartbeatReady(host, name);
  }

  /** Waits until the workload task on host has checksummed its memory and beats; returns the sum. */
  async heartbeatReady(host: string, name: string): Promise<string> {
    const sum = await waitFor('workload ready', () => readySum(this.logOf(host, name)), 60_000);
    await waitFor('heartbeats', () => parseBeats(this.logOf(host, name)).length > 20 || undefined);
    return sum;
  }

  /** The task runs on host, keeps beating, its memory checksum is sum; returns its largest pause (s). */
  async assertIntact(host: string, name: string, sum: string): Promise<number> {
    const t = (await this.tasksOn(host)).find((x) => x.name === name);
    assert.ok(t, `task ${name} must be listed on ${host}`);
    assert.equal(t.state, 'running');
    const n = parseBeats(this.logOf(host, name)).length;
    await waitFor('heartbeats to continue', () => parseBeats(this.logOf(host, name)).length > n + 10 || undefined, 10_000);
    const before = sums(this.logOf(host, name)).length;
    // The workload itself, wherever it sits in the tree (a daemon's parent may ignore SIGUSR1).
    const workload = treePids(t.pid!).find((p) => comm(p) === 'ferry-workload') ?? t.pid!;
    process.kill(workload, 'SIGUSR1');
    const s = await waitFor('checksum', () => sums(this.logOf(host, name))[before]);
    assert.equal(s, sum, 'memory checksum changed');
    const c = checkBeats(parseBeats(this.logOf(host, name)));
    assert.deepEqual(c.seqErrors, []);
    assert.equal(c.monoBackwards, 0, 'CLOCK_MONOTONIC went backwards');
    return c.maxGapS;
  }
}

/** A failed command's stderr is one line naming what happened. */
export function oneLine(r: CliResult, re: RegExp): void {
  assert.notEqual(r.code, 0);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.match(r.stderr, re);
}
