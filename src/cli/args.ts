/**
 * The `tapmanager` command line, part 1: the option tables, the usage text, parsing, and the conversion of flags
 * into ServeOptions and request payloads (no I/O, no native addon).
 */
import { parseArgs } from 'node:util'
import { TapmanagerError } from '../errors'
import { validateKey } from '../key'
import { LOG_LEVELS, type LogLevel, type RequestLogger } from '../log'
// metrics.ts loads prom-client but not the addon.
import { parseMetricsAddress } from '../metrics'
import { DEFAULT_STATE_DIR } from '../state'
import { DEFAULT_CALICO_SUBNET_SIZE, DEFAULT_NETNS_DIR, DEFAULT_NETNS_POOL, DEFAULT_SPIN_US, MAX_NETNS_POOL, MAX_SPIN_US } from '../defaults'

export { DEFAULT_CALICO_SUBNET_SIZE, DEFAULT_NETNS_DIR } from '../defaults'

export const EXIT_OK = 0
export const EXIT_SERVER_ERROR = 1
export const EXIT_USAGE = 2
export const EXIT_NOT_RUNNING = 3

export const DEFAULT_SOCKET_PATH = '/run/tapmanager/tapmanager.sock'
export const DEFAULT_CNI_CONFIG_DIR = '/etc/cni/net.d'
export const DEFAULT_CNI_PLUGIN_DIRS = ['/opt/cni/bin', '/usr/lib/cni']
export const DEFAULT_MAX_DATA_SIZE = 64 * 1024
export const DEFAULT_CNI_TIMEOUT_MS = 60_000

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
  /** Keep the kernel's IPv6 defaults in pod netns (default: IPv6 off for links made there; see `--pod-ipv6`). */
  podIpv6: boolean
  /** Spare pod netns kept made ahead of time (`--netns-pool`; 0: none). */
  netnsPool: number
  /** The server's busy wait for a next request after an answer, µs (`--spin-us`; 0: none). */
  spinUs: number
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
    'pod-ipv6': { type: 'boolean' },
    'netns-pool': { type: 'string' },
    'spin-us': { type: 'string' },
    'log-level': { type: 'string' },
    'max-data-size': { type: 'string' },
    'cni-timeout': { type: 'string' },
    'max-connections': { type: 'string' },
    'max-connections-per-uid': { type: 'string' },
    'metrics-listen': { type: 'string' },
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

export type Command = keyof typeof COMMAND_OPTIONS
export const COMMANDS = Object.keys(COMMAND_OPTIONS) as Command[]

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
      --pod-ipv6                keep the kernel's IPv6 defaults in pod netns (default: IPv6 off for
                                the links made there; a CNI plugin that adds an IPv6 address turns it on)
      --netns-pool N            spare pod netns kept made ahead of time, so an add only binds one
                                (default ${DEFAULT_NETNS_POOL}; 0: none; held open, mounted nowhere)
      --spin-us N               after answering, busy-wait up to N µs (0-${MAX_SPIN_US}) for the next request
                                before sleeping (default ${DEFAULT_SPIN_US}; 0: never)
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

export interface Parsed {
  command: Command
  positionals: string[]
  values: Record<string, string | boolean | string[] | undefined>
  rest: string[]
}

export type Parse = Parsed | { help: Command | null } | 'version'
export function parse(argv: string[]): Parse {
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

export function oneKey(p: Parsed): string {
  if (p.positionals.length === 0) throw new UsageError(`${p.command} needs a KEY`)
  if (p.positionals.length > 1) throw new UsageError(`${p.command} takes one KEY, got ${p.positionals.length} arguments`)
  return checkKey(p.positionals[0])
}

/**
 * A key the wire can carry, by the one rule every TypeScript caller uses ({@link validateKey}: 1 to 64 bytes of
 * UTF-8, no NUL, no leading/trailing whitespace); a bad key is a usage error (exit 2) with that rule's message.
 */
export function checkKey(key: string): string {
  try {
    validateKey(key)
  } catch (err) {
    throw new UsageError(`KEY: ${(err as Error).message}`)
  }
  return key
}

export function noPositionals(p: Parsed): void {
  if (p.positionals.length > 0) throw new UsageError(`${p.command} takes no arguments, got ${JSON.stringify(p.positionals[0])}`)
}

export function need(p: Parsed, name: string): string {
  const v = p.values[name]
  if (typeof v !== 'string' || v.length === 0) throw new UsageError(`${p.command} needs --${name}`)
  return v
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
    podIpv6: values['pod-ipv6'] === true,
    netnsPool: intFlag(values['netns-pool'], 'netns-pool', DEFAULT_NETNS_POOL, 0, MAX_NETNS_POOL),
    spinUs: intFlag(values['spin-us'], 'spin-us', DEFAULT_SPIN_US, 0, MAX_SPIN_US),
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

export function socketPath(values: Parsed['values'], env: NodeJS.ProcessEnv): string {
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
