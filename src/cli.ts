#!/usr/bin/env node
/**
 * The `tapmanager` command line.
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
import { readFileSync } from 'node:fs'
import { connect } from 'node:net'
import { parseArgs } from 'node:util'
import type { DestinationStream } from 'pino'
import { constants as osConstants } from 'node:os'
import { errorCode, TapmanagerError } from './errors'
import { createRequestLogger, LOG_LEVELS, type LogLevel, type RequestLogger } from './log'
import { buildQemuNetArgs, spawnWithFds, type InterfaceInfo } from './qemu'
// The client and the daemon load the native addon: they are imported when a command needs them, so that
// `--help`, `help`, `--version` and `ls` work without it (and a missing addon is an ordinary exit-1 failure).
import type { FDClient } from './client'
// metrics.ts loads prom-client but not the addon.
import { DaemonMetrics, parseMetricsAddress, startMetricsServer } from './metrics'
import { DEFAULT_STATE_DIR, StateStore } from './state'
import type { ServerListing } from './server'

export { createRequestLogger } from './log'
export type { LogLevel, RequestLogger, RequestLogEntry } from './log'

export const EXIT_OK = 0
export const EXIT_SERVER_ERROR = 1
export const EXIT_USAGE = 2
export const EXIT_NOT_RUNNING = 3

export const DEFAULT_SOCKET_PATH = '/run/tapmanager/tapmanager.sock'
export const DEFAULT_CNI_CONFIG_DIR = '/etc/cni/net.d'
export const DEFAULT_CNI_PLUGIN_DIRS = ['/opt/cni/bin', '/usr/lib/cni']
export const DEFAULT_NETNS_DIR = '/var/run/netns'
export const DEFAULT_CALICO_SUBNET_SIZE = 24
export const DEFAULT_MAX_DATA_SIZE = 64 * 1024
export const DEFAULT_CNI_TIMEOUT_MS = 60_000

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

/** Everything `tapmanager serve` was told. */
export interface ServeOptions {
  socketPath: string
  /** Mode of the socket file (default 0o660). */
  socketMode: number
  /** Group (name or numeric gid) of the socket file; null keeps the server's. */
  socketGroup: string | null
  /** Peer uids allowed to connect (SO_PEERCRED); empty with allowedGids empty: only root. */
  allowedUids: number[]
  /** Peer gids allowed to connect. */
  allowedGids: number[]
  cniConfigDir: string
  cniPluginDirs: string[]
  netnsDir: string
  stateDir: string
  calicoSubnetSize: number
  sriov: boolean
  logLevel: LogLevel
  /** The largest request payload accepted (DataSize cap). */
  maxDataSize: number
  /** How long one CNI plugin run may take before its process group is killed. */
  cniTimeoutMs: number
  /** Where the Prometheus endpoint listens (`HOST:PORT`, `:PORT` or a Unix socket path); null: none. */
  metricsListen: string | null
  /** Connections open at once (null: FDServer's default, half the open-file limit). */
  maxConnections: number | null
  /** Connections open at once from one peer uid (null: half of maxConnections). */
  maxConnectionsPerUid: number | null
  /** The request logger the server must use (one line per request). */
  log: RequestLogger
}

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
  const get = () => (client ??= import('./client').then((m) => new m.FDClient(socketPath, opts)))
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
 */
