/**
 * FDServer's keys: what each key holds (its fds, or none yet for a recovered key), the adds and recovers in
 * progress, and the add/get/release/recover steps on the source. Registers a key's get with the native fast
 * path (a `stableInfo` source) and unregisters it on release.
 */
import { messageOf } from '../errors'
import type { FDSource } from '../fdsource'
import { dupFds } from '../native'
import { FD_ERROR_TEXT } from '../protocol'
import type { ServerListing, ServerState } from './options'
import { RequestError } from './request-error'

interface Entry {
  /** null for a recovered key whose fds have not been retrieved yet. */
  fds: number[] | null
  /** Whether the key's get response is registered with the native fast path. */
  fast?: boolean
}

export class KeyRegistry {
  readonly entries = new Map<string, Entry>()
  /** Keys with an add or recover in progress: a second add/recover of one of them is refused at once. */
  readonly pending = new Set<string>()
  /** Keys with a get in progress that retrieves fds of a recovered key. */
  private readonly retrieving = new Map<string, Promise<number[]>>()

  constructor(
    private readonly source: FDSource,
    /**
     * Whether gets are answered natively once a key's fds and info are known: only for a source that declares
     * `stableInfo` (its info never changes for a key).
     */
    private readonly fastGets: boolean,
    private readonly state: ServerState,
  ) {}

  /** The answer to the list request: every key held, plus the owner's `listInfo`. */
  listing(listInfo: (() => Record<string, unknown>) | undefined): ServerListing {
    const keys = [...this.entries].map(([key, e]) => ({ key, state: e.fds === null ? ('recovered' as const) : ('held' as const) }))
    let extra: Record<string, unknown> = {}
    try {
      extra = listInfo?.() ?? {}
    } catch (err) {
      extra = { listInfoError: messageOf(err) }
    }
    return { ...extra, keys }
  }

  async add(key: string, data: Buffer): Promise<Buffer> {
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
      if (this.state.stopping) {
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

  async get(key: string): Promise<{ fds: number[]; data: Buffer; owned: true }> {
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
    if (this.fastGets && !entry.fast && this.state.listener && !this.state.stopping) {
      try {
        this.state.listener.registerGet(key, info, entry.fds)
        entry.fast = true
      } catch {
        // not representable natively (e.g. a key that re-encodes to more than 64 bytes): stays on this path
      }
    }
    return { fds: dupFds(entry.fds), data: info, owned: true }
  }

  async release(key: string): Promise<void> {
    if (!this.entries.has(key)) throw new RequestError(FD_ERROR_TEXT.badKey(key))
    const entry = this.entries.get(key)!
    // Forget the key first, so a concurrent get or release sees it gone; put it back if the source fails.
    // The native fast path forgets it too: gets from now on come here and get "bad fd key" (a native get already
    // being sent uses the native side's own duplicates, so the source may close its fds at once).
    if (entry.fast) {
      this.state.listener?.unregisterGet(key)
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

  async recover(key: string, data: Buffer): Promise<void> {
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
