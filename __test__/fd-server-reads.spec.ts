// Where FDServer accepts connections and reads their requests: on this thread's own event loop (`readOn: 'loop'`,
// the default on Node) or on the addon's native runtime (`readOn: 'runtime'`, what Bun and Deno use). Every test
// runs on both and expects the same bytes and the same ends: pieces, payloads, the size limit, bad magic, the read
// deadline, natively answered gets after JavaScript-served requests, stop() with idle connections, no fd leaked.
// (Caps, the peer filter and accept() failures on both: fd-limits.spec.ts and fd-auth.spec.ts.)
import test from 'ava'
import { mkdtempSync, readSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { FDServer, FDClient, type FDServerOptions } from '../src/index'
import { FrameSink, LOOP_WAITS_POSSIBLE, UnixConnection, closeFd } from '../src/native'
import { encodeHeader, encodeKey, FDCommand } from '../src/protocol'
import { openFdCount, until } from './helpers/env'
import { CountingSource } from './helpers/sources'

async function withServer(t: { teardown: (f: () => Promise<void>) => void }, opts: FDServerOptions) {
  const dir = mkdtempSync(join(tmpdir(), 'tm-reads-'))
  const source = new CountingSource(join(dir, 'content'), 'content', { stableInfo: true, infoForAll: true })
  const sock = join(dir, 'fd.sock')
  const server = new FDServer(sock, source, opts)
  await server.serve()
  let stopped = false
  const stop = async () => {
    if (stopped) return
    stopped = true
    await server.stop()
    rmSync(dir, { recursive: true, force: true })
  }
  t.teardown(stop)
  return { sock, source, server, stop, client: new FDClient(sock) }
}

const header = (command: number, key: string, dataSize = 0, magic = 0x42424242) => {
  const h = encodeHeader({ command, dataSize, oobSize: 0, key: encodeKey(key) })
  h.writeUInt32BE(magic, 0)
  return h
}

function readFd(fd: number): string {
  const buf = Buffer.alloc(64)
  const n = readSync(fd, buf, 0, buf.length, 0)
  closeFd(fd)
  return buf.subarray(0, n).toString()
}

/** The server still serves another client: add, get (1 fd with the file's content), release. */
let probes = 0
async function stillServes(client: FDClient): Promise<boolean> {
  const key = `n1-probe${++probes}`
  await client.addFDs(key, 'probe')
  const { fds } = await client.getFDs(key)
  const ok = fds.length === 1 && readFd(fds[0]) === 'content'
  await client.releaseFDs(key)
  return ok
}

const delay = (ms: number) => new Promise((r) => setTimeout(r, ms))

for (const readOn of ['loop', 'runtime'] as const) {
  test(`${readOn}: later requests in pieces, back to back and with payloads are answered in order`, async (t) => {
    const { sock, client } = await withServer(t, { readOn })
    const c = await UnixConnection.connect(sock)
    try {
      // first request (read by the listener), then an add whose header and payload come in four pieces
      await c.write(header(FDCommand.Add, 'n2', 3))
      await c.write(Buffer.from('abc'))
      let f = await c.readResponseFrame(5000)
      t.is(f.data!.toString(), 'added:abc')
      const add = Buffer.concat([header(FDCommand.Add, 'n3', 5), Buffer.from('hello')])
      for (const [a, b] of [[0, 20], [20, 77], [77, 79], [79, 82]]) {
        await c.write(add.subarray(a, b))
        await delay(20)
      }
      f = await c.readResponseFrame(5000)
      t.is(f.header[4], FDCommand.Add | 0x80)
      t.is(f.data!.toString(), 'added:hello')
      // three requests in one write: a get whose 77-byte payload looks like a header (it is payload), a release
      // with a payload, a get of the released key
      await c.write(Buffer.concat([header(FDCommand.Get, 'n2', 77), header(FDCommand.Release, 'n2'), header(FDCommand.Release, 'n2', 2), Buffer.from('zz'), header(FDCommand.Get, 'n2')]))
      f = await c.readResponseFrame(5000)
      t.is(f.data!.toString(), 'info-n2')
      t.deepEqual(f.fds.map(readFd), ['content', 'content'])
      f = await c.readResponseFrame(5000)
      t.is(f.header[4], FDCommand.Release | 0x80)
      f = await c.readResponseFrame(5000)
      t.is(f.header[4], 0xff)
      t.is(f.data!.toString(), 'bad fd key: "n2"')
      await c.write(header(FDCommand.Release, 'n3'))
      t.is((await c.readResponseFrame(5000)).header[4], FDCommand.Release | 0x80)
    } finally {
      c.close()
    }
    t.true(await stillServes(client))
  })

  test(`${readOn}: a later request over maxDataSize gets the error and is closed; a later bad magic is closed without a response`, async (t) => {
    const { sock, client } = await withServer(t, { readOn, maxDataSize: 1024 })
    const c = await UnixConnection.connect(sock)
    await c.write(header(FDCommand.Add, 'n1'))
    t.is((await c.readResponseFrame(5000)).data!.toString(), 'added:')
    await c.write(header(FDCommand.Add, 'n2', 0xffffffff))
    const f = await c.readResponseFrame(5000)
    t.is(f.header[4], 0xff)
    t.is(f.data!.toString(), 'request data size 4294967295 exceeds the limit of 1024 bytes')
    t.is(((await t.throwsAsync(c.readExact(1, 5000))) as { code?: string }).code, 'ERR_CLOSED')
    c.close()

    const d = await UnixConnection.connect(sock)
    await d.write(header(FDCommand.Release, 'n1'))
    t.is((await d.readResponseFrame(5000)).header[4], FDCommand.Release | 0x80)
    await d.write(header(FDCommand.Get, 'n1', 0, 0x41414141))
    t.is(((await t.throwsAsync(d.readExact(1, 5000))) as { code?: string }).code, 'ERR_CLOSED')
    d.close()
    t.true(await stillServes(client))
  })

  test(`${readOn}: the read deadline holds for later requests: a client stalled mid-header is dropped, others are served`, async (t) => {
    const { sock, server, client } = await withServer(t, { readOn, readTimeoutMs: 300 })
    const c = await UnixConnection.connect(sock)
    await c.write(header(FDCommand.Add, 'n1'))
    t.is((await c.readResponseFrame(5000)).data!.toString(), 'added:')
    await c.write(header(FDCommand.Get, 'n1').subarray(0, 30))
    t.true(await stillServes(client)) // served while the slow client hangs
    const started = Date.now()
    t.is(((await t.throwsAsync(c.readExact(1, 10_000))) as { code?: string }).code, 'ERR_CLOSED')
    t.true(Date.now() - started < 9_000)
    c.close()
    // an idle connection (no bytes after its first answer) is closed at the deadline too
    const idle = await UnixConnection.connect(sock)
    await idle.write(header(FDCommand.Release, 'n1'))
    t.is((await idle.readResponseFrame(5000)).header[4], FDCommand.Release | 0x80)
    t.is(((await t.throwsAsync(idle.readExact(1, 10_000))) as { code?: string }).code, 'ERR_CLOSED')
    idle.close()
    t.true(await until(() => server.openConnections === 0, 5_000))
  })

  test(`${readOn}: gets of a registered key after JavaScript-served requests on one connection are answered natively, byte for byte`, async (t) => {
    const { sock, server, source } = await withServer(t, { readOn })
    const c = await UnixConnection.connect(sock)
    try {
      await c.write(header(FDCommand.Add, 'n2'))
      await c.readResponseFrame(5000)
      await c.write(header(FDCommand.Get, 'n2')) // through JavaScript: registers the key
      const first = await c.readResponseFrame(5000)
      t.true(server.isFastGet('n2'))
      t.is(source.infoCalls, 1)
      for (const h of [header(FDCommand.Get, 'n2'), header(FDCommand.Get, 'nope'), header(FDCommand.Get, 'n2'), header(FDCommand.Get, 'n2')]) {
        await c.write(h)
        const f = await c.readResponseFrame(5000)
        if (h.subarray(13).equals(encodeKey('nope'))) t.is(f.data!.toString(), 'bad fd key: "nope"')
        else {
          t.deepEqual(f.header, first.header)
          t.deepEqual(f.data, first.data)
          t.deepEqual(f.fds.map(readFd), ['content', 'content'])
        }
      }
      first.fds.forEach(closeFd)
      t.is(source.infoCalls, 1, 'the later gets never called back into JavaScript')
      // and JavaScript still gets what follows them
      await c.write(header(FDCommand.Release, 'n2'))
      t.is((await c.readResponseFrame(5000)).header[4], FDCommand.Release | 0x80)
      t.false(server.isFastGet('n2'))
    } finally {
      c.close()
    }
  })

  test.serial(`${readOn}: stop() ends connections that never sent a whole first request, at once; no fd is left open`, async (t) => {
    const before = openFdCount()
    const { sock, stop, client, server } = await withServer(t, { readOn, readTimeoutMs: 600_000 })
    t.true(await stillServes(client))
    const silent = await Promise.all(Array.from({ length: 4 }, () => UnixConnection.connect(sock)))
    const partial = await UnixConnection.connect(sock)
    await partial.write(header(FDCommand.Add, 'n1').subarray(0, 40))
    // all five accepted (natively: open under the caps), none of them handed to the application
    t.true(await until(() => server.limits().open === 5, 5_000), JSON.stringify(server.limits()))
    t.is(server.openConnections, 0, 'none of them reached the application')
    const started = Date.now()
    await stop()
    t.true(Date.now() - started < 5_000, 'stop() did not wait for their 600 s read deadline')
    for (const c of [...silent, partial]) {
      t.is(((await t.throwsAsync(c.readExact(1, 5000))) as { code?: string }).code, 'ERR_CLOSED')
      c.close()
    }
    t.true(await until(() => openFdCount() <= before, 5_000), `fds: ${openFdCount()} now, ${before} before`)
  })

  test.serial(`${readOn}: stop() ends connections waiting for their next request; no fd is left open`, async (t) => {
    const before = openFdCount()
    const { sock, stop, client } = await withServer(t, { readOn, readTimeoutMs: 600_000 })
    t.true(await stillServes(client))
    const conns = await Promise.all(Array.from({ length: 5 }, () => UnixConnection.connect(sock)))
    for (const [i, c] of conns.entries()) await c.write(header(FDCommand.Add, `n${i + 1}`))
    for (const c of conns) t.is((await c.readResponseFrame(5000)).header[4], FDCommand.Add | 0x80)
    // each now waits (idle) for a next request that never comes; stop() must not wait out the 600 s deadline
    const started = Date.now()
    await stop()
    t.true(Date.now() - started < 5_000 + 2_000, 'stop() ended the idle connections')
    for (const c of conns) {
      t.is(((await t.throwsAsync(c.readExact(1, 5000))) as { code?: string }).code, 'ERR_CLOSED')
      c.close()
    }
    t.true(await until(() => openFdCount() <= before, 5_000), `fds: ${openFdCount()} now, ${before} before`)
  })
}

test('readOn is checked; the server reads on the event loop only on Node and only when asked', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'tm-reads-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const err = t.throws(() => new FDServer(join(dir, 'fd.sock'), new CountingSource(join(dir, 'content'), 'content'), { readOn: 'elsewhere' as never }))
  t.is((err as { code?: string }).code, 'ERR_INVALID')
  t.true(LOOP_WAITS_POSSIBLE, 'these tests run on Node')
  t.true(new FrameSink(() => {}, true).readsOnLoop)
  t.false(new FrameSink(() => {}, false).readsOnLoop)
  t.false(new FrameSink(() => {}).readsOnLoop)
})

