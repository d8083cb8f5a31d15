/**
 * The `tapmanager` command line, part 2: the commands. `serve` starts the daemon (loaded lazily with the native
 * addon), `ls` and `status` ask the server (ls falls back on the state dir), and the client commands (add, get,
 * release, recover) are validated before connecting.
 */
import { connect } from 'node:net'
import { constants as osConstants } from 'node:os'
import type { DestinationStream } from 'pino'
import { errorCode, NotRunningError, ReadError, UnsupportedError } from '../errors'
import { createRequestLogger } from '../log'
import { buildQemuNetArgs, interfaceInfoFromWire, spawnWithFds } from '../qemu'
// The client and the daemon load the native addon: they are imported when a command needs them, so that
// `--help`, `help`, `--version` and `ls` work without it (and a missing addon is an ordinary exit-1 failure).
import type { FDClient } from '../client'
import type { DaemonHooks } from '../daemon'
// metrics.ts loads prom-client but not the addon.
import { DaemonMetrics, startMetricsServer } from '../metrics'
import { DEFAULT_STATE_DIR, StateStore } from '../state'
import type { ServerListing } from '../server'
import {
  addPayloadFromFlags,
  EXIT_NOT_RUNNING,
  EXIT_OK,
  EXIT_SERVER_ERROR,
  need,
  noPositionals,
  oneKey,
  recoverPayloadFromText,
  serveOptionsFromFlags,
  UsageError,
  type Parsed,
  type ServeOptions,
} from './args'

/** The client calls the command line needs; FDClient from './client' satisfies it. */
export interface CliClient {
  addFDs(key: string, data: Buffer | unknown): Promise<Buffer>
  getFDs(key: string): Promise<{ fds: number[]; info: Buffer }>
  releaseFDs(key: string): Promise<void>
  recover(key: string, data: unknown): Promise<void>
  isRunning(): Promise<boolean>
  /** The server's keys (extension command; optional for fakes). */
  list?(): Promise<ServerListing>
}
export type CliClientFactory = (socketPath: string) => CliClient

/** A started server. */
export interface ServerHandle {
  /** Clean stop: stop serving, close DHCP servers and fds; netns and state stay for recovery. */
  close(): Promise<void>
  /** Resolves if the server stops serving by itself (never on a clean stop): serve then exits with status 1. */
  failed?: Promise<Error>
}
export type StartServer = (opts: ServeOptions) => Promise<ServerHandle>

/**
 * The client the command line uses: FDClient over the server's socket, its module (and so the addon) loaded on
 * first use. `$TAPMANAGER_TIMEOUT_MS` (a positive integer) bounds each request instead of FDClient's default 30 s
 * (slow machines, emulated guests).
 */
export const createCliClient: CliClientFactory = (socketPath) => {
  let client: Promise<FDClient> | undefined
  const ms = Number(process.env.TAPMANAGER_TIMEOUT_MS)
  const opts = Number.isInteger(ms) && ms > 0 ? { timeoutMs: ms } : {}
  const get = () => (client ??= import('../client').then((m) => new m.FDClient(socketPath, opts)))
  return {
    addFDs: async (key, data) => (await get()).addFDs(key, data),
    getFDs: async (key) => (await get()).getFDs(key),
    releaseFDs: async (key) => (await get()).releaseFDs(key),
    recover: async (key, data) => (await get()).recover(key, data),
    isRunning: async () => (await get()).isRunning(),
    list: async () => (await get()).list(),
  }
}

/**
 * Starts the server for `tapmanager serve`: the daemon (FDServer + TapFDSource, persisted state, automatic
 * recovery of the keys recorded in the state dir; each recovered, cleaned or skipped key is logged).
 * `hooks` (default none) go to the daemon as they are: tests run the command line with their own hooks.
 */
export async function startServer(opts: ServeOptions, hooks: DaemonHooks = {}): Promise<ServerHandle> {
  // The metrics endpoint comes up first, so a long recovery is seen (/readyz answers 503 until the socket is served).
  const metrics = opts.metricsListen ? new DaemonMetrics() : undefined
  const endpoint = metrics ? await startMetricsServer(opts.metricsListen!, metrics) : undefined
  if (endpoint) opts.log.logger.info({ metrics: endpoint.address }, 'metrics endpoint listening')
  let daemon
  try {
    daemon = await startDaemonFor(opts, metrics, hooks)
  } catch (err) {
    await endpoint?.close()
    throw err
  }
  return {
    close: async () => {
      try {
        await daemon.close()
      } finally {
        await endpoint?.close()
      }
    },
    failed: daemon.server.failed,
  }
}

