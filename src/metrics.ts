/**
 * Prometheus metrics of a running daemon (opt-in: `tapmanager serve --metrics-listen ADDR`).
 *
 * {@link DaemonMetrics} is a {@link DaemonObserver}: the daemon hands it each request (the FDServer's
 * `onRequest`, natively answered gets included), each CNI plugin run, each refused connection, the recovery
 * report, and its PodNetworkOps to wrap (to follow each pod's DHCP server). {@link startMetricsServer} serves
 * `/metrics` (Prometheus text format), `/readyz` (200 once the daemon serves its socket, after recovery) and
 * `/healthz` (200 while its socket accepts connections) over HTTP on a TCP address or a Unix socket: probes that
 * cost the node nothing, unlike an exec of `tapmanager status` (a Node process: ~0.35 s CPU, ~60 MiB).
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { lstatSync, unlinkSync } from 'node:fs'
import { connect } from 'node:net'
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client'
import { InvalidInputError } from './errors'
import type { CniPluginRunEvent } from './cni'
import type { Daemon, DaemonObserver, RecoveryReport } from './daemon'
import type { DhcpServerCounts, DhcpServerHandle, PodNetworkOps } from './podnetwork'
import type { RequestLogEntry } from './server'

/** Request duration buckets (seconds): a natively answered get takes ~0.1 ms, an add with CNI 50 ms to seconds. */
const REQUEST_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
/** CNI plugin run buckets (seconds): bridge ADD 40-130 ms, DEL 100-200 ms here; timeouts at 60 s. */
const CNI_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
const DHCP_KINDS = ['offers', 'acks', 'naks', 'ignored', 'errors'] as const
const KNOWN_COMMANDS = new Set(['add', 'get', 'release', 'recover'])

/** The daemon's metrics, in their own registry. */
export class DaemonMetrics implements DaemonObserver {
  readonly registry = new Registry()
  private daemon: Daemon | null = null
  private readonly requests: Counter<'command' | 'outcome'>
  private readonly requestSeconds: Histogram<'command' | 'outcome'>
  private readonly droppedLogs: Counter
  private readonly cniSeconds: Histogram<'plugin' | 'command'>
  private readonly cniFailures: Counter<'plugin' | 'command' | 'code'>
  private readonly recovery: Gauge<'result'>
  /** DHCP servers running now, and the final counts of the ones stopped. */
  private readonly dhcpLive = new Set<DhcpServerHandle>()
  private readonly dhcpRetired: DhcpServerCounts = { offers: 0, acks: 0, naks: 0, ignored: 0, errors: 0 }

