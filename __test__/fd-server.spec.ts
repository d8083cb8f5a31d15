// FDServer + FDClient with a source backed by real files: what Virtlet's own fdserver tests cover, plus
// concurrency, stop() and the fd-leak check.
import test from 'ava'
import { mkdtempSync, readSync, readdirSync, rmSync, existsSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { FDServer, FDClient, closeFd, ServerError, InvalidInputError, type RequestLogEntry } from '../src/index'
import { FileFDSource } from '../examples/file-fd-source'
import { openFdCount, until } from './helpers/env'

function setup(opts: ConstructorParameters<typeof FDServer>[2] = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'tm-fd-'))
  const source = new FileFDSource(join(dir, 'files'))
  const sock = join(dir, 'fd.sock')
  const server = new FDServer(sock, source, opts)
  const client = new FDClient(sock)
  const cleanup = async () => {
    await server.stop()
    rmSync(dir, { recursive: true, force: true })
  }
  return { dir, source, sock, server, client, cleanup }
}

/**
 * The open fd count once the server has noticed the clients' closes (its side of each connection closes when it
 * reads EOF, just after the client has its answer): polls, bounded, until it equals `expected`.
 */
async function fdCountSettled(expected: number): Promise<number> {
  let n = openFdCount()
  for (let i = 0; i < 400 && n !== expected; i++) {
    await new Promise((r) => setTimeout(r, 5))
    n = openFdCount()
  }
  return n
}

/**
 * Waits (bounded) until the server has closed its side of every connection: none in the application's hands,
 * none held natively (a connection handed back to the listener after its response waits there for EOF).
 */
async function serverIdle(server: FDServer): Promise<void> {
  if (!(await until(() => server.openConnections === 0 && server.limits().open === 0, 2_000, 5))) throw new Error('server connections did not close')
}

/** Reads a whole (small) file through an fd from its start, then closes the fd. */
function readFd(fd: number): string {
  const buf = Buffer.alloc(4096)
  const n = readSync(fd, buf, 0, buf.length, 0)
  closeFd(fd)
  return buf.subarray(0, n).toString('utf8')
}

test('add three keys, get each and read through its fds, release, recover (Virtlet fdserver scenarios)', async (t) => {
  const { server, client, source, cleanup } = setup()
  await server.serve()
  try {
    t.true(await client.isRunning())
    const contents: Record<string, string[]> = { k1: ['one'], k2: ['two-a', 'two-b'], k3: ['three'] }
    const added: Record<string, { key: string; paths: string[] }> = {}
    for (const [key, c] of Object.entries(contents)) {
      const resp = await client.addFDs(key, { contents: c })
      added[key] = JSON.parse(resp.toString())
      t.is(added[key].key, key)
      t.is(added[key].paths.length, c.length)
    }
    for (const [key, c] of Object.entries(contents)) {
      const { fds, info } = await client.getFDs(key)
      t.is(fds.length, c.length)
      t.deepEqual(JSON.parse(info.toString()), added[key])
      t.deepEqual(fds.map(readFd), c)
    }
    await client.releaseFDs('k2')
    t.deepEqual(source.released, ['k2'])
    const err = await t.throwsAsync(client.getFDs('k2'), { instanceOf: ServerError })
    t.is(err?.message, 'server returned error: bad fd key: "k2"')
    t.is(err?.code, 'ERR_NOT_FOUND')

    // A restarted server: a new server on the same files recovers k1 and k3 from the add responses.
    await server.stop()
    t.false(existsSync(server.socketPath))
    t.false(await client.isRunning())
    const source2 = new FileFDSource(source.dir)
    const server2 = new FDServer(server.socketPath, source2)
    await server2.serve()
    try {
      await client.recover('k1', added.k1)
      await client.recover('k3', Buffer.from(JSON.stringify(added.k3)))
      const again = await t.throwsAsync(client.recover('k1', added.k1))
      t.is(again?.message, 'server returned error: fd key "k1" is already present and thus can\'t be properly recovered')
      const { fds, info } = await client.getFDs('k1') // retrieveFDs path
      t.deepEqual(fds.map(readFd), ['one'])
      t.deepEqual(JSON.parse(info.toString()), added.k1)
      const second = await client.getFDs('k1') // fds kept, retrieveFDs not called again
      t.deepEqual(second.fds.map(readFd), ['one'])
      await client.releaseFDs('k3') // recover then release
      t.deepEqual(source2.released, ['k3'])
      t.is((await t.throwsAsync(client.getFDs('k3')))?.message, 'server returned error: bad fd key: "k3"')
      await client.releaseFDs('k1')
      t.is(source2.size, 0)
    } finally {
      await server2.stop()
    }
  } finally {
    await cleanup()
  }
})

