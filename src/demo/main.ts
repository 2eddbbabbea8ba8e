// `npm run demo`: two test hosts joined by a 1 Gbit/s link; a workload with a few hundred MiB
// of memory moves h1 -> h2 (stop-copy), back (post-copy) and over again (auto: pre-copy rounds
// while it runs) while its heartbeat goes on.
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { repoRoot } from '../config.js';

const LAB = 'demo';
const SUBNET = '99';
const cli = join(repoRoot, 'dist', 'src', 'cli', 'main.js');
const workload = join(repoRoot, 'build', 'native', 'ferry-workload');
const labDir = join('/var/tmp', `ferry-lab-${LAB}`);
const cluster = join(labDir, 'cluster.json');

function ferry(...args: string[]): string {
  const r = spawnSync(process.execPath, [cli, '--cluster', cluster, ...args], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`ferry ${args.join(' ')}: ${r.stderr.trim()}`);
  return r.stdout;
}
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const beats = (host: string) => {
  try {
    return readFileSync(join(labDir, host, 'state', 'tasks', 'demo', 'task.log'), 'utf8')
      .split('\n')
      .filter((l) => l.startsWith('hb '))
      .map((l) => l.split(' ').map(Number) as [unknown, number, number, number]);
  } catch {
    return [];
  }
};
const lastSeq = (host: string) => beats(host).at(-1)?.[1];

/** Largest wall-clock gap between heartbeats after index `from`: the pause the task saw. */
function pauseSince(host: string, from: number): number {
  const b = beats(host);
  let gap = 0;
  for (let i = Math.max(from, 1); i < b.length; i++) gap = Math.max(gap, (b[i]![3] - b[i - 1]![3]) / 1e9);
  return gap;
}

try {
  console.log('Starting a lab of two hosts (network namespaces h1, h2) with 1 Gbit/s links...');
  spawnSync(process.execPath, [cli, 'lab', 'down', '--name', LAB]);
  ferry('lab', 'up', '--name', LAB, '--hosts', '2', '--bandwidth', '1gbit', '--subnet', SUBNET);
  console.log('Starting a 256 MiB workload on h1 that writes 16 MiB/s of its memory and a heartbeat every 10 ms...');
  ferry('--host', 'h1', 'run', '--name', 'demo', '--', workload, '--mib', '256', '--dirty', '16');
  await sleep(2000);
  console.log(`  h1: heartbeat #${lastSeq('h1')}`);
  const results: string[] = [];
  const legs = [['h1', 'h2', 'stop-copy'], ['h2', 'h1', 'post-copy'], ['h1', 'h2', 'auto']] as const;
  for (const [from, to, mode] of legs) {
    const startIdx = beats(from).length;
    console.log(`Migrating h${from.slice(1)} -> ${to} (${mode})...`);
    const r = JSON.parse(ferry('--host', from, 'migrate', 'demo', '--to', to, '--mode', mode, '--json'));
    await sleep(1000);
    const pause = pauseSince(to, startIdx);
    console.log(`  ${to}: heartbeat #${lastSeq(to)} and counting; the task saw a ${pause.toFixed(3)} s pause`);
    console.log(`  blackout ${r.blackoutMs} ms, total ${r.totalMs} ms, ${(r.bytes.pages / 2 ** 20).toFixed(0)} MiB of pages at ${r.pageRateMBps} MB/s` + (r.postCopyWindowMs !== undefined ? `, all pages local ${r.postCopyWindowMs} ms after resume` : ''));
    if (r.precopy) console.log(`  pre-copy: ${r.precopy.rounds.length} rounds while it ran (${r.precopy.rounds.map((x: { bytes: number }) => `${(x.bytes / 2 ** 20).toFixed(0)} MiB`).join(', ')}), ${(r.precopy.finalBytes / 2 ** 20).toFixed(1)} MiB while frozen`);
    results.push(`${mode.padEnd(9)} ${from} -> ${to}: blackout ${r.blackoutMs} ms, task-observed pause ${(pause * 1000).toFixed(0)} ms`);
  }
  const seq = beats(legs.at(-1)![1]).map((b) => b[1]);
  const breaks = seq.slice(1).filter((s, i) => s !== seq[i]! + 1).length;
  console.log(`\nThe heartbeat ran from #0 to #${seq.at(-1)} across every move ${breaks === 0 ? 'with no gap or repeat' : `with ${breaks} breaks`}.`);
  for (const l of results) console.log(`  ${l}`);
  process.exitCode = breaks === 0 ? 0 : 1;
} catch (e) {
  console.error(`demo failed: ${(e as Error).message}`);
  process.exitCode = 1;
} finally {
  spawnSync(process.execPath, [cli, 'lab', 'down', '--name', LAB]);
}