  constructor() {
    const registers = [this.registry]
    // process_* (RSS, CPU, open fds) and nodejs_* (event loop lag, heap): what a node agent is watched by.
    // Event loop lag sampled every second: prom-client's default of 10 ms cost an idle daemon 5-9 ms of CPU a second
    // (bench/footprint.ts; 0 measurable at 1 s), and a stall worth alerting on lasts far longer than that.
    collectDefaultMetrics({ register: this.registry, eventLoopMonitoringPrecision: 1000 })
    this.requests = new Counter({
      name: 'tapmanager_requests_total',
      help: 'Requests served, by command (add, get, release, recover, unknown) and outcome (ok, error); natively answered gets included.',
      labelNames: ['command', 'outcome'],
      registers,
    })
    this.requestSeconds = new Histogram({
      name: 'tapmanager_request_duration_seconds',
      help: 'Time from having read a request to handing its response to the socket.',
      labelNames: ['command', 'outcome'],
      buckets: REQUEST_BUCKETS,
      registers,
    })
    this.droppedLogs = new Counter({
      name: 'tapmanager_fast_get_reports_dropped_total',
      help: 'Natively answered gets not reported (and so not counted above) because the native report queue was full.',
      registers,
    })
    const self = this
    new Gauge({
      name: 'tapmanager_pods',
      help: 'Keys (pods) the daemon holds now: added or recovered, not released.',
      registers,
      collect() {
        this.set(self.daemon ? self.daemon.source.keys().length : 0)
      },
    })
    new Gauge({
      name: 'tapmanager_ready',
      help: '1 once the daemon serves its socket (after recovery), 0 before and after.',
      registers,
      collect() {
        this.set(self.ready ? 1 : 0)
      },
    })
    for (const kind of DHCP_KINDS) {
      new Counter({
        name: `tapmanager_dhcp_${kind}_total`,
        help:
          kind === 'ignored'
            ? 'DHCP datagrams not answered (unknown MAC, garbage, other message types), over every pod.'
            : kind === 'errors'
              ? 'DHCP socket errors and handler faults, over every pod.'
              : `DHCP ${kind.slice(0, -1).toUpperCase()}s sent by the pods' DHCP servers, over every pod.`,
        registers,
        collect() {
          this.reset()
          this.inc(self.dhcpTotals()[kind])
        },
      })
    }
    this.cniSeconds = new Histogram({
      name: 'tapmanager_cni_plugin_duration_seconds',
      help: 'Duration of CNI plugin runs, by plugin type and command (failed runs included).',
      labelNames: ['plugin', 'command'],
      buckets: CNI_BUCKETS,
      registers,
    })
    this.cniFailures = new Counter({
      name: 'tapmanager_cni_plugin_failures_total',
      help: 'CNI plugin runs that failed, by plugin type, command and error code (ERR_CNI, ERR_TIMEOUT, ERR_NOT_FOUND).',
      labelNames: ['plugin', 'command', 'code'],
      registers,
    })
    // Refusals and accept() failures are counted by the native listener (one peer filter for the TypeScript
    // path and the native fast path; caps checked before anything is read): read its totals at scrape time.
    new Counter({
      name: 'tapmanager_connections_refused_total',
      help: 'Connections refused: by the peer uid/gid filter (peer_filter) or by a connection limit (caps).',
      labelNames: ['reason'],
      registers,
      collect() {
        const l = self.daemon?.server.limits().total
        this.reset()
        this.inc({ reason: 'peer_filter' }, l?.refused ?? 0)
        this.inc({ reason: 'caps' }, (l?.overTotal ?? 0) + (l?.overUid ?? 0))
      },
    })
    new Counter({
      name: 'tapmanager_accept_errors_total',
      help: 'accept() failures of the socket (EMFILE, ...), survived with a bounded back-off.',
      registers,
      collect() {
        this.reset()
        this.inc(self.daemon?.server.limits().total.acceptErrors ?? 0)
      },
    })
    this.recovery = new Gauge({
      name: 'tapmanager_recovery_keys',
      help: 'What the last start did with the keys in the state dir: recovered, cleaned (interrupted adds), skipped, corrupt.',
      labelNames: ['result'],
      registers,
    })
    for (const result of ['recovered', 'cleaned', 'skipped', 'corrupt']) this.recovery.set({ result }, 0)
  }

  /** Whether the daemon's socket accepts a connection now (false before it started and after it stopped). */
  async live(timeoutMs = 2000): Promise<boolean> {
    if (!this.ready || !this.daemon) return false
    const path = this.daemon.server.socketPath
    return new Promise<boolean>((resolve) => {
      const s = connect({ path })
      const done = (ok: boolean) => {
        clearTimeout(timer)
        s.destroy()
        resolve(ok)
      }
      const timer = setTimeout(() => done(false), timeoutMs)
      s.once('connect', () => done(true))
      s.once('error', () => done(false))
    })
  }

  /** Whether the daemon started and serves its socket. */
  get ready(): boolean {
    return this.daemon?.server.listening ?? false
  }

  onRequest(e: RequestLogEntry): void {
    // Any other command (a peer may send any 32-bit code) is one label value: the label set stays bounded.
    const labels = { command: KNOWN_COMMANDS.has(e.command) ? e.command : 'unknown', outcome: e.outcome }
    this.requests.inc(labels)
    this.requestSeconds.observe(labels, e.durationMs / 1000)
    if (e.dropped) this.droppedLogs.inc(e.dropped)
  }

  onCniPluginRun(e: CniPluginRunEvent): void {
    this.cniSeconds.observe({ plugin: e.plugin, command: e.command }, e.durationMs / 1000)
    if (e.errorCode) this.cniFailures.inc({ plugin: e.plugin, command: e.command, code: e.errorCode })
  }

  onRecovery(r: RecoveryReport): void {
    this.recovery.set({ result: 'recovered' }, r.recovered.length)
    this.recovery.set({ result: 'cleaned' }, r.cleaned.length)
    this.recovery.set({ result: 'skipped' }, r.skipped.length)
    this.recovery.set({ result: 'corrupt' }, r.corrupt.length)
  }

  onStarted(d: Daemon): void {
    this.daemon = d
  }

  /** Follows each DHCP server the ops start: its counts while it runs, its final counts once stopped. */
  wrapOps(ops: PodNetworkOps): PodNetworkOps {
    return {
      ...ops,
      startDhcpServer: async (nsPath, csnJson, parsed) => {
        const h = await ops.startDhcpServer(nsPath, csnJson, parsed)
        this.dhcpLive.add(h)
        return {
          stop: async () => {
            try {
              await h.stop()
            } finally {
              if (this.dhcpLive.delete(h)) addCounts(this.dhcpRetired, h.stats?.())
            }
          },
          stats: () => h.stats?.() ?? zeroCounts(),
        }
      },
    }
  }

