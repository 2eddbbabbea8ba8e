// What a request to an agent may contain, checked at the wire's edge before anything acts on it.
// Shapes, sizes and names: a peer's body is never cast, it is parsed.
import { z } from 'zod';
import { constants } from 'node:os';
import { FerryError } from '../errors.js';

const osSignals = constants.signals as Record<string, number>;

const NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;
export const taskName = z.string().regex(NAME, "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit");
export const hostName = taskName;
export const migrationId = z.uuid();
const text = (max: number) => z.string().max(max);
const count = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);

export const modes = ['stop-copy', 'post-copy', 'pre-copy', 'auto'] as const;
export const modeSchema = z.enum(modes);

const ipv4 = z.ipv4();
const port = z.number().int().min(1).max(65_535);
/** A port of the host forwarded to the task (ferry run --publish). */
export const publishSchema = z.object({ hostPort: port, port, proto: z.enum(['tcp', 'udp']) });

export const runBody = z.object({
  name: taskName.optional(),
  command: z.array(text(65_536)).min(1).max(4096),
  cwd: text(4096).optional(),
  env: z.record(text(1024), text(65_536)).optional(),
  /** Its own network: this address, or one the host picks from its pool avoiding those given. */
  net: z.object({ address: ipv4.optional(), avoid: z.array(ipv4).max(65_536).optional(), publish: z.array(publishSchema).max(256).optional() }).optional(),
});

export const stopBody = z.object({ graceMs: count.max(86_400_000).optional() });
/** `ferry settle`: run or drop a restored copy whose source will never decide; dryRun only says which migration it is. */
export const settleBody = z.object({ outcome: z.enum(['run', 'drop']), dryRun: z.boolean().optional() });
/**
 * Signals `ferry kill` sends: those the task's init passes on (native/ferry-shim.c), and KILL,
 * which ends the whole task. Any other would reach only the init, which ignores it.
 */
export const taskSignals = ['SIGKILL', 'SIGTERM', 'SIGINT', 'SIGQUIT', 'SIGHUP', 'SIGUSR1', 'SIGUSR2', 'SIGWINCH'] as const;
export type TaskSignal = (typeof taskSignals)[number];
/** Signals `ferry kill --pid` sends straight to one process of a task (any but those of the real-time range). */
export const processSignals = Object.keys(osSignals).filter((s) => s.startsWith('SIG') && !s.startsWith('SIGRT')) as NodeJS.Signals[];
/**
 * Without pid: one of taskSignals, through the task's init. With pid: any signal, to the process
 * with that pid inside the task (as its own programs and pidfiles name it).
 */
export const killBody = z
  .object({ signal: z.string().max(16), pid: z.number().int().min(1).max(4_194_304).optional() })
  .refine((b) => (b.pid === undefined ? (taskSignals as readonly string[]).includes(b.signal) : processSignals.includes(b.signal as NodeJS.Signals)), { message: 'not a signal Ferry sends that way' });

/** The signal of `among` a user means by text (HUP, SIGHUP, sighup, or its number 1). */
function findSignal<T extends string>(text: string, among: readonly T[]): T | undefined {
  const t = text.trim().toUpperCase();
  return /^\d+$/.test(t) ? among.find((s) => osSignals[s] === Number(t)) : among.find((s) => s === t || s === `SIG${t}`);
}

/** A signal as a user writes it, to one `ferry kill` sends. */
export function parseTaskSignal(text: string): TaskSignal {
  const found = findSignal(text, taskSignals);
  if (!found) {
    throw new FerryError('USAGE', `cannot send signal '${text}' to a task: a task's init passes on only ${taskSignals.map((s) => s.slice(3)).join(', ')}`, { hint: 'pick one of those; KILL ends the whole task' });
  }
  return found;
}

/** A signal as a user writes it, for `ferry kill --pid` (one process, so any signal reaches it). */
export function parseProcessSignal(text: string): NodeJS.Signals {
  const found = findSignal(text, processSignals);
  if (!found) throw new FerryError('USAGE', `cannot send signal '${text}': not a signal name or number this system knows`, { hint: 'use a name like TERM, HUP, STOP, CONT or USR1, or its number' });
  return found;
}
export const checkpointBody = z.object({ leaveRunning: z.boolean().optional() });
export const emptyBody = z.object({});
/** A source's abort; sourceRuns: its own copy of the task runs (again), so one here must not. */
export const abortBody = z.object({ sourceRuns: z.boolean().optional() });

export const migrateBody = z.object({
  to: z.object({ name: hostName, address: text(300) }),
  mode: modeSchema.optional(),
  /** Pre-copy and auto: the pause the stop policy aims for, and its round limit. */
  maxDowntimeMs: z.number().int().min(1).max(3_600_000).optional(),
  maxRounds: z.number().int().min(1).max(100).optional(),
  /** Auto: a task that does not converge may finish by post-copy of what is left. */
  allowPostCopy: z.boolean().optional(),
  /** Auto: a task that does not converge is slowed through its CPU quota until it does. */
  allowThrottle: z.boolean().optional(),
  /** Page streams compressed with lz4: always, never, or where the codec outruns the link. */
  compress: z.enum(['off', 'auto', 'on']).optional(),
  /** Carry on if the client goes away (the controller: a successor asks the agent how it ended). */
  detach: z.boolean().optional(),
});

/** A task's record as the source sends it; fields the destination does not use are dropped. */
const taskRecord = z.object({
  name: taskName,
  command: z.array(text(65_536)).min(1).max(4096),
  cwd: text(4096),
  env: z.record(text(1024), text(65_536)),
  createdAt: text(64),
  incarnation: count,
  state: z.enum(['running', 'frozen', 'checkpointed', 'exited']),
  origin: hostName.optional(),
  checkpoint: z.object({ at: text(64), leftRunning: z.boolean(), durationMs: z.number() }).loose().optional(),
  net: z.object({ address: ipv4, publish: z.array(publishSchema).max(256).optional() }).optional(),
});

export const prepareBody = z.object({
  id: migrationId,
  from: hostName,
  task: taskRecord,
  mode: modeSchema,
  /** criu cpuinfo image of the source, base64. */
  cpuinfo: z.base64().max(1024 * 1024),
  memBytes: count,
  diskBytes: count,
});

export const incomingRestoreBody = z.object({ lazy: z.boolean().optional(), pagesThere: z.boolean().optional() });

/** Parses a peer's value or refuses it with one line naming the first problem. */
export function parse<S extends z.ZodType>(schema: S, value: unknown, what: string): z.infer<S> {
  const r = schema.safeParse(value);
  if (r.success) return r.data;
  const issue = r.error.issues[0]!;
  const at = issue.path.length ? ` at ${issue.path.join('.')}` : '';
  throw new FerryError('USAGE', `invalid ${what}${at}: ${issue.message}`);
}

export type Mode = z.infer<typeof modeSchema>;
export type PrepareRequest = z.infer<typeof prepareBody>;
export type MigrateOptions = Omit<z.infer<typeof migrateBody>, 'to' | 'detach'> & { mode: Mode };
