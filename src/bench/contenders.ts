// The contenders of `npm run bench`, each moving the same workload from h1 to h2 of a lab:
// the plain scheme and raw CRIU with plain commands (none of Ferry's code), and Ferry's modes.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { chmod, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { repoRoot } from '../config.js';
import { FerryError } from '../errors.js';
import { run } from '../exec/run.js';
import type { LabState } from '../lab/lab.js';
import { sleep } from '../util/proc.js';
import { beatRate, checkBeats, parseBeats, readySum } from './heartbeat.js';

export interface Workload {
  mib: number;
  dirtyMiBps: number;
  /** How the writes spread: at random, or 90 % to 10 % of memory; scan: also reads all memory in order. */
  pattern: 'uniform' | 'hot' | 'scan';
}

/** ferry-workload's options for a workload. */
export function workloadArgs(w: Workload): string[] {
  return ['--mib', String(w.mib), '--dirty', String(w.dirtyMiBps), '--pattern', w.pattern === 'hot' ? 'hot' : 'uniform', '--scan', w.pattern === 'scan' ? '1' : '0'];
}

export interface RunMetrics {
  /** Largest wall-clock gap between heartbeats around the migration. */
  pauseMs: number;
  /** From the first command until the task runs on h2 with all its memory local. */
  totalMs: number;
  /** Bytes h1 sent on its link during the run (interface counters). */
  wireBytes: number;
  /** Bytes the tool itself reports having moved, where it reports any. */
  reportedBytes?: number;
  peakDiskSrcMiB: number;
  peakDiskDstMiB: number;
  /** Post-copy: resume until all pages were local, and the heartbeat rate then vs before. */
  postCopyWindowMs?: number;
  postCopyRateRatio?: number;
  /** Pre-copy: rounds run, and the heartbeat rate while they ran vs before. */
  rounds?: number;
  roundsRateRatio?: number;
}

export interface Contender {
  name: string;
  /** Why it cannot run here, or undefined. */
  unavailable(): Promise<string | undefined>;
  run(ctx: BenchContext, w: Workload, tag: string): Promise<RunMetrics>;
  /** Removes what the contender kept between runs (an image). */
  teardown?(): Promise<void>;
}

export interface BenchContext {
  lab: LabState;
  criu: string;
  workDir: string;
  cli: string;
}

const WORKLOAD = join(repoRoot, 'build', 'native', 'ferry-workload');

const h = (ctx: BenchContext, i: 1 | 2) => ctx.lab.hosts[i - 1]!;

async function txBytes(ctx: BenchContext): Promise<number> {
  const r = await run('ip', ['-n', h(ctx, 1).netns, '-s', '-j', 'link', 'show', 'eth0']);
  const j = JSON.parse(r.stdout) as Array<{ stats64?: { tx?: { bytes?: number } } }>;
  return j[0]?.stats64?.tx?.bytes ?? 0;
}

function dirBytes(dir: string): number {
  let total = 0;
  let entries: import('node:fs').Dirent[];
  try {
    entries = readdirSync(dir, { withFileTypes: true });
  } catch {
    return 0;
  }
  for (const e of entries) {
    const p = join(dir, e.name);
    try {
      if (e.isDirectory()) total += dirBytes(p);
      else if (e.isFile()) total += statSync(p).blocks * 512;
    } catch {
      /* removed meanwhile */
    }
  }
  return total;
}

/** Samples the disk used under the source's and destination's directories while a run goes. */
class DiskSampler {
  src = 0;
  dst = 0;
  private readonly timer: NodeJS.Timeout;
  constructor(private readonly srcDirs: string[], private readonly dstDirs: string[]) {
    const base = { s: this.sum(srcDirs), d: this.sum(dstDirs) };
    this.timer = setInterval(() => {
      this.src = Math.max(this.src, this.sum(this.srcDirs) - base.s);
      this.dst = Math.max(this.dst, this.sum(this.dstDirs) - base.d);
    }, 100);
  }
  private sum(dirs: string[]): number {
    return dirs.reduce((a, d) => a + dirBytes(d), 0);
  }
  stop(): { src: number; dst: number } {
    clearInterval(this.timer);
    return { src: Math.round(this.src / 2 ** 20), dst: Math.round(this.dst / 2 ** 20) };
  }
}

