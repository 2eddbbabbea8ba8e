// What CRIU cannot dump and says so only after the task was frozen, often obscurely ("send_fds
// failed (-22)", "Can't lookup mount"): looked for before anything freezes, so the user learns
// what and why at once and the task is not even paused.
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { FerryError } from '../errors.js';
import { nsPid, treePids } from '../util/proc.js';

/** The anonymous-inode descriptors CRIU 4.2 dumps (criu/{eventfd,eventpoll,fsnotify,pidfd,signalfd,timerfd,bpfmap}.c). */
const DUMPABLE_ANON = new Set(['[eventfd]', '[eventpoll]', 'inotify', '[fanotify]', '[pidfd]', '[signalfd]', '[timerfd]', 'bpf-map']);

/** Names users know the others by. */
const ANON_NAMES: Record<string, string> = {
  // The kernel refuses to pass it over a Unix socket, so CRIU's parasite cannot hand it over.
  '[io_uring]': 'an io_uring instance',
  '[userfaultfd]': 'a userfaultfd',
  '[perf_event]': 'a perf event',
  '[landlock-ruleset]': 'a Landlock ruleset',
  '[fscontext]': 'an fsopen file system context',
  'bpf-prog': 'a BPF program',
  'bpf_link': 'a BPF link',
  'kvm-vm': 'a KVM virtual machine',
};

const HINTS: Record<string, string> = {
  '[io_uring]': 'have the program do its I/O without io_uring, then try again; for Node.js and other libuv programs, start the task with --env UV_USE_IO_URING=0',
};
const GENERIC_HINT = 'close it in the task, or run the program without what opens it, then try again';

/** Secret memory (memfd_secret), as a descriptor's target or a mapping's path: no other process can read it, CRIU included. */
const SECRETMEM = '/secretmem( \\(deleted\\))?$';
const SECRET_FD = new RegExp(`^${SECRETMEM}`);
const SECRET_MAPPING = new RegExp(` ${SECRETMEM}`, 'm');

/** The first thing in the tree's processes that CRIU cannot dump, as an error; else undefined. */
export function dumpBlocker(root: number, task: string): FerryError | undefined {
  for (const pid of treePids(root)) {
    const who = () => `process ${nsPid(pid) ?? pid} of task '${task}'`;
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue; // exited meanwhile
    }
    for (const fd of fds) {
      let target: string;
      try {
        target = readlinkSync(`/proc/${pid}/fd/${fd}`);
      } catch {
        continue; // closed meanwhile
      }
      const anon = target.startsWith('anon_inode:') ? target.slice('anon_inode:'.length) : undefined;
      if (anon !== undefined && !DUMPABLE_ANON.has(anon)) {
        return new FerryError('PRECHECK', `${who()} holds ${ANON_NAMES[anon] ?? `a descriptor of a kind CRIU does not know (${target})`} (descriptor ${fd}), which CRIU cannot checkpoint`, { hint: HINTS[anon] ?? GENERIC_HINT });
      }
      if (SECRET_FD.test(target)) return secret(who(), `descriptor ${fd}`);
    }
    let maps = '';
    try {
      maps = readFileSync(`/proc/${pid}/maps`, 'utf8');
    } catch {
      continue;
    }
    if (SECRET_MAPPING.test(maps)) return secret(who(), 'a mapping');
  }
  return undefined;
}

function secret(who: string, where: string): FerryError {
  return new FerryError('PRECHECK', `${who} holds secret memory (memfd_secret, ${where}), which no other process can read, so CRIU cannot checkpoint it`, { hint: GENERIC_HINT });
}
