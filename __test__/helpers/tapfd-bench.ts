/**
 * The TapFDSource benchmark (entry point: bench/tapfd.ts, `npm run bench`): TapFDSource add/release through FDClient -> FDServer -> TapFDSource, as root, in a test
 * "node" netns (nothing touches the machine's network). Prints figures; asserts nothing.
 *
 * Plugins:
 * - "no-op": a minimal sh plugin (written to a temp dir) that creates the pod's veth with `ip` and prints a
 *   fixed result; its own run time (CNI, measured around the CNI client) is printed apart, so "ours" is the
 *   cost of TapFDSource itself: netns, container side (MAC swap, tap, bridge, isolation), DHCP server bound.
 * - "bridge": Debian's bridge + host-local, the real main path.
 * At 1 and 8 concurrent pods: AddFDs and ReleaseFDs latency per pod (p50/p90/max), pods added per second;
 * then memory per live pod in this process (RSS and JS heap over N live pods). Virtlet's floor for an add is
 * 500 ms (it slept that long for its DHCP server to start).
 */
import { chmodSync, mkdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { runInNewContext } from 'node:vm'
import { setFlagsFromString } from 'node:v8'
import { closeFd } from '../../src/index'
import type { CniClient } from '../../src/cni'
import { nativePodNetworkOps, type PodNetworkOps } from '../../src/podnetwork'
import { TapFdHarness } from './tapfd'
import { scaling } from './tapfd-scale-bench'

setFlagsFromString('--expose_gc')
const gc = runInNewContext('gc') as () => void

const VIRTLET_FLOOR_MS = 500

/** ADD: a veth (host side in the node netns, `eth0` in the pod with its address), then a fixed result. */
const VETH_PLUGIN = `#!/bin/sh
# tmbenchveth: the cheapest plugin that leaves a real link in the pod. Address from <stateDir>/<CNI_CONTAINERID>.
conf=$(cat)
d=\${conf#*\\"stateDir\\":\\"}; d=\${d%%\\"*}
h=v\${CNI_CONTAINERID#tmb}
case "$CNI_COMMAND" in
ADD)
  read -r addr < "$d/$CNI_CONTAINERID" || exit 1
  ip link add "$h" type veth peer name "$CNI_IFNAME" netns "$CNI_NETNS" || exit 1
  ip link set "$h" up
  printf 'addr add %s dev %s\\nlink set %s up\\n' "$addr" "$CNI_IFNAME" "$CNI_IFNAME" | nsenter --net="$CNI_NETNS" ip -batch - || exit 1
  mac=$(cat "/sys/class/net/$h/address")
  printf '{"cniVersion":"1.0.0","interfaces":[{"name":"%s","mac":"%s"},{"name":"%s","sandbox":"%s"}],"ips":[{"address":"%s","interface":1}],"routes":[],"dns":{}}' "$h" "$mac" "$CNI_IFNAME" "$CNI_NETNS" "$addr"
  ;;
DEL) ip link del "$h" 2>/dev/null; exit 0 ;;
VERSION) echo '{"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0"]}' ;;
*) exit 0 ;;
esac
`

interface Timings {
  add: number[]
  release: number[]
  cniAdd: number[]
  cniDel: number[]
  wallAddMs: number
  pods: number
}

/** Wraps a CNI client to time its ADD and DEL (the plugins' cost). */
function timedCni(inner: CniClient, t: { cniAdd: number[]; cniDel: number[] }): CniClient {
  return {
    addSandboxToNetwork: async (...a) => {
      const s = performance.now()
      const r = await inner.addSandboxToNetwork(...a)
      t.cniAdd.push(performance.now() - s)
      return r
    },
    removeSandboxFromNetwork: async (...a) => {
      const s = performance.now()
      await inner.removeSandboxFromNetwork(...a)
      t.cniDel.push(performance.now() - s)
    },
    checkSandboxNetwork: (...a) => inner.checkSandboxNetwork(...a),
    getDummyNetwork: () => inner.getDummyNetwork(),
  }
}

/** Per-operation times of the native operations (ms), by name. */
const opTimes = new Map<string, number[]>()

async function timed<T>(name: string, fn: () => Promise<T>): Promise<T> {
  const s = performance.now()
  try {
    return await fn()
  } finally {
    const xs = opTimes.get(name) ?? []
    xs.push(performance.now() - s)
    opTimes.set(name, xs)
  }
}

/** The native operations, timed. */
const timedOps: PodNetworkOps = {
  ...nativePodNetworkOps,
  createNetns: (p) => timed('createNetns', () => nativePodNetworkOps.createNetns(p)),
  deleteNetns: (p) => timed('deleteNetns', () => nativePodNetworkOps.deleteNetns(p)),
  setupContainerSide: (p, r, o) => timed('setupContainerSide', () => nativePodNetworkOps.setupContainerSide(p, r, o)),
  teardownContainerSide: (p, c, o) => timed('teardownContainerSide', () => nativePodNetworkOps.teardownContainerSide(p, c, o)),
  startDhcpServer: async (p, c, parsed) => {
    const h = await timed('startDhcpServer', () => nativePodNetworkOps.startDhcpServer(p, c, parsed))
    return { stop: () => timed('dhcp stop', () => h.stop()) }
  },
}

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.floor(s.length * p))]
}

