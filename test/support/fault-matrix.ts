// The fault matrix: every phase of a migration × every fault, each injected at exactly that phase
// (the agents stop at a fault point until the fault is in), on real hosts of a lab. For each cell:
// where the task runs afterwards, whether its memory is intact, and the pause it saw. The cells go
// to docs/fault-matrix.json and the table to docs/fault-matrix.md (the README shows it). The
// columns are split over several test files (test/migrate/faults-*.test.ts), each with its own lab,
// so that no one file runs for longer than the test runner allows a file.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { repoRoot } from '../../src/config.js';
import { run } from '../../src/exec/run.js';
import type { FaultPoint } from '../../src/migrate/fault-points.js';
import { checkBeats, parseBeats, sums } from './heartbeat.js';
import { CLI, waitFor, type TaskInfo } from './ferry.js';
import { Lab } from './lab.js';

const MIB = 96;
/** The long link cut; FERRY_FAULT_LONG_CUT_S shortens it for a quick local run. */
const LONG_CUT_S = Number(process.env['FERRY_FAULT_LONG_CUT_S'] ?? 60);
/** FERRY_FAULT_ONLY=PHASE[,PHASE] runs those columns only (for working on one). */
const ONLY = process.env['FERRY_FAULT_ONLY']?.split(',');

type Fault = 'source agent killed' | 'destination agent killed' | 'link down 2 s' | `link down ${number} s` | 'source CRIU killed' | 'destination CRIU killed' | 'destination disk full' | 'restore fails' | 'CLI killed';
const FAULTS: Fault[] = ['source agent killed', 'destination agent killed', 'link down 2 s', `link down ${LONG_CUT_S} s`, 'source CRIU killed', 'destination CRIU killed', 'destination disk full', 'restore fails', 'CLI killed'];
/** A phase, where its fault point is, and the mode that has it; in the table's order. */
const PHASES: Array<{ phase: FaultPoint; host: 'h1' | 'h2'; mode: 'stop-copy' | 'post-copy' | 'pre-copy' }> = [
  { phase: 'checks', host: 'h1', mode: 'stop-copy' },
  { phase: 'presync', host: 'h1', mode: 'stop-copy' },
  { phase: 'precopy', host: 'h1', mode: 'pre-copy' },
  { phase: 'freeze', host: 'h1', mode: 'stop-copy' },
  { phase: 'transfer', host: 'h1', mode: 'stop-copy' },
  { phase: 'restore', host: 'h2', mode: 'stop-copy' },
  { phase: 'commit', host: 'h1', mode: 'stop-copy' },
  { phase: 'resumed', host: 'h1', mode: 'pre-copy' },
  { phase: 'postcopy', host: 'h1', mode: 'post-copy' },
];

/** Cells where the fault has nothing to act on. */
function applies(phase: FaultPoint, fault: Fault): boolean {
  if (fault === 'restore fails') return phase === 'restore';
  if (fault === 'source CRIU killed') return ['freeze', 'transfer', 'restore', 'resumed', 'postcopy'].includes(phase);
  if (fault === 'destination CRIU killed') return ['freeze', 'restore', 'resumed', 'postcopy'].includes(phase);
  if (fault === 'destination disk full') return ['presync', 'precopy', 'freeze', 'transfer', 'restore'].includes(phase);
  return true;
}

/**
 * Post-copy after the resume, when an agent dies: CRIU's sockets of the pages link die with it, so
 * the pages cannot come (README, known limits). Ferry then keeps the task from running on with
 * missing memory, but cannot always keep it: these cells are reported, not required.
 */
function knownLimit(phase: FaultPoint, fault: Fault): boolean {
  return phase === 'postcopy' && fault.includes('agent killed');
}

export interface Cell {
  phase: FaultPoint;
  fault: Fault;
  where: string;
  /** undefined: not checked (not on one host); 'unreadable': the task blocks reading its memory. */
  intact: boolean | 'unreadable' | undefined;
  pauseS: number | undefined;
  settledS: number;
  cli: string;
  ok: boolean;
  known: boolean;
}
interface Stored extends Cell {
  /** When the cell ran (ISO time). */
  at: string;
}

/**
 * Folds a file's fresh cells into docs/fault-matrix.json (replacing the columns it ran) and
 * rewrites docs/fault-matrix.md from all of it.
 */
