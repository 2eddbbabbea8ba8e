// `npm run demo`: three test hosts joined by 1 Gbit/s links and a cluster controller; a workload
// with a few hundred MiB of memory moves h1 -> h2 (stop-copy), back (post-copy) and over again
// (auto: pre-copy rounds while it runs) while its heartbeat goes on; then the controller places
// two more tasks and drains h2, moving everything off it by live migration.
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
const indent = (text: string) => text.replace(/^(?=.)/gm, '  ');
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
  console.log('Starting a lab of three hosts (network namespaces h1, h2, h3) with 1 Gbit/s links and a controller...');
  spawnSync(process.execPath, [cli, 'lab', 'down', '--name', LAB]);
  ferry('lab', 'up', '--name', LAB, '--hosts', '3', '--bandwidth', '1gbit', '--subnet', SUBNET, '--with-controller', '--host-memory', '1GiB');
  console.log(`  the dashboard, while the demo runs: http://127.0.0.1:${7480 + Number(SUBNET)}/`);
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

  // The controller's part: it adopted the demo task; two more are submitted, then h2 is drained.
  console.log('The controller places two more tasks (priority 1 and 10)...');
  for (const [name, prio, mem, mib] of [['batch', '1', '300MiB', '64'], ['web', '10', '300MiB', '32']] as const) {
    process.stdout.write('  ' + ferry('submit', '--name', name, '--priority', prio, '--memory', mem, '--', workload, '--mib', mib));
  }
  process.stdout.write(indent(ferry('hosts')));
  const before = legs.at(-1)![1];
  const startIdx = beats(before).length;
  console.log('Draining h2, as before a kernel upgrade: every task moves off it by live migration...');
  process.stdout.write(indent(ferry('drain', 'h2')));
  process.stdout.write(indent(ferry('hosts')));
  const last = (JSON.parse(ferry('resolve', 'demo', '--json')) as { host: string }).host;
  await sleep(1000);
  // The task's log moves with it, so the index before the drain holds on its new host too.
  const drainPause = pauseSince(last, startIdx);
  console.log(`  the demo task is on ${last} now; it saw a ${(drainPause * 1000).toFixed(0)} ms pause in the drain`);
  results.push(`drain     ${before} -> ${last} (auto, by the controller): task-observed pause ${(drainPause * 1000).toFixed(0)} ms`);

  const seq = beats(last).map((b) => b[1]);
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
