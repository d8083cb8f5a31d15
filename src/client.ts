/**
 * FDClient: talks to an FDServer (ours or Virtlet's Go one) over its Unix socket, one connection per request
 * as the Go client does, or (option `keepAlive`) requests back to back on connections it keeps open. Implements {@link FDManager}; `getFDs` returns fds the caller then owns.
 */
import { spinUsOf } from './defaults'
import { InvalidInputError, ProtocolError, ServerError } from './errors'
import type { FDManager } from './fdsource'
import { FdRequestPort, LOOP_WAITS_POSSIBLE, UnixConnection, closeFd, closeFds } from './native'

/**
 * Close fds received from `getFDs` (the caller owns those): one (`closeFd`), or several in one native call
 * (`closeFds`: every one is closed even when another fails, then the first failure is thrown).
 */
export { closeFd, closeFds }
import type { ServerListing } from './server'
import {
  FDCommand,
  FD_EXT_COMMAND,
  ERROR_COMMAND,
  FD_ERROR_TEXT,
  FD_MAGIC,
  HEADER_SIZE,
  KEY_SIZE,
  RESPONSE_FLAG,
  decodeKey,
  encodeKey,
  encodePayload,
  encodeRequest,
} from './protocol'

/** What `getFDs` returns: fds owned by the caller (close them with `closeFd` or `closeFds`) and the source's info. */
export interface GetFDsResponse {
  fds: number[]
  info: Buffer
}

/** The empty payload of get, release and list requests (never written to). */
const EMPTY = Buffer.alloc(0)
const dataOf = (r: Response): Buffer => r.data
const nothing = (): void => undefined
const getResponseOf = (r: Response): GetFDsResponse => ({ fds: r.fds, info: r.data })

/** A response: its payload and the fds that came with it (owned by the caller). */
interface Response {
  data: Buffer
  fds: number[]
}

/**
 * What a request is checked against when its response arrives: the command sent, the key and its encoded
 * header (whose key bytes the server echoes), and on a keep-alive connection what to do with the connection
 * once the response is read (`wellFormed`: the stream is still in step).
 */
interface Expect {
  command: number
  key: string
  head: Buffer
  /** What the caller's Promise resolves with, made from the checked response (one Promise per request). */
  shape: (r: Response) => unknown
  settled?: (wellFormed: boolean) => void
}

/**
 * Requests in flight share one native completion callback per port (cheaper than a native Promise per
 * request); each waits here under its id. The port hands the response frame over in its inbox (a Buffer
 * shared with native code, see `FdRequestPort`): the frame is checked and copied out right in the callback.
 * A request waits for its response on this thread's event loop (Node: its socket in the thread's epoll set,
 * which libuv watches; one wake-up per batch of responses; also on a keep-alive connection) and keeps the
 * process alive by itself; one waiting on the native runtime (`waitOn: 'runtime'`, Bun, Deno) needs the port's
 * `hold` while it is pending.
 */
interface Waiter extends Expect {
  resolve: (v: unknown) => void
  reject: (e: Error) => void
  /** The port whose `hold` it counts in (waiting on the runtime), else null. */
  heldOn: FdRequestPort | null
}
const waiting = new Map<number, Waiter>()
/** Ports by where their requests on new connections wait: `loop` (the event loop where it can) or `runtime`. */
const ports: { loop: FdRequestPort | null; runtime: FdRequestPort | null } = { loop: null, runtime: null }
/** Requests pending on the runtime, per port. */
const held = new Map<FdRequestPort, number>()
let lastId = 0
function hold(p: FdRequestPort, delta: 1 | -1): void {
  const n = (held.get(p) ?? 0) + delta
  held.set(p, n)
  if (delta === 1 && n === 1) p.hold(true)
  else if (delta === -1 && n === 0) p.hold(false)
}

/**
 * Checks a response frame (header at 0 of `buf`, then `dataLen` payload bytes, then the fds) against what was
 * sent, and copies its payload out. Throws a {@link ProtocolError} or the server's {@link ServerError}; the fds
 * are the caller's to close then.
 */
