/**
 * tapmanager's errors: one base class with a stable string `code`, a subclass per condition.
 * Errors from the native addon carry the same codes (`ERR_NOT_FOUND`, `ERR_BUSY`, ...) in `err.code`.
 * Callers branch on `code`, never on messages.
 */

/**
 * Every code a tapmanager error carries. The first ten are the native core's (`crates/tapmanager-core/src/error.rs`
 * `ErrorCode::as_str`); `ERR_TAPMANAGER_NATIVE` is binding-error.js's (the addon could not be loaded); the rest
 * are the TypeScript layer's. Each has its TapmanagerError subclass (__test__/errors.spec.ts lists them).
 */
export type ErrorCode =
  | 'ERR_NOT_FOUND'
  | 'ERR_EXISTS'
  | 'ERR_BUSY'
  | 'ERR_PERMISSION'
  | 'ERR_INVALID'
  | 'ERR_TIMEOUT'
  | 'ERR_CLOSED'
  | 'ERR_TOO_LARGE'
  | 'ERR_NETLINK'
  | 'ERR_IO'
  | 'ERR_TAPMANAGER_NATIVE'
  | 'ERR_PROTOCOL'
  | 'ERR_SERVER'
  | 'ERR_UNSUPPORTED'
  | 'ERR_NOT_RUNNING'
  | 'ERR_CNI'
  | 'ERR_STATE_CORRUPT'
  | 'ERR_MULTIPLE'
  | 'ERR_READ'
  | 'ERR_USAGE'
  | 'ERR_NEEDS_DUMMY_GATEWAY'
  | 'ERR_SRIOV_NO_IOMMU_GROUP'
  | 'ERR_SRIOV_NO_VFIO'
  | 'ERR_SRIOV_VF_IN_USE'
  | 'ERR_SRIOV_PF_NOT_FOUND'

/** The base class of every error tapmanager throws. */
export class TapmanagerError extends Error {
  readonly code: ErrorCode
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = new.target.name
    this.code = code
  }
}

/** Bad input from a caller or a peer: malformed frame, bad key, bad JSON, unknown field. */
export class InvalidInputError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_INVALID', message, options)
  }
}

/** The thing asked for does not exist. */
export class NotFoundError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_NOT_FOUND', message, options)
  }
}

/** An operation did not finish in time. */
export class TimeoutError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_TIMEOUT', message, options)
  }
}

/** Something that should be unique exists already (a key, a pod id, a link, a netns). */
export class ExistsError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_EXISTS', message, options)
  }
}

/** A resource is busy (EBUSY). */
export class BusyError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_BUSY', message, options)
  }
}

/** Not allowed: EPERM/EACCES, or a peer the server does not serve. */
export class PermissionError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_PERMISSION', message, options)
  }
}

/** The connection, fd or server is closed (or closing). */
export class ClosedError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_CLOSED', message, options)
  }
}

/** Over a size limit (request data, fd count). */
export class TooLargeError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_TOO_LARGE', message, options)
  }
}

/** The kernel refused a netlink request (rtnetlink, nf_tables) for a reason without a more precise code. */
export class NetlinkError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_NETLINK', message, options)
  }
}

/** Any other operating-system error. */
export class IoError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_IO', message, options)
  }
}

/** The native addon could not be loaded (binding-error.js's error, same message). */
export class NativeLoadError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_TAPMANAGER_NATIVE', message, options)
  }
}

/** The peer does not support the request (Virtlet's server and the `list` extension). */
export class UnsupportedError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_UNSUPPORTED', message, options)
  }
}

/** No server listens at the socket. */
export class NotRunningError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_NOT_RUNNING', message, options)
  }
}

/** The FDServer stopped serving by itself (its accept loop failed). */
export class ServerFailedError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_SERVER', message, options)
  }
}

/** A file the caller named could not be read. */
export class ReadError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_READ', message, options)
  }
}

/**
 * A Calico-like pod (default route via 169.254.1.1) was set up without the dummy network's gateway; nothing was
 * changed (TapFDSource then fetches the gateway and sets the pod up again).
 */
export class NeedsDummyGatewayError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_NEEDS_DUMMY_GATEWAY', message, options)
  }
}

/** An SR-IOV VF has no IOMMU group (the node's IOMMU is off: `intel_iommu=on` / `amd_iommu=on`). */
export class SriovNoIommuGroupError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_SRIOV_NO_IOMMU_GROUP', message, options)
  }
}

/** The vfio-pci driver is missing (module not loaded) or its device node did not appear. */
export class SriovNoVfioError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_SRIOV_NO_VFIO', message, options)
  }
}

/** The VF is in use (bound to vfio-pci or held by another pod). */
export class SriovVfInUseError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_SRIOV_VF_IN_USE', message, options)
  }
}

/** The VF's physical function (its netdev) was not found. */
export class SriovPfNotFoundError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_SRIOV_PF_NOT_FOUND', message, options)
  }
}

