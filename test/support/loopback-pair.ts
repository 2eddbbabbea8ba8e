// A task holding a TCP connection between two of its own sockets over loopback, in two
// processes: the child serves, the parent sends a numbered line every 10 ms and checks each
// answer. It prints "pair ready", then "pair N ok" every 100 answers, and "pair BROKEN ..." if
// the connection fails or an answer is wrong. With "flood" the parent instead streams numbered
// 8-byte words as fast as the echo comes back (both ways always full of data in flight, most
// of it unacknowledged or not yet sent: the echo reads slowly) and prints "pair N ok" every
// 4 MiB of checked echo.
//   node loopback-pair.js PORT [flood]
import { fork } from 'node:child_process';
import net from 'node:net';

const port = Number(process.argv[2]);
const flood = process.argv[3] === 'flood' || process.argv[4] === 'flood';
if (process.argv[3] === 'server') {
  net
    .createServer((s) => {
      s.on('error', () => {});
      s.on('data', (d) => {
        s.write(d);
        // Flooded, the echo reads slowly: both sockets' queues stay full, and the sender always
        // has data it could not send yet (what a restore sends at once).
        if (flood) {
          s.pause();
          setTimeout(() => s.resume(), 2);
        }
      });
    })
    .listen(port, '127.0.0.1', () => process.send?.('listening'));
} else {
  const child = fork(process.argv[1]!, [String(port), 'server', ...(flood ? ['flood'] : [])], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  child.once('message', () => {
    child.disconnect(); // the IPC channel is not what is tested
    const s = net.connect(port, '127.0.0.1');
    if (flood) {
      floodOver(s);
      return;
    }
    let n = 0;
    let buf = '';
    s.on('connect', () => {
      process.stdout.write('pair ready\n');
      s.write(`${++n}\n`);
    });
    s.on('data', (d) => {
      buf += d.toString();
      for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (Number(line) !== n) process.stdout.write(`pair BROKEN: answer ${line} to ${n}\n`);
        if (n % 100 === 0) process.stdout.write(`pair ${n} ok\n`);
        setTimeout(() => s.write(`${++n}\n`), 10);
      }
    });
    s.on('error', (e) => process.stdout.write(`pair BROKEN: ${e.message}\n`));
    s.on('close', () => process.stdout.write('pair BROKEN: closed\n'));
  });
}

/** Streams numbered words through the echo and checks every one that comes back. */
function floodOver(s: net.Socket): void {
  const WORDS = 8192;
  let sent = 0;
  let expect = 0;
  let pending: Buffer = Buffer.alloc(0);
  let broken = false;
  const fail = (why: string) => {
    if (!broken) process.stdout.write(`pair BROKEN: ${why}\n`);
    broken = true;
  };
  const pump = () => {
    // At most 16 MiB ahead of the echo: the socket buffers stay full, memory does not grow.
    while (!broken && (sent - expect) * 8 < 16 << 20) {
      const b = Buffer.alloc(WORDS * 8);
      for (let i = 0; i < WORDS; i++) b.writeBigUInt64LE(BigInt(sent + i), i * 8);
      sent += WORDS;
      if (!s.write(b)) return void s.once('drain', pump);
    }
  };
  s.on('connect', () => {
    process.stdout.write('pair ready\n');
    pump();
  });
  s.on('data', (d: Buffer) => {
    pending = pending.length ? Buffer.concat([pending, d]) : d;
    const whole = pending.length - (pending.length % 8);
    for (let o = 0; o < whole && !broken; o += 8) {
      const v = Number(pending.readBigUInt64LE(o));
      if (v !== expect) fail(`word ${v} where ${expect} was due`);
      expect++;
      if (expect % (512 * 1024) === 0) process.stdout.write(`pair ${expect / (512 * 1024)} ok\n`);
    }
    pending = pending.subarray(whole);
    if (s.writableLength === 0) pump();
  });
  s.on('error', (e) => fail(e.message));
  s.on('close', () => fail('closed'));
}