function checkResponse(w: Expect, buf: Buffer, dataLen: number, fds: number[]): Response {
  if (dataLen < 0 || buf.readUInt32BE(0) !== FD_MAGIC) throw new ProtocolError('bad magic')
  const cmd = buf[4]
  if (cmd === ERROR_COMMAND) throw new ServerError(buf.toString('utf8', HEADER_SIZE, HEADER_SIZE + dataLen))
  if (cmd !== (w.command | RESPONSE_FLAG)) throw new ProtocolError(`unexpected command ${cmd.toString(16).padStart(2, '0')}`)
  // The server echoes the key bytes it got (a byte comparison settles the usual case without decoding).
  if (buf.compare(w.head, 13, 13 + KEY_SIZE, 13, 13 + KEY_SIZE) !== 0 && decodeKey(buf.subarray(13, 13 + KEY_SIZE)) !== w.key) {
    throw new ProtocolError(FD_ERROR_TEXT.keyMismatch)
  }
  if (w.command !== FDCommand.Get && fds.length > 0) throw new ProtocolError(`unexpected fds in a ${w.command} response`)
  if (w.command === FDCommand.Get && fds.length === 0 && buf.readUInt32BE(9) > 0) {
    throw new ProtocolError('unexpected number of socket control messages: 0 instead of 1')
  }
  // a copy (small ones come from Node's pool): the inbox is overwritten by the next frame
  const data = dataLen === 0 ? Buffer.alloc(0) : Buffer.from(buf.subarray(HEADER_SIZE, HEADER_SIZE + dataLen))
  return { data, fds }
}

/** The completion of request `id` from `port` (see `FdRequestPort` for the arguments). */
function onDone(
  inbox: Buffer,
  id: number,
  dataLen: number,
  nfds: number,
  own: Buffer | undefined,
  code: string | undefined,
  message: string | undefined,
  notSent: boolean | undefined,
): void {
  const buf = own ?? inbox
  const fds: number[] = []
  for (let i = 0, at = HEADER_SIZE + Math.max(dataLen, 0); i < nfds; i++, at += 4) fds.push(buf.readInt32LE(at))
  const w = waiting.get(id)
  if (!w) {
    if (fds.length > 0) closeFds(fds)
    return
  }
  waiting.delete(id)
  if (w.heldOn) hold(w.heldOn, -1)
  if (dataLen === -1) {
    w.reject(Object.assign(new Error(message ?? 'request failed'), { code, notSent: notSent ?? false }))
    return
  }
  let r: Response
  try {
    r = checkResponse(w, buf, dataLen, fds)
  } catch (err) {
    if (fds.length > 0) closeFds(fds)
    w.settled?.(dataLen >= 0 && buf.readUInt32BE(0) === FD_MAGIC)
    w.reject(err as Error)
    return
  }
  w.settled?.(true)
  w.resolve(w.shape(r))
}

function portFor(waitOn: 'loop' | 'runtime'): FdRequestPort {
  const make = (onLoop: boolean): FdRequestPort => {
    let inbox: Buffer = Buffer.alloc(0)
    const p = new FdRequestPort((id, dataLen, nfds, own, code, message, notSent) => onDone(inbox, id, dataLen, nfds, own, code, message, notSent), onLoop)
    inbox = p.inbox
    return p
  }
  if (waitOn === 'loop') return (ports.loop ??= make(LOOP_WAITS_POSSIBLE))
  return (ports.runtime ??= make(false))
}

/**
 * One request through a shared port: on a new connection to `path` (see the native `fdRequest`), or on the
 * open connection `conn` (`requestOn`; the error then carries `notSent`). Resolves with the checked response.
 */
function fdRequest(waitOn: 'loop' | 'runtime', path: string, request: Buffer, timeoutMs: number, spinUs: number, expect: Expect, conn?: UnixConnection): Promise<unknown> {
  const p = portFor(waitOn)
  lastId = lastId >= 0xffffffff ? 1 : lastId + 1
  const id = lastId
  return new Promise<unknown>((resolve, reject) => {
    const w: Waiter = { command: expect.command, key: expect.key, head: expect.head, shape: expect.shape, settled: expect.settled, resolve, reject, heldOn: null }
    waiting.set(id, w)
    try {
      if (!(conn ? p.requestOn(id, conn, request, timeoutMs, spinUs) : p.request(id, path, request, timeoutMs, spinUs))) {
        // went to the runtime (the completion may only come once this returned: it is queued to this thread)
        w.heldOn = p
        hold(p, 1)
      }
    } catch (err) {
      waiting.delete(id)
      if (w.heldOn) hold(p, -1)
      w.settled?.(false)
      reject(err as Error)
    }
  })
}