/** The codes the native addon puts in `err.code`, and the class each becomes (see src/native.ts). */
const NATIVE_ERROR_CLASSES = {
  ERR_NOT_FOUND: NotFoundError,
  ERR_EXISTS: ExistsError,
  ERR_BUSY: BusyError,
  ERR_PERMISSION: PermissionError,
  ERR_INVALID: InvalidInputError,
  ERR_TIMEOUT: TimeoutError,
  ERR_CLOSED: ClosedError,
  ERR_TOO_LARGE: TooLargeError,
  ERR_NETLINK: NetlinkError,
  ERR_IO: IoError,
  ERR_TAPMANAGER_NATIVE: NativeLoadError,
  ERR_NEEDS_DUMMY_GATEWAY: NeedsDummyGatewayError,
  ERR_SRIOV_NO_IOMMU_GROUP: SriovNoIommuGroupError,
  ERR_SRIOV_NO_VFIO: SriovNoVfioError,
  ERR_SRIOV_VF_IN_USE: SriovVfInUseError,
  ERR_SRIOV_PF_NOT_FOUND: SriovPfNotFoundError,
} as const satisfies Partial<Record<ErrorCode, new (message: string, options?: { cause?: unknown }) => TapmanagerError>>

/**
 * A native error (a plain `Error` whose `code` is one of the core's codes) as its {@link TapmanagerError} subclass:
 * same message and code, the original as `cause`, its stack kept. Anything else (a TapmanagerError already, a
 * napi status such as `InvalidArg`, a foreign error) is returned as it is.
 */
export function fromNativeError(err: unknown): unknown {
  if (err instanceof TapmanagerError || !(err instanceof Error)) return err
  const code = (err as { code?: unknown }).code
  if (typeof code !== 'string' || !Object.hasOwn(NATIVE_ERROR_CLASSES, code)) return err
  const wrapped = new NATIVE_ERROR_CLASSES[code as keyof typeof NATIVE_ERROR_CLASSES](err.message, { cause: err })
  if (err.stack) wrapped.stack = err.stack.replace(/^Error\b/, wrapped.name)
  return wrapped
}

/** Returns the error's stable code, or `ERR_UNKNOWN` for foreign errors without one. */
export function errorCode(err: unknown): string {
  const code = (err as { code?: unknown } | null)?.code
  return typeof code === 'string' ? code : 'ERR_UNKNOWN'
}

/**
 * The stable code of a server's error text. The wire carries text only (Virtlet's protocol has no codes), so the
 * client maps the texts our server and Virtlet's Go server send back to codes; anything else is `ERR_SERVER`.
 */
export function serverErrorCode(message: string): ErrorCode {
  for (const [re, code] of SERVER_ERROR_CODES) if (re.test(message)) return code
  return 'ERR_SERVER'
}

/** Server error texts (PROTOCOL.md and our server's own refusals) and their codes; the first match wins. */
const SERVER_ERROR_CODES: ReadonlyArray<readonly [RegExp, ErrorCode]> = [
  [/^bad fd key: /, 'ERR_NOT_FOUND'],
  [/^fd key already exists: /, 'ERR_EXISTS'],
  [/^fd key ".*" is already present and thus can't be properly recovered$/s, 'ERR_EXISTS'],
  [/^bad command$/, 'ERR_UNSUPPORTED'],
  [/^request data size \d+ exceeds the limit of \d+ bytes$/, 'ERR_TOO_LARGE'],
  [/^permission denied: /, 'ERR_PERMISSION'],
  [/^fd key is not valid UTF-8: /, 'ERR_INVALID'],
  [/^error getting fd: the server is stopping$/, 'ERR_CLOSED'],
  [/(timed out after \d+ ms|not done within \d+ ms)/, 'ERR_TIMEOUT'],
  [/(: bad JSON: |too deeply nested|: unknown key |: expected an object)/, 'ERR_INVALID'],
]

/**
 * The FDServer answered a request with an error frame; `serverMessage` is its text and `code` the stable code
 * its text maps to ({@link serverErrorCode}: `ERR_NOT_FOUND` for `bad fd key`, `ERR_EXISTS`, `ERR_TOO_LARGE`,
 * ..., `ERR_SERVER` for a text without a known code).
 */
export class ServerError extends TapmanagerError {
  readonly serverMessage: string
  constructor(serverMessage: string) {
    super(serverErrorCode(serverMessage), `server returned error: ${serverMessage}`)
    this.serverMessage = serverMessage
  }
}

/** A peer broke the wire protocol (bad magic, unexpected command, key mismatch, short data). */
export class ProtocolError extends TapmanagerError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_PROTOCOL', message, options)
  }
}

/** The message of an error, or the value as a string for anything thrown that is not an Error. */
export function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err)
}

/** `s` cut to at most `limit` bytes of UTF-8 (on a character boundary), with `...` appended when cut. */
export function capText(s: string, limit: number): string {
  if (s.length <= limit / 3 || Buffer.byteLength(s, 'utf8') <= limit) return s
  let out = ''
  let bytes = 0
  for (const ch of s) {
    const n = Buffer.byteLength(ch, 'utf8')
    if (bytes + n > limit) break
    out += ch
    bytes += n
  }
  return out + '...'
}