async function startDaemonFor(opts: ServeOptions, metrics: DaemonMetrics | undefined, hooks: DaemonHooks) {
  const { startDaemon } = await import('../daemon')
  return startDaemon({
    socketPath: opts.socketPath,
    socketMode: opts.socketMode,
    socketGroup: opts.socketGroup,
    // Root always may; with no --allow-uid/--allow-gid only root is served.
    allowedUids: [...new Set([0, ...opts.allowedUids])],
    allowedGids: opts.allowedGids,
    cniConfigDir: opts.cniConfigDir,
    cniPluginDirs: opts.cniPluginDirs,
    netnsDir: opts.netnsDir,
    stateDir: opts.stateDir,
    calicoSubnetSize: opts.calicoSubnetSize,
    sriov: opts.sriov,
    podIpv6: opts.podIpv6,
    netnsPool: opts.netnsPool,
    spinUs: opts.spinUs,
    maxDataSize: opts.maxDataSize,
    cniTimeoutMs: opts.cniTimeoutMs,
    maxConnections: opts.maxConnections ?? undefined,
    maxConnectionsPerUid: opts.maxConnectionsPerUid ?? undefined,
    log: opts.log,
    observer: metrics,
    ...hooks,
  })
}

/** Connects to a Unix socket and closes it: true if something accepts there (Virtlet's IsRunning). */
export function probeSocket(socketPath: string, timeoutMs = 5000): Promise<boolean> {
  return new Promise((resolve, reject) => {
    const sock = connect({ path: socketPath })
    const timer = setTimeout(() => {
      sock.destroy()
      resolve(false)
    }, timeoutMs)
    sock.once('connect', () => {
      clearTimeout(timer)
      sock.destroy()
      resolve(true)
    })
    sock.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer)
      sock.destroy()
      if (isNotRunningError(err)) resolve(false)
      else reject(err)
    })
  })
}

/** Connection errors that mean no server listens at the path. */
export function isNotRunningError(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | null)?.code
  return code === 'ENOENT' || code === 'ECONNREFUSED' || code === 'ENOTSOCK'
}

/** Where the command line writes and how it reads; replaceable for tests. */
export interface CliIo {
  stdout(text: string): void
  stderr(text: string): void
  /** Reads a file (`-` = stdin) for `recover --from`. */
  readFile(path: string): string
}

export interface CliDeps {
  createClient?: CliClientFactory
  startServer?: StartServer
  io?: Partial<CliIo>
  env?: NodeJS.ProcessEnv
  /** Where serve's logs go (default stderr). */
  logDestination?: DestinationStream
  /** Resolves when serve should stop (default: the first SIGTERM or SIGINT). */
  stopSignal?: () => Promise<string>
}
/** What a command needs from the command line that runs it. */
export interface CommandContext {
  io: CliIo
  deps: CliDeps
  env: NodeJS.ProcessEnv
  /** --json was given. */
  json: boolean
  /** The server socket. */
  sock: string
  makeClient: CliClientFactory
  /** Prints the human text, or `data` as one JSON line with --json. */
  out(human: string, data: unknown): void
  /** Prints the error (stderr) and returns `code`. */
  fail(code: number, err: unknown): number
}

/** `tapmanager serve`: runs the server until a stop signal, or until it stops by itself (status 1). */
export async function serveCommand(p: Parsed, ctx: CommandContext): Promise<number> {
  const { deps, env } = ctx
  noPositionals(p)
  const opts = serveOptionsFromFlags(p.values, env)
  const log = createRequestLogger(opts.logLevel, deps.logDestination)
  const start = deps.startServer ?? startServer
  // Listen for the signals before starting, so one during recovery still stops cleanly.
  const stop = (deps.stopSignal ?? defaultStopSignal)()
  const server = await start({ ...opts, log })
  log.logger.info({ socket: opts.socketPath, stateDir: opts.stateDir }, 'serving')
  // The server stopping by itself is a failure: logged, status 1 (never a silent exit 0).
  const failed = server.failed?.then((err) => ({ err })) ?? new Promise<never>(() => {})
  const ended = await Promise.race([stop.then((sig) => ({ sig })), failed])
  if ('err' in ended) {
    log.logger.error({ err: ended.err.message }, 'server stopped serving by itself; exiting')
    await server.close().catch(() => undefined)
    return EXIT_SERVER_ERROR
  }
  log.logger.info({ signal: ended.sig }, 'stopping')
  await server.close()
  log.logger.info('stopped')
  return EXIT_OK
}

