/**
 * Part of the TapFDSource benchmark (bench/tapfd.ts): does a pod's add and release cost grow with the number of
 * live pods, and how long does recovery of them all take at start?
 *
 * The real daemon (startDaemon: FDServer + TapFDSource + state store with fsyncs + CNI cache), in-process, with
 * Debian bridge + host-local run in a test "node" netns, pods in a temp netns dir. Add+release cycles of one
 * pod are measured with 0 live pods, then with N live pods (TAPFD_BENCH_SCALE_LIVE, default 250), then with 0
 * again after releasing them, each phase once the machine is quiet again (see `settle`). Each cycle is broken down into steps: netns create, CNI ADD (the plugins, and
 * the client's own work around them), container side, DHCP start, state writes (each an fsync of the file and
 * of the dir), and the rest ("other": protocol, JSON crossings, scheduling); release likewise. "ours" = add
 * minus the CNI ADD plugin time (and release minus CNI DEL). Then the daemon is stopped (netns and links stay)
 * and started again: the time recovery of the N pods takes, and the peak thread count while it runs.
 * Prints figures; asserts nothing. Needs root.
 */
import { readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import type { CniClient } from '../../src/cni'
import { FDClient } from '../../src/client'
import { startDaemon, type Daemon } from '../../src/daemon'
import { DEFAULT_NETNS_POOL } from '../../src/defaults'
import { nativePodNetworkOps, type PodNetworkOps } from '../../src/podnetwork'
import { StateStore } from '../../src/state'
import { TapFdHarness } from './tapfd'
import { addPayload } from './serve'

/** Step times of the current cycle (ms), by step name; reset per cycle. */
let cycle: Map<string, number> | null = null

/** Every step time while the daemon recovers (ms), by step name. */
let recovering: Map<string, number[]> | null = null

function note(step: string, ms: number): void {
  if (cycle) cycle.set(step, (cycle.get(step) ?? 0) + ms)
  if (recovering) recovering.set(step, [...(recovering.get(step) ?? []), ms])
}

async function timed<T>(step: string, fn: () => Promise<T>): Promise<T> {
  const s = performance.now()
  try {
    return await fn()
  } finally {
    note(step, performance.now() - s)
  }
}

const ops: PodNetworkOps = {
  ...nativePodNetworkOps,
  createNetns: (p) => timed('netns create', () => nativePodNetworkOps.createNetns(p)),
  deleteNetns: (p) => timed('netns delete', () => nativePodNetworkOps.deleteNetns(p)),
  setupContainerSide: (p, r, o) => timed('container side', () => nativePodNetworkOps.setupContainerSide(p, r, o)),
  teardownContainerSide: (p, c, o) => timed('teardown', () => nativePodNetworkOps.teardownContainerSide(p, c, o)),
  recoverContainerSide: (p, c) => timed('recover container side', () => nativePodNetworkOps.recoverContainerSide(p, c)),
  startDhcpServer: async (p, c, parsed) => {
    const h = await timed('DHCP start', () => nativePodNetworkOps.startDhcpServer(p, c, parsed))
    return { stop: () => timed('DHCP stop', () => h.stop()) }
  },
}

function timedCni(inner: CniClient): CniClient {
  return {
    addSandboxToNetwork: (...a) => timed('CNI ADD', () => inner.addSandboxToNetwork(...a)),
    removeSandboxFromNetwork: (...a) => timed('CNI DEL', () => inner.removeSandboxFromNetwork(...a)),
    checkSandboxNetwork: (...a) => inner.checkSandboxNetwork(...a),
    getDummyNetwork: () => inner.getDummyNetwork(),
  }
}

// State writes and removes (each fsyncs the record and the dir), timed where the daemon calls them.
const proto = StateStore.prototype as unknown as Record<string, (...a: unknown[]) => Promise<unknown>>
for (const [method, step] of [['write', 'state write'], ['remove', 'state remove'], ['list', 'state list']] as const) {
  const orig = proto[method]
  proto[method] = function (this: unknown, ...a: unknown[]) {
    return timed(step, () => orig.apply(this, a))
  }
}

const ADD_STEPS = ['netns create', 'CNI ADD', 'container side', 'DHCP start', 'state write']
const REL_STEPS = ['DHCP stop', 'teardown', 'CNI DEL', 'netns delete', 'state remove']

interface Phase {
  add: number[]
  release: number[]
  steps: Map<string, number[]>
}

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b)
  return s.length ? s[Math.min(s.length - 1, Math.floor(s.length * p))] : NaN
}