async function waitFor<T>(what: string, fn: () => T | undefined, timeoutMs = 120_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = fn();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new FerryError('TIMEOUT', `benchmark: timed out waiting for ${what}`);
    await sleep(20);
  }
}

const readText = (p: string) => {
  try {
    return readFileSync(p, 'utf8');
  } catch {
    return '';
  }
};

/**
 * The task's own view of a move: the largest gap between its heartbeats after `fromBeat` (the
 * pause it saw: the freeze, or a stall after the resume if that was longer), and its normal
 * heartbeat rate, over up to 2 s before the move began at `startedS`.
 */
function pauseAfter(log: string, fromBeat: number, startedS: number): { pauseMs: number; normalRate: number; beats: ReturnType<typeof parseBeats> } {
  const beats = parseBeats(log);
  const c = checkBeats(beats, fromBeat);
  const since = Math.max(beats[0]?.real ?? startedS, startedS - 2);
  return { pauseMs: Math.round(c.maxGapS * 1000), normalRate: beatRate(beats, since, startedS), beats };
}

// ---- plain commands ------------------------------------------------------------------------------

/** A task started with plain tools: own PID, UTS, IPC and time namespaces, output to a file. */
async function startPlainTask(ctx: BenchContext, w: Workload, dir: string): Promise<{ pid: number; log: string; parent: ChildProcess }> {
  await mkdir(dir, { recursive: true });
  const log = join(dir, 'hb.log');
  const parent = spawn(
    'ip',
    ['netns', 'exec', h(ctx, 1).netns, 'unshare', '--pid', '--uts', '--ipc', '--time', '--fork', 'setsid', 'sh', '-c', `exec ${WORKLOAD} ${workloadArgs(w).join(' ')} >>${log} 2>&1 </dev/null`],
    { stdio: 'ignore', detached: true },
  );
  parent.unref();
  const pid = await waitFor('the plain task', () => {
    try {
      const kids = readFileSync(`/proc/${parent.pid}/task/${parent.pid}/children`, 'utf8').trim();
      return kids ? Number(kids.split(' ')[0]) : undefined;
    } catch {
      return undefined;
    }
  });
  await waitFor('the workload to fill its memory', () => readySum(readText(log)), 180_000);
  await waitFor('heartbeats', () => (parseBeats(readText(log)).length > 100 ? true : undefined));
  return { pid, log, parent };
}

/** criu in the task's own mount and network namespaces (see PLATFORM.md). */
function criuAt(ctx: BenchContext, pid: number, args: string[]): Promise<unknown> {
  return run('nsenter', ['-t', String(pid), '-m', '-n', ctx.criu, ...args], { timeoutMs: 600_000 });
}

/** tar over one TCP stream from h1 to h2, with plain nc. */
async function copyDir(ctx: BenchContext, src: string, dst: string, port: number): Promise<void> {
  await mkdir(dst, { recursive: true });
  const addr = h(ctx, 2).address;
  const recv = run('ip', ['netns', 'exec', h(ctx, 2).netns, 'sh', '-c', `nc -l ${addr} ${port} | tar -C ${dst} -xf -`], { timeoutMs: 600_000 });
  await sleep(100);
  await run('ip', ['netns', 'exec', h(ctx, 1).netns, 'sh', '-c', `tar -C ${src} -cf - . | nc -N ${addr} ${port}`], { timeoutMs: 600_000 });
  await recv;
}

