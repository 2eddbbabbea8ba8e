#!/usr/bin/env -S node --initial-old-space-size=64
// The `ferry` command. This is the only place that turns errors into messages and exit codes.
import { Command, CommanderError, Option } from 'commander';
import { FerryError } from '../errors.js';
import { registerTaskCommands } from './task-commands.js';
import { registerClusterCommands } from './cluster-commands.js';
import { registerControllerCommands } from './controller-commands.js';

export function buildProgram(): Command {
  const program = new Command('ferry')
    .description('Live migration of running Linux tasks between hosts, built on CRIU')
    .version('0.1.0')
    .addOption(new Option('--state-dir <dir>', "Ferry's state directory").env('FERRY_STATE_DIR'))
    .addOption(new Option('--host <host>', 'act on this host through its agent').env('FERRY_HOST'))
    .addOption(new Option('--cluster <file>', 'cluster file: host names, addresses, client certificate').env('FERRY_CLUSTER'))
    .showSuggestionAfterError(true)
    .exitOverride()
    .configureOutput({ outputError: () => {} });
  registerTaskCommands(program);
  registerClusterCommands(program);
  registerControllerCommands(program);
  return program;
}

/** Whether the command line asked for JSON, so errors come out as JSON too. */
function wantsJson(argv: readonly string[]): boolean {
  const end = argv.indexOf('--');
  return (end === -1 ? argv : argv.slice(0, end)).includes('--json');
}

export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv, { from: 'user' });
    return process.exitCode === undefined ? 0 : Number(process.exitCode);
  } catch (e) {
    if (e instanceof CommanderError) {
      if (e.exitCode === 0) return 0; // --help, --version
      process.stderr.write(`ferry: ${e.message.replace(/^error: /, '')} (see 'ferry --help')\n`);
      return 2;
    }
    if (e instanceof FerryError) {
      if (wantsJson(argv)) {
        process.stdout.write(JSON.stringify({ error: e.toJSON() }) + '\n');
      } else {
        process.stderr.write(`ferry: ${e.message}${e.hint ? ` (${e.hint})` : ''}\n`);
        if (process.env['FERRY_DEBUG']) for (const d of e.details) process.stderr.write(`  ${d}\n`);
      }
      return e.code === 'USAGE' ? 2 : 1;
    }
    // A bug in Ferry, not bad input: say so, keep the stack for whoever debugs it.
    const err = e as Error;
    process.stderr.write(`ferry: internal error: ${err?.message ?? String(e)} (set FERRY_DEBUG=1 for the stack trace and report it)\n`);
    if (process.env['FERRY_DEBUG']) process.stderr.write(`${err?.stack}\n`);
    return 70;
  }
}

const code = await main(process.argv.slice(2));
process.exitCode = code;
