// Authorisation by SO_PEERCRED: a client process running as uid/gid 65534 (node's child_process uid/gid options)
// is refused with an error response and nothing happens; root is served. Needs root.
import test from 'ava'
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { FDServer, FDClient, type FDSource, type RequestLogEntry } from '../src/index'
import { requirePrereqs } from './helpers/env'
import { addAsNobody } from './helpers/nobody'

class NullSource implements FDSource {
  calls: string[] = []
  getFDs(key: string) {
    this.calls.push(`add ${key}`)
    return { fds: [] }
  }
  release(key: string) {
    this.calls.push(`release ${key}`)
  }
  getInfo() {
    return Buffer.alloc(0)
  }
  recover() {}
  retrieveFDs() {
    return []
  }
  stop() {}
}

for (const readOn of ['loop', 'runtime'] as const) {
  test(`${readOn}: peers outside allowedUids/allowedGids get an error and nothing happens; allowed peers are served`, async (t) => {
    requirePrereqs()
    const dir = mkdtempSync(join(tmpdir(), `tm-auth-${readOn}-`))
    chmodSync(dir, 0o755)
    const sock = join(dir, 'fd.sock')
    const source = new NullSource()
    const log: RequestLogEntry[] = []
    // mode 0666 so that only the uid/gid check stands between the other user and the server
    const server = new FDServer(sock, source, { readOn, allowedUids: [0], socketMode: 0o666, onRequest: (e) => log.push(e) })
    await server.serve()
    try {
      const out = await addAsNobody(sock, 'from-nobody')
      t.is(out, 'ERR server returned error: permission denied: peer uid 65534 gid 65534 is not allowed')
      t.deepEqual(source.calls, [])
      // Refused natively (one filter for the native fast path and the TypeScript side): counted, not logged per
      // request; the count goes to onLimits once per interval.
      t.deepEqual(log, [])
      t.is(server.limits().total.refused, 1)
      await new FDClient(sock).addFDs('from-root', {})
      t.deepEqual(source.calls, ['add from-root'])
    } finally {
      await server.stop()
    }
    // allowedGids admits the other user by group
    const server2 = new FDServer(sock, source, { readOn, allowedUids: [0], allowedGids: [65534], socketMode: 0o666 })
    await server2.serve()
    try {
      t.is(await addAsNobody(sock, 'by-gid'), 'OK')
      t.deepEqual(source.calls, ['add from-root', 'add by-gid'])
    } finally {
      await server2.stop()
      rmSync(dir, { recursive: true, force: true })
    }
  })
}

test('the socket file gets mode 0600 by default, so other users cannot even connect', async (t) => {
  requirePrereqs()
  const dir = mkdtempSync(join(tmpdir(), 'tm-auth-'))
  chmodSync(dir, 0o755)
  const sock = join(dir, 'fd.sock')
  writeFileSync(join(dir, 'marker'), '')
  const server = new FDServer(sock, new NullSource())
  await server.serve()
  try {
    const { statSync } = await import('node:fs')
    t.is(statSync(sock).mode & 0o777, 0o600)
    t.regex(await addAsNobody(sock, 'x'), /^ERR connect .*Permission denied/)
  } finally {
    await server.stop()
    rmSync(dir, { recursive: true, force: true })
  }
})
