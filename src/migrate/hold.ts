// Holding a dumped task frozen until the destination runs it. CRIU runs our action script at
// post-dump; the script reports through one FIFO and waits for the verdict on another. "commit"
// lets CRIU end the source task; anything else makes the dump fail, and CRIU resumes the task
// where it was. While undecided the agent writes "wait" twice a second: if those stop (the agent
// died) the script gives up within PATIENCE_S and the task resumes, with nobody at the other end.
import { closeSync, constants, openSync, writeSync } from 'node:fs';
import { chmod, mkdir, open, readFile, rm, writeFile } from 'node:fs/promises';
import { Socket } from 'node:net';
import { join } from 'node:path';
import { run } from '../exec/run.js';
import { LOCK_SCRIPT } from '../net/tasknet.js';

/** Seconds without a word from the agent after which the held task resumes. */
export const PATIENCE_S = 5;

const SCRIPT = `#!/bin/bash
# Ferry's CRIU action script: hold the frozen task at post-dump until Ferry decides.
# network-lock/unlock: a task with its own namespace is cut off while CRIU dumps its connections.
${LOCK_SCRIPT}# pre-dump runs just before CRIU freezes the task. With a gate, Ferry has something to undo first
# (a throttle) and answers "go" once done; then note when (bash's clock, no process spawned).
if [ "$CRTOOLS_SCRIPT_ACTION" = pre-dump ]; then
  if [ -n "$FERRY_HOLD_GATE" ]; then
    exec 3<>"$FERRY_HOLD_DIR/events" 5<>"$FERRY_HOLD_DIR/gate" || exit 1
    echo freezing >&3
    # "wait" while Ferry finishes what comes first (a dump started during pre-copy's rounds).
    go=
    while read -r -t "$FERRY_HOLD_PATIENCE" go <&5 && [ "$go" = wait ]; do :; done
    [ "$go" = go ] || exit 1
  fi
  echo "$EPOCHREALTIME" > "$FERRY_HOLD_DIR/freezing"
  exit 0
fi
[ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] || exit 0
# Read-write opens of a FIFO never block, so the time limits below hold even when no Ferry
# process is at the other end.
exec 3<>"$FERRY_HOLD_DIR/events" 4<>"$FERRY_HOLD_DIR/verdict" || exit 1
echo frozen >&3
while [ "$SECONDS" -lt "$FERRY_HOLD_TIMEOUT" ]; do
  read -r -t "$FERRY_HOLD_PATIENCE" verdict <&4 || exit 1
  [ "$verdict" = wait ] && continue
  [ "$verdict" = commit ]
  exit
done
exit 1
`;

export class Hold {
  /**
   * Runs at pre-dump, when CRIU is about to freeze the task: what must stay in force until then
   * (a throttle) and must not be in what CRIU dumps. If it throws, the dump fails before anything
   * froze and the error is kept in gateError.
   */
  private beforeFreeze?: () => void | Promise<void>;
  gateError?: Error;
  private gateBeat?: NodeJS.Timeout;
  private verdict: 'commit' | 'abort' | undefined;
  private frozenSeen = false;
  readonly frozen: Promise<void>;
  private events?: Socket;
  private writer?: Socket;
  private heartbeat?: NodeJS.Timeout;

  private constructor(readonly dir: string) {
    this.frozen = new Promise((resolve, reject) => {
      // FIFOs go through libuv's pipe handles, never its thread pool: a blocking open() per
      // migration there would starve every other file operation (and this hold's heartbeat)
      // while several migrations wait for CRIU. Read-write, so the open neither blocks nor
      // sees end-of-file before CRIU's script writes.
      const ev = new Socket({ fd: openSync(join(dir, 'events'), constants.O_RDWR | constants.O_NONBLOCK), readable: true, writable: false });
      this.events = ev;
      ev.setEncoding('utf8');
      ev.on('data', (c: string) => {
        if (c.includes('freezing')) this.openGate();
        if (this.frozenSeen || !c.includes('frozen')) return;
        this.frozenSeen = true;
        resolve();
        this.onFrozen();
      });
      ev.on('error', reject);
    });
    this.frozen.catch(() => {});
  }

