// Where the controller keeps what it knows: hosts, tasks, drains and the migrations it ran. Records
// are JSON under a kind and a key, so one shape fits an embedded SQLite file (the default) and etcd
// (where a second controller can take over). The controller holds everything in memory and writes
// through; the store is what a restarted controller starts from.
import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import Database from 'better-sqlite3';
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

/** `sqlite:PATH` (or a bare path). */
export function openStore(spec: string): Store {
  if (spec.startsWith('etcd://')) {
    throw new FerryError('USAGE', 'the etcd store is not built yet', { hint: 'use --store sqlite:PATH' });
  }
  const path = spec.startsWith('sqlite:') ? spec.slice('sqlite:'.length) : spec;
  if (!path.startsWith('/')) throw new FerryError('USAGE', `--store takes sqlite:/ABSOLUTE/PATH or etcd://HOST:PORT, not '${spec}'`);
  return new SqliteStore(path);
}
