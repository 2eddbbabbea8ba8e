// Where the controller keeps what it knows: hosts, tasks, drains and the migrations it ran. Records
// are JSON under a kind and a key, so one shape fits an embedded SQLite file (the default) and etcd
// (where a second controller can take over). The controller holds everything in memory and writes
// through; the store is what a restarted controller starts from.
import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import Database from 'better-sqlite3';
import { Etcd3, type Campaign } from 'etcd3';
import { FerryError } from '../errors.js';

export type Kind = 'host' | 'task' | 'drain' | 'migration';

export interface Store {
  /** Where it keeps its data, for logs and `ferry hosts`. */
  readonly where: string;
  list<T>(kind: Kind): Promise<T[]>;
  put(kind: Kind, key: string, value: unknown): Promise<void>;
  delete(kind: Kind, key: string): Promise<void>;
  close(): Promise<void>;
}

/** One SQLite file; writes are synchronous and durable (WAL, synchronous=NORMAL is not enough for a drain's state). */
export class SqliteStore implements Store {
  private readonly db: Database.Database;
  private readonly stmts: { list: Database.Statement; put: Database.Statement; del: Database.Statement };

  constructor(readonly where: string) {
    try {
      mkdirSync(dirname(where), { recursive: true, mode: 0o700 });
      this.db = new Database(where);
      this.db.pragma('journal_mode = WAL');
      this.db.pragma('synchronous = FULL');
      this.db.exec('CREATE TABLE IF NOT EXISTS records (kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (kind, key))');
    } catch (e) {
      throw new FerryError('CONFIG', `cannot open the controller's store ${where}: ${(e as Error).message}`, { hint: 'pass --store sqlite:PATH with a writable path' });
    }
    this.stmts = {
      list: this.db.prepare('SELECT value FROM records WHERE kind = ? ORDER BY key'),
      put: this.db.prepare('INSERT INTO records (kind, key, value) VALUES (?, ?, ?) ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value'),
      del: this.db.prepare('DELETE FROM records WHERE kind = ? AND key = ?'),
    };
  }

  async list<T>(kind: Kind): Promise<T[]> {
    return (this.stmts.list.all(kind) as Array<{ value: string }>).map((r) => JSON.parse(r.value) as T);
  }

  async put(kind: Kind, key: string, value: unknown): Promise<void> {
    this.stmts.put.run(kind, key, JSON.stringify(value));
  }

  async delete(kind: Kind, key: string): Promise<void> {
    this.stmts.del.run(kind, key);
  }

  async close(): Promise<void> {
    this.db.close();
  }
}

/**
 * Records in etcd under /ferry/KIND/KEY, for controllers that take over from each other. Only the
 * elected leader writes, and each of its writes is a transaction that holds only while its
 * campaign key exists: a leader that lost its lease without noticing cannot overwrite what its
 * successor decided (fencing).
 */
export class EtcdStore implements Store {
  private readonly client: Etcd3;
  private campaign?: Campaign;
  private fence?: string;
  private lost?: (e: Error) => void;

  constructor(readonly where: string) {
    const hosts = where
      .replace(/^etcd:\/\//, '')
      .split(',')
      .map((h) => `http://${h}`);
    this.client = new Etcd3({ hosts, dialTimeout: 3000 });
  }

  private key(kind: Kind, key: string): string {
    return `/ferry/${kind}/${key}`;
  }

  /**
   * Waits until this controller is the leader. lost is called if leadership ends later (lease
   * expired, etcd unreachable for longer than the lease): the controller must stop at once.
   */
  async lead(id: string, ttlS: number, lost: (e: Error) => void): Promise<void> {
    this.lost = lost;
    const election = this.client.election('ferry-controller', ttlS);
    const campaign = election.campaign(id);
    this.campaign = campaign;
    await new Promise<void>((resolve, reject) => {
      let elected = false;
      campaign.on('elected', () => {
        elected = true;
        resolve();
      });
      campaign.on('error', (e: Error) => (elected ? lost(e) : reject(new FerryError('CONTROLLER', `cannot campaign for leadership in etcd at ${this.where}: ${e.message}`, { hint: 'is etcd running there?' }))));
    });
    this.fence = await campaign.getCampaignKey();
  }

  /** Who leads now (its id), if anyone. */
  async leader(): Promise<string | undefined> {
    return this.client.election('ferry-controller').leader();
  }

  async list<T>(kind: Kind): Promise<T[]> {
    const all = await this.wrap(() => this.client.getAll().prefix(`/ferry/${kind}/`).sort('Key', 'Ascend').strings());
    return Object.values(all).map((v) => JSON.parse(v) as T);
  }

  async put(kind: Kind, key: string, value: unknown): Promise<void> {
    await this.fenced((c) => c.put(this.key(kind, key)).value(JSON.stringify(value)));
  }

  async delete(kind: Kind, key: string): Promise<void> {
    await this.fenced((c) => c.delete().key(this.key(kind, key)));
  }

  private async fenced(op: (c: Etcd3) => Parameters<ReturnType<Etcd3['if']>['then']>[0]): Promise<void> {
    if (!this.fence) throw new FerryError('CONTROLLER', 'this controller is not the leader: it may not write');
    const r = await this.wrap(() => this.client.if(this.fence!, 'Create', '>', 0).then(op(this.client)).commit());
    if (!r.succeeded) {
      const e = new FerryError('CONTROLLER', 'this controller is no longer the leader (its lease in etcd expired)', { hint: 'it stops; another controller carries on' });
      this.lost?.(e);
      throw e;
    }
  }

  private async wrap<T>(fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      if (e instanceof FerryError) throw e;
      throw new FerryError('CONTROLLER', `etcd at ${this.where} failed: ${(e as Error).message}`, { hint: 'is etcd running there?' });
    }
  }

  async close(): Promise<void> {
    await this.campaign?.resign().catch(() => {});
    this.client.close();
  }
}

/** `sqlite:PATH` (or a bare absolute path), or `etcd://HOST:PORT[,HOST:PORT...]`. */
export function openStore(spec: string): Store {
  if (spec.startsWith('etcd://')) {
    if (!/^etcd:\/\/[A-Za-z0-9.-]+:\d+(,[A-Za-z0-9.-]+:\d+)*$/.test(spec)) throw new FerryError('USAGE', `--store etcd:// takes HOST:PORT[,HOST:PORT...], not '${spec}'`);
    return new EtcdStore(spec);
  }
  const path = spec.startsWith('sqlite:') ? spec.slice('sqlite:'.length) : spec;
  if (!path.startsWith('/')) throw new FerryError('USAGE', `--store takes sqlite:/ABSOLUTE/PATH or etcd://HOST:PORT, not '${spec}'`);
  return new SqliteStore(path);
}
