/**
 * `npm run bench` part: fd-passing round trips. Prints a table; asserts nothing.
 *
 * TypeScript: our FDClient (this process) against our FDServer (a child process, bench/fd-server-proc.ts).
 * Floor: the same exchanges between a minimal Rust-only client and server built on tapmanager-core
 * (crates/tapmanager-core/examples/fd_floor.rs, release build), also in two processes.
 * Cases: GetFDs with 1 and 16 concurrent clients and 1 and 4 fds; add+release cycles with 1 client.
 * Ratio = TypeScript throughput / floor throughput (the target is >= 0.5); p99 target with 1 client: < 1 ms.
 * The bench source declares `stableInfo`, so after the first get of a key the server answers gets natively
 * (FDServer's fast path); add+release always runs through the TypeScript server and source.
 * FD_BENCH_OPS sets the round trips per case (default 4000); on a busy machine larger runs are steadier.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { FDClient, closeFd } from '../src/index'

const root = process.cwd()
const OPS = Number(process.env.FD_BENCH_OPS ?? 4000)

interface Figures {
  ops: number
  secs: number
  p50_us: number
  p99_us: number
}

function pct(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))]
}

async function waitReady(child: ChildProcess, what: string): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${what} did not start in 60 s`)), 60_000)
    child.once('exit', (code) => reject(new Error(`${what} exited with ${code}`)))
    child.stdout!.on('data', (d: Buffer) => {
      if (d.toString().includes('ready')) {
        clearTimeout(timer)
        resolve()
      }
    })
  })
}

async function waitSocket(sock: string): Promise<void> {
  const c = new FDClient(sock)
  for (let i = 0; i < 500; i++) {
    if (await c.isRunning()) return
    await new Promise((r) => setTimeout(r, 10))
  }
  throw new Error(`nothing listens on ${sock}`)
}

async function tsRun(client: FDClient, mode: 'get' | 'addrel', conc: number, ops: number, nfds: number): Promise<Figures> {
  const lat: number[] = []
  const start = performance.now()
  await Promise.all(
    Array.from({ length: conc }, async (_, w) => {
      for (let i = 0; i < ops / conc; i++) {
        const t0 = performance.now()
        if (mode === 'get') {
          const { fds } = await client.getFDs(`g${nfds}`)
          for (const fd of fds) closeFd(fd)
        } else {
          const key = `a${w}-${i}`
          await client.addFDs(key, {})
          await client.releaseFDs(key)
        }
        lat.push((performance.now() - t0) * 1000)
      }
    }),
  )
  const secs = (performance.now() - start) / 1000
  lat.sort((a, b) => a - b)
  return { ops: lat.length, secs, p50_us: pct(lat, 0.5), p99_us: pct(lat, 0.99) }
}

function floorRun(bin: string, sock: string, mode: string, conc: number, ops: number, nfds: number): Figures {
  const out = execFileSync(bin, ['client', sock, mode, String(conc), String(ops), String(nfds)], { encoding: 'utf8' })
  return JSON.parse(out.trim()) as Figures
}

async function main(): Promise<void> {
  execFileSync('cargo', ['build', '--quiet', '--release', '-p', 'tapmanager-core', '--example', 'fd_floor'], { cwd: root, stdio: 'inherit' })
  const bin = join(root, 'target/release/examples/fd_floor')
  const dir = mkdtempSync(join(tmpdir(), 'tm-bench-'))
  const tsSock = join(dir, 'ts.sock')
  const rsSock = join(dir, 'rs.sock')
  const tsServer = spawn(process.execPath, ['--import', '@oxc-node/core/register', join(root, 'bench/fd-server-proc.ts'), tsSock], {
    cwd: root,
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  const rsServer = spawn(bin, ['server', rsSock], { stdio: ['ignore', 'ignore', 'inherit'] })
  try {
    await waitReady(tsServer, 'the TypeScript server')
    await waitSocket(rsSock)
    const client = new FDClient(tsSock)
    await client.addFDs('g1', {})
    await client.addFDs('g4', {})
    const cases: Array<{ name: string; mode: 'get' | 'addrel'; conc: number; nfds: number }> = [
      { name: 'GetFDs, 1 client, 1 fd', mode: 'get', conc: 1, nfds: 1 },
      { name: 'GetFDs, 1 client, 4 fds', mode: 'get', conc: 1, nfds: 4 },
      { name: 'GetFDs, 16 clients, 1 fd', mode: 'get', conc: 16, nfds: 1 },
      { name: 'GetFDs, 16 clients, 4 fds', mode: 'get', conc: 16, nfds: 4 },
      { name: 'add+release, 1 client', mode: 'addrel', conc: 1, nfds: 1 },
    ]
    // Warm-up of both sides (long enough for V8 to finish optimising the client's hot path: on a small shared
    // machine its background compiles otherwise land in the first measured case).
    for (const nfds of [1, 4]) {
      await tsRun(client, 'get', 1, 2000, nfds)
      await tsRun(client, 'get', 16, 2000, nfds)
    }
    floorRun(bin, rsSock, 'get', 1, 500, 1)
    const rows: string[][] = []
    for (const c of cases) {
      const ops = c.mode === 'addrel' ? OPS / 2 : OPS
      const ts = await tsRun(client, c.mode, c.conc, ops, c.nfds)
      const rs = floorRun(bin, rsSock, c.mode, c.conc, ops, c.nfds)
      const tsRate = ts.ops / ts.secs
      const rsRate = rs.ops / rs.secs
      rows.push([
        c.name,
        tsRate.toFixed(0),
        ts.p50_us.toFixed(0),
        ts.p99_us.toFixed(0),
        rsRate.toFixed(0),
        rs.p50_us.toFixed(0),
        rs.p99_us.toFixed(0),
        (tsRate / rsRate).toFixed(2),
      ])
    }
    const head = ['case (ops/s = round trips/s; add+release = cycles/s)', 'TS ops/s', 'TS p50 µs', 'TS p99 µs', 'Rust ops/s', 'Rust p50 µs', 'Rust p99 µs', 'TS/Rust']
    const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)))
    const line = (r: string[]) => r.map((v, i) => (i === 0 ? v.padEnd(widths[i]) : v.padStart(widths[i]))).join('  ')
    console.log(`fd passing, ${OPS} round trips per GetFDs case, client and server in separate processes`)
    console.log(line(head))
    console.log(widths.map((w) => '-'.repeat(w)).join('  '))
    for (const r of rows) console.log(line(r))
  } finally {
    tsServer.kill('SIGTERM')
    rsServer.kill('SIGTERM')
    await new Promise((r) => tsServer.once('exit', r))
    rmSync(dir, { recursive: true, force: true })
  }
}

main().catch((err: unknown) => {
  console.error(err)
  process.exitCode = 1
})
