/**
 * `npm run chaos`: a long hardening campaign against the real daemon (`tapmanager serve` in a test node netns,
 * Debian bridge + host-local, real netns, taps, DHCP). It prints a table of figures and exits 1 only when a key
 * is lost or stuck or something leaked. Sizes come from the environment, so a quick run is possible:
 *
 *   CHAOS_WIRE_FRAMES   malformed wire frames sent to the daemon's socket        (default 1000000)
 *   CHAOS_DHCP_PACKETS  fuzzed DHCP packets written into a pod's tap fd           (default 1000000)
 *   CHAOS_LEAK_CYCLES   add/get/release cycles, resources compared before/after  (default 2000)
 *   CHAOS_KILLS         kill -9 at a random point of an add, with live pods       (default 100)
 *   CHAOS_LIVE_PODS     live pods, then kill -9 and automatic recovery            (default 250)
 *   CHAOS_SEED          the seed of every random choice                           (default 8)
 *
 * The wire fuzz uses `runWireFuzz` of `__test__/helpers/wirefuzz.ts` when that helper exists, else a minimal
 * fuzzer of its own (random headers and bodies, truncated frames, abrupt closes).
 */
import { execFileSync } from 'node:child_process'
import { closeSync, existsSync, readdirSync, readFileSync } from 'node:fs'
import { connect } from 'node:net'
import { join } from 'node:path'
import { tapFdInfo } from '../src/native'
import { CniTestNode } from '../__test__/helpers/cni'
import { prng, runDhcpFuzz } from '../__test__/helpers/dhcpfuzz'
import { addPayload, killNetnsProcesses, netnsNames, removeNetns, runCli, ServerProcess } from '../__test__/helpers/serve'
import { FakeVm } from '../__test__/helpers/tapfd'

const env = (name: string, def: number) => Number(process.env[name] ?? def)
const SIZES = {
  wire: env('CHAOS_WIRE_FRAMES', 1_000_000),
  dhcp: env('CHAOS_DHCP_PACKETS', 1_000_000),
  cycles: env('CHAOS_LEAK_CYCLES', 2000),
  kills: env('CHAOS_KILLS', 100),
  live: env('CHAOS_LIVE_PODS', 250),
}
const SEED = env('CHAOS_SEED', 8)
const rand = prng(SEED)

interface Row {
  campaign: string
  size: number
  figures: string
  ok: boolean
  problem?: string
}
const rows: Row[] = []

function table(): void {
  const head = ['campaign', 'size', 'result', 'figures']
  const body = rows.map((r) => [r.campaign, String(r.size), r.ok ? 'ok' : `FAIL: ${r.problem}`, r.figures])
  const w = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)))
  const line = (c: string[]) => c.map((x, i) => x.padEnd(w[i])).join(' | ')
  console.log(line(head))
  console.log(w.map((n) => '-'.repeat(n)).join('-|-'))
  for (const b of body) console.log(line(b))
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

/** What a leak would show: the server's fds, threads and RSS; netns, node links, leases, state files, nft tables. */
function resources(node: CniTestNode, server: ServerProcess): Record<string, number> {
  const status = readFileSync(`/proc/${server.pid}/status`, 'utf8')
  const field = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(status)?.[1] ?? NaN)
  const nft = execFileSync('ip', ['netns', 'exec', node.name, 'nft', 'list', 'tables'], { encoding: 'utf8' }).split('\n').filter(Boolean)
  return {
    fds: server.fdCount(),
    threads: field('Threads'),
    rssKiB: field('VmRSS'),
    // only this campaign's pods: other netns on the machine come and go
    netns: netnsNames().filter((n) => n.startsWith('tmch')).length,
    links: node.nodeLinks().length,
    leases: node.allLeases().length,
    stateFiles: existsSync(server.stateDir) ? readdirSync(server.stateDir).length : 0,
    cniCache: existsSync(join(server.stateDir, 'cni')) ? readdirSync(join(server.stateDir, 'cni')).length : 0,
    nftTables: nft.length,
  }
}

