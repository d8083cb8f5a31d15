/**
 * A seeded, reproducible wire-frame fuzz campaign against an FDServer socket: random bytes, headers with random
 * commands, keys (invalid UTF-8 included) and sizes, truncated frames, oversize DataSize, bad magic, mutated valid
 * frames, and several frames pipelined on one connection. Each connection waits briefly for an answer, then closes.
 * `__test__/wire-fuzz.spec.ts` runs a few thousand frames; the chaos campaign can call it with a large count.
 */
import { UnixConnection, closeFd } from '../../src/native'
// The same seeded PRNG as the DHCP fuzzer (same seed, same campaign).
import { prng } from './dhcpfuzz'

export interface WireFuzzOptions {
  socketPath: string
  /** How many connections (each with one or a few frames). */
  frames: number
  seed: number
  /** Connections at once (default 16). */
  concurrency?: number
  /** Request commands the structured frames use (default add, release, get, recover, list, and unknown ones). */
  commands?: number[]
  /** How long to wait for a response before closing, ms (default 200). */
  answerWaitMs?: number
}

export interface WireFuzzCounts {
  connections: number
  /** Responses read (each a whole frame). */
  responses: number
  /** ... of which error responses (0xff). */
  errorResponses: number
  /** Connections the server closed without a response (bad magic, after an over-limit DataSize, ...). */
  closedByServer: number
  /** Connections with no (further) answer within `answerWaitMs` (e.g. a truncated frame the server still waits for). */
  noAnswer: number
  /** Connections that could not be made (the server refused them: over a cap). */
  connectFailures: number
}


const SAMPLE_PAYLOADS = [
  '{"podNetworkDesc":{"podId":"fz/1","podNs":"ns","podName":"p","DNS":null}}',
  '{"contents":["a","b"]}',
  '{"podNetworkDesc":{"podId":"fz/2"},"csn":{"Result":null,"NsPath":"/nonexistent","Interfaces":[]},"HaveRunningContainers":false}',
  '[[[[[[[[[[]]]]]]]]]]',
  '"\\ud800"',
]

/** Generates the bytes of one fuzz connection (deterministic in `rnd`) and how many frames they hold. */
export function fuzzFrame(rnd: () => number, commands: number[]): { bytes: Buffer; frames: number } {
  const int = (n: number) => Math.floor(rnd() * n)
  const bytes = (n: number) => Buffer.from(Array.from({ length: n }, () => int(256)))
  const key = (): Buffer => {
    switch (int(4)) {
      case 0:
        return bytes(64)
      case 1: {
        const k = Buffer.alloc(64, 0x20)
        Buffer.from(`fz${int(8)}`).copy(k)
        return k
      }
      case 2: {
        const k = Buffer.alloc(64, 0x20)
        bytes(1 + int(6)).copy(k) // short, maybe invalid UTF-8
        return k
      }
      default:
        return Buffer.alloc(64, int(2) ? 0x20 : 0)
    }
  }
  const header = (cmd: number, size: number, magic = 0x42424242) => {
    const h = Buffer.alloc(13)
    h.writeUInt32BE(magic >>> 0, 0)
    h[4] = cmd
    h.writeUInt32BE(size >>> 0, 5)
    h.writeUInt32BE(int(2) ? 0 : int(2 ** 32), 9)
    return Buffer.concat([h, key()])
  }
  const cmd = () => (int(5) === 0 ? int(256) : commands[int(commands.length)])
  const frame = (): Buffer => {
    switch (int(8)) {
      case 0:
        return bytes(int(200))
      case 1: {
        const payload = bytes(int(300))
        return Buffer.concat([header(cmd(), payload.length), payload])
      }
      case 2:
        return header(cmd(), 2 ** 20 + int(2 ** 31)) // over any sane limit
      case 3:
        return header(cmd(), int(100)).subarray(0, int(77)) // truncated
      case 4:
        return Buffer.concat([header(cmd(), 0, int(2 ** 32)), bytes(int(50))]) // bad magic
      case 5: {
        // a valid frame with a few bytes flipped
        const payload = Buffer.from(SAMPLE_PAYLOADS[int(SAMPLE_PAYLOADS.length)])
        const f = Buffer.concat([header(cmd(), payload.length), payload])
        for (let i = int(4); i > 0; i--) f[13 + int(f.length - 13)] = int(256)
        return f
      }
      case 6: {
        // DataSize larger than what follows (the rest never comes)
        const payload = bytes(int(50))
        return Buffer.concat([header(cmd(), payload.length + 1 + int(1000)), payload])
      }
      default: {
        const payload = Buffer.from(SAMPLE_PAYLOADS[int(SAMPLE_PAYLOADS.length)])
        return Buffer.concat([header(cmd(), payload.length), payload])
      }
    }
  }
  const n = int(6) === 0 ? 2 + int(4) : 1
  return { bytes: Buffer.concat(Array.from({ length: n }, frame)), frames: n }
}

/** Runs the campaign; resolves with what happened (it never throws for what the server does). */
export async function runWireFuzz(opts: WireFuzzOptions): Promise<WireFuzzCounts> {
  const rnd = prng(opts.seed)
  const commands = opts.commands ?? [0, 1, 2, 3, 0x40, 4, 0x7f, 0x80, 0xff]
  const wait = opts.answerWaitMs ?? 100
  const counts: WireFuzzCounts = { connections: 0, responses: 0, errorResponses: 0, closedByServer: 0, noAnswer: 0, connectFailures: 0 }
  // Frames are generated in order up front per connection, so the campaign does not depend on timing.
  let next = 0
  const one = async ({ bytes, frames }: { bytes: Buffer; frames: number }) => {
    let c: UnixConnection
    try {
      c = await UnixConnection.connect(opts.socketPath)
    } catch {
      counts.connectFailures++
      return
    }
    counts.connections++
    try {
      await c.write(bytes).catch(() => undefined)
      // At most one response per frame sent; then close (the server keeps an answered connection open).
      for (let i = 0; i < frames; i++) {
        let f
        try {
          f = await c.readResponseFrame(wait)
        } catch (err) {
          if ((err as { code?: string }).code === 'ERR_TIMEOUT') counts.noAnswer++
          else counts.closedByServer++
          break
        }
        counts.responses++
        if (f.header[4] === 0xff) counts.errorResponses++
        for (const fd of f.fds) closeFd(fd)
      }
    } finally {
      c.close()
    }
  }
  const workers = Array.from({ length: opts.concurrency ?? 16 }, async () => {
    while (next < opts.frames) {
      next++
      await one(fuzzFrame(rnd, commands))
    }
  })
  await Promise.all(workers)
  return counts
}