async function restoreOnH2(ctx: BenchContext, dst: string, lazy = false): Promise<number> {
  await run('ip', ['netns', 'exec', h(ctx, 2).netns, ctx.criu, 'restore', '-d', '-D', dst, '-o', 'restore.log', '--tcp-close', '--file-locks', '--pidfile', join(dst, 'restored.pid'), ...(lazy ? ['--lazy-pages'] : [])], { timeoutMs: 600_000 });
  return Number((await readFile(join(dst, 'restored.pid'), 'utf8')).trim());
}

function killPid(pid: number | undefined): void {
  if (!pid) return;
  try {
    process.kill(pid, 'SIGKILL'); // the benchmark's own task
  } catch {
    /* gone */
  }
}

async function plainRun(ctx: BenchContext, w: Workload, tag: string, variant: 'plain' | 'page-server' | 'lazy'): Promise<RunMetrics> {
  const dir = join(ctx.workDir, `${variant}-${tag}`);
  const src = join(dir, 'src');
  const dst = join(dir, 'dst');
  await mkdir(src, { recursive: true });
  await mkdir(dst, { recursive: true });
  const port = 7600 + Math.floor(Math.random() * 300);
  const task = await startPlainTask(ctx, w, dir);
  const fromBeat = parseBeats(readText(task.log)).length;
  let restored: number | undefined;
  const disk = new DiskSampler([src], [dst]);
  try {
    const tx0 = await txBytes(ctx);
    const t0 = performance.now();
    const startedS = Date.now() / 1000;
    let windowMs: number | undefined;
    let resumedS = 0;
    // The source task stays (stopped) until the restore is over, as it must for a rollback and
    // as Ferry keeps it. The lab's hosts share one kernel: a source that CRIU ends at the dump
    // hands its 1 GiB, still backed by the VM's host, to the restore a moment later, which two
    // real hosts never do. Measured (1 GiB, idle, 3 runs each): page-server paused 10.2 s
    // with the source ended, 13.0 s with it kept, the restore's time mostly the kernel zeroing
    // memory the hypervisor had to back anew (perf: clear_page_erms).
    if (variant === 'plain') {
      await criuAt(ctx, task.pid, ['dump', '-t', String(task.pid), '-D', src, '-o', 'dump.log', '--tcp-close', '--file-locks', '--leave-stopped']);
      await copyDir(ctx, src, dst, port);
      restored = await restoreOnH2(ctx, dst);
    } else if (variant === 'page-server') {
      const ps = run('ip', ['netns', 'exec', h(ctx, 2).netns, ctx.criu, 'page-server', '-D', dst, '--address', h(ctx, 2).address, '--port', String(port)], { timeoutMs: 600_000 });
      await sleep(200);
      await criuAt(ctx, task.pid, ['dump', '-t', String(task.pid), '-D', src, '-o', 'dump.log', '--tcp-close', '--file-locks', '--leave-stopped', '--page-server', '--address', h(ctx, 2).address, '--port', String(port)]);
      await ps;
      await copyDir(ctx, src, dst, port + 1);
      restored = await restoreOnH2(ctx, dst);
    } else {
      const script = join(dir, 'ready.sh');
      await writeFile(script, `#!/bin/sh\n[ "$CRTOOLS_SCRIPT_ACTION" = status-ready ] && touch ${join(dir, 'ready')}\nexit 0\n`);
      await chmod(script, 0o755);
      const dump = criuAt(ctx, task.pid, ['dump', '-t', String(task.pid), '-D', src, '-o', 'dump.log', '--tcp-close', '--file-locks', '--lazy-pages', '--address', h(ctx, 1).address, '--port', String(port), '--action-script', script]);
      dump.catch(() => undefined);
      await waitFor('criu to serve lazy pages', () => (existsSync(join(dir, 'ready')) ? true : undefined));
      await copyDir(ctx, src, dst, port + 1);
      const daemon = run('ip', ['netns', 'exec', h(ctx, 2).netns, ctx.criu, 'lazy-pages', '--page-server', '--address', h(ctx, 1).address, '--port', String(port), '-D', dst, '-o', 'lazy-pages.log'], { timeoutMs: 600_000 });
      daemon.catch(() => undefined);
      await waitFor('the lazy-pages socket', () => (existsSync(join(dst, 'lazy-pages.socket')) ? true : undefined), 30_000);
      restored = await restoreOnH2(ctx, dst, true);
      const resumed = performance.now();
      resumedS = Date.now() / 1000;
      await daemon;
      await dump;
      windowMs = Math.round(performance.now() - resumed);
    }
    const totalMs = Math.round(performance.now() - t0);
    const wireBytes = (await txBytes(ctx)) - tx0;
    await sleep(300);
    const p = pauseAfter(readText(task.log), fromBeat, startedS);
    const d = disk.stop();
    const m: RunMetrics = { pauseMs: p.pauseMs, totalMs, wireBytes, peakDiskSrcMiB: d.src, peakDiskDstMiB: d.dst };
    if (windowMs !== undefined) {
      m.postCopyWindowMs = windowMs;
      m.postCopyRateRatio = ratio(beatRate(p.beats, resumedS, resumedS + windowMs / 1000), p.normalRate);
    }
    return m;
  } finally {
    disk.stop();
    killPid(restored);
    killPid(task.pid);
    killPid(task.parent.pid);
    await rm(dir, { recursive: true, force: true });
  }
}

