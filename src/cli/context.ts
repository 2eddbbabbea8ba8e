import type { Command } from 'commander';
import { loadConfig, type FerryConfig } from '../config.js';
import { Criu } from '../criu/driver.js';
import { FerryError } from '../errors.js';
import { Runtime } from '../runtime/runtime.js';

export function configFor(cmd: Command): FerryConfig {
  const cfg = loadConfig();
  const stateDir = cmd.optsWithGlobals()['stateDir'] as string | undefined;
  if (stateDir) cfg.stateDir = stateDir;
  return cfg;
}

export function requireRoot(): void {
  if (process.getuid?.() !== 0) {
    throw new FerryError('NOT_ROOT', 'Ferry must run as root: CRIU and namespaces need it', { hint: 'run it with sudo' });
  }
}

export function runtimeFor(cmd: Command): Runtime {
  requireRoot();
  const cfg = configFor(cmd);
  return new Runtime(cfg.stateDir, new Criu(cfg.criu), cfg.nativeDir, undefined, cfg.scratchDir);
}

export function printJson(value: unknown): void {
  process.stdout.write(JSON.stringify(value, null, 2) + '\n');
}

/** Aborts on Ctrl-C so long operations release what they hold. */
export function interruptSignal(): AbortSignal {
  const ac = new AbortController();
  const onSig = () => ac.abort(new FerryError('ABORTED', 'interrupted'));
  process.once('SIGINT', onSig);
  process.once('SIGTERM', onSig);
  return ac.signal;
}
