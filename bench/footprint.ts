/**
 * `npm run bench` part: the resource footprint of `tapmanager serve`, for the DaemonSet's requests and limits.
 * Prints figures; asserts nothing.
 *
 * The real command line serves in a test node netns (Debian bridge + host-local, as in __test__/cli-e2e), with
 * the metrics endpoint on. Measured from /proc/<pid>: RSS (VmRSS) and its peak (VmHWM) idle after start, with
 * FOOTPRINT_PODS live pods (default 30), and after releasing them; CPU time (utime + stime) of the server per add
 * (CNI plugins run in child processes and are not counted), per 1000 gets, per release, and while idle.
 * FOOTPRINT_METRICS=0 runs it without the metrics endpoint.
 */
import { closeSync, readFileSync } from 'node:fs'
import { CniTestNode } from '../__test__/helpers/cni'
import { addPayload, removeNetns, ServerProcess } from '../__test__/helpers/serve'

const PODS = Number(process.env.FOOTPRINT_PODS ?? 30)
const TICK = 100 // USER_HZ on Linux

function rssKiB(pid: number): { rss: number; hwm: number } {
  const s = readFileSync(`/proc/${pid}/status`, 'utf8')
  const get = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(s)?.[1] ?? NaN)
  return { rss: get('VmRSS'), hwm: get('VmHWM') }
}

function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  return (Number(f[11]) + Number(f[12])) / TICK
}

const mib = (kib: number) => `${(kib / 1024).toFixed(1)} MiB`

async function main(): Promise<void> {
  const node = new CniTestNode('tmfp')
  node.writeConf('10-bridge.conflist', node.bridgeConflist({ subnet: '10.74.0.0/22', bridge: 'tmfpbr0' }))
  const metricsOn = process.env.FOOTPRINT_METRICS !== '0'
  const server = new ServerProcess(node, [...(metricsOn ? ['--metrics-listen', `${node.dir}/metrics.sock`] : []), '--log-level', 'warn'])
  const podIds: string[] = []
  try {
    await server.start()
    const pid = server.pid
    const client = server.client()
    await new Promise((r) => setTimeout(r, 2000)) // let start-up settle before the idle figures (a measurement, not a wait for a condition)
    const idle = rssKiB(pid)
    let c0 = cpuSeconds(pid)
    await new Promise((r) => setTimeout(r, 10_000))
    const idleCpu = (cpuSeconds(pid) - c0) / 10
    c0 = cpuSeconds(pid)
    const t0 = Date.now()
    for (let i = 0; i < PODS; i++) {
      const podId = node.podId('tmfpp')
      podIds.push(podId)
      await client.addFDs(`fp-${i}`, addPayload(podId))
    }
    const addWall = (Date.now() - t0) / PODS
    const addCpu = (cpuSeconds(pid) - c0) / PODS
    const loaded = rssKiB(pid)
    c0 = cpuSeconds(pid)
    const GETS = 1000
    for (let i = 0; i < GETS; i++) for (const fd of (await client.getFDs(`fp-${i % PODS}`)).fds) closeFd(fd)
    const getCpu = ((cpuSeconds(pid) - c0) * 1000) / GETS
    const afterGets = rssKiB(pid)
    c0 = cpuSeconds(pid)
    for (let i = 0; i < PODS; i++) await client.releaseFDs(`fp-${i}`)
    const relCpu = (cpuSeconds(pid) - c0) / PODS
    const released = rssKiB(pid)
    console.log(`tapmanager serve footprint (${PODS} pods, Debian bridge + host-local, metrics ${metricsOn ? 'on' : 'off'})`)
    console.log(`| what | figure |`)
    console.log(`|---|---|`)
    console.log(`| RSS idle after start | ${mib(idle.rss)} |`)
    console.log(`| RSS with ${PODS} live pods | ${mib(loaded.rss)} (${((loaded.rss - idle.rss) / PODS).toFixed(0)} KiB per pod) |`)
    console.log(`| RSS after ${GETS} gets | ${mib(afterGets.rss)} |`)
    console.log(`| RSS after releasing them all | ${mib(released.rss)} |`)
    console.log(`| peak RSS (VmHWM) | ${mib(released.hwm)} |`)
    console.log(`| CPU idle | ${(idleCpu * 1000).toFixed(1)} ms/s |`)
    console.log(`| CPU per add (server only) | ${(addCpu * 1000).toFixed(1)} ms (wall ${addWall.toFixed(0)} ms incl. CNI) |`)
    console.log(`| CPU per 1000 gets | ${(getCpu * 1000).toFixed(0)} ms |`)
    console.log(`| CPU per release (server only) | ${(relCpu * 1000).toFixed(1)} ms |`)
    await server.stop('SIGTERM')
  } finally {
    server.cleanup()
    for (const p of podIds) removeNetns(p)
    node.cleanup()
  }
}

function closeFd(fd: number): void {
  closeSync(fd)
}

main().catch((err) => {
  console.error(err)
  process.exit(1)
})
