// The pre-check for what CRIU cannot dump, against real processes holding real descriptors.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { test } from 'node:test';
import { dumpBlocker } from '../../src/criu/blockers.js';

/** A python3 process that opens what `setup` says, prints its descriptors, and waits. */
async function holding(t: import('node:test').TestContext, setup: string): Promise<{ pid: number; fds: number[] }> {
  const py = `import ctypes, os, select, socket, sys, time\nlibc = ctypes.CDLL(None, use_errno=True)\nfds = []\n${setup}\nprint(' '.join(map(str, fds)), flush=True)\ntime.sleep(600)`;
  const child = spawn('python3', ['-c', py], { stdio: ['ignore', 'pipe', 'inherit'] });
  t.after(() => {
    child.kill('SIGKILL');
  });
  const [line] = (await once(child.stdout!, 'data')) as [Buffer];
  return { pid: child.pid!, fds: line.toString().trim().split(/\s+/).filter(Boolean).map(Number) };
}

test('descriptors CRIU dumps (eventfd, epoll, signalfd, timerfd, inotify, pidfd, sockets, pipes, memfd) pass', async (t) => {
  const p = await holding(
    t,
    [
      'fds.append(os.eventfd(0))',
      'ep = select.epoll(); fds.append(ep.fileno())',
      'mask = (ctypes.c_uint64 * 16)(1 << 9)',
      'fds.append(libc.signalfd(-1, mask, 0))',
      'fds.append(libc.syscall(283, 1, 0))  # timerfd_create',
      'fds.append(libc.inotify_init1(0))',
      'fds.append(os.pidfd_open(os.getpid()))',
      's = socket.socketpair(); fds += [s[0].fileno(), s[1].fileno()]',
      'r, w = os.pipe(); fds += [r, w]',
      'fds.append(os.memfd_create("x"))',
    ].join('\n'),
  );
  assert.ok(p.fds.every((fd) => fd >= 0), `every descriptor opened: ${p.fds.join(' ')}`);
  assert.equal(dumpBlocker(p.pid, 'ok'), undefined);
});

test('a userfaultfd, an io_uring instance or secret memory is named, with what to do', async (t) => {
  const cases: Array<[string, RegExp, RegExp]> = [
    ['fds.append(libc.syscall(323, os.O_CLOEXEC))', /holds a userfaultfd \(descriptor \d+\), which CRIU cannot checkpoint/, /close it in the task/],
    ['fds.append(libc.syscall(425, 8, (ctypes.c_char * 120)()))', /holds an io_uring instance/, /UV_USE_IO_URING=0/],
    ['fds.append(libc.syscall(447, 0))', /holds secret memory \(memfd_secret, descriptor \d+\)/, /close it in the task/],
  ];
  for (const [setup, what, hint] of cases) {
    const p = await holding(t, setup);
    if (p.fds[0]! < 0) {
      t.diagnostic(`this kernel refused ${setup}: not checked`);
      continue;
    }
    const e = dumpBlocker(p.pid, 'x');
    assert.ok(e, `${setup}: not found`);
    assert.equal(e.code, 'PRECHECK');
    assert.match(e.message, /^process \d+ of task 'x' /);
    assert.match(e.message, what);
    assert.match(e.hint ?? '', hint);
  }
});
