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

export async function runService(o: ServiceOptions): Promise<ServiceResult[]> {
  const ferry = (args: string[]) => run(process.execPath, [o.cli, '--cluster', o.lab.cluster, ...args], { timeoutMs: 300_000 });
  const out: ServiceResult[] = [];
  for (const mode of MODES) {
    const r: ServiceResult = { mode, runs: 0, errors: [], broken: 0, wrong: 0 };
    const blackout: number[] = [];
    const client: number[] = [];
    const total: number[] = [];
    for (let i = 0; i < o.runs; i++) {
      const name = `svc-${mode}-${i}`;
      try {
        await ferry(['--host', 'h1', 'run', '--name', name, '--net', '--', 'redis-server', '--daemonize', 'yes', '--port', String(PORT), '--bind', '0.0.0.0', '--protected-mode', 'no', '--save', '', '--appendonly', 'no', '--logfile', '']);
        const tasks = JSON.parse((await ferry(['--host', 'h1', 'ps', '--json'])).stdout) as Array<{ name: string; address: string | null }>;
        const address = tasks.find((t) => t.name === name)?.address;
        if (!address) throw new Error('the task has no address');
        const cli = (args: string[], input?: string) => run('redis-cli', ['-h', address, '-p', String(PORT), ...args], { timeoutMs: 60_000, ...(input ? { input } : {}) });
        for (let t = 0; (await cli(['PING']).catch(() => undefined))?.stdout.trim() !== 'PONG'; t++) {
          if (t > 100) throw new Error('redis did not answer');
          await sleep(100);
        }
        // Values of 1 KiB: dataMiB of them.
        const value = 'x'.repeat(1024);
        const n = o.dataMiB * 1024;
        let resp = '';
        for (let k = 0; k < n; k++) resp += `*3\r\n$3\r\nSET\r\n$${String(k).length + 2}\r\nk:${k}\r\n$1024\r\n${value}\r\n`;
        await cli(['--pipe'], resp);
        const c = spawn('ip', ['netns', 'exec', o.lab.hosts[1]!.netns, process.execPath, CLIENT, 'redis', address, String(PORT), '2'], { stdio: ['ignore', 'pipe', 'ignore'] });
        let text = '';
        c.stdout.on('data', (d: Buffer) => (text += d));
        await sleep(1000);
        const rep = JSON.parse((await ferry(['--host', 'h1', 'migrate', name, '--to', 'h2', '--mode', mode, '--json'])).stdout) as { blackoutMs: number; totalMs: number };
        await sleep(1000);
        c.kill('SIGTERM');
        await new Promise((res) => c.once('close', res));
        const seen = JSON.parse(text.trim().split('\n').pop() ?? '{}') as { maxWaitMs?: number; broke?: string; wrong?: number };
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
