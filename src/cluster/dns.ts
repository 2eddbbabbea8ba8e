// Names for tasks: a small authoritative DNS responder for the zone `ferry.`, served by the
// controller. NAME.ferry. answers with the task's own address when it has one (ferry run --net:
// that address moves with it), otherwise its host's. Answers live one second, so a client that
// asks again after a migration finds the task's new place. Packets are parsed by dns-packet; one
// that does not parse is dropped, never answered or thrown.
import dgram from 'node:dgram';
import dnsPacket from 'dns-packet';
import { FerryError } from '../errors.js';
import { parseAddress } from '../wire/session.js';

export const ZONE = 'ferry';
const NXDOMAIN = 3;
const REFUSED = 5;
/** Requests from one source per second before it is ignored (a reflector must not use us). */
const MAX_QPS_PER_SOURCE = 200;

/** Where a name is: an IPv4 address, or undefined when no task has that name. */
export type Lookup = (name: string) => string | undefined;

/** The answer to one query packet, or undefined when it is not worth one. */
export function answer(query: Buffer, lookup: Lookup): Buffer | undefined {
  let q: dnsPacket.DecodedPacket;
  try {
    q = dnsPacket.decode(query);
  } catch {
    return undefined;
  }
  if (q.type !== 'query' || !q.questions || q.questions.length !== 1) return undefined;
  const question = q.questions[0]!;
  const name = question.name.toLowerCase().replace(/\.$/, '');
  const rd = q.flag_rd ? dnsPacket.RECURSION_DESIRED : 0;
  const reply = (flags: number, answers: dnsPacket.Answer[] = []) =>
    dnsPacket.encode({ type: 'response', id: q.id ?? 0, flags: dnsPacket.AUTHORITATIVE_ANSWER | rd | flags, questions: [question], answers });
  if (name !== ZONE && !name.endsWith(`.${ZONE}`)) return reply(REFUSED);
  const task = name.slice(0, -(ZONE.length + 1));
  const address = task && !task.includes('.') ? lookup(task) : undefined;
  if (!address) return reply(NXDOMAIN);
  // The name exists; a question for another type gets no records (NODATA), not NXDOMAIN.
  if (question.type !== 'A') return reply(0);
  return reply(0, [{ type: 'A', name: question.name, ttl: 1, class: 'IN', data: address }]);
}

export class DnsResponder {
  private socket?: dgram.Socket;
  private window = { at: 0, counts: new Map<string, number>() };

  constructor(private readonly lookup: Lookup) {}

  async start(addr: string): Promise<number> {
    const { host, port } = parseAddress(addr, 53, true);
    const socket = dgram.createSocket('udp4');
    socket.on('message', (msg, rinfo) => {
      const now = Math.floor(Date.now() / 1000);
      if (now !== this.window.at) this.window = { at: now, counts: new Map() };
      const n = (this.window.counts.get(rinfo.address) ?? 0) + 1;
      this.window.counts.set(rinfo.address, n);
      if (n > MAX_QPS_PER_SOURCE) return;
      const out = answer(msg, this.lookup);
      if (out) socket.send(out, rinfo.port, rinfo.address);
    });
    await new Promise<void>((resolve, reject) => {
      socket.once('error', (e: NodeJS.ErrnoException) =>
        reject(new FerryError('CONFIG', `cannot serve DNS on ${addr}: ${e.code === 'EADDRINUSE' ? 'address in use' : e.message}`, { hint: 'pick another --dns address' })),
      );
      socket.bind(port, host, () => resolve());
    });
    socket.on('error', () => {});
    this.socket = socket;
    return socket.address().port;
  }

  close(): void {
    this.socket?.close();
  }
}
