// Servers for the network tests and the service benchmark.
//   node service-server.js PORT         every line comes back as it was sent
//   node service-server.js PORT http    an HTTP server answering "ok", keep-alive
import http from 'node:http';
import net from 'node:net';

const port = Number(process.argv[2]);
const server =
  process.argv[3] === 'http'
    ? http.createServer((_req, res) => res.end('ok'))
    : net.createServer((s) => {
        s.setNoDelay(true);
        s.on('error', () => {});
        s.on('data', (d) => s.write(d));
      });
if (server instanceof http.Server) server.keepAliveTimeout = 60_000;
server.listen(port, () => process.stdout.write('listening\n'));