/** Options of {@link FDClient}. */
export interface FDClientOptions {
  /** Bound on one whole request in ms (default 30 s; 0 for none). */
  timeoutMs?: number
  /**
   * Keep connections open and send the next requests on them, back to back (the protocol allows several
   * requests per connection; Virtlet's Go server and ours serve them in order). Default false: a new connection
   * per request, exactly as Virtlet's Go client. Call {@link FDClient.close} when done.
   */
  keepAlive?: boolean
  /** With `keepAlive`: most connections open at once (default 16); more concurrent requests wait for one. */
  maxConnections?: number
  /**
   * With `keepAlive`: a connection idle this long (ms, default 5000) is closed; keep it below the server's
   * wait for the next request (ours: `readTimeoutMs`, 10 s by default).
   */
  idleTimeoutMs?: number
  /**
   * Where a request waits for its response: `loop` (default), on this thread's event loop (its socket in one
   * epoll set the loop watches; one thread wake-up for all the responses that are there), or `runtime`, on the
   * addon's native runtime (two wake-ups per response). Bun and Deno always use `runtime` (they lack libuv's functions).
   * Both with and without `keepAlive`.
   */
  waitOn?: 'loop' | 'runtime'
  /**
   * With `waitOn: 'loop'`: how long after sending a request (µs, 0 to 1000, default 50) the event loop, when
   * it has nothing else to do, busy-waits for the response before it sleeps. A response that comes that soon
   * (a get answered at once, an add of a quick source) then finds this thread awake: on a quiet machine, a
   * virtual machine above all, waking a sleeping thread costs more than the server's whole answer. It costs at
   * most this much CPU per request, none while the loop has other work ready, and delays nothing else (it stops
   * as soon as anything the loop watches is ready); 0 turns it off.
   */
  spinUs?: number
}

/** An open connection of a keep-alive FDClient. */
interface PooledConnection {
  conn: UnixConnection
  /** performance.now() when it went idle. */
  idleSince: number
}

/**
 * The connections of a keep-alive FDClient: idle ones are reused most recently used first, at most `max` are
 * open, and a sweep (a timer that does not keep the process alive) closes those idle longer than `idleMs`.
 */
class ConnectionPool {
  private readonly idle: PooledConnection[] = []
  private readonly queue: Array<(c: PooledConnection | null) => void> = []
  private open = 0
  private sweeper: NodeJS.Timeout | null = null
  private closed = false

  constructor(
    private readonly path: string,
    private readonly max: number,
    private readonly idleMs: number,
  ) {}

  /** An idle connection, a new one, or (when `max` are busy) the next one released. `fresh` when just opened. */
  async acquire(): Promise<{ c: PooledConnection; fresh: boolean }> {
    if (this.closed) throw new ProtocolError('the FDClient is closed')
    const c = this.takeIdle()
    if (c) return { c, fresh: false }
    if (this.open >= this.max) {
      const handed = await new Promise<PooledConnection | null>((resolve) => this.queue.push(resolve))
      if (handed) return { c: handed, fresh: false }
      // null: a connection was dropped, so this waiter may open one (the slot was kept for it)
      return { c: await this.connect(), fresh: true }
    }
    this.open++
    return { c: await this.connect(), fresh: true }
  }

  /** An idle connection (most recently used first) now, or null: none is idle, or the pool is closed. */
  takeIdle(): PooledConnection | null {
    return this.closed ? null : (this.idle.pop() ?? null)
  }

  /** Opens a connection in a slot already counted in `open` (the slot is given back on failure). */
  private async connect(): Promise<PooledConnection> {
    try {
      return { conn: await UnixConnection.connect(this.path), idleSince: 0 }
    } catch (err) {
      this.drop(null)
      throw err
    }
  }

