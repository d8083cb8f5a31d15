/**
 * fd keys: the one check of a key a caller gives ({@link validateKey}: every TypeScript caller, the client and the
 * command line, uses it), and Go's trimming and quoting the wire rules are written in. No addon here, so the
 * command line can check a key before it loads anything. `protocol.ts` re-exports all of it.
 *
 * Authoritative: this check. The Rust core's client request (`unix/frame.rs` `padded_key`) checks only that a
 * key fits the 64-byte field, for its own Rust callers; the TypeScript client has validated the key before.
 */
import { InvalidInputError } from './errors'

/** Key field length in bytes. */
export const KEY_SIZE = 64

/**
 * Checks that a key can be represented on the wire without being altered by the server's trimming:
 * at most 64 bytes of UTF-8, not empty, no NUL, no leading or trailing whitespace. (Go's client would cut a long
 * key silently; we refuse it.)
 */
export function validateKey(key: string): void {
  if (typeof key !== 'string') throw new InvalidInputError('fd key must be a string')
  const len = Buffer.byteLength(key, 'utf8')
  if (len === 0) throw new InvalidInputError('fd key is empty')
  if (len > KEY_SIZE) throw new InvalidInputError(`fd key ${goQuote(key)} is ${len} bytes long, at most ${KEY_SIZE} fit`)
  if (key.includes('\0')) throw new InvalidInputError(`fd key ${goQuote(key)} contains NUL`)
  if (goTrimSpace(key) !== key) throw new InvalidInputError(`fd key ${goQuote(key)} has leading or trailing whitespace`)
}

// Unicode White_Space, as Go's unicode.IsSpace sees it.
const GO_SPACE = '\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000'
const TRIM_RE = new RegExp(`^[${GO_SPACE}]+|[${GO_SPACE}]+$`, 'gu')

/** Go's `strings.TrimSpace`. */
export function goTrimSpace(s: string): string {
  return s.replace(TRIM_RE, '')
}

/** Go's `%q` of a string (strconv.Quote): printable runes as is, `\a \b \f \n \r \t \v \\ \"`, `\xNN` for other
 * control bytes, `\uNNNN`/`\UNNNNNNNN` for other non-printable runes. U+FFFD (an invalid byte after decoding) is
 * printed as is. */
export function goQuote(s: string): string {
  let out = '"'
  for (const ch of s) {
    const cp = ch.codePointAt(0)!
    switch (ch) {
      case '"':
        out += '\\"'
        continue
      case '\\':
        out += '\\\\'
        continue
      case '\x07':
        out += '\\a'
        continue
      case '\b':
        out += '\\b'
        continue
      case '\f':
        out += '\\f'
        continue
      case '\n':
        out += '\\n'
        continue
      case '\r':
        out += '\\r'
        continue
      case '\t':
        out += '\\t'
        continue
      case '\v':
        out += '\\v'
        continue
    }
    if (cp < 0x20 || cp === 0x7f) out += `\\x${cp.toString(16).padStart(2, '0')}`
    else if (cp === 0x20 || !/[\p{C}\p{Z}]/u.test(ch)) out += ch
    else if (cp < 0x10000) out += `\\u${cp.toString(16).padStart(4, '0')}`
    else out += `\\U${cp.toString(16).padStart(8, '0')}`
  }
  return out + '"'
}
