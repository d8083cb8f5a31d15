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

/** The FDServer answered a request with an error frame; `serverMessage` is its text. */
export class ServerError extends TapmanagerError {
  readonly serverMessage: string
  constructor(serverMessage: string) {
    super('ERR_SERVER', `server returned error: ${serverMessage}`)
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