  /** DHCP counts over every server, running and stopped. */
  dhcpTotals(): DhcpServerCounts {
    const t = { ...this.dhcpRetired }
    for (const h of this.dhcpLive) addCounts(t, h.stats?.())
    return t
  }

  /** The Prometheus text exposition. */
  metrics(): Promise<string> {
    return this.registry.metrics()
  }
}

function zeroCounts(): DhcpServerCounts {
  return { offers: 0, acks: 0, naks: 0, ignored: 0, errors: 0 }
}

function addCounts(into: DhcpServerCounts, c: DhcpServerCounts | undefined): void {
  if (!c) return
  for (const k of DHCP_KINDS) into[k] += c[k]
}

/** Where a metrics endpoint listens. */
export type MetricsAddress = { host: string; port: number } | { path: string }

/**
 * Parses `--metrics-listen`: `HOST:PORT`, `[IPV6]:PORT`, `:PORT` (every address) or a Unix socket path
 * (anything with a `/`).
 */
export function parseMetricsAddress(spec: string): MetricsAddress {
  if (spec.includes('/')) return { path: spec }
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]*)):(\d{1,5})$/.exec(spec)
  const port = m ? Number(m[3]) : NaN
  if (!m || port > 65535) {
    throw new InvalidInputError(`metrics address must be HOST:PORT, [IPV6]:PORT, :PORT or a Unix socket path, not ${JSON.stringify(spec)}`)
  }
  const host = m[1] ?? m[2]
  return { host: host === '' ? '0.0.0.0' : host, port }
}

/** A running metrics endpoint. */
export interface MetricsServer {
  /** Where it listens: `host:port` (the port resolved when 0 was asked) or the socket path. */
  readonly address: string
  close(): Promise<void>
}

/** Serves `/metrics`, `/healthz` and `/readyz` for `metrics` at `spec` (see {@link parseMetricsAddress}). */
export async function startMetricsServer(spec: string, metrics: DaemonMetrics): Promise<MetricsServer> {
  const where = parseMetricsAddress(spec)
  if ('path' in where) await removeStaleSocket(where.path)
  const server: Server = createServer((req, res) => void handle(metrics, req, res))
  // Scrapes are short: an idle keep-alive connection must not hold the daemon's stop.
  server.keepAliveTimeout = 5_000
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    if ('path' in where) server.listen(where.path, resolve)
    else server.listen(where.port, where.host, resolve)
  })
  let address: string
  if ('path' in where) address = where.path
  else {
    const a = server.address()
    address = a && typeof a === 'object' ? `${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}` : spec
  }
  return {
    address,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => {
          if ('path' in where) {
            try {
              unlinkSync(where.path)
            } catch {
              // already gone
            }
          }
          resolve()
        })
        server.closeAllConnections()
      }),
  }
}

/** Removes a socket file nothing accepts on (left by a killed daemon); a live one is left alone (listen fails). */
async function removeStaleSocket(path: string): Promise<void> {
  let isSocket = false
  try {
    isSocket = lstatSync(path).isSocket()
  } catch {
    return // no file
  }
  if (!isSocket) return // listen fails with EADDRINUSE: never remove another kind of file
  const alive = await new Promise<boolean>((resolve) => {
    const s = connect({ path })
    s.once('connect', () => {
      s.destroy()
      resolve(true)
    })
    s.once('error', () => resolve(false))
  })
  if (!alive) unlinkSync(path)
}

async function handle(metrics: DaemonMetrics, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const path = (req.url ?? '/').split('?')[0]
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    res.writeHead(405, { allow: 'GET, HEAD' }).end()
    return
  }
  try {
    if (path === '/metrics') {
      const body = await metrics.metrics()
      res.writeHead(200, { 'content-type': metrics.registry.contentType }).end(req.method === 'HEAD' ? undefined : body)
    } else if (path === '/healthz') {
      const live = await metrics.live()
      res.writeHead(live ? 200 : 503, { 'content-type': 'text/plain' }).end(live ? 'ok\n' : 'the socket does not accept connections\n')
    } else if (path === '/readyz') {
      const ready = metrics.ready
      res.writeHead(ready ? 200 : 503, { 'content-type': 'text/plain' }).end(ready ? 'ready\n' : 'not ready\n')
    } else {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: /metrics, /healthz, /readyz\n')
    }
  } catch (err) {
    res.writeHead(500, { 'content-type': 'text/plain' }).end(`${(err as Error)?.message ?? err}\n`)
  }
}
