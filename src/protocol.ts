/**
 * The FDServer wire format (see PROTOCOL.md): a 77-byte big-endian header, the payload, and for get responses
 * the fds in one SCM_RIGHTS control message. Byte-compatible with Virtlet's `pkg/tapmanager`. Everything that
 * knows the layout lives here; the server and client only call these functions.
 */
import { InvalidInputError } from './errors'
import { cmsgSpace } from './native'
import { KEY_SIZE, goQuote, goTrimSpace, validateKey } from './key'

// The key rules live in key.ts (no addon needed: the command line checks keys with them); exported here as before.
export { KEY_SIZE, goQuote, goTrimSpace, validateKey }

/** The magic number that starts every header. */
export const FD_MAGIC = 0x42424242
/** Header length in bytes. */
export const HEADER_SIZE = 77

/** Request commands; a response carries `command | RESPONSE_FLAG`, an error response `ERROR_COMMAND`. */
export const FDCommand = { Add: 0, Release: 1, Get: 2, Recover: 3 } as const
export type CommandCode = (typeof FDCommand)[keyof typeof FDCommand]
export const RESPONSE_FLAG = 0x80

/**
 * Extension commands: ours only, never sent by Virtlet (whose server answers them `bad command`, so a client
 * can fall back). `list` (0x40): no payload, any key; the response (0xc0) carries JSON
 * `{"keys":[{"key":"k","state":"held"|"recovered"}], ...}` (see `FDServer.listing`).
 */
export const FD_EXT_COMMAND = { list: 0x40 } as const
export const ERROR_COMMAND = 0xff

/** Human names for logs. */
export function commandName(cmd: number): string {
  switch (cmd) {
    case FDCommand.Add:
      return 'add'
    case FDCommand.Release:
      return 'release'
    case FDCommand.Get:
      return 'get'
    case FDCommand.Recover:
      return 'recover'
    case FD_EXT_COMMAND.list:
      return 'list'
    default:
      return `0x${cmd.toString(16).padStart(2, '0')}`
  }
}

/** A decoded header. `key` holds the 64 raw key bytes as sent. */
export interface FrameHeader {
  magic: number
  command: number
  dataSize: number
  oobSize: number
  key: Buffer
}

/** The fields {@link encodeHeader} writes. */
type HeaderFields = { command: number; dataSize: number; oobSize: number; key: Buffer; magic?: number }

/** Encodes a header; `key` must be exactly 64 bytes (see {@link encodeKey}). */
export function encodeHeader(h: HeaderFields): Buffer {
  return writeHeader(Buffer.allocUnsafe(HEADER_SIZE), h)
}

/**
 * A request frame in one Buffer: the header of `command` for `key` (64 bytes, see {@link encodeKey}) with
 * DataSize the payload's length and OobSize 0, then `payload`.
 */
export function encodeRequest(command: number, key: Buffer, payload: Buffer): Buffer {
  const b = writeHeader(Buffer.allocUnsafe(HEADER_SIZE + payload.length), { command, dataSize: payload.length, oobSize: 0, key })
  payload.copy(b, HEADER_SIZE)
  return b
}

/** Writes header `h` at the start of `b` (at least {@link HEADER_SIZE} bytes); returns `b`. */
function writeHeader(b: Buffer, h: HeaderFields): Buffer {
  if (h.key.length !== KEY_SIZE) throw new InvalidInputError(`header key must be ${KEY_SIZE} bytes, got ${h.key.length}`)
  b.writeUInt32BE(h.magic ?? FD_MAGIC, 0)
  b.writeUInt8(h.command, 4)
  b.writeUInt32BE(h.dataSize, 5)
  b.writeUInt32BE(h.oobSize, 9)
  h.key.copy(b, 13)
  return b
}

