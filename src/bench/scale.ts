// `npm run bench -- --scale`: how Ferry's migrations grow with a task's threads, open files and
// processes (in every mode, with the slope of the pause), several migrations at once among three
// hosts, many tasks on one host, and a soak of back-and-forth migrations checked for leaks of
// descriptors, processes, files, firewall rules and agent memory. Measured, never asserted.
import { readFileSync, readdirSync, type Dirent } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { repoRoot } from '../config.js';
import { run } from '../exec/run.js';
import { labDown, labScratch, labUp, type LabState } from '../lab/lab.js';
import { sleep, waitUntil } from '../util/proc.js';
import { checkBeats, parseBeats, readySum } from './heartbeat.js';

const CLI = join(repoRoot, 'dist', 'src', 'cli', 'main.js');
const WORKLOAD = join(repoRoot, 'build', 'native', 'ferry-workload');
const MODES = ['stop-copy', 'post-copy', 'auto'] as const;

interface Point {
  dimension: string;
  count: number;
  mode: string;
  ok: boolean;
  pauseMs?: number;
  blackoutMs?: number;
  totalMs?: number;
  error?: string;
}

export interface ScaleOptions {
  quick: boolean;
  out: string;
  subnet: number;
  say: (s: string) => void;
}

export async function runScale(o: ScaleOptions): Promise<void> {
  const name = 'scale';
  await labDown(name);
  const lab = await labUp({ name, hosts: 3, subnet: o.subnet });
  const cluster = lab.cluster;
  const ferry = async (args: string[], timeoutMs = 300_000) => run(process.execPath, [CLI, '--cluster', cluster, ...args], { timeoutMs, reject: false });
  const logOf = (h: string, t: string) => {
    try {
      return readFileSync(join(lab.dir, h, 'state', 'tasks', t, 'task.log'), 'utf8');
    } catch {
      return '';
    }
  };
  const start = async (h: string, t: string, args: string[]) => {
    const r = await ferry(['--host', h, 'run', '--name', t, '--', WORKLOAD, ...args]);
    if (r.exitCode !== 0) throw new Error(r.stderr.trim());
    await waitUntil(() => !!readySum(logOf(h, t)) && parseBeats(logOf(h, t)).length >= 20, 30_000, 50);
  };
  const migrate = async (from: string, to: string, t: string, mode: string): Promise<{ ok: boolean; blackoutMs?: number; totalMs?: number; error?: string }> => {
    const r = await ferry(['--host', from, 'migrate', t, '--to', to, '--mode', mode, '--json']);
    try {
      const rep = JSON.parse(r.stdout) as { ok?: boolean; blackoutMs?: number; totalMs?: number; error?: { message: string } };
      if (rep.error) return { ok: false, error: rep.error.message };
      return { ok: !!rep.ok, ...(rep.blackoutMs !== undefined ? { blackoutMs: rep.blackoutMs } : {}), ...(rep.totalMs !== undefined ? { totalMs: rep.totalMs } : {}) };
    } catch {
      return { ok: false, error: (r.stderr || r.stdout).trim().split('\n').pop() ?? 'no answer' };
    }
  };
  const pauseOf = (h: string, t: string, fromBeat: number) => {
    const beats = parseBeats(logOf(h, t));
    return Math.round(checkBeats(beats, Math.min(fromBeat, beats.length)).maxGapS * 1000);
  };
  const rm = (t: string) => Promise.all(lab.hosts.map((h) => ferry(['--host', h.name, 'rm', '--force', t])));

  const points: Point[] = [];
  const dims: Array<{ dimension: string; flag: string; counts: number[] }> = o.quick
    ? [
        { dimension: 'threads', flag: '--threads', counts: [1, 200] },
        { dimension: 'open files', flag: '--files', counts: [0, 2000] },
        { dimension: 'processes', flag: '--procs', counts: [1, 20] },
      ]
    : [
        { dimension: 'threads', flag: '--threads', counts: [1, 250, 500, 1000] },
        { dimension: 'open files', flag: '--files', counts: [0, 2500, 5000, 10000] },
        { dimension: 'processes', flag: '--procs', counts: [1, 25, 50, 100] },
      ];
  try {
    // ---- pause against threads, files, processes ------------------------------------------
    for (const d of dims) {
      for (const count of d.counts) {
        for (const mode of MODES) {
          const t = `sc-${d.flag.slice(2)}-${count}-${mode[0]}`;
          try {
            await start('h1', t, ['--mib', '16', d.flag, String(count)]);
            const before = parseBeats(logOf('h1', t)).length;
            const m = await migrate('h1', 'h2', t, mode);
            const p: Point = { dimension: d.dimension, count, mode, ...m, ...(m.ok ? { pauseMs: pauseOf('h2', t, before) } : {}) };
            points.push(p);
            o.say(`${d.dimension.padEnd(10)} ${String(count).padStart(6)} ${mode.padEnd(9)}: ${m.ok ? `pause ${p.pauseMs} ms, blackout ${m.blackoutMs} ms, total ${m.totalMs} ms` : `failed: ${m.error}`}`);
          } catch (e) {
            points.push({ dimension: d.dimension, count, mode, ok: false, error: (e as Error).message });
            o.say(`${d.dimension} ${count} ${mode}: failed: ${(e as Error).message}`);
          } finally {
            await rm(t);
          }
        }
      }
    }

    // ---- several migrations at once among three hosts ----------------------------------------
    const concurrent = o.quick ? 3 : 8;
    const tasks = Array.from({ length: concurrent }, (_, i) => ({ t: `cc-${i}`, from: `h${(i % 3) + 1}`, to: `h${((i + 1) % 3) + 1}` }));
    await Promise.all(tasks.map((x) => start(x.from, x.t, ['--mib', '64'])));
    const beforeBeats = tasks.map((x) => parseBeats(logOf(x.from, x.t)).length);
    const c0 = performance.now();
    const cres = await Promise.all(tasks.map((x, i) => migrate(x.from, x.to, x.t, MODES[i % MODES.length]!)));
    const concurrentMs = Math.round(performance.now() - c0);
    const cPauses = tasks.map((x, i) => (cres[i]!.ok ? pauseOf(x.to, x.t, beforeBeats[i]!) : undefined)).filter((x): x is number => x !== undefined);
    await Promise.all(tasks.map((x) => rm(x.t)));
    o.say(`${concurrent} concurrent migrations: ${cres.filter((r) => r.ok).length} ok in ${concurrentMs} ms, pauses ${cPauses.join(', ')} ms`);

    // ---- many tasks on one host -------------------------------------------------------------
    const many = o.quick ? 10 : 50;
    const m0 = performance.now();
    for (let i = 0; i < many; i++) await start('h1', `many-${i}`, ['--mib', '4']);
    const startMs = Math.round(performance.now() - m0);
    const p0 = performance.now();
    await ferry(['--host', 'h1', 'ps', '--json']);
    const psMs = Math.round(performance.now() - p0);
    const mm0 = performance.now();
    let manyOk = 0;
    for (let i = 0; i < many; i += 4) {
      const batch = Array.from({ length: Math.min(4, many - i) }, (_, k) => `many-${i + k}`);
      manyOk += (await Promise.all(batch.map((t) => migrate('h1', 'h2', t, 'auto')))).filter((r) => r.ok).length;
    }
    const drainMs = Math.round(performance.now() - mm0);
    for (let i = 0; i < many; i++) await rm(`many-${i}`);
    o.say(`${many} tasks on one host: started in ${startMs} ms, ps in ${psMs} ms, all moved (4 at a time) in ${drainMs} ms, ${manyOk} ok`);

    // ---- soak: back and forth, looking for leaks ----------------------------------------------
    const rounds = o.quick ? 10 : 200;
    await start('h1', 'soak', ['--mib', '16']);
    // Warm up once each way so lazily made things (listeners, caches) are not counted as leaks.
    await migrate('h1', 'h2', 'soak', 'stop-copy');
    await migrate('h2', 'h1', 'soak', 'post-copy');
    await migrate('h1', 'h2', 'soak', 'auto');
    await migrate('h2', 'h1', 'soak', 'auto');
    const before = await resources(lab);
    let soakOk = 0;
    const soakPauses: number[] = [];
    for (let i = 0; i < rounds; i++) {
      const from = i % 2 ? 'h2' : 'h1';
      const to = i % 2 ? 'h1' : 'h2';
      const b = parseBeats(logOf(from, 'soak')).length;
      const r = await migrate(from, to, 'soak', MODES[Math.floor(i / 2) % MODES.length]!);
      if (r.ok) {
        soakOk++;
        soakPauses.push(pauseOf(to, 'soak', b));
      } else o.say(`soak round ${i}: ${r.error}`);
    }
    await sleep(2000);
    const afterRes = await resources(lab);
    await rm('soak');
    o.say(`soak: ${soakOk}/${rounds} ok; before ${JSON.stringify(before)}; after ${JSON.stringify(afterRes)}`);

    const slopes = dims.flatMap((d) =>
      MODES.map((mode) => {
        const pts = points.filter((p) => p.dimension === d.dimension && p.mode === mode && p.ok && p.pauseMs !== undefined);
        return { dimension: d.dimension, mode, msPer1000: slope(pts.map((p) => [p.count, p.pauseMs!])) * 1000, points: pts.length };
      }),
    );
    const result = {
      date: new Date().toISOString(),
      points,
      slopes,
      concurrent: { migrations: concurrent, ok: cres.filter((r) => r.ok).length, wallMs: concurrentMs, pausesMs: cPauses, errors: cres.filter((r) => !r.ok).map((r) => r.error) },
      manyTasks: { tasks: many, startMs, psMs, movedMs: drainMs, ok: manyOk },
      soak: { rounds, ok: soakOk, medianPauseMs: median(soakPauses), maxPauseMs: Math.max(0, ...soakPauses), before, after: afterRes },
    };
    await mkdir(o.out, { recursive: true });
    await writeFile(join(o.out, 'scale.json'), JSON.stringify(result, null, 2) + '\n');
    await writeFile(join(o.out, 'scale.md'), renderScale(result));
    o.say(`\nwrote ${join(o.out, 'scale.json')} and scale.md\n`);
    process.stdout.write(renderScale(result));
  } finally {
    await labDown(name);
  }
}

