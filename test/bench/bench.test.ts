// The benchmark's measurement code, run end to end on a tiny workload so it cannot rot unseen.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { repoRoot } from '../../src/config.js';
import { renderMarkdown, stat, summarize } from '../../src/bench/report.js';

test('medians, min and max', () => {
  assert.deepEqual(stat([3, 1, 2]), { median: 2, min: 1, max: 3 });
  assert.deepEqual(stat([4, 1, 2, 3]), { median: 2.5, min: 1, max: 4 });
  assert.equal(stat([]), undefined);
  const r = summarize('x', { mib: 1, dirtyMiBps: 0, pattern: 'uniform' as const }, [], ['boom']);
  assert.match(renderMarkdown({ date: 'd', machine: 'm', link: 'l', runs: 1 }, [r], []), /failed: boom/);
});

test('the benchmark measures every contender on a tiny workload', async (t) => {
  const out = mkdtempSync(join(tmpdir(), 'ferry-bench-test-'));
  t.after(() => rmSync(out, { recursive: true, force: true }));
  const code = await new Promise<number>((resolve) => {
    const p = spawn(process.execPath, [join(repoRoot, 'dist', 'src', 'bench', 'main.js'), '--sizes', '16', '--dirty-rates', '4', '--runs', '1', '--bandwidth', '1gbit', '--subnet', '97', '--service-mib', '4', '--out', out], { stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    p.stderr.on('data', (c) => (err += c));
    p.on('close', (c) => {
      if (c !== 0) t.diagnostic(err);
      resolve(c ?? -1);
    });
  });
  assert.equal(code, 0);
  for (const f of ['latest.json', 'latest.md', 'latest.svg']) assert.ok(existsSync(join(out, f)), f);
  const j = JSON.parse(readFileSync(join(out, 'latest.json'), 'utf8')) as {
    results: Array<{ contender: string; runs: number; errors: string[]; pauseMs?: { median: number }; wireMiB?: { median: number } }>;
    skipped: Array<{ contender: string }>;
    service: Array<{ mode: string; runs: number; errors: string[]; broken: number; wrong: number; blackoutMs?: { median: number }; clientPauseMs?: { median: number } }>;
  };
  // The service row: redis with a client, per mode, the client's pause beside the task's.
  assert.deepEqual(j.service.map((s) => s.mode), ['stop-copy', 'post-copy', 'pre-copy', 'auto']);
  for (const s of j.service) {
    assert.deepEqual(s.errors, [], `service ${s.mode} failed`);
    assert.equal(s.broken, 0, `service ${s.mode}: the client's connection broke`);
    assert.equal(s.wrong, 0);
    assert.ok(s.blackoutMs && s.clientPauseMs && s.clientPauseMs.median > 0, `service ${s.mode}: both pauses measured`);
  }
  assert.match(readFileSync(join(out, 'latest.md'), 'utf8'), /longest wait the client saw/);
  const names = [...j.results.map((r) => r.contender), ...j.skipped.map((s) => s.contender)];
  for (const c of ['plain', 'criu page-server', 'criu lazy-pages', 'podman', 'ferry stop-copy', 'ferry post-copy']) {
    assert.ok(names.some((n) => n.includes(c)), `${c} must be measured or skipped with a reason`);
  }
  for (const r of j.results) {
    assert.deepEqual(r.errors, [], `${r.contender} failed`);
    assert.equal(r.runs, 1);
    assert.ok(r.pauseMs && r.pauseMs.median > 0, `${r.contender}: a pause must be measured`);
    assert.ok(r.wireMiB && r.wireMiB.median >= 16, `${r.contender}: at least the workload's memory crossed the link (${r.wireMiB?.median} MiB)`);
  }
  assert.match(readFileSync(join(out, 'latest.svg'), 'utf8'), /^<svg/);
});
