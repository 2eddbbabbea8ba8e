// Reading CRIU's log: the first real error lines and a hint where the cause is known. Some lines
// say Error and mean nothing: the RLIMIT_NOFILE complaint of every run where root lacks
// CAP_SYS_RESOURCE, and the missing parent images of a dump that has no pre-dump before it.
import { open, readFile } from 'node:fs/promises';

const HARMLESS = [/rlimit: Can't setup RLIMIT_NOFILE/, /Pid-reuse detection failed: no parent inventory/];

/**
 * The largest deleted file a task may hold and still be dumped (CRIU's --ghost-limit, see
 * DUMP_OPTIONS in driver.ts): its content crosses whole during the freeze.
 */
export const GHOST_LIMIT_MIB = 256;

const HINTS: Array<[RegExp, string]> = [
  [/File has bad size|bad size/i, 'a file the task had open changed after the checkpoint; restore from a fresh checkpoint or keep the file unchanged'],
  [/Can't lookup mount=/, 'the task holds a file from another mount namespace; start it with `ferry run` so it owns only its own descriptors'],
  [/Can't fork for \d+: File exists/, "the task's PIDs are taken on this host; tasks started with `ferry run` have their own PID namespace and do not clash"],
  [/Can't get 1:16 opt|SO_PASSCRED/, 'this CRIU is too old for the kernel; run scripts/bootstrap.sh to build CRIU >= 4.2'],
  [/tee: .*Operation not permitted|page-pipe/, 'raise fs.pipe-max-size to 4194304 and set fs.pipe-user-pages-soft=0 (scripts/bootstrap.sh does it)'],
  [/soft.dirty|MemTrack|track.mem|BUG at criu\/mem\.c/i, 'the kernel has no soft-dirty tracking; use stop-copy or post-copy instead of pre-dump'],
  [/Address already in use/, 'a port the task listens on is taken where it was being restored; stop whatever holds it there'],
  [/Connection refused|Can't connect to server/, 'the page server or lazy-pages peer is not reachable'],
  [/Unsupported link .* kind|doesn't have a proper root mount/, "criu was run outside the task's mount/network namespace; run it where the task runs"],
  [/Can't find a session leader/, "a process of the task lives under a child subreaper of its own while its session leader exited; CRIU rebuilds such sessions only for children of the tree's root (Ferry's init), so this tree cannot be restored"],
  [/A session leader of .* is outside of its pid namespace/, 'the task shares a session with its launcher; start it with `ferry run`'],
  [/Can't dump ghost file .* size/, `the task holds a deleted file larger than ${GHOST_LIMIT_MIB} MiB, which CRIU would have to copy whole; close it in the task (or truncate it), then migrate again`],
  [/Unseizable non-zombie \d+ found, state t/, 'a process of the task is traced by another (a debugger or strace); detach it, then try again'],
  [/Timeout reached\. Try to interrupt|Unseizable non-zombie \d+ found, state D/, 'a process of the task is in an uninterruptible wait (a vfork parent waiting for its child, or stuck I/O) and could not be frozen; try again once it is out of it'],
  [/Zombies with threads are not supported/, 'a process of the task has ended while its threads still run (a zombie with threads); CRIU cannot dump that state, wait until they end'],
  [/PIDFD_THREAD/, "the task holds a pidfd of a thread, which CRIU cannot dump yet; close it in the task"],
  [/Error splicing data/, "a pipe or FIFO of the task could not be refilled where it was restored; a FIFO on storage both hosts share is still held by the source copy: keep the task's FIFOs on each host's own storage"],
  [/Can not set (flock|posix lock|ofd lock)/, "a file the task locks is locked by another process where it was restored; on storage both hosts share, the source copy holds the lock until the move is over: keep locked files on each host's own storage"],
  [/Can't create link remap/, "a file the task holds open lost that name while another hard link to it remains, and CRIU reopens files by name; close it in the task, or link it back under the name it had"],
  [/Can't create inet socket: Permission denied|Can't create inet socket: Operation not permitted/, "this host does not let the task's kind of socket be made (an ICMP ping socket needs net.ipv4.ping_group_range to include the task's group, a raw one CAP_NET_RAW); set the same on both hosts"],
  [/Can't open file \/proc\/.* on restore/, "the task holds open a /proc file (of another process, or a namespace under /proc/PID/ns) that cannot be opened again where it is restored; close it in the task"],
  [/Can't set lease/, "a file the task holds a lease on is leased by another process where it was restored; on storage both hosts share, the source copy holds the lease until the move is over (and its holder is told to give it up): keep leased files on each host's own storage"],
  [/Unix socket \d+ not found|External socket is used|Can't dump half of stream unix connection/, "a Unix socket of the task is connected to a process outside it, such as a client on one of the task's socket files or a service the task uses like syslog; CRIU moves only connections within the task: let those clients disconnect, or have them reach the task over TCP at its address, then migrate again"],
  [/send_fds failed \(-22\)/, "the task holds a descriptor the kernel would not hand to CRIU (an io_uring instance is one); have the program do without it, then try again"],
  [/Unknown socket collected \(family \d+\)/, "the task has a socket of an address family CRIU cannot checkpoint (40 is AF_VSOCK); close it in the task, then try again"],
  [/Net namespace is required to dump tun link/, "the task holds a TUN/TAP device, which CRIU moves only with the task's own network namespace: start the task with --net"],
  [/No such file or directory.*inventory|Can't open.*inventory/i, 'the images directory is missing or incomplete; checkpoint the task again'],
  [/Unable to open|Can't open image|unexpected magic|Corrupted|Can't read/i, 'the checkpoint images are damaged or incomplete; checkpoint the task again'],
];

export function errorLines(log: string, max = 5): string[] {
  const out: string[] = [];
  for (const line of log.split('\n')) {
    if (!/\bError\b/.test(line)) continue;
    if (HARMLESS.some((r) => r.test(line))) continue;
    // "(00.038277) Error (criu/util.c:1534): message" -> "message"; CRIU's advice to use one of
    // its options is dropped (Ferry picks CRIU's options; the hint says what to do instead).
    const msg = line.replace(/^\s*\(\s*[\d.]+\)\s*/, '').replace(/^(?:\d+: )?Error \([^)]*\):\s*/, '').replace(/\s*Use link-remap option\.?$/, '').trim();
    if (msg && !out.includes(msg)) out.push(msg);
    if (out.length >= max) break;
  }
  return out;
}

export function hintFor(lines: readonly string[]): string | undefined {
  for (const [re, hint] of HINTS) if (lines.some((l) => re.test(l))) return hint;
  return undefined;
}

export async function readErrorLines(logPath: string, max = 5): Promise<string[]> {
  try {
    return errorLines(await readFile(logPath, 'utf8'), max);
  } catch {
    return [];
  }
}

/**
 * What the lazy-pages daemon filled from pre-copy's store by itself (patches/criu/0017), from
 * its log's last line about it; undefined when it did not.
 */
export async function readStoredFill(logPath: string): Promise<{ pages: number; faults: number } | undefined> {
  let fh: Awaited<ReturnType<typeof open>> | undefined;
  try {
    fh = await open(logPath, 'r');
    const size = (await fh.stat()).size;
    const tail = Buffer.alloc(Math.min(size, 16384));
    await fh.read(tail, 0, tail.length, size - tail.length);
    const m = [...tail.toString('latin1').matchAll(/Filled (\d+) pages from the store, (\d+) faults of them/g)].pop();
    return m ? { pages: Number(m[1]), faults: Number(m[2]) } : undefined;
  } catch {
    return undefined;
  } finally {
    await fh?.close();
  }
}

/**
 * CRIU logs "Lock network" right after it has seized every process of the tree (collect_pstree,
 * then the ids, then network_lock; criu/cr-dump.c): from then on the task runs none of its own
 * code until CRIU lets go. Resolves true once the line is in the log, false when `done` says to
 * stop looking (the dump ended, or reached a later point anyway).
 */
export async function untilSeized(logPath: string, done: () => boolean, everyMs = 2): Promise<boolean> {
  let fh: Awaited<ReturnType<typeof open>> | undefined;
  let seen = '';
  let at = 0;
  const buf = Buffer.alloc(64 << 10);
  try {
    while (!done()) {
      fh ??= await open(logPath, 'r').catch(() => undefined);
      if (fh) {
        for (;;) {
          const { bytesRead } = await fh.read(buf, 0, buf.length, at);
          if (bytesRead === 0) break;
          at += bytesRead;
          // Keep a tail so a line split across reads is still found.
          seen = seen.slice(-64) + buf.toString('latin1', 0, bytesRead);
          if (seen.includes('Lock network\n')) return true;
        }
      }
      await new Promise((r) => setTimeout(r, everyMs));
    }
    return false;
  } finally {
    await fh?.close();
  }
}