export async function startServer(opts: ServeOptions): Promise<ServerHandle> {
  // The metrics endpoint comes up first, so a long recovery is seen (/readyz answers 503 until the socket is served).
  const metrics = opts.metricsListen ? new DaemonMetrics() : undefined
  const endpoint = metrics ? await startMetricsServer(opts.metricsListen!, metrics) : undefined
  if (endpoint) opts.log.logger.info({ metrics: endpoint.address }, 'metrics endpoint listening')
  let daemon
  try {
    daemon = await startDaemonFor(opts, metrics)
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

async function startDaemonFor(opts: ServeOptions, metrics: DaemonMetrics | undefined) {
  const { startDaemon } = await import('./daemon')
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
    maxDataSize: opts.maxDataSize,
    cniTimeoutMs: opts.cniTimeoutMs,
    maxConnections: opts.maxConnections ?? undefined,
    maxConnectionsPerUid: opts.maxConnectionsPerUid ?? undefined,
    log: opts.log,
    observer: metrics,
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

// ---------------------------------------------------------------------------------------------------------------

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

/** A usage error: exit code 2. */
export class UsageError extends TapmanagerError {
  constructor(message: string) {
    super('ERR_USAGE', message)
  }
}

const GLOBAL_OPTIONS = {
  socket: { type: 'string' },
  json: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
  version: { type: 'boolean', short: 'V' },
} as const

const COMMAND_OPTIONS = {
  serve: {
    'socket-mode': { type: 'string' },
    'socket-group': { type: 'string' },
    'allow-uid': { type: 'string', multiple: true },
    'allow-gid': { type: 'string', multiple: true },
    'cni-conf-dir': { type: 'string' },
    'cni-bin-dir': { type: 'string', multiple: true },
    'netns-dir': { type: 'string' },
    'state-dir': { type: 'string' },
    'calico-subnet-size': { type: 'string' },
    sriov: { type: 'boolean' },
    'log-level': { type: 'string' },
    'max-data-size': { type: 'string' },
    'cni-timeout': { type: 'string' },
    'metrics-listen': { type: 'string' },
    'max-connections': { type: 'string' },
    'max-connections-per-uid': { type: 'string' },
  },
  add: {
    'pod-id': { type: 'string' },
    'pod-name': { type: 'string' },
    'pod-ns': { type: 'string' },
    dns: { type: 'string' },
    'dns-search': { type: 'string', multiple: true },
    'dns-domain': { type: 'string' },
    'dns-option': { type: 'string', multiple: true },
  },
  get: { 'qemu-args': { type: 'boolean' }, exec: { type: 'boolean' } },
  release: {},
  recover: { from: { type: 'string' } },
  ls: { 'state-dir': { type: 'string' } },
  status: {},
} as const

type Command = keyof typeof COMMAND_OPTIONS
const COMMANDS = Object.keys(COMMAND_OPTIONS) as Command[]

export const USAGE = `Usage: tapmanager <command> [options]

Commands:
  serve                       run the server (FDServer with TapFDSource)
      --socket-mode MODE        socket file mode, octal (default 0660)
      --socket-group GROUP      socket file group (name or gid)
      --allow-uid UID[,UID]     peer uids allowed to connect (repeatable; root always may)
      --allow-gid GID[,GID]     peer gids allowed to connect (repeatable)
      --cni-conf-dir DIR        CNI network configs (default ${DEFAULT_CNI_CONFIG_DIR})
      --cni-bin-dir DIR         CNI plugin dir (repeatable; default ${DEFAULT_CNI_PLUGIN_DIRS.join(', ')})
      --netns-dir DIR           pod netns dir (default ${DEFAULT_NETNS_DIR})
      --state-dir DIR           persisted state (default ${DEFAULT_STATE_DIR})
      --calico-subnet-size N    prefix length for Calico pods (default ${DEFAULT_CALICO_SUBNET_SIZE})
      --sriov                   enable SR-IOV VF passthrough
      --log-level LEVEL         ${LOG_LEVELS.join('|')} (default info)
      --max-data-size BYTES     largest request payload (default ${DEFAULT_MAX_DATA_SIZE})
      --cni-timeout MS          time limit of one CNI plugin run (default ${DEFAULT_CNI_TIMEOUT_MS})
      --metrics-listen ADDR     serve Prometheus /metrics, /healthz, /readyz on HOST:PORT, :PORT or a
                                Unix socket path (default: off)
      --max-connections N       connections open at once (default: half the open-file limit, 16..4096)
      --max-connections-per-uid N  connections open at once per peer uid (default: half of --max-connections)
  add KEY --pod-id ID --pod-name NAME --pod-ns NS
      --dns JSON|NS[,NS]        CNI DNS object, or nameservers
      --dns-search D            search domain (repeatable)   --dns-domain D   --dns-option OPT (repeatable)
  get KEY                     print the interface descriptions
      --qemu-args               print the -netdev/-device arguments Virtlet's vmwrapper would build
      --exec -- CMD [ARGS...]   run CMD with the fds as fd 3, 4, ... (with --qemu-args: appended to ARGS)
  release KEY                 release the key's network
  recover KEY --from FILE     recover a key from a RecoverPayload or state record JSON file (- for stdin)
  ls [--state-dir DIR]        keys the running server holds and the ones it skipped at recovery (why);
                              with no server (or Virtlet's), the state dir, saying so
  status                      is the server running

Global options:
  --socket PATH               server socket (default $TAPMANAGER_SOCKET or ${DEFAULT_SOCKET_PATH})
                              ($TAPMANAGER_TIMEOUT_MS bounds each request; default 30000)
  --json                      machine-readable output
  -h, --help                  this text; \`tapmanager COMMAND --help\` or \`tapmanager help COMMAND\`: one command's
  -V, --version               the package version

Exit codes: 0 ok, 1 failure (server error, unreadable file, missing native addon), 2 usage error,
3 server not running (its message on stderr, for every command).
`

/** The help of one command: its lines of USAGE, then the global options. */
export function commandUsage(command: Command): string {
  const lines = USAGE.split('\n')
  const start = lines.findIndex((l) => l.startsWith(`  ${command} `) || l === `  ${command}`)
  let end = start + 1
  while (end < lines.length && /^ {3,}\S/.test(lines[end])) end++
  const global = lines.slice(lines.indexOf('Global options:'))
  return [`Usage: tapmanager ${command} [options]`, '', ...lines.slice(start, end), '', ...global].join('\n')
}

interface Parsed {
  command: Command
  positionals: string[]
  values: Record<string, string | boolean | string[] | undefined>
  rest: string[]
}

type Parse = Parsed | { help: Command | null } | 'version'

function parse(argv: string[]): Parse {
  // Everything after the first `--` belongs to `get --exec`.
  const dd = argv.indexOf('--')
  const head = dd < 0 ? argv : argv.slice(0, dd)
  const rest = dd < 0 ? [] : argv.slice(dd + 1)
  const all: Record<string, { type: 'string' | 'boolean'; multiple?: boolean; short?: string }> = { ...GLOBAL_OPTIONS }
  for (const opts of Object.values(COMMAND_OPTIONS)) Object.assign(all, opts)
  let parsed: ReturnType<typeof parseArgs>
  try {
    parsed = parseArgs({ args: head, options: all, allowPositionals: true, strict: true, tokens: true })
  } catch (err) {
    throw new UsageError((err as Error).message)
  }
  const values = parsed.values as Parsed['values']
  const [cmd, ...positionals] = parsed.positionals
  const known = (c: string | undefined): c is Command => c !== undefined && (COMMANDS as string[]).includes(c)
  if (cmd === 'help') {
    // `help [COMMAND]`
    if (positionals.length > 1) throw new UsageError(`help takes at most one COMMAND, got ${positionals.length}`)
    if (positionals.length === 1 && !known(positionals[0])) throw new UsageError(`unknown command ${JSON.stringify(positionals[0])}`)
    return { help: (positionals[0] as Command | undefined) ?? null }
  }
  if (values.help) return { help: known(cmd) ? cmd : null }
  if (values.version) return 'version'
  if (cmd === undefined) throw new UsageError('missing command')
  if (!(COMMANDS as string[]).includes(cmd)) throw new UsageError(`unknown command ${JSON.stringify(cmd)}`)
  const command = cmd as Command
  const allowed = new Set([...Object.keys(GLOBAL_OPTIONS), ...Object.keys(COMMAND_OPTIONS[command])])
  for (const tok of parsed.tokens ?? []) {
    if (tok.kind === 'option' && !allowed.has(tok.name)) throw new UsageError(`option --${tok.name} does not apply to ${command}`)
  }
  if (dd >= 0 && !(command === 'get' && values.exec)) throw new UsageError('arguments after -- are only for get --exec')
  return { command, positionals, values, rest }
}

function oneKey(p: Parsed): string {
  if (p.positionals.length === 0) throw new UsageError(`${p.command} needs a KEY`)
  if (p.positionals.length > 1) throw new UsageError(`${p.command} takes one KEY, got ${p.positionals.length} arguments`)
  return checkKey(p.positionals[0])
}

/** A key the wire can carry: ASCII, at most 64 bytes, no leading/trailing whitespace, no NUL. */
export function checkKey(key: string): string {
  if (key.length === 0) throw new UsageError('KEY must not be empty')
  if (!/^[\x20-\x7e]*$/.test(key)) throw new UsageError('KEY must be printable ASCII')
  if (key.length > 64) throw new UsageError(`KEY is ${key.length} bytes; at most 64 fit in the protocol header`)
  if (key.trim() !== key) throw new UsageError('KEY must not start or end with whitespace')
  return key
}

function noPositionals(p: Parsed): void {
  if (p.positionals.length > 0) throw new UsageError(`${p.command} takes no arguments, got ${JSON.stringify(p.positionals[0])}`)
}

function need(p: Parsed, name: string): string {
  const v = p.values[name]
  if (typeof v !== 'string' || v.length === 0) throw new UsageError(`${p.command} needs --${name}`)
  return v
}

/** Asks a running server for its keys (throws ERR_NOT_RUNNING when none listens, ERR_UNSUPPORTED for Virtlet's). */
async function listFromServer(c: CliClient): Promise<ServerListing> {
  if (!c.list) throw new TapmanagerError('ERR_UNSUPPORTED', 'client has no list')
  if (!(await c.isRunning())) throw new TapmanagerError('ERR_NOT_RUNNING', 'not running')
  return c.list()
}

/** The largest uid or gid (u32). */
const MAX_ID = 0xffff_ffff

function intList(values: unknown, flag: string): number[] {
  const out: number[] = []
  for (const v of (values as string[] | undefined) ?? []) {
    for (const part of v.split(',')) {
      // uids and gids are u32: anything else would wrap around in the native filter (4294967297 -> 1).
      if (!/^\d+$/.test(part) || Number(part) > MAX_ID) {
        throw new UsageError(`--${flag}: ${JSON.stringify(part)} is not an id (an integer from 0 to ${MAX_ID})`)
      }
      out.push(Number(part))
    }
  }
  return out
}

function intFlag(v: unknown, flag: string, def: number, min: number, max: number): number {
  if (v === undefined) return def
  if (typeof v !== 'string' || !/^\d+$/.test(v) || Number(v) < min || Number(v) > max) {
    throw new UsageError(`--${flag} must be an integer from ${min} to ${max}`)
  }
  return Number(v)
}

/** The ServeOptions that `tapmanager serve` flags stand for (defaults filled in). */
export function serveOptionsFromFlags(values: Parsed['values'], env: NodeJS.ProcessEnv): Omit<ServeOptions, 'log'> {
  const mode = (values['socket-mode'] as string | undefined) ?? '0660'
  if (!/^0?[0-7]{3}$/.test(mode)) throw new UsageError(`--socket-mode must be octal like 0660, got ${JSON.stringify(mode)}`)
  const level = (values['log-level'] as string | undefined) ?? 'info'
  if (!(LOG_LEVELS as readonly string[]).includes(level)) throw new UsageError(`--log-level must be one of ${LOG_LEVELS.join(', ')}`)
  const binDirs = (values['cni-bin-dir'] as string[] | undefined) ?? DEFAULT_CNI_PLUGIN_DIRS
  return {
    socketPath: socketPath(values, env),
    socketMode: parseInt(mode, 8),
    socketGroup: (values['socket-group'] as string | undefined) ?? null,
    allowedUids: intList(values['allow-uid'], 'allow-uid'),
    allowedGids: intList(values['allow-gid'], 'allow-gid'),
    cniConfigDir: (values['cni-conf-dir'] as string | undefined) ?? DEFAULT_CNI_CONFIG_DIR,
    cniPluginDirs: [...binDirs],
    netnsDir: (values['netns-dir'] as string | undefined) ?? DEFAULT_NETNS_DIR,
    stateDir: (values['state-dir'] as string | undefined) ?? DEFAULT_STATE_DIR,
    calicoSubnetSize: intFlag(values['calico-subnet-size'], 'calico-subnet-size', DEFAULT_CALICO_SUBNET_SIZE, 1, 32),
    sriov: values.sriov === true,
    logLevel: level as LogLevel,
    maxDataSize: intFlag(values['max-data-size'], 'max-data-size', DEFAULT_MAX_DATA_SIZE, 1, 0xffffffff),
    cniTimeoutMs: intFlag(values['cni-timeout'], 'cni-timeout', DEFAULT_CNI_TIMEOUT_MS, 1, 3_600_000),
    metricsListen: metricsListen(values['metrics-listen']),
    maxConnections: values['max-connections'] === undefined ? null : intFlag(values['max-connections'], 'max-connections', 0, 1, MAX_ID),
    maxConnectionsPerUid:
      values['max-connections-per-uid'] === undefined ? null : intFlag(values['max-connections-per-uid'], 'max-connections-per-uid', 0, 1, MAX_ID),
  }
}

function metricsListen(v: unknown): string | null {
  if (v === undefined) return null
  try {
    parseMetricsAddress(String(v))
  } catch (err) {
    throw new UsageError(`--metrics-listen: ${(err as Error).message}`)
  }
  return String(v)
}

function socketPath(values: Parsed['values'], env: NodeJS.ProcessEnv): string {
  return (values.socket as string | undefined) ?? env.TAPMANAGER_SOCKET ?? DEFAULT_SOCKET_PATH
}

/** The add payload (Virtlet's GetFDPayload) from the add flags. */
export function addPayloadFromFlags(values: Parsed['values']): { podNetworkDesc: Record<string, unknown> } {
  const podId = values['pod-id']
  const podName = values['pod-name']
  const podNs = values['pod-ns']
  for (const [flag, v] of [['pod-id', podId], ['pod-name', podName], ['pod-ns', podNs]] as const) {
    if (typeof v !== 'string' || v.length === 0) throw new UsageError(`add needs --${flag}`)
  }
  let dns: Record<string, unknown> | null = null
  const dnsFlag = values.dns as string | undefined
  if (dnsFlag !== undefined) {
    if (dnsFlag.trim().startsWith('{')) {
      try {
        dns = JSON.parse(dnsFlag) as Record<string, unknown>
      } catch (err) {
        throw new UsageError(`--dns: bad JSON: ${(err as Error).message}`)
      }
      if (typeof dns !== 'object' || dns === null || Array.isArray(dns)) throw new UsageError('--dns JSON must be an object')
    } else {
      const ns = dnsFlag.split(',').map((s) => s.trim()).filter(Boolean)
      if (ns.length === 0) throw new UsageError('--dns needs a nameserver')
      dns = { nameservers: ns }
    }
  }
  const search = values['dns-search'] as string[] | undefined
  const domain = values['dns-domain'] as string | undefined
  const options = values['dns-option'] as string[] | undefined
  if (search || domain || options) {
    dns = { ...(dns ?? {}) }
    if (domain) dns.domain = domain
    if (search) dns.search = search
    if (options) dns.options = options
  }
  // Go's field order: podId, podNs, podName, DNS.
  return { podNetworkDesc: { podId, podNs, podName, DNS: dns } }
}

/** The recover payload from a file: a RecoverPayload, or a state record (as kept under the state dir). */
export function recoverPayloadFromText(text: string, source: string): Record<string, unknown> {
  let v: unknown
  try {
    v = JSON.parse(text)
  } catch (err) {
    throw new UsageError(`${source}: bad JSON: ${(err as Error).message}`)
  }
  const o = v as Record<string, unknown> | null
  if (typeof o !== 'object' || o === null || Array.isArray(o)) throw new UsageError(`${source}: not a JSON object`)
  if (typeof o.podNetworkDesc !== 'object' || o.podNetworkDesc === null) throw new UsageError(`${source}: no podNetworkDesc`)
  if (typeof o.csn !== 'object' || o.csn === null) throw new UsageError(`${source}: no csn (ContainerSideNetwork)`)
  return {
    podNetworkDesc: o.podNetworkDesc,
    csn: o.csn,
    HaveRunningContainers: o.HaveRunningContainers === true,
  }
}

/** get info on the wire (`[{"type":0,"mac":"<base64>","fdIndex":0,"pciAddress":""}]`) in TypeScript form. */
export function interfaceInfoFromWire(info: Buffer | string): InterfaceInfo[] {
  const v = JSON.parse(typeof info === 'string' ? info : info.toString('utf8')) as unknown
  if (!Array.isArray(v)) throw new TapmanagerError('ERR_INVALID', 'get info is not a JSON array')
  return v.map((d: Record<string, unknown>) => {
    const mac = typeof d.mac === 'string' ? Buffer.from(d.mac, 'base64') : Buffer.alloc(0)
    return {
      type: d.type === 1 ? 1 : 0,
      mac: [...mac].map((b) => b.toString(16).padStart(2, '0')).join(':'),
      fdIndex: Number(d.fdIndex ?? 0),
      pciAddress: typeof d.pciAddress === 'string' ? d.pciAddress : '',
    }
  })
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

function defaultIo(): CliIo {
  return {
    stdout: (t) => process.stdout.write(t),
    stderr: (t) => process.stderr.write(t),
    readFile: (p) => readFileSync(p === '-' ? 0 : p, 'utf8'),
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

  const sock = socketPath(p.values, env)
  const makeClient = deps.createClient ?? createCliClient
  try {
    switch (p.command) {
      case 'serve': {
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
      case 'ls': {
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
      case 'status': {
        noPositionals(p)
        const running = await makeClient(sock).isRunning()
        // --json: the answer, either way, on stdout. Otherwise the not-running message is the one every command
        // prints, on stderr.
        if (running || json) out(`tapmanager is running at ${sock}`, { running, socket: sock })
        else return fail(EXIT_NOT_RUNNING, notRunning(sock))
        return running ? EXIT_OK : EXIT_NOT_RUNNING
      }
      default:
        break
    }

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
          const { closeFd } = await import('./native')
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
          throw new TapmanagerError('ERR_READ', `--from ${from}: ${(err as Error).message}`, { cause: err })
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
  } catch (err) {
    if (err instanceof UsageError) return fail(EXIT_USAGE, err)
    return fail(EXIT_SERVER_ERROR, err)
  }
}

/** The one not-running error of every command (exit 3, on stderr). */
function notRunning(sock: string, cause?: unknown): TapmanagerError {
  return new TapmanagerError('ERR_NOT_RUNNING', `the server is not running at ${sock}`, cause === undefined ? undefined : { cause })
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

function packageVersion(): string {
  try {
    // dist/cli.js and src/cli.ts both sit one level below the package root.
    return (JSON.parse(readFileSync(`${__dirname}/../package.json`, 'utf8')) as { version: string }).version
  } catch {
    return 'unknown'
  }
}

/** The `tapmanager` executable's entry point. */
export async function main(argv: string[] = process.argv.slice(2)): Promise<void> {
  process.exitCode = await runCli(argv)
}

if (typeof require !== 'undefined' && typeof module !== 'undefined' && require.main === module) {
  void main()
}
