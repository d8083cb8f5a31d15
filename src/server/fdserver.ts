/**
 * FDServer: serves add/get/release/recover requests for an {@link FDSource} on a Unix socket, byte-compatible
 * with Virtlet's Go FDServer, without its defects (bounded payloads, read deadlines, no desynchronisation,
 * no leaks on duplicate or concurrent adds, optional peer authorisation by uid/gid).
 *
 * This file holds the server's life (serve, the accept loop, stop); its parts: options.ts (options, defaults,
 * public shapes), connections.ts (the request path of each connection), registry.ts (the keys and their
 * add/get/release/recover on the source), log.ts (the request log, native gets included), limits.ts (what the
 * native listener refused).
 */
import { ClosedError, ExistsError, ServerFailedError, messageOf } from '../errors'
import type { FDSource } from '../fdsource'
import { LOOP_WAITS_POSSIBLE, UnixListener, frameFrom, type IncomingOpts, type IncomingRequest } from '../native'
import { Connections } from './connections'
import { LimitsReporter } from './limits'
import { RequestLog } from './log'
import { DEFAULT_LIMITS_INTERVAL, FAST_LOG_CAPACITY, resolveOptions, type FDServerOptions, type LimitsReport, type ResolvedOptions, type ServerListing, type ServerState } from './options'
import { KeyRegistry } from './registry'

export class FDServer {
  readonly socketPath: string
  private readonly source: FDSource
  private readonly opts: ResolvedOptions
  private readonly state: ServerState = { listener: null, stopping: false }
  private readonly registry: KeyRegistry
  private readonly connections: Connections
  private readonly requestLog: RequestLog
  private readonly limitsReporter: LimitsReporter
  private acceptLoop: Promise<void> | null = null
  /**
   * Whether gets are answered natively once a key's fds and info are known: only for a source that declares
   * `stableInfo` (its info never changes for a key). With an `onRequest` hook the native path reports each get
   * it answered, after the response (see `RequestLog.takeFastLog`).
   */
  private readonly fastGets: boolean
  private limitsTimer: NodeJS.Timeout | null = null
  private fatal: ((err: Error) => void) | null = null
  /**
   * Resolves with an error if the server stops serving for a reason other than `stop()`; never resolves
   * otherwise. A daemon races it against its stop signal and exits with a failure when it wins.
   */
  readonly failed: Promise<Error>

  constructor(socketPath: string, source: FDSource, options: FDServerOptions = {}) {
    this.socketPath = socketPath
    this.source = source
    this.opts = resolveOptions(options)
    this.failed = new Promise<Error>((resolve) => (this.fatal = resolve))
    this.fastGets = source.stableInfo === true
    this.registry = new KeyRegistry(source, this.fastGets, this.state)
    this.requestLog = new RequestLog(this.opts.onRequest)
    this.limitsReporter = new LimitsReporter(this.opts.onLimits)
    this.connections = new Connections(this.opts, this.state, this.registry, this.requestLog)
  }

  /** How many log entries of natively answered gets were lost in all (the native queue was full); 0 without `onRequest`. */
  get droppedLogEntries(): number {
    return this.requestLog.dropped
  }

  /** Binds the socket and starts serving; resolves once the socket accepts connections. */
  async serve(): Promise<void> {
    if (this.state.listener) throw new ExistsError('already listening')
    if (this.state.stopping) throw new ClosedError('server was stopped')
    const listener = UnixListener.bind(this.socketPath, { mode: this.opts.socketMode, gid: this.opts.socketGid })
    this.state.listener = listener
    // Gets answered natively are reported to onRequest too (only registered when there is a hook: no cost otherwise).
    if (this.fastGets && this.opts.onRequest) listener.enableFastLog(FAST_LOG_CAPACITY, () => this.requestLog.takeFastLog(listener))
    // Native side: accepts and reads each connection's first request frame concurrently, each within the deadline.
    // Gets for registered keys (see `get`) are answered there too, for peers that pass the same uid/gid filter.
    // Peers outside the uid/gid filter, connections over the caps and accept() errors are dealt with natively
    // (one filter for the native fast path and this side: refused peers never reach either).
    const incoming: IncomingOpts = {
      maxData: this.opts.maxDataSize,
      readTimeoutMs: this.opts.readTimeoutMs,
      writeTimeoutMs: this.opts.writeTimeoutMs,
      allowedUids: this.opts.allowedUids,
      allowedGids: this.opts.allowedGids,
      maxConnections: this.opts.maxConnections,
      maxConnectionsPerUid: this.opts.maxConnectionsPerUid,
      spinUs: this.opts.spinUs,
    }
    if (this.opts.onLimits) {
      this.limitsTimer = setInterval(() => this.limitsReporter.report(listener), this.opts.limitsIntervalMs ?? DEFAULT_LIMITS_INTERVAL)
      this.limitsTimer.unref()
    }
    // On Node, all of it happens on this thread's own event loop (no runtime thread between a client and the
    // source); elsewhere, or with `readOn: 'runtime'`, on the addon's runtime, collected in batches.
    if (this.opts.readOn !== 'runtime' && LOOP_WAITS_POSSIBLE) {
      let inbox: Buffer | null = null
      inbox = listener.startIncomingOnLoop(incoming, (conn, dataLen, own) => this.incoming({ conn, frame: frameFrom(own ?? inbox!, dataLen) }))
      if (inbox) return
    }
    listener.startIncoming(incoming)
    this.acceptLoop = (async () => {
      for (;;) {
        let batch: IncomingRequest[]
        try {
          batch = await listener.nextIncoming(64)
        } catch (err) {
          // Closed by stop(); anything else ends serving, which its owner must hear about.
          if (!this.state.stopping) this.fail(new ServerFailedError(`FDServer stopped serving: ${messageOf(err)}`, { cause: err }))
          return
        }
        for (const r of batch) this.incoming(r)
      }
    })()
  }

