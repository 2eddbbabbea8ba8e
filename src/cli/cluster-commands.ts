// Commands about agents and hosts: agent, ca, cert, lab, migrate, history.
import type { Command } from 'commander';
import { existsSync } from 'node:fs';
import { availableParallelism, totalmem } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { Agent } from '../agent/agent.js';
import { hostAddress, type Cluster } from '../agent/client.js';
import { Criu } from '../criu/driver.js';
import { FerryError } from '../errors.js';
import type { MigrationReport, ProgressEvent } from '../migrate/source.js';
import { labDown, labStatus, labUp } from '../lab/lab.js';
import { Runtime } from '../runtime/runtime.js';
import { parseCidr } from '../net/tasknet.js';
import { ROLES, type Role } from '../tls/identity.js';
import { caInit, certIssue, certRevoke, loadTls, revokedPath } from '../tls/pki.js';
import { requestJson, type MuxStream } from '../wire/session.js';
import { readMigrationStream } from '../migrate/progress-stream.js';
import { modes } from '../wire/schemas.js';
import { COMPRESS_MODES } from '../wire/codec.js';
import { isAlive } from '../util/proc.js';
import { configFor, printJson, requireRoot } from './context.js';
import { formatBytes, parseSize, table } from './format.js';
import { agentSession, remoteTarget, withAgent } from './remote.js';

