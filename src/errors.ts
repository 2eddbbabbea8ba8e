// Every failure a user can meet carries a stable code and a one-line message saying what
// happened, why, and what to do. The CLI alone turns these into an exit status.

export const ErrorCodes = {
  USAGE: 'usage: the command line is wrong',
  TASK_NOT_FOUND: 'no task by that name on this host',
  TASK_EXISTS: 'a task by that name already exists',
  TASK_STATE: 'the task is in a state that does not allow the operation',
  TASK_BUSY: 'another Ferry operation holds the task',
  IMAGES: 'checkpoint images are missing or unreadable',
  CRIU_MISSING: 'no usable CRIU binary',
  CRIU_TOO_OLD: 'CRIU is older than Ferry needs',
  CRIU_FAILED: 'a CRIU run failed',
  PROGRAM_FAILED: 'an external program failed',
  TIMEOUT: 'an operation ran out of time',
  ABORTED: 'the operation was cancelled',
  NOT_ROOT: 'Ferry must run as root',
  CONFIG: 'configuration is invalid',
  HOST_UNKNOWN: 'no such host in the cluster file',
  PEER: 'the other agent failed or refused',
  IO: 'a file system operation failed (disk full, missing file)',
  TLS: 'certificate or TLS failure',
  FORBIDDEN: "the peer's certificate role does not allow the request",
  PRECHECK: 'a migration pre-check failed',
  MIGRATION: 'a migration failed and was rolled back',
  DROPPED: 'the destination dropped its copy of the task before it ran there',
  LAB: 'the test lab could not be set up',
  PRECOPY: 'tracking the pages a task writes failed',
  NET: "setting up a task's own network failed",
  NET_UNCONFIGURED: 'the host has no address pool for tasks',
  NET_ADDRESS_IN_USE: 'the address is taken by another task',
  NET_POOL_EXHAUSTED: 'no address of the pool is free',
  NO_ROOM: 'no host has room for the task',
  CONTROLLER: 'the cluster controller failed or is unreachable',
  STANDBY: 'this controller stands by; another one leads',
} as const;

export type ErrorCode = keyof typeof ErrorCodes;

export class FerryError extends Error {
  readonly code: ErrorCode;
  /** Extra lines a user may want (CRIU log excerpts); the message itself stays one line. */
  readonly details: string[];
  readonly hint: string | undefined;

  constructor(code: ErrorCode, message: string, opts: { cause?: unknown; details?: string[]; hint?: string } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'FerryError';
    this.code = code;
    this.details = opts.details ?? [];
    this.hint = opts.hint;
  }

  toJSON(): SerializedError {
    return { code: this.code, message: this.message, details: this.details, hint: this.hint };
  }

  static fromJSON(e: SerializedError): FerryError {
    const code = (e.code in ErrorCodes ? e.code : 'PEER') as ErrorCode;
    return new FerryError(code, e.message, { details: e.details ?? [], ...(e.hint ? { hint: e.hint } : {}) });
  }
}

export interface SerializedError {
  code: string;
  message: string;
  details?: string[];
  hint?: string | undefined;
}

/** Cancellation is not failure: callers check for it separately. */
export function abortError(signal: AbortSignal | undefined, what: string): FerryError {
  const reason = signal?.reason;
  if (reason instanceof FerryError) return reason;
  return new FerryError('ABORTED', `${what} was cancelled`, { cause: reason });
}

/** A file system error (ENOSPC, EIO, ...) is the environment failing, not a bug: say where. */
export function ioError(e: unknown, where: string): FerryError | undefined {
  const err = e as NodeJS.ErrnoException;
  if (!(err instanceof Error) || typeof err.code !== 'string' || typeof err.syscall !== 'string') return undefined;
  const hint = err.code === 'ENOSPC' || err.code === 'EDQUOT' ? `free disk space on ${where}` : undefined;
  return new FerryError('IO', `${where}: ${err.message}`, { cause: e, ...(hint ? { hint } : {}) });
}

/** The HTTP status an error answers with, at the agents and at the controller. */
export function httpStatus(code: string): number {
  switch (code) {
    case 'USAGE':
      return 400;
    case 'TASK_NOT_FOUND':
    case 'HOST_UNKNOWN':
      return 404;
    case 'TASK_EXISTS':
    case 'TASK_STATE':
    case 'TASK_BUSY':
      return 409;
    case 'PRECHECK':
      return 412;
    case 'FORBIDDEN':
      return 403;
    case 'NO_ROOM':
      return 507;
    case 'CONTROLLER':
    case 'PEER':
      return 502;
    case 'STANDBY':
      return 503;
    default:
      return 500;
  }
}
