// Commands about agents and hosts: agent, ca, cert, lab, migrate, history.
import type { Command } from 'commander';
import { resolve } from 'node:path';
import { Agent } from '../agent/agent.js';
import { hostAddress } from '../agent/client.js';
import { Criu } from '../criu/driver.js';
import { FerryError } from '../errors.js';
import type { MigrationReport, ProgressEvent } from '../migrate/source.js';
import { labDown, labStatus, labUp } from '../lab/lab.js';
import { Runtime } from '../runtime/runtime.js';
import { caInit, certIssue, loadTls } from '../tls/pki.js';
import { decodeAnswer, requestJson, type Headers, type MuxStream } from '../wire/session.js';
import { isAlive } from '../util/proc.js';
import { configFor, printJson, requireRoot } from './context.js';
import { formatBytes, table } from './format.js';
import { agentSession, remoteTarget } from './remote.js';

export function registerClusterCommands(program: Command): void {
  program
    .command('agent')
    .description("run this host's agent: owns its tasks, serves the CLI and other agents over mutual TLS")
    .requiredOption('--name <name>', 'this host\'s name (its certificate must carry it)')
    .option('--listen <addr>', 'address and port to serve', '0.0.0.0:7443')
    .requiredOption('--ca <file>', 'cluster CA certificate')
    .requiredOption('--cert <file>', "this host's certificate")
    .requiredOption('--key <file>', "this host's private key")
    .action(async (opts: { name: string; listen: string; ca: string; cert: string; key: string }, cmd: Command) => {
      requireRoot();
      const cfg = configFor(cmd);
      const tls = await loadTls({ ca: opts.ca, cert: opts.cert, key: opts.key });
      const rt = new Runtime(cfg.stateDir, new Criu(cfg.criu), cfg.nativeDir);
      const agent = new Agent({ name: opts.name, listen: opts.listen, tls, runtime: rt, log: (l) => process.stdout.write(l + '\n') });
      await agent.start();
      await new Promise<void>((resolveStop) => {
        const stop = () => void agent.close().then(resolveStop);
        process.once('SIGTERM', stop);
        process.once('SIGINT', stop);
      });
      process.stdout.write('agent stopped; tasks keep running\n');
    });

  const ca = program.command('ca').description('the cluster certificate authority');
  ca.command('init')
    .description('create the cluster CA')
    .option('--dir <dir>', 'where to keep it', '/etc/ferry/ca')
    .option('--force', 'replace an existing CA')
    .action(async (opts: { dir: string; force?: boolean }) => {
      const r = await caInit(resolve(opts.dir), { force: !!opts.force });
      process.stdout.write(`created ${r.cert}\n`);
    });

  const cert = program.command('cert').description('host and client certificates');
  cert
    .command('issue')
    .description('issue a certificate signed by the cluster CA')
    .argument('<name>', 'host or client name')
    .option('--ca-dir <dir>', 'the cluster CA', '/etc/ferry/ca')
    .option('--out <dir>', 'where to write NAME.crt and NAME.key', '.')
    .option('--san <addr...>', 'extra addresses or DNS names the certificate names')
    .action(async (name: string, opts: { caDir: string; out: string; san?: string[] }) => {
      const r = await certIssue(resolve(opts.caDir), name, resolve(opts.out), opts.san ?? []);
      process.stdout.write(`issued ${r.cert} and ${r.key}\n`);
    });

  const lab = program.command('lab').description('test hosts on this machine: network namespaces, each with an agent');
  lab
    .command('up')
    .description('start (or repair) a lab')
    .option('--name <name>', 'lab name', 'lab')
    .option('--hosts <n>', 'number of hosts', '2')
    .option('--bandwidth <rate>', 'shape each host link, e.g. 1gbit')
    .option('--subnet <n>', 'third octet of 10.213.N.0/24', '0')
    .option('--json', 'print the lab as JSON')
    .action(async (opts: { name: string; hosts: string; bandwidth?: string; subnet: string; json?: boolean }) => {
      requireRoot();
      const st = await labUp({ name: opts.name, hosts: Number(opts.hosts), subnet: Number(opts.subnet), ...(opts.bandwidth ? { bandwidth: opts.bandwidth } : {}), log: opts.json ? undefined : (l) => process.stdout.write(l + '\n') });
      if (opts.json) return printJson(st);
      process.stdout.write(`lab '${st.name}' is up: ${st.hosts.map((h) => `${h.name}=${h.address}`).join(' ')}\nuse it with: export FERRY_CLUSTER=${st.cluster}\n`);
    });
  lab
    .command('status')
    .description('show a lab')
    .option('--name <name>', 'lab name', 'lab')
    .option('--json', 'print the lab as JSON')
    .action(async (opts: { name: string; json?: boolean }) => {
      const st = await labStatus(opts.name);
      if (!st) throw new FerryError('LAB', `no lab named '${opts.name}' is up`, { hint: 'start one with `ferry lab up`' });
      if (opts.json) return printJson(st);
      process.stdout.write(`lab '${st.name}'${st.bandwidth ? ` (${st.bandwidth} links)` : ''}, cluster file ${st.cluster}\n`);
      process.stdout.write(table(['HOST', 'ADDRESS', 'NETNS', 'AGENT'], st.hosts.map((h) => [h.name, h.address, h.netns, h.agentPid && isAlive(h.agentPid, h.agentStart) ? `pid ${h.agentPid}` : 'down'])));
    });
  lab
    .command('down')
    .description('remove every namespace, link, process and file of a lab')
    .option('--name <name>', 'lab name', 'lab')
    .action(async (opts: { name: string }) => {
      requireRoot();
      const had = await labDown(opts.name, (l) => process.stdout.write(l + '\n'));
      if (!had) process.stdout.write(`no lab named '${opts.name}'\n`);
    });

  program
    .command('migrate')
    .description('move a running task to another host (run through the source host\'s agent)')
    .argument('<task>')
    .requiredOption('--to <host>', 'destination host')
    .option('--mode <mode>', 'stop-copy or post-copy', 'stop-copy')
    .option('--json', 'print the report as JSON')
    .action(async (task: string, opts: { to: string; mode: string; json?: boolean }, cmd: Command) => {
      if (opts.mode !== 'stop-copy' && opts.mode !== 'post-copy') throw new FerryError('USAGE', `unknown --mode '${opts.mode}': use stop-copy or post-copy`);
      const { cluster, host } = await remoteTarget(cmd, true);
      if (opts.to === host) throw new FerryError('USAGE', `task '${task}' is on ${host} already: --to must name another host`);
      const to = { name: opts.to, address: hostAddress(cluster, opts.to) };
      const session = await agentSession(cluster, host);
      try {
        const stream = session.request({ ':method': 'POST', ':path': `/v1/tasks/${encodeURIComponent(task)}/migrate`, 'content-type': 'application/json' });
        stream.end(JSON.stringify({ to, mode: opts.mode }));
        const report = await readMigration(stream, !opts.json && process.stderr.isTTY);
        if (opts.json) printJson(report);
        else printReport(report);
      } finally {
        session.close();
      }
    });

  program
    .command('history')
    .description("the migrations this host's agent has run or received")
    .option('--json', 'print as JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const { cluster, host } = await remoteTarget(cmd, true);
      const session = await agentSession(cluster, host);
      try {
        const h = await requestJson<Array<Partial<MigrationReport> & { at?: string }>>(session, 'GET', '/v1/history');
        if (opts.json) return printJson(h);
        process.stdout.write(
          table(
            ['WHEN', 'TASK', 'FROM', 'TO', 'MODE', 'RESULT', 'BLACKOUT', 'TOTAL'],
            h.map((r) => [r.startedAt ?? r.at ?? '-', r.task ?? '-', r.from ?? '-', r.to ?? '-', r.mode ?? '-', r.ok ? 'ok' : `failed: ${r.error ?? ''}`, r.blackoutMs !== undefined ? `${r.blackoutMs} ms` : '-', r.totalMs !== undefined ? `${r.totalMs} ms` : '-']),
          ),
        );
      } finally {
        session.close();
      }
    });
}