  /** Gives a healthy connection back (to a waiter, else to the idle list). */
  release(c: PooledConnection): void {
    const next = this.queue.shift()
    if (next) return next(c)
    if (this.closed) return this.drop(c)
    c.idleSince = performance.now()
    this.idle.push(c)
    if (!this.sweeper) {
      this.sweeper = setInterval(() => this.sweep(), Math.max(10, this.idleMs / 2))
      this.sweeper.unref()
    }
  }

  /** Closes a connection that failed (or `null`: a slot whose connect failed); a waiter may then open one. */
  drop(c: PooledConnection | null): void {
    if (c) {
      try {
        c.conn.close()
      } catch {
        // already shut down
      }
    }
    const next = this.queue.shift()
    if (next) return next(null) // the slot passes to the waiter
    this.open--
  }

  private sweep(): void {
    const now = performance.now()
    while (this.idle.length > 0 && now - this.idle[0].idleSince >= this.idleMs) this.drop(this.idle.shift()!)
    if (this.idle.length === 0 && this.sweeper) {
      clearInterval(this.sweeper)
      this.sweeper = null
    }
  }

  /** Closes the idle connections now and the busy ones when their request is done; no new requests. */
  close(): void {
    this.closed = true
    for (const c of this.idle.splice(0)) this.drop(c)
    if (this.sweeper) clearInterval(this.sweeper)
    this.sweeper = null
  }
}

export class FDClient implements FDManager {
  readonly socketPath: string
  /** Bound on one whole request in ms (0: none). */
  readonly timeoutMs: number
  /** Whether requests reuse open connections (see {@link FDClientOptions.keepAlive}). */
  readonly keepAlive: boolean
  /** Where requests wait for their responses (see {@link FDClientOptions.waitOn}). */
  readonly waitOn: 'loop' | 'runtime'
  /** The event loop's busy wait per request in µs (see {@link FDClientOptions.spinUs}). */
  readonly spinUs: number
  private readonly pool: ConnectionPool | null

  /** See {@link FDClientOptions}: by default a new connection per request, each bounded by 30 s. */
  constructor(socketPath: string, options: FDClientOptions = {}) {
    this.socketPath = socketPath
    this.timeoutMs = options.timeoutMs ?? 30_000
    this.keepAlive = options.keepAlive ?? false
    this.waitOn = options.waitOn ?? 'loop'
    if (this.waitOn !== 'loop' && this.waitOn !== 'runtime') throw new InvalidInputError(`waitOn must be 'loop' or 'runtime', not ${String(this.waitOn)}`)
    this.spinUs = spinUsOf(options.spinUs)
    const max = options.maxConnections ?? 16
    const idle = options.idleTimeoutMs ?? 5000
    if (!Number.isInteger(max) || max < 1) throw new InvalidInputError(`maxConnections must be a positive integer, not ${max}`)
    if (!(idle > 0)) throw new InvalidInputError(`idleTimeoutMs must be positive, not ${idle}`)
    this.pool = this.keepAlive ? new ConnectionPool(socketPath, max, idle) : null
  }

  /** Closes the connections a keep-alive client keeps (busy ones once their request is done); later requests fail. */
  close(): void {
    this.pool?.close()
  }

  /** Adds `key`; `data` is a Buffer (sent as is) or a value (sent as JSON). Returns the source's response data. */
  addFDs(key: string, data: unknown): Promise<Buffer> {
    return this.request(FDCommand.Add, key, encodePayload(data), dataOf)
  }

  /** Releases `key`. */
  releaseFDs(key: string): Promise<void> {
    return this.request(FDCommand.Release, key, EMPTY, nothing)
  }

  /** Recovers `key` after a server restart; `data` is a Buffer or a JSON value. */
  recover(key: string, data: unknown): Promise<void> {
    return this.request(FDCommand.Recover, key, encodePayload(data), nothing)
  }

  /** Gets the fds of `key` (now owned by the caller) and the source's info for them. */
  getFDs(key: string): Promise<GetFDsResponse> {
    return this.request(FDCommand.Get, key, EMPTY, getResponseOf)
  }

