// Where FDClient waits for a response on a new connection: on this thread's event loop (libuv polls the socket,
// the default on Node) or on the native runtime (`waitOn: 'runtime'`, what Bun and Deno use). Both against our
// FDServer with identical results; the loop path against hand-written servers that answer in pieces, never, or
// close early; no fd left behind; and a request waiting on the loop keeps the process alive by itself.
import test from 'ava'
import { spawn } from 'node:child_process'
import { closeSync, mkdtempSync, openSync, readFileSync, readdirSync, readSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { FDClient, FDServer, closeFds } from '../src/index'
import { DEFAULT_SPIN_US } from '../src/defaults'
import { getAndRead, sameFileSource } from './helpers/sources'
import { until } from './helpers/env'
import { FdRequestPort, UnixListener, type UnixConnection } from '../src/native'

const root = process.cwd()

function tempSock(): { dir: string; sock: string } {
  const dir = mkdtempSync(join(tmpdir(), `tm-wait-${process.pid}-`))
  return { dir, sock: join(dir, 's.sock') }
}

function header(cmd: number, key: string, dataSize = 0, oobSize = 0): Buffer {
  const b = Buffer.alloc(77, 0x20)
  b.writeUInt32BE(0x42424242, 0)
  b[4] = cmd
  b.writeUInt32BE(dataSize, 5)
  b.writeUInt32BE(oobSize, 9)
  b.write(key, 13)
  return b
}

const fdCount = () => readdirSync('/proc/self/fd').length


test.serial('on Node the port waits on the event loop when asked, else on the runtime; waitOn is checked', (t) => {
  t.true(new FdRequestPort(() => undefined, true).waitsOnLoop)
  t.false(new FdRequestPort(() => undefined, false).waitsOnLoop)
  t.false(new FdRequestPort(() => undefined).waitsOnLoop)
  t.is(new FDClient('/nonexistent.sock').waitOn, 'loop')
  t.is(new FDClient('/nonexistent.sock', { waitOn: 'runtime' }).waitOn, 'runtime')
  t.throws(() => new FDClient('/nonexistent.sock', { waitOn: 'elsewhere' as 'loop' }), { code: 'ERR_INVALID' })
  t.is(new FDClient('/nonexistent.sock').spinUs, DEFAULT_SPIN_US)
  t.is(DEFAULT_SPIN_US, 50)
  t.is(new FDClient('/nonexistent.sock', { spinUs: 0 }).spinUs, 0)
  t.is(new FDClient('/nonexistent.sock', { spinUs: 1000 }).spinUs, 1000)
  for (const spinUs of [-1, 1001, 2.5, Number.NaN]) {
    t.throws(() => new FDClient('/nonexistent.sock', { spinUs }), { code: 'ERR_INVALID', message: /^spinUs must be an integer from 0 to 1000/ })
  }
})

/** Voluntary context switches of a process's JavaScript thread (this one's by default): each time it slept (e.g. in epoll_wait). */
function jsThreadSleeps(pid = process.pid): number {
  const status = readFileSync(`/proc/${pid}/task/${pid}/status`, 'utf8')
  return Number(/^voluntary_ctxt_switches:\s+(\d+)$/m.exec(status)![1])
}

/**
 * A server in a child process (its work does not count as this thread's) that answers each request 200 µs after
 * it came (busy, so its answer does not wait for its own wake-up): long enough that a client without the busy
 * wait is asleep by then, well within a 1 ms window.
 */
const SLOW_ANSWERS = `
const net = require('node:net')
net.createServer((c) => {
  let buf = Buffer.alloc(0)
  c.on('error', () => {})
  c.on('data', (d) => {
    buf = Buffer.concat([buf, d])
    while (buf.length >= 77) {
      const r = Buffer.from(buf.subarray(0, 77))
      buf = buf.subarray(77)
      const t0 = process.hrtime.bigint()
      while (process.hrtime.bigint() - t0 < 200000n);
      r[4] |= 0x80
      c.write(r)
    }
  })
}).listen(process.argv[1], () => console.log('ready'))
`

test.serial('loop wait: the busy wait (spinUs) keeps the thread awake for a response that comes within its window; with spinUs 0 it sleeps for nearly each', async (t) => {
  const { dir, sock } = tempSock()
  const child = spawn(process.execPath, ['-e', SLOW_ANSWERS, sock], { stdio: ['ignore', 'pipe', 'inherit'] })
  const exited = new Promise((r) => child.once('exit', r))
  try {
    let out = ''
    child.stdout!.on('data', (d: Buffer) => (out += d.toString()))
    t.true(await until(() => out.includes('ready'), 30_000), 'server ready')
    const before = fdCount()
    // Rounds of 100 requests per mode, alternating, until the busy wait shows (at most 8 rounds: a busy machine
    // may delay some answers past the window): the fewest sleeps with it against the most without.
    const most: Record<string, number> = {}
    const fewest: Record<string, number> = {}
    const shown = () =>
      ['', ' keep'].every((keep) => most[`0${keep}`] >= 60 && fewest[`1000${keep}`] < most[`0${keep}`] / 2)
    for (let round = 0; round < 8 && !(round > 0 && shown()); round++) {
      for (const spinUs of [1000, 0]) {
        for (const keepAlive of [false, true]) {
          const client = new FDClient(sock, { spinUs, keepAlive })
          for (let i = 0; i < 10; i++) await client.releaseFDs(`w${i}`) // warm
          const s0 = jsThreadSleeps()
          for (let i = 0; i < 100; i++) await client.releaseFDs(`k${i}`)
          const n = jsThreadSleeps() - s0
          const mode = `${spinUs}${keepAlive ? ' keep' : ''}`
          most[mode] = Math.max(most[mode] ?? 0, n)
          fewest[mode] = Math.min(fewest[mode] ?? Infinity, n)
          client.close()
        }
      }
    }
    t.log(`JavaScript thread sleeps for 100 requests answered after 200 µs, fewest / most: ${JSON.stringify({ fewest, most })}`)
    for (const keep of ['', ' keep']) {
      // without: about one per request (fewer when the loop had other work, e.g. the test runner's messages,
      // and found the answer there when done)
      t.true(most[`0${keep}`] >= 60, `spinUs 0${keep}: at most ${most[`0${keep}`]} sleeps for 100 requests`)
      t.true(fewest[`1000${keep}`] < most[`0${keep}`] / 2, `spinUs 1000${keep}: at least ${fewest[`1000${keep}`]} sleeps`)
    }
    t.true(await until(() => fdCount() === before), `fds back to ${before} (now ${fdCount()})`)
  } finally {
    child.kill('SIGTERM')
    await exited
    rmSync(dir, { recursive: true, force: true })
  }
})

test.serial('FDServer on the loop: its busy wait (spinUs) keeps its thread awake for a next request that comes within the window; with spinUs 0 it sleeps for nearly each', async (t) => {
  const { dir, sock } = tempSock()
  const servers = [1000, 0].map((spinUs) => {
    const path = `${sock}.${spinUs}`
    const child = spawn(process.execPath, ['--import', '@oxc-node/core/register', '__test__/helpers/fdserver-child.ts', path, JSON.stringify({ spinUs }), join(dir, `files${spinUs}`)], {
      cwd: root,
      env: { ...process.env, OXC_TSCONFIG_PATH: './__test__/tsconfig.json' },
      stdio: ['ignore', 'pipe', 'inherit'],
    })
    let out = ''
    child.stdout!.on('data', (d: Buffer) => (out += d.toString()))
    return { spinUs, path, child, ready: () => out.includes('"ready"'), exited: new Promise((r) => child.once('exit', r)) }
  })
  try {
    for (const s of servers) t.true(await until(s.ready, 30_000), `server (spinUs ${s.spinUs}) ready`)
    // the client sends each next request at once (its own busy wait keeps it quick)
    const clients = servers.map((s) => new FDClient(s.path, { spinUs: 1000 }))
    for (const c of clients) await c.addFDs('k', { contents: ['spin'] })
    // rounds of 100 gets per server, alternating, until the busy wait shows (at most 8: see the test above)
    let most0 = 0
    let fewest1000 = Infinity
    for (let round = 0; round < 8 && !(round > 0 && most0 >= 60 && fewest1000 < most0 / 2); round++) {
      for (const [i, s] of servers.entries()) {
        for (let j = 0; j < 10; j++) closeFds((await clients[i].getFDs('k')).fds) // warm
        const s0 = jsThreadSleeps(s.child.pid!)
        for (let j = 0; j < 100; j++) {
          const { fds } = await clients[i].getFDs('k')
          t.is(fds.length, 1)
          closeFds(fds)
        }
        const n = jsThreadSleeps(s.child.pid!) - s0
        if (s.spinUs === 0) most0 = Math.max(most0, n)
        else fewest1000 = Math.min(fewest1000, n)
      }
    }
    for (const c of clients) await c.releaseFDs('k')
    t.log(`the server's JavaScript thread slept for 100 gets: spinUs 0: at most ${most0}; spinUs 1000: at least ${fewest1000}`)
    t.true(most0 >= 60, `spinUs 0: at most ${most0} sleeps for 100 requests`)
    t.true(fewest1000 < most0 / 2, `spinUs 1000: at least ${fewest1000} sleeps`)
  } finally {
    for (const s of servers) s.child.kill('SIGTERM')
    await Promise.all(servers.map((s) => s.exited))
    rmSync(dir, { recursive: true, force: true })
  }
})

test.serial('loop wait: the busy wait ends with its window: a slow response costs no spinning CPU, and timers still fire meanwhile', async (t) => {
  const { dir, sock } = tempSock()
  const listener = UnixListener.bind(sock)
  try {
    const client = new FDClient(sock, { spinUs: 1000 })
    let ticks = 0
    const ticker = setInterval(() => ticks++, 2)
    const cpu0 = process.cpuUsage()
    const released = client.releaseFDs('slow')
    const conn = await listener.accept()
    await conn.readExact(77, 10_000)
    await new Promise((r) => setTimeout(r, 400))
    await conn.write(header(0x81, 'slow'))
    await released
    const cpu = process.cpuUsage(cpu0)
    clearInterval(ticker)
    conn.close()
    // Spinning through the wait would cost ~400 ms of CPU; the window is 1 ms (and none while a timer is due).
    const ms = (cpu.user + cpu.system) / 1000
    t.true(ms < 150, `CPU during a 400 ms wait: ${ms.toFixed(1)} ms`)
    t.true(ticks >= 20, `a 2 ms interval ticked ${ticks} times in 400 ms`)
  } finally {
    listener.close(true)
    rmSync(dir, { recursive: true, force: true })
  }
})

test.serial('both waits, per call and keep-alive, against our FDServer: the same adds, gets with fds, errors and releases, concurrently', async (t) => {
  const { dir, sock } = tempSock()
  const file = join(dir, 'content')
  writeFileSync(file, 'payload-file')
  const source = sameFileSource(file, 3)
  const server = new FDServer(sock, source)
  await server.serve()
  const before = fdCount()
  try {
    const results: Record<string, string[]> = {}
    const modes = { loop: { waitOn: 'loop' }, runtime: { waitOn: 'runtime' }, loopkeep: { waitOn: 'loop', keepAlive: true }, runtimekeep: { waitOn: 'runtime', keepAlive: true } } as const
    for (const [waitOn, options] of Object.entries(modes)) {
      const client = new FDClient(sock, options)
      const seen: string[] = []
      await Promise.all(
        Array.from({ length: 12 }, async (_, i) => {
          const key = `${waitOn}-${i}`
          seen.push((await client.addFDs(key, {})).toString().replace(waitOn, 'W'))
          for (let j = 0; j < 3; j++) await getAndRead(t, client, key, 3, 2, 'payload-file')
          const err = await t.throwsAsync(client.getFDs(`missing-${key}`))
          seen.push(err!.message.replace(waitOn, 'W'))
          await client.releaseFDs(key)
        }),
      )
      results[waitOn] = seen.sort()
      client.close()
    }
    t.deepEqual(results.loop, results.runtime)
    t.deepEqual(results.loopkeep, results.runtime)
    t.deepEqual(results.runtimekeep, results.runtime)
    t.is(results.loop.length, 24)
    t.is(source.held.size, 0)
    t.true(await until(() => fdCount() === before), `fds back to ${before} (now ${fdCount()})`)
  } finally {
    await server.stop()
    rmSync(dir, { recursive: true, force: true })
  }
})

test.serial('responses bigger than the port\'s inbox and many at once: each caller keeps its own bytes and fds, in all four modes', async (t) => {
  // A port hands a response frame over in a 64 KiB inbox that the next frame overwrites; a bigger one comes in a
  // Buffer of its own. Big and small responses in flight together must each reach their caller intact.
  const { dir, sock } = tempSock()
  const file = join(dir, 'content')
  writeFileSync(file, 'payload-file')
  const inner = sameFileSource(file, 2)
  const bytesOf = (key: string): Buffer => (key.includes('big') ? Buffer.alloc(150 * 1024 + key.length, key) : Buffer.from(`small:${key}`))
  const server = new FDServer(sock, {
    ...inner,
    getFDs: async (key) => ({ fds: (await inner.getFDs(key, Buffer.alloc(0))).fds, data: bytesOf(`add-${key}`) }),
    getInfo: (key) => bytesOf(`info-${key}`),
  })
  await server.serve()
  const before = fdCount()
  try {
    const modes = { loop: { waitOn: 'loop' }, runtime: { waitOn: 'runtime' }, loopkeep: { waitOn: 'loop', keepAlive: true }, runtimekeep: { waitOn: 'runtime', keepAlive: true } } as const
    for (const [mode, options] of Object.entries(modes)) {
      const client = new FDClient(sock, options)
      const keys = Array.from({ length: 8 }, (_, i) => `${mode}-${i % 2 ? 'big' : 'small'}-${i}`)
      const added = await Promise.all(keys.map((k) => client.addFDs(k, {})))
      const got = await Promise.all(keys.map((k) => client.getFDs(k)))
      keys.forEach((k, i) => {
        t.true(added[i].equals(bytesOf(`add-${k}`)), `${mode}: add response of ${k}`)
        t.true(got[i].info.equals(bytesOf(`info-${k}`)), `${mode}: get info of ${k}`)
        t.is(got[i].fds.length, 2)
        const b = Buffer.alloc(12)
        t.is(readSync(got[i].fds[1], b, 0, 12, 0), 12)
        t.is(b.toString(), 'payload-file')
        for (const fd of got[i].fds) closeSync(fd)
      })
      await Promise.all(keys.map((k) => client.releaseFDs(k)))
      client.close()
    }
    t.is(inner.held.size, 0)
    // at most as many as before: an earlier test's connection may be closed by its collector meanwhile
    t.true(await until(() => fdCount() <= before), `fds back to ${before} (now ${fdCount()})`)
  } finally {
    await server.stop()
    rmSync(dir, { recursive: true, force: true })
  }
})

test.serial('loop wait: a response in pieces (split header, fds with the first payload bytes, the rest later)', async (t) => {
  const { dir, sock } = tempSock()
  const listener = UnixListener.bind(sock)
  const file = join(dir, 'content')
  writeFileSync(file, 'piecewise')
  const client = new FDClient(sock)
  const step = () => new Promise((r) => setTimeout(r, 30))
  const server = (async () => {
    const conn = await listener.accept()
    await conn.readExact(77, 10_000)
    const h = header(0x82, 'pk', 6, 24)
    await conn.write(h.subarray(0, 20))
    await step()
    await conn.write(h.subarray(20))
    await step()
    const fd = openSync(file, 'r')
    try {
      await conn.writeThenSend(Buffer.alloc(0), Buffer.from('inf'), [fd], 10_000)
    } finally {
      closeSync(fd)
    }
    await step()
    await conn.write(Buffer.from('o!!'))
    conn.close()
  })()
  try {
    const { fds, info } = await client.getFDs('pk')
    t.is(info.toString(), 'info!!')
    t.is(fds.length, 1)
    const buf = Buffer.alloc(9)
    t.is(readSync(fds[0], buf, 0, 9, 0), 9)
    t.is(buf.toString(), 'piecewise')
    closeSync(fds[0])
    await server
  } finally {
    listener.close(true)
    rmSync(dir, { recursive: true, force: true })
  }
})

test.serial('loop wait: no answer within timeoutMs is ERR_TIMEOUT and the connection is closed; early EOF is ERR_CLOSED', async (t) => {
  const { dir, sock } = tempSock()
  const listener = UnixListener.bind(sock)
  const before = fdCount()
  try {
    const client = new FDClient(sock, { timeoutMs: 200 })
    let conn: UnixConnection | undefined
    const accepted = listener.accept().then((c) => (conn = c))
    await t.throwsAsync(client.getFDs('silent'), { code: 'ERR_TIMEOUT', message: 'request: not done within 200 ms' })
    await accepted
    // the client's socket is closed: the server side sees the request, then EOF
    t.is((await conn!.readExact(77, 10_000)).subarray(13, 19).toString(), 'silent')
    await t.throwsAsync(conn!.readExact(1, 10_000), { code: 'ERR_CLOSED' })
    conn!.close()

    const half = (async () => {
      const c = await listener.accept()
      await c.readExact(77, 10_000)
      await c.write(header(0x82, 'half', 1, 0).subarray(0, 40))
      c.close()
    })()
    await t.throwsAsync(new FDClient(sock).getFDs('half'), { code: 'ERR_CLOSED', message: 'read 77 bytes: connection closed after 40' })
    await half
    t.true(await until(() => fdCount() === before), `fds back to ${before} (now ${fdCount()})`)
  } finally {
    listener.close(true)
    rmSync(dir, { recursive: true, force: true })
  }
})

test.serial('loop wait: a request\'s own socket, and the one made ahead for a next request, close right after the callback that settled it (before the next turn of the loop)', async (t) => {
  const { dir, sock } = tempSock()
  const listener = UnixListener.bind(sock)
  const before = fdCount()
  try {
    const client = new FDClient(sock)
    const served = (async () => {
      const c = await listener.accept()
      await c.readExact(77, 10_000)
      await c.write(header(0x81, 'rk'))
      return c
    })()
    await client.releaseFDs('rk')
    // Here, in the continuation the response settled, the socket may still be open, and so may the socket made
    // ahead for a next request: both are closed once the completion callback returns (a next request made here
    // takes the spare and goes out before the old socket's close), since no request is left waiting.
    const inContinuation = fdCount() - before
    t.true(inContinuation >= 1 && inContinuation <= 3, `server side, client socket, spare: ${inContinuation}`)
    await new Promise((r) => setImmediate(r))
    t.is(fdCount() - before, 1, 'only the server side of the connection is left: no socket kept while idle')
    const conn = await served
    await t.throwsAsync(conn.readExact(1, 10_000), { code: 'ERR_CLOSED' })
    conn.close()
    t.is(fdCount(), before)
  } finally {
    listener.close(true)
    rmSync(dir, { recursive: true, force: true })
  }
})

test.serial('loop wait: requests in a row take the socket made ahead; one that fails takes it too; no fd is left', async (t) => {
  const { dir, sock } = tempSock()
  const file = join(dir, 'content')
  writeFileSync(file, 'x')
  const server = new FDServer(sock, sameFileSource(file, 1))
  await server.serve()
  try {
    const client = new FDClient(sock)
    const before = fdCount()
    await client.addFDs('row', {})
    for (let i = 0; i < 30; i++) closeFds((await client.getFDs('row')).fds)
    // while one request waits, a second to a path nobody listens on takes the spare and fails
    const pending = client.getFDs('row')
    await t.throwsAsync(new FDClient(join(dir, 'nobody.sock')).getFDs('row'), { code: 'ERR_NOT_FOUND' })
    closeFds((await pending).fds)
    await client.releaseFDs('row')
    t.true(await until(() => fdCount() === before), `fds back to ${before} (now ${fdCount()})`)
  } finally {
    await server.stop()
    rmSync(dir, { recursive: true, force: true })
  }
})

test.serial('closeFds closes every fd it is given, also past one that fails, then throws the first failure', (t) => {
  const { dir } = tempSock()
  try {
    const file = join(dir, 'f')
    writeFileSync(file, 'x')
    const before = fdCount()
    const fds = [openSync(file, 'r'), openSync(file, 'r'), openSync(file, 'r')]
    t.is(fdCount(), before + 3)
    t.throws(() => closeFds([fds[0], -1, fds[1]]), { code: 'ERR_INVALID', message: 'closeFds: bad fd -1' })
    t.is(fdCount(), before + 1, 'both good fds closed')
    t.throws(() => closeFds([fds[0], fds[2], fds[1]]), { code: 'ERR_CLOSED', message: /^close fd \d+: .*\(2 of 3 fds failed\)$/ })
    t.is(fdCount(), before)
    t.notThrows(() => closeFds([]))
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})

test.serial('loop wait: a pending request keeps the process alive by itself until its response', async (t) => {
  const { dir, sock } = tempSock()
  const listener = UnixListener.bind(sock)
  const script = join(dir, 'child.ts')
  // The child holds nothing else open: without the poll handle's reference it would exit before the answer.
  writeFileSync(
    script,
    `import { FDClient } from ${JSON.stringify(join(root, 'src/index.ts'))}\n` +
      `new FDClient(${JSON.stringify(sock)}).releaseFDs('late').then(() => console.log('released'), (e) => console.log('failed', e.message))\n`,
  )
  try {
    const child = spawn(process.execPath, ['--import', '@oxc-node/core/register', script], { cwd: root, stdio: ['ignore', 'pipe', 'inherit'] })
    let out = ''
    child.stdout!.on('data', (d: Buffer) => (out += d.toString()))
    const exited = new Promise<number | null>((r) => child.once('exit', r))
    const conn = await listener.accept()
    await conn.readExact(77, 30_000)
    await new Promise((r) => setTimeout(r, 300))
    await conn.write(header(0x81, 'late'))
    t.is(await exited, 0)
    t.is(out.trim(), 'released')
    conn.close()
  } finally {
    listener.close(true)
    rmSync(dir, { recursive: true, force: true })
  }
})
