/**
 * FDServer: serves add/get/release/recover requests for an {@link FDSource} on a Unix socket, byte-compatible
 * with Virtlet's Go FDServer, without its defects (bounded payloads, read deadlines, no desynchronisation,
 * no leaks on duplicate or concurrent adds, optional peer authorisation by uid/gid).
 */
import { InvalidInputError, TapmanagerError, capText, messageOf } from './errors'
import type { FDSource } from './fdsource'
import { UnixConnection, UnixListener, closeFd, dupFds, type Frame, type IncomingRequest, type PeerCredentials } from './native'
import {
  FDCommand,
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
/** How many log entries of natively answered gets may wait for the event loop before they are dropped (counted). */
export const FAST_LOG_CAPACITY = 65_536

export class FDServer {
  readonly socketPath: string
  private readonly source: FDSource
  private readonly opts: Required<Pick<FDServerOptions, 'maxDataSize' | 'readTimeoutMs' | 'socketMode'>> & FDServerOptions
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

  constructor(socketPath: string, source: FDSource, options: FDServerOptions = {}) {
    this.socketPath = socketPath
    this.source = source
    this.opts = {
      ...options,
      maxDataSize: options.maxDataSize ?? DEFAULT_MAX_DATA,
      readTimeoutMs: options.readTimeoutMs ?? DEFAULT_READ_TIMEOUT,
      socketMode: options.socketMode ?? 0o600,
    }
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
    listener.startIncoming(this.opts.maxDataSize, this.opts.readTimeoutMs, this.opts.allowedUids, this.opts.allowedGids)
    this.acceptLoop = (async () => {
      for (;;) {
        let batch: IncomingRequest[]
        try {
          batch = await listener.nextIncoming(64)
        } catch {
          return // closed
        }
        for (const { conn, frame } of batch) {
          if (this.stopping) conn.close()
          else this.track(this.serveConn(conn, frame))
        }
      }
    })()
  }

  /** Whether `serve()` was called and `stop()` not yet. */
  get listening(): boolean {
    return this.listener !== null && !this.stopping
  }

  /**
   * Stops: closes the listener and removes the socket file, lets requests being handled finish (their clients
   * get their responses), closes the connections, then calls `source.stop()`.
   */
  async stop(): Promise<void> {
    if (this.stopping) return
    this.stopping = true
    const listener = this.listener
    // Closing also empties the native fast path, which answers nothing more.
    if (listener) listener.close(true)
    await this.acceptLoop
    while (this.dispatching.size > 0) await Promise.allSettled([...this.dispatching])
    // Natively answered gets being sent finish; then every fd duplicate the native side held is closed.
    if (listener) await listener.drainFast()
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
    while (this.inflight.size > 0) await Promise.allSettled([...this.inflight])
    await this.source.stop()
  }

  private track(p: Promise<void>): void {
    this.inflight.add(p)
    void p.finally(() => this.inflight.delete(p))
  }

  private allowed(peer: PeerCredentials | undefined): boolean {
    const { allowedUids, allowedGids } = this.opts
    if (!allowedUids && !allowedGids) return true
    if (!peer) return false
    return (allowedUids?.includes(peer.uid) ?? false) || (allowedGids?.includes(peer.gid) ?? false)
  }

  /** Serves the requests of one connection, in order, until EOF, a deadline, a fatal error or stop(). */
  private async serveConn(conn: UnixConnection, first: Frame): Promise<void> {
    this.conns.add(conn)
    let peer: PeerCredentials | undefined
    try {
      peer = conn.peerCred()
    } catch {
      peer = undefined
    }
    const allowed = this.allowed(peer)
    try {
      let frame: Frame | null = first
      while (frame && !this.stopping) {
        // The dispatch (up to the moment the response is handed to the native side) is tracked for stop().
        const turn = this.handle(conn, frame, peer, allowed)
        this.dispatching.add(turn)
        let next: { pending: Promise<Frame> } | null
        try {
          next = await turn
        } finally {
          this.dispatching.delete(turn)
        }
        frame = next ? await next.pending.catch(() => null) : null
      }
    } catch {
      // a write to a vanished client: drop the connection
    } finally {
      this.conns.delete(conn)
      conn.close()
    }
  }

  /**
   * Handles one request frame. Returns the pending "respond, then read the next frame" operation, or null when
   * the connection is to be closed (after an error response, where one is due).
   */
  private async handle(conn: UnixConnection, frame: Frame, peer: PeerCredentials | undefined, allowed: boolean): Promise<{ pending: Promise<Frame> } | null> {
    const hdr = decodeHeader(frame.header)
    if (hdr.magic !== FD_MAGIC) return null // as the Go server: close without a response
    const started = performance.now()
    const key = decodeKey(hdr.key)
    if (!frame.data) {
      // DataSize over the limit: the payload was not read (nor allocated); answer and close.
      const msg = `request data size ${hdr.dataSize} exceeds the limit of ${this.opts.maxDataSize} bytes`
      await this.sendError(conn, msg)
      this.log(key, hdr.command, started, msg, peer)
      return null
    }
    if (!allowed) {
      const who = peer ? `uid ${peer.uid} gid ${peer.gid}` : 'unknown peer'
      const msg = `permission denied: peer ${who} is not allowed`
      await this.sendError(conn, msg)
      this.log(key, hdr.command, started, msg, peer)
      return null
    }
    if (!isUtf8Key(hdr.key)) {
      // Keys are bytes: decoding invalid UTF-8 lossily would merge different keys into one.
      const msg = FD_ERROR_TEXT.keyNotUtf8(hdr.key)
      const body = Buffer.from(msg, 'utf8')
      const head = encodeHeader({ command: ERROR_COMMAND, dataSize: body.length, oobSize: 0, key: ERROR_KEY })
      const pending = conn.respondThenRead(head, body, [], this.opts.maxDataSize, this.opts.readTimeoutMs)
      this.log(key, hdr.command, started, msg, peer)
      return { pending }
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
    // The native side duplicates the fds before this call returns: a release right after cannot close them
    // under the sendmsg.
    let pending: Promise<Frame>
    try {
      pending = conn.respondThenRead(head, body, fds, this.opts.maxDataSize, this.opts.readTimeoutMs)
    } finally {
      for (const fd of owned) closeFd(fd)
    }
    this.log(key, hdr.command, started, failure, peer)
    return { pending }
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
      default:
        throw new RequestError(FD_ERROR_TEXT.badCommand)
    }
  }

  private log(key: string, command: number, started: number, error: string | undefined, peer?: PeerCredentials): void {
    if (!this.opts.onRequest) return
    this.emit({
      key,
      command: commandName(command),
      durationMs: performance.now() - started,
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
        outcome: 'ok',
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

  private async sendError(conn: UnixConnection, message: string): Promise<void> {
    const body = Buffer.from(message, 'utf8')
    const head = encodeHeader({ command: ERROR_COMMAND, dataSize: body.length, oobSize: 0, key: ERROR_KEY })
    await conn.writeThenSend(head, body, [])
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

