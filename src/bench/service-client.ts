// Load for the service benchmark and the network tests: a client that keeps its connections to
// a server and sends a request every few milliseconds, waiting for each answer. On SIGTERM it
// prints what it saw as one JSON line: answers, wrong answers, failed requests, connections made
// beyond the first ones, and the longest wait.
//   node service-client.js echo|redis|http HOST PORT [INTERVAL_MS] [LANES]
// echo: numbered lines to an echo server. redis: INCR of a counter it first sets to 0 (each answer
// must be the next number). http: keep-alive GETs on LANES connections.
import http from 'node:http';
import net from 'node:net';

const [kind, host, port, every, lanes] = [process.argv[2]!, process.argv[3]!, Number(process.argv[4]), Number(process.argv[5] ?? 5), Number(process.argv[6] ?? 4)];
const stats = { answers: 0, wrong: 0, failed: 0, reconnects: 0, broke: '', maxWaitMs: 0 };
const pending = new Set<number>();

function waited(since: number): void {
  stats.maxWaitMs = Math.max(stats.maxWaitMs, Math.round(performance.now() - since));
  // The bench moves the server once answers flow, not while the client may still be connecting.
  if (stats.answers === 1) process.stdout.write('answered\n');
}

function lineClient(): void {
  const s = net.connect(port, host);
  let n = 0;
  let sentAt = 0;
  let buf = '';
  const redis = kind === 'redis';
  const send = () => {
    sentAt = performance.now();
    pending.add(sentAt);
    s.write(redis ? 'INCR ferry:counter\r\n' : `${++n}\n`);
  };
  s.setNoDelay(true);
  s.on('connect', () => {
    process.stdout.write('connected\n');
    if (redis) s.write('SET ferry:counter 0\r\n');
    else send();
  });
  let ready = !redis;
  s.on('data', (d) => {
    buf += d.toString();
    for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
      const line = buf.slice(0, i).replace(/\r$/, '');
      buf = buf.slice(i + 1);
      if (!ready) {
        ready = line === '+OK';
        if (!ready) stats.wrong++;
        send();
        continue;
      }
      pending.delete(sentAt);
      if (redis ? line !== `:${++n}` : Number(line) !== n) stats.wrong++;
      stats.answers++;
      waited(sentAt);
      setTimeout(send, every);
    }
  });
  s.on('error', (e) => (stats.broke ||= e.message));
  s.on('close', () => (stats.broke ||= 'closed by the server'));
}

function httpClient(): void {
  const agent = new http.Agent({ keepAlive: true, maxSockets: lanes });
  let sockets = 0;
  agent.on('free', () => {});
  const make = agent.createConnection.bind(agent);
  agent.createConnection = ((...args: Parameters<typeof make>) => {
    if (++sockets > lanes) stats.reconnects++;
    return make(...args);
  }) as typeof agent.createConnection;
  const lane = () => {
    const t0 = performance.now();
    pending.add(t0);
    const req = http.get({ host, port, path: '/', agent }, (res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c));
      res.on('end', () => {
        pending.delete(t0);
        if (res.statusCode !== 200 || body !== 'ok') stats.wrong++;
        stats.answers++;
        waited(t0);
        setTimeout(lane, every);
      });
    });
    req.on('error', () => {
      pending.delete(t0);
      stats.failed++;
      setTimeout(lane, every);
    });
  };
  process.stdout.write('connected\n');
  for (let i = 0; i < lanes; i++) lane();
}

if (kind === 'http') httpClient();
else lineClient();

process.on('SIGTERM', () => {
  // A request still unanswered counts as a wait too.
  for (const t of pending) waited(t);
  // Sent and not answered yet: the server may or may not have done it.
  process.stdout.write(JSON.stringify({ ...stats, unanswered: pending.size }) + '\n');
  process.exit(0);
});