async function served(server: ServerProcess, key: string): Promise<boolean> {
  try {
    const { fds } = await server.client().getFDs(key)
    const ok = fds.length === 1 && tapFdInfo(fds[0]).name === 'tap0'
    for (const fd of fds) closeSync(fd)
    return ok
  } catch {
    return false
  }
}

function lsKeys(server: ServerProcess): Map<string, string> {
  const ls = JSON.parse(runCli(['ls', '--state-dir', server.stateDir, '--json']).stdout) as { keys: { key: string; state: string }[] }
  return new Map(ls.keys.map((k) => [k.key, k.state]))
}

/** A minimal wire fuzzer (used when __test__/helpers/wirefuzz.ts is absent): returns the frames sent. */
async function minimalWireFuzz(socketPath: string, frames: number, seed: number): Promise<number> {
  const r = prng(seed)
  const int = (n: number) => Math.floor(r() * n)
  let sent = 0
  const batch = 2000
  while (sent < frames) {
    const n = Math.min(batch, frames - sent)
    await new Promise<void>((resolve) => {
      const s = connect(socketPath)
      s.on('error', () => resolve())
      s.on('close', () => resolve())
      s.on('data', () => undefined)
      s.on('connect', () => {
        const bufs: Buffer[] = []
        for (let i = 0; i < n; i++) {
          // Virtlet's header: command, key (64 bytes), data size; then data. Mutated at random.
          const h = Buffer.alloc(4 + 64 + 4)
          h[0] = [0, 1, 2, 3, int(256)][int(5)]
          for (let j = 4; j < 4 + int(64); j++) h[j] = 32 + int(95)
          h.writeUInt32LE(r() < 0.8 ? int(64) : int(2 ** 32), 68)
          const body = Buffer.from(Array.from({ length: int(64) }, () => int(256)))
          bufs.push(r() < 0.1 ? h.subarray(0, int(h.length)) : Buffer.concat([h, body]))
        }
        s.end(Buffer.concat(bufs))
        setTimeout(() => s.destroy(), 2000).unref()
      })
    })
    sent += n
  }
  return sent
}

async function wireFuzz(socketPath: string, frames: number, seed: number): Promise<{ sent: number; via: string }> {
  const helper = join(process.cwd(), '__test__', 'helpers', 'wirefuzz.ts')
  if (existsSync(helper)) {
    const mod = (await import(helper)) as { runWireFuzz?: (o: { socketPath: string; frames: number; seed: number }) => Promise<unknown> }
    if (mod.runWireFuzz) {
      await mod.runWireFuzz({ socketPath, frames, seed })
      return { sent: frames, via: 'wirefuzz.ts' }
    }
  }
  return { sent: await minimalWireFuzz(socketPath, frames, seed), via: 'minimal' }
}

function diff(a: Record<string, number>, b: Record<string, number>, slack: Record<string, number> = {}): string[] {
  return Object.keys(a).filter((k) => b[k] - a[k] > (slack[k] ?? 0)).map((k) => `${k} ${a[k]} -> ${b[k]}`)
}

