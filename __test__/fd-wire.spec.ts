// Byte-level tests against FDServer with a raw client written here (the native connection for recvmsg, our own
// header bytes), and every bad input, each followed by a check that the server still serves another client.
import test from 'ava'
import { mkdtempSync, readSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { FDServer, FDClient } from '../src/index'
import { CountingSource } from './helpers/sources'
import { UnixConnection, closeFd } from '../src/native'

const MAGIC = Buffer.from([0x42, 0x42, 0x42, 0x42])

/** A request header built by hand: magic, command, DataSize, OobSize, key padded with spaces. */
function rawHeader(cmd: number, key: string | Buffer, dataSize = 0, oobSize = 0, magic = MAGIC): Buffer {
  const k = Buffer.isBuffer(key) ? key : Buffer.concat([Buffer.from(key), Buffer.alloc(64 - Buffer.byteLength(key), 0x20)])
  const b = Buffer.alloc(13)
  magic.copy(b, 0)
  b[4] = cmd
  b.writeUInt32BE(dataSize, 5)
  b.writeUInt32BE(oobSize, 9)
  return Buffer.concat([b, k])
}

async function withServer(t: { teardown: (f: () => Promise<void>) => void }, opts = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'tm-wire-'))
  const source = new CountingSource(join(dir, 'content'), 'payload-file')
  const sock = join(dir, 'fd.sock')
  const server = new FDServer(sock, source, opts)
  await server.serve()
  t.teardown(async () => {
    await server.stop()
    rmSync(dir, { recursive: true, force: true })
  })
  return { sock, source, server, client: new FDClient(sock) }
}

/** The server still answers another client correctly. */
async function stillServes(client: FDClient, key = 'n1'): Promise<boolean> {
  const k = `${key}`
  await client.addFDs(k, 'probe').catch(() => undefined)
  const { fds } = await client.getFDs(k)
  for (const fd of fds) closeFd(fd)
  await client.releaseFDs(k)
  return fds.length === Number(k.slice(1))
}

test('response header layout, echoed key, dummy byte and OobSize for 1..4 fds, several requests on one connection', async (t) => {
  const { sock } = await withServer(t)
  const conn = await UnixConnection.connect(sock)
  const expectedOob = [0, 24, 24, 32, 32]
  for (let n = 1; n <= 4; n++) {
    const key = `n${n}`
    // add, in two writes like the Go client (header, then payload)
    await conn.write(rawHeader(0, key, 4))
    await conn.write(Buffer.from('data'))
    const addResp = await conn.readExact(77)
    t.deepEqual(addResp.subarray(0, 4), MAGIC)
    t.is(addResp[4], 0x80)
    t.is(addResp.readUInt32BE(5), 'added:data'.length)
    t.is(addResp.readUInt32BE(9), 0)
    t.deepEqual(addResp.subarray(13), rawHeader(0, key).subarray(13)) // key echoed with its padding
    t.is((await conn.readExact(10)).toString(), 'added:data')

    await conn.write(rawHeader(2, key))
    const getResp = await conn.readExact(77)
    t.is(getResp[4], 0x82)
    t.is(getResp.readUInt32BE(5), 0)
    t.is(getResp.readUInt32BE(9), expectedOob[n])
    const r = await conn.recvWithFds(1, getResp.readUInt32BE(9))
    t.deepEqual([...r.data], [0]) // the dummy byte
    t.is(r.fds.length, n)
    for (const fd of r.fds) {
      const buf = Buffer.alloc(64)
      t.is(buf.subarray(0, readSync(fd, buf, 0, 64, 0)).toString(), 'payload-file')
      closeFd(fd)
    }
  }
  // get with info: payload and fds in one message, no dummy byte
  await conn.write(Buffer.concat([rawHeader(0, 'i2', 1), Buffer.from('x')]))
  t.is((await conn.readExact(77))[4], 0x80)
  await conn.readExact('added:x'.length)
  await conn.write(rawHeader(2, 'i2'))
  const h = await conn.readExact(77)
  t.is(h.readUInt32BE(5), 'info-i2'.length)
  t.is(h.readUInt32BE(9), 24)
  const r = await conn.recvWithFds(h.readUInt32BE(5), 24)
  t.is(r.data.toString(), 'info-i2')
  t.is(r.fds.length, 2)
  r.fds.forEach(closeFd)
  // release on the same connection
  for (const key of ['n1', 'n2', 'n3', 'n4', 'i2']) {
    await conn.write(rawHeader(1, key))
    const rel = await conn.readExact(77)
    t.is(rel[4], 0x81)
    t.is(rel.readUInt32BE(5), 0)
  }
  conn.close()
})