  /** A connection with its first request frame: served until it ends (closed at once once stop() began). */
  private incoming({ conn, frame }: IncomingRequest): void {
    if (this.state.stopping) conn.close()
    else this.connections.track(this.connections.serveConn(conn, frame))
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
    return this.limitsReporter.limits(this.state.listener)
  }

  /** Whether `serve()` was called and `stop()` not yet. */
  get listening(): boolean {
    return this.state.listener !== null && !this.state.stopping
  }

  // Read-only views of the server's state, for its owner and for tests (which wait on them with bounded polls).

  /**
   * Connections whose request the application is handling now. All the server holds open, also those waiting
   * natively for a first or next request (on the event loop a connection goes back to the listener once its
   * response is written), are `limits().open`.
   */
  get openConnections(): number {
    return this.connections.conns.size
  }

  /** Whether an add or recover of `key` is in progress (its source call has not returned yet). */
  isPending(key: string): boolean {
    return this.registry.pending.has(key)
  }

  /** Whether gets of `key` are answered by the native fast path now (false before `serve()`; `stop()` empties the fast path). */
  isFastGet(key: string): boolean {
    return this.state.listener?.hasFastGet(key) ?? false
  }

  /**
   * Stops: closes the listener and removes the socket file, lets requests being handled finish (their clients
   * get their responses, each within the write deadline), closes the connections, then calls `source.stop()`.
   * Whatever clients do, connections get at most `stopTimeoutMs` to finish; then what is left is closed.
   */
  async stop(): Promise<void> {
    if (this.state.stopping) return
    this.state.stopping = true
    const listener = this.state.listener
    if (this.limitsTimer) clearInterval(this.limitsTimer)
    this.limitsReporter.report(listener)
    // Closing also empties the native fast path, which answers nothing more.
    if (listener) listener.close(true)
    await this.acceptLoop
    // Source calls in progress finish (they have their own deadlines); responses get until the grace ends.
    while (this.connections.dispatching.size > 0) await Promise.allSettled([...this.connections.dispatching])
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
    if (listener && this.fastGets && this.opts.onRequest) this.requestLog.takeFastLog(listener)
    // Every response is now on its way: stop reading so that each connection ends after its last write.
    for (const c of this.connections.conns) {
      try {
        c.closeRead()
      } catch {
        // already closed
      }
    }
    const done = (async () => {
      while (this.connections.inflight.size > 0) await Promise.allSettled([...this.connections.inflight])
    })()
    if ((await Promise.race([done, grace])) === 'late') return this.closeAll(listener)
  }

  /** After the grace: shuts every connection down (pending writes and reads fail at once), then waits for their loops. */
  private async closeAll(listener: UnixListener | null): Promise<void> {
    for (const c of this.connections.conns) {
      try {
        c.close()
      } catch {
        // already closed
      }
    }
    while (this.connections.inflight.size > 0) await Promise.allSettled([...this.connections.inflight])
    // Logs of natively answered gets that finished meanwhile.
    if (listener && this.fastGets && this.opts.onRequest) this.requestLog.takeFastLog(listener)
  }


  /** The answer to the list request: every key held, plus the owner's `listInfo`. */
  listing(): ServerListing {
    return this.registry.listing(this.opts.listInfo)
  }

  /**
   * Recovers `key` in-process, exactly as a recover request would (the source's `recover`, then the key is
   * kept without fds until a get retrieves them). A daemon uses it for the keys it persisted, before `serve()`.
   */
  async restore(key: string, data: Buffer): Promise<void> {
    await this.registry.recover(key, data)
  }
}