  static async create(dir: string): Promise<Hold> {
    await mkdir(dir, { recursive: true });
    await writeFile(join(dir, 'hold.sh'), SCRIPT);
    await chmod(join(dir, 'hold.sh'), 0o755);
    await run('mkfifo', [join(dir, 'events'), join(dir, 'verdict'), join(dir, 'gate')], { timeoutMs: 10_000 });
    return new Hold(dir);
  }

  /**
   * Set before CRIU starts (see beforeFreeze). One that returns a promise keeps CRIU waiting
   * until it settles ("wait" twice a second meanwhile); a rejection fails the dump before anything
   * froze, as a throw does.
   */
  gate(beforeFreeze: () => void | Promise<void>): void {
    this.beforeFreeze = beforeFreeze;
  }

  private openGate(): void {
    const f = this.beforeFreeze;
    if (!f) return;
    this.beforeFreeze = undefined;
    let fd: number;
    try {
      // The script holds the gate open read-write before it reports, so this cannot block.
      fd = openSync(join(this.dir, 'gate'), constants.O_WRONLY | constants.O_NONBLOCK);
    } catch {
      return; // the script gave up meanwhile: CRIU fails the dump without us
    }
    const say = (word: string) => {
      try {
        writeSync(fd, `${word}\n`);
      } catch {
        // the script gave up meanwhile
      }
    };
    const settle = (answer: 'go' | 'stop', e?: unknown) => {
      clearInterval(this.gateBeat);
      if (e !== undefined) this.gateError = e as Error;
      say(answer);
      closeSync(fd);
    };
    let r: void | Promise<void>;
    try {
      r = f();
    } catch (e) {
      settle('stop', e);
      return;
    }
    if (!(r instanceof Promise)) return settle('go');
    this.gateBeat = setInterval(() => say('wait'), 500);
    this.gateBeat.unref();
    r.then(
      () => settle('go'),
      (e: unknown) => settle('stop', e),
    );
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
    return { ...process.env, FERRY_HOLD_DIR: this.dir, FERRY_HOLD_TIMEOUT: String(timeoutS), FERRY_HOLD_PATIENCE: String(PATIENCE_S), ...(this.beforeFreeze ? { FERRY_HOLD_GATE: '1' } : {}) };
  }

  /** Answers the waiting script; safe to call twice (the first answer counts). */
  async decide(verdict: 'commit' | 'abort'): Promise<boolean> {
    if (this.verdict) return false;
    this.verdict = verdict;
    // Before post-dump nobody reads the verdict; onFrozen answers then.
    return this.frozenSeen ? this.answer(verdict) : false;
  }

  private onFrozen(): void {
    // The script holds the verdict FIFO open (read-write) before it reports, so this cannot block.
    try {
      this.writer = new Socket({ fd: openSync(join(this.dir, 'verdict'), constants.O_WRONLY | constants.O_NONBLOCK), readable: false, writable: true });
      this.writer.on('error', () => {}); // the script is gone: CRIU decides without us, and says so in its exit
    } catch {
      return;
    }
    if (this.verdict) {
      void this.answer(this.verdict);
      return;
    }
    this.heartbeat = setInterval(() => this.writer?.write('wait\n'), 500);
    this.heartbeat.unref();
  }

  private async answer(verdict: string): Promise<boolean> {
    clearInterval(this.heartbeat);
    const w = this.writer;
    if (!w || w.destroyed) return false;
    return new Promise((resolve) => w.write(`${verdict}\n`, (e) => resolve(!e)));
  }

  async dispose(): Promise<void> {
    clearInterval(this.heartbeat);
    clearInterval(this.gateBeat);
    this.writer?.destroy();
    this.events?.destroy();
    await rm(this.dir, { recursive: true, force: true });
  }
}

/** Answers a hold left by an agent that died (its journal names the directory). */
export async function answerOrphanHold(dir: string, verdict: 'commit' | 'abort'): Promise<boolean> {
  try {
    const fh = await open(join(dir, 'verdict'), constants.O_WRONLY | constants.O_NONBLOCK);
    try {
      await fh.write(`${verdict}\n`);
    } finally {
      await fh.close();
    }
    return true;
  } catch {
    return false;
  }
}
