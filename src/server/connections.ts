/**
 * FDServer's connections: each connection's requests in order (read, dispatch to the key registry, respond with
 * fds, log the outcome, read the next), and what stop() waits for (connection loops, dispatches in progress).
 */
import { messageOf } from '../errors'
import { FrameSink, LOOP_WAITS_POSSIBLE, UnixConnection, closeFd, frameFrom, type Frame, type PeerCredentials, type Written } from '../native'
import {
  FDCommand,
  FD_EXT_COMMAND,
  ERROR_COMMAND,
  ERROR_KEY,
  FD_ERROR_TEXT,
  FD_MAGIC,
  RESPONSE_FLAG,
  decodeHeader,
  decodeKey,
  encodeHeader,
  isUtf8Key,
  oobSizeFor,
  type FrameHeader,
} from '../protocol'
import type { RequestLog } from './log'
import type { ResolvedOptions, ServerState } from './options'
import type { KeyRegistry } from './registry'
import { RequestError } from './request-error'

/** A response written at once without error (`respond` gives null for it). */
const WRITTEN: Written = { writeError: undefined, writeMs: 0 }

export class Connections {
  readonly conns = new Set<UnixConnection>()
  /** Connection loops. */
  readonly inflight = new Set<Promise<void>>()
  /** Requests being dispatched, up to handing the response to the native side. */
  readonly dispatching = new Set<Promise<unknown>>()

  constructor(
    private readonly opts: ResolvedOptions,
    private readonly state: ServerState,
    private readonly registry: KeyRegistry,
    private readonly requestLog: RequestLog,
  ) {}

  track(p: Promise<void>): void {
    this.inflight.add(p)
    void p.finally(() => this.inflight.delete(p))
  }

  /** Serves the requests of one connection, in order, until EOF, a deadline, a fatal error or stop(). */
  async serveConn(conn: UnixConnection, first: Frame): Promise<void> {
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
      while (frame && !this.state.stopping) {
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
      this.requestLog.log(key, hdr.command, started, sent === undefined ? msg : `${msg} (response not sent: ${sent})`, peer)
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
    let written: null | Written | Promise<Written>
    try {
      written = conn.respond(head, body, fds, this.opts.writeTimeoutMs)
    } finally {
      for (const fd of owned) closeFd(fd)
    }
    const after = (w: Written, durationMs: number | undefined): Promise<Frame | null> | null => {
      const failure = w.writeError == null ? req.failure : `${req.failure ?? 'ok'}; response not sent: ${w.writeError}`
      this.requestLog.log(req.key, req.command, req.started, failure, req.peer, durationMs)
      if (w.writeError != null) return null
      // A connection served on the event loop goes back to its listener, which waits for its next request (a
      // get the fast path answers, or one for `incoming` again) and deals with EOF, the read deadline and stop()
      // natively: nothing more happens here for a client that closes after its response, as Virtlet's does.
      if (!this.state.stopping && conn.handBack()) return null
      return this.readNext(conn)
    }
    if (written === null) return Promise.resolve(after(WRITTEN, undefined))
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
   * Promise per request); read on this thread's event loop (`readOn: 'loop'`, on Node) or on the native runtime,
   * where the sink keeps the process alive while reads are pending, as a Promise would.
   */
  private readNext(conn: UnixConnection): Promise<Frame | null> {
    const sink = (this.sink ??= this.makeSink())
    this.lastToken = this.lastToken >= 0xffffffff ? 1 : this.lastToken + 1
    const token = this.lastToken
    return new Promise<Frame | null>((resolve) => {
      this.reads.set(token, resolve)
      if (this.reads.size === 1) sink.hold(true)
      try {
        conn.readNextTo(sink, token, this.opts.maxDataSize, this.opts.readTimeoutMs)
      } catch {
        this.onFrame(token, -1, undefined)
      }
    })
  }

  /** Where the sink hands frames over (see `FrameSink`). */
  private inbox: Buffer = Buffer.alloc(0)

  private makeSink(): FrameSink {
    const sink = new FrameSink((token, dataLen, own) => this.onFrame(token, dataLen, own), this.opts.readOn !== 'runtime' && LOOP_WAITS_POSSIBLE)
    this.inbox = sink.inbox
    return sink
  }

  /** The outcome of read `token`: a frame (see `FrameSink`), or none (`dataLen` -1: EOF, deadline, error). */
  private onFrame(token: number, dataLen: number, own: Buffer | undefined): void {
    const resolve = this.reads.get(token)
    if (!resolve) return
    this.reads.delete(token)
    if (this.reads.size === 0) this.sink?.hold(false)
    resolve(dataLen === -1 ? null : frameFrom(own ?? this.inbox, dataLen))
  }
  private async dispatch(hdr: FrameHeader, key: string, data: Buffer): Promise<{ data: Buffer; fds: number[]; owned?: true }> {
    const none = Buffer.alloc(0)
    switch (hdr.command) {
      case FDCommand.Add:
        return { data: await this.registry.add(key, data), fds: [] }
      case FDCommand.Get:
        return this.registry.get(key)
      case FDCommand.Release:
        await this.registry.release(key)
        return { data: none, fds: [] }
      case FDCommand.Recover:
        await this.registry.recover(key, data)
        return { data: none, fds: [] }
      case FD_EXT_COMMAND.list:
        return { data: Buffer.from(JSON.stringify(this.registry.listing(this.opts.listInfo)), 'utf8'), fds: [] }
      default:
        throw new RequestError(FD_ERROR_TEXT.badCommand)
    }
  }


  private async sendError(conn: UnixConnection, message: string): Promise<void> {
    const body = Buffer.from(message, 'utf8')
    const head = encodeHeader({ command: ERROR_COMMAND, dataSize: body.length, oobSize: 0, key: ERROR_KEY })
    await conn.writeThenSend(head, body, [], this.opts.writeTimeoutMs)
  }

}