interface Resources {
  agentFds: number;
  agentRssMiB: number;
  labProcesses: number;
  stateFiles: number;
  firewallRules: number;
  criuProcesses: number;
}

/** What a leak would show: the agents' descriptors and memory, processes, files, firewall rules. */
async function resources(lab: LabState): Promise<Resources> {
  let fds = 0;
  let rss = 0;
  let procs = 0;
  let files = 0;
  for (const h of lab.hosts) {
    const pid = h.agentPid!;
    // The lab starts the agent through nsenter, which execs it: the pid is the agent's own.
    fds += readdirSync(`/proc/${pid}/fd`).length;
    rss += Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0) / 1024;
    procs += (await run('ip', ['netns', 'pids', h.netns], { reject: false })).stdout.split('\n').filter(Boolean).length;
    files += countFiles(join(h.dir, 'state')) + countFiles(join(labScratch(lab.dir), h.name));
  }
  const rules = ((await run('nft', ['list', 'ruleset'], { reject: false }).catch(() => undefined))?.stdout ?? '').split('\n').filter((l) => /drop|CRIU/i.test(l)).length + ((await run('iptables-save', [], { reject: false }).catch(() => undefined))?.stdout ?? '').split('\n').filter((l) => /DROP|CRIU/.test(l)).length;
  const criu = (await run('pgrep', ['-x', 'criu'], { reject: false })).stdout.split('\n').filter(Boolean).length;
  return { agentFds: fds, agentRssMiB: Math.round(rss), labProcesses: procs, stateFiles: files, firewallRules: rules, criuProcesses: criu };
}

