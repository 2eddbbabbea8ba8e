// The pre-copy tracker on a real process: when nothing takes its page records any more (the
// destination reset the stream mid-round), stopping it ends it and leaves the task as it was.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { test } from 'node:test';
import { Tracker } from '../../src/precopy/tracker.js';
import { Compressor } from '../../src/wire/codec.js';
import { NATIVE } from '../support/ferry.js';

const WORKLOAD = join(NATIVE, 'ferry-workload');

function userfaultfds(pid: number): number {
  let n = 0;
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      if (readlinkSync(`/proc/${pid}/fd/${fd}`).includes('userfaultfd')) n++;
    } catch {
      /* closed meanwhile */
    }
  }
  return n;
}

const state = (pid: number) => /State:\s+(\S)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];

test('tracker: records nobody reads (the stream they went to through a compressor was reset mid-round) do not keep it from stopping; the round fails, the task runs on unarmed', { timeout: 60_000 }, async (t) => {
  const task = spawn(WORKLOAD, ['--mib', '64', '--interval-ms', '50'], { stdio: ['ignore', 'pipe', 'ignore'] });
  t.after(() => task.kill('SIGKILL'));
  let out = '';
  task.stdout!.on('data', (c: Buffer) => (out += c));
  const beats = () => out.split('\n').filter((l) => l.startsWith('hb ')).length;
  while (beats() < 2) await new Promise((r) => setTimeout(r, 20));

  const tracker = new Tracker(NATIVE);
  t.after(() => tracker.stop());
  // The records go to a stream that takes a little and then nothing, and is destroyed (as a
  // destination that reset it): the helper fills the pipe and blocks writing 64 MiB nobody takes.
  // Between them a compressor, as in a migration that compresses (auto, the default).
  const stream = new PassThrough({ highWaterMark: 1 << 20 });
  tracker.pages.pipe(new Compressor('on')).pipe(stream);
  const round = tracker.round([task.pid!]);
  round.catch(() => {});
  await new Promise((r) => setTimeout(r, 1000));
  stream.destroy();
  await new Promise((r) => setTimeout(r, 200));
  let timer: NodeJS.Timeout | undefined;
  const stopped = await Promise.race([tracker.stop().then(() => 'stopped' as const), new Promise<'hung'>((r) => (timer = setTimeout(() => r('hung'), 15_000)))]);
  clearTimeout(timer);
  assert.equal(stopped, 'stopped', 'stop() returns once the helper has ended');
  await assert.rejects(round, /ferry-track ended/);

  // The task: not stopped, no userfaultfd of ours left in it, and it beats on.
  assert.notEqual(state(task.pid!), 't', 'not left stopped');
  assert.equal(userfaultfds(task.pid!), 0, 'no descriptor left in the task');
  const before = beats();
  await new Promise((r) => setTimeout(r, 500));
  assert.ok(beats() > before, 'the task runs on');
});
