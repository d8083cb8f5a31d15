// FDClient's two modes, byte for byte against hand-written raw servers and end to end against our FDServer:
// per call (the default, Virtlet's Go client's bytes: one request per connection, then the client closes) and
// keep-alive (requests back to back on open connections, a bounded pool, idle connections closed, a request on
// a connection the server had closed sent again on a new one, close()).
import test from 'ava'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { FDClient, FDServer } from '../src/index'
import { getAndRead, sameFileSource } from './helpers/sources'
import { UnixListener, type UnixConnection } from '../src/native'

const MAGIC = Buffer.from([0x42, 0x42, 0x42, 0x42])

function rawHeader(cmd: number, key: string, dataSize = 0, oobSize = 0): Buffer {
  const b = Buffer.alloc(13)
  MAGIC.copy(b, 0)
  b[4] = cmd
  b.writeUInt32BE(dataSize, 5)
  b.writeUInt32BE(oobSize, 9)
  return Buffer.concat([b, Buffer.from(key), Buffer.alloc(64 - Buffer.byteLength(key), 0x20)])
}

/** Reads one request (header and payload) off a raw connection. */
async function readRequest(conn: UnixConnection, timeoutMs = 10_000): Promise<Buffer> {
  const head = await conn.readExact(77, timeoutMs)
  const size = head.readUInt32BE(5)
  return size > 0 ? Buffer.concat([head, await conn.readExact(size, timeoutMs)]) : head
}

/** The response a raw server gives to a request: the command's response, `ok` as payload for add. */
function answer(req: Buffer): Buffer {
  const cmd = req[4]
  const key = req.subarray(13, 77).toString().trimEnd()
  return cmd === 0 ? Buffer.concat([rawHeader(0x80, key, 2), Buffer.from('ok')]) : rawHeader(cmd | 0x80, key)
}

/** Resolves true when the peer closes `conn` (EOF) within `ms`, false if it sends bytes or stays open. */
async function sawEof(conn: UnixConnection, ms: number): Promise<boolean> {
  try {
    await conn.readExact(1, ms)
    return false
  } catch (err) {
    return (err as { code?: string }).code === 'ERR_CLOSED'
  }
}

function tempSock(): { dir: string; sock: string } {
  const dir = mkdtempSync(join(tmpdir(), 'tm-modes-'))
  return { dir, sock: join(dir, 's.sock') }
}

test('per call (default): one request per connection, exactly the header and payload bytes, then the client closes', async (t) => {
  const { dir, sock } = tempSock()
  const listener = UnixListener.bind(sock)
  const client = new FDClient(sock)
  t.false(client.keepAlive)
  const seen: Buffer[] = []
  const eofs: boolean[] = []
  const server = (async () => {
    for (let i = 0; i < 3; i++) {
      const conn = await listener.accept()
      const req = await readRequest(conn)
      seen.push(req)
      await conn.write(answer(req))
      eofs.push(await sawEof(conn, 10_000))
      conn.close()
    }
  })()
  try {
    t.is((await client.addFDs('pod-a', Buffer.from('{"x":1}'))).toString(), 'ok')
    await client.releaseFDs('pod-a')
    await client.recover('pod-b', Buffer.from('{}'))
    await server
    t.deepEqual(seen, [
      Buffer.concat([rawHeader(0, 'pod-a', 7), Buffer.from('{"x":1}')]),
      rawHeader(1, 'pod-a'),
      Buffer.concat([rawHeader(3, 'pod-b', 2), Buffer.from('{}')]),
    ])
    t.deepEqual(eofs, [true, true, true], 'the client closed each connection after its response')
  } finally {
    client.close()
    listener.close(true)
    rmSync(dir, { recursive: true, force: true })
  }
})

test('keep-alive: requests back to back on one connection with the same bytes; an idle connection is closed', async (t) => {
  const { dir, sock } = tempSock()
  const listener = UnixListener.bind(sock)
  const client = new FDClient(sock, { keepAlive: true, idleTimeoutMs: 100 })
  const seen: Buffer[] = []
  const server = (async () => {
    const conn = await listener.accept()
    for (let i = 0; i < 3; i++) {
      const req = await readRequest(conn)
      seen.push(req)
      await conn.write(answer(req))
    }
    // Nothing more comes: the client closes the idle connection (idleTimeoutMs) well within 10 s.
    const eof = await sawEof(conn, 10_000)
    conn.close()
    return eof
  })()
  try {
    t.is((await client.addFDs('pod-a', Buffer.from('{"x":1}'))).toString(), 'ok')
    await client.releaseFDs('pod-a')
    await client.recover('pod-b', Buffer.from('{}'))
    t.deepEqual(seen, [
      Buffer.concat([rawHeader(0, 'pod-a', 7), Buffer.from('{"x":1}')]),
      rawHeader(1, 'pod-a'),
      Buffer.concat([rawHeader(3, 'pod-b', 2), Buffer.from('{}')]),
    ])
    t.true(await server, 'the idle connection was closed by the client')
  } finally {
    client.close()
    listener.close(true)
    rmSync(dir, { recursive: true, force: true })
  }
})