const f = (ms: number) => ms.toFixed(1).padStart(7)

type Kind = 'noop' | 'bridge'

async function harness(kind: Kind, t: { cniAdd: number[]; cniDel: number[] }): Promise<{ h: TapFdHarness; addressFor: (podId: string) => void }> {
  const h = new TapFdHarness({ source: { ops: timedOps } })
  let n = 0
  let addressFor = (_podId: string) => undefined as void
  if (kind === 'noop') {
    const bin = join(h.node.dir, 'bin')
    const state = join(h.node.dir, 'veth')
    mkdirSync(bin)
    mkdirSync(state)
    writeFileSync(join(bin, 'tmbenchveth'), VETH_PLUGIN)
    chmodSync(join(bin, 'tmbenchveth'), 0o755)
    h.node.writeConf('10-veth.conf', JSON.stringify({ cniVersion: '1.0.0', name: 'veth', type: 'tmbenchveth', stateDir: state }))
    addressFor = (podId) => {
      n++
      writeFileSync(join(state, podId), `10.1.${n >> 8}.${n & 255}/16\n`)
    }
    h.binDirs.unshift(bin)
  } else {
    h.node.writeConf('10-bridge.conflist', h.node.bridgeConflist({ subnet: '10.80.0.0/16' }))
  }
  h.wrapCni = (c) => timedCni(c, t)
  await h.start()
  if (kind === 'bridge') await h.prime()
  return { h, addressFor }
}

async function run(kind: Kind, concurrency: number, rounds: number): Promise<Timings> {
  const t: Timings = { add: [], release: [], cniAdd: [], cniDel: [], wallAddMs: 0, pods: 0 }
  const { h, addressFor } = await harness(kind, t)
  try {
    // warm-up round (first netlink use, first plugin exec), not counted
    for (let r = -1; r < rounds; r++) {
      const ids = Array.from({ length: concurrency }, () => h.node.podId('tmb'))
      ids.forEach(addressFor)
      const mark = { add: t.add.length, release: t.release.length, cniAdd: t.cniAdd.length, cniDel: t.cniDel.length }
      const wall = performance.now()
      await Promise.all(
        ids.map(async (id) => {
          const s = performance.now()
          await h.add(id)
          t.add.push(performance.now() - s)
        }),
      )
      const wallAdd = performance.now() - wall
      for (const id of ids) {
        const { fds } = await h.client.getFDs(id)
        for (const fd of fds) closeFd(fd)
      }
      await Promise.all(
        ids.map(async (id) => {
          const s = performance.now()
          await h.client.releaseFDs(id)
          t.release.push(performance.now() - s)
        }),
      )
      if (r < 0) {
        t.add.length = mark.add
        t.release.length = mark.release
        t.cniAdd.length = mark.cniAdd
        t.cniDel.length = mark.cniDel
      } else {
        t.wallAddMs += wallAdd
        t.pods += ids.length
      }
    }
  } finally {
    await h.cleanup()
  }
  return t
}

