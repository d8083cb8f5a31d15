/**
 * The server process of bench/fd.ts: an FDServer whose source opens /dev/null fds: key `gN` gets N of them,
 * any other key one. They are closed on release. Prints `ready` once serving; stops cleanly on SIGTERM.
 */
import { closeSync, openSync } from 'node:fs'
import { FDServer, type FDSource } from '../src/index'

const sock = process.argv[2]
if (!sock) throw new Error('usage: fd-server-proc.ts <socket>')

const held = new Map<string, number[]>()
const source: FDSource = {
  stableInfo: true, // the info depends only on the key: gets after the first are answered natively
  getFDs(key) {
    const m = /^g(\d+)$/.exec(key)
    const fds = Array.from({ length: m ? Number(m[1]) : 1 }, () => openSync('/dev/null', 'r'))
    held.set(key, fds)
    return { fds }
  },
  release(key) {
    for (const fd of held.get(key) ?? []) closeSync(fd)
    held.delete(key)
  },
  getInfo(key) {
    return Buffer.from(`{"key":"${key}"}`)
  },
  recover() {},
  retrieveFDs: () => [],
  stop() {
    for (const k of [...held.keys()]) this.release(k)
  },
}

// FD_BENCH_SERVER_SPIN_US: the server's busy wait after an answer (FDServer's spinUs; default its default)
const spin = process.env.FD_BENCH_SERVER_SPIN_US
const server = new FDServer(sock, source, spin === undefined ? {} : { spinUs: Number(spin) })
server.serve().then(
  () => {
    process.stdout.write('ready\n')
    process.on('SIGTERM', () => {
      void server.stop().then(() => process.exit(0))
    })
  },
  (err: unknown) => {
    console.error(err)
    process.exit(1)
  },
)
