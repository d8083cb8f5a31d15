/**
 * FDServer: serves add/get/release/recover requests for an {@link FDSource} on a Unix socket, byte-compatible
 * with Virtlet's Go FDServer, without its defects (bounded payloads, read deadlines, no desynchronisation,
 * no leaks on duplicate or concurrent adds, optional peer authorisation by uid/gid).
 */
import { readFileSync } from 'node:fs'
import { InvalidInputError, TapmanagerError, capText, messageOf } from './errors'
import type { FDSource } from './fdsource'
import {
  FrameSink,
  UnixConnection,
  UnixListener,
  closeFd,
  dupFds,
  type Frame,
  type IncomingRequest,
  type NextFrame,
  type PeerCredentials,
  type Written,
} from './native'
import {
  FDCommand,
  FD_EXT_COMMAND,
  ERROR_COMMAND,
  ERROR_KEY,
  FD_ERROR_TEXT,
  FD_MAGIC,
  RESPONSE_FLAG,
  commandName,
  decodeHeader,
  decodeKey,
  encodeHeader,
  isUtf8Key,
  oobSizeFor,
  type FrameHeader,
} from './protocol'

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

/** An error the server reports to the client (its message, cut to {@link MAX_ERROR_TEXT} bytes, goes into the error frame). */
class RequestError extends Error {
  constructor(message: string) {
    super(capText(message, MAX_ERROR_TEXT))
  }
}

interface Entry {
  /** null for a recovered key whose fds have not been retrieved yet. */
  fds: number[] | null
  /** Whether the key's get response is registered with the native fast path. */
  fast?: boolean
}

const DEFAULT_MAX_DATA = 64 * 1024
const DEFAULT_READ_TIMEOUT = 10_000
const DEFAULT_WRITE_TIMEOUT = 10_000
const DEFAULT_STOP_TIMEOUT = 5_000
const DEFAULT_LIMITS_INTERVAL = 10_000

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

export class FDServer {
  readonly socketPath: string
  private readonly source: FDSource
  private readonly opts: Required<
    Pick<FDServerOptions, 'maxDataSize' | 'readTimeoutMs' | 'writeTimeoutMs' | 'socketMode' | 'maxConnections' | 'maxConnectionsPerUid' | 'stopTimeoutMs'>
  > &
    FDServerOptions
  private listener: UnixListener | null = null
  private readonly entries = new Map<string, Entry>()
  /** Keys with an add or recover in progress: a second add/recover of one of them is refused at once. */
  private readonly pending = new Set<string>()
  /** Keys with a get in progress that retrieves fds of a recovered key. */
  private readonly retrieving = new Map<string, Promise<number[]>>()
  private readonly conns = new Set<UnixConnection>()
  /** Connection loops. */
  private readonly inflight = new Set<Promise<void>>()
  /** Requests being dispatched, up to handing the response to the native side. */
  private readonly dispatching = new Set<Promise<unknown>>()
  private acceptLoop: Promise<void> | null = null
  private stopping = false
  /**
   * Whether gets are answered natively once a key's fds and info are known: only for a source that declares
   * `stableInfo` (its info never changes for a key). With an `onRequest` hook the native path reports each get
   * it answered, after the response (see `takeFastLog`).
   */
  private readonly fastGets: boolean
  private droppedLogs = 0
  private limitsTimer: NodeJS.Timeout | null = null
  private lastLimits: LimitCounts = { overTotal: 0, overUid: 0, refused: 0, acceptErrors: 0 }
  private fatal: ((err: Error) => void) | null = null
  /**
   * Resolves with an error if the server stops serving for a reason other than `stop()`; never resolves
   * otherwise. A daemon races it against its stop signal and exits with a failure when it wins.
   */
  readonly failed: Promise<Error>