async function readMigration(stream: MuxStream, live: boolean): Promise<MigrationReport> {
  let headers: Headers = {};
  let buf = '';
  let report: MigrationReport | undefined;
  let error: FerryError | undefined;
  let phase = '';
  stream.setEncoding('utf8');
  stream.on('response', (h: Headers) => (headers = h));
  for await (const chunk of stream) {
    buf += chunk as string;
    if (Number(headers[':status']) >= 400) continue;
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      const msg = JSON.parse(line) as { progress?: ProgressEvent; report?: MigrationReport; error?: { code: string; message: string; hint?: string } };
      if (msg.progress?.type === 'phase') phase = msg.progress.phase;
      if (live && msg.progress) {
        const p = msg.progress;
        const bytes = p.type === 'bytes' ? p.pages + p.images + p.files : 0;
        const rate = p.type === 'bytes' && p.elapsedMs > 0 ? (bytes / 1e6 / (p.elapsedMs / 1000)).toFixed(0) : '-';
        process.stderr.write(`\r\x1b[K${phase.padEnd(12)} ${formatBytes(bytes).padStart(10)}  ${rate} MB/s  ${(p.elapsedMs / 1000).toFixed(1)} s`);
      }
      if (msg.report) report = msg.report;
      if (msg.error) error = FerryError.fromJSON(msg.error);
    }
  }
  if (live) process.stderr.write('\r\x1b[K');
  if (Number(headers[':status']) >= 400) decodeAnswer(headers, buf, 'migrate');
  if (error) throw error;
  if (!report) throw new FerryError('PEER', 'the source agent ended the migration without a report', { hint: 'see `ferry history` on the source host' });
  return report;
}

function printReport(r: MigrationReport): void {
  const p = r.phasesMs;
  process.stdout.write(
    `${r.task}: ${r.from} -> ${r.to} (${r.mode}) done in ${r.totalMs} ms, blackout ${r.blackoutMs} ms\n` +
      `  phases: ${Object.entries(p).map(([k, v]) => `${k} ${v} ms`).join(', ')}\n` +
      `  bytes: pages ${formatBytes(r.bytes.pages)}, other images ${formatBytes(r.bytes.images)}, files ${formatBytes(r.bytes.files)}` +
      (r.pageRateMBps ? `, pages at ${r.pageRateMBps} MB/s` : '') +
      '\n' +
      (r.postCopyWindowMs !== undefined ? `  post-copy: all pages local ${r.postCopyWindowMs} ms after resume\n` : ''),
  );
}