/** `tapmanager ls`: the running server's keys, or the state dir's when no server answers. */
export async function lsCommand(p: Parsed, ctx: CommandContext): Promise<number> {
  const { io, json, sock, makeClient, out } = ctx
  noPositionals(p)
  const dir = (p.values['state-dir'] as string | undefined) ?? DEFAULT_STATE_DIR
  // The running server is the truth; the state dir only when no server (or one without `list`) answers.
  let why: string
  try {
    const served = await listFromServer(makeClient(sock))
    const rows = served.keys.map((k) => ({ key: k.key, state: k.state === 'held' ? 'ready' : 'recovered (fds not retrieved yet)' }))
    const skipped = Array.isArray(served.skipped) ? (served.skipped as { key: string; reason: string }[]) : []
    const human = [...rows.map((r) => `${r.key}\t${r.state}`), ...skipped.map((s) => `${s.key}\tskipped at recovery: ${s.reason}`)]
    out([`from the server at ${sock}`, human.length ? ['KEY\tSTATE', ...human].join('\n') : 'no keys'].join('\n'), {
      source: 'server',
      socket: sock,
      keys: rows,
      skipped,
    })
    return EXIT_OK
  } catch (err) {
    why = errorCode(err) === 'ERR_UNSUPPORTED' ? 'the server does not support list' : isNotRunningError(err) || errorCode(err) === 'ERR_NOT_RUNNING' ? `no server at ${sock}` : `the server did not answer list (${(err as Error).message})`
  }
  if (!json) io.stderr(`tapmanager: ${why}: reading the state dir ${dir} instead (may differ from what a server serves)\n`)
  const listing = await new StateStore(dir).list()
  const rows = listing.records.map((r) => {
    const d = (r.podNetworkDesc ?? {}) as Record<string, unknown>
    return { key: r.key, podId: d.podId ?? null, podNs: d.podNs ?? null, podName: d.podName ?? null, state: r.status, updatedAt: r.updatedAt }
  })
  const human = [
    ...rows.map((r) => `${r.key}\t${String(r.podNs)}/${String(r.podName)}\t${String(r.podId)}\t${r.state}`),
    ...listing.corrupt.map((c) => `${c.key ?? c.file}\t-\t-\tcorrupt (${c.reason})`),
  ]
  out(human.length ? ['KEY\tPOD\tPOD ID\tSTATE', ...human].join('\n') : `no keys in ${dir}`, {
    source: 'state-dir',
    fallbackReason: why,
    stateDir: dir,
    keys: rows,
    corrupt: listing.corrupt,
  })
  return EXIT_OK
}

/** `tapmanager status`: is the server running. */
export async function statusCommand(p: Parsed, ctx: CommandContext): Promise<number> {
  const { json, sock, makeClient, out, fail } = ctx
  noPositionals(p)
  const running = await makeClient(sock).isRunning()
  // --json: the answer, either way, on stdout. Otherwise the not-running message is the one every command
  // prints, on stderr.
  if (running || json) out(`tapmanager is running at ${sock}`, { running, socket: sock })
  else return fail(EXIT_NOT_RUNNING, notRunning(sock))
  return running ? EXIT_OK : EXIT_NOT_RUNNING
}