  constructor(socketPath: string, source: FDSource, options: FDServerOptions = {}) {
    this.socketPath = socketPath
    this.source = source
    const maxConnections = options.maxConnections ?? defaultMaxConnections()
    this.opts = {
      ...options,
      maxDataSize: options.maxDataSize ?? DEFAULT_MAX_DATA,
      readTimeoutMs: options.readTimeoutMs ?? DEFAULT_READ_TIMEOUT,
      writeTimeoutMs: options.writeTimeoutMs ?? DEFAULT_WRITE_TIMEOUT,
      socketMode: options.socketMode ?? 0o600,
      maxConnections,
      maxConnectionsPerUid: options.maxConnectionsPerUid ?? Math.max(1, Math.floor(maxConnections / 2)),
      stopTimeoutMs: options.stopTimeoutMs ?? DEFAULT_STOP_TIMEOUT,
    }
    for (const name of ['maxConnections', 'maxConnectionsPerUid'] as const) {
      const v = this.opts[name]
      if (!Number.isInteger(v) || v < 1 || v > 0xffff_ffff) throw new InvalidInputError(`${name} must be an integer from 1 to 4294967295`)
    }
    for (const name of ['readTimeoutMs', 'writeTimeoutMs', 'stopTimeoutMs'] as const) {
      const v = this.opts[name]
      if (!Number.isInteger(v) || v < 0 || v > 0xffff_ffff) throw new InvalidInputError(`${name} must be an integer number of ms`)
    }
    this.failed = new Promise<Error>((resolve) => (this.fatal = resolve))
    this.fastGets = source.stableInfo === true
    for (const [name, ids] of [['allowedUids', options.allowedUids], ['allowedGids', options.allowedGids]] as const) {
      if (ids === undefined) continue
      if (!Array.isArray(ids) || !ids.every((id) => Number.isInteger(id) && id >= 0 && id <= 0xffff_ffff)) {
        throw new InvalidInputError(`${name} must be integers from 0 to 4294967295 (uids/gids are u32)`)
      }
    }
  }

  /** How many log entries of natively answered gets were lost in all (the native queue was full); 0 without `onRequest`. */
  get droppedLogEntries(): number {
    return this.droppedLogs
  }

  /** Binds the socket and starts serving; resolves once the socket accepts connections. */
  async serve(): Promise<void> {
    if (this.listener) throw new TapmanagerError('ERR_EXISTS', 'already listening')
    if (this.stopping) throw new TapmanagerError('ERR_CLOSED', 'server was stopped')
    const listener = UnixListener.bind(this.socketPath, { mode: this.opts.socketMode, gid: this.opts.socketGid })
    this.listener = listener
    // Gets answered natively are reported to onRequest too (only registered when there is a hook: no cost otherwise).
    if (this.fastGets && this.opts.onRequest) listener.enableFastLog(FAST_LOG_CAPACITY, () => this.takeFastLog(listener))
    // Native side: accepts and reads each connection's first request frame concurrently, each within the deadline.
    // Gets for registered keys (see `get`) are answered there too, for peers that pass the same uid/gid filter.
    // Peers outside the uid/gid filter, connections over the caps and accept() errors are dealt with natively
    // (one filter for the native fast path and this side: refused peers never reach either).
    listener.startIncoming({
      maxData: this.opts.maxDataSize,
      readTimeoutMs: this.opts.readTimeoutMs,
      writeTimeoutMs: this.opts.writeTimeoutMs,
      allowedUids: this.opts.allowedUids,
      allowedGids: this.opts.allowedGids,
      maxConnections: this.opts.maxConnections,
      maxConnectionsPerUid: this.opts.maxConnectionsPerUid,
    })
    if (this.opts.onLimits) {
      this.limitsTimer = setInterval(() => this.reportLimits(listener), this.opts.limitsIntervalMs ?? DEFAULT_LIMITS_INTERVAL)
      this.limitsTimer.unref()
    }
    this.acceptLoop = (async () => {
      for (;;) {
        let batch: IncomingRequest[]
        try {
          batch = await listener.nextIncoming(64)
        } catch (err) {
          // Closed by stop(); anything else ends serving, which its owner must hear about.
          if (!this.stopping) this.fail(new TapmanagerError('ERR_SERVER', `FDServer stopped serving: ${messageOf(err)}`, { cause: err }))
          return
        }
        for (const { conn, frame } of batch) {
          if (this.stopping) conn.close()
          else this.track(this.serveConn(conn, frame))
        }
      }
    })()
  }

  private fail(err: Error): void {
    this.fatal?.(err)
    this.fatal = null
    try {
      this.opts.onFatal?.(err)
    } catch {
      // the owner's hook must not hide the failure
    }
  }

  /** What the listener refused or survived since `serve()` (all zero before). */
  limits(): LimitsReport {
    const st = this.listener?.stats()
    const total: LimitCounts = {
      overTotal: st?.overTotal ?? 0,
      overUid: st?.overUid ?? 0,
      refused: st?.refused ?? 0,
      acceptErrors: st?.acceptErrors ?? 0,
    }
    const interval: LimitCounts = {
      overTotal: total.overTotal - this.lastLimits.overTotal,
      overUid: total.overUid - this.lastLimits.overUid,
      refused: total.refused - this.lastLimits.refused,
      acceptErrors: total.acceptErrors - this.lastLimits.acceptErrors,
    }
    return { interval, total, open: st?.open ?? 0, ...(st?.lastAcceptError ? { lastAcceptError: st.lastAcceptError } : {}) }
  }

