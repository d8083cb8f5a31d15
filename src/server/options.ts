/**
 * FDServer's options, their defaults and checks, and the public shapes it reports (request log entries, limits,
 * the list answer).
 */
import { readFileSync } from 'node:fs'
import { spinUsOf } from '../defaults'
import { InvalidInputError } from '../errors'
import type { PeerCredentials, UnixListener } from '../native'

/** One served request, for structured logs. */
export interface RequestLogEntry {
  /** The trimmed key ('' when the request was refused before it was read). */
  key: string
  /** `add`, `get`, `release`, `recover`, or the hex code of an unknown command. */
  command: string
  /** Time from having read the request to handing the response to the socket, in ms. */
  durationMs: number
  /** `ok`, or `error` with the message sent to the client. */
  outcome: 'ok' | 'error'
  error?: string
  /** The peer's credentials. */
  peer?: PeerCredentials
  /**
   * Only on a get answered natively, and only when log entries were lost: how many natively answered gets after
   * this one went unlogged because the native log queue was full (see {@link FDServer.droppedLogEntries}).
   */
  dropped?: number
}

/** Options of {@link FDServer}. */
export interface FDServerOptions {
  /** Largest accepted request payload in bytes (default 64 KiB); a bigger DataSize gets an error and the connection is closed. */
  maxDataSize?: number
  /** Deadline for reading one request (header and payload) in ms, including the wait for the next request on an open connection (default 10 s). */
  readTimeoutMs?: number
  /** Socket file mode (default 0o600). */
  socketMode?: number
  /** Socket file group id. */
  socketGid?: number
  /** When set, only peers whose uid is listed (or whose gid is in `allowedGids`) are served. */
  allowedUids?: number[]
  /** When set, only peers whose gid is listed (or whose uid is in `allowedUids`) are served. */
  allowedGids?: number[]
  /** Deadline for writing one response in ms (default 10 s): a client that does not read cannot hold its connection longer. */
  writeTimeoutMs?: number
  /**
   * Connections open at once (default: half the process's open-file limit, from 16 to 4096). More are closed at
   * once, counted (see `onLimits`), before anything is read.
   */
  maxConnections?: number
  /** Connections open at once from one peer uid (default: half of `maxConnections`). */
  maxConnectionsPerUid?: number
  /**
   * How long `stop()` lets connections finish their last responses before it closes them (default 5 s). Source
   * calls in progress (an add running CNI) are still awaited: they have their own deadlines.
   */
  stopTimeoutMs?: number
  /**
   * Called at most once per `limitsIntervalMs` (default 10 s), and once at stop, when connections were refused
   * (over a cap, or a peer outside the uid/gid filter) or accept() failed since the last call: the counts of that
   * interval and the totals. A flood costs a few counters, never a log line per connection.
   */
  onLimits?: (report: LimitsReport) => void
  /** See `onLimits` (ms, default 10 s). */
  limitsIntervalMs?: number
  /**
   * Called when the server stops serving for a reason other than `stop()` (its accept loop ended): the owner
   * should log it and exit with a failure. Also available as {@link FDServer.failed}.
   */
  onFatal?: (err: Error) => void
  /**
   * Extra fields for the answer to the list request ({@link FD_EXT_COMMAND.list}), e.g. the keys a daemon
   * skipped at recovery: `{ skipped: [{ key, reason }] }`.
   */
  listInfo?: () => Record<string, unknown>
  /**
   * Called once per request (a throw is ignored). A get answered natively (a `stableInfo` source, see
   * {@link FDSource.stableInfo}) is reported too, with the same fields, shortly after its response went out: it
   * may arrive after entries of requests that came later. Such entries wait in a native queue of
   * {@link FAST_LOG_CAPACITY} entries until the event loop takes them; if it falls that far behind, further
   * entries are counted instead ({@link RequestLogEntry.dropped}, {@link FDServer.droppedLogEntries}).
   */
  onRequest?: (entry: RequestLogEntry) => void
  /**
   * Where connections are accepted and their requests read: `loop` (default; on Node) on this thread's own event
   * loop, so a request reaches the source with no other thread in between (one wake-up of this thread per
   * request); `runtime` on the addon's native runtime, delivered through threadsafe functions (what Bun and Deno
   * always use: they lack libuv's functions). Caps, filter, deadlines, the native get fast path and every
   * response are the same either way; `runtime` is there to compare (bench/fd.ts) and as a fallback.
   */
  readOn?: 'loop' | 'runtime'
  /**
   * With `readOn: 'loop'`: how long (µs, 0 to 1000, default 50) the event loop, when it has nothing else to do,
   * busy-waits for the next request after answering one, before it sleeps. A client that sends its next request
   * at once (most do) then finds this thread awake: on a quiet machine, a virtual machine above all, waking a
   * sleeping thread costs more than answering a get. At most this much CPU per answer, none while the loop has
   * other work, and it stops as soon as anything the loop watches is ready; 0 turns it off. The same as
   * `FDClient`'s `spinUs` on the other side.
   */
  spinUs?: number
}