function writeTable(fresh: Cell[]): void {
  if (!fresh.length) return;
  const docs = join(repoRoot, 'docs');
  const jsonPath = join(docs, 'fault-matrix.json');
  let stored: Stored[] = [];
  try {
    stored = (JSON.parse(readFileSync(jsonPath, 'utf8')) as { cells: Stored[] }).cells;
  } catch {
    /* none yet, or unreadable: start over */
  }
  const ran = new Set(fresh.map((c) => c.phase));
  const at = new Date().toISOString();
  const all = [...stored.filter((c) => !ran.has(c.phase)), ...fresh.map((c) => ({ ...c, at }))];
  const phases = PHASES.map((p) => p.phase);
  const mark = (p: FaultPoint, f: Fault) => {
    const c = all.find((x) => x.phase === p && x.fault === f);
    if (!c) return applies(p, f) ? 'not run' : 'n/a';
    const pause = c.pauseS !== undefined ? `, pause ${c.pauseS.toFixed(1)} s` : '';
    if (c.ok) return `${c.where}, intact${pause}`;
    const mem = c.intact === false ? ', memory changed' : c.intact === 'unreadable' ? ', blocked on pages that never came' : '';
    return `**${c.where}${mem}**${pause}${c.known ? ' (known limit)' : ''}`;
  };
  const lines = [
    '| fault \\ phase | ' + phases.join(' | ') + ' |',
    '| --- | ' + phases.map(() => '---').join(' | ') + ' |',
    ...FAULTS.map((f) => `| ${f} | ` + phases.map((p) => mark(p, f)).join(' | ') + ' |'),
  ];
  const times = all.map((c) => c.at).sort();
  const okCount = all.filter((c) => c.ok).length;
  const text = `# Fault matrix\n\nGenerated by \`test/migrate/faults-*.test.ts\` (cells run from ${times[0]} to ${times[times.length - 1]}): a ${MIB} MiB heartbeat task moved h1 → h2 between two lab hosts (1 Gbit/s link), one fault per cell, injected when the agent reached the phase's fault point. Each cell: where the task runs once things settle (restarted agents included), whether its memory checksum is unchanged, and the largest pause the task saw. Phases up to commit run in stop-copy (precopy in pre-copy: the fault strikes while the rounds start), resumed in pre-copy (the task runs on h2, filled from what the rounds sent, and h1 has not yet ended its frozen copy), postcopy in post-copy mode. The cells themselves are in \`fault-matrix.json\`.\n\n${okCount} of ${all.length} cells end with the task running on exactly one host, memory intact.\n\n${lines.join('\n')}\n`;
  mkdirSync(docs, { recursive: true });
  writeFileSync(jsonPath, JSON.stringify({ cells: all }, null, 1) + '\n');
  writeFileSync(join(docs, 'fault-matrix.md'), text);
}

/**
 * The cells of the given phases (columns), on a lab of their own: a test per cell, the table
 * rewritten with them when the file's tests end.
 */
