// The native fast path for get: with a source that declares `stableInfo`, the first get of a key goes through
// JavaScript and registers the key's response natively; later gets are answered natively with the same bytes.
// Release unregisters first; authorisation applies; stop() closes every native duplicate.
import test from 'ava'
import { chmodSync, closeSync, mkdtempSync, openSync, readSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { FDServer, FDClient, closeFd, type RequestLogEntry } from '../src/index'
import { UnixConnection, UnixListener } from '../src/native'
import { encodeHeader, encodeKey, FDCommand } from '../src/protocol'
import { FileFDSource } from '../examples/file-fd-source'
import { openFdCount, requirePrereqs, until as pollUntil } from './helpers/env'
import { getAsNobody } from './helpers/nobody'

/** FileFDSource's info depends only on the key's files, which never change until release. */
class StableFileSource extends FileFDSource {
  override readonly stableInfo = true
  infoCalls = 0
  override getInfo(key: string): Buffer {
    this.infoCalls++
    return super.getInfo(key)
  }
}

function setup(opts: ConstructorParameters<typeof FDServer>[2] = {}, stable = true) {
  const dir = mkdtempSync(join(tmpdir(), 'tm-fdfast-'))
  chmodSync(dir, 0o755)
  const source = new StableFileSource(join(dir, 'files'))
  if (!stable) Object.defineProperty(source, 'stableInfo', { value: false })
  const sock = join(dir, 'fd.sock')
  const server = new FDServer(sock, source, opts)
  const client = new FDClient(sock)
  const cleanup = async () => {
    await server.stop()
    rmSync(dir, { recursive: true, force: true })
  }
  return { dir, source, sock, server, client, cleanup }
}

function readFd(fd: number): string {
  const buf = Buffer.alloc(4096)
  const n = readSync(fd, buf, 0, buf.length, 0)
  closeFd(fd)
  return buf.subarray(0, n).toString('utf8')
}

function fast(server: FDServer, key: string): boolean {
  return server.isFastGet(key)
}

/** Waits (bounded: 5 s, polling every 5 ms) until `cond()` holds; returns whether it did. */
const until = (cond: () => boolean) => pollUntil(cond, 5_000, 5)

/** One raw get on its own connection, read as the Go client does; returns header, data and fds. */
async function rawGet(sock: string, key: string) {
  const c = await UnixConnection.connect(sock)
  try {
    await c.write(encodeHeader({ command: FDCommand.Get, dataSize: 0, oobSize: 0, key: encodeKey(key) }))
    return await c.readResponseFrame(5000)
  } finally {
    c.close()
  }
}

test('a stable-info source: later gets are answered natively with byte-identical responses, several per connection', async (t) => {
  const { server, client, source, sock, cleanup } = setup()
  await server.serve()
  try {
    await client.addFDs('k', { contents: ['one', 'two', 'three'] })
    t.false(fast(server, 'k'))
    const first = await rawGet(sock, 'k') // through JavaScript: registers the key
    t.true(fast(server, 'k'))
    t.is(source.infoCalls, 1)
    const second = await rawGet(sock, 'k') // native
    t.is(source.infoCalls, 1, 'the native path did not call back into JavaScript')
    t.deepEqual(second.header, first.header)
    t.deepEqual(second.data, first.data)
    t.is(second.header[4], 0x82)
    t.is(second.header.readUInt32BE(5), first.data!.length)
    t.is(second.header.readUInt32BE(9), 32) // CMSG_SPACE(4 * 3)
    t.deepEqual(second.header.subarray(13), encodeKey('k'))
    t.deepEqual(first.fds.map(readFd), ['one', 'two', 'three'])
    t.deepEqual(second.fds.map(readFd), ['one', 'two', 'three'])

    // Several gets on one connection, mixed with JavaScript-served requests (an unknown key, a bad command).
    const c = await UnixConnection.connect(sock)
    try {
      const get = (key: string) => encodeHeader({ command: FDCommand.Get, dataSize: 0, oobSize: 0, key: encodeKey(key) })
      for (const h of [get('k'), get('nope'), get('k'), encodeHeader({ command: 9, dataSize: 0, oobSize: 0, key: encodeKey('k') }), get('k')]) {
        await c.write(h)
        const f = await c.readResponseFrame(5000)
        if (h[4] === 9) t.is(f.data!.toString(), 'bad command')
        else if (h.subarray(13).equals(encodeKey('nope'))) t.is(f.data!.toString(), 'bad fd key: "nope"')
        else {
          t.deepEqual(f.header, first.header)
          t.deepEqual(f.fds.map(readFd), ['one', 'two', 'three'])
        }
      }
    } finally {
      c.close()
    }
    t.is(source.infoCalls, 1)

    // A key sent with other padding (a tab before the spaces) decodes to the same key but is not the canonical
    // encoding: JavaScript answers it and echoes those bytes, as before.
    const odd = encodeKey('k')
    odd[1] = 0x09
    const c2 = await UnixConnection.connect(sock)
    try {
      await c2.write(encodeHeader({ command: FDCommand.Get, dataSize: 0, oobSize: 0, key: odd }))
      const f = await c2.readResponseFrame(5000)
      t.deepEqual(f.header.subarray(13), odd)
      t.deepEqual(f.fds.map(readFd), ['one', 'two', 'three'])
      t.is(source.infoCalls, 2)
    } finally {
      c2.close()
    }

    // A get with a payload is not a fast get: JavaScript consumes the payload and answers.
    const c3 = await UnixConnection.connect(sock)
    try {
      await c3.write(Buffer.concat([encodeHeader({ command: FDCommand.Get, dataSize: 3, oobSize: 0, key: encodeKey('k') }), Buffer.from('xyz')]))
      const f = await c3.readResponseFrame(5000)
      t.deepEqual(f.fds.map(readFd), ['one', 'two', 'three'])
      t.is(source.infoCalls, 3)
    } finally {
      c3.close()
    }
  } finally {
    await cleanup()
  }
})

test('release unregisters before the source closes the fds; gets racing it read correct content or "bad fd key"', async (t) => {
  const { server, client, source, cleanup } = setup()
  await server.serve()
  try {
    for (let round = 0; round < 20; round++) {
      await client.addFDs('r', { contents: ['A', 'B'] })
      const warm = await client.getFDs('r')
      warm.fds.forEach(closeFd)
      t.true(fast(server, 'r'))
      const gets = Array.from({ length: 6 }, () => client.getFDs('r'))
      const rels = [client.releaseFDs('r'), client.releaseFDs('r')]
      const [g, r] = await Promise.all([Promise.allSettled(gets), Promise.allSettled(rels)])
      for (const res of g) {
        if (res.status === 'fulfilled') t.deepEqual(res.value.fds.map(readFd), ['A', 'B'])
        else t.is((res.reason as Error).message, 'server returned error: bad fd key: "r"')
      }
      t.is(r.filter((x) => x.status === 'fulfilled').length, 1)
      t.false(fast(server, 'r'))
      await t.throwsAsync(client.getFDs('r'), { message: 'server returned error: bad fd key: "r"' })
      t.is(source.size, 0)
    }
    // A key added again after release is registered afresh with its new files.
    await client.addFDs('r', { contents: ['new'] })
    ;(await client.getFDs('r')).fds.forEach(closeFd)
    t.deepEqual((await client.getFDs('r')).fds.map(readFd), ['new'])
  } finally {
    await cleanup()
  }
})

test('recovered keys: the first get retrieves the fds in JavaScript, later ones are native', async (t) => {
  const { server, client, source, cleanup } = setup()
  await server.serve()
  try {
    // The add response of FileFDSource is its recover data: recover a second key onto the same files.
    const resp = await client.addFDs('v', { contents: ['recovered'] })
    await client.recover('w', resp)
    t.false(fast(server, 'w'))
    t.deepEqual((await client.getFDs('w')).fds.map(readFd), ['recovered'])
    t.true(fast(server, 'w'))
    const calls = source.infoCalls
    t.deepEqual((await client.getFDs('w')).fds.map(readFd), ['recovered'])
    t.is(source.infoCalls, calls)
  } finally {
    await cleanup()
  }
})

test('no fast path without stableInfo (every get is logged)', async (t) => {
  const log: string[] = []
  const { server, client, source, cleanup } = setup({ onRequest: (e) => log.push(`${e.command} ${e.key}`) }, false)
  await server.serve()
  try {
    await client.addFDs('h', { contents: ['x'] })
    for (let i = 0; i < 3; i++) (await client.getFDs('h')).fds.forEach(closeFd)
    t.false(fast(server, 'h'))
    t.is(source.infoCalls, 3)
    // Each entry is logged once its response was written: it may land just after the client read it.
    t.true(await until(() => log.length >= 4))
    t.deepEqual(log, ['add h', 'get h', 'get h', 'get h'])
  } finally {
    await cleanup()
  }
})

test('with an onRequest hook the fast path stays on, and every get is still logged exactly once', async (t) => {
  const log: RequestLogEntry[] = []
  const { server, client, source, cleanup } = setup({ onRequest: (e) => log.push(e) })
  await server.serve()
  try {
    await client.addFDs('h', { contents: ['x'] })
    for (let i = 0; i < 3; i++) (await client.getFDs('h')).fds.forEach(closeFd)
    t.true(fast(server, 'h'))
    t.is(source.infoCalls, 1, 'the second and third gets were answered natively')
    // Native entries arrive shortly after their responses, without stop().
    t.true(await until(() => log.length >= 4))
    t.deepEqual(log.map((e) => `${e.command} ${e.key}`), ['add h', 'get h', 'get h', 'get h'])
  } finally {
    await cleanup()
  }
  t.is(log.length, 4, 'nothing logged twice')
  for (const e of log) {
    t.is(e.outcome, 'ok')
    t.is(e.peer?.uid, process.getuid!())
    t.true(e.durationMs >= 0)
    t.is(e.dropped, undefined)
  }
})

test('with onRequest, N gets (mostly native, several per connection, concurrent) give exactly N get entries', async (t) => {
  const log: RequestLogEntry[] = []
  const { server, client, source, sock, cleanup } = setup({ onRequest: (e) => log.push(e) })
  await server.serve()
  const expected: string[] = []
  try {
    await client.addFDs('a', { contents: ['A'] })
    await client.addFDs('b', { contents: ['B1', 'B2'] })
    // The first get of each key goes through JavaScript and registers it.
    for (const k of ['a', 'b']) {
      ;(await client.getFDs(k)).fds.forEach(closeFd)
      expected.push(k)
      t.true(fast(server, k))
    }
    // Concurrent gets on their own connections, all native.
    const keys = Array.from({ length: 30 }, (_, i) => (i % 3 === 0 ? 'b' : 'a'))
    const got = await Promise.all(keys.map((k) => client.getFDs(k)))
    got.forEach((r, i) => t.deepEqual(r.fds.map(readFd), keys[i] === 'a' ? ['A'] : ['B1', 'B2']))
    expected.push(...keys)
    // Several gets on one connection, native, with an unknown key in between (JavaScript answers it).
    const c = await UnixConnection.connect(sock)
    try {
      for (const k of ['a', 'b', 'nope', 'a', 'b', 'a']) {
        await c.write(encodeHeader({ command: FDCommand.Get, dataSize: 0, oobSize: 0, key: encodeKey(k) }))
        const f = await c.readResponseFrame(5000)
        f.fds.forEach(closeFd)
        if (k !== 'nope') expected.push(k)
      }
    } finally {
      c.close()
    }
    t.is(source.infoCalls, 2, 'only the first get of each key reached the source')
    const gets = () => log.filter((e) => e.command === 'get')
    t.true(await until(() => gets().length >= expected.length + 1))
  } finally {
    await cleanup()
  }
  const gets = log.filter((e) => e.command === 'get')
  t.is(gets.length, expected.length + 1, 'one entry per get, the unknown key included, none twice')
  const ok = gets.filter((e) => e.outcome === 'ok')
  t.deepEqual(ok.map((e) => e.key).sort(), [...expected].sort())
  for (const e of ok) {
    t.deepEqual(Object.keys(e).sort(), ['command', 'durationMs', 'key', 'outcome', 'peer'])
    t.deepEqual(e.peer, { pid: process.pid, uid: process.getuid!(), gid: process.getgid!() })
    t.true(e.durationMs >= 0 && e.durationMs < 60_000)
  }
  const bad = gets.filter((e) => e.outcome === 'error')
  t.deepEqual(bad.map((e) => [e.key, e.error]), [['nope', 'bad fd key: "nope"']])
  t.is(server.droppedLogEntries, 0)
})

test('native fast log: a full queue drops and counts entries, one wake-up per empty-to-not-empty', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'tm-fdlog-'))
  const sock = join(dir, 'l.sock')
  const file = join(dir, 'f')
  writeFileSync(file, 'data')
  const fd = openSync(file, 'r')
  const listener = UnixListener.bind(sock)
  try {
    listener.startIncoming({ maxData: 1024, readTimeoutMs: 5000 })
    listener.registerGet('k', Buffer.from('info'), [fd])
    let wakes = 0
    listener.enableFastLog(2, () => wakes++)
    // Nobody takes: two entries wait, the next three are dropped.
    for (let i = 0; i < 5; i++) {
      const f = await rawGet(sock, 'k')
      t.is(f.data!.toString(), 'info')
      t.deepEqual(f.fds.map(readFd), ['data'])
    }
    // An entry is queued before its response stops counting as in flight.
    await listener.drainFast()
    t.true(await until(() => wakes >= 1))
    t.is(wakes, 1)
    t.is(listener.fastLogDropped, 3)
    const first = listener.takeFastLog()
    t.is(first.dropped, 3)
    t.deepEqual(first.entries.map((e) => e.key), ['k', 'k'])
    t.is(first.entries[0].peer?.uid, process.getuid!())
    t.deepEqual(listener.takeFastLog(), { entries: [], dropped: 0 })
    // The queue is empty again: the next entry wakes again.
    readFd((await rawGet(sock, 'k')).fds[0])
    await listener.drainFast()
    t.true(await until(() => wakes === 2))
    const second = listener.takeFastLog()
    t.deepEqual([second.entries.length, second.dropped, listener.fastLogDropped], [1, 0, 3])
  } finally {
    listener.close(true)
    closeSync(fd)
    rmSync(dir, { recursive: true, force: true })
  }
})