  /** Calls `onLimits` when something was refused or failed since the last report. */
  private reportLimits(listener: UnixListener | null): void {
    if (!listener || !this.opts.onLimits) return
    const r = this.limits()
    if (Object.values(r.interval).every((n) => n === 0)) return
    this.lastLimits = r.total
    try {
      this.opts.onLimits(r)
    } catch {
      // a logging hook must not break serving
    }
  }

  /** Whether `serve()` was called and `stop()` not yet. */
  get listening(): boolean {
    return this.listener !== null && !this.stopping
  }

  /**
   * Stops: closes the listener and removes the socket file, lets requests being handled finish (their clients
   * get their responses, each within the write deadline), closes the connections, then calls `source.stop()`.
   * Whatever clients do, connections get at most `stopTimeoutMs` to finish; then what is left is closed.
   */
  async stop(): Promise<void> {
    if (this.stopping) return
    this.stopping = true
    const listener = this.listener
    if (this.limitsTimer) clearInterval(this.limitsTimer)
    this.reportLimits(listener)
    // Closing also empties the native fast path, which answers nothing more.
    if (listener) listener.close(true)
    await this.acceptLoop
    // Source calls in progress finish (they have their own deadlines); responses get until the grace ends.
    while (this.dispatching.size > 0) await Promise.allSettled([...this.dispatching])
    let graceTimer: NodeJS.Timeout | undefined
    const grace = new Promise<'late'>((resolve) => {
      graceTimer = setTimeout(() => resolve('late'), this.opts.stopTimeoutMs)
    })
    try {
      await this.finishConnections(listener, grace)
    } finally {
      clearTimeout(graceTimer)
    }
    await this.source.stop()
  }

  /** The part of stop() bounded by `grace`: when it ends first, every connection left is shut down. */
  private async finishConnections(listener: UnixListener | null, grace: Promise<'late'>): Promise<void> {
    // Natively answered gets being sent finish (each within the write deadline); then every fd duplicate the
    // native side held is closed.
    if (listener && (await Promise.race([listener.drainFast(), grace])) === 'late') return this.closeAll(listener)
    // Every natively answered get is now in the native log queue: report the ones not taken yet.
    if (listener && this.fastGets && this.opts.onRequest) this.takeFastLog(listener)
    // Every response is now on its way: stop reading so that each connection ends after its last write.
    for (const c of this.conns) {
      try {
        c.closeRead()
      } catch {
        // already closed
      }
    }
    const done = (async () => {
      while (this.inflight.size > 0) await Promise.allSettled([...this.inflight])
    })()
    if ((await Promise.race([done, grace])) === 'late') return this.closeAll(listener)
  }

  /** After the grace: shuts every connection down (pending writes and reads fail at once), then waits for their loops. */
  private async closeAll(listener: UnixListener | null): Promise<void> {
    for (const c of this.conns) {
      try {
        c.close()
      } catch {
        // already closed
      }
    }
    while (this.inflight.size > 0) await Promise.allSettled([...this.inflight])
    // Logs of natively answered gets that finished meanwhile.
    if (listener && this.fastGets && this.opts.onRequest) this.takeFastLog(listener)
  }

  private track(p: Promise<void>): void {
    this.inflight.add(p)
    void p.finally(() => this.inflight.delete(p))
  }

  /** Serves the requests of one connection, in order, until EOF, a deadline, a fatal error or stop(). */
  private async serveConn(conn: UnixConnection, first: Frame): Promise<void> {
    this.conns.add(conn)
    // The peer's credentials only go into log entries: asked for (a syscall) only when there is a hook.
    let peer: PeerCredentials | undefined
    if (this.opts.onRequest) {
      try {
        peer = conn.peerCred()
      } catch {
        peer = undefined
      }
    }
    try {
      let frame: Frame | null = first
      while (frame && !this.stopping) {
        // The dispatch (up to the moment the response is handed to the native side) is tracked for stop().
        const turn = this.handle(conn, frame, peer)
        this.dispatching.add(turn)
        let next: { pending: Promise<Frame | null> } | null
        try {
          next = await turn
        } finally {
          this.dispatching.delete(turn)
        }
        frame = next ? await next.pending : null
      }
    } catch {
      // a write to a vanished client: drop the connection
    } finally {
      this.conns.delete(conn)
      conn.close()
    }
  }

