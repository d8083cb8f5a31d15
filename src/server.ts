/**
 * FDServer: serves add/get/release/recover requests for an {@link FDSource} on a Unix socket, byte-compatible
 * with Virtlet's Go FDServer, without its defects (bounded payloads, read deadlines, no desynchronisation,
 * no leaks on duplicate or concurrent adds, optional peer authorisation by uid/gid).
 */
import { TapmanagerError, errorCode } from './errors'
import type { FDSource } from './fdsource'
import { UnixConnection, UnixListener, type Frame, type PeerCredentials } from './native'
import {
  Command,
  ERROR_COMMAND,
  ERROR_KEY,
  Errors,
  FD_MAGIC,
  RESPONSE_FLAG,
  commandName,
  decodeHeader,
  decodeKey,
  encodeHeader,
  oobSizeFor,
  type FrameHeader,
} from './protocol'

/** One served request, for structured logs. */
export interface RequestLogEntry {
  /** The trimmed key ('' when the request was refused before it was read). */
  key: string
  /** `add`, `get`, `release`, `recover`, or the hex code of an unknown command. */
  command: string
  /** Time from the end of reading the header to the end of writing the response. */
  durationMs: number
  /** `ok`, or `error` with the message sent to the client. */
  outcome: 'ok' | 'error'
  error?: string
  /** The peer's credentials. */
  peer?: PeerCredentials
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
  /** Called after every request (never throws into the server). */
  onRequest?: (entry: RequestLogEntry) => void
}

/** An error the server reports to the client (its message goes into the error frame). */
class RequestError extends Error {}

interface Entry {
  /** null for a recovered key whose fds have not been retrieved yet. */
  fds: number[] | null
}

