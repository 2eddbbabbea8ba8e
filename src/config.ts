// Where Ferry keeps its state and which binaries it uses. Environment variables win over the
// config file written by scripts/bootstrap.sh, which wins over built-in defaults.
import { readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { FerryError } from './errors.js';

export interface FerryConfig {
  stateDir: string;
  /** Where migrations keep CRIU's images while they run (a tmpfs; see runtime/scratch.ts). */
  scratchDir: string;
  configFile: string;
  /** The criu binary and where that choice came from, for `ferry doctor`. */
  criu: string;
  criuSource: 'FERRY_CRIU' | 'config' | 'PATH';
  nativeDir: string;
}

const here = dirname(fileURLToPath(import.meta.url));
/** The repository root: dist/src/config.js lives two levels below it. */
export const repoRoot = resolve(here, '..', '..');

export function loadConfig(env: NodeJS.ProcessEnv = process.env): FerryConfig {
  const configFile = env['FERRY_CONFIG'] ?? '/etc/ferry/config.json';
  let file: Record<string, unknown> = {};
  try {
    file = JSON.parse(readFileSync(configFile, 'utf8')) as Record<string, unknown>;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') {
      throw new FerryError('CONFIG', `cannot read ${configFile}: ${(e as Error).message}`, {
        hint: 'fix the JSON or re-run scripts/bootstrap.sh to rewrite it',
      });
    }
  }
  const str = (k: string) => (typeof file[k] === 'string' ? (file[k] as string) : undefined);
  let criu = 'criu';
  let criuSource: FerryConfig['criuSource'] = 'PATH';
  if (env['FERRY_CRIU']) {
    criu = env['FERRY_CRIU'];
    criuSource = 'FERRY_CRIU';
  } else if (str('criu')) {
    criu = str('criu')!;
    criuSource = 'config';
  }
  return {
    stateDir: env['FERRY_STATE_DIR'] ?? str('stateDir') ?? '/var/lib/ferry',
    scratchDir: env['FERRY_SCRATCH_DIR'] ?? str('scratchDir') ?? '/run/ferry',
    configFile,
    criu,
    criuSource,
    nativeDir: env['FERRY_NATIVE_DIR'] ?? join(repoRoot, 'build', 'native'),
  };
}