  /**
   * Handles one request frame. Returns the pending "respond, log the outcome, then read the next frame"
   * operation (null at its end: the connection is done), or null when the connection is to be closed (after an
   * error response, where one is due). Peers outside the uid/gid filter never get here (refused natively).
   */
  private async handle(conn: UnixConnection, frame: Frame, peer: PeerCredentials | undefined): Promise<{ pending: Promise<Frame | null> } | null> {
    const hdr = decodeHeader(frame.header)
    if (hdr.magic !== FD_MAGIC) return null // as the Go server: close without a response
    const started = performance.now()
    const key = decodeKey(hdr.key)
    if (!frame.data) {
      // DataSize over the limit: the payload was not read (nor allocated); answer and close.
      const msg = `request data size ${hdr.dataSize} exceeds the limit of ${this.opts.maxDataSize} bytes`
      let sent: string | undefined
      await this.sendError(conn, msg).catch((err: unknown) => (sent = messageOf(err)))
      this.log(key, hdr.command, started, sent === undefined ? msg : `${msg} (response not sent: ${sent})`, peer)
      return null
    }
    if (!isUtf8Key(hdr.key)) {
      // Keys are bytes: decoding invalid UTF-8 lossily would merge different keys into one.
      const msg = FD_ERROR_TEXT.keyNotUtf8(hdr.key)
      const body = Buffer.from(msg, 'utf8')
      const head = encodeHeader({ command: ERROR_COMMAND, dataSize: body.length, oobSize: 0, key: ERROR_KEY })
      return { pending: this.respond(conn, head, body, [], [], { key, command: hdr.command, started, failure: msg, peer }) }
    }
    let head: Buffer
    let body: Buffer
    let fds: number[] = []
    let owned: number[] = []
    let failure: string | undefined
    try {
      const r = await this.dispatch(hdr, key, frame.data)
      fds = r.fds
      if (r.owned) owned = r.fds
      head = encodeHeader({ command: hdr.command | RESPONSE_FLAG, dataSize: r.data.length, oobSize: oobSizeFor(fds.length), key: hdr.key })
      // With fds but no payload one 0x00 byte carries them (not counted in DataSize).
      body = fds.length > 0 && r.data.length === 0 ? Buffer.from([0]) : r.data
    } catch (err) {
      if (!(err instanceof RequestError)) throw err
      failure = err.message
      body = Buffer.from(failure, 'utf8')
      head = encodeHeader({ command: ERROR_COMMAND, dataSize: body.length, oobSize: 0, key: ERROR_KEY })
      fds = []
    }
    return { pending: this.respond(conn, head, body, fds, owned, { key, command: hdr.command, started, failure, peer }) }
  }

  /**
   * Hands a response to the native side, which writes it at once when the socket takes it (the usual case: the
   * outcome comes back directly, no trip through the native runtime), else finishes it there within the write
   * deadline (a Promise of the outcome); either way the fds are sent or duplicated before it returns, so a
   * release right after cannot close them under the sendmsg (`owned` are closed here). Returns the pending
   * turn: once the write is done (or failed) the request is logged with its real outcome, then the next frame is
   * read.
   */
  private respond(
    conn: UnixConnection,
    head: Buffer,
    body: Buffer,
    fds: number[],
    owned: number[],
    req: { key: string; command: number; started: number; failure: string | undefined; peer: PeerCredentials | undefined },
  ): Promise<Frame | null> {
    let written: Written | Promise<Written>
    try {
      written = conn.respond(head, body, fds, this.opts.writeTimeoutMs)
    } finally {
      for (const fd of owned) closeFd(fd)
    }
    const after = (w: Written, durationMs: number | undefined): Promise<Frame | null> | null => {
      const failure = w.writeError == null ? req.failure : `${req.failure ?? 'ok'}; response not sent: ${w.writeError}`
      this.log(req.key, req.command, req.started, failure, req.peer, durationMs)
      if (w.writeError != null) return null
      return this.readNext(conn)
    }
    if (!(written instanceof Promise)) return Promise.resolve(after(written, undefined))
    const handed = performance.now()
    return written.then(
      (w) => after(w, handed - req.started + w.writeMs),
      () => null,
    )
  }
  /** Reads of connections' next frames in flight, by token; their outcomes come through one native callback. */
  private readonly reads = new Map<number, (f: Frame | null) => void>()
  private sink: FrameSink | null = null
  private lastToken = 0

