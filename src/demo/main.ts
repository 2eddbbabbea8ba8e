// `npm run demo`: a running workload is checkpointed and restored, and shows its state survived.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../config.js';

const cli = join(repoRoot, 'dist', 'src', 'cli', 'main.js');
const workload = join(repoRoot, 'build', 'native', 'ferry-workload');
const stateDir = mkdtempSync(join(tmpdir(), 'ferry-demo-'));

function ferry(...args: string[]): string {
  const r = spawnSync(process.execPath, [cli, '--state-dir', stateDir, ...args], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`ferry ${args.join(' ')}: ${r.stderr.trim()}`);
  return r.stdout;
}
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const beats = () => readFileSync(join(stateDir, 'tasks', 'demo', 'task.log'), 'utf8').split('\n').filter((l) => l.startsWith('hb '));
const last = () => beats().at(-1)?.split(' ')[1];

try {
  console.log('Starting a 256 MiB workload that writes a heartbeat every 10 ms...');
  ferry('run', '--name', 'demo', '--', workload, '--mib', '256');
  await sleep(1500);
  console.log(`  heartbeat #${last()}`);
  const cp = JSON.parse(ferry('checkpoint', 'demo', '--json'));
  console.log(`Checkpointed in ${cp.checkpoint.durationMs} ms (${cp.checkpoint.stats?.pagesWritten} pages); the task is stopped.`);
  const before = last();
  await sleep(1000);
  console.log(`  one second later the heartbeat is still #${last()}`);
  const r = JSON.parse(ferry('restore', 'demo', '--json'));
  console.log(`Restored as pid ${r.pid} in ${r.checkpoint.restore.durationMs} ms.`);
  await sleep(500);
  const all = beats().map((l) => Number(l.split(' ')[1]));
  const gaps = all.slice(1).filter((s, i) => s !== all[i]! + 1).length;
  console.log(`  heartbeat went on from #${before} to #${last()}, ${gaps === 0 ? 'with no gap or repeat' : `with ${gaps} breaks in the sequence`}.`);
  process.exitCode = gaps === 0 ? 0 : 1;
} catch (e) {
  console.error(`demo failed: ${(e as Error).message}`);
  process.exitCode = 1;
} finally {
  spawnSync(process.execPath, [cli, '--state-dir', stateDir, 'rm', '--force', 'demo']);
  rmSync(stateDir, { recursive: true, force: true });
}