test('keep-alive: a connection the server closed is replaced and the request sent again; at most maxConnections open', async (t) => {
  const { dir, sock } = tempSock()
  const listener = UnixListener.bind(sock)
  const client = new FDClient(sock, { keepAlive: true, maxConnections: 2 })
  try {
    // 1. the server answers one request, then closes the connection (as ours does after its read deadline)
    const first = (async () => {
      const conn = await listener.accept()
      await conn.write(answer(await readRequest(conn)))
      conn.close()
    })()
    await client.releaseFDs('k1')
    await first
    // 2. from now on, every connection is served until the client closes it
    let accepted = 0
    const served: string[] = []
    const ends: Promise<string | undefined>[] = []
    const serveAll = async (conn: UnixConnection): Promise<string | undefined> => {
      try {
        for (;;) {
          const r = await readRequest(conn, 0)
          served.push(r.subarray(13, 77).toString().trimEnd())
          await conn.write(answer(r))
        }
      } catch (err) {
        return (err as { code?: string }).code
      } finally {
        conn.close()
      }
    }
    const acceptLoop = (async () => {
      for (;;) {
        let conn: UnixConnection
        try {
          conn = await listener.accept()
        } catch {
          return
        }
        accepted++
        ends.push(serveAll(conn))
      }
    })()
    await client.releaseFDs('k2') // the pooled connection is dead: sent again on a new one
    t.is(accepted, 1)
    t.deepEqual(served, ['k2'])
    // 3. twelve concurrent requests share at most two connections
    const keys = Array.from({ length: 12 }, (_, i) => `c${i}`)
    await Promise.all(keys.map((k) => client.releaseFDs(k)))
    t.is(accepted, 2)
    t.deepEqual([...served].sort(), ['k2', ...keys].sort())
    // 4. close(): the idle connections are closed (the server sees EOF), later requests fail clearly
    client.close()
    t.deepEqual(await Promise.all(ends), ['ERR_CLOSED', 'ERR_CLOSED'])
    await t.throwsAsync(client.releaseFDs('late'), { message: 'the FDClient is closed' })
    t.is(accepted, 2)
    listener.close(true)
    await acceptLoop
  } finally {
    client.close()
    listener.close(true)
    rmSync(dir, { recursive: true, force: true })
  }
})

test('keep-alive against our FDServer: adds, gets with fds, server errors and releases, concurrently', async (t) => {
  const { dir, sock } = tempSock()
  const file = join(dir, 'content')
  writeFileSync(file, 'payload-file')
  const source = sameFileSource(file, 2)
  const server = new FDServer(sock, source)
  await server.serve()
  const client = new FDClient(sock, { keepAlive: true, maxConnections: 4 })
  try {
    await Promise.all(
      Array.from({ length: 16 }, async (_, i) => {
        const key = `k${i}`
        t.is((await client.addFDs(key, {})).toString(), `added:${key}`)
        for (let j = 0; j < 3; j++) await getAndRead(t, client, key, 2, 0, 'payload-file')
        // an error frame leaves the connection usable
        await t.throwsAsync(client.getFDs(`missing${i}`), { message: `server returned error: bad fd key: "missing${i}"` })
        await client.releaseFDs(key)
      }),
    )
    t.is(source.held.size, 0)
  } finally {
    client.close()
    await server.stop()
    rmSync(dir, { recursive: true, force: true })
  }
})

test('keep-alive options are checked', (t) => {
  t.throws(() => new FDClient('/nonexistent.sock', { keepAlive: true, maxConnections: 0 }), { code: 'ERR_INVALID' })
  t.throws(() => new FDClient('/nonexistent.sock', { keepAlive: true, idleTimeoutMs: 0 }), { code: 'ERR_INVALID' })
})