test.serial('duplicate add says fd key already exists and leaks nothing; exactly one of concurrent adds wins', async (t) => {
  const { server, client, source, cleanup } = setup()
  await server.serve()
  try {
    await client.addFDs('dup', { contents: ['x'] })
    await serverIdle(server)
    const before = openFdCount()
    const err = await t.throwsAsync(client.addFDs('dup', { contents: ['y'] }))
    t.is(err?.message, 'server returned error: fd key already exists: "dup"')
    t.is(await fdCountSettled(before), before)
    t.is(source.size, 1)

    const results = await Promise.allSettled(Array.from({ length: 8 }, (_, i) => client.addFDs('race', { contents: [`r${i}`] })))
    const ok = results.filter((r) => r.status === 'fulfilled')
    t.is(ok.length, 1)
    for (const r of results) {
      if (r.status === 'rejected') t.is((r.reason as Error).message, 'server returned error: fd key already exists: "race"')
    }
    t.is(source.size, 2)
    t.is(await fdCountSettled(before + 1), before + 1) // only the winner's one file is open
    const { fds } = await client.getFDs('race')
    t.regex(readFd(fds[0]), /^r\d$/)
    await client.releaseFDs('race')
    await client.releaseFDs('dup')
    t.is(source.size, 0)
  } finally {
    await cleanup()
  }
})

test('client refuses keys that cannot be sent intact, before connecting', async (t) => {
  const { client } = setup() // no server: a request that got as far as connecting would fail differently
  for (const key of ['k'.repeat(65), ' lead', 'trail\t', 'nul\0key', '']) {
    const err = await t.throwsAsync(client.getFDs(key), { instanceOf: InvalidInputError })
    t.is(err?.code, 'ERR_INVALID')
  }
  await t.throwsAsync(client.addFDs('ключ'.repeat(9), {}), { instanceOf: InvalidInputError }) // 72 bytes of UTF-8
})

test('source errors come back as server errors, the server keeps serving; the request log sees each request', async (t) => {
  const log: RequestLogEntry[] = []
  const { server, client, cleanup } = setup({ onRequest: (e) => log.push(e) })
  await server.serve()
  try {
    const err = await t.throwsAsync(client.addFDs('bad', { nope: 1 }))
    t.is(err?.message, 'server returned error: error getting fd: add data must be {"contents": [string, ...]}')
    await t.throwsAsync(client.releaseFDs('never'), { message: 'server returned error: bad fd key: "never"' })
    await client.addFDs('good', { contents: ['g'] })
    await client.releaseFDs('good')
    // the hook runs right after the response is written: wait (bounded) for the last entry
    await until(() => log.length >= 4, 1_000, 1)
    t.deepEqual(
      log.map((e) => [e.key, e.command, e.outcome]),
      [
        ['bad', 'add', 'error'],
        ['never', 'release', 'error'],
        ['good', 'add', 'ok'],
        ['good', 'release', 'ok'],
      ],
    )
    t.true(log.every((e) => e.durationMs >= 0 && e.peer?.uid === process.getuid!()))
  } finally {
    await cleanup()
  }
})

