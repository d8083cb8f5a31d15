// Hostile peers against a real FDServer over its socket: a flood of idle connections that exhausts the server's
// fds (accept() fails with EMFILE: the server must go on), connection caps (total and per uid, a flood from
// another uid never locks root out, counted and reported once per interval, not per connection), a client that
// sends requests and never reads (write deadline; stop() stays bounded), and one log entry per request with its
// real outcome on both the native fast path and the JavaScript path.
import test from 'ava'
import { spawn, type ChildProcess } from 'node:child_process'
import { chmodSync, mkdtempSync, rmSync } from 'node:fs'
import { connect, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { FDServer, FDClient, closeFd, type RequestLogEntry, type LimitsReport } from '../src/index'
import { FileFDSource } from '../examples/file-fd-source'
import { UnixConnection } from '../src/native'
import { requirePrereqs, until as pollUntil } from './helpers/env'

const NODE_ARGS = ['--import', '@oxc-node/core/register']
const CHILD_ENV = { ...process.env, OXC_TSCONFIG_PATH: './__test__/tsconfig.json' }

function tempDir(t: { teardown: (f: () => void) => void }): string {
  const dir = mkdtempSync(join(tmpdir(), `tm-lim-${process.pid}-`))
  chmodSync(dir, 0o755)
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

/** Polls every 20 ms for up to `ms` (the stuck-writes check counts polls at that pace). */
const until = (cond: () => boolean | Promise<boolean>, ms = 30_000) => pollUntil(cond, ms, 20)

/** Opens `n` idle connections from this process (those refused or failing are counted, not thrown). */
async function flood(sock: string, n: number): Promise<{ sockets: Socket[]; failed: number }> {
  const sockets: Socket[] = []
  let failed = 0
  await Promise.all(
    Array.from(
      { length: n },
      () =>
        new Promise<void>((resolve) => {
          const s = connect({ path: sock })
          s.once('connect', () => {
            sockets.push(s)
            resolve()
          })
          s.once('error', () => {
            failed++
            s.destroy()
            resolve()
          })
        }),
    ),
  )
  for (const s of sockets) s.on('error', () => undefined)
  return { sockets, failed }
}

function getHeader(key: string): Buffer {
  const b = Buffer.alloc(77, 0x20)
  b.writeUInt32BE(0x42424242, 0)
  b[4] = 2
  b.writeUInt32BE(0, 5)
  b.writeUInt32BE(0, 9)
  b.write(key, 13)
  return b
}

for (const readOn of ['loop', 'runtime'] as const) {
  test(`${readOn}: a flood of idle connections that exhausts the fd limit (EMFILE) does not end the server: it serves again afterwards`, async (t) => {
    requirePrereqs(['prlimit'])
    const dir = tempDir(t)
    const sock = join(dir, 'fd.sock')
    // The server runs with 96 fds; caps far above that, so accept() itself fails (EMFILE), as without caps.
    const child: ChildProcess = spawn(
      'prlimit',
      ['--nofile=96:96', process.execPath, ...NODE_ARGS, '__test__/helpers/fdserver-child.ts', sock, JSON.stringify({ maxConnections: 100_000, maxConnectionsPerUid: 100_000, readOn }), join(dir, 'files')],
      { cwd: process.cwd(), env: CHILD_ENV, stdio: ['ignore', 'pipe', 'inherit'] },
    )
    const events: Record<string, unknown>[] = []
    createInterface({ input: child.stdout! }).on('line', (l) => events.push(JSON.parse(l)))
    let exit: number | null | undefined
    child.once('exit', (code) => (exit = code))
    t.teardown(() => {
      if (exit === undefined) child.kill('SIGKILL')
    })
    t.true(await until(() => events.some((e) => e.ready) || exit !== undefined), 'server ready')
    const client = new FDClient(sock, { timeoutMs: 10_000 })
    await client.addFDs('k', { contents: ['hello'] })

    const { sockets } = await flood(sock, 300)
    // accept() failed (EMFILE) and was survived: reported, and the process is alive.
    t.true(
      await until(() => events.some((e) => ((e.limits as LimitsReport | undefined)?.total.acceptErrors ?? 0) > 0)),
      JSON.stringify(events.slice(-3)),
    )
    const report = [...events].reverse().find((e) => e.limits)!.limits as LimitsReport
    t.regex(report.lastAcceptError ?? '', /Too many open files|EMFILE/i)
    t.is(exit, undefined)
    for (const s of sockets) s.destroy()

    // Serving again once the flood is gone (bounded poll: the server drains the backlog of closed connections).
    let got: string | undefined
    t.true(
      await until(async () => {
        try {
          const { fds } = await client.getFDs('k')
          fds.forEach((fd) => closeFd(fd))
          got = 'ok'
          return true
        } catch {
          return false
        }
      }, 60_000),
    )
    t.is(got, 'ok')
    t.false(events.some((e) => e.fatal))
    child.kill('SIGTERM')
    t.true(await until(() => exit !== undefined))
    t.is(exit, 0)
  })
}

/** Runs a process as uid/gid 65534 that opens `n` idle connections, prints how many connected, holds them until stdin closes. */
function floodAsNobody(sock: string, n: number): { child: ChildProcess; opened: Promise<number> } {
  const script = `
    const net = require('node:net'); let ok = 0, done = 0; const all = []
    for (let i = 0; i < ${n}; i++) { const s = net.connect({ path: ${JSON.stringify(sock)} }); all.push(s)
      s.on('connect', () => { ok++; if (++done === ${n}) console.log(ok) }); s.on('error', () => { if (++done === ${n}) console.log(ok) }) }
    process.stdin.on('end', () => process.exit(0)); process.stdin.resume()`
  const child = spawn(process.execPath, ['-e', script], { uid: 65534, gid: 65534, stdio: ['pipe', 'pipe', 'inherit'] })
  const opened = new Promise<number>((resolve) => createInterface({ input: child.stdout! }).once('line', (l) => resolve(Number(l))))
  return { child, opened }
}

for (const readOn of ['loop', 'runtime'] as const) {
  test(`${readOn}: connection caps: a flood from another uid is closed at once over its cap, counted and reported once per interval; root is still served`, async (t) => {
    requirePrereqs()
    const dir = tempDir(t)
    const sock = join(dir, 'fd.sock')
    const reports: LimitsReport[] = []
    const server = new FDServer(sock, new FileFDSource(join(dir, 'files')), {
      readOn,
      socketMode: 0o666,
      allowedUids: [0],
      maxConnections: 16,
      maxConnectionsPerUid: 4,
      limitsIntervalMs: 200,
      onLimits: (r) => reports.push(r),
    })
    await server.serve()
    t.teardown(() => server.stop())
    const client = new FDClient(sock, { timeoutMs: 10_000 })
    await client.addFDs('k', { contents: ['x'] })

    const started = Date.now()
    const { child, opened } = floodAsNobody(sock, 200)
    t.teardown(() => {
      child.stdin?.end()
    })
    await opened
    // At most 4 of nobody's connections are held; the rest were closed at once and counted.
    t.true(await until(() => server.limits().total.overUid >= 150), JSON.stringify(server.limits()))
    t.true(server.limits().open <= 4, JSON.stringify(server.limits()))
    // Root is served all the while.
    for (let i = 0; i < 5; i++) {
      const { fds } = await client.getFDs('k')
      fds.forEach((fd) => closeFd(fd))
    }
    t.true(await until(() => reports.some((r) => r.interval.overUid > 0)))
    // Reported per interval, not per connection.
    t.true(reports.length <= 2 + (Date.now() - started) / 200, `${reports.length} reports`)
    child.stdin!.end()
  })
}

test('a client that sends requests and never reads: responses have a write deadline and stop() is bounded (JS path and native fast path)', async (t) => {
  requirePrereqs()
  for (const path of ['js', 'fast'] as const) {
    const dir = tempDir(t)
    const sock = join(dir, 'fd.sock')
    const log: RequestLogEntry[] = []
    const server = new FDServer(sock, new FileFDSource(join(dir, 'files')), {
      writeTimeoutMs: 1000,
      stopTimeoutMs: 2000,
      onRequest: (e) => log.push(e),
    })
    await server.serve()
    const client = new FDClient(sock, { timeoutMs: 10_000 })
    await client.addFDs('k', { contents: ['x'.repeat(1000)] })
    // One get through JavaScript registers the key for the native fast path.
    if (path === 'fast') (await client.getFDs('k')).fds.forEach((fd) => closeFd(fd))
    const before = log.length
    const hog = await UnixConnection.connect(sock)
    // 20,000 requests in one go, never reading a byte: responses pile up until the server's writes block.
    const key = path === 'fast' ? 'k' : 'unknown-key'
    void hog.write(Buffer.concat(Array.from({ length: 20_000 }, () => getHeader(key)))).catch(() => undefined)
    // Wait (bounded) until the server's writes are stuck: answers stopped growing although requests remain.
    let last = -1
    let still = 0
    const stuck = await until(() => {
      still = log.length === last ? still + 1 : 0
      last = log.length
      return last > before + 100 && still >= 25
    }, 60_000)
    t.true(stuck, `${path}: ${log.length - before} answered, then stuck`)
    t.true(log.length - before < 20_000, `${path}: not every response fit in the socket buffers`)
    const t0 = Date.now()
    const stopped = await Promise.race([server.stop().then(() => 'stopped'), new Promise((r) => setTimeout(() => r('hung'), 30_000))])
    t.is(stopped, 'stopped', `${path}: stop() finished`)
    t.log(`${path}: stop() took ${Date.now() - t0} ms with a non-reading client`)
    // The blocked response is logged as not sent.
    t.true(log.some((e) => e.outcome === 'error' && /response not sent/.test(e.error ?? '')), `${path}: a response not sent is logged`)
    hog.close()
  }
})

test('one log entry per request with its real outcome, including gets whose client went away (native fast path and JS path)', async (t) => {
  requirePrereqs()
  const dir = tempDir(t)
  const sock = join(dir, 'fd.sock')
  const log: RequestLogEntry[] = []
  const server = new FDServer(sock, new FileFDSource(join(dir, 'files')), { onRequest: (e) => log.push(e) })
  await server.serve()
  const client = new FDClient(sock, { timeoutMs: 10_000 })
  await client.addFDs('k', { contents: ['x'] })
  ;(await client.getFDs('k')).fds.forEach((fd) => closeFd(fd)) // registers k for the fast path
  // An entry is logged once its write has finished, which may be after the client has its answer: wait for the
  // add's and the get's entries before counting from zero.
  t.true(await until(() => log.length >= 2), `set-up requests logged (${log.length})`)
  log.length = 0
  const N_OK = 60
  const N_GONE = 30
  const N_GONE_JS = 10
  // Clients that have stopped reading before they ask (shutdown(SHUT_RD)): every response to them fails.
  const gone = async (key: string) => {
    const c = await UnixConnection.connect(sock)
    c.closeRead()
    await c.write(getHeader(key))
    return c
  }
  const conns: UnixConnection[] = []
  const goodGet = async () => (await client.getFDs('k')).fds.forEach((fd) => closeFd(fd))
  for (let i = 0; i < N_GONE; i++) {
    conns.push(await gone('k'))
    await goodGet()
  }
  for (let i = 0; i < N_GONE_JS; i++) conns.push(await gone('nope'))
  for (let i = N_GONE; i < N_OK; i++) await goodGet()
  const total = N_OK + N_GONE + N_GONE_JS
  t.true(await until(() => log.length >= total), `${log.length} of ${total} logged`)
  await server.stop()
  for (const c of conns) c.close()
  t.is(log.length, total, 'exactly one entry per request')
  t.is(log.filter((e) => e.key === 'k' && e.outcome === 'ok').length, N_OK)
  t.is(log.filter((e) => e.key === 'k' && e.outcome === 'error' && /response not sent/.test(e.error!)).length, N_GONE)
  t.is(log.filter((e) => e.key === 'nope' && e.outcome === 'error' && /^bad fd key: "nope"; response not sent/.test(e.error!)).length, N_GONE_JS)
})