async function memory(kind: Kind, pods: number): Promise<{ rssPerPod: number; heapPerPod: number; rss0: number }> {
  const t = { cniAdd: [] as number[], cniDel: [] as number[] }
  const { h, addressFor } = await harness(kind, t)
  try {
    // a first round of N adds and releases warms the allocator and the native runtime's pools
    const round = async (): Promise<string[]> => {
      const ids = Array.from({ length: pods }, () => h.node.podId('tmb'))
      ids.forEach(addressFor)
      for (let i = 0; i < ids.length; i += 8) await Promise.all(ids.slice(i, i + 8).map((id) => h.add(id)))
      return ids
    }
    const release = async (ids: string[]) => {
      for (let i = 0; i < ids.length; i += 8) await Promise.all(ids.slice(i, i + 8).map((id) => h.client.releaseFDs(id)))
    }
    await release(await round())
    gc()
    const rss0 = process.memoryUsage().rss
    const heap0 = process.memoryUsage().heapUsed
    const ids = await round()
    gc()
    const rss1 = process.memoryUsage().rss
    const heap1 = process.memoryUsage().heapUsed
    await release(ids)
    return { rssPerPod: (rss1 - rss0) / pods, heapPerPod: (heap1 - heap0) / pods, rss0 }
  } finally {
    await h.cleanup()
  }
}

export async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('bench/tapfd.ts needs root (it builds netns, veths, taps)')
  if (process.env.TAPFD_BENCH_ONLY === 'scale') return scaling()
  const rounds1 = Number(process.env.TAPFD_BENCH_ROUNDS ?? 30)
  console.log('TapFDSource: AddFDs / ReleaseFDs through FDClient -> FDServer -> TapFDSource (ms per pod)')
  console.log(`Virtlet's floor for an add: ${VIRTLET_FLOOR_MS} ms (it slept ${VIRTLET_FLOOR_MS} ms for its DHCP server)`)
  console.log('plugin   conc  pods | add p50   p90    max | of it CNI p50  ours p50 | release p50  p90 | of it CNI p50 | pods/s (adds)')
  for (const kind of ['noop', 'bridge'] as Kind[]) {
    for (const conc of [1, 8]) {
      const rounds = conc === 1 ? rounds1 : Math.max(3, Math.ceil(rounds1 / 8))
      const t = await run(kind, conc, rounds)
      const ours = t.add.map((a, i) => a - (t.cniAdd[i] ?? 0))
      console.log(
        `${kind.padEnd(8)} ${String(conc).padStart(4)} ${String(t.pods).padStart(5)} |${f(pct(t.add, 0.5))}${f(pct(t.add, 0.9))}${f(Math.max(...t.add))} |${f(pct(t.cniAdd, 0.5))}${f(pct(ours, 0.5))}     |${f(pct(t.release, 0.5))}${f(pct(t.release, 0.9))} |${f(pct(t.cniDel, 0.5))}       | ${(t.pods / (t.wallAddMs / 1000)).toFixed(1)}`,
      )
    }
  }
  console.log('("ours p50" = median of add latency minus its own CNI ADD time: the cost of TapFDSource itself)')
  console.log('native operations over all runs above (ms): p50 / p90')
  for (const [name, xs] of opTimes) console.log(`  ${name.padEnd(22)}${f(pct(xs, 0.5))} /${f(pct(xs, 0.9))}  (${xs.length})`)
  const n = Number(process.env.TAPFD_BENCH_LIVE ?? 100)
  const m = await memory('noop', n)
  console.log(
    `memory per live pod (no-op plugin, ${n} live pods, this process): RSS ${(m.rssPerPod / 1024).toFixed(1)} KiB, JS heap ${(m.heapPerPod / 1024).toFixed(1)} KiB (RSS before: ${(m.rss0 / 1048576).toFixed(1)} MiB)`,
  )
  await scaling()
}