/** Decodes a 77-byte header (the key is copied). */
export function decodeHeader(b: Buffer): FrameHeader {
  if (b.length !== HEADER_SIZE) throw new InvalidInputError(`header must be ${HEADER_SIZE} bytes, got ${b.length}`)
  return {
    magic: b.readUInt32BE(0),
    command: b.readUInt8(4),
    dataSize: b.readUInt32BE(5),
    oobSize: b.readUInt32BE(9),
    key: Buffer.from(b.subarray(13, 13 + KEY_SIZE)),
  }
}

/** The 64 key bytes of an error response: all NUL. */
export const ERROR_KEY: Buffer = Buffer.alloc(KEY_SIZE, 0)

/** Validates a key and encodes it as 64 bytes, right-padded with spaces. */
export function encodeKey(key: string): Buffer {
  validateKey(key)
  const b = Buffer.alloc(KEY_SIZE, 0x20)
  b.write(key, 0, 'utf8')
  return b
}

/** The key a server sees: the 64 bytes as UTF-8, trimmed like Go's `strings.TrimSpace` (NUL is kept). */
export function decodeKey(raw: Buffer): string {
  return goTrimSpace(raw.toString('utf8'))
}

const STRICT_UTF8 = new TextDecoder('utf-8', { fatal: true })

/**
 * Whether the 64 raw key bytes are valid UTF-8. Keys are bytes on the wire; a server that decoded invalid bytes
 * lossily would give two different keys one name, so it refuses them ({@link FD_ERROR_TEXT.keyNotUtf8}).
 */
export function isUtf8Key(raw: Buffer): boolean {
  try {
    STRICT_UTF8.decode(raw)
    return true
  } catch {
    return false
  }
}

/** Raw key bytes for an error message: trimmed of ASCII whitespace, quoted, printable ASCII as is, other bytes `\xNN`. */
export function quoteKeyBytes(raw: Buffer): string {
  let a = 0
  let b = raw.length
  const space = (c: number) => c === 0x20 || (c >= 0x09 && c <= 0x0d)
  while (a < b && space(raw[a])) a++
  while (b > a && space(raw[b - 1])) b--
  let out = '"'
  for (const c of raw.subarray(a, b)) {
    if (c === 0x22 || c === 0x5c) out += '\\' + String.fromCharCode(c)
    else if (c >= 0x20 && c < 0x7f) out += String.fromCharCode(c)
    else out += `\\x${c.toString(16).padStart(2, '0')}`
  }
  return out + '"'
}

/** OobSize for `n` fds: `CMSG_SPACE(4 * n)` (24 for 1-2 fds, 32 for 3-4 on x86_64/aarch64; 0 for none). */
export function oobSizeFor(n: number): number {
  return n === 0 ? 0 : cmsgSpace(n)
}

/** Error texts, exactly as the Go server and client word them. */
export const FD_ERROR_TEXT = {
  badKey: (key: string) => `bad fd key: ${goQuote(key)}`,
  keyExists: (key: string) => `fd key already exists: ${goQuote(key)}`,
  alreadyPresent: (key: string) => `fd key ${goQuote(key)} is already present and thus can't be properly recovered`,
  recoverFailed: (key: string, msg: string) => `error recovering ${goQuote(key)}: ${msg}`,
  badCommand: 'bad command',
  /** Our server only (Go's decodes any bytes): a key whose 64 bytes are not valid UTF-8. */
  keyNotUtf8: (raw: Buffer) => `fd key is not valid UTF-8: ${quoteKeyBytes(raw)}`,
  keyMismatch: 'fd key mismatch in the server response',
} as const

/** Encodes `data` as the Go client does: a Buffer/Uint8Array is sent as is, anything else as JSON. */
export function encodePayload(data: unknown): Buffer {
  if (Buffer.isBuffer(data)) return data
  if (data instanceof Uint8Array) return Buffer.from(data.buffer, data.byteOffset, data.byteLength)
  const json = JSON.stringify(data === undefined ? null : data)
  return Buffer.from(json, 'utf8')
}
