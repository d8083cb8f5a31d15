/**
 * The `tapmanager` command line, part 3: `runCli` (parse, help and version, output and exit codes, dispatch to
 * the commands) and the executable's entry point `main`.
 */
import { readFileSync } from 'node:fs'
import { errorCode } from '../errors'
import { commandUsage, EXIT_OK, EXIT_SERVER_ERROR, EXIT_USAGE, parse, socketPath, UsageError, USAGE, type Parsed } from './args'
import {
  clientCommand,
  createCliClient,
  lsCommand,
  serveCommand,
  statusCommand,
  type CliDeps,
  type CliIo,
  type CommandContext,
} from './commands'

function defaultIo(): CliIo {
  return {
    stdout: (t) => process.stdout.write(t),
    stderr: (t) => process.stderr.write(t),
    readFile: (p) => readFileSync(p === '-' ? 0 : p, 'utf8'),
  }
}

/** Runs the command line with `argv` (without node and script) and returns the exit code. */
export async function runCli(argv: string[], deps: CliDeps = {}): Promise<number> {
  const io: CliIo = { ...defaultIo(), ...deps.io }
  const env = deps.env ?? process.env
  const dashdash = argv.indexOf('--')
  const json = (dashdash < 0 ? argv : argv.slice(0, dashdash)).includes('--json')
  const out = (human: string, data: unknown) => io.stdout(json ? JSON.stringify(data) + '\n' : human + (human.endsWith('\n') || human === '' ? '' : '\n'))
  const fail = (code: number, err: unknown) => {
    const message = (err as Error)?.message ?? String(err)
    io.stderr(json ? JSON.stringify({ error: { code: errorCode(err), message }, exitCode: code }) + '\n' : `tapmanager: ${message}\n`)
    if (code === EXIT_USAGE && !json) io.stderr(`Run 'tapmanager --help' for usage.\n`)
    return code
  }

  let p: Parsed
  try {
    const r = parse(argv)
    if (typeof r === 'object' && 'help' in r) {
      io.stdout(r.help ? commandUsage(r.help) : USAGE)
      return EXIT_OK
    }
    if (r === 'version') {
      io.stdout(`${packageVersion()}\n`)
      return EXIT_OK
    }
    p = r
  } catch (err) {
    return fail(EXIT_USAGE, err)
  }

  const ctx: CommandContext = { io, deps, env, json, sock: socketPath(p.values, env), makeClient: deps.createClient ?? createCliClient, out, fail }
  try {
    switch (p.command) {
      case 'serve':
        return await serveCommand(p, ctx)
      case 'ls':
        return await lsCommand(p, ctx)
      case 'status':
        return await statusCommand(p, ctx)
      default:
        return await clientCommand(p, ctx)
    }
  } catch (err) {
    if (err instanceof UsageError) return fail(EXIT_USAGE, err)
    return fail(EXIT_SERVER_ERROR, err)
  }
}

function packageVersion(): string {
  try {
    // dist/cli/main.js and src/cli/main.ts both sit two levels below the package root.
    return (JSON.parse(readFileSync(`${__dirname}/../../package.json`, 'utf8')) as { version: string }).version
  } catch {
    return 'unknown'
  }
}

/** The `tapmanager` executable's entry point. */
export async function main(argv: string[] = process.argv.slice(2)): Promise<void> {
  process.exitCode = await runCli(argv)
}

