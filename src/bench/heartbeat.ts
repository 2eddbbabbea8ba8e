// Reading ferry-workload's output: heartbeats (sequence, CLOCK_MONOTONIC, CLOCK_REALTIME) and
// memory checksums. Shared by the tests, the demo and the benchmark.
export interface Beat {
  seq: number;
  mono: number;
  real: number;
}

export function parseBeats(log: string): Beat[] {
  const out: Beat[] = [];
  for (const line of log.split('\n')) {
    const m = /^hb (\d+) (\d+) (\d+)$/.exec(line);
    if (m) out.push({ seq: Number(m[1]), mono: Number(m[2]) / 1e9, real: Number(m[3]) / 1e9 });
  }
  return out;
}

export interface BeatCheck {
  count: number;
  /** Sequence numbers that are missing or repeated. */
  seqErrors: string[];
  /** Places where CLOCK_MONOTONIC went backwards. */
  monoBackwards: number;
  /** Largest wall-clock gap between consecutive beats: the pause the task saw. */
  maxGapS: number;
  /** Index of the beat that ended the largest gap. */
  maxGapAt: number;
}

/** Checks beats from index `from` on (earlier ones only anchor the first gap). */
export function checkBeats(beats: Beat[], from = 1): BeatCheck {
  const seqErrors: string[] = [];
  let monoBackwards = 0;
  let maxGapS = 0;
  let maxGapAt = 0;
  for (let i = Math.max(from, 1); i < beats.length; i++) {
    const a = beats[i - 1]!;
    const b = beats[i]!;
    if (b.seq !== a.seq + 1) seqErrors.push(`${a.seq} -> ${b.seq}`);
    if (b.mono < a.mono) monoBackwards++;
    if (b.real - a.real > maxGapS) {
      maxGapS = b.real - a.real;
      maxGapAt = i;
    }
  }
  return { count: beats.length, seqErrors, monoBackwards, maxGapS, maxGapAt };
}

/** Beats per second between two wall-clock times. */
export function beatRate(beats: Beat[], fromS: number, toS: number): number {
  if (toS <= fromS) return 0;
  return beats.filter((b) => b.real >= fromS && b.real < toS).length / (toS - fromS);
}

export function readySum(log: string): string | undefined {
  return /^ready \d+ ([0-9a-f]+)$/m.exec(log)?.[1];
}

export function sums(log: string): string[] {
  return [...log.matchAll(/^sum ([0-9a-f]+)$/gm)].map((m) => m[1]!);
}