/** The most bytes of error text an error response (and its log entry) carries; longer texts are cut (`...`). */
export const MAX_ERROR_TEXT = 1024

/** What the listener refused or survived: `interval` since the previous report, `total` since `serve()`. */
export interface LimitsReport {
  interval: LimitCounts
  total: LimitCounts
  /** Connections open now. */
  open: number
  /** The last accept() error, if any. */
  lastAcceptError?: string
}

export interface LimitCounts {
  /** Closed at once: `maxConnections` were open. */
  overTotal: number
  /** Closed at once: the peer uid had `maxConnectionsPerUid` open. */
  overUid: number
  /** Peers outside the uid/gid filter (one error response each, natively). */
  refused: number
  /** accept() failures (EMFILE, ...), survived with a bounded backoff. */
  acceptErrors: number
}

/** What the list request answers (see {@link FDServer} and `FDClient.list`). */
export interface ServerListing {
  /** Every key the server holds: `held` (fds open) or `recovered` (fds not retrieved yet). */
  keys: { key: string; state: 'held' | 'recovered' }[]
  [extra: string]: unknown
}

const DEFAULT_MAX_DATA = 64 * 1024
const DEFAULT_READ_TIMEOUT = 10_000
const DEFAULT_WRITE_TIMEOUT = 10_000
const DEFAULT_STOP_TIMEOUT = 5_000
export const DEFAULT_LIMITS_INTERVAL = 10_000

/** The process's soft open-file limit (RLIMIT_NOFILE), from /proc/self/limits; 1024 when unreadable. */
function openFileLimit(): number {
  try {
    const m = /^Max open files\s+(\d+)/m.exec(readFileSync('/proc/self/limits', 'utf8'))
    if (m) return Number(m[1])
  } catch {
    // not Linux procfs
  }
  return 1024
}

/** Default `maxConnections`: half the open-file limit (the rest for taps, netns, CNI pipes), from 16 to 4096. */
export function defaultMaxConnections(): number {
  return Math.max(16, Math.min(4096, Math.floor(openFileLimit() / 2)))
}
/** How many log entries of natively answered gets may wait for the event loop before they are dropped (counted). */
export const FAST_LOG_CAPACITY = 65_536

/** {@link FDServerOptions} with every default filled in. */
export type ResolvedOptions = Required<
  Pick<FDServerOptions, 'maxDataSize' | 'readTimeoutMs' | 'writeTimeoutMs' | 'socketMode' | 'maxConnections' | 'maxConnectionsPerUid' | 'stopTimeoutMs' | 'spinUs'>
> &
  FDServerOptions

/** Fills in the defaults and checks the options (a bad one is an ERR_INVALID error). */
export function resolveOptions(options: FDServerOptions): ResolvedOptions {
  const maxConnections = options.maxConnections ?? defaultMaxConnections()
  const opts: ResolvedOptions = {
    ...options,
    maxDataSize: options.maxDataSize ?? DEFAULT_MAX_DATA,
    readTimeoutMs: options.readTimeoutMs ?? DEFAULT_READ_TIMEOUT,
    writeTimeoutMs: options.writeTimeoutMs ?? DEFAULT_WRITE_TIMEOUT,
    socketMode: options.socketMode ?? 0o600,
    maxConnections,
    maxConnectionsPerUid: options.maxConnectionsPerUid ?? Math.max(1, Math.floor(maxConnections / 2)),
    stopTimeoutMs: options.stopTimeoutMs ?? DEFAULT_STOP_TIMEOUT,
    spinUs: spinUsOf(options.spinUs),
  }
  for (const name of ['maxConnections', 'maxConnectionsPerUid'] as const) {
    const v = opts[name]
    if (!Number.isInteger(v) || v < 1 || v > 0xffff_ffff) throw new InvalidInputError(`${name} must be an integer from 1 to 4294967295`)
  }
  for (const name of ['readTimeoutMs', 'writeTimeoutMs', 'stopTimeoutMs'] as const) {
    const v = opts[name]
    if (!Number.isInteger(v) || v < 0 || v > 0xffff_ffff) throw new InvalidInputError(`${name} must be an integer number of ms`)
  }
  for (const [name, ids] of [['allowedUids', options.allowedUids], ['allowedGids', options.allowedGids]] as const) {
    if (ids === undefined) continue
    if (!Array.isArray(ids) || !ids.every((id) => Number.isInteger(id) && id >= 0 && id <= 0xffff_ffff)) {
      throw new InvalidInputError(`${name} must be integers from 0 to 4294967295 (uids/gids are u32)`)
    }
  }
  if (opts.readOn !== undefined && opts.readOn !== 'loop' && opts.readOn !== 'runtime') {
    throw new InvalidInputError(`readOn must be 'loop' or 'runtime', not ${String(opts.readOn)}`)
  }
  return opts
}

/** What FDServer's parts share of its state: its listener (null before `serve()`) and whether `stop()` began. */
export interface ServerState {
  listener: UnixListener | null
  stopping: boolean
}
