// The CRIU the suite runs is the one scripts/bootstrap.sh built with every one of Ferry's patches:
// a patch that does not apply is left out with no more than a line in the set-up's output (so a
// newer CRIU still builds), and the tests of what it fixes would then test stock CRIU's code.
import assert from 'node:assert/strict';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { loadConfig, repoRoot } from '../../src/config.js';
import { Criu } from '../../src/criu/driver.js';

/** The CRIU release patches/criu are made for. */
const MADE_FOR = '4.2.1';

test("the CRIU under test carries every one of Ferry's patches", async (t) => {
  const criu = loadConfig().criu;
  const record = join(dirname(criu), 'ferry-patches');
  if (!existsSync(record)) return t.skip(`${criu} was not built by scripts/bootstrap.sh`);
  const v = await new Criu(criu).version();
  if (`${v.major}.${v.minor}.${v.patch}` !== MADE_FOR) return t.skip(`CRIU ${v.major}.${v.minor}.${v.patch}: the patches are made for ${MADE_FOR}`);
  const want = readdirSync(join(repoRoot, 'patches', 'criu')).filter((f) => f.endsWith('.patch')).map((f) => f.slice(0, -'.patch'.length)).sort();
  const applied = readFileSync(record, 'utf8').split('\n').filter((l) => l.startsWith('applied ')).map((l) => l.slice('applied '.length));
  assert.deepEqual(want.filter((p) => !applied.includes(p)), [], `patches that did not apply to ${criu} (see ${record})`);
});