/** The client commands (add, get, release, recover): everything is validated before connecting. */
export async function clientCommand(p: Parsed, ctx: CommandContext): Promise<number> {
  const { io, sock, makeClient, out, fail } = ctx
  // Client commands: validate everything before connecting.
  const key = oneKey(p)
  let request: (c: CliClient) => Promise<number>
  switch (p.command) {
    case 'add': {
      const payload = addPayloadFromFlags(p.values)
      request = async (c) => {
        const res = await c.addFDs(key, payload)
        let csn: unknown = null
        try {
          csn = JSON.parse(res.toString('utf8'))
        } catch {
          csn = res.toString('utf8')
        }
        out(`added ${key}\n${describeCsn(csn)}`, { key, csn })
        return EXIT_OK
      }
      break
    }
    case 'get': {
      const exec = p.values.exec === true
      const qemuArgs = p.values['qemu-args'] === true
      if (exec && p.rest.length === 0) throw new UsageError('get --exec needs -- CMD [ARGS...]')
      request = async (c) => {
        const { fds, info } = await c.getFDs(key)
        // Received fds are OS fds: close them with the addon's closeFd (node:fs's closeSync fails on them in Deno).
        const { closeFd } = await import('../native')
        try {
          const ifaces = interfaceInfoFromWire(info)
          const netArgs = qemuArgs ? buildQemuNetArgs(ifaces, fds, 3) : []
          if (exec) {
            const [cmd, ...args] = p.rest
            return await runWithFds(cmd, [...args, ...netArgs], fds)
          }
          if (qemuArgs) {
            out(netArgs.map(shellQuote).join(' '), { key, args: netArgs })
          } else {
            const human = ifaces.map((i, n) => `  ${n} ${i.type === 1 ? `vf ${i.pciAddress}` : `tap fd ${i.fdIndex}`} ${i.mac}`)
            out(`${key}: ${ifaces.length} interface(s), ${fds.length} fd(s)\n${human.join('\n')}`, { key, interfaces: ifaces, fds: fds.length })
          }
          return EXIT_OK
        } finally {
          for (const fd of fds) {
            try {
              closeFd(fd)
            } catch {
              // already closed
            }
          }
        }
      }
      break
    }
    case 'release':
      request = async (c) => {
        await c.releaseFDs(key)
        out(`released ${key}`, { key, released: true })
        return EXIT_OK
      }
      break
    case 'recover': {
      const from = need(p, 'from')
      let text: string
      try {
        text = io.readFile(from)
      } catch (err) {
        // A file that cannot be read is a failure (exit 1), not a usage error: the command line was right.
        throw new ReadError(`--from ${from}: ${(err as Error).message}`, { cause: err })
      }
      const payload = recoverPayloadFromText(text, from)
      request = async (c) => {
        await c.recover(key, payload)
        out(`recovered ${key}`, { key, recovered: true })
        return EXIT_OK
      }
      break
    }
    default:
      throw new UsageError(`unhandled command ${p.command}`)
  }

  const client = makeClient(sock)
  if (!(await client.isRunning())) {
    return fail(EXIT_NOT_RUNNING, notRunning(sock))
  }
  try {
    return await request(client)
  } catch (err) {
    if (isNotRunningError(err)) {
      return fail(EXIT_NOT_RUNNING, notRunning(sock, err))
    }
    throw err
  }
}

function defaultStopSignal(): Promise<string> {
  return new Promise((resolve) => {
    const on = (sig: string) => {
      process.off('SIGTERM', onTerm)
      process.off('SIGINT', onInt)
      resolve(sig)
    }
    const onTerm = () => on('SIGTERM')
    const onInt = () => on('SIGINT')
    process.once('SIGTERM', onTerm)
    process.once('SIGINT', onInt)
  })
}

/** Asks a running server for its keys (throws ERR_NOT_RUNNING when none listens, ERR_UNSUPPORTED for Virtlet's). */
async function listFromServer(c: CliClient): Promise<ServerListing> {
  if (!c.list) throw new UnsupportedError('client has no list')
  if (!(await c.isRunning())) throw new NotRunningError('not running')
  return c.list()
}

function shellQuote(s: string): string {
  return /^[A-Za-z0-9_./=:,@%+-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`
}

function describeCsn(csn: unknown): string {
  const c = csn as { Interfaces?: Array<Record<string, unknown>>; Result?: { ips?: Array<Record<string, unknown>> } } | null
  const ifaces = Array.isArray(c?.Interfaces) ? c!.Interfaces! : []
  const ips = Array.isArray(c?.Result?.ips) ? c!.Result!.ips! : []
  const lines = ifaces.map((i, n) => {
    const mac = typeof i.HardwareAddr === 'string' ? interfaceInfoFromWire(JSON.stringify([{ mac: i.HardwareAddr }]))[0].mac : '-'
    const ip = ips[n] ? ` ${String(ips[n].address)}${ips[n].gateway ? ` via ${String(ips[n].gateway)}` : ''}` : ''
    return `  ${String(i.Name)} ${i.Type === 1 ? 'vf' : 'tap'} ${mac}${ip}${i.MTU ? ` mtu ${String(i.MTU)}` : ''}`
  })
  return lines.join('\n')
}

/** The one not-running error of every command (exit 3, on stderr). */
function notRunning(sock: string, cause?: unknown): NotRunningError {
  return new NotRunningError(`the server is not running at ${sock}`, cause === undefined ? undefined : { cause })
}

function runWithFds(cmd: string, args: string[], fds: number[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawnWithFds(cmd, args, fds, { stdio: ['inherit', 'inherit', 'inherit'] })
    child.once('error', reject)
    child.once('exit', (code, signal) => {
      if (signal) resolve(128 + ((osConstants.signals as Record<string, number>)[signal] ?? 0))
      else resolve(code ?? 0)
    })
  })
}

