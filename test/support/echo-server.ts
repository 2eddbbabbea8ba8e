// An echo server for the network tests: every line comes back as it was sent.
//   node echo-server.js PORT
import net from 'node:net';

net
  .createServer((s) => {
    s.setNoDelay(true);
    s.on('error', () => {});
    s.on('data', (d) => s.write(d));
  })
  .listen(Number(process.argv[2]), () => process.stdout.write('listening\n'));
