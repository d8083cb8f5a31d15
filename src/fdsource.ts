/**
 * The two sides of fd passing, in TypeScript idiom: an {@link FDSource} makes and destroys the fds (and owns
 * them until `release`); an {@link FDManager} is what a caller (e.g. a CRI runtime) uses to drive it remotely.
 * Every source method may return a value or a Promise.
 */

/** What `getFDs` returns: the fds to keep under the key and optional data for the client. */
export interface GetFDsResult {
  fds: number[]
  data?: Buffer
}

type MaybePromise<T> = T | Promise<T>

/**
 * Creates and destroys the file descriptors behind keys. The source owns every fd it returns until
 * `release(key)` (the server sends duplicates to clients and never closes them itself).
 */
export interface FDSource {
  /**
   * Optional promise that `getInfo(key)` always returns the same bytes for a key between the `getFDs` (or
   * `retrieveFDs`) that made its fds and its `release`. A server may then answer later gets of the key from a
   * cache, natively, without calling `getInfo` again (FDServer does so when no `onRequest` hook is set; this is
   * what makes gets fast). TapFDSource's info depends only on the key's ContainerSideNetwork, so it qualifies.
   */
  readonly stableInfo?: boolean
  /** Sets up the fds for `key` from the add request's payload; `data` goes back to the client. */
  getFDs(key: string, data: Buffer): MaybePromise<GetFDsResult>
  /** Destroys (closes) the fds of `key` and everything that goes with them. */
  release(key: string): MaybePromise<void>
  /** The information sent with the fds on a get request. */
  getInfo(key: string): MaybePromise<Buffer>
  /** Re-creates the state of `key` after a restart from the recover request's payload, without fds yet. */
  recover(key: string, data: Buffer): MaybePromise<void>
  /** The fds of a recovered key; called once, on the first get after `recover`. */
  retrieveFDs(key: string): MaybePromise<number[]>
  /** Called when the server stops. */
  stop(): MaybePromise<void>
}

/** The controlling side of an FDServer ("master" in Virtlet); {@link FDClient} implements it. */
export interface FDManager {
  /** Asks the server to create the fds of `key`; `data` is a Buffer (sent as is) or a JSON value. */
  addFDs(key: string, data: unknown): Promise<Buffer>
  /** Asks the server to release the fds of `key`. */
  releaseFDs(key: string): Promise<void>
  /** Asks the server to recover `key` after a restart; `data` is a Buffer or a JSON value. */
  recover(key: string, data: unknown): Promise<void>
}
