/**
 * Seeded DHCP packet fuzzing: Ethernet/IPv4/UDP frames to port 67 whose BOOTP/DHCP payload is random or a
 * mutated valid DISCOVER/REQUEST (bytes flipped, truncated, options with lying lengths, overloads, huge or
 * missing fields). IP and UDP headers stay valid (IP checksum computed, UDP checksum 0), so every frame
 * reaches the pod's DHCP server parser. The same seed gives the same frames.
 */
import { writeSync } from 'node:fs'

/** mulberry32: a small seeded PRNG. */
export function prng(seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

function macBytes(mac: string): Buffer {
  return Buffer.from(mac.split(':').map((h) => parseInt(h, 16)))
}

/** A valid DHCP message (DISCOVER when `type` is 1, REQUEST when 3) from `mac`. */
export function dhcpMessage(mac: string, xid: number, type = 1, extra: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(240)
  b[0] = 1 // BOOTREQUEST
  b[1] = 1 // Ethernet
  b[2] = 6
  b.writeUInt32BE(xid >>> 0, 4)
  b.writeUInt16BE(0x8000, 10) // broadcast flag
  macBytes(mac).copy(b, 28)
  b.writeUInt32BE(0x63825363, 236) // magic cookie
  const opts = Buffer.concat([Buffer.from([53, 1, type]), Buffer.from([55, 4, 1, 3, 6, 121]), extra, Buffer.from([255])])
  return Buffer.concat([b, opts])
}

function ipChecksum(h: Buffer): number {
  let sum = 0
  for (let i = 0; i < h.length; i += 2) sum += h.readUInt16BE(i)
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16)
  return ~sum & 0xffff
}

/** The payload in an Ethernet broadcast frame from `mac`, IPv4 0.0.0.0:68 -> 255.255.255.255:67. */
export function udpFrame(mac: string, payload: Buffer): Buffer {
  const eth = Buffer.concat([Buffer.alloc(6, 0xff), macBytes(mac), Buffer.from([0x08, 0x00])])
  const ip = Buffer.alloc(20)
  ip[0] = 0x45
  ip.writeUInt16BE(20 + 8 + payload.length, 2)
  ip[8] = 64
  ip[9] = 17
  ip.writeUInt32BE(0xffffffff, 16)
  ip.writeUInt16BE(ipChecksum(ip), 10)
  const udp = Buffer.alloc(8)
  udp.writeUInt16BE(68, 0)
  udp.writeUInt16BE(67, 2)
  udp.writeUInt16BE(8 + payload.length, 4)
  return Buffer.concat([eth, ip, udp, payload])
}

/** One fuzzed DHCP payload. */
export function fuzzPayload(rand: () => number, mac: string): Buffer {
  const int = (n: number) => Math.floor(rand() * n)
  const bytes = (n: number) => Buffer.from(Array.from({ length: n }, () => int(256)))
  const kind = int(8)
  if (kind === 0) return bytes(int(600)) // pure noise
  // random options, some with lengths running past the end, some overload (52) or pad/end in odd places
  const opts: Buffer[] = []
  for (let i = int(12); i > 0; i--) {
    const code = [0, 1, 3, 6, 12, 50, 51, 52, 53, 54, 55, 57, 61, 81, 119, 121, 255][int(17)] ?? int(256)
    const len = rand() < 0.1 ? 255 : int(40)
    opts.push(Buffer.concat([Buffer.from([code, len]), bytes(rand() < 0.2 ? int(len + 1) : len)]))
  }
  let m = dhcpMessage(rand() < 0.7 ? mac : bytes(6).toString('hex').replace(/(..)(?!$)/g, '$1:'), int(2 ** 32), [1, 3, 4, 7, 8, int(256)][int(6)], Buffer.concat(opts))
  if (kind === 1) m = m.subarray(0, int(m.length)) // truncated anywhere
  if (kind >= 2) {
    m = Buffer.from(m)
    for (let i = int(kind * 3); i > 0; i--) m[int(m.length)] = int(256) // flipped bytes
  }
  if (kind === 3) m = Buffer.concat([m, bytes(int(1200))]) // trailing garbage, up to a jumbo-ish size
  if (kind === 4) m[2] = int(256) // hlen lies
  if (kind === 5) m.writeUInt32BE(int(2 ** 32), 236) // no magic cookie
  return m.length > 1400 ? m.subarray(0, 1400) : m
}

/** Writes `count` fuzzed frames from `seed` into a tap fd (the VM's end); returns how many were written. */
export function runDhcpFuzz(fd: number, opts: { seed: number; count: number; mac: string }): number {
  const rand = prng(opts.seed)
  let written = 0
  for (let i = 0; i < opts.count; i++) {
    try {
      writeSync(fd, udpFrame(opts.mac, fuzzPayload(rand, opts.mac)))
      written++
    } catch (e) {
      // EAGAIN/ENOBUFS under pressure: the frame is lost, as on a real link
      if ((e as NodeJS.ErrnoException).code !== 'EAGAIN' && (e as NodeJS.ErrnoException).code !== 'ENOBUFS') throw e
    }
  }
  return written
}
