// Holding a dumped task frozen until the destination runs it. CRIU runs our action script at
// post-dump; the script reports through one FIFO and waits for the verdict on another. "commit"
// lets CRIU end the source task; anything else (or no answer in time) makes the dump fail, and
// CRIU resumes the task where it was.
import { createReadStream } from 'node:fs';
import { constants } from 'node:fs';
import { chmod, mkdir, open, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { run } from '../exec/run.js';

const SCRIPT = `#!/bin/bash
# Ferry's CRIU action script: hold the frozen task at post-dump until Ferry decides.
# pre-dump runs just before CRIU freezes the task: note when (bash's clock, no process spawned).
[ "$CRTOOLS_SCRIPT_ACTION" = pre-dump ] && { echo "$EPOCHREALTIME" > "$FERRY_HOLD_DIR/freezing"; exit 0; }
[ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] || exit 0
echo frozen > "$FERRY_HOLD_DIR/events" || exit 1
read -r -t "$FERRY_HOLD_TIMEOUT" verdict < "$FERRY_HOLD_DIR/verdict" || exit 1
[ "$verdict" = commit ]
`;

export class Hold {
  private verdict: 'commit' | 'abort' | undefined;
  private frozenSeen = false;
  readonly frozen: Promise<void>;
  private events?: ReturnType<typeof createReadStream>;

  private constructor(readonly dir: string) {
    this.frozen = new Promise((resolve, reject) => {
      const ev = createReadStream(join(dir, 'events'), { encoding: 'utf8' });
      this.events = ev;
      ev.on('data', (c) => {
        if (!String(c).includes('frozen')) return;
        this.frozenSeen = true;
        resolve();
        // Aborted before CRIU got here: answer at once so the task resumes.
        if (this.verdict === 'abort') void this.answer('abort');
      });
      ev.on('error', reject);
    });
    this.frozen.catch(() => {});
  }

  static async create(dir: string): Promise<Hold> {
    await mkdir(dir, { recursive: true });
    await writeFile(join(dir, 'hold.sh'), SCRIPT);
    await chmod(join(dir, 'hold.sh'), 0o755);
    await run('mkfifo', [join(dir, 'events'), join(dir, 'verdict')]);
    return new Hold(dir);
  }

  /** CRIU has dumped everything and waits at post-dump (the task's parasite is gone by then). */
  get reachedPostDump(): boolean {
    return this.frozenSeen;
  }

  /** When CRIU began to freeze the task (ms since the epoch), if it got that far. */
  async freezingAt(): Promise<number | undefined> {
    const text = await readFile(join(this.dir, 'freezing'), 'utf8').catch(() => '');
    const s = Number(text.trim().replace(',', '.'));
    return Number.isFinite(s) && s > 0 ? s * 1000 : undefined;
  }

  get script(): string {
    return join(this.dir, 'hold.sh');
  }

  env(timeoutS: number): NodeJS.ProcessEnv {
    return { ...process.env, FERRY_HOLD_DIR: this.dir, FERRY_HOLD_TIMEOUT: String(timeoutS) };
  }

  /** Answers the waiting script; safe to call twice (the first answer counts). */
  async decide(verdict: 'commit' | 'abort'): Promise<boolean> {
    if (this.verdict) return false;
    this.verdict = verdict;
    // Before post-dump nobody reads the verdict; the 'frozen' handler answers an abort then.
    return this.frozenSeen ? this.answer(verdict) : false;
  }

  /** Writes the verdict if the script is reading; never blocks on a FIFO nobody opened. */
  private async answer(verdict: string): Promise<boolean> {
    for (let i = 0; i < 200; i++) {
      try {
        const fh = await open(join(this.dir, 'verdict'), constants.O_WRONLY | constants.O_NONBLOCK);
        await fh.write(`${verdict}\n`);
        await fh.close();
        return true;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENXIO') return false;
        await new Promise((r) => setTimeout(r, 10)); // the script is about to open it
      }
    }
    return false;
  }

  async dispose(): Promise<void> {
    // Unblocks our pending open of the events FIFO if CRIU never ran the script.
    try {
      const fh = await open(join(this.dir, 'events'), constants.O_WRONLY | constants.O_NONBLOCK);
      await fh.close();
    } catch {
      /* already open or gone */
    }
    this.events?.destroy();
    await rm(this.dir, { recursive: true, force: true });
  }
}
