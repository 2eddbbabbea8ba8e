// The source's intent log: one file per outgoing migration, written before each step that changes
// where the task runs. An agent that restarts reads it to bring every migration to one outcome,
// and tells the destination that outcome until it has heard it.
import { mkdirSync } from 'node:fs';
import { readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { readJson, writeJsonAtomic } from '../util/fs.js';
import type { Mode } from '../wire/schemas.js';

export type JournalPhase = 'checks' | 'presync' | 'precopy' | 'frozen' | 'restore' | 'decided';

export interface JournalEntry {
  id: string;
  task: string;
  to: { name: string; address: string };
  mode: Mode;
  phase: JournalPhase;
  /** The task's root process when the migration began. */
  taskPid: number;
  taskPidStart?: number;
  /** Its record's incarnation: once the record saw the task end, its pid is gone from it. */
  taskIncarnation?: number;
  holdDir?: string;
  dump?: { pid: number; start?: number };
  /**
   * 'commit' is written before the hold is told to let go: from then on the destination's copy
   * may be the only one. 'abort' means the source copy runs and the destination's must go.
   */
  decision?: 'commit' | 'abort';
  /**
   * Pre-copy whose destination fills the task from its own store: CRIU's lazy port here, through
   * which the copy here is ended once the destination runs the task (it never needs it again).
   */
  fillsAlone?: { address: string; port: number };
  /** The destination acknowledged the decision already (see Resolver.endCopyFilledThere). */
  told?: boolean;
  /** This host's side is final: CRIU has let go and the task record says where the task is. */
  settled?: boolean;
  at: string;
}

export class Journal {
  readonly dir: string;

  constructor(stateDir: string) {
    this.dir = join(stateDir, 'migrations');
  }

  private path(id: string): string {
    if (!/^[0-9a-f-]{36}$/.test(id)) throw new Error(`bad migration id ${id}`);
    return join(this.dir, `${id}.json`);
  }

  async write(e: JournalEntry): Promise<void> {
    e.at = new Date().toISOString();
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    await writeJsonAtomic(this.path(e.id), e);
  }

  async get(id: string): Promise<JournalEntry | undefined> {
    return readJson<JournalEntry>(this.path(id));
  }

  async list(): Promise<JournalEntry[]> {
    const names = await readdir(this.dir).catch(() => [] as string[]);
    const out: JournalEntry[] = [];
    for (const n of names) {
      if (!n.endsWith('.json')) continue;
      const e = await readJson<JournalEntry>(join(this.dir, n)).catch(() => undefined);
      if (e) out.push(e);
    }
    return out;
  }

  async remove(id: string): Promise<void> {
    await rm(this.path(id), { force: true });
  }
}
