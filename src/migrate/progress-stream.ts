// A migration as the source agent streams it: JSON lines of progress, then the report or an error.
// The CLI prints it; the controller follows it for its dashboard and metrics.
import { FerryError } from '../errors.js';
import { decodeAnswer, type Headers, type MuxStream } from '../wire/session.js';
import type { MigrationReport, ProgressEvent } from './source.js';

export async function readMigrationStream(stream: MuxStream, onProgress: (p: ProgressEvent) => void): Promise<MigrationReport> {
  let headers: Headers = {};
  let buf = '';
  let report: MigrationReport | undefined;
  let error: FerryError | undefined;
  stream.setEncoding('utf8');
  stream.on('response', (h: Headers) => (headers = h));
  for await (const chunk of stream) {
    buf += chunk as string;
    if (Number(headers[':status']) >= 400) continue;
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      let msg: { progress?: ProgressEvent; report?: MigrationReport; error?: { code: string; message: string; hint?: string } };
      try {
        msg = JSON.parse(line) as typeof msg;
      } catch {
        throw new FerryError('PEER', 'the source agent sent a malformed progress line', { hint: 'see `ferry history` on the source host' });
      }
      if (msg.progress) onProgress(msg.progress);
      if (msg.report) report = msg.report;
      if (msg.error) error = FerryError.fromJSON(msg.error);
    }
  }
  if (Number(headers[':status']) >= 400) decodeAnswer(headers, buf, 'migrate');
  if (error) throw error;
  if (!report) throw new FerryError('PEER', 'the source agent ended the migration without a report', { hint: 'see `ferry history` on the source host' });
  return report;
}