const DEFAULT_MAX_DATA = 64 * 1024
const DEFAULT_READ_TIMEOUT = 10_000

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
  /** Get responses being sent, per key. */
  private readonly sending = new Map<string, Set<Promise<void>>>()
  private readonly conns = new Set<UnixConnection>()
  private readonly inflight = new Set<Promise<void>>()
  private acceptLoop: Promise<void> | null = null
  private stopping = false

  constructor(socketPath: string, source: FDSource, options: FDServerOptions = {}) {
    this.socketPath = socketPath
    this.source = source
    this.opts = {
      ...options,
      maxDataSize: options.maxDataSize ?? DEFAULT_MAX_DATA,
      readTimeoutMs: options.readTimeoutMs ?? DEFAULT_READ_TIMEOUT,
      socketMode: options.socketMode ?? 0o600,
    }
  }

  /** Binds the socket and starts serving; resolves once the socket accepts connections. */
  async serve(): Promise<void> {
    if (this.listener) throw new TapmanagerError('ERR_EXISTS', 'already listening')
    if (this.stopping) throw new TapmanagerError('ERR_CLOSED', 'server was stopped')
    this.listener = UnixListener.bind(this.socketPath, { mode: this.opts.socketMode, gid: this.opts.socketGid })
    const listener = this.listener
    this.acceptLoop = (async () => {
      for (;;) {
        let conn: UnixConnection
        try {
          conn = await listener.accept()
        } catch (err) {
          if (this.stopping || errorCode(err) === 'ERR_CLOSED') return
          // A transient accept error (EMFILE...): back off a little and go on.
          await new Promise((r) => setTimeout(r, 5))
          continue
        }
        if (this.stopping) {
          conn.close()
          return
        }
        this.track(this.serveConn(conn))
      }
    })()
  }

  /** Whether `serve()` was called and `stop()` not yet. */
  get listening(): boolean {
    return this.listener !== null && !this.stopping
  }

  /**
   * Stops: closes the listener and removes the socket file, lets requests being handled finish (their clients
   * get their responses), closes idle connections, then calls `source.stop()`.
   */
  async stop(): Promise<void> {
    if (this.stopping) return
    this.stopping = true
    const listener = this.listener
    if (listener) listener.close(true)
    await this.acceptLoop
    // Idle connections wait in readExact for the next header: closing them ends their loops.
    for (const c of this.conns) if (!this.busy.has(c)) c.close()
    while (this.inflight.size > 0) await Promise.allSettled([...this.inflight])
    await this.source.stop()
  }

  private readonly busy = new Set<UnixConnection>()

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

  private async serveConn(conn: UnixConnection): Promise<void> {
    this.conns.add(conn)
    let peer: PeerCredentials | undefined
    try {
      try {
        peer = conn.peerCred()
      } catch {
        peer = undefined
      }
      const allowed = this.allowed(peer)
      for (;;) {
        if (this.stopping) return
        let frame: Frame
        try {
          frame = await conn.readRequestFrame(this.opts.maxDataSize, this.opts.readTimeoutMs)
        } catch {
          return // EOF, timeout or closed: nothing to answer
        }
        const hdr = decodeHeader(frame.header)
        if (hdr.magic !== FD_MAGIC) return // as the Go server: close without a response
        this.busy.add(conn)
        try {
          const started = performance.now()
          const key = decodeKey(hdr.key)
          if (!frame.data) {
            // DataSize over the limit: the payload was not read (nor allocated); answer and close.
            const msg = `request data size ${hdr.dataSize} exceeds the limit of ${this.opts.maxDataSize} bytes`
            await this.sendError(conn, msg)
            this.log(key, hdr.command, started, msg, peer)
            return
          }
          const data = frame.data
          if (!allowed) {
            const who = peer ? `uid ${peer.uid} gid ${peer.gid}` : 'unknown peer'
            const msg = `permission denied: peer ${who} is not allowed`
            await this.sendError(conn, msg)
            this.log(key, hdr.command, started, msg, peer)
            return
          }
          let failure: string | undefined
          try {
            await this.dispatch(conn, hdr, key, data)
          } catch (err) {
            if (!(err instanceof RequestError)) throw err
            failure = err.message
            await this.sendError(conn, failure)
          }
          this.log(key, hdr.command, started, failure, peer)
        } finally {
          this.busy.delete(conn)
        }
      }
    } catch {
      // a write to a vanished client: drop the connection
    } finally {
      this.conns.delete(conn)
      this.busy.delete(conn)
      conn.close()
    }
  }

  private log(key: string, command: number, started: number, error: string | undefined, peer?: PeerCredentials): void {
    const hook = this.opts.onRequest
    if (!hook) return
    try {
      hook({
        key,
        command: commandName(command),
        durationMs: performance.now() - started,
        outcome: error === undefined ? 'ok' : 'error',
        ...(error === undefined ? {} : { error }),
        ...(peer ? { peer } : {}),
      })
    } catch {
      // a logging hook must not break serving
    }
  }

  private async sendError(conn: UnixConnection, message: string): Promise<void> {
    const body = Buffer.from(message, 'utf8')
    const head = encodeHeader({ command: ERROR_COMMAND, dataSize: body.length, oobSize: 0, key: ERROR_KEY })
    await conn.writeThenSend(head, body, [])
  }

  private async dispatch(conn: UnixConnection, hdr: FrameHeader, key: string, data: Buffer): Promise<void> {
    switch (hdr.command) {
      case Command.Add: {
        const out = await this.add(key, data)
        await this.respond(conn, hdr, out, [])
        return
      }
      case Command.Get: {
        const { fds, info } = await this.get(key)
        // A release of this key waits until the fds are sent, so it never closes them under sendmsg.
        const sent = this.respond(conn, hdr, info, fds)
        let set = this.sending.get(key)
        if (!set) this.sending.set(key, (set = new Set()))
        set.add(sent)
        try {
          await sent
        } finally {
          set.delete(sent)
          if (set.size === 0 && this.sending.get(key) === set) this.sending.delete(key)
        }
        return
      }
      case Command.Release:
        await this.release(key)
        await this.respond(conn, hdr, Buffer.alloc(0), [])
        return
      case Command.Recover:
        await this.recover(key, data)
        await this.respond(conn, hdr, Buffer.alloc(0), [])
        return
      default:
        throw new RequestError(Errors.badCommand)
    }
  }

  private async respond(conn: UnixConnection, req: FrameHeader, data: Buffer, fds: number[]): Promise<void> {
    const head = encodeHeader({ command: req.command | RESPONSE_FLAG, dataSize: data.length, oobSize: oobSizeFor(fds.length), key: req.key })
    // With fds but no payload one 0x00 byte carries them (not counted in DataSize).
    const body = fds.length > 0 && data.length === 0 ? Buffer.from([0]) : data
    await conn.writeThenSend(head, body, fds)
  }

  private async add(key: string, data: Buffer): Promise<Buffer> {
    if (this.entries.has(key) || this.pending.has(key)) throw new RequestError(Errors.keyExists(key))
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

  private async get(key: string): Promise<{ fds: number[]; info: Buffer }> {
    const entry = this.entries.get(key)
    if (!entry) throw new RequestError(Errors.badKey(key))
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
    return { fds: entry.fds, info }
  }

  private async release(key: string): Promise<void> {
    if (!this.entries.has(key)) throw new RequestError(Errors.badKey(key))
    const sending = this.sending.get(key)
    if (sending) await Promise.allSettled([...sending])
    const entry = this.entries.get(key)
    if (!entry) throw new RequestError(Errors.badKey(key)) // released meanwhile
    // Forget the key first, so a concurrent get or release sees it gone; put it back if the source fails.
    this.entries.delete(key)
    try {
      await this.source.release(key)
    } catch (err) {
      if (!this.entries.has(key)) this.entries.set(key, entry)
      throw new RequestError(`error releasing fd: ${messageOf(err)}`)
    }
  }

  private async recover(key: string, data: Buffer): Promise<void> {
    if (this.entries.has(key) || this.pending.has(key)) throw new RequestError(Errors.alreadyPresent(key))
    this.pending.add(key)
    try {
      try {
        await this.source.recover(key, data)
      } catch (err) {
        throw new RequestError(`error recovering fds: ${messageOf(err)}`)
      }
      this.entries.set(key, { fds: null })
    } finally {
      this.pending.delete(key)
    }
  }
}

function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err)
}
