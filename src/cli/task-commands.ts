// Commands about tasks on one host: run, ps, logs, stop, kill, rm, checkpoint, restore, doctor.
import type { Command } from 'commander';
import { doctor } from '../doctor/doctor.js';
import { FerryError } from '../errors.js';
import { describeState, type Publish, type TaskRecord } from '../runtime/task-store.js';
import type { RunSpec } from '../runtime/runtime.js';
import { ipToInt } from '../net/tasknet.js';
import { parseProcessSignal, parseTaskSignal } from '../wire/schemas.js';
import { configFor, interruptSignal, printJson, runtimeFor } from './context.js';
import { agentApi, localApi, remoteTarget, type TaskApi } from './remote.js';

/**
 * The addresses tasks hold on every host of the cluster (a host that does not answer counts for
 * none): the pool is cluster-wide, so the host picking one must avoid them all.
 */
async function addressesInCluster(cmd: Command): Promise<string[]> {
  const remote = await remoteTarget(cmd);
  if (!remote) return [];
  const lists = await Promise.all(
    Object.keys(remote.cluster.hosts).map(async (h) => {
      const api = await agentApi(remote.cluster, h).catch(() => undefined);
      try {
        return (await api?.list().catch(() => [])) ?? [];
      } finally {
        api?.close();
      }
    }),
  );
  return lists.flat().flatMap((t) => (t.net ? [t.net.address] : []));
}

/** The local runtime, or the agent of --host. */
async function tasks(cmd: Command): Promise<TaskApi> {
  const remote = await remoteTarget(cmd);
  return remote ? agentApi(remote.cluster, remote.host) : localApi(runtimeFor(cmd));
}

async function withTasks<T>(cmd: Command, fn: (api: TaskApi) => Promise<T>): Promise<T> {
  const api = await tasks(cmd);
  try {
    return await fn(api);
  } finally {
    api.close();
  }
}
import { formatDuration, table } from './format.js';

function collectPublish(value: string, prev: Publish[]): Publish[] {
  const m = /^(?:(\d{1,5}):)?(\d{1,5})(?:\/(tcp|udp))?$/.exec(value);
  const hostPort = Number(m?.[1] ?? m?.[2]);
  const port = Number(m?.[2]);
  if (!m || hostPort < 1 || hostPort > 65_535 || port < 1 || port > 65_535) throw new FerryError('USAGE', `--publish takes [hostPort:]port[/udp] with ports 1-65535, got '${value}'`);
  return [...prev, { hostPort, port, proto: (m[3] ?? 'tcp') as 'tcp' | 'udp' }];
}

/** --env KEY=VALUE, repeatable. */
export function collectEnv(value: string, prev: Record<string, string>): Record<string, string> {
  const eq = value.indexOf('=');
  if (eq <= 0) throw new FerryError('USAGE', `--env takes KEY=VALUE, got '${value}'`);
  return { ...prev, [value.slice(0, eq)]: value.slice(eq + 1) };
}

function taskSummary(t: TaskRecord) {
  return {
    name: t.name,
    state: t.state,
    status: describeState(t),
    pid: t.pid ?? null,
    mainPid: t.mainPid ?? null,
    processes: t.processes ?? null,
    incarnation: t.incarnation,
    command: t.command,
    createdAt: t.createdAt,
    exit: t.exit ?? null,
    origin: t.origin ?? null,
    awaiting: t.awaiting ?? null,
    address: t.net?.address ?? null,
    publish: t.net?.publish ?? [],
    checkpoint: t.checkpoint ?? null,
  };
}

