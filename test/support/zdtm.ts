// CRIU's own tests of one kernel object each (test/zdtm/static, built by scripts/bootstrap.sh):
// a timer, an eventfd, an inotify watch, a socket of each kind with data queued, a mapping, SysV
// IPC, a deleted file still open, ... Each is another author's program that sets its object up,
// daemonizes (its first process exits), waits for SIGTERM, then checks that the object is as it
// left it and writes PASS or FAIL. Here each runs as a Ferry task, moves h1 -> h2 in every mode,
// and gets its SIGTERM there: its own check decides. The modes run in two files
// (test/migrate/zdtm-*.test.ts), each within the test runner's time for one file.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { Lab } from './lab.js';
import { waitFor } from './ferry.js';

const ZDTM = join(process.env['FERRY_CACHE'] ?? '/var/cache/ferry', 'zdtm');
const COMMANDS = join(ZDTM, 'commands');
const missing = existsSync(COMMANDS) ? false : `no ${COMMANDS} (scripts/bootstrap.sh builds CRIU's zdtm tests)`;
/**
 * Tasks set up, moved and checked at once: six, as a host drained of its tasks moves several at a
 * time (six at a time found two bugs one at a time did not, see README).
 */
const PARALLEL = 6;

/**
 * Tests of one kernel object each (terminals, FIFOs, descriptors passed over sockets, pidfds,
 * credentials, stopped processes, ...), whose state moves in CRIU's images the same way in every
 * mode: moved by stop-copy and by auto (the default: pre-copy, then the local fill) only, to keep
 * the suite's time (scripts/bootstrap.sh builds them with the others). The others, memory among
 * them, move by all four.
 */
const OBJECT_TESTS = new Set([
  'pty00', 'pty02', 'pty04', 'tty00', 'tty03', 'fifo-ghost', 'fifo-rowo-pair', 'unlink_fifo', 'scm00', 'scm03', 'scm05',
  'sockets01', 'sockets_spair', 'sockets03', 'sk-unix-rel', 'del_standalone_un', 'sk-unix-dgram-ghost', 'sk-unix-listen01',
  'socket_listen6', 'socket_udp_shutdown', 'socket-tcp-listen', 'socket-tcp', 'sock_filter00', 'sock_tcp_opts00',
  'pidfd_child', 'pidfd_kill', 'fd_from_pidfd', 'ghost_holes00', 'unlink_fstat02', 'rmdir_open', 'opath_file', 'cwd01',
  'write_read10', 'file_fown', 'fdt_shared', 'file_shared', 'aio00', 'timers', 'rlimits00', 'thread_different_uid_gid',
  'stopped', 'stopped03', 'child_subreaper', 'pstree', 'dumpable02',
  // They read /proc/PID by the pid they see, or mount inside the task's own mount namespace.
  'seccomp_strict', 'seccomp_filter', 'seccomp_filter_tsync', 'seccomp_filter_threads', 'seccomp_filter_inheritance',
  'file_locks05', 'file_locks07', 'inotify01', 'proc-self', 'pidfd_self', 'unhashed_proc', 'tempfs', 'tempfs_overmounted',
  'bind-mount', 'mountpoints', 'private_bind_propagation',
]);

/** Each test's command line, as zdtm runs it: `NAME --pidfile=NAME.pid --outfile=NAME.out ...`. */
function commands(): Array<{ name: string; argv: string[] }> {
  return readFileSync(COMMANDS, 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((line) => {
      const argv = line.split(' ');
      return { name: argv[0]!, argv: [join(ZDTM, argv[0]!), ...argv.slice(1)] };
    });
}

function readOr(path: string): string | undefined {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return undefined;
  }
}

async function inBatches<T>(items: T[], n: number, fn: (x: T) => Promise<void>): Promise<void> {
  const queue = [...items];
  await Promise.all(Array.from({ length: n }, async () => {
    for (let x = queue.shift(); x !== undefined; x = queue.shift()) await fn(x);
  }));
}

export type ZdtmMode = 'stop-copy' | 'pre-copy' | 'post-copy' | 'auto';

/** The zdtm tests moved by each of `modes`, on a lab of its own (`labName`, `subnet`). */
export function zdtmSuite(modes: ZdtmMode[], labName: string, subnet: number): void {
  const lab = new Lab(labName, subnet, 2);
  const work = mkdtempSync(join(tmpdir(), 'ferry-zdtm-'));

  before(async () => {
    if (missing) return;
    await lab.down().catch(() => {});
    await lab.up();
  });
  after(async () => {
    if (!missing) await lab.down();
    await rm(work, { recursive: true, force: true });
  });

  for (const mode of modes) suite(lab, work, mode);
}

function suite(lab: Lab, work: string, mode: ZdtmMode): void {
  test(`CRIU's zdtm tests (files, sockets, timers, IPC, mappings) pass their own checks after moving by ${mode}`, { skip: missing }, async (t) => {
    const failed: string[] = [];
    const all = commands();
    assert.ok(all.length >= 20, `only ${all.length} zdtm tests built`);
    const tests = mode === 'stop-copy' || mode === 'auto' ? all : all.filter((c) => !OBJECT_TESTS.has(c.name));
    await inBatches(tests, PARALLEL, async ({ name, argv }) => {
      const task = `z-${name.replace(/_/g, '-').toLowerCase()}-${mode}`.slice(0, 63);
      const cwd = join(work, task);
      mkdirSync(cwd);
      t.after(() => lab.removeEverywhere(task));
      const say = (what: string): void => void failed.push(`${name}: ${what}`);
      await lab.ok(['--host', 'h1', 'run', '--name', task, '--cwd', cwd, '--', ...argv]);
      // Its pidfile says it is set up and waits for the signal.
      const ready = await waitFor(`${name} set up`, () => existsSync(join(cwd, `${name}.pid`)) || undefined, 20_000, 20).catch(() => false);
      if (!ready) return say(`not set up: ${lab.logOf('h1', task).slice(-300)}`);
      const moved = await lab.ferry(['--host', 'h1', 'migrate', task, '--to', 'h2', '--mode', mode], 120_000);
      if (moved.code !== 0) return say(`migration failed: ${moved.stderr.trim()}`);
      // As zdtm does: SIGTERM to the test's own process (its pidfile names it as the task sees
      // it), which checks its object while its helpers still run; then the task is stopped.
      const pid = readOr(join(cwd, `${name}.pid`))?.trim() ?? '';
      const signalled = await lab.ferry(['--host', 'h2', 'kill', '-s', 'TERM', '--pid', pid, task], 60_000);
      if (signalled.code !== 0) return say(`kill --pid ${pid} failed: ${signalled.stderr.trim()}`);
      const out = join(cwd, `${name}.out`);
      await waitFor(`${name}'s verdict`, () => existsSync(out) || undefined, 20_000, 20).catch(() => undefined);
      // Its helpers, if any outlived it (a task that ended already is fine).
      const stopped = await lab.ferry(['--host', 'h2', 'stop', task], 60_000);
      if (stopped.code !== 0 && !/is not running: it has exited/.test(stopped.stderr)) return say(`stop failed: ${stopped.stderr.trim()}`);
      const verdict = [out, `${out}.inprogress`].map(readOr).find((x) => x !== undefined) ?? '(no output)';
      if (!/\bPASS\b/.test(verdict)) say(`its check failed: ${verdict.trim().split('\n').slice(-4).join(' | ')}`);
    });
    t.diagnostic(`${tests.length - failed.length} of ${tests.length} zdtm tests passed after ${mode}`);
    assert.deepEqual(failed, []);
  });
}