test('error frame: command 0xff, DataSize = message length, OobSize 0, key of 64 NULs; the connection stays usable', async (t) => {
  const { sock } = await withServer(t)
  const conn = await UnixConnection.connect(sock)
  await conn.write(rawHeader(2, 'missing'))
  const h = await conn.readExact(77)
  const msg = 'bad fd key: "missing"'
  t.is(h[4], 0xff)
  t.is(h.readUInt32BE(5), Buffer.byteLength(msg))
  t.is(h.readUInt32BE(9), 0)
  t.deepEqual(h.subarray(13), Buffer.alloc(64, 0))
  t.is((await conn.readExact(h.readUInt32BE(5))).toString(), msg)
  // unknown command, then a good request on the same connection
  await conn.write(rawHeader(7, 'n1'))
  const bad = await conn.readExact(77)
  t.is(bad[4], 0xff)
  t.is((await conn.readExact(bad.readUInt32BE(5))).toString(), 'bad command')
  await conn.write(Buffer.concat([rawHeader(0, 'n1', 2), Buffer.from('ok')]))
  t.is((await conn.readExact(77))[4], 0x80)
  conn.close()
})

test('key trimming like Go TrimSpace, NUL kept, %q quoting in errors', async (t) => {
  const { sock } = await withServer(t)
  const conn = await UnixConnection.connect(sock)
  const key = Buffer.concat([Buffer.from('\t q\x01"\\'), Buffer.alloc(58, 0x20)])
  await conn.write(rawHeader(2, key))
  const h = await conn.readExact(77)
  t.is((await conn.readExact(h.readUInt32BE(5))).toString(), 'bad fd key: "q\\x01\\"\\\\"')
  const nul = Buffer.concat([Buffer.from('a'), Buffer.alloc(63, 0)])
  await conn.write(rawHeader(2, nul))
  const h2 = await conn.readExact(77)
  t.is((await conn.readExact(h2.readUInt32BE(5))).toString(), `bad fd key: "a${'\\x00'.repeat(63)}"`)
  conn.close()
})

test('bad magic: the connection is closed without a response; the server keeps serving', async (t) => {
  const { sock, client } = await withServer(t)
  const conn = await UnixConnection.connect(sock)
  await conn.write(rawHeader(2, 'n1', 0, 0, Buffer.from([0x41, 0x41, 0x41, 0x41])))
  const err = await t.throwsAsync(conn.readExact(1, 5000))
  t.is((err as { code?: string }).code, 'ERR_CLOSED')
  conn.close()
  t.true(await stillServes(client))
})

test('DataSize over the limit: error response and close, nothing allocated or read; the server keeps serving', async (t) => {
  const { sock, client } = await withServer(t, { maxDataSize: 1024 })
  const conn = await UnixConnection.connect(sock)
  await conn.write(rawHeader(0, 'n1', 0xffffffff))
  const h = await conn.readExact(77)
  t.is(h[4], 0xff)
  t.is((await conn.readExact(h.readUInt32BE(5))).toString(), 'request data size 4294967295 exceeds the limit of 1024 bytes')
  t.is((await t.throwsAsync(conn.readExact(1, 5000)) as { code?: string }).code, 'ERR_CLOSED')
  conn.close()
  t.true(await stillServes(client))
})