async function main(): Promise<void> {
  const node = new CniTestNode('tmchaos')
  node.writeConf('10-bridge.conflist', node.bridgeConflist({ subnet: '10.90.0.0/16', bridge: 'tmchbr0' }))
  const server = new ServerProcess(node)
  const pods = new Set<string>()
  const podId = () => {
    const id = node.podId('tmch')
    pods.add(id)
    return id
  }
  try {
    await server.start()
    const client = server.client()
    // prime: the bridge and what stays once it exists
    const prime = podId()
    await client.addFDs('prime', addPayload(prime))
    await client.releaseFDs('prime')

    // 1. wire frames
    {
      const anchor = podId()
      await client.addFDs('anchor', addPayload(anchor))
      const before = resources(node, server)
      const t0 = Date.now()
      const { sent, via } = await wireFuzz(server.socket, SIZES.wire, SEED)
      const secs = (Date.now() - t0) / 1000
      await sleep(500)
      const alive = await client.isRunning()
      const ok = alive && (await served(server, 'anchor'))
      const after = resources(node, server)
      const leaks = diff(before, after, { rssKiB: 64 * 1024, threads: 4, fds: 2 })
      rows.push({
        campaign: `wire frames (${via})`,
        size: sent,
        figures: `${Math.round(sent / secs)} frames/s; RSS ${before.rssKiB}->${after.rssKiB} KiB; fds ${before.fds}->${after.fds}`,
        ok: ok && leaks.length === 0,
        problem: !ok ? 'server down or anchor key lost' : leaks.join(', '),
      })
      await client.releaseFDs('anchor')
    }

    // 2. DHCP packets into a pod's tap
    if (SIZES.dhcp > 0) {
      const id = podId()
      const csn = JSON.parse((await client.addFDs('dhcp', addPayload(id))).toString())
      const mac = (csn.Result.interfaces as { name: string; mac: string; sandbox?: string }[]).find((i) => i.name === 'eth0' && i.sandbox)!.mac
      const before = resources(node, server)
      const { fds } = await client.getFDs('dhcp')
      const vm = new FakeVm()
      let problem = ''
      let figures = ''
      try {
        const t0 = Date.now()
        let written = 0
        for (let done = 0; done < SIZES.dhcp; done += 50_000) {
          written += runDhcpFuzz(fds[0], { seed: SEED + done, count: Math.min(50_000, SIZES.dhcp - done), mac })
          await sleep(1)
        }
        const secs = (Date.now() - t0) / 1000
        await vm.attach(fds[0], mac, 1500)
        const lease = await vm.dhcpcd().catch((e: Error) => ({ error: e.message }) as Record<string, string>)
        if (!lease.new_ip_address) problem = `no lease after the fuzz: ${lease.error}`
        figures = `${written} written, ${Math.round(written / secs)} pkts/s; lease after: ${lease.new_ip_address ?? 'none'}`
      } finally {
        for (const fd of fds) closeSync(fd)
        vm.cleanup()
      }
      const after = resources(node, server)
      figures += `; RSS ${before.rssKiB}->${after.rssKiB} KiB, fds ${before.fds}->${after.fds}`
      const leaks = diff(before, after, { rssKiB: 64 * 1024, threads: 4, fds: 4 })
      if (leaks.length) problem = [problem, ...leaks].filter(Boolean).join(', ')
      await client.releaseFDs('dhcp')
      rows.push({ campaign: 'DHCP packets into a tap', size: SIZES.dhcp, figures, ok: !problem, problem })
    }

    // 3. leak cycles
    if (SIZES.cycles > 0) {
      const before = resources(node, server)
      const t0 = Date.now()
      let failures = 0
      for (let i = 0; i < SIZES.cycles; i++) {
        const id = node.podId('tmchc')
        try {
          await client.addFDs(`c${i}`, addPayload(id))
          const { fds } = await client.getFDs(`c${i}`)
          for (const fd of fds) closeSync(fd)
          await client.releaseFDs(`c${i}`)
        } catch (e) {
          failures++
          console.error(`cycle ${i}: ${(e as Error).message}`)
          pods.add(id)
        }
      }
      const secs = (Date.now() - t0) / 1000
      await sleep(200)
      const after = resources(node, server)
      const leaks = diff(before, after, { rssKiB: 32 * 1024, threads: 4 })
      rows.push({
        campaign: 'add/get/release cycles',
        size: SIZES.cycles,
        figures: `${(secs / SIZES.cycles * 1000).toFixed(0)} ms/cycle; ${Object.entries(before).map(([k, v]) => `${k} ${v}->${after[k]}`).join(', ')}`,
        ok: failures === 0 && leaks.length === 0,
        problem: [failures ? `${failures} failed cycles` : '', ...leaks].filter(Boolean).join(', '),
      })
    }

    // 4. kill -9 at random points of an add, with live pods
    if (SIZES.kills > 0) {
      const live = ['l0', 'l1', 'l2']
      for (const k of live) await client.addFDs(k, addPayload(podId()))
      // how long an add takes here, to spread the kills over it
      const probe = podId()
      const t0 = Date.now()
      await client.addFDs('probe', addPayload(probe))
      const addMs = Date.now() - t0
      await client.releaseFDs('probe')
      let readyAfter = 0
      let cleaned = 0
      const problems: string[] = []
      const leasesBase = node.allLeases().length
      for (let i = 0; i < SIZES.kills; i++) {
        const id = podId()
        const key = `v${i}`
        const adding = client.addFDs(key, addPayload(id)).then(
          () => true,
          () => false,
        )
        await sleep(Math.floor(rand() * addMs * 2))
        await server.kill9()
        await adding
        killNetnsProcesses(node.name, [])
        await server.start()
        for (const k of live) if (!(await served(server, k))) problems.push(`kill ${i}: live key ${k} lost`)
        const ls = lsKeys(server)
        const isServed = await served(server, key)
        if (isServed) {
          readyAfter++
          if (ls.get(key) !== 'ready') problems.push(`kill ${i}: ${key} served but ls says ${ls.get(key)}`)
          await client.releaseFDs(key)
        } else {
          cleaned++
          if (ls.has(key)) problems.push(`kill ${i}: ${key} stuck as ${ls.get(key)}`)
          if (netnsNames().includes(id)) problems.push(`kill ${i}: ${key} left its netns`)
        }
        const lsNow = [...lsKeys(server).keys()].sort()
        if (lsNow.join() !== live.join()) problems.push(`kill ${i}: ls ${lsNow.join(',')} != served ${live.join(',')}`)
        if (node.allLeases().length !== leasesBase) problems.push(`kill ${i}: leases ${node.allLeases().length} != ${leasesBase}`)
        if (problems.length > 5) break
      }
      for (const k of live) await client.releaseFDs(k).catch(() => undefined)
      rows.push({
        campaign: 'kill -9 during an add (3 live pods)',
        size: SIZES.kills,
        figures: `add ~${addMs} ms; interrupted add ready after restart ${readyAfter}, fully cleaned ${cleaned}`,
        ok: problems.length === 0,
        problem: problems.slice(0, 3).join('; '),
      })
    }

    // 5. live pods, kill -9, automatic recovery
    if (SIZES.live > 0) {
      const keys = Array.from({ length: SIZES.live }, (_, i) => `p${i}`)
      const t0 = Date.now()
      for (let i = 0; i < keys.length; i += 10) await Promise.all(keys.slice(i, i + 10).map((k) => client.addFDs(k, addPayload(podId()))))
      const addSecs = (Date.now() - t0) / 1000
      await server.kill9()
      const t1 = Date.now()
      await server.start()
      const recoverSecs = (Date.now() - t1) / 1000
      const lost: string[] = []
      for (const k of keys) if (!(await served(server, k))) lost.push(k)
      const after = resources(node, server)
      for (let i = 0; i < keys.length; i += 10) await Promise.all(keys.slice(i, i + 10).map((k) => client.releaseFDs(k).catch(() => undefined)))
      rows.push({
        campaign: 'live pods, kill -9, recovery',
        size: SIZES.live,
        figures: `added in ${addSecs.toFixed(1)} s; restart+recovery ${recoverSecs.toFixed(1)} s; server ${after.threads} threads, ${after.fds} fds, RSS ${after.rssKiB} KiB`,
        ok: lost.length === 0,
        problem: lost.length ? `${lost.length} keys lost (${lost.slice(0, 5).join(',')})` : undefined,
      })
    }

    // the end: nothing left
    const end = resources(node, server)
    const left = node.allLeases().length + end.stateFiles - (existsSync(join(server.stateDir, 'cni')) ? 1 : 0) - readdirSync(server.stateDir).filter((f) => f.endsWith('.corrupt')).length
    rows.push({ campaign: 'after everything', size: 0, figures: Object.entries(end).map(([k, v]) => `${k} ${v}`).join(', '), ok: left === 0, problem: `${left} leases/records left` })
    await server.stop()
  } finally {
    server.cleanup()
    killNetnsProcesses(node.name)
    for (const id of pods) removeNetns(id)
    node.cleanup()
  }
  table()
  if (rows.some((r) => !r.ok)) process.exitCode = 1
}

main().catch((e) => {
  table()
  console.error(e)
  process.exitCode = 1
})