export function faultMatrix(phases: FaultPoint[], labName: string, subnet: number): void {
  const points = join('/var/tmp', `ferry-fault-points-${labName}`);
  const lab = new Lab(labName, subnet, 2, '1gbit', { FERRY_FAULT_POINTS: points });
  const cells: Cell[] = [];

  before(async () => {
    rmSync(points, { recursive: true, force: true });
    mkdirSync(points, { recursive: true });
    await lab.down();
    await lab.up();
  });

  after(async () => {
    await run('ip', ['link', 'set', lab.veth('h2'), 'up'], { reject: false }).catch(() => undefined);
    await lab.down();
    rmSync(points, { recursive: true, force: true });
    writeTable(cells);
  });

  /** What h1 kept of a task that is gone: how it ended and the end of CRIU's dump log. */
  function lostTaskClues(name: string): string {
    const dir = lab.taskDir('h1', name);
    if (!existsSync(dir)) return '';
    const exits = readdirSync(dir).filter((f) => /^exit-.*\.json$/.test(f)).map((f) => readFileSync(join(dir, f), 'utf8').trim());
    const log = existsSync(join(dir, 'migrate-dump.log')) ? readFileSync(join(dir, 'migrate-dump.log'), 'utf8').trim().split('\n').slice(-6).join(' | ') : '';
    return `; exit: ${exits.join(' ') || '-'}; CRIU's dump log ends: ${log || '-'}`;
  }

  async function journalDumpPid(): Promise<number | undefined> {
    const dir = join(lab.stateDir('h1'), 'migrations');
    for (const f of existsSync(dir) ? readdirSync(dir) : []) {
      try {
        const e = JSON.parse(readFileSync(join(dir, f), 'utf8')) as { dump?: { pid: number } };
        if (e.dump?.pid) return e.dump.pid;
      } catch {
        /* being written */
      }
    }
    return undefined;
  }

  /** criu processes running inside a lab host's network namespace. */
  async function criuOn(host: string, what?: RegExp): Promise<number[]> {
    const r = await run('ip', ['netns', 'pids', lab.netns(host)], { reject: false });
    const out: number[] = [];
    for (const p of r.stdout.split('\n').filter(Boolean).map(Number)) {
      try {
        const cmd = readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0');
        if (cmd[0]?.endsWith('/criu') && (!what || what.test(cmd.join(' ')))) out.push(p);
      } catch {
        /* gone */
      }
    }
    return out;
  }

  function kill(pid: number | undefined): void {
    if (!pid) return;
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  }

  async function hostState(h: string, name: string): Promise<string> {
    const r = await lab.ferry(['--host', h, 'ps', '--json'], 10_000);
    if (r.code !== 0) return 'unreachable';
    const t = (JSON.parse(r.stdout) as TaskInfo[]).find((x) => x.name === name);
    return t ? t.state : 'absent';
  }

  /** Waits until nothing is in flight: no journal on h1, no task frozen (a restored copy awaiting the decision is). */
  async function settle(name: string, limitMs: number): Promise<{ states: Record<string, string>; ms: number }> {
    const t0 = Date.now();
    let states: Record<string, string> = {};
    for (;;) {
      states = { h1: await hostState('h1', name), h2: await hostState('h2', name) };
      const journal = existsSync(join(lab.stateDir('h1'), 'migrations')) && readdirSync(join(lab.stateDir('h1'), 'migrations')).length > 0;
      const quiet = !journal && !Object.values(states).some((s) => s === 'frozen' || s === 'unreachable');
      if (quiet || Date.now() - t0 > limitMs) return { states, ms: Date.now() - t0 };
      await new Promise((r) => setTimeout(r, 250));
    }
  }

  for (const { phase, host, mode } of PHASES.filter((p) => phases.includes(p.phase))) {
    if (ONLY && !ONLY.includes(phase)) continue;
    for (const fault of FAULTS) {
      if (!applies(phase, fault)) continue;
      test(`fault: ${fault} at ${phase} (${mode})`, { timeout: 400_000 }, async (t) => {
        const name = `f-${phase}-${fault.split(' ').map((w) => w[0]).join('')}`.slice(0, 60);
        const point = `${host}.${phase}`;
        let cutUntil = 0;
        let diskFull = false;
        const h2Mnt = join(lab.dir, 'mntns', 'h2');
        let cli: ChildProcess | undefined;
        t.after(async () => {
          kill(cli?.pid);
          await run('ip', ['link', 'set', lab.veth('h2'), 'up'], { reject: false });
          rmSync(join(points, 'arm'), { force: true });
          await lab.up(); // agents a fault killed
          await lab.removeEverywhere(name);
          if (diskFull) await run('nsenter', [`--mount=${h2Mnt}`, 'umount', '-l', '/var/lib/ferry/tasks'], { reject: false });
        });
        for (const f of readdirSync(points)) rmSync(join(points, f), { force: true });
        const sum = await lab.startHeartbeat(name, MIB);
        if (fault === 'destination disk full') {
          // h2's task store on a file system of its own, filled up when the phase comes.
          await run('nsenter', [`--mount=${h2Mnt}`, 'mount', '-t', 'tmpfs', '-o', 'size=1g', 'ferry-full', '/var/lib/ferry/tasks']);
          diskFull = true;
        }
        const startBeats = parseBeats(lab.logOf('h1', name)).length;
        writeFileSync(join(points, 'arm'), point);
        let cliOut = '';
        cli = spawn(process.execPath, [CLI, '--cluster', lab.cluster, '--host', 'h1', 'migrate', name, '--to', 'h2', '--mode', mode], { stdio: ['ignore', 'pipe', 'pipe'] });
        cli.stdout!.on('data', (c: Buffer) => (cliOut += c));
        cli.stderr!.on('data', (c: Buffer) => (cliOut += c));
        const cliDone = new Promise<void>((r) => cli!.once('close', () => r()));
        await waitFor(`the fault point ${point}`, () => (existsSync(join(points, `${point}.reached`)) ? true : undefined), 120_000, 5);

        // ---- the fault, at exactly this phase -------------------------------------------------
        switch (fault) {
          case 'source agent killed':
            kill(lab.agentPid('h1'));
            break;
          case 'destination agent killed':
            kill(lab.agentPid('h2'));
            break;
          case 'source CRIU killed':
            kill(await journalDumpPid());
            break;
          case 'destination CRIU killed':
            if (phase !== 'restore') for (const p of await criuOn('h2')) kill(p);
            break;
          case 'destination disk full':
            await run('nsenter', [`--mount=${h2Mnt}`, 'dd', 'if=/dev/zero', 'of=/var/lib/ferry/tasks/.fill', 'bs=1M'], { reject: false });
            break;
          case 'restore fails':
            for (const f of readdirSync(join(lab.taskDir('h2', name), 'images')).filter((x) => x.startsWith('core-'))) writeFileSync(join(lab.taskDir('h2', name), 'images', f), 'corrupt');
            break;
          case 'CLI killed':
            kill(cli.pid);
            break;
          default: {
            const s = Number(/link down (\d+) s/.exec(fault)![1]);
            await run('ip', ['link', 'set', lab.veth('h2'), 'down']);
            cutUntil = Date.now() + s * 1000;
          }
        }
        writeFileSync(join(points, `${point}.go`), '');
        if (fault === 'destination CRIU killed' && phase === 'restore') {
          const p = await waitFor('criu restore on h2', async () => (await criuOn('h2', / restore /))[0], 20_000, 5).catch(() => undefined);
          kill(p);
        }
        // A killed agent comes back (as systemd would restart it) and finishes the job.
        if (fault.includes('agent killed')) {
          await new Promise((r) => setTimeout(r, 2000));
          await lab.up();
        }
        if (cutUntil) {
          await new Promise((r) => setTimeout(r, Math.max(0, cutUntil - Date.now())));
          await run('ip', ['link', 'set', lab.veth('h2'), 'up']);
        }
        // The wait's timer is cleared: left running, it kept the file's process alive for up to
        // 200 s after its last test, past the runner's limit for a file.
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([cliDone, new Promise((r) => (timer = setTimeout(r, 200_000)))]);
        clearTimeout(timer);
        const { states, ms } = await settle(name, 90_000);

        // ---- where the task is, and is it whole -------------------------------------------
        const running = Object.entries(states).filter(([, s]) => s === 'running').map(([h]) => h);
        const where = running.length === 1 ? `on ${running[0]}` : running.length === 0 ? `on no host (${JSON.stringify(states)})` : `on ${running.join(' and ')}`;
        let intact: boolean | 'unreadable' | undefined;
        let pauseS: number | undefined;
        if (running.length === 1) {
          const h = running[0]!;
          const info = (await lab.tasksOn(h)).find((x) => x.name === name)!;
          const before = sums(lab.logOf(h, name)).length;
          process.kill(info.pid!, 'SIGUSR1');
          const s = await waitFor('checksum', () => sums(lab.logOf(h, name))[before], 20_000).catch(() => undefined);
          const beats = parseBeats(lab.logOf(h, name));
          const c = checkBeats(beats, Math.min(startBeats, beats.length));
          // No checksum at all: reading its memory blocks (pages that never came).
          intact = s === undefined ? 'unreadable' : s === sum && c.seqErrors.length === 0 && c.monoBackwards === 0;
          pauseS = c.maxGapS;
        }
        const ok = running.length === 1 && intact === true;
        const known = knownLimit(phase, fault);
        const lastLine = cliOut.trim().split('\n').pop() ?? '';
        cells.push({ phase, fault, where, intact, pauseS, settledS: ms / 1000, cli: lastLine, ok, known });
        t.diagnostic(`${where}, memory ${intact === undefined ? 'unchecked' : intact === 'unreadable' ? 'UNREADABLE' : intact ? 'intact' : 'CHANGED'}, pause ${pauseS?.toFixed(2) ?? '-'} s, settled ${(ms / 1000).toFixed(1)} s; CLI: ${lastLine.slice(0, 200)}`);
        if (!known) {
          assert.equal(running.length, 1, `the task must run on exactly one host: ${JSON.stringify(states)}${running.length ? '' : lostTaskClues(name)}`);
          assert.equal(intact, true, 'memory and heartbeat must be intact');
          // The CLI ends by saying where the task runs (unless it was the one killed).
          if (fault !== 'CLI killed') assert.match(cliOut, /running on h[12]|the task is on h[12]|: h1 -> h2 /, cliOut);
        }
      });
    }
  }
}