function countFiles(dir: string): number {
  let n = 0;
  let entries: Dirent[] = [];
  try {
    entries = readdirSync(dir, { withFileTypes: true });
  } catch {
    return 0; // a scratch directory made only once needed
  }
  for (const e of entries) {
    if (e.name === 'history.jsonl') continue; // grows by design, one line a migration
    n += e.isDirectory() ? countFiles(join(dir, e.name)) : 1;
  }
  return n;
}

/** Least-squares slope of y over x. */
function slope(xy: Array<[number, number]>): number {
  if (xy.length < 2) return NaN;
  const mx = xy.reduce((a, [x]) => a + x, 0) / xy.length;
  const my = xy.reduce((a, [, y]) => a + y, 0) / xy.length;
  const num = xy.reduce((a, [x, y]) => a + (x - mx) * (y - my), 0);
  const den = xy.reduce((a, [x]) => a + (x - mx) ** 2, 0);
  return den ? num / den : NaN;
}

function median(xs: number[]): number | undefined {
  if (!xs.length) return undefined;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

function renderScale(r: {
  date: string;
  points: Point[];
  slopes: Array<{ dimension: string; mode: string; msPer1000: number }>;
  concurrent: { migrations: number; ok: number; wallMs: number; pausesMs: number[]; errors: Array<string | undefined> };
  manyTasks: { tasks: number; startMs: number; psMs: number; movedMs: number; ok: number };
  soak: { rounds: number; ok: number; medianPauseMs: number | undefined; maxPauseMs: number; before: Resources; after: Resources };
}): string {
  const rows = r.points.map((p) => `| ${p.dimension} | ${p.count} | ${p.mode} | ${p.ok ? `${p.pauseMs} ms` : `failed: ${p.error}`} | ${p.blackoutMs ?? '-'} | ${p.totalMs ?? '-'} |`);
  const slopes = r.slopes.map((s) => `| ${s.dimension} | ${s.mode} | ${Number.isFinite(s.msPer1000) ? s.msPer1000.toFixed(0) : '-'} |`);
  const keys = Object.keys(r.soak.before) as Array<keyof Resources>;
  return [
    `# Scale and load (${r.date})`,
    '',
    'Three lab hosts on one 2-core machine, unshaped links; a 16 MiB heartbeat task with the given number of threads, open files (/dev/null) or processes, moved h1 → h2 once per point. Pause: the largest gap between the task\'s own heartbeats.',
    '',
    '| dimension | count | mode | pause the task saw | blackout (ms) | total (ms) |',
    '| --- | --- | --- | --- | --- | --- |',
    ...rows,
    '',
    '| dimension | mode | pause slope (ms per 1000) |',
    '| --- | --- | --- |',
    ...slopes,
    '',
    `**${r.concurrent.migrations} migrations at once** among three hosts (64 MiB tasks, stop-copy, post-copy and auto in turn): ${r.concurrent.ok} ok in ${r.concurrent.wallMs} ms; pauses ${r.concurrent.pausesMs.join(', ')} ms.${r.concurrent.errors.length ? ` Failures: ${r.concurrent.errors.join('; ')}` : ''}`,
    '',
    `**${r.manyTasks.tasks} tasks on one host**: started one after another in ${r.manyTasks.startMs} ms, \`ferry ps\` in ${r.manyTasks.psMs} ms, all moved to another host by auto, four at a time, in ${r.manyTasks.movedMs} ms (${r.manyTasks.ok} ok).`,
    '',
    `**Soak**: ${r.soak.rounds} migrations back and forth (stop-copy, post-copy and auto, two of each in turn), ${r.soak.ok} ok, median pause ${r.soak.medianPauseMs} ms, largest ${r.soak.maxPauseMs} ms.`,
    '',
    '| resource | before | after |',
    '| --- | --- | --- |',
    ...keys.map((k) => `| ${k} | ${r.soak.before[k]} | ${r.soak.after[k]} |`),
    '',
  ].join('\n');
}