  /**
   * Asks the server what it holds (our extension command `list`, see `FD_EXT_COMMAND`): the keys and the
   * server's extra fields (a daemon adds the keys it skipped at recovery). A server without it (Virtlet's)
   * answers `bad command`: a {@link ServerError} with code `ERR_UNSUPPORTED`.
   */
  async list(): Promise<ServerListing> {
    const data = await this.request(FD_EXT_COMMAND.list, 'list', EMPTY, dataOf)
    let v: unknown
    try {
      v = JSON.parse(data.toString('utf8'))
    } catch {
      throw new ProtocolError('list: the response is not JSON')
    }
    if (typeof v !== 'object' || v === null || !Array.isArray((v as ServerListing).keys)) throw new ProtocolError('list: the response has no keys')
    return v as ServerListing
  }

  /** Whether a server accepts connections on the socket. */
  async isRunning(): Promise<boolean> {
    try {
      const c = await UnixConnection.connect(this.socketPath)
      c.close()
      return true
    } catch {
      return false
    }
  }

  /** Encoded get requests of recent keys (a get is a bare header, the same bytes every time). */
  private readonly getHeads = new Map<string, Buffer>()
  /** The 64 key bytes of recent keys (checked and encoded once). */
  private readonly keyBytes = new Map<string, Buffer>()

  /**
   * Sends one request (header and payload in one Buffer) and resolves with `shape` of its checked response (see
   * `checkResponse`).
   */
  private request<T>(command: number, key: string, payload: Buffer, shape: (r: Response) => T): Promise<T> {
    let bytes = command === FDCommand.Get ? this.getHeads.get(key) : undefined
    if (!bytes) {
      let k = this.keyBytes.get(key)
      if (!k) {
        try {
          k = encodeKey(key) // refuses keys that would not survive the trip, before connecting
        } catch (err) {
          return Promise.reject(err as Error)
        }
        if (this.keyBytes.size >= 256) this.keyBytes.clear()
        this.keyBytes.set(key, k)
      }
      bytes = encodeRequest(command, k, payload)
      if (command === FDCommand.Get) {
        if (this.getHeads.size >= 256) this.getHeads.clear()
        this.getHeads.set(key, bytes)
      }
    }
    // The request's key bytes (13..77) are what the server echoes: `head` is the request itself.
    const expect: Expect = { command, key, head: bytes, shape }
    if (this.pool) return this.pooledRequest(this.pool, bytes, expect) as Promise<T>
    return fdRequest(this.waitOn, this.socketPath, bytes, this.timeoutMs, this.spinUs, expect) as Promise<T>
  }

  /**
   * One request on a pooled connection. A reused connection the server has closed meanwhile (it stops waiting
   * for a next request after a while) fails before the request gets out: it is then sent once more on another
   * connection. Any failure drops the connection (its stream may be out of step). An idle connection is taken
   * at once (no Promise until the request's own).
   */
  private pooledRequest(pool: ConnectionPool, bytes: Buffer, expect: Expect): Promise<unknown> {
    const idle = pool.takeIdle()
    if (idle) return this.requestOnPooled(pool, idle, false, bytes, expect)
    return pool.acquire().then(({ c, fresh }) => this.requestOnPooled(pool, c, fresh, bytes, expect))
  }

  /** `pooledRequest` on connection `c` (`fresh`: just opened, so a failure is not a stale connection's). */
  private requestOnPooled(pool: ConnectionPool, c: PooledConnection, fresh: boolean, bytes: Buffer, expect: Expect): Promise<unknown> {
    // A response that is not a well-formed frame leaves the stream out of step: do not reuse the connection.
    const settled = (wellFormed: boolean): void => (wellFormed ? pool.release(c) : pool.drop(c))
    const on: Expect = { command: expect.command, key: expect.key, head: expect.head, shape: expect.shape, settled }
    return fdRequest(this.waitOn, this.socketPath, bytes, this.timeoutMs, this.spinUs, on, c.conn).catch((err: unknown) => {
      const notSent = (err as { notSent?: boolean }).notSent
      if (notSent === undefined) throw err // a response came: settled above
      pool.drop(c)
      if (!fresh && notSent) return this.pooledRequest(pool, bytes, expect)
      throw err
    })
  }
}