export function registerTaskCommands(program: Command): void {
  program
    .command('doctor')
    .description('check CRIU and the kernel features Ferry uses on this host')
    .option('--json', 'print the report as JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const report = await doctor(configFor(cmd));
      if (opts.json) printJson(report);
      else {
        const mark = { ok: 'ok  ', missing: 'FAIL', warn: 'warn' } as const;
        process.stdout.write(`CRIU: ${report.criu.path} (from ${report.criu.source}) version ${report.criu.version ?? 'unknown'}, criu check: ${report.criu.check}\n`);
        for (const c of report.checks) {
          process.stdout.write(`[${mark[c.status]}] ${c.name}: ${c.detail} — ${c.effect}${c.fix && c.status !== 'ok' ? `\n       fix: ${c.fix}` : ''}\n`);
        }
        process.stdout.write(report.canCheckpoint ? 'This host can checkpoint and restore tasks.\n' : 'This host cannot checkpoint tasks: fix the FAIL lines above.\n');
      }
      if (!report.canCheckpoint) process.exitCode = 1;
    });

  program
    .command('run')
    .description('start a task in its own PID, UTS, IPC, time and mount namespaces')
    .option('--name <name>', 'task name (default: command name and a random suffix)')
    .option('--cwd <dir>', 'working directory of the task')
    .option('--env <KEY=VALUE>', 'environment variable for the task (repeatable)', collectEnv, {})
    .option('--net [address]', "its own network namespace and an address from the cluster's pool (or this one), which moves with it")
    .option('--publish <[hostPort:]port[/udp]>', "forward a port of the host's addresses to the task (with --net; repeatable)", collectPublish, [])
    .option('--json', 'print the task as JSON')
    .argument('<command...>', 'command and arguments, after --')
    .action(async (command: string[], opts: { name?: string; cwd?: string; env: Record<string, string>; net?: string | true; publish: Publish[]; json?: boolean }, cmd: Command) => {
      if (opts.publish.length && !opts.net) throw new FerryError('USAGE', '--publish forwards ports to a task with its own address: add --net', { hint: 'ferry run --net --publish 8080:80 -- ...' });
      let net: RunSpec['net'];
      if (typeof opts.net === 'string') {
        if (ipToInt(opts.net) === undefined) throw new FerryError('USAGE', `--net takes an IPv4 address, got '${opts.net}'`, { hint: 'give an address of the pool, or --net alone to get one' });
        net = { address: opts.net };
      } else if (opts.net) {
        net = { avoid: await addressesInCluster(cmd) };
      }
      if (net && opts.publish.length) net.publish = opts.publish;
      const t = await withTasks(cmd, (api) => api.run({ command, env: opts.env, ...(opts.name ? { name: opts.name } : {}), ...(opts.cwd ? { cwd: opts.cwd } : {}), ...(net ? { net } : {}) }));
      if (opts.json) printJson(taskSummary(t));
      else process.stdout.write(`${t.name}\n`);
    });

  program
    .command('ps')
    .description('list the tasks on this host')
    .option('--json', 'print the tasks as JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const all = await withTasks(cmd, (api) => api.list());
      if (opts.json) return printJson(all.map(taskSummary));
      process.stdout.write(
        table(
          ['NAME', 'STATUS', 'PID', 'PROCS', 'ADDRESS', 'AGE', 'COMMAND'],
          all.map((t) => [t.name, describeState(t), t.mainPid ? String(t.mainPid) : t.pid ? String(t.pid) : '-', t.processes !== undefined ? String(t.processes) : '-', t.net ? `${t.net.address}${t.net.publish?.length ? ` (${t.net.publish.map((p) => `${p.hostPort}->${p.port}${p.proto === 'udp' ? '/udp' : ''}`).join(', ')})` : ''}` : '-', formatDuration(Date.now() - Date.parse(t.createdAt)), t.command.join(' ')]),
        ),
      );
    });

  program
    .command('logs')
    .description("print a task's output")
    .option('-f, --follow', 'keep printing while the task runs')
    .argument('<task>')
    .action(async (task: string, opts: { follow?: boolean }, cmd: Command) => {
      await withTasks(cmd, (api) => api.logs(task, process.stdout, !!opts.follow, interruptSignal()));
    });

  program
    .command('stop')
    .description('stop a task: SIGTERM, then SIGKILL after the grace period')
    .option('-t, --time <seconds>', 'grace period before SIGKILL', '10')
    .option('--json', 'print the final state as JSON')
    .argument('<task>')
    .action(async (task: string, opts: { time: string; json?: boolean }, cmd: Command) => {
      const grace = Number(opts.time);
      if (!Number.isFinite(grace) || grace < 0) throw new FerryError('USAGE', `--time takes a number of seconds, got '${opts.time}'`);
      const t = await withTasks(cmd, (api) => api.stop(task, grace * 1000, interruptSignal()));
      if (opts.json) printJson(taskSummary(t));
      else process.stdout.write(`${t.name}: ${describeState(t)}\n`);
    });

  program
    .command('kill')
    .description("send a signal to a task (KILL, the default, ends all of it; HUP, USR1, ... reach its command, or its daemon once the command has exited), or to one of its processes (--pid)")
    .option('-s, --signal <signal>', 'KILL, TERM, INT, QUIT, HUP, USR1, USR2 or WINCH; with --pid any signal', 'KILL')
    .option('--pid <pid>', "only the process with this pid inside the task (as its programs and pidfiles name it)")
    .option('--json', 'print the task as JSON')
    .argument('<task>')
    .action(async (task: string, opts: { signal: string; pid?: string; json?: boolean }, cmd: Command) => {
      let pid: number | undefined;
      if (opts.pid !== undefined) {
        pid = Number(opts.pid);
        if (!/^\d+$/.test(opts.pid.trim()) || pid < 1 || pid > 4_194_304) throw new FerryError('USAGE', `--pid takes a process id inside the task, got '${opts.pid}'`);
      }
      const sig = pid === undefined ? parseTaskSignal(opts.signal) : parseProcessSignal(opts.signal);
      const t = await withTasks(cmd, (api) => api.kill(task, sig, { ...(pid !== undefined ? { pid } : {}), signal: interruptSignal() }));
      if (opts.json) printJson(taskSummary(t));
      else process.stdout.write(`${t.name}: ${sig === 'SIGKILL' && pid === undefined ? describeState(t) : `sent ${sig}${pid !== undefined ? ` to process ${pid}` : ''}`}\n`);
    });

  program
    .command('rm')
    .description("remove a stopped task and its files")
    .option('-f, --force', 'stop the task first if it runs')
    .argument('<task>')
    .action(async (task: string, opts: { force?: boolean }, cmd: Command) => {
      await withTasks(cmd, (api) => api.remove(task, !!opts.force));
    });

  program
    .command('checkpoint')
    .description('dump a running task to images on this host (the task stops unless --leave-running)')
    .option('--leave-running', 'keep the task running after the dump')
    .option('--json', 'print the result as JSON')
    .argument('<task>')
    .action(async (task: string, opts: { leaveRunning?: boolean; json?: boolean }, cmd: Command) => {
      const t = await withTasks(cmd, (api) => api.checkpoint(task, !!opts.leaveRunning, interruptSignal()));
      if (opts.json) return printJson(taskSummary(t));
      const s = t.checkpoint?.stats;
      process.stdout.write(
        `${t.name}: checkpointed in ${t.checkpoint?.durationMs} ms` +
          (s ? ` (frozen ${(s.frozenTimeUs / 1000).toFixed(0)} ms, ${s.pagesWritten} pages written)` : '') +
          (opts.leaveRunning ? ', still running\n' : '\n'),
      );
    });

  program
    .command('restore')
    .description('restore a checkpointed task on this host')
    .option('--json', 'print the result as JSON')
    .argument('<task>')
    .action(async (task: string, opts: { json?: boolean }, cmd: Command) => {
      const t = await withTasks(cmd, (api) => api.restore(task, interruptSignal()));
      if (opts.json) return printJson(taskSummary(t));
      process.stdout.write(`${t.name}: running again as pid ${t.pid} (restore took ${t.checkpoint?.restore?.durationMs} ms)\n`);
    });
}
