// Which TCP connections a task without its own network has. A connection between two of the
// task's own sockets (over loopback) can move with the task: both ends freeze together, nothing
// outside can send to either, so CRIU needs no lock for it. A connection to anything else cannot
// (its address stays behind), and such tasks keep CRIU's --tcp-close.
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { treePids } from '../util/proc.js';

/** The marker a dump leaves in its images when the task's connections were dumped established. */
export const TCP_MARKER = 'ferry-tcp-established';

interface Conn {
  local: string;
  remote: string;
  /** CLOSE: nothing flows any more, wherever the other end was. */
  closed: boolean;
}

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

/**
 * 'internal' when every TCP connection of the tree has its other end in the tree too (closed
 * sockets count as internal: nothing flows); IPv4 and IPv4-mapped IPv6 ends are one address.
 */
export function tcpConnections(root: number): 'none' | 'internal' | 'external' {
  const mine = socketInodes(treePids(root));
  const conns = new Map<string, Conn>();
  for (const f of ['tcp', 'tcp6']) {
    try {
      for (const [ino, c] of parseProcNetTcp(readFileSync(`/proc/${root}/net/${f}`, 'utf8'))) if (mine.has(ino)) conns.set(ino, c);
    } catch {
      /* no IPv6 */
    }
  }
  return classify([...conns.values()]);
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
