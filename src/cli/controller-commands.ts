// Commands about the cluster as a whole, served by `ferry controller`: submit, drain, cordon,
// uncordon, resolve, hosts, tasks.
import type { Command } from 'commander';
import { Option } from 'commander';
import { hostname } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { loadCluster, type Cluster } from '../agent/client.js';
import { controllerRequest } from '../cluster/client.js';
import { Controller, type ControllerHost, type ControllerTask, type DrainRecord, type MigrationRecord } from '../cluster/controller.js';
import { DnsResponder } from '../cluster/dns.js';
import { ControllerServer, Metrics } from '../cluster/server.js';
import { EtcdStore, openStore } from '../cluster/store.js';
import { FerryError } from '../errors.js';
import { loadTls, RevocationList } from '../tls/pki.js';
import { modes } from '../wire/schemas.js';
import { printJson } from './context.js';
import { collectEnv } from './task-commands.js';
import { formatBytes, parseSize, table } from './format.js';

/** A leader's lease in etcd: how long a dead leader holds the cluster before another takes over. */
const LEASE_S = 5;

const clusterFile = (cmd: Command) => (cmd.optsWithGlobals() as { cluster?: string }).cluster ?? '/etc/ferry/cluster.json';

/** The cluster file and the controller's address (--controller, FERRY_CONTROLLER, or the file's). */
async function target(cmd: Command): Promise<{ cluster: Cluster; address: string }> {
  const cluster = await loadCluster(clusterFile(cmd));
  const address = (cmd.optsWithGlobals() as { controller?: string }).controller ?? cluster.controller;
  if (!address) throw new FerryError('USAGE', `no controller named in ${cluster.file}`, { hint: 'add "controller": "HOST:PORT" to it, or pass --controller HOST:PORT' });
  return { cluster, address };
}

/** Asks the controllers named (comma-separated) in turn: the first that leads answers. */
async function ask<T>(cmd: Command, method: string, path: string, body?: unknown, timeoutMs?: number): Promise<T> {
  const { cluster, address } = await target(cmd);
  const addresses = address.split(',').map((a) => a.trim()).filter(Boolean);
  const missed: string[] = [];
  for (const a of addresses) {
    try {
      return await controllerRequest<T>(a, cluster.tls, method, path, body, timeoutMs);
    } catch (e) {
      // Another controller may lead: only an unreachable or standing-by one is passed over.
      if (!(e instanceof FerryError) || (e.code !== 'STANDBY' && e.code !== 'CONTROLLER') || addresses.length === 1) throw e;
      missed.push(`${a}: ${e.code === 'STANDBY' ? 'stands by' : e.message.replace(/^cannot reach the controller at \S+: /, '')}`);
    }
  }
  throw new FerryError('CONTROLLER', `no controller leads: ${missed.join('; ')}`, { hint: 'a new leader is elected within the lease (5 s); is any `ferry controller` running?' });
}

