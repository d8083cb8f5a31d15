/**
 * tapmanager's errors: one base class with a stable string `code`, a subclass per condition.
 * Errors from the native addon carry the same codes (`ERR_NOT_FOUND`, `ERR_BUSY`, ...) in `err.code`.
 * Callers branch on `code`, never on messages.
 */

/** The base class of every error tapmanager throws. */
export class TapmanagerError extends Error {
  readonly code: string
  constructor(code: string, message: string, options?: { cause?: unknown }) {
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

/** Returns the error's stable code, or `ERR_UNKNOWN` for foreign errors without one. */
export function errorCode(err: unknown): string {
  const code = (err as { code?: unknown } | null)?.code
  return typeof code === 'string' ? code : 'ERR_UNKNOWN'
}

/**
 * The stable code of a server's error text. The wire carries text only (Virtlet's protocol has no codes), so the
 * client maps the texts our server and Virtlet's Go server send back to codes; anything else is `ERR_SERVER`.
 */
export function serverErrorCode(message: string): string {
  for (const [re, code] of SERVER_ERROR_CODES) if (re.test(message)) return code
  return 'ERR_SERVER'
}

/** Server error texts (PROTOCOL.md and our server's own refusals) and their codes; the first match wins. */
const SERVER_ERROR_CODES: ReadonlyArray<readonly [RegExp, string]> = [
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