const ratio = (a: number, b: number) => (b > 0 ? Math.round((a / b) * 100) / 100 : 0);

// ---- Ferry ---------------------------------------------------------------------------------------

/** The fill's length (ms after the resume) from a destination agent's `lazy pages served` event. */
function fillOf(agentLog: string, id: string): number | undefined {
  const line = readText(agentLog).split('\n').find((l) => l.includes('"lazy pages served"') && l.includes(`"id":"${id}"`));
  if (!line) return undefined;
  const e = JSON.parse(line.slice(line.indexOf('{'))) as { fillMs?: number };
  return e.fillMs ?? -1;
}

async function ferryRun(ctx: BenchContext, w: Workload, tag: string, mode: 'stop-copy' | 'post-copy' | 'pre-copy' | 'auto', extra: string[] = []): Promise<RunMetrics> {
  const name = `bench-${mode}-${tag}`.replace(/[^A-Za-z0-9_.-]/g, '');
  const ferry = (...args: string[]) => run(process.execPath, [ctx.cli, '--cluster', ctx.lab.cluster, ...args], { timeoutMs: 600_000 });
  const srcState = join(h(ctx, 1).dir, 'state');
  const dstState = join(h(ctx, 2).dir, 'state');
  const log = (host: 1 | 2) => readText(join(h(ctx, host).dir, 'state', 'tasks', name, 'task.log'));
  await ferry('--host', 'h1', 'run', '--name', name, '--', WORKLOAD, ...workloadArgs(w));
  try {
    await waitFor('the workload to fill its memory', () => readySum(log(1)), 180_000);
    await waitFor('heartbeats', () => (parseBeats(log(1)).length > 100 ? true : undefined));
    const fromBeat = parseBeats(log(1)).length;
    const disk = new DiskSampler([srcState], [dstState]);
    const tx0 = await txBytes(ctx);
    const startedS = Date.now() / 1000;
    const r = await ferry('--host', 'h1', 'migrate', name, '--to', 'h2', '--mode', mode, ...extra, '--json');
    const wireBytes = (await txBytes(ctx)) - tx0;
    const d = disk.stop();
    const report = JSON.parse(r.stdout) as { id: string; totalMs: number; resumedAt: string; blackoutMs: number; bytes: { pages: number; images: number; files: number }; postCopyWindowMs?: number; precopy?: { rounds: unknown[]; finish: string }; destination?: { fillsAlone?: boolean } };
    // A destination that fills the task alone from its store: the source let go at the resume;
    // how long the fill took after it is in the destination's event.
    if (report.destination?.fillsAlone) {
      const fillMs = await waitFor('the destination to fill the task', () => fillOf(join(h(ctx, 2).dir, 'agent.log'), report.id), 120_000);
      if (fillMs >= 0) report.postCopyWindowMs = fillMs;
    }
    await sleep(300);
    const p = pauseAfter(log(2), fromBeat, startedS);
    const resumedS = Date.parse(report.resumedAt) / 1000;
    const m: RunMetrics = {
      pauseMs: p.pauseMs,
      totalMs: report.totalMs,
      wireBytes,
      reportedBytes: report.bytes.pages + report.bytes.images + report.bytes.files,
      peakDiskSrcMiB: d.src,
      peakDiskDstMiB: d.dst,
    };
    if (report.precopy) {
      m.rounds = report.precopy.rounds.length;
      // The heartbeat rate while the rounds ran (until the freeze), against the normal rate.
      m.roundsRateRatio = ratio(beatRate(p.beats, startedS, resumedS - report.blackoutMs / 1000), p.normalRate);
    }
    if (report.postCopyWindowMs !== undefined) {
      m.postCopyWindowMs = report.postCopyWindowMs;
      m.postCopyRateRatio = ratio(beatRate(p.beats, resumedS, resumedS + report.postCopyWindowMs / 1000), p.normalRate);
    }
    return m;
  } finally {
    for (const host of ['h1', 'h2']) await ferry('--host', host, 'rm', '--force', name).catch(() => undefined);
  }
}