const med = (xs: number[] | undefined) => pct(xs ?? [], 0.5)

async function cycles(client: FDClient, h: TapFdHarness, n: number): Promise<Phase> {
  const phase: Phase = { add: [], release: [], steps: new Map() }
  const keep = (m: Map<string, number>, prefix: string) => {
    for (const [k, v] of m) {
      const name = `${prefix}${k}`
      phase.steps.set(name, [...(phase.steps.get(name) ?? []), v])
    }
  }
  for (let i = -2; i < n; i++) {
    const id = h.node.podId('tmsc')
    cycle = new Map()
    let s = performance.now()
    await client.addFDs(id, addPayload(id))
    const add = performance.now() - s
    const addSteps = cycle
    cycle = new Map()
    s = performance.now()
    await client.releaseFDs(id)
    const release = performance.now() - s
    const relSteps = cycle
    cycle = null
    if (i < 0) continue // warm-up
    phase.add.push(add)
    phase.release.push(release)
    addSteps.set('other', add - ADD_STEPS.reduce((a, k) => a + (addSteps.get(k) ?? 0), 0))
    relSteps.set('other', release - REL_STEPS.reduce((a, k) => a + (relSteps.get(k) ?? 0), 0))
    addSteps.set('ours', add - (addSteps.get('CNI ADD') ?? 0))
    relSteps.set('ours', release - (relSteps.get('CNI DEL') ?? 0))
    keep(addSteps, 'add: ')
    keep(relSteps, 'release: ')
  }
  return phase
}

/** Busy and total CPU time of the machine so far (/proc/stat, clock ticks). */
function cpuTicks(): { busy: number; total: number } {
  const f = readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number)
  const total = f.reduce((a, b) => a + b, 0)
  return { busy: total - f[3] - (f[4] ?? 0), total }
}

/** Whether a kernel worker is tearing down deleted network namespaces now (a kworker named `...+netns`). */
function netnsCleanupRunning(): boolean {
  for (const pid of readdirSync('/proc')) {
    if (!/^\d+$/.test(pid)) continue
    try {
      if (readFileSync(`/proc/${pid}/comm`, 'utf8').includes('+netns')) return true
    } catch {
      // gone meanwhile
    }
  }
  return false
}

/**
 * Waits until the machine is quiet (no kernel worker tearing down namespaces, and under 15% of its CPU time
 * busy over 250 ms, twice in a row; at most 30 s) and returns how long that took. The kernel finishes the work
 * of bulk adds and releases asynchronously: a deleted netns is torn down by a kernel worker, holding the rtnl
 * lock every netlink change waits for (seconds for hundreds, mostly asleep in RCU waits, so the CPU looks
 * idle). That would land in the cycles measured next and is not a cost of one pod's add.
 */
async function settle(): Promise<number> {
  const t0 = performance.now()
  let quiet = 0
  while (quiet < 2 && performance.now() - t0 < 30_000) {
    const a = cpuTicks()
    await new Promise((r) => setTimeout(r, 250))
    const b = cpuTicks()
    const idle = b.total > a.total && (b.busy - a.busy) / (b.total - a.total) < 0.15
    quiet = idle && !netnsCleanupRunning() ? quiet + 1 : 0
  }
  return performance.now() - t0
}

function threads(): number {
  return Number(/^Threads:\s+(\d+)$/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1] ?? NaN)
}

