// Test hosts on one machine: each host is a network namespace on a shared bridge, with its own
// mount-namespace view of /var/lib/ferry and its own agent. Tests, the demo and the benchmark
// use it. Everything it makes is listed in lab.json and removed by `down`.
import { spawn } from 'node:child_process';
import { existsSync, openSync, closeSync } from 'node:fs';
import { mkdir, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { repoRoot } from '../config.js';
import { FerryError } from '../errors.js';
import { run } from '../exec/run.js';
import { caInit, certIssue, loadTls } from '../tls/pki.js';
import { readJson, writeJsonAtomic } from '../util/fs.js';
import { isAlive, sleep, startTime, waitUntil } from '../util/proc.js';
import { connect, requestJson } from '../wire/session.js';
import { controllerRequest } from '../cluster/client.js';
import { AGENT_NODE_FLAGS } from '../agent/agent.js';

export interface LabHost {
  name: string;
  netns: string;
  veth: string;
  address: string;
  dir: string;
  agentPid?: number;
  agentStart?: number;
}

export interface LabState {
  name: string;
  dir: string;
  bridge: string;
  subnet: number;
  bandwidth?: string;
  /** Memory each host offers tasks placed by the controller (default: the machine's). */
  hostMemory?: number;
  hosts: LabHost[];
  cluster: string;
  /** The cluster controller, when the lab runs one (on the machine itself, on the bridge). */
  controller?: LabController;
}

export interface LabController {
  api: string;
  dashboard: string;
  dns: string;
  store: string;
  pid?: number;
  start?: number;
}

export const CONTROLLER_PORT = 7450;

export const AGENT_PORT = 7443;

export function labDir(name: string): string {
  return join(process.env['FERRY_LAB_ROOT'] ?? '/var/tmp', `ferry-lab-${name}`);
}

function validate(name: string, hosts: number, subnet: number): void {
  if (!/^[a-z0-9]{1,8}$/.test(name)) throw new FerryError('USAGE', `invalid lab name '${name}': use 1-8 lowercase letters or digits`);
  if (!(hosts >= 1 && hosts <= 16)) throw new FerryError('USAGE', `--hosts takes 1 to 16, got ${hosts}`);
  if (!(subnet >= 0 && subnet <= 255)) throw new FerryError('USAGE', `--subnet takes 0 to 255, got ${subnet}`);
}

const ip = (args: string[]) => run('ip', args, { timeoutMs: 15_000 });

export async function labStatus(name: string): Promise<LabState | undefined> {
  return readJson<LabState>(join(labDir(name), 'lab.json'));
}

export async function labUp(opts: { name: string; hosts: number; bandwidth?: string; subnet: number; controller?: boolean; hostMemory?: number; log?: (l: string) => void }): Promise<LabState> {
  validate(opts.name, opts.hosts, opts.subnet);
  if (opts.bandwidth && !/^\d+(\.\d+)?([kmg]?bit|[kmg]?bps)$/i.test(opts.bandwidth)) {
    throw new FerryError('USAGE', `invalid --bandwidth '${opts.bandwidth}': use a tc rate such as 1gbit or 500mbit`);
  }
  const log = opts.log ?? (() => {});
  const dir = labDir(opts.name);
  const existing = await labStatus(opts.name);
  if (existing && (existing.hosts.length !== opts.hosts || existing.bandwidth !== opts.bandwidth || existing.hostMemory !== opts.hostMemory)) {
    throw new FerryError('LAB', `lab '${opts.name}' is up with ${existing.hosts.length} hosts${existing.bandwidth ? ` at ${existing.bandwidth}` : ''}`, { hint: `take it down first with \`ferry lab down --name ${opts.name}\`` });
  }
  const state: LabState = existing ?? {
    name: opts.name,
    dir,
    bridge: `fl-${opts.name}`,
    subnet: opts.subnet,
    ...(opts.bandwidth ? { bandwidth: opts.bandwidth } : {}),
    ...(opts.hostMemory ? { hostMemory: opts.hostMemory } : {}),
    hosts: Array.from({ length: opts.hosts }, (_, i) => ({
      name: `h${i + 1}`,
      netns: `ferry-${opts.name}-h${i + 1}`,
      veth: `fv-${opts.name}-${i + 1}`,
      address: `10.213.${opts.subnet}.${i + 1}`,
      dir: join(dir, `h${i + 1}`),
    })),
    cluster: join(dir, 'cluster.json'),
  };
  if (opts.controller && !state.controller) {
    state.controller = {
      api: `10.213.${state.subnet}.254:${CONTROLLER_PORT}`,
      // The dashboard stays on the machine's loopback; DNS on the bridge, where the hosts reach it.
      dashboard: `127.0.0.1:${7480 + state.subnet}`,
      dns: `10.213.${state.subnet}.254:53`,
      store: join(dir, 'controller.db'),
    };
  }
  await mkdir(dir, { recursive: true, mode: 0o700 });
  // Record first, so `down` can remove a half-made lab.
  await writeJsonAtomic(join(dir, 'lab.json'), state);
  try {
    const links = (await ip(['-o', 'link', 'show'])).stdout;
    if (!links.includes(` ${state.bridge}:`)) {
      await ip(['link', 'add', state.bridge, 'type', 'bridge']);
      await ip(['addr', 'add', `10.213.${state.subnet}.254/24`, 'dev', state.bridge]);
      await ip(['link', 'set', state.bridge, 'up']);
      log(`bridge ${state.bridge} 10.213.${state.subnet}.254/24`);
    }
    const nsList = (await ip(['netns', 'list'])).stdout;
    for (const h of state.hosts) {
      if (!nsList.split('\n').some((l) => l.split(' ')[0] === h.netns)) {
        await ip(['netns', 'add', h.netns]);
        await ip(['link', 'add', h.veth, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', h.netns]);
        await ip(['link', 'set', h.veth, 'master', state.bridge, 'up']);
        await ip(['-n', h.netns, 'addr', 'add', `${h.address}/24`, 'dev', 'eth0']);
        await ip(['-n', h.netns, 'link', 'set', 'eth0', 'up']);
        await ip(['-n', h.netns, 'link', 'set', 'lo', 'up']);
        if (state.bandwidth) {
          await run('ip', ['netns', 'exec', h.netns, 'tc', 'qdisc', 'replace', 'dev', 'eth0', 'root', 'tbf', 'rate', state.bandwidth, 'burst', '1mb', 'latency', '50ms']);
        }
        log(`host ${h.name}: netns ${h.netns}, ${h.address}${state.bandwidth ? `, shaped to ${state.bandwidth}` : ''}`);
      }
      await mkdir(join(h.dir, 'state'), { recursive: true, mode: 0o700 });
    }
    const caDir = join(dir, 'ca');
    if (!existsSync(join(caDir, 'ca.crt'))) await caInit(caDir, { name: `ferry lab ${opts.name} CA` });
    if (!existsSync(join(dir, 'client.crt'))) await certIssue(caDir, 'client', dir, 'operator');
    for (const h of state.hosts) if (!existsSync(join(h.dir, `${h.name}.crt`))) await certIssue(caDir, h.name, h.dir, 'agent', [h.address]);
    if (state.controller && !existsSync(join(dir, 'controller.crt'))) await certIssue(caDir, 'controller', dir, 'controller', [`10.213.${state.subnet}.254`]);
    await writeFile(
      state.cluster,
      JSON.stringify(
        {
          hosts: Object.fromEntries(state.hosts.map((h) => [h.name, `${h.address}:${AGENT_PORT}`])),
          ...(state.controller ? { controller: state.controller.api } : {}),
          ca: 'ca/ca.crt',
          cert: 'client.crt',
          key: 'client.key',
        },
        null,
        2,
      ) + '\n',
    );
    for (const h of state.hosts) {
      if (h.agentPid && isAlive(h.agentPid, h.agentStart)) continue;
      await startAgent(h, caDir, await ensureMountNs(state, h), labPool(state.subnet), state.hostMemory);
      await writeJsonAtomic(join(dir, 'lab.json'), state);
      log(`agent ${h.name} pid ${h.agentPid}`);
    }
    const tls = await loadTls({ ca: join(caDir, 'ca.crt'), cert: join(dir, 'client.crt'), key: join(dir, 'client.key') });
    for (const h of state.hosts) await waitForAgent(h, tls);
    if (state.controller && !(state.controller.pid && isAlive(state.controller.pid, state.controller.start))) {
      await startController(state);
      await writeJsonAtomic(join(dir, 'lab.json'), state);
      log(`controller pid ${state.controller.pid}: API ${state.controller.api}, dashboard http://${state.controller.dashboard}/, DNS ${state.controller.dns}`);
      await waitForController(state, tls);
    }
    return state;
  } catch (e) {
    if (e instanceof FerryError && e.code !== 'PROGRAM_FAILED') throw e;
    throw new FerryError('LAB', `lab '${opts.name}' could not be set up: ${(e as Error).message}`, { hint: `remove what was made with \`ferry lab down --name ${opts.name}\`` });
  }
}

/** Task addresses (ferry run --net) on the lab's bridge: .65 to .126, clear of the hosts and the bridge's .254. */
export function labPool(subnet: number): string {
  return `10.213.${subnet}.64/26`;
}

/** Where the lab keeps each host's mount namespace, bound to a file like `ip netns` does. */
function mountNsDir(labDirPath: string): string {
  return join(labDirPath, 'mntns');
}

/**
 * A host's own mount namespace, made once and kept (bound to a file) so that an agent restarted
 * later runs in the same one as the tasks its predecessor started, as on a real host.
 */
async function ensureMountNs(state: LabState, h: LabHost): Promise<string> {
  const dir = mountNsDir(state.dir);
  const file = join(dir, h.name);
  const mounts = await readFile('/proc/self/mountinfo', 'utf8');
  if (!mounts.includes(` ${dir} `)) {
    await mkdir(dir, { recursive: true });
    // The namespace files must sit on a private mount, or the bind below is refused.
    await run('mount', ['--bind', dir, dir], { timeoutMs: 10_000 });
    await run('mount', ['--make-private', dir], { timeoutMs: 10_000 });
  }
  if (!mounts.includes(` ${file} `)) {
    await writeFile(file, '');
    await mkdir(join(h.dir, 'state'), { recursive: true, mode: 0o700 });
    // Its own devpts instance too, as a separate machine has: a restored pseudo-terminal gets
    // the index it had, which the held source copy's terminal still takes in the shared one.
    const setup = [
      'mkdir -p /var/lib/ferry',
      `mount --bind ${h.dir}/state /var/lib/ferry`,
      'mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts /dev/pts',
      'mount --bind /dev/pts/ptmx /dev/ptmx',
    ].join(' && ');
    await run('unshare', [`--mount=${file}`, '--propagation', 'private', '--', 'sh', '-c', setup], { timeoutMs: 10_000 });
  }
  return file;
}

/** Starts (or restarts) a host's agent inside its namespaces. */
export async function startAgent(h: LabHost, caDir: string, mountNs: string, netPool: string, memory?: number): Promise<void> {
  const cli = join(repoRoot, 'dist', 'src', 'cli', 'main.js');
  const args = [`--net=/run/netns/${h.netns}`, `--mount=${mountNs}`, '--', process.execPath, ...AGENT_NODE_FLAGS, cli, 'agent', '--name', h.name, '--listen', `${h.address}:${AGENT_PORT}`, '--ca', `${caDir}/ca.crt`, '--cert', `${h.dir}/${h.name}.crt`, '--key', `${h.dir}/${h.name}.key`, '--state-dir', '/var/lib/ferry', '--net-pool', netPool, '--net-uplink', 'eth0', ...(memory ? ['--memory', String(memory)] : [])];
  const logFd = openSync(join(h.dir, 'agent.log'), 'a');
  // nsenter, not `ip netns exec`: that one makes a new mount namespace at every start.
  const child = spawn('nsenter', args, {
    detached: true,
    stdio: ['ignore', logFd, logFd],
    env: { ...process.env, FERRY_STATE_DIR: '/var/lib/ferry', FERRY_SCRATCH_DIR: join(labScratch(dirname(h.dir)), h.name) },
  });
  closeSync(logFd);
  child.unref();
  h.agentPid = child.pid!;
  await sleep(50);
  h.agentStart = startTime(h.agentPid);
}

/** Starts (or restarts) the lab's controller on the machine itself, logging to controller.log. */
export async function startController(state: LabState): Promise<void> {
  const c = state.controller!;
  const cli = join(repoRoot, 'dist', 'src', 'cli', 'main.js');
  const args = [cli, '--cluster', state.cluster, 'controller', '--ca', join(state.dir, 'ca', 'ca.crt'), '--cert', join(state.dir, 'controller.crt'), '--key', join(state.dir, 'controller.key'), '--listen', c.api, '--dashboard', c.dashboard, '--dns', c.dns, '--store', `sqlite:${c.store}`];
  const logFd = openSync(join(state.dir, 'controller.log'), 'a');
  const child = spawn(process.execPath, args, { detached: true, stdio: ['ignore', logFd, logFd] });
  closeSync(logFd);
  child.unref();
  c.pid = child.pid!;
  await sleep(50);
  c.start = startTime(c.pid);
}

async function waitForController(state: LabState, tls: Awaited<ReturnType<typeof loadTls>>): Promise<void> {
  const end = Date.now() + 15_000;
  for (;;) {
    try {
      await controllerRequest(state.controller!.api, tls, 'GET', '/v1/hosts', undefined, 1000);
      return;
    } catch (e) {
      if (Date.now() > end) throw new FerryError('LAB', `the lab's controller did not come up: ${(e as Error).message}`, { hint: `see ${join(state.dir, 'controller.log')}` });
      await sleep(100);
    }
  }
}

async function waitForAgent(h: LabHost, tls: Awaited<ReturnType<typeof loadTls>>): Promise<void> {
  const end = Date.now() + 15_000;
  for (;;) {
    try {
      const s = await connect(`${h.address}:${AGENT_PORT}`, { tls, expectName: h.name, timeoutMs: 1000 });
      try {
        await requestJson(s, 'GET', '/v1/info');
        return;
      } finally {
        s.close();
      }
    } catch (e) {
      if (Date.now() > end) throw new FerryError('LAB', `agent ${h.name} did not come up: ${(e as Error).message}`, { hint: `see ${join(h.dir, 'agent.log')}` });
      await sleep(100);
    }
  }
}

/** Removes every namespace, link, process and file the lab made. */
export async function labDown(name: string, log: (l: string) => void = () => {}): Promise<boolean> {
  validate(name, 1, 0);
  const state = await labStatus(name);
  if (!state) return false;
  const c = state.controller;
  if (c?.pid && isAlive(c.pid, c.start)) {
    process.kill(c.pid, 'SIGKILL');
    await waitUntil(() => !isAlive(c.pid!), 1000);
    log('stopped the controller');
  }
  for (const h of state.hosts) {
    // Every process inside the host's namespace was started by the lab: agents, criu, tasks.
    const pids = new Set<number>();
    if (h.agentPid && isAlive(h.agentPid, h.agentStart)) pids.add(h.agentPid);
    const r = await run('ip', ['netns', 'pids', h.netns], { reject: false }).catch(() => undefined);
    for (const p of r?.stdout.split('\n').filter(Boolean).map(Number) ?? []) pids.add(p);
    // Tasks restored there keep their shim outside the netns view; find them by their records.
    for (const p of await taskPids(join(h.dir, 'state', 'tasks'))) pids.add(p);
    for (const p of pids) {
      try {
        process.kill(p, 'SIGKILL');
      } catch {
        /* gone */
      }
    }
    for (const p of pids) await waitUntil(() => !isAlive(p), 1000);
    await run('umount', [join(mountNsDir(state.dir), h.name)], { reject: false }).catch(() => undefined);
    await run('ip', ['netns', 'del', h.netns], { reject: false }).catch(() => undefined);
    await run('ip', ['link', 'del', h.veth], { reject: false }).catch(() => undefined);
    log(`removed host ${h.name}`);
  }
  await run('umount', [mountNsDir(state.dir)], { reject: false }).catch(() => undefined);
  await run('ip', ['link', 'del', state.bridge], { reject: false }).catch(() => undefined);
  await rm(state.dir, { recursive: true, force: true });
  await rm(labScratch(state.dir), { recursive: true, force: true });
  log(`removed lab ${name}`);
  return true;
}

/**
 * The hosts' scratch directories (see runtime/scratch.ts), in memory as /run is on a Debian
 * host, and at a path the machine sees too: tests read the images through the tasks' links.
 */
export function labScratch(labDir: string): string {
  return join('/dev/shm', basename(labDir));
}

async function taskPids(tasksDir: string): Promise<number[]> {
  const out: number[] = [];
  let names: string[] = [];
  try {
    names = await readdir(tasksDir);
  } catch {
    return out;
  }
  for (const n of names) {
    const rec = await readJson<{ pid?: number; pidStart?: number; shimPid?: number; shimStart?: number }>(join(tasksDir, n, 'task.json')).catch(() => undefined);
    if (rec?.pid && isAlive(rec.pid, rec.pidStart)) out.push(rec.pid);
    if (rec?.shimPid && isAlive(rec.shimPid, rec.shimStart)) out.push(rec.shimPid);
  }
  return out;
}