export function registerClusterCommands(program: Command): void {
  program
    .command('agent')
    .description("run this host's agent: owns its tasks, serves the CLI and other agents over mutual TLS")
    .requiredOption('--name <name>', 'this host\'s name (its certificate must carry it)')
    .option('--listen <addr>', 'address and port to serve', '0.0.0.0:7443')
    .requiredOption('--ca <file>', 'cluster CA certificate')
    .requiredOption('--cert <file>', "this host's certificate")
    .requiredOption('--key <file>', "this host's private key")
    .option('--revoked <file>', 'revoked certificate serials, one per line; re-read when it changes (default: revoked.txt beside the CA certificate)')
    .option('--net-pool <cidr>', 'cluster-wide address pool for tasks run with --net (the same on every host)')
    .option('--net-uplink <iface>', 'the interface the neighbours reach this host on (with --net-pool)')
    .option('--memory <size>', "memory this host offers tasks placed by the controller, e.g. 64GiB (default: the machine's)")
    .option('--cpus <n>', "CPUs this host offers tasks (default: the machine's)")
    .action(async (opts: { name: string; listen: string; ca: string; cert: string; key: string; revoked?: string; netPool?: string; netUplink?: string; memory?: string; cpus?: string }, cmd: Command) => {
      requireRoot();
      const memBytes = opts.memory === undefined ? totalmem() : parseSize(opts.memory);
      if (memBytes === undefined) throw new FerryError('USAGE', `--memory takes a size such as 512MiB or 64GiB, not '${opts.memory}'`);
      const cpus = opts.cpus === undefined ? availableParallelism() : Number(opts.cpus);
      if (!Number.isInteger(cpus) || cpus < 1 || cpus > 65_536) throw new FerryError('USAGE', `--cpus takes a whole number of CPUs, not '${opts.cpus}'`);
      const cfg = configFor(cmd);
      if (!!opts.netPool !== !!opts.netUplink) throw new FerryError('USAGE', '--net-pool and --net-uplink go together', { hint: 'give both, e.g. --net-pool 10.0.8.0/24 --net-uplink eth0' });
      if (opts.netPool) parseCidr(opts.netPool);
      if (opts.netUplink && !existsSync(`/sys/class/net/${opts.netUplink}`)) throw new FerryError('USAGE', `--net-uplink: no interface named '${opts.netUplink}' on this host`, { hint: 'see `ip link` for the names' });
      const tls = await loadTls({ ca: opts.ca, cert: opts.cert, key: opts.key });
      const rt = new Runtime(cfg.stateDir, new Criu(cfg.criu), cfg.nativeDir, opts.netPool && opts.netUplink ? { pool: opts.netPool, uplink: opts.netUplink } : undefined, cfg.scratchDir);
      const revoked = resolve(opts.revoked ?? join(dirname(opts.ca), 'revoked.txt'));
      const agent = new Agent({ name: opts.name, listen: opts.listen, tls, runtime: rt, revoked, capacity: { memBytes, cpus }, log: (l) => process.stdout.write(l + '\n') });
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
    .option('--role <role>', `what the holder may do: ${ROLES.join(', ')} (agent: a host's agent; operator: run, stop and migrate tasks; reader: ps, logs, history; controller: the cluster controller)`)
    .action(async (name: string, opts: { caDir: string; out: string; san?: string[]; role?: string }) => {
      if (!opts.role) throw new FerryError('USAGE', `name the certificate's role with --role ${ROLES.join('|')}`);
      if (!(ROLES as readonly string[]).includes(opts.role)) throw new FerryError('USAGE', `unknown --role '${opts.role}': use ${ROLES.join(', ')}`);
      const r = await certIssue(resolve(opts.caDir), name, resolve(opts.out), opts.role as Role, opts.san ?? []);
      process.stdout.write(`issued ${r.cert} and ${r.key} (role ${opts.role}, serial ${r.serial})\n`);
    });
  cert
    .command('revoke')
    .description("revoke a certificate: agents that read the CA's revoked.txt refuse it within a second, without a restart")
    .argument('[name]', 'revoke every certificate issued to this name')
    .option('--serial <hex>', 'revoke one certificate by its serial')
    .option('--ca-dir <dir>', 'the cluster CA', '/etc/ferry/ca')
    .action(async (name: string | undefined, opts: { caDir: string; serial?: string }) => {
      if (!name && !opts.serial) throw new FerryError('USAGE', 'name the certificate to revoke, or give --serial');
      const serials = await certRevoke(resolve(opts.caDir), { ...(name ? { name } : {}), ...(opts.serial ? { serial: opts.serial } : {}) });
      process.stdout.write(`revoked ${serials.join(', ')} in ${revokedPath(resolve(opts.caDir))}\n`);
    });

  const lab = program.command('lab').description('test hosts on this machine: network namespaces, each with an agent');
  lab
    .command('up')
    .description('start (or repair) a lab')
    .option('--name <name>', 'lab name', 'lab')
    .option('--hosts <n>', 'number of hosts', '2')
    .option('--bandwidth <rate>', 'shape each host link, e.g. 1gbit')
    .option('--subnet <n>', 'third octet of 10.213.N.0/24', '0')
    .option('--with-controller', 'also run a cluster controller (API on the bridge, dashboard on 127.0.0.1:7480+N, DNS on the bridge)')
    .option('--host-memory <size>', "memory each host offers the controller's tasks, e.g. 512MiB")
    .option('--json', 'print the lab as JSON')
    .action(async (opts: { name: string; hosts: string; bandwidth?: string; subnet: string; withController?: boolean; hostMemory?: string; json?: boolean }) => {
      requireRoot();
      const hostMemory = opts.hostMemory === undefined ? undefined : parseSize(opts.hostMemory);
      if (opts.hostMemory !== undefined && hostMemory === undefined) throw new FerryError('USAGE', `--host-memory takes a size such as 512MiB, not '${opts.hostMemory}'`);
      const st = await labUp({
        name: opts.name,
        hosts: Number(opts.hosts),
        subnet: Number(opts.subnet),
        ...(opts.bandwidth ? { bandwidth: opts.bandwidth } : {}),
        ...(opts.withController ? { controller: true } : {}),
        ...(hostMemory ? { hostMemory } : {}),
        log: opts.json ? undefined : (l) => process.stdout.write(l + '\n'),
      });
      if (opts.json) return printJson(st);
      process.stdout.write(`lab '${st.name}' is up: ${st.hosts.map((h) => `${h.name}=${h.address}`).join(' ')}\nuse it with: export FERRY_CLUSTER=${st.cluster}\n`);
      if (st.controller) process.stdout.write(`controller: API ${st.controller.api}, dashboard http://${st.controller.dashboard}/, DNS ${st.controller.dns}\n`);
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
    .description("move a running task to another host (run through the source host's agent); Ctrl-C cancels")
    .argument('[task]')
    .option('--to <host>', 'destination host')
    .option('--mode <mode>', 'auto (pre-copy while it converges), pre-copy, stop-copy or post-copy', 'auto')
    .option('--max-downtime <ms>', 'pre-copy/auto: the pause to aim for, in ms (default 300)')
    .option('--max-rounds <n>', 'pre-copy/auto: at most this many rounds while the task runs (default 8)')
    .option('--allow-post-copy', 'auto: a task that writes faster than the link finishes by post-copy of what is left')
    .option('--allow-throttle', "auto: a task that writes faster than the link is slowed (its CPU quota) until pre-copy converges")
    .option('--compress <when>', 'compress memory on the way with lz4: off, on, or auto (where the codec outruns the link and the pages shrink)', 'auto')
    .option('--cancel <id>', 'cancel a migration under way on --host (see `ferry migrations`)')
    .option('--json', 'print the report as JSON')
    .action(async (task: string | undefined, opts: { to?: string; mode: string; maxDowntime?: string; maxRounds?: string; allowPostCopy?: boolean; allowThrottle?: boolean; compress: string; cancel?: string; json?: boolean }, cmd: Command) => {
      if (opts.cancel) {
        const r = await withAgent(cmd, (s) => requestJson<{ message: string }>(s, 'POST', `/v1/migrations/${encodeURIComponent(opts.cancel!)}/cancel`, {}));
        if (opts.json) printJson(r);
        else process.stdout.write(`${r.message}\n`);
        return;
      }
      const { cluster, host } = await remoteTarget(cmd, true);
      if (!task) throw new FerryError('USAGE', 'name the task to migrate: `ferry --host HOST migrate TASK --to HOST`');
      if (!opts.to) throw new FerryError('USAGE', 'name the destination with --to HOST');
      if (!(modes as readonly string[]).includes(opts.mode)) throw new FerryError('USAGE', `unknown --mode '${opts.mode}': use ${modes.join(', ')}`);
      const positive = (v: string | undefined, flag: string, max: number): number | undefined => {
        if (v === undefined) return undefined;
        const n = Number(v);
        if (!Number.isInteger(n) || n < 1 || n > max) throw new FerryError('USAGE', `${flag} must be a whole number from 1 to ${max}, not '${v}'`);
        return n;
      };
      const maxDowntimeMs = positive(opts.maxDowntime, '--max-downtime', 3_600_000);
      const maxRounds = positive(opts.maxRounds, '--max-rounds', 100);
      if ((maxDowntimeMs !== undefined || maxRounds !== undefined) && opts.mode !== 'pre-copy' && opts.mode !== 'auto') throw new FerryError('USAGE', `--max-downtime and --max-rounds apply to --mode pre-copy and auto, not ${opts.mode}`);
      if (opts.allowPostCopy && opts.mode !== 'auto') throw new FerryError('USAGE', `--allow-post-copy applies to --mode auto, not ${opts.mode}`);
      if (opts.allowThrottle && opts.mode !== 'auto') throw new FerryError('USAGE', `--allow-throttle applies to --mode auto, not ${opts.mode}`);
      if (!(COMPRESS_MODES as readonly string[]).includes(opts.compress)) throw new FerryError('USAGE', `unknown --compress '${opts.compress}': use off, auto or on`);
      if (opts.compress === 'on' && opts.mode === 'post-copy') throw new FerryError('USAGE', '--compress on applies to stop-copy, pre-copy and auto: post-copy pages go uncompressed (a fault must not wait for a codec)');
      if (opts.to === host) throw new FerryError('USAGE', `task '${task}' is on ${host} already: --to must name another host`);
      const to = { name: opts.to, address: hostAddress(cluster, opts.to) };
      const session = await agentSession(cluster, host);
      let id: string | undefined;
      // Ctrl-C asks the agent to cancel and waits for the outcome, so the last line says where the
      // task runs; a second Ctrl-C leaves at once (the agent still cancels: the stream closes).
      let interrupted = false;
      const onInt = () => {
        if (interrupted || !id) process.exit(130);
        interrupted = true;
        process.stderr.write(`\r\x1b[Kcancelling migration ${id}...\n`);
        void requestJson<{ message: string }>(session, 'POST', `/v1/migrations/${id}/cancel`, {}).then(
          (r) => process.stderr.write(`${r.message}\n`),
          (e: Error) => process.stderr.write(`ferry: ${e.message}\n`),
        );
      };
      process.on('SIGINT', onInt);
      try {
        const stream = session.request({ ':method': 'POST', ':path': `/v1/tasks/${encodeURIComponent(task)}/migrate`, 'content-type': 'application/json' });
        stream.end(JSON.stringify({ to, mode: opts.mode, ...(maxDowntimeMs !== undefined ? { maxDowntimeMs } : {}), ...(maxRounds !== undefined ? { maxRounds } : {}), ...(opts.allowPostCopy ? { allowPostCopy: true } : {}), ...(opts.allowThrottle ? { allowThrottle: true } : {}), compress: opts.compress }));
        let report: MigrationReport;
        try {
          report = await readMigration(stream, !opts.json && process.stderr.isTTY, (i) => (id = i));
        } catch (e) {
          // The source agent went away mid-migration: once it is back, it knows how it ended
          // (before it said the migration's id, nothing was frozen: where the task runs says it).
          if (!(e instanceof FerryError && e.code === 'PEER')) throw e;
          throw id ? await outcomeAfterLoss(cluster, host, id, task, opts.to) : await whereAfterLoss(cluster, host, task, opts.to);
        }
        if (opts.json) printJson(report);
        else printReport(report);
      } finally {
        process.off('SIGINT', onInt);
        session.close();
      }
    });

  program
    .command('settle')
    .description("run or drop a task's restored copy on --host that waits for a decision its source host will never send (that host is gone for good)")
    .argument('<task>')
    .option('--run', 'run the copy here (refused when part of its memory was still to come from the source)')
    .option('--drop', 'drop the copy here')
    .option('--source-gone', 'confirm that the source host is down for good, not just cut off: if it ran on, the task would run twice')
    .option('--json', 'print the outcome as JSON')
    .action(async (task: string, opts: { run?: boolean; drop?: boolean; sourceGone?: boolean; json?: boolean }, cmd: Command) => {
      if (!!opts.run === !!opts.drop) throw new FerryError('USAGE', 'say what to do with the copy: --run or --drop');
      const outcome = opts.run ? 'run' : 'drop';
      const r = await withAgent(cmd, async (s, { cluster, host }) => {
        const held = await requestJson<{ id: string; from: string }>(s, 'POST', `/v1/tasks/${encodeURIComponent(task)}/settle`, { outcome, dryRun: true });
        if (!opts.sourceGone) {
          throw new FerryError('USAGE', `the copy of '${task}' on ${host} waits for ${held.from} to decide (migration ${held.id})`, { hint: `if ${held.from} is gone for good, add --source-gone; if it comes back, its agent settles the migration by itself` });
        }
        if (cluster.hosts[held.from]) {
          // One that answers decides itself: settling in its place could run the task twice.
          const other = await agentSession(cluster, held.from).catch(() => undefined);
          if (other) {
            other.close();
            throw new FerryError('USAGE', `${held.from} answers: its agent settles migration ${held.id} itself (it retries until ${host} hears it)`, { hint: `see \`ferry --host ${held.from} migrations\`` });
          }
        }
        await requestJson<{ id: string; from: string }>(s, 'POST', `/v1/tasks/${encodeURIComponent(task)}/settle`, { outcome });
        return { task, host, ...held, outcome };
      });
      if (opts.json) printJson(r);
      else process.stdout.write(r.outcome === 'run' ? `${task} runs on ${r.host} (migration ${r.id} from ${r.from}, settled by hand)\n` : `${task}: the copy on ${r.host} was dropped (migration ${r.id} from ${r.from})\n`);
    });

  program
    .command('migrations')
    .description("migrations under way on --host's agent")
    .option('--json', 'print as JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const list = await withAgent(cmd, (s) => requestJson<Array<{ id: string; task: string; to: string; mode: string; phase: string; elapsedMs: number; decided: boolean }>>(s, 'GET', '/v1/migrations'));
      if (opts.json) return printJson(list);
      process.stdout.write(table(['ID', 'TASK', 'TO', 'MODE', 'PHASE', 'ELAPSED', 'CANCELLABLE'], list.map((m) => [m.id, m.task, m.to, m.mode, m.phase, `${(m.elapsedMs / 1000).toFixed(1)} s`, m.decided ? 'no' : 'yes'])));
    });

  program
    .command('history')
    .description("the migrations this host's agent has run or received")
    .option('--json', 'print as JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const h = await withAgent(cmd, (s) => requestJson<Array<Partial<MigrationReport> & { at?: string }>>(s, 'GET', '/v1/history'));
      if (opts.json) return printJson(h);
      process.stdout.write(
        table(
          ['WHEN', 'TASK', 'FROM', 'TO', 'MODE', 'RESULT', 'BLACKOUT', 'TOTAL'],
          h.map((r) => [r.startedAt ?? r.at ?? '-', r.task ?? '-', r.from ?? '-', r.to ?? '-', r.mode ?? '-', r.ok ? 'ok' : `failed: ${r.error ?? ''}`, r.blackoutMs !== undefined ? `${r.blackoutMs} ms` : '-', r.totalMs !== undefined ? `${r.totalMs} ms` : '-']),
        ),
      );
    });
}

/**
 * Asks every second, for a minute, until `ask` has an answer (undefined: not yet; it throws while
 * an agent does not answer).
 */
async function onceBack<T>(ask: () => Promise<T | undefined>): Promise<T | undefined> {
  const end = Date.now() + 60_000;
  while (Date.now() < end) {
    const answer = await ask().catch(() => undefined);
    if (answer !== undefined) return answer;
    await new Promise((r) => setTimeout(r, 1000));
  }
  return undefined;
}

/** One request on a session of its own to the agent on host. */
async function askAgent<T>(cluster: Cluster, host: string, path: string): Promise<T> {
  const s = await agentSession(cluster, host);
  try {
    return await requestJson<T>(s, 'GET', path);
  } finally {
    s.close();
  }
}

/** Asks a restarted source agent how a migration ended; the answer is the CLI's last line. */
async function outcomeAfterLoss(cluster: Cluster, host: string, id: string, task: string, to: string): Promise<FerryError> {
  const said = await onceBack(async () => {
    const st = await askAgent<{ state: string; ok?: boolean; where?: string }>(cluster, host, `/v1/migrations/${id}`);
    if (st.state !== 'done') return undefined;
    return new FerryError('MIGRATION', `the agent on ${host} went away during the migration of '${task}' to ${to} (${id}); the task is running on ${st.where}`, st.ok ? { hint: 'the migration completed; there is no report' } : {});
  });
  return said ?? new FerryError('MIGRATION', `the agent on ${host} went away during the migration of '${task}' to ${to} (${id}) and has not come back within a minute`, { hint: `check \`ferry --host ${host} ps\` and \`ferry --host ${to} ps\`` });
}

/** The source agent went away before the migration had an id (nothing was frozen): once it answers, where the task runs. */
async function whereAfterLoss(cluster: Cluster, host: string, task: string, to: string): Promise<FerryError> {
  const said = await onceBack(async () => {
    for (const h of [host, to]) {
      const tasks = await askAgent<Array<{ name: string; state: string }>>(cluster, h, '/v1/tasks');
      if (tasks.some((t) => t.name === task && t.state === 'running')) return new FerryError('MIGRATION', `the agent on ${host} went away as the migration of '${task}' to ${to} began; the task is running on ${h}`);
    }
    return new FerryError('MIGRATION', `the agent on ${host} went away as the migration of '${task}' to ${to} began; the task runs on neither host`, { hint: `see \`ferry --host ${host} ps\` and \`ferry --host ${host} history\`` });
  });
  return said ?? new FerryError('MIGRATION', `the agent on ${host} went away as the migration of '${task}' to ${to} began, and has not come back within a minute`, { hint: `check \`ferry --host ${host} ps\` and \`ferry --host ${to} ps\`` });
}

async function readMigration(stream: MuxStream, live: boolean, onId: (id: string) => void): Promise<MigrationReport> {
  let phase = '';
  try {
    return await readMigrationStream(stream, (p) => {
      if (p.type === 'start') {
        onId(p.id);
        if (live) process.stderr.write(`migration ${p.id} (Ctrl-C cancels)\n`);
        return;
      }
      if (p.type === 'phase') phase = p.phase;
      // Rounds and notes stay on screen; the progress line is redrawn below them.
      if (p.type === 'round' || p.type === 'note') {
        const text =
          p.type === 'round'
            ? `round ${p.round.round}: ${formatBytes(p.round.bytes)} in ${p.round.ms} ms (${p.round.linkMBps} MB/s), written meanwhile ${formatBytes(p.round.dirtyPages * 4096)} (${p.round.dirtyRateMBps} MB/s${p.round.writeRateMBps !== undefined ? `; the task writes ~${p.round.writeRateMBps} MB/s` : ''}), pause if stopped now ~${p.round.expectedDowntimeMs} ms${p.round.throttle ? `, task at ${Math.round((1 - p.round.throttle) * 100)} % CPU` : ''}`
            : `note: ${p.message}`;
        if (live || p.type === 'note') process.stderr.write(`\r\x1b[K${text}\n`);
        return;
      }
      if (live) {
        const bytes = p.type === 'bytes' ? p.pages + p.images + p.files : 0;
        const rate = p.type === 'bytes' && p.elapsedMs > 0 ? (bytes / 1e6 / (p.elapsedMs / 1000)).toFixed(0) : '-';
        process.stderr.write(`\r\x1b[K${phase.padEnd(12)} ${formatBytes(bytes).padStart(10)}  ${rate} MB/s  ${(p.elapsedMs / 1000).toFixed(1)} s`);
      }
    });
  } finally {
    if (live) process.stderr.write('\r\x1b[K');
  }
}

function printReport(r: MigrationReport): void {
  const p = r.phasesMs;
  process.stdout.write(
    `${r.task}: ${r.from} -> ${r.to} (${r.mode}) done in ${r.totalMs} ms, blackout ${r.blackoutMs} ms\n` +
      `  phases: ${Object.entries(p).map(([k, v]) => `${k} ${v} ms`).join(', ')}\n` +
      `  bytes: pages ${formatBytes(r.bytes.pages)}, other images ${formatBytes(r.bytes.images)}, files ${formatBytes(r.bytes.files)}` +
      (r.pageRateMBps ? `, pages at ${r.pageRateMBps} MB/s` : '') +
      '\n' +
      (r.precopy
        ? `  pre-copy: ${r.precopy.rounds.length} rounds (${r.precopy.verdict}), ${r.precopy.rounds.map((x) => `${formatBytes(x.bytes)}/${x.ms} ms`).join(', ')}; last delta ${formatBytes(r.precopy.finalBytes)} (${r.precopy.finish})\n`
        : '') +
      (r.compression && r.compression.rawBytes > 0
        ? `  compression (${r.compression.mode}): ${formatBytes(r.compression.rawBytes)} of memory went as ${formatBytes(r.compression.wireBytes)}, lz4 on ${r.compression.compressedFrames} of ${r.compression.frames} frames\n`
        : '') +
      (r.destination?.fillsAlone ? `  memory: every page was on ${r.to} at the resume; it fills the task from its own copy, needing nothing of ${r.from}\n` : '') +
      (r.postCopyWindowMs !== undefined ? `  ${r.precopy?.finish === 'residue sent' ? 'local fill' : 'post-copy'}: all pages in the task ${r.postCopyWindowMs} ms after resume\n` : '') +
      (r.warnings ?? []).map((w) => `  note: ${w}\n`).join(''),
  );
}