// ---- Podman ----------------------------------------------------------------------------------------
// Settings that work on these machines are in shared/PLATFORM.md: runc, cgroupfs, file events,
// explicit ulimits (root lacks CAP_SYS_RESOURCE). Both lab hosts share one Podman storage, so the
// restored container takes another name.

const PODMAN = ['--runtime', 'runc', '--cgroup-manager', 'cgroupfs', '--events-backend', 'file'];
const IMAGE = 'localhost/ferry-bench-workload:latest';
let imageReady = false;

async function podmanAt(ctx: BenchContext, host: 1 | 2, args: string[]): Promise<string> {
  // runc runs the first criu on PATH: make that the one Ferry and the other contenders use.
  const env = { ...process.env, PATH: `${dirname(ctx.criu)}:${process.env['PATH'] ?? ''}` };
  // nsenter, not `ip netns exec`: the latter remounts /sys and runc then finds no cgroups.
  const r = await run('nsenter', [`--net=/run/netns/${h(ctx, host).netns}`, 'podman', ...PODMAN, ...args], { timeoutMs: 600_000, env });
  return r.stdout.trim();
}

/** An image holding only the workload and the libraries it links. */
async function ensureImage(ctx: BenchContext): Promise<void> {
  if (imageReady) return;
  const root = join(ctx.workDir, 'podman-rootfs');
  await rm(root, { recursive: true, force: true });
  await mkdir(root, { recursive: true });
  const libs = (await run('ldd', [WORKLOAD])).stdout.match(/\/\S+/g) ?? [];
  for (const f of [WORKLOAD, ...libs]) {
    const dest = join(root, f === WORKLOAD ? 'ferry-workload' : f);
    await mkdir(join(dest, '..'), { recursive: true });
    await run('cp', ['-L', f, dest]);
  }
  await run('sh', ['-c', `tar -C ${root} -cf - . | podman ${PODMAN.join(' ')} import - ${IMAGE}`], { timeoutMs: 120_000 });
  await rm(root, { recursive: true, force: true });
  imageReady = true;
}

