// The controller's connections to the agents: one mutual-TLS session per host, made when first
// needed and made again after it breaks. The controller's certificate (role controller) may read
// and operate tasks on every agent.
import { FerryError } from '../errors.js';
import type { LoadedTls } from '../tls/pki.js';
import { connect, requestJson, type MuxSession, type MuxStream } from '../wire/session.js';

export class AgentLink {
  private session?: Promise<MuxSession>;

  constructor(
    readonly host: string,
    readonly address: string,
    private readonly tls: LoadedTls,
  ) {}

  private open(): Promise<MuxSession> {
    if (!this.session) {
      const p = connect(this.address, { tls: this.tls, expectName: this.host, timeoutMs: 3000 }).then((s) => {
        // A peer behind a cut link is noticed in seconds; the next call connects again.
        s.keepalive(1000, 4);
        s.once('close', () => {
          if (this.session === p) this.session = undefined;
        });
        return s;
      });
      p.catch(() => {
        if (this.session === p) this.session = undefined;
      });
      this.session = p;
    }
    return this.session;
  }

  async json<T>(method: string, path: string, body?: unknown, timeoutMs?: number): Promise<T> {
    const s = await this.open();
    return requestJson<T>(s, method, path, body, timeoutMs ? { timeoutMs } : {});
  }

  /** A request whose answer streams (a migration's progress). */
  async stream(method: string, path: string, body: unknown): Promise<MuxStream> {
    const s = await this.open();
    const st = s.request({ ':method': method, ':path': path, 'content-type': 'application/json' });
    st.end(JSON.stringify(body));
    return st;
  }

  close(): void {
    const p = this.session;
    this.session = undefined;
    void p?.then((s) => s.close(), () => {});
  }
}

/** Whether an error means the agent could not be asked, rather than that it said no. */
export function unreachable(e: unknown): boolean {
  return e instanceof FerryError && (e.code === 'PEER' || e.code === 'TIMEOUT' || e.code === 'TLS');
}