  /**
   * The connection's next request frame (after answering natively what the fast path can), or null at EOF, on
   * the read deadline or any read error. Delivered through the server's one `FrameSink` callback (no native
   * Promise per request); the sink keeps the process alive while reads are pending, as a Promise would.
   */
  private readNext(conn: UnixConnection): Promise<Frame | null> {
    const sink = (this.sink ??= new FrameSink((n) => this.onFrame(n)))
    this.lastToken = this.lastToken >= 0xffffffff ? 1 : this.lastToken + 1
    const token = this.lastToken
    return new Promise<Frame | null>((resolve) => {
      this.reads.set(token, resolve)
      if (this.reads.size === 1) sink.hold(true)
      try {
        conn.readNextTo(sink, token, this.opts.maxDataSize, this.opts.readTimeoutMs)
      } catch {
        this.onFrame({ token })
      }
    })
  }

  private onFrame(n: NextFrame): void {
    const resolve = this.reads.get(n.token)
    if (!resolve) return
    this.reads.delete(n.token)
    if (this.reads.size === 0) this.sink?.hold(false)
    resolve(n.frame ?? null)
  }

  private async dispatch(hdr: FrameHeader, key: string, data: Buffer): Promise<{ data: Buffer; fds: number[]; owned?: true }> {
    const none = Buffer.alloc(0)
    switch (hdr.command) {
      case FDCommand.Add:
        return { data: await this.add(key, data), fds: [] }
      case FDCommand.Get:
        return this.get(key)
      case FDCommand.Release:
        await this.release(key)
        return { data: none, fds: [] }
      case FDCommand.Recover:
        await this.recover(key, data)
        return { data: none, fds: [] }
      case FD_EXT_COMMAND.list:
        return { data: Buffer.from(JSON.stringify(this.listing()), 'utf8'), fds: [] }
      default:
        throw new RequestError(FD_ERROR_TEXT.badCommand)
    }
  }

  private log(key: string, command: number, started: number, error: string | undefined, peer?: PeerCredentials, durationMs?: number): void {
    if (!this.opts.onRequest) return
    this.emit({
      key,
      command: commandName(command),
      durationMs: durationMs ?? performance.now() - started,
      outcome: error === undefined ? 'ok' : 'error',
      ...(error === undefined ? {} : { error }),
      ...(peer ? { peer } : {}),
    })
  }

  /** Reports the gets the native fast path answered since the last take (oldest first), one entry each. */
  private takeFastLog(listener: UnixListener): void {
    const { entries, dropped } = listener.takeFastLog()
    this.droppedLogs += dropped
    const last = entries.length - 1
    entries.forEach((e, i) =>
      this.emit({
        key: e.key,
        command: 'get',
        durationMs: e.durationMs,
        outcome: e.error ? 'error' : 'ok',
        ...(e.error ? { error: `response not sent: ${e.error}` } : {}),
        ...(e.peer ? { peer: e.peer } : {}),
        // The dropped entries all came after the queued ones.
        ...(dropped > 0 && i === last ? { dropped } : {}),
      }),
    )
  }


  private emit(entry: RequestLogEntry): void {
    try {
      this.opts.onRequest?.(entry)
    } catch {
      // a logging hook must not break serving
    }
  }

  /** The answer to the list request: every key held, plus the owner's `listInfo`. */
  listing(): ServerListing {
    const keys = [...this.entries].map(([key, e]) => ({ key, state: e.fds === null ? ('recovered' as const) : ('held' as const) }))
    let extra: Record<string, unknown> = {}
    try {
      extra = this.opts.listInfo?.() ?? {}
    } catch (err) {
      extra = { listInfoError: messageOf(err) }
    }
    return { ...extra, keys }
  }

  private async sendError(conn: UnixConnection, message: string): Promise<void> {
    const body = Buffer.from(message, 'utf8')
    const head = encodeHeader({ command: ERROR_COMMAND, dataSize: body.length, oobSize: 0, key: ERROR_KEY })
    await conn.writeThenSend(head, body, [], this.opts.writeTimeoutMs)
  }

