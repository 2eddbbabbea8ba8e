// Which TCP connections a task without its own network has. A connection between two of the
// task's own sockets (over loopback) can move with the task: both ends freeze together and
// nothing outside can send to either. A connection to anything else cannot (its address stays
// behind), and such tasks keep CRIU's --tcp-close.
//
// The two ends still must not talk while CRIU takes or rebuilds them: the kernel acknowledges
// data for a frozen task, so an end dumped before its peer misses what the peer sent meanwhile,
// and the restore sends each end's never-sent data at once, to a peer not yet there (the restore
// failed with EPIPE, or the connection was reset after the move). CRIU's own per-connection lock
// runs iptables twice per socket inside the pause and is never lifted on the source after a
// migration; Ferry drops the task's connections in one nftables table of its own instead, from
// before the dump until the task runs again (or is gone), and on the destination for the restore.
import { createHash } from 'node:crypto';
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { FerryError } from '../errors.js';
import { run } from '../exec/run.js';
import { treePids } from '../util/proc.js';

/**
 * The marker a dump leaves in its images when the task's connections were dumped established;
 * it holds the connections (JSON, TcpEnds[]) for the destination's lock.
 */
export const TCP_MARKER = 'ferry-tcp-established';

interface Conn {
  local: string;
  remote: string;
  /** CLOSE: nothing flows any more, wherever the other end was. */
  closed: boolean;
}

/** One socket's connection, as packets name it. */
export interface TcpEnds {
  family: 4 | 6;
  src: string;
  sport: number;
  dst: string;
  dport: number;
}

/** The mark CRIU's own packets (libsoccr's FIN) carry: they pass every lock. */
const SOCCR_MARK = '0xc114';

/** An IPv4-mapped IPv6 address (::ffff:a.b.c.d) as /proc/net/tcp writes the IPv4 one. */
function plain(addr: string): string {
  const m = /^0{16}FFFF0000([0-9A-F]{8}):([0-9A-F]{4})$/i.exec(addr);
  return m ? `${m[1]!.toUpperCase()}:${m[2]!.toUpperCase()}` : addr.toUpperCase();
}

/** Parses /proc/net/tcp{,6}: sockets that are or were connected (not LISTEN), by inode. */
export function parseProcNetTcp(text: string): Map<string, Conn> {
  const out = new Map<string, Conn>();
  for (const line of text.split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 10 || f[3] === '0A') continue;
    out.set(f[9]!, { local: plain(f[1]!), remote: plain(f[2]!), closed: f[3] === '07' });
  }
  return out;
}

/** Socket inodes the processes hold. */
function socketInodes(pids: number[]): Set<string> {
  const out = new Set<string>();
  for (const pid of pids) {
    let fds: string[] = [];
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      try {
        const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(join(`/proc/${pid}/fd`, fd)));
        if (m) out.add(m[1]!);
      } catch {
        /* closed meanwhile */
      }
    }
  }
  return out;
}

/** /proc/net/tcp's ADDR:PORT (hex, each 32-bit word in host order) as an address and a port. */
export function parseEnd(hex: string): { family: 4 | 6; addr: string; port: number } | undefined {
  const m = /^([0-9A-F]{8}|[0-9A-F]{32}):([0-9A-F]{4})$/i.exec(hex);
  if (!m) return undefined;
  const words = m[1]!.match(/.{8}/g)!.map((w) => w.match(/../g)!.reverse());
  const port = parseInt(m[2]!, 16);
  if (words.length === 1) return { family: 4, addr: words[0]!.map((b) => parseInt(b, 16)).join('.'), port };
  const groups = words.flat().join('').match(/.{4}/g)!.map((g) => parseInt(g, 16).toString(16));
  return { family: 6, addr: groups.join(':'), port };
}

function ends(c: Conn): TcpEnds | undefined {
  const l = parseEnd(c.local);
  const r = parseEnd(c.remote);
  if (!l || !r || l.family !== r.family) return undefined;
  return { family: l.family, src: l.addr, sport: l.port, dst: r.addr, dport: r.port };
}

/** The tree's TCP connections (not listeners), by socket. */
function treeConnections(root: number): Conn[] {
  const mine = socketInodes(treePids(root));
  const conns = new Map<string, Conn>();
  for (const f of ['tcp', 'tcp6']) {
    try {
      for (const [ino, c] of parseProcNetTcp(readFileSync(`/proc/${root}/net/${f}`, 'utf8'))) if (mine.has(ino)) conns.set(ino, c);
    } catch {
      /* no IPv6 */
    }
  }
  return [...conns.values()];
}

