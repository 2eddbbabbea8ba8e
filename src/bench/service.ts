// The service benchmark: redis with data and a connected client, moved by each Ferry mode. It
// reports the pause the client saw (its longest wait for an answer) next to the blackout the
// task had (freeze to resume), and whether the connection survived.
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { run } from '../exec/run.js';
import type { LabState } from '../lab/lab.js';
import { repoRoot } from '../config.js';
import { sleep } from '../util/proc.js';
import { stat, type Stat } from './report.js';

const MODES = ['stop-copy', 'post-copy', 'pre-copy', 'auto'] as const;
const PORT = 6390;
const CLIENT = join(repoRoot, 'dist', 'src', 'bench', 'service-client.js');

export interface ServiceResult {
  mode: string;
  runs: number;
  errors: string[];
  /** Freeze to resume, as Ferry measured it for the task. */
  blackoutMs?: Stat;
  /** The client's longest wait for an answer around the migration. */
  clientPauseMs?: Stat;
  totalMs?: Stat;
  /** Runs whose client connection broke (reset or closed). */
  broken: number;
  /** Answers that were not the next number (a lost or repeated request). */
  wrong: number;
}

export interface ServiceOptions {
  lab: LabState;
  cli: string;
  runs: number;
  /** MiB of data loaded into redis before each move. */
  dataMiB: number;
  say: (s: string) => void;
}

type Ferry = (args: string[]) => Promise<{ stdout: string }>;

/** redis on h1 with its own address and dataMiB of 1 KiB values; returns the address. */
async function startRedis(ferry: Ferry, name: string, dataMiB: number): Promise<string> {
  await ferry(['--host', 'h1', 'run', '--name', name, '--net', '--', 'redis-server', '--daemonize', 'yes', '--port', String(PORT), '--bind', '0.0.0.0', '--protected-mode', 'no', '--save', '', '--appendonly', 'no', '--logfile', '']);
  const tasks = JSON.parse((await ferry(['--host', 'h1', 'ps', '--json'])).stdout) as Array<{ name: string; address: string | null }>;
  const address = tasks.find((t) => t.name === name)?.address;
  if (!address) throw new Error('the task has no address');
  const cli = (args: string[], input?: string) => run('redis-cli', ['-h', address, '-p', String(PORT), ...args], { timeoutMs: 60_000, ...(input ? { input } : {}) });
  for (let t = 0; (await cli(['PING']).catch(() => undefined))?.stdout.trim() !== 'PONG'; t++) {
    if (t > 100) throw new Error('redis did not answer');
    await sleep(100);
  }
  const value = 'x'.repeat(1024);
  let resp = '';
  for (let k = 0; k < dataMiB * 1024; k++) resp += `*3\r\n$3\r\nSET\r\n$${String(k).length + 2}\r\nk:${k}\r\n$1024\r\n${value}\r\n`;
  await cli(['--pipe'], resp);
  return address;
}

/** The redis client on h2; finish() stops it and returns what it saw. */
function redisClient(lab: LabState, address: string): { answering: () => Promise<void>; finish: () => Promise<{ maxWaitMs?: number; broke?: string; wrong?: number; answers?: number }> } {
  const c = spawn('ip', ['netns', 'exec', lab.hosts[1]!.netns, process.execPath, CLIENT, 'redis', address, String(PORT), '2'], { stdio: ['ignore', 'pipe', 'ignore'] });
  let text = '';
  c.stdout.on('data', (d: Buffer) => (text += d));
  return {
    // Its first answer came: a client still connecting when the move began saw no pause at all
    // (it reported a longest wait of 0 ms, once, in a full test run on a busy machine).
    answering: async () => {
      const until = Date.now() + 15_000;
      while (!/^answered$/m.test(text)) {
        if (Date.now() > until || c.exitCode !== null) {
          c.kill('SIGTERM');
          throw new Error(`the client got no answer from redis at ${address} within 15 s`);
        }
        await sleep(50);
      }
    },
    finish: async () => {
      c.kill('SIGTERM');
      await new Promise((res) => c.once('close', res));
      return JSON.parse(text.trim().split('\n').pop() ?? '{}') as { maxWaitMs?: number; broke?: string; wrong?: number; answers?: number };
    },
  };
}

export interface SoakResult {
  migrations: number;
  failedMigrations: number;
  answers: number;
  broke: string;
  wrong: number;
  maxWaitMs: number;
  blackoutMs?: Stat;
}

