// `npm run bench`: every contender moves the same workload over the same link in one run;
// medians of repeated runs go to bench/results/ as JSON, a Markdown table and an SVG chart.
import { Command, CommanderError } from 'commander';
import { cpus, totalmem } from 'node:os';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadConfig, repoRoot } from '../config.js';
import { FerryError } from '../errors.js';
import { run } from '../exec/run.js';
import { labDown, labUp } from '../lab/lab.js';
import { CONTENDERS, type RunMetrics, type Workload } from './contenders.js';
import { renderMarkdown, renderSvg, summarize, type BenchResult } from './report.js';
import { runScale } from './scale.js';
import { DEFAULT_SIM, renderSimulation, simulate } from '../cluster/simulate.js';
import { renderService, renderSoak, runService, runServiceSoak, type ServiceResult } from './service.js';

interface Options {
  scale: boolean;
  simulate: boolean;
  quick: boolean;
  bandwidth: string;
  sizes: number[];
  dirtyRates: number[];
  patterns: Workload['pattern'][];
  runs: number;
  out: string;
  only?: string[];
  subnet: number;
  service: boolean;
  serviceMiB: number;
  soak: number;
}

function parse(argv: string[]): Options {
  const list = (v: string) => v.split(',').map((x) => {
    const n = Number(x.trim());
    if (!Number.isFinite(n) || n < 0) throw new FerryError('USAGE', `not a number: '${x}'`);
    return n;
  });
  const p = new Command('bench')
    .option('--bandwidth <rate>', 'link rate between the two hosts (tc tbf)', '1gbit')
    .option('--sizes <MiB,...>', 'workload sizes', '256,1024')
    .option('--dirty-rates <MiB/s,...>', 'page dirtying rates', '0,16,64,256')
    .option('--patterns <p,...>', 'uniform (writes at random), hot (90 % of writes to 10 % of memory), scan (uniform, and reads all memory in order)', 'uniform,hot,scan')
    .option('--runs <n>', 'runs per contender and workload (medians are reported)', '3')
    .option('--quick', 'one size (256 MiB), one dirty rate (16 MiB/s), one run')
    .option('--only <names>', 'comma-separated contender name fragments')
    .option('--out <dir>', 'where to write the results', join(repoRoot, 'bench', 'results'))
    .option('--subnet <n>', 'lab subnet (10.213.N.0/24)', '98')
    .option('--no-service', 'skip the service benchmark (redis with a connected client, per Ferry mode)')
    .option('--service-mib <n>', 'data loaded into redis for the service benchmark', '64')
    .option('--service-soak <n>', 'instead: one connected redis migrated n times back and forth (auto mode); counts resets', '0')
    .option('--simulate', 'instead: the cluster placement and drain code over 1,000 simulated hosts and 100,000 tasks (drain a host, a rack, a rolling upgrade)')
    .option('--scale', 'instead: how migrations scale with threads, files and processes, concurrent migrations, many tasks, and a soak checked for leaks')
    .exitOverride()
    .parse(argv, { from: 'user' });
  const o = p.opts<{ bandwidth: string; sizes: string; dirtyRates: string; patterns: string; runs: string; quick?: boolean; out: string; only?: string; subnet: string; scale?: boolean; simulate?: boolean; service: boolean; serviceMib: string; serviceSoak: string }>();
  const soak = Number(o.serviceSoak);
  if (!Number.isInteger(soak) || soak < 0 || soak > 100_000) throw new FerryError('USAGE', `--service-soak takes a number of migrations, got '${o.serviceSoak}'`);
  const serviceMiB = Number(o.serviceMib);
  if (!Number.isInteger(serviceMiB) || serviceMiB < 1 || serviceMiB > 65_536) throw new FerryError('USAGE', `--service-mib takes a whole number of MiB, got '${o.serviceMib}'`);
  return {
    scale: !!o.scale,
    simulate: !!o.simulate,
    quick: !!o.quick,
    bandwidth: o.bandwidth,
    sizes: o.quick ? [256] : list(o.sizes),
    dirtyRates: o.quick ? [16] : list(o.dirtyRates),
    patterns: o.quick
      ? ['uniform']
      : o.patterns.split(',').map((x) => {
          const v = x.trim();
          if (v !== 'uniform' && v !== 'hot' && v !== 'scan') throw new FerryError('USAGE', `unknown pattern '${v}': use uniform, hot or scan`);
          return v;
        }),
    runs: o.quick ? 1 : Math.max(1, Math.floor(Number(o.runs))),
    out: o.out,
    ...(o.only ? { only: o.only.split(',') } : {}),
    subnet: Number(o.subnet),
    service: o.service,
    serviceMiB: o.quick ? 16 : serviceMiB,
    soak,
  };
}