test('stop() closes the listener, removes the socket, finishes in-flight requests and stops the source', async (t) => {
  const { server, client, source, sock, cleanup } = setup()
  let release!: () => void
  const gate = new Promise<void>((r) => (release = r))
  const slowGetFDs = source.getFDs.bind(source)
  source.getFDs = ((key: string, data: Buffer) => gate.then(() => slowGetFDs(key, data))) as unknown as typeof source.getFDs
  let stopped = 0
  const origStop = source.stop.bind(source)
  source.stop = () => {
    stopped++
    origStop()
  }
  await server.serve()
  t.true(existsSync(sock))
  const inflight = client.addFDs('slow', { contents: ['s'] })
  // wait (bounded) until the request reached the source
  await until(() => server.isPending('slow'), 20_000, 5)
  t.true(server.isPending('slow'))
  const stopping = server.stop()
  t.false(existsSync(sock))
  t.false(await client.isRunning())
  release()
  await stopping
  // the in-flight add finished cleanly: either answered or refused because the server is stopping
  const r = await inflight.then(
    () => 'ok',
    (e: Error) => e.message,
  )
  t.is(r, 'server returned error: error getting fd: the server is stopping')
  t.is(stopped, 1)
  t.is(source.size, 0)
  t.is(readdirSync(source.dir).length, 0)
  await cleanup()
})

test.serial('no fd leaks over 1000 add/get/release cycles with successes and failures', async (t) => {
  const { server, client, cleanup } = setup()
  await server.serve()
  try {
    // warm up once so lazily opened runtime fds are not counted
    await client.addFDs('warm', { contents: ['w'] })
    for (const fd of (await client.getFDs('warm')).fds) closeFd(fd)
    await client.releaseFDs('warm')
    await serverIdle(server)
    const before = openFdCount()
    let failures = 0
    for (let i = 0; i < 1000; i++) {
      const key = `cycle-${i % 7}`
      const n = (i % 4) + 1
      await client.addFDs(key, { contents: Array.from({ length: n }, (_, j) => `${i}.${j}`) })
      if (i % 5 === 0) {
        await client.addFDs(key, { contents: ['dup'] }).catch(() => failures++) // duplicate
      }
      if (i % 9 === 0) await client.addFDs(`bad-${i}`, 'not json').catch(() => failures++)
      const { fds } = await client.getFDs(key)
      if (fds.length !== n) t.fail(`got ${fds.length} fds instead of ${n}`)
      for (const fd of fds) closeFd(fd)
      await client.releaseFDs(key)
      if (i % 11 === 0) await client.getFDs(key).catch(() => failures++)
      if (i % 13 === 0) await client.releaseFDs(key).catch(() => failures++)
    }
    t.true(failures > 300)
    t.is(await fdCountSettled(before), before)
  } finally {
    await cleanup()
  }
})

test('gets racing a release either get readable fds or "bad fd key"; of two releases exactly one succeeds', async (t) => {
  const { server, client, source, cleanup } = setup()
  await server.serve()
  try {
    for (let round = 0; round < 20; round++) {
      await client.addFDs('r', { contents: ['A', 'B'] })
      const gets = Array.from({ length: 6 }, () => client.getFDs('r'))
      const rels = [client.releaseFDs('r'), client.releaseFDs('r')]
      const [g, r] = await Promise.all([Promise.allSettled(gets), Promise.allSettled(rels)])
      for (const res of g) {
        if (res.status === 'fulfilled') t.deepEqual(res.value.fds.map(readFd), ['A', 'B'])
        else t.is((res.reason as Error).message, 'server returned error: bad fd key: "r"')
      }
      t.is(r.filter((x) => x.status === 'fulfilled').length, 1)
      t.is(source.size, 0)
    }
  } finally {
    await cleanup()
  }
})

test('stop() does not wait for a client stuck in the middle of its first request', async (t) => {
  const { UnixConnection } = await import('../src/native')
  // a deadline far beyond the test's own timeout: stop() must not depend on it
  const { server, sock, cleanup } = setup({ readTimeoutMs: 600_000 })
  await server.serve()
  const stuck = await UnixConnection.connect(sock)
  await stuck.write(Buffer.from([0x42, 0x42, 0x42])) // 3 of 77 header bytes
  await server.stop()
  t.like(await t.throwsAsync(stuck.readExact(1)), { code: 'ERR_CLOSED' }) // the server dropped it
  stuck.close()
  await cleanup()
})
