// A bounded, seeded wire-frame fuzz run (see helpers/wirefuzz.ts) against a real FDServer and against the daemon's
// server, each over its socket: afterwards each still serves, and no fd is left open. Reproducible: the same seed
// sends the same frames (TAPMANAGER_FUZZ_SEED overrides it; the seed is printed).
import test from 'ava'
import { mkdirSync, mkdtempSync, readdirSync, readlinkSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { FDServer, FDClient, closeFd, ServerError } from '../src/index'
import { startDaemon } from '../src/daemon'
import { FileFDSource } from '../examples/file-fd-source'
import { fuzzFrame, runWireFuzz } from './helpers/wirefuzz'
import { openFdCount } from './helpers/env'

const SEED = Number(process.env.TAPMANAGER_FUZZ_SEED ?? 20261202)
const FRAMES = 2000

function fdList(): string {
  return readdirSync('/proc/self/fd').map((f) => { try { return `${f}:${readlinkSync(`/proc/self/fd/${f}`)}` } catch { return f } }).join(' ')
}

async function settledFds(expected: number): Promise<number> {
  let n = openFdCount()
  for (let i = 0; i < 1000 && n > expected; i++) {
    await new Promise((r) => setTimeout(r, 10))
    n = openFdCount()
  }
  return n
}

test('the fuzz campaign is reproducible: the same seed gives the same frames', (t) => {
  const gen = (seed: number) => {
    let a = seed
    const rnd = () => ((a = (a * 1103515245 + 12345) >>> 0) / 2 ** 32)
    return Array.from({ length: 50 }, () => fuzzFrame(rnd, [0, 1, 2, 3]).bytes.toString('hex')).join()
  }
  t.is(gen(1), gen(1))
  t.not(gen(1), gen(2))
})

test.serial(`FDServer survives ${FRAMES} fuzzed connections and still serves, with no fd leak`, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), `tm-fuzz-${process.pid}-`))
  const sock = join(dir, 'fd.sock')
  const server = new FDServer(sock, new FileFDSource(join(dir, 'files')), { readTimeoutMs: 2000 })
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const fdsBefore = openFdCount()
  await server.serve()
  const client = new FDClient(sock)
  await client.addFDs('probe', { contents: ['p'] })
  const counts = await runWireFuzz({ socketPath: sock, frames: FRAMES, seed: SEED })
  t.log(`seed ${SEED}:`, JSON.stringify(counts))
  t.is(counts.connections + counts.connectFailures, FRAMES)
  t.true(counts.responses > 0 && counts.errorResponses > 0 && counts.closedByServer > 0)
  // Still serving: the probe key's fds and a fresh add/get/release.
  const { fds } = await client.getFDs('probe')
  fds.forEach((fd) => closeFd(fd))
  await client.addFDs('after', { contents: ['a'] })
  ;(await client.getFDs('after')).fds.forEach((fd) => closeFd(fd))
  await client.releaseFDs('after')
  // After stop (which releases every key, the fuzzer's valid adds too) the fd count is back where it was.
  await server.stop()
  const after = await settledFds(fdsBefore)
  if (after !== fdsBefore) t.log(fdList())
  t.is(after, fdsBefore)
})

test.serial(`the daemon's server survives ${FRAMES} fuzzed connections and still serves, with no fd leak`, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), `tm-fuzzd-${process.pid}-`))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const confDir = join(dir, 'conf')
  mkdirSync(confDir)
  const sock = join(dir, 'fd.sock')
  // No CNI config: an add that gets past parsing fails at CNI, before any netns exists; the fuzzer sends no adds
  // (commands release, get, recover, list and unknown ones) so nothing is created on the machine.
  const fdsBefore = openFdCount()
  const daemon = await startDaemon({ socketPath: sock, stateDir: join(dir, 'state'), cniConfigDir: confDir, cniPluginDirs: [join(dir, 'bin')], netnsDir: join(dir, 'netns') })
  try {
    const counts = await runWireFuzz({ socketPath: sock, frames: FRAMES, seed: SEED, commands: [1, 2, 0x40, 5, 0x7f, 0xff] })
    t.log(`seed ${SEED}:`, JSON.stringify(counts))
    t.true(counts.responses > 0 && counts.errorResponses > 0)
    const client = new FDClient(sock)
    const err = await t.throwsAsync(client.getFDs('nothing'), { instanceOf: ServerError })
    t.is(err?.code, 'ERR_NOT_FOUND')
    t.deepEqual((await client.list()).keys, [])
  } finally {
    await daemon.close()
  }
  const after = await settledFds(fdsBefore)
  if (after !== fdsBefore) t.log(fdList())
  t.is(after, fdsBefore)
})