test.serial('stop() closes the native duplicates: the fd count returns to where it was', async (t) => {
  const before = openFdCount()
  const { server, client, cleanup } = setup()
  await server.serve()
  await client.addFDs('s', { contents: ['1', '2', '3', '4'] })
  ;(await client.getFDs('s')).fds.forEach(closeFd)
  const gets = Array.from({ length: 8 }, () => client.getFDs('s').then((r) => r.fds.forEach(closeFd), () => undefined))
  await Promise.all(gets)
  t.true(fast(server, 's'))
  await cleanup()
  let n = openFdCount()
  for (let i = 0; i < 400 && n !== before; i++) {
    await new Promise((r) => setTimeout(r, 5))
    n = openFdCount()
  }
  t.is(n, before)
})

test('authorisation applies to natively answered gets: a registered key is refused to a peer not allowed', async (t) => {
  requirePrereqs()
  for (const opts of [{ allowedUids: [0] }, { allowedGids: [0] }, { allowedUids: [] as number[] }]) {
    const { server, client, source, sock, cleanup } = setup({ ...opts, socketMode: 0o666 })
    await server.serve()
    try {
      if (opts.allowedUids?.length === 0) {
        // nobody is allowed, root included
        await t.throwsAsync(client.addFDs('p', { contents: ['secret'] }), { message: /permission denied: peer uid 0 gid 0 is not allowed/ })
        continue
      }
      await client.addFDs('p', { contents: ['secret'] })
      t.deepEqual((await client.getFDs('p')).fds.map(readFd), ['secret'])
      t.true(fast(server, 'p'))
      const out = await getAsNobody(sock, 'p')
      t.is(out, 'ERR server returned error: permission denied: peer uid 65534 gid 65534 is not allowed')
      t.deepEqual((await client.getFDs('p')).fds.map(readFd), ['secret'])
      t.is(source.infoCalls, 1)
    } finally {
      await cleanup()
    }
  }
  // Without a filter the same other user is served natively.
  const { server, client, source, sock, cleanup } = setup({ socketMode: 0o666 })
  await server.serve()
  try {
    await client.addFDs('p', { contents: ['open'] })
    ;(await client.getFDs('p')).fds.forEach(closeFd)
    t.is(await getAsNobody(sock, 'p'), 'OK 1')
    t.is(source.infoCalls, 1)
  } finally {
    await cleanup()
  }
})

test('client requests through the shared completion port: errors keep their code, concurrent ones settle each', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'tm-fdport-'))
  try {
    const missing = new FDClient(join(dir, 'none.sock'))
    const err = await t.throwsAsync(missing.getFDs('k'))
    t.is((err as Error & { code?: string }).code, 'ERR_NOT_FOUND')
    t.regex(err!.message, /^connect .*none\.sock: /)
    // A listener that never answers: the request deadline gives ERR_TIMEOUT; a live server's answers meanwhile
    // reach their own callers.
    const { UnixListener } = await import('../src/native')
    const mute = UnixListener.bind(join(dir, 'mute.sock'))
    const { server, client, cleanup } = setup()
    await server.serve()
    try {
      await client.addFDs('c', { contents: ['c'] })
      const slow = new FDClient(join(dir, 'mute.sock'), { timeoutMs: 300 }).getFDs('k')
      const many = await Promise.all(Array.from({ length: 20 }, () => client.getFDs('c')))
      for (const r of many) t.deepEqual(r.fds.map(readFd), ['c'])
      const terr = await t.throwsAsync(slow)
      t.is((terr as Error & { code?: string }).code, 'ERR_TIMEOUT')
    } finally {
      mute.close(true)
      await cleanup()
    }
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})
