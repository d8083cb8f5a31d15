#!/usr/bin/env node
/**
 * The `tapmanager` command line (the package's bin entry, dist/cli.js). The code lives in src/cli/: args.ts (option
 * tables, usage, flag -> payload conversion), commands.ts (the commands), main.ts (runCli and main).
 *
 *   tapmanager serve [flags]                       run the server (FDServer + TapFDSource)
 *   tapmanager add KEY --pod-id ID --pod-name NAME --pod-ns NS [--dns ...]
 *   tapmanager get KEY [--qemu-args] [--exec -- CMD ARGS...]
 *   tapmanager release KEY
 *   tapmanager recover KEY --from FILE
 *   tapmanager ls [--state-dir DIR]                keys with pod and state (reads the state dir)
 *   tapmanager status                              is the server running
 *   tapmanager help [COMMAND]                      usage (also `COMMAND --help`)
 * Global: --socket PATH (or $TAPMANAGER_SOCKET), --json, -h/--help, -V/--version.
 *
 * Exit codes: 0 ok, 1 failure (server error, unreadable file, missing native addon), 2 usage error, 3 server not
 * running (the same message on stderr for every command). Errors go to stderr. `get --exec` exits with the command's
 * exit code (128 + signal number when it is killed).
 */
export * from './cli/args'
export * from './cli/commands'
export { main, runCli } from './cli/main'
export { createRequestLogger } from './log'
export type { LogLevel, RequestLogger, RequestLogEntry } from './log'
import { main } from './cli/main'

if (typeof require !== 'undefined' && typeof module !== 'undefined' && require.main === module) {
  void main()
}