test('get/release with a payload: the payload is consumed, the stream stays in sync', async (t) => {
  const { sock, client } = await withServer(t)
  await client.addFDs('n2', 'x')
  const conn = await UnixConnection.connect(sock)
  // a get whose 77-byte "payload" looks like another header: it must not be parsed as one
  await conn.write(Buffer.concat([rawHeader(2, 'n2', 77), rawHeader(1, 'n2')]))
  const h = await conn.readExact(77)
  t.is(h[4], 0x82)
  const r = await conn.recvWithFds(1, h.readUInt32BE(9))
  t.is(r.fds.length, 2)
  r.fds.forEach(closeFd)
  await conn.write(Buffer.concat([rawHeader(1, 'n2', 3), Buffer.from('abc'), rawHeader(2, 'n2')]))
  t.is((await conn.readExact(77))[4], 0x81)
  const after = await conn.readExact(77) // the get after the release: bad key
  t.is(after[4], 0xff)
  t.is((await conn.readExact(after.readUInt32BE(5))).toString(), 'bad fd key: "n2"')
  conn.close()
  t.true(await stillServes(client))
})

test('read deadline: a client that sends half a header is dropped; the server keeps serving meanwhile', async (t) => {
  const { sock, client } = await withServer(t, { readTimeoutMs: 300 })
  const conn = await UnixConnection.connect(sock)
  await conn.write(rawHeader(2, 'n1').subarray(0, 30))
  t.true(await stillServes(client)) // served while the slow client hangs
  t.is((await t.throwsAsync(conn.readExact(1, 10_000)) as { code?: string }).code, 'ERR_CLOSED')
  conn.close()
  t.true(await stillServes(client))
})

test('truncated header then EOF, and a client that vanishes mid-request, do not disturb the server', async (t) => {
  const { sock, client } = await withServer(t)
  const c1 = await UnixConnection.connect(sock)
  await c1.write(rawHeader(0, 'n1', 100).subarray(0, 50))
  c1.close()
  const c2 = await UnixConnection.connect(sock)
  await c2.write(rawHeader(0, 'n3', 100)) // promises 100 bytes, sends none, goes away
  c2.close()
  t.true(await stillServes(client, 'n3'))
})

test('our client against a hand-written server: key mismatch, unexpected command, bad magic, error frames', async (t) => {
  const { UnixListener } = await import('../src/native')
  const dir = mkdtempSync(join(tmpdir(), 'tm-fake-'))
  const sock = join(dir, 'fake.sock')
  const listener = UnixListener.bind(sock)
  const client = new FDClient(sock)
  // each case: what the fake server answers to the next request
  const answers: Buffer[] = [
    rawHeader(0x82, 'other-key'), // key mismatch
    rawHeader(0x81, 'k'), // release response to a get
    rawHeader(0x82, 'k', 0, 0, Buffer.from('ABCD')), // bad magic
    Buffer.concat([rawHeader(0xff, Buffer.alloc(64, 0), 4), Buffer.from('boom')]),
    Buffer.concat([rawHeader(0x80, 'k', 5), Buffer.from('hello')]), // a good add response
  ]
  const fake = (async () => {
    for (const answer of answers) {
      const conn = await listener.accept()
      const req = await conn.readExact(77)
      const size = req.readUInt32BE(5)
      if (size > 0) await conn.readExact(size)
      await conn.write(answer)
      conn.close()
    }
  })()
  try {
    t.like(await t.throwsAsync(client.getFDs('k')), { code: 'ERR_PROTOCOL', message: 'fd key mismatch in the server response' })
    t.like(await t.throwsAsync(client.getFDs('k')), { code: 'ERR_PROTOCOL', message: 'unexpected command 81' })
    t.like(await t.throwsAsync(client.getFDs('k')), { code: 'ERR_PROTOCOL', message: 'bad magic' })
    t.like(await t.throwsAsync(client.getFDs('k')), { code: 'ERR_SERVER', message: 'server returned error: boom' })
    t.is((await client.addFDs('k', Buffer.from('raw'))).toString(), 'hello')
    await fake
  } finally {
    listener.close(true)
    rmSync(dir, { recursive: true, force: true })
  }
})