  private async add(key: string, data: Buffer): Promise<Buffer> {
    if (this.entries.has(key) || this.pending.has(key)) throw new RequestError(FD_ERROR_TEXT.keyExists(key))
    this.pending.add(key)
    try {
      let res
      try {
        res = await this.source.getFDs(key, data)
      } catch (err) {
        throw new RequestError(`error getting fd: ${messageOf(err)}`)
      }
      const fds = res?.fds
      if (!Array.isArray(fds) || !fds.every((f) => Number.isInteger(f) && f >= 0)) {
        await this.releaseQuietly(key)
        throw new RequestError(`error getting fd: the source returned bad fds for ${JSON.stringify(key)}`)
      }
      if (this.stopping) {
        await this.releaseQuietly(key)
        throw new RequestError('error getting fd: the server is stopping')
      }
      this.entries.set(key, { fds: [...fds] })
      return res.data ? Buffer.from(res.data) : Buffer.alloc(0)
    } finally {
      this.pending.delete(key)
    }
  }

  private async releaseQuietly(key: string): Promise<void> {
    try {
      await this.source.release(key)
    } catch {
      // the original error is what the client needs to see
    }
  }

  private async get(key: string): Promise<{ fds: number[]; data: Buffer; owned: true }> {
    const entry = this.entries.get(key)
    if (!entry) throw new RequestError(FD_ERROR_TEXT.badKey(key))
    if (entry.fds === null) {
      let p = this.retrieving.get(key)
      if (!p) {
        p = Promise.resolve().then(() => this.source.retrieveFDs(key))
        this.retrieving.set(key, p)
        void p.then(
          (fds) => {
            if (this.entries.get(key) === entry) entry.fds = [...fds]
          },
          () => undefined,
        ).finally(() => this.retrieving.delete(key))
      }
      let fds: number[]
      try {
        fds = await p
      } catch (err) {
        throw new RequestError(`error retrieving fds: ${messageOf(err)}`)
      }
      if (!Array.isArray(fds) || !fds.every((f) => Number.isInteger(f) && f >= 0)) {
        throw new RequestError(`error retrieving fds: the source returned bad fds for ${JSON.stringify(key)}`)
      }
      entry.fds = [...fds]
    }
    let info: Buffer
    try {
      info = Buffer.from(await this.source.getInfo(key))
    } catch (err) {
      throw new RequestError(`can't get key info: ${messageOf(err)}`)
    }
    // A release may have run while we waited: check again, and take private duplicates of the fds in this same
    // synchronous step, so a release from now on cannot close them (or let their numbers be reused) before they
    // are sent. The caller closes the duplicates once the native side has its own.
    if (this.entries.get(key) !== entry || entry.fds === null) throw new RequestError(FD_ERROR_TEXT.badKey(key))
    // With a source whose info is stable, later gets of this key are answered natively (same bytes). Registered
    // in this same synchronous step, so a release (which unregisters first) cannot slip in between.
    if (this.fastGets && !entry.fast && this.listener && !this.stopping) {
      try {
        this.listener.registerGet(key, info, entry.fds)
        entry.fast = true
      } catch {
        // not representable natively (e.g. a key that re-encodes to more than 64 bytes): stays on this path
      }
    }
    return { fds: dupFds(entry.fds), data: info, owned: true }
  }

  private async release(key: string): Promise<void> {
    if (!this.entries.has(key)) throw new RequestError(FD_ERROR_TEXT.badKey(key))
    const entry = this.entries.get(key)!
    // Forget the key first, so a concurrent get or release sees it gone; put it back if the source fails.
    // The native fast path forgets it too: gets from now on come here and get "bad fd key" (a native get already
    // being sent uses the native side's own duplicates, so the source may close its fds at once).
    if (entry.fast) {
      this.listener?.unregisterGet(key)
      entry.fast = false
    }
    this.entries.delete(key)
    try {
      await this.source.release(key)
    } catch (err) {
      if (!this.entries.has(key)) this.entries.set(key, entry)
      throw new RequestError(`error releasing fd: ${messageOf(err)}`)
    }
  }

  /**
   * Recovers `key` in-process, exactly as a recover request would (the source's `recover`, then the key is
   * kept without fds until a get retrieves them). A daemon uses it for the keys it persisted, before `serve()`.
   */
  async restore(key: string, data: Buffer): Promise<void> {
    await this.recover(key, data)
  }

  private async recover(key: string, data: Buffer): Promise<void> {
    if (this.entries.has(key) || this.pending.has(key)) throw new RequestError(FD_ERROR_TEXT.alreadyPresent(key))
    this.pending.add(key)
    try {
      try {
        await this.source.recover(key, data)
      } catch (err) {
        throw new RequestError(FD_ERROR_TEXT.recoverFailed(key, messageOf(err)))
      }
      this.entries.set(key, { fds: null })
    } finally {
      this.pending.delete(key)
    }
  }
}