test.serial('loop: a connection goes back to the listener once its response is written; its next request reaches the application again, its EOF is dealt with natively', async (t) => {
  const { sock, server } = await withServer(t, { readOn: 'loop' })
  const c = await UnixConnection.connect(sock)
  try {
    await c.write(header(FDCommand.Add, 'hb1'))
    t.is((await c.readResponseFrame(5000)).data!.toString(), 'added:')
    t.true(await until(() => server.openConnections === 0, 5_000), 'the application is done with it')
    t.is(server.limits().open, 1, 'the listener holds it, waiting for its next request')
    await c.write(header(FDCommand.Release, 'hb1'))
    t.is((await c.readResponseFrame(5000)).header[4], FDCommand.Release | 0x80)
    t.is(server.limits().open, 1)
  } finally {
    c.close()
  }
  t.true(await until(() => server.limits().open === 0, 5_000), 'closed natively at EOF')
  // A connection that did not come from a listener served on the loop is never handed back (nor closed by it).
  const other = await UnixConnection.connect(sock)
  t.false(other.handBack())
  await other.write(header(FDCommand.Get, 'none'))
  t.is((await other.readResponseFrame(5000)).data!.toString(), 'bad fd key: "none"')
  other.close()
})

test.serial('runtime: connections stay with the application between requests (no hand-back off the loop)', async (t) => {
  const { sock, server } = await withServer(t, { readOn: 'runtime' })
  const c = await UnixConnection.connect(sock)
  try {
    await c.write(header(FDCommand.Add, 'hb2'))
    t.is((await c.readResponseFrame(5000)).data!.toString(), 'added:')
    t.is(server.openConnections, 1, 'the application waits for its next request')
    await c.write(header(FDCommand.Release, 'hb2'))
    t.is((await c.readResponseFrame(5000)).header[4], FDCommand.Release | 0x80)
  } finally {
    c.close()
  }
  t.true(await until(() => server.openConnections === 0 && server.limits().open === 0, 5_000))
})
