// Two controllers on one etcd (Debian's etcd-server, on loopback): one leads, the other stands
// by and says so; killing the leader hands the cluster to the other within the lease, with
// everything the first decided, and the new leader drains a host.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, openSync, closeSync, readFileSync, writeFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { Lab, oneLine } from '../support/lab.js';
import { CLI, WORKLOAD, freePort, runCli, waitFor } from '../support/ferry.js';
import { isAlive } from '../../src/util/proc.js';

const ETCD = '/usr/bin/etcd';
const lab = new Lab('e', 83, 2, undefined, {}, ['--host-memory', '1000MiB']);
const dir = mkdtempSync(join(tmpdir(), 'ferry-ha-'));
const started: ChildProcess[] = [];
let etcdUrl = '';
const ctl: Array<{ api: string; proc?: ChildProcess; log: string }> = [];
let clusterFile = '';

function start(cmd: string, args: string[], log: string): ChildProcess {
  const fd = openSync(log, 'a');
  const p = spawn(cmd, args, { stdio: ['ignore', fd, fd] });
  closeSync(fd);
  started.push(p);
  return p;
}

function stop(p: ChildProcess | undefined): Promise<void> {
  if (!p?.pid || p.exitCode !== null || p.signalCode !== null) return Promise.resolve();
  return new Promise((r) => {
    p.once('exit', () => r());
    p.kill('SIGKILL');
  });
}

before(async () => {
  if (!existsSync(ETCD)) return;
  await lab.down().catch(() => {});
  await lab.up();
  const client = await freePort();
  const peer = await freePort();
  etcdUrl = `127.0.0.1:${client}`;
  start(ETCD, ['--name', 'ferry-test', '--data-dir', join(dir, 'etcd'), '--listen-client-urls', `http://${etcdUrl}`, '--advertise-client-urls', `http://${etcdUrl}`, '--listen-peer-urls', `http://127.0.0.1:${peer}`, '--initial-advertise-peer-urls', `http://127.0.0.1:${peer}`, '--initial-cluster', `ferry-test=http://127.0.0.1:${peer}`], join(dir, 'etcd.log'));
  await waitFor('etcd', async () => (await fetch(`http://${etcdUrl}/health`).then((r) => r.ok, () => false)) || undefined, 20_000, 200);
  assert.equal((await runCli(['cert', 'issue', 'ctl', '--role', 'controller', '--ca-dir', join(lab.dir, 'ca'), '--out', dir])).code, 0);
  for (let i = 0; i < 2; i++) ctl.push({ api: `127.0.0.1:${await freePort()}`, log: join(dir, `controller${i}.log`) });
  const base = JSON.parse(readFileSync(lab.cluster, 'utf8')) as Record<string, unknown>;
  clusterFile = join(dir, 'cluster.json');
  writeFileSync(clusterFile, JSON.stringify({ ...base, ca: join(lab.dir, 'ca', 'ca.crt'), cert: join(lab.dir, 'client.crt'), key: join(lab.dir, 'client.key'), controller: ctl.map((c) => c.api).join(',') }));
});

after(async () => {
  for (const p of started) await stop(p);
  await lab.down();
  await rm(dir, { recursive: true, force: true });
});

function startController(i: number): void {
  const c = ctl[i]!;
  c.proc = start(process.execPath, [CLI, '--cluster', lab.cluster, 'controller', '--ca', join(lab.dir, 'ca', 'ca.crt'), '--cert', join(dir, 'ctl.crt'), '--key', join(dir, 'ctl.key'), '--listen', c.api, '--dashboard', `127.0.0.1:0`, '--store', `etcd://${etcdUrl}`], c.log);
}

const ferry = (args: string[], timeoutMs?: number) => runCli(['--cluster', clusterFile, ...args], {}, timeoutMs);

/** Which controller answers as the leader (the others stand by). */
async function leader(): Promise<number> {
  return waitFor(
    'a leader',
    async () => {
      for (let i = 0; i < ctl.length; i++) {
        if (!ctl[i]!.proc || ctl[i]!.proc!.exitCode !== null || ctl[i]!.proc!.signalCode !== null) continue;
        if ((await ferry(['--controller', ctl[i]!.api, 'hosts'])).code === 0) return i;
      }
      return undefined;
    },
    30_000,
    200,
  );
}

test('two controllers on etcd: one leads, one stands by; the leader killed, the other carries on with its state', { skip: existsSync(ETCD) ? false : `no ${ETCD} (scripts/bootstrap.sh installs etcd-server)` }, async (t) => {
  t.after(() => lab.removeEverywhere('x'));
  startController(0);
  const first = await leader();
  startController(1);
  await waitFor('the second controller standing by', () => readFileSync(ctl[1]!.log, 'utf8').includes('standing by') || undefined, 20_000, 100);
  const standby = 1 - first;
  oneLine(await ferry(['--controller', ctl[standby]!.api, 'hosts']), /this controller stands by: another controller leads/);

  const out = await ferry(['submit', '--name', 'x', '--priority', '5', '--memory', '300MiB', '--', WORKLOAD, '--mib', '32']);
  assert.equal(out.code, 0, out.stderr);
  const host = /runs on (h\d)/.exec(out.stdout)![1]!;
  const sum = await lab.heartbeatReady(host, 'x');
  await ferry(['cordon', host === 'h1' ? 'h2' : 'h1']).then((r) => assert.equal(r.code, 0, r.stderr));

  const dead = ctl[first]!.proc!;
  const killedAt = Date.now();
  process.kill(dead.pid!, 'SIGKILL');
  await waitFor('the leader gone', () => !isAlive(dead.pid!) || undefined);
  assert.equal(await leader(), standby);
  const tookMs = Date.now() - killedAt;
  t.diagnostic(`the standby led ${tookMs} ms after the leader was killed (lease 5 s)`);
  assert.ok(tookMs < 15_000, `took over in ${tookMs} ms`);

  // What the first leader decided is there: the task, where it runs, the cordon.
  const tasks = JSON.parse((await ferry(['tasks', '--json'])).stdout) as Array<{ name: string; host: string; priority: number }>;
  assert.deepEqual(tasks.map((x) => [x.name, x.host, x.priority]), [['x', host, 5]]);
  const hosts = JSON.parse((await ferry(['hosts', '--json'])).stdout) as Array<{ name: string; cordoned: boolean }>;
  assert.equal(hosts.find((h) => h.name !== host)!.cordoned, true);

  // The new leader acts: uncordon the other host and drain this one.
  assert.equal((await ferry(['uncordon', host === 'h1' ? 'h2' : 'h1'])).code, 0);
  const drained = await ferry(['drain', host], 120_000);
  assert.equal(drained.code, 0, drained.stderr + drained.stdout);
  const other = host === 'h1' ? 'h2' : 'h1';
  await lab.assertIntact(other, 'x', sum);
  assert.ok(!(await lab.tasksOn(host)).some((x) => x.name === 'x' && x.state === 'running'), `x must not run on ${host} any more`);
});
