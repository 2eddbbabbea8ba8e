// A client that keeps one TCP connection to an echo server and sends a numbered line every few
// milliseconds, waiting for each answer. On SIGTERM it prints what it saw as one JSON line:
// answers, wrong or missing answers, whether the connection broke, and the longest wait.
//   node tcp-client.js HOST PORT [INTERVAL_MS]
import net from 'node:net';

const [host, port, every] = [process.argv[2]!, Number(process.argv[3]), Number(process.argv[4] ?? 5)];
const s = net.connect(port, host);
let n = 0;
let sentAt = 0;
let maxWaitMs = 0;
let answers = 0;
let wrong = 0;
let broke = '';
let buf = '';
const send = () => {
  sentAt = performance.now();
  s.write(`${++n}\n`);
};
s.setNoDelay(true);
s.on('connect', () => {
  process.stdout.write('connected\n');
  send();
});
s.on('data', (d) => {
  buf += d.toString();
  for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
    const line = buf.slice(0, i);
    buf = buf.slice(i + 1);
    if (Number(line) !== n) wrong++;
    answers++;
    maxWaitMs = Math.max(maxWaitMs, performance.now() - sentAt);
    setTimeout(send, every);
  }
});
s.on('error', (e) => (broke ||= e.message));
s.on('close', () => (broke ||= 'closed by the server'));
process.on('SIGTERM', () => {
  // A request still unanswered counts as a wait too.
  const pending = performance.now() - sentAt;
  process.stdout.write(JSON.stringify({ answers, wrong, broke, maxWaitMs: Math.round(Math.max(maxWaitMs, answers && n > answers ? pending : 0)) }) + '\n');
  process.exit(0);
});
