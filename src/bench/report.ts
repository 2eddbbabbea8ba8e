// Medians with min–max, a Markdown table and an SVG chart of the benchmark's results.
import type { RunMetrics, Workload } from './contenders.js';

export interface Stat {
  median: number;
  min: number;
  max: number;
}

export interface BenchResult {
  contender: string;
  workload: Workload;
  runs: number;
  errors: string[];
  pauseMs?: Stat;
  totalMs?: Stat;
  wireMiB?: Stat;
  reportedMiB?: Stat;
  peakDiskSrcMiB?: Stat;
  peakDiskDstMiB?: Stat;
  postCopyWindowMs?: Stat;
  postCopyRateRatio?: Stat;
  roundsRateRatio?: Stat;
}

export function stat(values: number[]): Stat | undefined {
  if (values.length === 0) return undefined;
  const s = [...values].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  const median = s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
  return { median: Math.round(median * 100) / 100, min: s[0]!, max: s[s.length - 1]! };
}

export function summarize(contender: string, workload: Workload, runs: RunMetrics[], errors: string[]): BenchResult {
  const pick = (f: (m: RunMetrics) => number | undefined) => stat(runs.map(f).filter((v): v is number => v !== undefined));
  const r: BenchResult = { contender, workload, runs: runs.length, errors };
  const put = <K extends keyof BenchResult>(k: K, v: BenchResult[K] | undefined) => {
    if (v !== undefined) r[k] = v;
  };
  put('pauseMs', pick((m) => m.pauseMs));
  put('totalMs', pick((m) => m.totalMs));
  put('wireMiB', pick((m) => Math.round((m.wireBytes / 2 ** 20) * 10) / 10));
  put('reportedMiB', pick((m) => (m.reportedBytes === undefined ? undefined : Math.round((m.reportedBytes / 2 ** 20) * 10) / 10)));
  put('peakDiskSrcMiB', pick((m) => m.peakDiskSrcMiB));
  put('peakDiskDstMiB', pick((m) => m.peakDiskDstMiB));
  put('postCopyWindowMs', pick((m) => m.postCopyWindowMs));
  put('postCopyRateRatio', pick((m) => m.postCopyRateRatio));
  put('roundsRateRatio', pick((m) => m.roundsRateRatio));
  return r;
}

const fmt = (s: Stat | undefined, unit = '') => (s ? (s.min === s.max ? `${s.median}${unit}` : `${s.median}${unit} (${s.min}–${s.max})`) : '–');

export function renderMarkdown(meta: { date: string; machine: string; link: string; runs: number }, results: BenchResult[], skipped: Array<{ contender: string; reason: string }>): string {
  const lines = [
    `Benchmark of ${meta.date}: ${meta.machine}; ${meta.link}; medians of ${meta.runs} run(s), min–max in brackets.`,
    '',
    '| workload | contender | pause the task saw | total (to all memory local) | on the wire (MiB) | tool-reported (MiB) | peak extra disk src / dst (MiB) | post-copy window | heartbeat rate in window | heartbeat rate during pre-copy rounds |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
  ];
  for (const r of results) {
    const wl = `${r.workload.mib} MiB, ${r.workload.dirtyMiBps} MiB/s dirty, ${r.workload.pattern ?? 'uniform'}`;
    if (r.runs === 0) {
      lines.push(`| ${wl} | ${r.contender} | failed: ${r.errors[0] ?? 'no run'} | | | | | | | |`);
      continue;
    }
    lines.push(
      `| ${wl} | ${r.contender} | ${fmt(r.pauseMs, ' ms')} | ${fmt(r.totalMs, ' ms')} | ${fmt(r.wireMiB)} | ${fmt(r.reportedMiB)} | ${fmt(r.peakDiskSrcMiB)} / ${fmt(r.peakDiskDstMiB)} | ${fmt(r.postCopyWindowMs, ' ms')} | ${r.postCopyRateRatio ? `${Math.round(r.postCopyRateRatio.median * 100)} %` : '–'} | ${r.roundsRateRatio ? `${Math.round(r.roundsRateRatio.median * 100)} %` : '–'} |`,
    );
  }
  for (const s of skipped) lines.push(`| all | ${s.contender} | skipped: ${s.reason} | | | | | | |`);
  lines.push('', 'Peak extra memory per host is not reported: the lab hosts share one kernel, so it cannot be told apart.', '');
  return lines.join('\n');
}

/** Two grouped bar charts (pause, total time) per workload and contender. */
export function renderSvg(meta: { date: string; machine: string; link: string }, results: BenchResult[]): string {
  const ok = results.filter((r) => r.runs > 0);
  const groups = [...new Set(ok.map((r) => `${r.workload.mib} MiB, ${r.workload.dirtyMiBps} MiB/s, ${r.workload.pattern ?? 'uniform'}`))];
  const contenders = [...new Set(ok.map((r) => r.contender))];
  const colors = ['#8c8c8c', '#4e79a7', '#59a14f', '#e15759', '#f28e2b', '#b07aa1', '#76b7b2'];
  const barH = 14;
  const groupH = contenders.length * barH + 24;
  const left = 250;
  const width = 980;
  const chartW = (width - left - 40) / 2;
  const height = 90 + groups.length * groupH + 30 + contenders.length * 18;
  const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;');
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif" font-size="12">`,
    `<rect width="100%" height="100%" fill="white"/>`,
    `<text x="10" y="20" font-size="15" font-weight="bold">Ferry benchmark: pause the task saw and total time (median, seconds)</text>`,
    `<text x="10" y="38" fill="#555">${esc(meta.machine)}</text>`,
    `<text x="10" y="54" fill="#555">${esc(meta.link)}</text>`,
  ];
  const panels: Array<[string, (r: BenchResult) => number | undefined, number]> = [
    ['pause', (r) => r.pauseMs?.median, left],
    ['total', (r) => r.totalMs?.median, left + chartW + 20],
  ];
  for (const [label, get, x0] of panels) {
    const max = Math.max(1, ...ok.map((r) => get(r) ?? 0)) / 1000;
    out.push(`<text x="${x0}" y="78" font-weight="bold">${label} (s)</text>`);
    groups.forEach((g, gi) => {
      const y0 = 90 + gi * groupH;
      if (x0 === left) out.push(`<text x="10" y="${y0 + 12}" font-weight="bold">${esc(g)}</text>`);
      contenders.forEach((c, ci) => {
        const r = ok.find((x) => x.contender === c && `${x.workload.mib} MiB, ${x.workload.dirtyMiBps} MiB/s` === g);
        const v = r ? get(r) : undefined;
        if (v === undefined) return;
        const w = ((v / 1000) / max) * (chartW - 60);
        const y = y0 + 18 + ci * barH;
        out.push(`<rect x="${x0}" y="${y}" width="${Math.max(1, w).toFixed(1)}" height="${barH - 3}" fill="${colors[ci % colors.length]}"/>`);
        out.push(`<text x="${(x0 + w + 4).toFixed(1)}" y="${y + barH - 5}" font-size="10">${(v / 1000).toFixed(2)}</text>`);
      });
    });
  }
  const ly = 90 + groups.length * groupH + 10;
  contenders.forEach((c, ci) => {
    out.push(`<rect x="10" y="${ly + ci * 18}" width="12" height="12" fill="${colors[ci % colors.length]}"/>`);
    out.push(`<text x="28" y="${ly + ci * 18 + 10}">${esc(c)}</text>`);
  });
  out.push('</svg>');
  return out.join('\n') + '\n';
}