async function podmanRun(ctx: BenchContext, w: Workload, tag: string): Promise<RunMetrics> {
  await ensureImage(ctx);
  const dir = join(ctx.workDir, `podman-${tag}`);
  const src = join(dir, 'src');
  const dst = join(dir, 'dst');
  await mkdir(src, { recursive: true });
  await mkdir(dst, { recursive: true });
  const c1 = `ferry-bench-${tag}-a`;
  const c2 = `ferry-bench-${tag}-b`;
  const port = 7900 + Math.floor(Math.random() * 90);
  const disk = new DiskSampler([src], [dst]);
  try {
    await podmanAt(ctx, 1, ['run', '-d', '--name', c1, '--network', 'host', '--ulimit', 'nofile=20000:20000', '--ulimit', 'nproc=32768:32768', IMAGE, '/ferry-workload', ...workloadArgs(w)]);
    const log1 = await podmanAt(ctx, 1, ['container', 'inspect', c1, '--format', '{{.HostConfig.LogConfig.Path}}']);
    const beatsOf = (p: string) => readText(p).split('\n').map((l) => /((?:hb|ready) .*)$/.exec(l)?.[1] ?? '').join('\n');
    await waitFor('the workload to fill its memory', () => readySum(beatsOf(log1)), 180_000);
    await waitFor('heartbeats', () => (parseBeats(beatsOf(log1)).length > 100 ? true : undefined));
    const fromBeat = parseBeats(beatsOf(log1)).length;
    const tx0 = await txBytes(ctx);
    const t0 = performance.now();
    const startedS = Date.now() / 1000;
    await podmanAt(ctx, 1, ['container', 'checkpoint', `--export=${join(src, 'checkpoint.tar')}`, '--compress', 'none', c1]);
    await copyDir(ctx, src, dst, port);
    await podmanAt(ctx, 2, ['container', 'restore', `--import=${join(dst, 'checkpoint.tar')}`, '--name', c2]);
    const totalMs = Math.round(performance.now() - t0);
    const wireBytes = (await txBytes(ctx)) - tx0;
    await sleep(300);
    const log2 = await podmanAt(ctx, 2, ['container', 'inspect', c2, '--format', '{{.HostConfig.LogConfig.Path}}']);
    const p = pauseAfter(`${beatsOf(log1)}\n${beatsOf(log2)}`, fromBeat, startedS);
    const d = disk.stop();
    return { pauseMs: p.pauseMs, totalMs, wireBytes, peakDiskSrcMiB: d.src, peakDiskDstMiB: d.dst };
  } finally {
    disk.stop();
    await run('podman', [...PODMAN, 'rm', '-f', c1, c2], { reject: false, timeoutMs: 60_000 }).catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  }
}

const podman: Contender = {
  name: 'podman export/import',
  async unavailable() {
    for (const tool of ['podman', 'runc']) {
      const r = await run('sh', ['-c', `command -v ${tool}`], { reject: false });
      if (r.exitCode !== 0) return `${tool} is not installed (npm run bench installs it; or apt-get install podman runc)`;
    }
    return undefined;
  },
  run: podmanRun,
  async teardown() {
    if (imageReady) await run('podman', [...PODMAN, 'rmi', '-f', IMAGE], { reject: false }).catch(() => undefined);
    imageReady = false;
  },
};

const always = async () => undefined;

export const CONTENDERS: Contender[] = [
  { name: 'plain (dump, tar over TCP, restore)', unavailable: always, run: (c, w, t) => plainRun(c, w, t, 'plain') },
  { name: 'criu page-server', unavailable: always, run: (c, w, t) => plainRun(c, w, t, 'page-server') },
  { name: 'criu lazy-pages', unavailable: always, run: (c, w, t) => plainRun(c, w, t, 'lazy') },
  podman,
  { name: 'ferry stop-copy', unavailable: always, run: (c, w, t) => ferryRun(c, w, t, 'stop-copy') },
  { name: 'ferry post-copy', unavailable: always, run: (c, w, t) => ferryRun(c, w, t, 'post-copy') },
  { name: 'ferry pre-copy', unavailable: always, run: (c, w, t) => ferryRun(c, w, t, 'pre-copy') },
  { name: 'ferry auto (post-copy allowed)', unavailable: always, run: (c, w, t) => ferryRun(c, w, t, 'auto', ['--allow-post-copy']) },
  { name: 'ferry auto (throttle allowed)', unavailable: always, run: (c, w, t) => ferryRun(c, w, t, 'auto', ['--allow-throttle']) },
];
