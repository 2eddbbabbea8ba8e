// A task's own network: a network namespace with one address from the cluster's pool, joined to
// its host by a veth pair. The host routes the address to the veth and answers ARP for it on its
// uplink (proxy ARP), so other hosts and clients reach it as a neighbour. The address moves with
// the task: the new host adds the route and announces itself (gratuitous ARP), the old one drops
// it. Routed veth rather than macvlan: the host itself can reach its tasks (macvlan isolates a
// parent from its children) and nothing depends on the uplink accepting extra MAC addresses.
import { createHash } from 'node:crypto';
import { mkdir, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { FerryError } from '../errors.js';
import { run } from '../exec/run.js';

/** How a host gives tasks their own address (agent options --net-pool and --net-uplink). */
export interface NetConfig {
  /** CIDR of the cluster-wide address pool, e.g. 10.213.77.64/26. */
  pool: string;
  /** The interface the host's neighbours reach it on. */
  uplink: string;
}

/** The key CRIU knows the task's (external) network namespace by, in dump and restore. */
export const NETNS_KEY = 'ferry-net';

const LOCK_TABLE = 'ferry_lock';
/**
 * Everything dropped, both ways, loopback too (the task's connections to itself must not talk
 * while CRIU takes or rebuilds one end: see src/net/tcp.ts), but CRIU's own marked packets;
 * used by lock() and by CRIU's network-lock hook.
 */
const LOCK_RULES = `table inet ${LOCK_TABLE} {
  chain in { type filter hook input priority -300; policy drop; meta mark 0xc114 accept; }
  chain out { type filter hook output priority -300; policy drop; meta mark 0xc114 accept; }
}
`;

export function parseCidr(cidr: string): { base: number; bits: number } {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\/(\d{1,2})$/.exec(cidr.trim());
  const octets = m ? m.slice(1, 5).map(Number) : [];
  const bits = m ? Number(m[5]) : NaN;
  if (!m || octets.some((o) => o > 255) || bits < 8 || bits > 30) throw new FerryError('USAGE', `'${cidr}' is not an IPv4 network (A.B.C.D/8..30)`, { hint: 'give the pool as CIDR, e.g. 10.213.77.64/26' });
  const raw = octets.reduce((a, o) => a * 256 + o, 0);
  const size = 2 ** (32 - bits);
  return { base: raw - (raw % size), bits };
}

export function ipToInt(ip: string): number | undefined {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(ip.trim());
  if (!m) return undefined;
  const o = m.slice(1, 5).map(Number);
  return o.some((x) => x > 255) ? undefined : o.reduce((a, x) => a * 256 + x, 0);
}

export function intToIp(n: number): string {
  return [24, 16, 8, 0].map((s) => Math.floor(n / 2 ** s) % 256).join('.');
}

/** The pool's usable addresses (not its network and broadcast addresses), in order. */
export function poolAddresses(cidr: string): string[] {
  const { base, bits } = parseCidr(cidr);
  const size = 2 ** (32 - bits);
  return Array.from({ length: size - 2 }, (_, i) => intToIp(base + 1 + i));
}

export function inPool(cidr: string, ip: string): boolean {
  const { base, bits } = parseCidr(cidr);
  const n = ipToInt(ip);
  return n !== undefined && n > base && n < base + 2 ** (32 - bits) - 1;
}

/** The lowest pool address nobody uses. */
export function pickAddress(cidr: string, used: Iterable<string>): string {
  const taken = new Set(used);
  const free = poolAddresses(cidr).find((a) => !taken.has(a));
  if (!free) throw new FerryError('NET_POOL_EXHAUSTED', `every address of the pool ${cidr} is in use`, { hint: 'remove tasks that no longer need their address, or give the agents a larger --net-pool' });
  return free;
}

/** The host end of a task's veth: a name that fits IFNAMSIZ and is the same on every host. */
export function hostIf(task: string): string {
  return `fn-${createHash('sha1').update(task).digest('hex').slice(0, 10)}`;
}

export function netnsPath(stateDir: string, task: string): string {
  return join(stateDir, 'netns', task);
}

async function sh(cmd: string, args: string[], what: string): Promise<void> {
  const r = await run(cmd, args, { timeoutMs: 20_000, reject: false });
  if (r.exitCode !== 0) throw new FerryError('NET', `${what}: ${(r.stderr || r.stdout).trim().split('\n')[0] ?? `${cmd} failed`}`);
}

const inNs = (ns: string, args: string[]) => ['--net=' + ns, '--', ...args];

/**
 * Makes the task's namespace with its address configured, cut off (locked) and not yet routed:
 * nothing reaches it, nothing leaves it, until attach(). Removes what it made if a step fails.
 */
export async function createTaskNet(stateDir: string, task: string, address: string): Promise<string> {
  const ns = netnsPath(stateDir, task);
  const hif = hostIf(task);
  await mkdir(join(stateDir, 'netns'), { recursive: true, mode: 0o700 });
  if (await stat(ns).catch(() => undefined)) await destroyTaskNet(stateDir, task, address);
  try {
    await writeFile(ns, '');
    await sh('unshare', [`--net=${ns}`, 'true'], `cannot create the network namespace of '${task}'`);
    await lock(ns);
    await sh('ip', ['link', 'add', hif, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns], `cannot create the veth pair of '${task}'`);
    for (const args of [
      ['ip', 'link', 'set', 'lo', 'up'],
      ['ip', 'addr', 'add', `${address}/32`, 'dev', 'eth0'],
      ['ip', 'link', 'set', 'eth0', 'up'],
      // Every destination is a neighbour: the host answers ARP for all of them (proxy ARP).
      ['ip', 'route', 'add', 'default', 'dev', 'eth0'],
    ]) {
      await sh('nsenter', inNs(ns, args), `cannot configure the network of '${task}'`);
    }
    await sh('ip', ['link', 'set', hif, 'up'], `cannot bring up ${hif}`);
    await sh('sysctl', ['-qw', `net.ipv4.conf.${hif}.proxy_arp=1`], `cannot enable proxy ARP on ${hif}`);
    return ns;
  } catch (e) {
    await destroyTaskNet(stateDir, task, address);
    throw e;
  }
}

/** The host forwards for its tasks and answers ARP for them on the uplink. */
export async function prepareHost(cfg: NetConfig): Promise<void> {
  await sh('sysctl', ['-qw', 'net.ipv4.ip_forward=1'], 'cannot enable IPv4 forwarding');
  await sh('sysctl', ['-qw', `net.ipv4.conf.${cfg.uplink}.proxy_arp=1`], `cannot enable proxy ARP on ${cfg.uplink}`);
}

/** The address is here now: route it to the task and tell the neighbours. */
export async function attach(cfg: NetConfig, task: string, address: string, garp: string): Promise<void> {
  await sh('ip', ['route', 'replace', `${address}/32`, 'dev', hostIf(task)], `cannot route ${address} to '${task}'`);
  // Announced in the background: the first one goes at once, the repeats must not hold the resume.
  void run(garp, [cfg.uplink, address, '3', '400'], { timeoutMs: 10_000, reject: false }).catch(() => undefined);
}

/** The address is no longer here (the task left or is about to run elsewhere). */
export async function detach(task: string, address: string): Promise<void> {
  await run('ip', ['route', 'del', `${address}/32`, 'dev', hostIf(task)], { timeoutMs: 20_000, reject: false }).catch(() => undefined);
}

/**
 * Cuts the namespace off: its sockets neither receive nor send. Held while
 * CRIU dumps established connections and while a restored copy awaits the decision, so that
 * no reset escapes from the copy that is ending and no packet from the one not yet chosen.
 */
export async function lock(ns: string): Promise<void> {
  const r = await run('nsenter', inNs(ns, ['nft', '-f', '-']), { input: LOCK_RULES, timeoutMs: 20_000, reject: false });
  if (r.exitCode !== 0) throw new FerryError('NET', `cannot lock the task's network: ${r.stderr.trim().split('\n')[0] ?? 'nft failed'}`);
}

export async function unlock(ns: string): Promise<void> {
  await run('nsenter', inNs(ns, ['nft', 'delete', 'table', 'inet', LOCK_TABLE]), { timeoutMs: 20_000, reject: false }).catch(() => undefined);
}

/** The lines of the CRIU action script that lock and unlock the namespace named by FERRY_NETNS. */
export const LOCK_SCRIPT = `if [ "$CRTOOLS_SCRIPT_ACTION" = network-lock ]; then
  [ -n "$FERRY_NETNS" ] || exit 0
  nsenter --net="$FERRY_NETNS" -- nft -f - <<'FERRY_LOCK'
${LOCK_RULES}FERRY_LOCK
  exit
fi
if [ "$CRTOOLS_SCRIPT_ACTION" = network-unlock ]; then
  [ -n "$FERRY_NETNS" ] && nsenter --net="$FERRY_NETNS" -- nft delete table inet ${LOCK_TABLE} 2>/dev/null
  exit 0
fi
`;

const pubTable = (task: string) => `ferry_pub_${hostIf(task).slice(3)}`;

/**
 * Forwards the host's ports to the task (a table of the task's own in the host's nftables, so
 * it goes in one command). Connections to the host's addresses only, not to loopback.
 */
export async function publish(task: string, address: string, ports: Array<{ hostPort: number; port: number; proto: 'tcp' | 'udp' }>): Promise<void> {
  await unpublish(task);
  if (!ports.length) return;
  const rules = ports.map((p) => `fib daddr type local ip daddr != 127.0.0.0/8 ${p.proto} dport ${p.hostPort} dnat to ${address}:${p.port}`);
  const text = `table ip ${pubTable(task)} {
  chain pre { type nat hook prerouting priority -100; ${rules.join('; ')}; }
  chain out { type nat hook output priority -100; ${rules.join('; ')}; }
}
`;
  const r = await run('nft', ['-f', '-'], { input: text, timeoutMs: 20_000, reject: false });
  if (r.exitCode !== 0) throw new FerryError('NET', `cannot publish the ports of '${task}': ${r.stderr.trim().split('\n')[0] ?? 'nft failed'}`);
}

export async function unpublish(task: string): Promise<void> {
  await run('nft', ['delete', 'table', 'ip', pubTable(task)], { timeoutMs: 20_000, reject: false }).catch(() => undefined);
}

/** Everything the task's network was: route, forwarded ports, veth (goes with the namespace), namespace file. */
export async function destroyTaskNet(stateDir: string, task: string, address: string): Promise<void> {
  const ns = netnsPath(stateDir, task);
  await unpublish(task);
  await detach(task, address);
  await run('ip', ['link', 'del', hostIf(task)], { timeoutMs: 20_000, reject: false }).catch(() => undefined);
  await run('umount', [ns], { timeoutMs: 20_000, reject: false }).catch(() => undefined);
  await rm(ns, { force: true });
}

/** The namespace's inode: CRIU's name for it in `--external net[INODE]:KEY`. */
export async function netnsInode(pid: number): Promise<number> {
  return (await stat(`/proc/${pid}/ns/net`)).ino;
}

/** CRIU options for a task with its own network: connections move, Ferry locks. */
export function criuDumpNetArgs(inode: number): string[] {
  return ['--tcp-established', '--network-lock', 'skip', '--external', `net[${inode}]:${NETNS_KEY}`];
}

/** The shim opens the namespace as fd 3 of the restoring CRIU (FERRY_NETNS in its environment). */
export function criuRestoreNetArgs(): string[] {
  return ['--tcp-established', '--network-lock', 'skip', '--inherit-fd', `fd[3]:${NETNS_KEY}`];
}
