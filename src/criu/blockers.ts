// What CRIU cannot dump and says so only as an obscure failure deep in the dump, after the task
// was frozen: looked for before anything freezes, so the user learns what and why at once.
import { readdirSync, readlinkSync } from 'node:fs';
import { FerryError } from '../errors.js';
import { nsPid, treePids } from '../util/proc.js';

/**
 * An io_uring instance: the kernel refuses to pass its descriptor over a Unix socket, so CRIU's
 * parasite fails to hand it over ("send_fds failed (-22)") and the dump ends.
 */
const IO_URING = 'anon_inode:[io_uring]';

/** The first descriptor of the tree's processes that CRIU cannot dump, as an error; else undefined. */
export function dumpBlocker(root: number, task: string): FerryError | undefined {
  for (const pid of treePids(root)) {
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
      if (target === IO_URING) {
        const seen = nsPid(pid);
        return new FerryError('PRECHECK', `process ${seen ?? pid} of task '${task}' holds an io_uring instance (descriptor ${fd}), which CRIU cannot checkpoint`, {
          hint: 'have the program do its I/O without io_uring, then try again; for Node.js and other libuv programs, start the task with --env UV_USE_IO_URING=0',
        });
      }
    }
  }
  return undefined;
}