export function registerControllerCommands(program: Command): void {
  program.addOption(new Option('--controller <addr>', "the cluster controller's API address (default: the cluster file's)").env('FERRY_CONTROLLER'));

  program
    .command('controller')
    .description('run the cluster controller: places tasks, makes room by migrating, drains hosts, serves names, the API, metrics and a dashboard')
    .requiredOption('--ca <file>', 'cluster CA certificate')
    .requiredOption('--cert <file>', "the controller's certificate (issued with --role controller)")
    .requiredOption('--key <file>', "the controller's private key")
    .option('--listen <addr>', 'API address (mutual TLS)', '0.0.0.0:7450')
    .option('--dashboard <addr>', 'read-only dashboard and /metrics, plain HTTP (keep it on loopback or a trusted network)', '127.0.0.1:7480')
    .option('--dns <addr>', 'serve NAME.ferry. over UDP here (e.g. 127.0.0.1:5353)')
    .option('--store <where>', 'sqlite:/PATH, or etcd://HOST:PORT[,...] where several controllers elect a leader', 'sqlite:/var/lib/ferry/controller.db')
    .option('--max-per-host <n>', 'migrations at once out of one host', '2')
    .option('--max-per-cluster <n>', 'migrations at once in the cluster', '5')
    .option('--revoked <file>', 'revoked certificate serials (default: revoked.txt beside the CA certificate)')
    .action(async (opts: { ca: string; cert: string; key: string; listen: string; dashboard: string; dns?: string; store: string; maxPerHost: string; maxPerCluster: string; revoked?: string }, cmd: Command) => {
      const whole = (v: string, flag: string) => {
        const n = Number(v);
        if (!Number.isInteger(n) || n < 1 || n > 1000) throw new FerryError('USAGE', `${flag} must be a whole number from 1 to 1000, not '${v}'`);
        return n;
      };
      const limits = { perHost: whole(opts.maxPerHost, '--max-per-host'), perCluster: whole(opts.maxPerCluster, '--max-per-cluster') };
      const cluster = await loadCluster(clusterFile(cmd));
      const tls = await loadTls({ ca: opts.ca, cert: opts.cert, key: opts.key });
      const store = openStore(opts.store);
      const log = (l: string) => process.stdout.write(l + '\n');
      let metrics: Metrics | undefined;
      const controller = new Controller({ store, hosts: cluster.hosts, tls, limits, log, onMigration: (m) => metrics?.migrationEnded(m) });
      metrics = new Metrics(controller);
      const revoked = new RevocationList(resolve(opts.revoked ?? join(dirname(opts.ca), 'revoked.txt')));
      await revoked.refresh();
      const timer = setInterval(() => void revoked.refresh(), 1000);
      timer.unref();
      const server = new ControllerServer(controller, metrics, { tls, revoked, log });
      let ports: { api: number; dashboard?: number };
      if (store instanceof EtcdStore) {
        // With etcd, several controllers run and one leads; the others answer "standing by".
        const id = `${hostname()}:${process.pid}:${opts.listen}`;
        server.standby = 'another controller leads';
        ports = await server.start(opts.listen, opts.dashboard);
        log(`controller ${id}: standing by for leadership in ${store.where}`);
        await store.lead(id, LEASE_S, (e) => {
          // A leader that lost its lease stops at once; whoever leads now carries on.
          log(`controller ${id}: lost leadership (${e.message}); stopping`);
          process.exit(75);
        });
        log(`controller ${id}: leading`);
        await controller.start();
        server.standby = undefined;
      } else {
        await controller.start();
        ports = await server.start(opts.listen, opts.dashboard);
      }
      let dns: DnsResponder | undefined;
      if (opts.dns) {
        dns = new DnsResponder((name) => {
          const t = controller.tasks.get(name);
          if (!t?.host || t.state !== 'running') return undefined;
          return t.address ?? controller.hosts.get(t.host)?.address.replace(/:\d+$/, '');
        });
        await dns.start(opts.dns);
      }
      log(`controller: API on ${opts.listen} (port ${ports.api}), dashboard http://${opts.dashboard}/${dns ? `, DNS on ${opts.dns}` : ''}`);
      await new Promise<void>((done) => {
        process.once('SIGTERM', () => done());
        process.once('SIGINT', () => done());
      });
      dns?.close();
      await server.close();
      await controller.close();
      await store.close();
      log('controller stopped; tasks keep running');
    });

  program
    .command('submit')
    .description('start a task where the controller finds room; a higher priority migrates lower-priority tasks out of its way')
    .requiredOption('--priority <n>', 'higher wins room from lower', '0')
    .requiredOption('--memory <size>', 'memory it needs, e.g. 256MiB')
    .option('--name <name>', 'task name (default: a random one)')
    .option('--net', 'its own network namespace and address, which moves with it')
    .option('--mode <mode>', `how the controller migrates it: ${modes.join(', ')}`, 'auto')
    .option('--env <KEY=VALUE>', 'environment variable (repeatable)', collectEnv, {})
    .option('--json', 'print the result as JSON')
    .argument('<command...>', 'command and arguments, after --')
    .action(async (command: string[], opts: { priority: string; memory: string; name?: string; net?: boolean; mode: string; env: Record<string, string>; json?: boolean }, cmd: Command) => {
      const priority = Number(opts.priority);
      if (!Number.isInteger(priority) || Math.abs(priority) > 1_000_000) throw new FerryError('USAGE', `--priority takes a whole number (-1000000 to 1000000), not '${opts.priority}'`);
      const memBytes = parseSize(opts.memory);
      if (memBytes === undefined) throw new FerryError('USAGE', `--memory takes a size such as 256MiB or 2GiB, not '${opts.memory}'`);
      if (!(modes as readonly string[]).includes(opts.mode)) throw new FerryError('USAGE', `unknown --mode '${opts.mode}': use ${modes.join(', ')}`);
      const r = await ask<{ task: ControllerTask; moved: MigrationRecord[]; stopped: string[] }>(
        cmd,
        'POST',
        '/v1/tasks',
        { command, priority, memBytes, mode: opts.mode, ...(opts.name ? { name: opts.name } : {}), ...(opts.net ? { net: true } : {}), ...(Object.keys(opts.env).length ? { env: opts.env } : {}) },
        0,
      );
      if (opts.json) return printJson(r);
      process.stdout.write(`${r.task.name} runs on ${r.task.host}${r.task.address ? ` at ${r.task.address}` : ''}\n`);
      for (const m of r.moved) process.stdout.write(`  made room: migrated ${m.task} ${m.from} -> ${m.to} (pause ${m.blackoutMs ?? '-'} ms)\n`);
      for (const s of r.stopped) process.stdout.write(`  made room: stopped ${s}: no other host had room for it\n`);
    });

  program
    .command('drain')
    .description('move every task off a host by live migration (it is cordoned first); waits until it is empty')
    .argument('<host>')
    .option('--no-wait', 'start the drain and return')
    .option('--json', 'print the drain as JSON')
    .action(async (host: string, opts: { wait: boolean; json?: boolean }, cmd: Command) => {
      let d = await ask<DrainRecord>(cmd, 'POST', `/v1/hosts/${encodeURIComponent(host)}/drain`);
      const live = !opts.json && process.stderr.isTTY;
      if (!opts.json) process.stdout.write(`draining ${host}: ${d.total} tasks to move\n`);
      let lastLine = '';
      while (opts.wait && d.state === 'running') {
        await new Promise((r) => setTimeout(r, 500));
        const now = await ask<DrainRecord & { left: string[]; inflight: MigrationRecord[] }>(cmd, 'GET', `/v1/drains/${encodeURIComponent(host)}`);
        d = now;
        const line = `${now.moved} of ${now.total} moved${now.inflight.length ? `; moving ${now.inflight.map((m) => `${m.task} -> ${m.to} (${m.phase ?? 'starting'}, ${formatBytes(m.bytes)})`).join(', ')}` : ''}`;
        if (live) process.stderr.write(`\r\x1b[K${line}`);
        else if (!opts.json && line !== lastLine) process.stdout.write(`  ${line}\n`);
        lastLine = line;
      }
      if (live) process.stderr.write('\r\x1b[K');
      if (opts.json) return printJson(d);
      if (d.state === 'running') return void process.stdout.write(`the drain goes on; follow it with \`ferry hosts\`\n`);
      if (d.state !== 'done') throw new FerryError('MIGRATION', `the drain of ${host} ${d.state}: ${d.error ?? ''}`, { hint: `${host} stays cordoned; every task is running; \`ferry drain ${host}\` tries again` });
      process.stdout.write(`${host} is empty: ${d.moved} tasks moved${d.retries ? `, ${d.retries} retried elsewhere` : ''}, 0 restarted\n`);
    });

  for (const [name, on] of [['cordon', true], ['uncordon', false]] as const) {
    program
      .command(name)
      .description(on ? 'take no new tasks on a host (what runs there stays)' : 'let a host take tasks again (ends a drain under way)')
      .argument('<host>')
      .action(async (host: string, _o: unknown, cmd: Command) => {
        await ask<ControllerHost>(cmd, 'POST', `/v1/hosts/${encodeURIComponent(host)}/${name}`);
        process.stdout.write(`${host} ${on ? 'cordoned' : 'uncordoned'}\n`);
      });
  }

  program
    .command('delete')
    .description('stop a task of the cluster and remove it from its host and from the controller')
    .argument('<name>')
    .action(async (name: string, _o: unknown, cmd: Command) => {
      await ask(cmd, 'DELETE', `/v1/tasks/${encodeURIComponent(name)}`, undefined, 60_000);
      process.stdout.write(`deleted ${name}\n`);
    });

  program
    .command('resolve')
    .description("where a task is now: its own address (--net) or its host's")
    .argument('<name>')
    .option('--json', 'print as JSON')
    .action(async (name: string, opts: { json?: boolean }, cmd: Command) => {
      const r = await ask<{ name: string; host: string; hostAddress: string; address?: string; migrating: boolean }>(cmd, 'GET', `/v1/resolve/${encodeURIComponent(name)}`);
      if (opts.json) return printJson(r);
      process.stdout.write(`${r.address ?? r.hostAddress} (${name} on ${r.host}${r.migrating ? ', migrating' : ''})\n`);
    });

  program
    .command('hosts')
    .description('the hosts the controller knows: health, memory, tasks')
    .option('--json', 'print as JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const hosts = await ask<Array<ControllerHost & { freeBytes: number; tasks: string[] }>>(cmd, 'GET', '/v1/hosts');
      if (opts.json) return printJson(hosts);
      process.stdout.write(
        table(
          ['HOST', 'STATE', 'MEMORY', 'FREE', 'TASKS'],
          hosts.map((h) => [h.name, `${h.healthy ? 'up' : 'down'}${h.cordoned ? ', cordoned' : ''}`, formatBytes(h.memBytes), formatBytes(Math.max(0, h.freeBytes)), h.tasks.join(' ') || '-']),
        ),
      );
    });

  program
    .command('tasks')
    .description('the tasks of the whole cluster, as the controller sees them')
    .option('--json', 'print as JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const tasks = await ask<ControllerTask[]>(cmd, 'GET', '/v1/tasks');
      if (opts.json) return printJson(tasks);
      process.stdout.write(
        table(
          ['NAME', 'HOST', 'STATE', 'PRIORITY', 'MEMORY', 'ADDRESS', 'COMMAND'],
          tasks.map((t) => [t.name, t.host ?? '-', t.state + (t.reason ? ` (${t.reason})` : ''), String(t.priority), formatBytes(t.memBytes), t.address ?? '-', t.command.join(' ')]),
        ),
      );
    });
}
