/**
 * FDClient: talks to an FDServer (ours or Virtlet's Go one) over its Unix socket, one connection per request
 * as the Go client does. Implements {@link FDManager}; `getFDs` returns fds the caller then owns.
 */
import { ProtocolError, ServerError } from './errors'
import type { FDManager } from './fdsource'
import { FdRequestPort, UnixConnection, closeFd, type FdDone, type Frame } from './native'

/** Closes an fd received from `getFDs` (the caller owns those). */
export { closeFd }
import type { ServerListing } from './server'
import {
  FDCommand,
  FD_EXT_COMMAND,
  ERROR_COMMAND,
  FD_ERROR_TEXT,
  FD_MAGIC,
  RESPONSE_FLAG,
  decodeHeader,
  decodeKey,
  encodeHeader,
  encodeKey,
  encodePayload,
} from './protocol'

/** What `getFDs` returns: fds owned by the caller (close them with `closeFd`) and the source's info. */
export interface GetFDsResponse {
  fds: number[]
  info: Buffer
}

interface Response {
  data: Buffer
  fds: number[]
}

/**
 * Requests in flight share one native completion callback (cheaper than a native Promise per request); each
 * waits here under its id. The port keeps the process alive only while something waits.
 */
const waiting = new Map<number, { resolve: (f: Frame) => void; reject: (e: Error) => void }>()
let port: FdRequestPort | null = null
let lastId = 0

function onDone(d: FdDone): void {
  const w = waiting.get(d.id)
  if (!w) return
  waiting.delete(d.id)
  if (waiting.size === 0) port!.hold(false)
  if (d.frame) w.resolve(d.frame)
  else w.reject(Object.assign(new Error(d.message ?? 'request failed'), { code: d.code }))
}

/** One request on a new connection (see the native `fdRequest`), resolved through the shared port. */
function fdRequest(path: string, request: Buffer, timeoutMs: number): Promise<Frame> {
  port ??= new FdRequestPort(onDone)
  const p = port
  lastId = lastId >= 0xffffffff ? 1 : lastId + 1
  const id = lastId
  return new Promise<Frame>((resolve, reject) => {
    waiting.set(id, { resolve, reject })
    if (waiting.size === 1) p.hold(true)
    try {
      p.request(id, path, request, timeoutMs)
    } catch (err) {
      waiting.delete(id)
      if (waiting.size === 0) p.hold(false)
      reject(err as Error)
    }
  })
}

export class FDClient implements FDManager {
  readonly socketPath: string
  /** Bound on one whole request in ms (0: none). */
  readonly timeoutMs: number

  /** `options.timeoutMs` bounds each request (default 30 s; 0 for none). */
  constructor(socketPath: string, options: { timeoutMs?: number } = {}) {
    this.socketPath = socketPath
    this.timeoutMs = options.timeoutMs ?? 30_000
  }

  /** Adds `key`; `data` is a Buffer (sent as is) or a value (sent as JSON). Returns the source's response data. */
  async addFDs(key: string, data: unknown): Promise<Buffer> {
    const r = await this.request(FDCommand.Add, key, encodePayload(data))
    return r.data
  }

  /** Releases `key`. */
  async releaseFDs(key: string): Promise<void> {
    await this.request(FDCommand.Release, key, Buffer.alloc(0))
  }

  /** Recovers `key` after a server restart; `data` is a Buffer or a JSON value. */
  async recover(key: string, data: unknown): Promise<void> {
    await this.request(FDCommand.Recover, key, encodePayload(data))
  }

  /** Gets the fds of `key` (now owned by the caller) and the source's info for them. */
  async getFDs(key: string): Promise<GetFDsResponse> {
    const r = await this.request(FDCommand.Get, key, Buffer.alloc(0))
    return { fds: r.fds, info: r.data }
  }

  /**
   * Asks the server what it holds (our extension command `list`, see `FD_EXT_COMMAND`): the keys and the
   * server's extra fields (a daemon adds the keys it skipped at recovery). A server without it (Virtlet's)
   * answers `bad command`: a {@link ServerError} with code `ERR_UNSUPPORTED`.
   */
  async list(): Promise<ServerListing> {
    const r = await this.request(FD_EXT_COMMAND.list, 'list', Buffer.alloc(0))
    let v: unknown
    try {
      v = JSON.parse(r.data.toString('utf8'))
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

  private async request(command: number, key: string, payload: Buffer): Promise<Response> {
    let head = command === FDCommand.Get ? this.getHeads.get(key) : undefined
    if (!head) {
      const keyBytes = encodeKey(key) // refuses keys that would not survive the trip, before connecting
      head = encodeHeader({ command, dataSize: payload.length, oobSize: 0, key: keyBytes })
      if (command === FDCommand.Get) {
        if (this.getHeads.size >= 256) this.getHeads.clear()
        this.getHeads.set(key, head)
      }
    }
    const keyBytes = head.subarray(13)
    // One native call: connect, write header and payload, read the 77-byte header, then one recvmsg for the
    // payload and the fds (as the Go client does), close.
    const frame = await fdRequest(this.socketPath, payload.length > 0 ? Buffer.concat([head, payload]) : head, this.timeoutMs)
    const received = frame.fds
    try {
      const hdr = decodeHeader(frame.header)
      if (hdr.magic !== FD_MAGIC || !frame.data) throw new ProtocolError('bad magic')
      const data = frame.data
      if (hdr.command === ERROR_COMMAND) throw new ServerError(data.toString('utf8'))
      if (hdr.command !== (command | RESPONSE_FLAG)) {
        throw new ProtocolError(`unexpected command ${hdr.command.toString(16).padStart(2, '0')}`)
      }
      // The server echoes the key bytes it got (a byte comparison settles the usual case without decoding).
      if (!hdr.key.equals(keyBytes) && decodeKey(hdr.key) !== key) throw new ProtocolError(FD_ERROR_TEXT.keyMismatch)
      if (command !== FDCommand.Get && received.length > 0) throw new ProtocolError(`unexpected fds in a ${command} response`)
      if (command === FDCommand.Get && hdr.oobSize > 0 && received.length === 0) {
        throw new ProtocolError('unexpected number of socket control messages: 0 instead of 1')
      }
      return { data, fds: received.splice(0) }
    } finally {
      for (const fd of received) closeFd(fd)
    }
  }
}