/** One redis and one client; the task goes back and forth n times. */
export async function runServiceSoak(o: ServiceOptions & { migrations: number; mode: string }): Promise<SoakResult> {
  const ferry: Ferry = (args) => run(process.execPath, [o.cli, '--cluster', o.lab.cluster, ...args], { timeoutMs: 300_000 });
  const name = 'svc-soak';
  const blackouts: number[] = [];
  let failed = 0;
  try {
    const address = await startRedis(ferry, name, o.dataMiB);
    const c = redisClient(o.lab, address);
    await c.answering();
    await sleep(1000);
    let at = 'h1';
    for (let i = 0; i < o.migrations; i++) {
      const to = at === 'h1' ? 'h2' : 'h1';
      try {
        const rep = JSON.parse((await ferry(['--host', at, 'migrate', name, '--to', to, '--mode', o.mode, '--json'])).stdout) as { blackoutMs: number };
        blackouts.push(rep.blackoutMs);
        at = to;
      } catch (e) {
        failed++;
        o.say(`soak migration ${i + 1} failed: ${e instanceof Error ? e.message.split('\n')[0] : String(e)}`);
      }
      if ((i + 1) % 10 === 0) o.say(`soak: ${i + 1} of ${o.migrations} migrations`);
      await sleep(200);
    }
    const seen = await c.finish();
    return { migrations: o.migrations, failedMigrations: failed, answers: seen.answers ?? 0, broke: seen.broke ?? '', wrong: seen.wrong ?? 0, maxWaitMs: seen.maxWaitMs ?? 0, ...(stat(blackouts) ? { blackoutMs: stat(blackouts)! } : {}) };
  } finally {
    for (const h of ['h1', 'h2']) await ferry(['--host', h, 'rm', '--force', name]).catch(() => undefined);
  }
}

export async function runService(o: ServiceOptions): Promise<ServiceResult[]> {
  const ferry: Ferry = (args) => run(process.execPath, [o.cli, '--cluster', o.lab.cluster, ...args], { timeoutMs: 300_000 });
  const out: ServiceResult[] = [];
  for (const mode of MODES) {
    const r: ServiceResult = { mode, runs: 0, errors: [], broken: 0, wrong: 0 };
    const blackout: number[] = [];
    const client: number[] = [];
    const total: number[] = [];
    for (let i = 0; i < o.runs; i++) {
      const name = `svc-${mode}-${i}`;
      try {
        const address = await startRedis(ferry, name, o.dataMiB);
        const c = redisClient(o.lab, address);
        await c.answering();
        await sleep(1000);
        const rep = JSON.parse((await ferry(['--host', 'h1', 'migrate', name, '--to', 'h2', '--mode', mode, '--json'])).stdout) as { blackoutMs: number; totalMs: number };
        await sleep(1000);
        const seen = await c.finish();
        if (seen.maxWaitMs === undefined) throw new Error('the client reported nothing');
        blackout.push(rep.blackoutMs);
        total.push(rep.totalMs);
        client.push(seen.maxWaitMs);
        if (seen.broke) r.broken++;
        r.wrong += seen.wrong ?? 0;
        r.runs++;
        o.say(`${`service redis, ferry ${mode}`.padEnd(38)} run ${i + 1}: blackout ${rep.blackoutMs} ms, client waited at most ${seen.maxWaitMs} ms${seen.broke ? `, connection broke: ${seen.broke}` : ''}`);
      } catch (e) {
        const msg = e instanceof Error ? e.message.split('\n')[0]! : String(e);
        r.errors.push(msg);
        o.say(`service redis, ferry ${mode} run ${i + 1} failed: ${msg}`);
      } finally {
        for (const h of ['h1', 'h2']) await ferry(['--host', h, 'rm', '--force', name]).catch(() => undefined);
      }
    }
    const put = <K extends 'blackoutMs' | 'clientPauseMs' | 'totalMs'>(k: K, v: number[]) => {
      const s = stat(v);
      if (s) r[k] = s;
    };
    put('blackoutMs', blackout);
    put('clientPauseMs', client);
    put('totalMs', total);
    out.push(r);
  }
  return out;
}

const fmt = (s: Stat | undefined, unit = '') => (s ? (s.min === s.max ? `${s.median}${unit}` : `${s.median}${unit} (${s.min}–${s.max})`) : '–');

export function renderService(results: ServiceResult[], dataMiB: number): string {
  const lines = [
    `### A service with a connected client: redis (${dataMiB} MiB of data, daemonized, \`--net\`), a client on another host sending INCR every 2 ms over one connection`,
    '',
    '| mode | blackout (task: freeze to resume) | longest wait the client saw | total | connections broken | wrong answers |',
    '| --- | --- | --- | --- | --- | --- |',
  ];
  for (const r of results) {
    if (r.runs === 0) lines.push(`| ferry ${r.mode} | failed: ${r.errors[0] ?? 'no run'} | | | | |`);
    else lines.push(`| ferry ${r.mode} | ${fmt(r.blackoutMs, ' ms')} | ${fmt(r.clientPauseMs, ' ms')} | ${fmt(r.totalMs, ' ms')} | ${r.broken} of ${r.runs} | ${r.wrong} |`);
  }
  lines.push('', 'Where the client waited longer than the blackout, a request it sent while the task was frozen was dropped by the lock and went again on its TCP retransmission timer (200 ms, doubling).', '');
  return lines.join('\n');
}

export function renderSoak(r: SoakResult, mode: string, dataMiB: number): string {
  return [
    `### Soak: one redis (${dataMiB} MiB) and one connected client, ${r.migrations} migrations back and forth with ferry ${mode}`,
    '',
    `${r.migrations - r.failedMigrations} of ${r.migrations} migrations done; the client's connection ${r.broke ? `broke (${r.broke})` : 'never broke'}; ${r.answers} answers, ${r.wrong} wrong; longest wait ${r.maxWaitMs} ms; blackout ${fmt(r.blackoutMs, ' ms')}.`,
    '',
  ].join('\n');
}