export async function scaling(): Promise<void> {
  const live = Number(process.env.TAPFD_BENCH_SCALE_LIVE ?? 250)
  const n = Number(process.env.TAPFD_BENCH_SCALE_CYCLES ?? 20)
  // spare netns made ahead, as `serve` keeps by default (TAPFD_BENCH_NETNS_POOL=0: each add makes its own)
  const netnsPool = Number(process.env.TAPFD_BENCH_NETNS_POOL ?? DEFAULT_NETNS_POOL)
  const h = new TapFdHarness()
  h.node.writeConf('10-bridge.conflist', h.node.bridgeConflist({ subnet: '10.81.0.0/16' }))
  h.cni = h.cniClient()
  await h.prime()
  const stateDir = join(h.node.dir, 'state')
  const sock = join(h.node.dir, 'scale.sock')
  const start = (recoveryConcurrency?: number) =>
    startDaemon({ socketPath: sock, stateDir, netnsDir: h.netnsDir, cni: timedCni(h.cniClient()), ops, recoveryConcurrency, netnsPool })
  const concs = (process.env.TAPFD_BENCH_RECOVERY_CONC ?? '8,64').split(',').map(Number)
  let daemon: Daemon | null = await start()
  const client = new FDClient(sock)
  const ids: string[] = []
  try {
    const settled: number[] = [await settle()]
    const before = await cycles(client, h, n)
    for (let i = 0; i < live; i++) ids.push(h.node.podId('tmsl'))
    let t = performance.now()
    for (let i = 0; i < ids.length; i += 8) await Promise.all(ids.slice(i, i + 8).map((id) => client.addFDs(id, addPayload(id))))
    const upMs = performance.now() - t
    settled.push(await settle())
    const at = await cycles(client, h, n)

    // Recovery: stop (netns, links and state stay), start again; sample this process's threads meanwhile. Once
    // per recovery concurrency.
    const recoveries: string[] = []
    for (const conc of concs) {
      await daemon!.close()
      daemon = null
      const idleThreads = threads()
      let peak = idleThreads
      let sampling = true
      const sampler = (async () => {
        while (sampling) {
          peak = Math.max(peak, threads())
          await new Promise((r) => setImmediate(r))
        }
      })()
      recovering = new Map()
      t = performance.now()
      daemon = await start(conc)
      const recoverMs = performance.now() - t
      const steps = recovering
      recovering = null
      sampling = false
      await sampler
      const per = [...steps].map(([k, v]) => `${k} p50 ${med(v).toFixed(1)} ms`).join(', ')
      recoveries.push(
        `  concurrency ${String(conc).padStart(3)}: ${daemon.recovery.recovered.length} pods in ${recoverMs.toFixed(0)} ms (start to serving); ` +
          `threads ${idleThreads} before, peak ${peak}; per pod: ${per}`,
      )
    }

    t = performance.now()
    for (let i = 0; i < ids.length; i += 8) await Promise.all(ids.slice(i, i + 8).map((id) => client.releaseFDs(id)))
    const downMs = performance.now() - t
    ids.length = 0
    settled.push(await settle())
    const after = await cycles(client, h, n)

    const load = readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')
    console.log(
      `\nlive pods: add/release of one pod (Debian bridge + host-local, real daemon with state) with 0, ${live}, then 0 live pods; ` +
        `${n} cycles each, p50 in ms; spare netns pool ${netnsPool}; load average ${load}; ` +
        `before each phase the machine was let settle (namespace teardown done, under 15% CPU busy): ${settled.map((ms) => (ms / 1000).toFixed(1)).join(' / ')} s`,
    )
    const phases: Array<[string, Phase]> = [['0 live', before], [`${live} live`, at], ['0 again', after]]
    const w = 26
    console.log(`${'step'.padEnd(w)}${phases.map(([name]) => name.padStart(10)).join('')}   ${live} live / 0 live`)
    const rows = [
      'add: total', ...ADD_STEPS.map((s) => `add: ${s}`), 'add: other', 'add: ours',
      'release: total', ...REL_STEPS.map((s) => `release: ${s}`), 'release: other', 'release: ours',
    ]
    for (const row of rows) {
      const get = (p: Phase) => (row === 'add: total' ? p.add : row === 'release: total' ? p.release : p.steps.get(row))
      const vals = phases.map(([, p]) => med(get(p)))
      if (vals.every((v) => Number.isNaN(v))) continue
      const ratio = vals[1] / vals[0]
      console.log(`${row.padEnd(w)}${vals.map((v) => v.toFixed(2).padStart(10)).join('')}   ${Number.isFinite(ratio) ? ratio.toFixed(2) : '-'}`)
    }
    console.log('("ours" = total minus the CNI plugins; "other" = protocol, JSON crossings, scheduling: total minus the steps above)')
    console.log(
      `${live} pods added (8 at a time) in ${(upMs / 1000).toFixed(1)} s, released in ${(downMs / 1000).toFixed(1)} s; ` +
        `recovery at start of ${live} live pods (threads of this process):`,
    )
    for (const r of recoveries) console.log(r)
  } finally {
    for (let i = 0; i < ids.length; i += 8) {
      await Promise.all(ids.slice(i, i + 8).map((id) => client.releaseFDs(id).catch(() => undefined)))
    }
    await daemon?.close().catch(() => undefined)
    await h.cleanup()
  }
}
