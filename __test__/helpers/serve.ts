/**
 * The real `tapmanager` command line for end-to-end tests: `node dist/cli.js` (built with tsc when a source is
 * newer), `serve` run inside a CniTestNode's node netns (`nsenter --net=<node> node dist/cli.js serve ...`), and
 * client commands run as separate processes.
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { closeSync, existsSync, openSync, readdirSync, readFileSync, readlinkSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { FDClient } from '../../src/client'
import { CNI_FIXTURE_BIN, DEBIAN_CNI_BIN, processAlive, type CniTestNode } from './cni'

export const CLI_JS = join(process.cwd(), 'dist', 'cli.js')
/** The command line with a kill -9 failpoint (tests only). */
const CRASH_SERVE = join(process.cwd(), '__test__', 'helpers', 'crash-serve.ts')

function newestMtime(dir: string): number {
  let newest = 0
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name)
    newest = Math.max(newest, e.isDirectory() ? newestMtime(p) : statSync(p).mtimeMs)
  }
  return newest
}

/** Builds dist/ with tsc unless it is newer than every source file. */
export function ensureDist(): void {
  if (existsSync(CLI_JS) && statSync(CLI_JS).mtimeMs >= newestMtime(join(process.cwd(), 'src'))) return
  execFileSync('npx', ['tsc', '-p', 'tsconfig.json'], { stdio: 'inherit', timeout: 300_000 })
}

export interface CliRun {
  code: number | null
  stdout: string
  stderr: string
}

/** Runs `node dist/cli.js ARGS` (in the root netns: the client only talks to the socket). */
export function runCli(args: string[], opts: { timeout?: number; input?: string } = {}): CliRun {
  const r = spawnSync(process.execPath, [CLI_JS, ...args], { encoding: 'utf8', timeout: opts.timeout ?? 60_000, input: opts.input })
  return { code: r.status, stdout: r.stdout, stderr: r.stderr }
}

/** `tapmanager serve` in a test node; its JSON log lines are collected. */
export class ServerProcess {
  readonly socket: string
  readonly stateDir: string
  child: ChildProcess | null = null
  /** Where every run's log lines go. */
  readonly logFile: string
  private exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }> | null = null

  constructor(
    readonly node: CniTestNode,
    readonly extraArgs: string[] = [],
  ) {
    this.socket = join(node.dir, 'tapmanager.sock')
    this.stateDir = join(node.dir, 'state')
    this.logFile = join(node.dir, 'server.log')
  }

  /** Every JSON log line of every run, in order. */
  get logs(): Record<string, unknown>[] {
    if (!existsSync(this.logFile)) return []
    return readFileSync(this.logFile, 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((line) => {
        try {
          return JSON.parse(line) as Record<string, unknown>
        } catch {
          return { raw: line }
        }
      })
  }

  /** Client commands' common flag. */
  get sock(): string[] {
    return ['--socket', this.socket]
  }

  client(): FDClient {
    return new FDClient(this.socket)
  }

  /**
   * Starts the server (optionally with env additions) and waits until it accepts connections. With `crashAt`
   * (`<point>:<podId>`, see crash-serve.ts) it is the command line with that kill -9 failpoint, run from the
   * sources (`node --import @oxc-node/core/register __test__/helpers/crash-serve.ts`), instead of dist/cli.js.
   */
  async start(env: Record<string, string> = {}, crashAt?: string): Promise<void> {
    ensureDist()
    const entry = crashAt ? ['--import', '@oxc-node/core/register', CRASH_SERVE, crashAt] : [CLI_JS]
    const args = [
      `--net=${this.node.node.path}`, process.execPath, ...entry, 'serve',
      '--socket', this.socket,
      '--cni-conf-dir', this.node.confDir,
      '--cni-bin-dir', CNI_FIXTURE_BIN,
      '--cni-bin-dir', DEBIAN_CNI_BIN,
      '--state-dir', this.stateDir,
      '--log-level', 'debug',
      ...this.extraArgs,
    ]
    // Logs go to a file, not a pipe: the tests block in spawnSync, and a full pipe would stall the server's writes.
    const logFd = openSync(this.logFile, 'a')
    // nsenter --net, not `ip netns exec`: the latter also makes a private mount namespace, where the pod netns
    // bind mounts the server makes would die with the server (a restart could not recover them).
    const child = spawn('nsenter', args, { stdio: ['ignore', 'ignore', logFd], env: { ...process.env, ...env } })
    closeSync(logFd)
    this.child = child
    this.exit = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })))
    const client = this.client()
    const deadline = Date.now() + 30_000
    let exited = false
    void this.exit.then(() => (exited = true))
    while (!(await client.isRunning())) {
      if (exited) throw new Error(`server exited at start: ${JSON.stringify(this.logs.slice(-5))}`)
      if (Date.now() > deadline) throw new Error('server did not start within 30 s')
      await new Promise((r) => setTimeout(r, 25))
    }
  }

  get pid(): number {
    if (!this.child?.pid) throw new Error('not started')
    return this.child.pid
  }

  /** Resolves with how the current run ended. */
  exited(): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    if (!this.exit) throw new Error('not started')
    return this.exit
  }

  /** kill -9 and wait for the process to be gone. */
  async kill9(): Promise<void> {
    if (this.child && this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL')
    await this.exited()
  }

  /** SIGTERM (or SIGINT) and the exit status. */
  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    this.child!.kill(signal)
    return this.exited()
  }

  /** The log lines of one message (`msg`). */
  messages(msg: string): Record<string, unknown>[] {
    return this.logs.filter((l) => l.msg === msg)
  }

  /** Open fds of the server process. */
  fdCount(): number {
    return readdirSync(`/proc/${this.pid}/fd`).length
  }

  /** Open /dev/net/tun fds (taps) of the server process. */
  tapFdCount(): number {
    const dir = `/proc/${this.pid}/fd`
    return readdirSync(dir).filter((f) => {
      try {
        return readlinkSync(join(dir, f)) === '/dev/net/tun'
      } catch {
        return false
      }
    }).length
  }

  /** Kills the server if it runs. */
  cleanup(): void {
    if (this.child?.pid && processAlive(this.child.pid)) this.child.kill('SIGKILL')
  }
}

/** The payload of an add (Virtlet's GetFDPayload). */
export function addPayload(podId: string, podName = 'vm', podNs = 'default'): { podNetworkDesc: Record<string, unknown> } {
  return { podNetworkDesc: { podId, podNs, podName, DNS: null } }
}

/** Named netns (by name). */
export function netnsNames(): string[] {
  const r = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' })
  return r.stdout.split('\n').map((l) => l.split(' ')[0]).filter(Boolean)
}

/** Kills every process in a netns but `keep` (e.g. a hung CNI plugin left by a killed server). */
export function killNetnsProcesses(ns: string, keep: number[] = []): void {
  const pids = spawnSync('ip', ['netns', 'pids', ns], { encoding: 'utf8' }).stdout.split(/\s+/).filter(Boolean).map(Number)
  for (const pid of pids) if (!keep.includes(pid)) spawnSync('kill', ['-9', String(pid)])
}

/** Deletes a named netns if it exists (killing what runs in it). */
export function removeNetns(name: string): void {
  if (!netnsNames().includes(name)) return
  killNetnsProcesses(name)
  spawnSync('ip', ['netns', 'del', name])
}
