// A task holding a TCP connection between two of its own sockets over loopback, in two
// processes: the child serves, the parent sends a numbered line every 10 ms and checks each
// answer. It prints "pair ready", then "pair N ok" every 100 answers, and "pair BROKEN ..." if
// the connection fails or an answer is wrong.
//   node loopback-pair.js PORT
import { fork } from 'node:child_process';
import net from 'node:net';

const port = Number(process.argv[2]);
if (process.argv[3] === 'server') {
  net
    .createServer((s) => {
      s.on('error', () => {});
      s.on('data', (d) => s.write(d));
    })
    .listen(port, '127.0.0.1', () => process.send?.('listening'));
} else {
  const child = fork(process.argv[1]!, [String(port), 'server'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  child.once('message', () => {
    child.disconnect(); // the IPC channel is not what is tested
    const s = net.connect(port, '127.0.0.1');
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
