// Brings every journaled outgoing migration that no live code drives any more to one outcome:
// after an agent restart, or when the destination could not be told the decision. The source's
// own state is the truth once CRIU has let go: if the task runs here, the outcome is abort (the
// destination drops its stopped copy); if it is gone and the decision was commit, the destination
// resumes its copy. The destination is told until it acknowledges.
import { FerryError } from '../errors.js';
import { isAlive, killAndWait, waitUntil } from '../util/proc.js';
import { connect, requestJson } from '../wire/session.js';
import { answerOrphanHold } from './hold.js';
import type { JournalEntry } from './journal.js';
import type { MigrateContext } from './source.js';
import { closeLazyDump } from './tunnel.js';

/** How long a decision is retried before the entry is dropped (and said so in the log). */
const GIVE_UP_MS = 24 * 3600_000;

export class Resolver {
  private timer?: NodeJS.Timeout;
  private running?: Promise<void>;

  constructor(
    private readonly ctx: MigrateContext,
    private readonly log: (line: string) => void,
    /** Appends to the agent's migration history, so a CLI that lost its agent can learn the end. */
    private readonly record: (entry: Record<string, unknown>) => Promise<void>,
  ) {}

  /** Resolves what it finds now, then keeps retrying in the background. */
  async start(intervalMs = 2000): Promise<void> {
    await this.tick();
    this.timer = setInterval(() => {
      if (!this.running) this.running = this.tick().finally(() => (this.running = undefined));
    }, intervalMs);
    this.timer.unref();
  }

  async close(): Promise<void> {
    clearInterval(this.timer);
    await this.running;
  }

  async tick(): Promise<void> {
    for (const e of await this.ctx.journal.list()) {
      if (this.ctx.active.has(e.id)) continue;
      try {
        await this.resolve(e);
      } catch (err) {
        if (!(err instanceof FerryError)) throw err;
        this.log(`migration ${e.id} of ${e.task}: ${err.message}`);
      }
    }
  }

  private async resolve(e: JournalEntry): Promise<void> {
    if (!e.settled) await this.settle(e);
    const needsTelling = (e.phase === 'restore' || e.phase === 'decided') && !e.told;
    if (!needsTelling) {
      await this.ctx.journal.remove(e.id);
      return;
    }
    try {
      await this.tell(e);
      await this.ctx.journal.remove(e.id);
    } catch (err) {
      // A destination that dropped its copy has nothing to be told: the source's copy, settled
      // above, is where the task is (or was).
      if (err instanceof FerryError && err.code === 'DROPPED') {
        this.log(`migration ${e.id} of ${e.task}: ${err.message}`);
        await this.ctx.journal.remove(e.id);
        return;
      }
      if (Date.now() - Date.parse(e.at) > GIVE_UP_MS) {
        this.log(`migration ${e.id} of ${e.task}: giving up telling ${e.to.name} '${e.decision}' after a day: ${(err as Error).message}`);
        await this.ctx.journal.remove(e.id);
      }
    }
  }

  /**
   * Pre-copy committed while the destination fills the task from its own store: CRIU here still
   * holds the frozen copy, which runs again if CRIU is merely killed, while the destination may
   * already run the task. So the destination is told first; once it has the task, the copy here
   * is ended (by CRIU, as the migration would have; else killed before CRIU is). Only a
   * destination that dropped its copy gets the copy here back. Unreachable, it is asked again at
   * the next tick and the copy here stays frozen: never two.
   */
  private async endCopyFilledThere(e: JournalEntry): Promise<void> {
    try {
      await this.tell(e);
    } catch (err) {
      if (err instanceof FerryError && err.code === 'DROPPED') return;
      throw new FerryError('PEER', `${e.to.name} could not be told that it keeps the task (${(err as Error).message}); the frozen copy here waits for it`);
    }
    e.told = true;
    const dump = e.dump!;
    await closeLazyDump(e.fillsAlone!, 3000, () => isAlive(dump.pid, dump.start)).catch(() => undefined);
    await waitUntil(() => !isAlive(dump.pid, dump.start), 10_000, 50);
    // CRIU did not end it: the task goes first, so that CRIU's end cannot let it run on.
    if (isAlive(e.taskPid, e.taskPidStart)) await killAndWait(e.taskPid, e.taskPidStart);
  }

  /** Tells the destination the decision; throws DROPPED when it had dropped its copy. */
  private async tell(e: JournalEntry): Promise<void> {
    const session = await connect(e.to.address, { tls: this.ctx.tls, expectName: e.to.name, timeoutMs: 3000 });
    try {
      const body = e.decision === 'abort' ? { sourceRuns: isAlive(e.taskPid, e.taskPidStart) } : {};
      const r = await requestJson<{ known?: boolean }>(session, 'POST', `/v1/incoming/${e.id}/${e.decision}`, body, { timeoutMs: 30_000 });
      if (e.decision === 'commit' && r?.known === false) this.log(`migration ${e.id} of ${e.task}: ${e.to.name} has no record of it`);
    } finally {
      session.close();
    }
    this.log(`migration ${e.id} of ${e.task}: ${e.to.name} acknowledged ${e.decision}`);
  }

  /** Waits for (or ends) CRIU of a migration nobody drives, then takes the outcome from the task. */
  private async settle(e: JournalEntry): Promise<void> {
    const { rt } = this.ctx;
    if (e.dump && isAlive(e.dump.pid, e.dump.start)) {
      if (e.holdDir) await answerOrphanHold(e.holdDir, e.decision ?? 'abort');
      if (e.decision === 'commit' && e.fillsAlone) await this.endCopyFilledThere(e);
      await waitUntil(() => !isAlive(e.dump!.pid, e.dump!.start), 10_000, 50);
      if (isAlive(e.dump.pid, e.dump.start)) {
        try {
          process.kill(-e.dump.pid, 'SIGKILL');
        } catch {
          /* gone */
        }
        await waitUntil(() => !isAlive(e.dump!.pid, e.dump!.start), 2000);
      }
    }
    const alive = isAlive(e.taskPid, e.taskPidStart);
    const outcome = !alive && e.decision === 'commit' ? 'commit' : 'abort';
    await rt.store
      .withLock(e.task, 'migration recovery', async () => {
        const rec = await rt.store.get(e.task);
        // Another incarnation is not ours to touch; ours may already be recorded as ended (CRIU ended it).
        const ours = rec.pid === e.taskPid || (rec.pid === undefined && e.taskIncarnation !== undefined && rec.incarnation === e.taskIncarnation);
        if (!ours) return;
        if (outcome === 'commit') {
          await rt.netGone(rec.name, rec.net?.address);
          await rt.store.remove(e.task);
        } else {
          if (rec.state === 'frozen') {
            rec.state = alive ? 'running' : 'exited';
            await rt.store.save(rec);
          }
          if (alive) await rt.netHere(rec);
        }
      })
      .catch((err: unknown) => {
        if (!(err instanceof FerryError && err.code === 'TASK_NOT_FOUND')) throw err;
      });
    e.decision = outcome;
    e.settled = true;
    await this.ctx.journal.write(e);
    await this.record({ id: e.id, task: e.task, from: this.ctx.self, to: e.to.name, mode: e.mode, ok: outcome === 'commit', error: outcome === 'commit' ? undefined : `the agent on ${this.ctx.self} went away during the migration`, resolved: true, at: new Date().toISOString() });
    this.log(`migration ${e.id} of ${e.task} to ${e.to.name} resolved: ${outcome === 'commit' ? `the task runs on ${e.to.name}` : `the task stays here${alive ? '' : ' (it had exited)'}`}`);
  }
}