/**
 * 'internal' when every TCP connection of the tree has its other end in the tree too (closed
 * sockets count as internal: nothing flows); IPv4 and IPv4-mapped IPv6 ends are one address.
 */
export function tcpConnections(root: number): { kind: 'none' | 'internal' | 'external'; ends: TcpEnds[] } {
  const conns = treeConnections(root);
  const kind = classify(conns);
  return { kind, ends: kind === 'internal' ? conns.filter((c) => !c.closed).flatMap((c) => ends(c) ?? []) : [] };
}

export function classify(conns: Conn[]): 'none' | 'internal' | 'external' {
  if (conns.length === 0) return 'none';
  const ends = new Set(conns.map((c) => `${c.local}>${c.remote}`));
  return conns.every((c) => c.closed || ends.has(`${c.remote}>${c.local}`)) ? 'internal' : 'external';
}

/**
 * CRIU's options for a task in its host's network namespace, given what its connections are.
 * Without connections to the outside nothing needs a lock, and closed sockets (which /proc/net/tcp
 * does not list) keep their addresses only when dumped as established.
 */
export function hostNetArgs(kind: 'none' | 'internal' | 'external'): string[] {
  return kind === 'external' ? ['--tcp-close'] : ['--tcp-established', '--network-lock', 'skip'];
}

/** The nftables table that holds a task's connections (task names are not nft identifiers). */
export function lockTable(task: string): string {
  return `ferry_tcp_${createHash('sha256').update(task).digest('hex').slice(0, 16)}`;
}

/**
 * The table's text: each connection dropped both ways, on the way out and in, looked up in a set
 * per address family (one rule each, whatever the number of connections).
 */
export function lockRules(task: string, conns: TcpEnds[]): string {
  const sets: string[] = [];
  const rules: string[] = [];
  for (const [family, ip, type] of [
    [4, 'ip', 'ipv4_addr'],
    [6, 'ip6', 'ipv6_addr'],
  ] as const) {
    const mine = conns.filter((c) => c.family === family);
    if (!mine.length) continue;
    const elements = [...new Set(mine.map((c) => `${c.src} . ${c.sport} . ${c.dst} . ${c.dport}`))];
    sets.push(`  set c${family} { type ${type} . inet_service . ${type} . inet_service; elements = { ${elements.join(', ')} }; }`);
    rules.push(`${ip} saddr . tcp sport . ${ip} daddr . tcp dport @c${family} drop`);
  }
  const chain = (name: string, hook: string) => `  chain ${name} { type filter hook ${hook} priority -300; meta mark ${SOCCR_MARK} accept; ${rules.join('; ')}; }`;
  return `table inet ${lockTable(task)} {\n${sets.join('\n')}\n${chain('out', 'output')}\n${chain('in', 'input')}\n}\n`;
}

/** Stops the connections' packets in this network namespace (replacing any earlier lock of the task's). */
export async function lockConnections(task: string, conns: TcpEnds[]): Promise<void> {
  if (!conns.length) return;
  // One transaction, one nft run (it counts inside the pause on the destination): an earlier
  // table of the task's goes (made first, so that deleting it cannot fail), the new one comes.
  const t = lockTable(task);
  const r = await run('nft', ['-f', '-'], { input: `add table inet ${t}\ndelete table inet ${t}\n${lockRules(task, conns)}`, timeoutMs: 20_000, reject: false });
  if (r.exitCode !== 0) {
    throw new FerryError('NET', `cannot hold the task's own TCP connections still while it moves: ${r.stderr.trim().split('\n')[0] || 'nft failed'}`, { hint: 'install nftables (`ferry doctor` checks it), or close the connections between the task\'s own sockets' });
  }
}

/** Lets the connections' packets through again; nothing to do when they were not held. */
export async function unlockConnections(task: string): Promise<void> {
  await run('nft', ['delete', 'table', 'inet', lockTable(task)], { timeoutMs: 20_000, reject: false }).catch(() => undefined);
}

/** The connections a dump's marker names (none for an empty marker, as older dumps left). */
export function markedConnections(text: string): TcpEnds[] {
  try {
    const v = JSON.parse(text) as unknown;
    if (!Array.isArray(v)) return [];
    return v.filter(
      (c): c is TcpEnds =>
        !!c && typeof c === 'object' && (c.family === 4 || c.family === 6) && [c.src, c.dst].every((a) => typeof a === 'string' && /^[0-9a-f.:]+$/i.test(a)) && [c.sport, c.dport].every((p) => Number.isInteger(p) && p > 0 && p < 65536),
    );
  } catch {
    return [];
  }
}
