import type { Command } from 'commander';
import { connectHost, loadCluster, type Cluster } from '../agent/client.js';
import type { MuxSession } from '../wire/session.js';
import { FerryError } from '../errors.js';

/** The cluster and host named by --host/--cluster (or FERRY_HOST/FERRY_CLUSTER), if any. */
export async function remoteTarget(cmd: Command, required: true): Promise<{ cluster: Cluster; host: string }>;
export async function remoteTarget(cmd: Command, required?: false): Promise<{ cluster: Cluster; host: string } | undefined>;
export async function remoteTarget(cmd: Command, required = false): Promise<{ cluster: Cluster; host: string } | undefined> {
  const g = cmd.optsWithGlobals() as { host?: string; cluster?: string };
  const host = g.host;
  if (!host) {
    if (required) throw new FerryError('USAGE', 'this command talks to an agent: name the host with --host HOST');
    return undefined;
  }
  const cluster = await loadCluster(g.cluster ?? '/etc/ferry/cluster.json');
  return { cluster, host };
}

export async function agentSession(cluster: Cluster, host: string): Promise<MuxSession> {
  return connectHost(cluster, host);
}

/** Runs fn with a session to --host's agent, closed afterwards. */
export async function withAgent<T>(cmd: Command, fn: (session: MuxSession, target: { cluster: Cluster; host: string }) => Promise<T>): Promise<T> {
  const target = await remoteTarget(cmd, true);
  const session = await agentSession(target.cluster, target.host);
  try {
    return await fn(session, target);
  } finally {
    session.close();
  }
}

import { requestJson, readAll, decodeAnswer } from '../wire/session.js';
import type { Runtime, RunSpec } from '../runtime/runtime.js';
import type { TaskRecord } from '../runtime/task-store.js';
import type { TaskSignal } from '../wire/schemas.js';

/** What the task commands need, served by the local runtime or by a host's agent. */
export interface TaskApi {
  run(spec: RunSpec): Promise<TaskRecord>;
  list(): Promise<TaskRecord[]>;
  stop(name: string, graceMs: number, signal?: AbortSignal): Promise<TaskRecord>;
  kill(name: string, sig: TaskSignal | NodeJS.Signals, opts?: { pid?: number; signal?: AbortSignal }): Promise<TaskRecord>;
  remove(name: string, force: boolean): Promise<void>;
  checkpoint(name: string, leaveRunning: boolean, signal?: AbortSignal): Promise<TaskRecord>;
  restore(name: string, signal?: AbortSignal): Promise<TaskRecord>;
  logs(name: string, out: NodeJS.WritableStream, follow: boolean, signal?: AbortSignal): Promise<void>;
  close(): void;
}

export function localApi(rt: Runtime): TaskApi {
  return {
    run: (spec) => rt.run(spec),
    list: () => rt.listLive(),
    stop: (name, graceMs, signal) => rt.stop(name, { graceMs, ...(signal ? { signal } : {}) }),
    kill: (name, sig, opts) => rt.kill(name, sig, opts ?? {}),
    remove: (name, force) => rt.remove(name, { force }),
    checkpoint: (name, leaveRunning, signal) => rt.checkpoint(name, { leaveRunning, ...(signal ? { signal } : {}) }),
    restore: (name, signal) => rt.restore(name, signal ? { signal } : {}),
    logs: (name, out, follow, signal) => rt.logs(name, out, { follow, ...(signal ? { signal } : {}) }),
    close: () => {},
  };
}

export async function agentApi(cluster: Cluster, host: string): Promise<TaskApi> {
  const s = await agentSession(cluster, host);
  const t = (n: string) => `/v1/tasks/${encodeURIComponent(n)}`;
  return {
    run: (spec) => requestJson<TaskRecord>(s, 'POST', '/v1/tasks', spec),
    list: () => requestJson<TaskRecord[]>(s, 'GET', '/v1/tasks'),
    stop: (name, graceMs) => requestJson<TaskRecord>(s, 'POST', `${t(name)}/stop`, { graceMs }),
    kill: (name, sig, opts) => requestJson<TaskRecord>(s, 'POST', `${t(name)}/kill`, { signal: sig, ...(opts?.pid !== undefined ? { pid: opts.pid } : {}) }),
    remove: async (name, force) => {
      const st = s.request({ ':method': 'DELETE', ':path': t(name), 'x-ferry-force': force ? '1' : '0' });
      st.end();
      const [h, text] = await readAll(st);
      decodeAnswer(h, text, 'rm');
    },
    checkpoint: (name, leaveRunning) => requestJson<TaskRecord>(s, 'POST', `${t(name)}/checkpoint`, { leaveRunning }),
    restore: (name) => requestJson<TaskRecord>(s, 'POST', `${t(name)}/restore`, {}),
    logs: async (name, out) => {
      const st = s.request({ ':method': 'GET', ':path': `${t(name)}/logs` });
      st.end();
      const [h, text] = await readAll(st);
      if (Number(h[':status']) >= 400) decodeAnswer(h, text, 'logs');
      out.write(text);
    },
    close: () => s.close(),
  };
}
