// `ferry doctor`: can this host checkpoint, and which of Ferry's modes does its kernel allow?
import { readFileSync, statfsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import type { FerryConfig } from '../config.js';
import { Criu, isSupported } from '../criu/driver.js';
import { FerryError } from '../errors.js';
import { run } from '../exec/run.js';
import { spawn } from 'node:child_process';
import { Throttle } from '../precopy/throttle.js';
import { Tracker } from '../precopy/tracker.js';
import { sleep } from '../util/proc.js';

/** Whether dir (or, while it does not exist yet, the directory it will be made in) is a tmpfs. */
function scratchFs(dir: string): 'memory' | 'disk' | 'unknown' {
  for (let d = dir; ; d = dirname(d)) {
    try {
      return statfsSync(d).type === TMPFS_MAGIC ? 'memory' : 'disk';
    } catch {
      if (d === dirname(d)) return 'unknown';
    }
  }
}
const TMPFS_MAGIC = 0x01021994;

export type CheckStatus = 'ok' | 'missing' | 'warn';

export interface DoctorCheck {
  name: string;
  status: CheckStatus;
  detail: string;
  /** What the result enables or disables in Ferry. */
  effect: string;
  fix?: string;
}

export interface DoctorReport {
  criu: { path: string; source: string; version?: string; check: 'ok' | 'failed' | 'not run'; checkOutput?: string };
  checks: DoctorCheck[];
  canCheckpoint: boolean;
}

const CAPS: Array<[number, string, string]> = [
  [21, 'CAP_SYS_ADMIN', 'namespaces and CRIU restore'],
  [19, 'CAP_SYS_PTRACE', 'CRIU freezes and inspects tasks'],
  [12, 'CAP_NET_ADMIN', 'network locking and the test lab'],
  [24, 'CAP_SYS_RESOURCE', 'CRIU raises its own limits (without it: harmless RLIMIT_NOFILE errors, and lazy pages need the pipe sysctls)'],
];

function capEff(): bigint {
  const m = /CapEff:\s*([0-9a-f]+)/.exec(readFileSync('/proc/self/status', 'utf8'));
  return m ? BigInt(`0x${m[1]}`) : 0n;
}

function sysctl(name: string): number | undefined {
  try {
    return Number(readFileSync(`/proc/sys/${name.replace(/\./g, '/')}`, 'utf8').trim());
  } catch {
    return undefined;
  }
}

/** Arms a throw-away child the way pre-copy arms a task, and reads its written pages once. */
async function canTrackWrites(nativeDir: string): Promise<{ ok: boolean; why: string }> {
  const child = spawn('sleep', ['30'], { stdio: 'ignore' });
  const tracker = new Tracker(nativeDir);
  tracker.pages.resume();
  try {
    const r = await Promise.race([tracker.round([child.pid!]), sleep(10_000).then(() => undefined)]);
    if (!r) return { ok: false, why: 'ferry-track did not answer' };
    return r.armed === 1 ? { ok: true, why: '' } : { ok: false, why: `a process cannot be armed: ${r.note || 'unknown reason'}` };
  } catch (e) {
    return { ok: false, why: (e as Error).message };
  } finally {
    await tracker.stop();
    child.kill('SIGKILL');
  }
}

/**
 * Whether this CRIU carries Ferry's patches (patches/criu). Without them CRIU works, but
 * post-copy and the fill after pre-copy are slower, pre-copy's freeze longer, each page-server
 * transfer ends later; where root lacks CAP_SYS_RESOURCE a task that changed its user cannot be
 * dumped, and a lock held elsewhere hangs a restore.
 * scripts/bootstrap.sh writes beside the CRIU it builds which patches went in.
 */
function patchCheck(criu: string): DoctorCheck {
  const effect = 'without them post-copy and the fill after pre-copy are slower (the lazy-pages daemon walks a list of ranges at every fault, polls a whole core, and waits a round trip between requests), pre-copy freezes the task longer (its pages are put in pipes nobody reads, and room for one iov per page is copied to the parasite), every freeze is longer (CRIU forks a process for each namespace it dumps, one to restore the host name of a task, and at every start one to read its own rseq registration), the lazy-pages daemon on the destination starts inside the pause (it cannot listen before the images are there), every page-server transfer ends up to 200 ms later per direction (a close left in a corked socket), a task that unmaps memory while its pages are still coming can be left waiting for them for ever, in post-copy a fault waits behind the background requests made before it (the daemon takes answers only in the order it asked), in the fill after pre-copy every fault waits on a round trip through the agent (the daemon cannot read the pages of the store by itself) and the source keeps the task until that fill ends (the daemon cannot finish it without the source), a task that changed its user (a daemon that dropped its privileges) cannot be dumped where root lacks CAP_SYS_RESOURCE, and a restore whose file lock another process holds (the source copy, on storage both hosts share) waits for it until the migration times out; and the lazy-pages daemon fails, the task with it, when a process of the task exits, forks or moves memory while its pages arrive, or when the destination agent dies while the daemon fills the task from the store pre-copy filled';
  let lines: string[];
  try {
    lines = readFileSync(join(dirname(criu), 'ferry-patches'), 'utf8').split('\n').filter(Boolean);
  } catch {
    return { name: 'criu patches', status: 'warn', detail: `${criu} was not built by scripts/bootstrap.sh: it has none of Ferry's patches (patches/criu)`, effect, fix: 'run scripts/bootstrap.sh' };
  }
  const missing = lines.filter((l) => !l.startsWith('applied ')).map((l) => l.replace(/^\S+ /, ''));
  const applied = lines.filter((l) => l.startsWith('applied ')).map((l) => l.slice('applied '.length));
  if (missing.length) return { name: 'criu patches', status: 'warn', detail: `Ferry's patches ${missing.join(', ')} did not apply to this CRIU (applied: ${applied.join(', ') || 'none'})`, effect, fix: 'update patches/criu for this CRIU version' };
  return { name: 'criu patches', status: 'ok', detail: `Ferry's patches: ${applied.join(', ')}`, effect: 'the lazy-pages daemon, the pre-copy freeze and the end of a page-server transfer run at the speed Ferry measures; tasks that changed their user dump, and a lock held elsewhere fails a restore at once' };
}

async function has(cmd: string, args: string[]): Promise<boolean> {
  try {
    const r = await run(cmd, args, { timeoutMs: 10_000, reject: false });
    return r.exitCode === 0;
  } catch {
    return false;
  }
}

export async function doctor(cfg: FerryConfig, signal?: AbortSignal): Promise<DoctorReport> {
  const criu = new Criu(cfg.criu);
  const report: DoctorReport = { criu: { path: cfg.criu, source: cfg.criuSource, check: 'not run' }, checks: [], canCheckpoint: false };
  const checks = report.checks;
  const root = process.getuid?.() === 0;
  checks.push({
    name: 'root',
    status: root ? 'ok' : 'missing',
    detail: root ? 'running as root' : `running as uid ${process.getuid?.()}`,
    effect: root ? 'CRIU can checkpoint and restore' : 'nothing can be checkpointed',
    ...(root ? {} : { fix: 'run ferry as root' }),
  });

  let criuOk = false;
  try {
    const v = await criu.version(signal);
    report.criu.version = v.text;
    if (!isSupported(v)) {
      checks.push({ name: 'criu', status: 'missing', detail: `CRIU ${v.text} at ${cfg.criu} is older than 4.2`, effect: 'tasks with sockets cannot be dumped on this kernel', fix: 'run scripts/bootstrap.sh to build CRIU >= 4.2' });
    } else {
      const c = await criu.check({ signal });
      report.criu.check = c.ok ? 'ok' : 'failed';
      report.criu.checkOutput = c.output.split('\n').filter((l) => !/RLIMIT_NOFILE/.test(l)).slice(-3).join(' | ');
      criuOk = c.ok;
      checks.push({
        name: 'criu',
        status: c.ok ? 'ok' : 'missing',
        detail: `CRIU ${v.text} at ${cfg.criu} (from ${cfg.criuSource}): criu check ${c.ok ? 'passed' : 'failed'}`,
        effect: c.ok ? 'checkpoint and restore work' : 'checkpoint and restore will fail',
        ...(c.ok ? {} : { fix: `run '${cfg.criu} check' to see why; scripts/bootstrap.sh builds a CRIU that works here` }),
      });
    }
  } catch (e) {
    if (!(e instanceof FerryError)) throw e;
    checks.push({ name: 'criu', status: 'missing', detail: e.message, effect: 'nothing can be checkpointed', fix: e.hint ?? 'run scripts/bootstrap.sh' });
  }

  if (criuOk) checks.push(patchCheck(cfg.criu));
  const feature = async (f: string) => criuOk && (await has(cfg.criu, ['check', '--feature', f]));
  const uffd = await feature('uffd-noncoop');
  checks.push({
    name: 'userfaultfd',
    status: uffd ? 'ok' : 'missing',
    detail: uffd ? 'userfaultfd with non-cooperative events' : 'not available',
    effect: uffd ? 'post-copy (lazy pages) migration is possible' : 'post-copy migration is disabled; stop-copy still works',
    ...(uffd ? {} : { fix: 'use a kernel with CONFIG_USERFAULTFD' }),
  });
  const dirty = await feature('mem_dirty_track');
  checks.push({
    name: 'soft-dirty',
    status: dirty ? 'ok' : 'warn',
    detail: dirty ? 'memory changes can be tracked' : 'kernel built without CONFIG_MEM_SOFT_DIRTY',
    effect: dirty ? "CRIU's iterative pre-dump is possible" : "CRIU's pre-dump/--track-mem is impossible (Ferry's pre-copy does not need it)",
  });
  const wp = await canTrackWrites(cfg.nativeDir);
  checks.push({
    name: 'write tracking',
    status: wp.ok ? 'ok' : 'warn',
    detail: wp.ok ? 'userfaultfd write-protect + PAGEMAP_SCAN, armed through ptrace (tried on a child process)' : `content hash (${wp.why})`,
    effect: wp.ok ? 'pre-copy and auto find written pages without reading the task\'s memory' : 'pre-copy and auto work, but every round reads all of the task\'s memory to find what changed',
    ...(wp.ok ? {} : { fix: 'Linux >= 6.7 on x86_64 with userfaultfd, and CAP_SYS_PTRACE, for the cheap method' }),
  });
  const th = Throttle.means();
  checks.push({
    name: 'throttle',
    status: th.sleep ? 'ok' : 'warn',
    detail: th.sleep ? 'cgroup CPU quota and freezer' : th.quota ? 'cgroup CPU quota only (no freezer)' : 'no cgroup cpu controller',
    effect: th.sleep ? 'auto --allow-throttle slows any task that writes faster than the link' : th.quota ? 'auto --allow-throttle slows only tasks that spend CPU to write' : 'auto --allow-throttle cannot slow a task',
    ...(th.sleep ? {} : { fix: "mount cgroup v1's freezer (or use cgroup v2)" }),
  });
  const timens = await feature('timens');
  checks.push({
    name: 'time namespace',
    status: timens ? 'ok' : 'missing',
    detail: timens ? 'time namespaces supported' : 'not available',
    effect: timens ? "a task's CLOCK_MONOTONIC continues across hosts" : "a task's monotonic clock jumps when it lands on another host",
    ...(timens ? {} : { fix: 'use a kernel >= 5.6 with CONFIG_TIME_NS' }),
  });
  const setTid = await feature('clone3_set_tid');
  checks.push({
    name: 'clone3 set_tid',
    status: setTid ? 'ok' : 'missing',
    detail: setTid ? 'PIDs can be chosen on restore' : 'not available',
    effect: setTid ? 'tasks restore with their own PIDs inside their PID namespace' : 'restores may fail on PID clashes',
    ...(setTid ? {} : { fix: 'use a kernel >= 5.5' }),
  });
  // Ferry's own locks (a task's namespace, the connections among a task's own sockets) are nftables.
  const nft = await has('nft', ['--version']);
  checks.push({
    name: 'network lock',
    status: nft ? 'ok' : 'missing',
    detail: nft ? 'nftables' : 'nft not found',
    effect: nft ? "a task's connections are held still while it moves" : 'tasks with their own network, or with connections between their own sockets, cannot move or be checkpointed',
    ...(nft ? {} : { fix: 'apt-get install nftables' }),
  });
  const caps = capEff();
  for (const [bit, name, why] of CAPS) {
    const ok = (caps >> BigInt(bit)) & 1n;
    checks.push({
      name,
      status: ok ? 'ok' : bit === 24 ? 'warn' : 'missing',
      detail: ok ? 'present' : 'missing',
      effect: why,
      ...(ok ? {} : { fix: bit === 24 ? 'harmless; scripts/bootstrap.sh sets the pipe sysctls' : `run Ferry with ${name}` }),
    });
  }
  const pipeMax = sysctl('fs.pipe-max-size');
  const pipeSoft = sysctl('fs.pipe-user-pages-soft');
  const hasRes = ((caps >> 24n) & 1n) === 1n;
  const pipesOk = hasRes || ((pipeMax ?? 0) >= 4 << 20 && pipeSoft === 0);
  checks.push({
    name: 'pipe limits',
    status: pipesOk ? 'ok' : 'warn',
    detail: `fs.pipe-max-size=${pipeMax} fs.pipe-user-pages-soft=${pipeSoft}`,
    effect: pipesOk ? 'lazy pages can use large pipes' : 'lazy pages fail (page-pipe: tee: Operation not permitted)',
    ...(pipesOk ? {} : { fix: 'sysctl -w fs.pipe-max-size=4194304 fs.pipe-user-pages-soft=0' }),
  });
  const scratch = scratchFs(cfg.scratchDir);
  checks.push({
    name: 'scratch',
    status: scratch === 'memory' ? 'ok' : 'warn',
    detail: `${cfg.scratchDir} ${scratch === 'memory' ? 'is in memory (tmpfs)' : scratch === 'disk' ? 'is on disk' : 'cannot be inspected'}`,
    effect: scratch === 'memory' ? "a migration's CRIU images are written to memory inside the pause" : 'CRIU writes a migration\'s images to disk inside the pause (slower, most for tasks of many processes)',
    ...(scratch === 'memory' ? {} : { fix: 'mount a tmpfs there, or point FERRY_SCRATCH_DIR (or "scratchDir" in the config) at one' }),
  });
  for (const tool of ['rsync', 'ip', 'tc', 'nsenter']) {
    const found = await has('sh', ['-c', `command -v ${tool}`]);
    checks.push({
      name: tool,
      status: found ? 'ok' : 'missing',
      detail: found ? 'installed' : 'not found',
      effect: tool === 'rsync' ? "syncing a task's files to the destination" : 'the test lab and agents',
      ...(found ? {} : { fix: 'run scripts/bootstrap.sh' }),
    });
  }
  report.canCheckpoint = root && criuOk;
  return report;
}
