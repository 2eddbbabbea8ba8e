// rsync's "remote shell" for Ferry: rsync runs `node rsync-shell.js SOCKET HOST rsync --server …`;
// we hand the command line to the source agent over a local unix socket, and the agent carries
// the rsync protocol over the migration's one TLS session to an `rsync --server` on the
// destination. No second connection between the hosts.
import { connect } from 'node:net';

const [sock, _host, ...command] = process.argv.slice(2);
if (!sock || command.length === 0) {
  process.stderr.write('usage: rsync-shell.js SOCKET HOST COMMAND...\n');
  process.exit(2);
}
const s = connect(sock, () => {
  s.write(JSON.stringify(command) + '\n');
  process.stdin.pipe(s);
  s.pipe(process.stdout);
});
s.on('error', (e) => {
  process.stderr.write(`ferry rsync tunnel: ${e.message}\n`);
  process.exit(12);
});
s.on('close', () => process.stdout.end());