async function main(): Promise<void> {
  const o = parse(process.argv.slice(2));
  const cfg = loadConfig();
  const say = (s: string) => process.stdout.write(s + '\n');
  if (o.scale) return runScale({ quick: o.quick, out: o.out, subnet: o.subnet, say });
  if (o.simulate) {
    const r = simulate(DEFAULT_SIM);
    const md = renderSimulation(r);
    await mkdir(o.out, { recursive: true });
    await writeFile(join(o.out, 'simulate.json'), JSON.stringify(r, null, 2) + '\n');
    await writeFile(join(o.out, 'simulate.md'), md);
    say(md);
    return;
  }
  if (o.soak) return soakOnly(o, say);
  const contenders = CONTENDERS.filter((c) => !o.only || o.only.some((f) => c.name.includes(f)));
  const results: BenchResult[] = [];
  let service: ServiceResult[] = [];
  const skipped: Array<{ contender: string; reason: string }> = [];
  for (const c of contenders) {
    const why = await c.unavailable();
    if (why) {
      skipped.push({ contender: c.name, reason: why });
      say(`skip ${c.name}: ${why}`);
    }
  }
  const runnable = contenders.filter((c) => !skipped.some((s) => s.contender === c.name));
  const labName = 'bench';
  await labDown(labName);
  say(`lab: two hosts, links shaped to ${o.bandwidth}`);
  const lab = await labUp({ name: labName, hosts: 2, bandwidth: o.bandwidth, subnet: o.subnet });
  const workDir = join(lab.dir, 'work');
  const ctx = { lab, criu: cfg.criu, workDir, cli: join(repoRoot, 'dist', 'src', 'cli', 'main.js') };
  try {
    for (const mib of o.sizes) {
      for (const dirty of o.dirtyRates) {
       for (const pattern of o.patterns) {
        // Pattern does not matter without writes, except for the scanner.
        if (dirty === 0 && pattern === 'hot') continue;
        const w: Workload = { mib, dirtyMiBps: dirty, pattern };
        for (const c of runnable) {
          const runs: RunMetrics[] = [];
          const errors: string[] = [];
          for (let i = 0; i < o.runs; i++) {
            try {
              const m = await c.run(ctx, w, `${mib}-${dirty}-${pattern}-${i}`);
              runs.push(m);
              say(`${c.name.padEnd(38)} ${String(mib).padStart(5)} MiB ${String(dirty).padStart(3)} MiB/s run ${i + 1}: pause ${m.pauseMs} ms, total ${m.totalMs} ms, wire ${(m.wireBytes / 2 ** 20).toFixed(0)} MiB`);
            } catch (e) {
              // A program's last lines of output say why it failed; its last one alone may be a note.
              const msg = e instanceof FerryError && e.details.length > 1 ? `${e.message.split('\n')[0]!} [${e.details.join(' | ')}]` : e instanceof Error ? e.message.split('\n')[0]! : String(e);
              errors.push(msg);
              say(`${c.name} ${mib} MiB ${dirty} MiB/s run ${i + 1} failed: ${msg}`);
            }
          }
          results.push(summarize(c.name, w, runs, errors));
        }
       }
      }
    }
    if (o.service) service = await runService({ lab, cli: ctx.cli, runs: o.runs, dataMiB: o.serviceMiB, say });
  } finally {
    for (const c of runnable) await c.teardown?.();
    await rm(workDir, { recursive: true, force: true });
    await labDown(labName);
  }
  const kernel = (await run('uname', ['-r'])).stdout.trim();
  const criuVersion = (await run(cfg.criu, ['--version'], { reject: false })).stdout.match(/Version: (\S+)/)?.[1] ?? 'unknown';
  const meta = {
    date: new Date().toISOString(),
    machine: `${cpus().length} cores (${cpus()[0]?.model ?? 'unknown CPU'}), ${Math.round(totalmem() / 2 ** 30)} GiB, kernel ${kernel}, CRIU ${criuVersion}`,
    link: `two network namespaces on one machine, veth through a bridge, shaped with tc tbf to ${o.bandwidth}`,
    runs: o.runs,
  };
  await mkdir(o.out, { recursive: true });
  const markdown = renderMarkdown(meta, results, skipped) + (service.length ? '\n' + renderService(service, o.serviceMiB) : '');
  await writeFile(join(o.out, 'latest.json'), JSON.stringify({ meta, results, skipped, service }, null, 2) + '\n');
  await writeFile(join(o.out, 'latest.md'), markdown);
  await writeFile(join(o.out, 'latest.svg'), renderSvg(meta, results));
  say(`\nwrote ${join(o.out, 'latest.json')}, latest.md and latest.svg`);
  process.stdout.write('\n' + markdown);
}

/** --service-soak: its own lab, its own result file. */
async function soakOnly(o: Options, say: (s: string) => void): Promise<void> {
  await labDown('bench');
  const lab = await labUp({ name: 'bench', hosts: 2, bandwidth: o.bandwidth, subnet: o.subnet });
  try {
    const r = await runServiceSoak({ lab, cli: join(repoRoot, 'dist', 'src', 'cli', 'main.js'), runs: 1, dataMiB: o.serviceMiB, say, migrations: o.soak, mode: 'auto' });
    const md = renderSoak(r, 'auto', o.serviceMiB);
    await mkdir(o.out, { recursive: true });
    await writeFile(join(o.out, 'soak.json'), JSON.stringify({ date: new Date().toISOString(), ...r }, null, 2) + '\n');
    await writeFile(join(o.out, 'soak.md'), md);
    process.stdout.write('\n' + md);
  } finally {
    await labDown('bench');
  }
}

main()
  .catch((e: unknown) => {
    if (e instanceof CommanderError) {
      process.exitCode = e.exitCode === 0 ? 0 : 2;
      return;
    }
    process.stderr.write(`bench: ${e instanceof FerryError ? `${e.message}${e.hint ? ` (${e.hint})` : ''}` : (e as Error).stack}\n`);
    process.exitCode = 1;
  })
  // The results are written and the lab is down: end here. A full run (every contender, every
  // workload) once stayed idle after its table with nothing left to do but a handle libuv kept.
  .finally(() => process.exit());
