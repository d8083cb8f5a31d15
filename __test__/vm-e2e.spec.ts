/**
 * A real VM end to end: `tapmanager serve` in a test node netns (Debian bridge + host-local), a pod added over
 * the socket, and a QEMU guest (TCG) whose only NIC is the tap fd from FDClient.getFDs, started as Virtlet's
 * vmwrapper starts it: the fd inherited (fd 3), `-netdev tap,fd=3` and the MAC from the get info
 * (buildQemuNetArgs + spawnWithFds). The guest must lease the CNI-assigned address from tapmanager's DHCP
 * server, ping the node's gateway (the bridge's address in the node netns) and answer a ping from the node.
 * Then release, and nothing leaks. The second test does it after a server restart: the key is recovered by the
 * restarted server, and the VM started afterwards gets its fd through the retrieve path.
 */
import test from 'ava'
import { spawn } from 'node:child_process'
import { closeSync } from 'node:fs'
import { buildQemuNetArgs } from '../src/qemu'
import { interfaceInfoFromWire } from '../src/qemu'
import { CniTestNode } from './helpers/cni'
import { nsExec } from './helpers/env'
import { addPayload, netnsNames, removeNetns, ServerProcess } from './helpers/serve'
import { bootVm, vmAssets, type VmHandle } from './helpers/vm'

const BRIDGE = 'tmvebr0'

function setup(): { node: CniTestNode; server: ServerProcess } {
  vmAssets()
  const node = new CniTestNode('tmve')
  node.writeConf('10-bridge.conflist', node.bridgeConflist({ subnet: '10.73.0.0/24', bridge: BRIDGE }))
  return { node, server: new ServerProcess(node) }
}

function nodePing(node: CniTestNode, ip: string): boolean {
  for (let i = 0; i < 5; i++) {
    try {
      nsExec(node.name, '/bin/busybox', ['ping', '-c', '1', '-W', '2', ip])
      return true
    } catch {
      // try again (bounded)
    }
  }
  return false
}

interface CsnOut {
  Result: { ips: { address: string; gateway: string }[]; interfaces: { name: string; sandbox?: string }[] }
}

/**
 * tcpdump of DHCP and ICMP on a link of the node; `stop()` counts both (the ICMP count proves the capture sees
 * the VM's traffic, so a DHCP count of 0 means something).
 */
async function dhcpCapture(node: CniTestNode, link: string): Promise<{ stop(): Promise<{ dhcp: number; icmp: number }> }> {
  const filter = 'udp port 67 or udp port 68 or icmp'
  const proc = spawn('ip', ['netns', 'exec', node.name, 'tcpdump', '--immediate-mode', '-i', link, '-n', '-l', filter], { stdio: ['ignore', 'pipe', 'pipe'] })
  let err = ''
  let out = ''
  proc.stderr.setEncoding('utf8')
  proc.stderr.on('data', (d: string) => (err += d))
  proc.stdout.setEncoding('utf8')
  proc.stdout.on('data', (d: string) => (out += d))
  // 'close', not 'exit': the output may still be arriving when the process has exited
  const exited = new Promise<void>((resolve) => proc.once('close', () => resolve()))
  const deadline = Date.now() + 20_000
  while (!/listening on/.test(err)) {
    if (Date.now() > deadline || proc.exitCode !== null) throw new Error(`tcpdump did not start: ${err}`)
    await new Promise((r) => setTimeout(r, 20))
  }
  return {
    async stop() {
      // the VM has pinged when this is called: give its frames a bounded time to show up in the capture
      const until = Date.now() + 10_000
      while (!/ICMP echo/.test(out) && Date.now() < until) await new Promise((r) => setTimeout(r, 20))
      proc.kill('SIGINT')
      await exited
      if (!/packets? captured/.test(err)) throw new Error(`tcpdump did not finish: ${err}`)
      const lines = out.split('\n')
      return { dhcp: lines.filter((l) => /BOOTP|DHCP/.test(l)).length, icmp: lines.filter((l) => /ICMP echo/.test(l)).length }
    },
  }
}

/** Gets the key's fds, boots the VM on them as vmwrapper would, checks lease and pings both ways. */
async function vmOnPod(
  t: import('ava').ExecutionContext,
  node: CniTestNode,
  server: ServerProcess,
  key: string,
  cidr: string,
  gateway: string,
  hostVeth?: string,
): Promise<void> {
  const { fds, info } = await server.client().getFDs(key)
  const ifaces = interfaceInfoFromWire(info)
  t.is(ifaces.length, 1)
  let vm: VmHandle | undefined
  try {
    const netArgs = buildQemuNetArgs(ifaces, fds, 3)
    t.deepEqual(netArgs.slice(0, 2), ['-netdev', 'tap,id=tap0,fd=3'])
    // DHCP isolation: the VM's DHCP stays inside the pod (tapmanager answers there); none reaches the node.
    const capture = hostVeth ? await dhcpCapture(node, hostVeth) : undefined
    vm = bootVm({ mac: ifaces[0].mac, netArgs, fds, ping: gateway, stay: true })
    // the VM holds its own copy now; ours would keep the tap open after the VM stops
    for (const fd of fds.splice(0)) closeSync(fd)
    t.is(await vm.linkMac(), ifaces[0].mac)
    const lease = await vm.lease()
    const ms = Number(process.hrtime.bigint() - vm.startedAt) / 1e6
    t.log(`${key}: QEMU start to DHCP lease ${Math.round(ms)} ms: ${JSON.stringify(lease)}`)
    t.is(`${lease.ip}/${lease.mask}`, cidr, 'the guest leased the CNI-assigned address')
    t.is(lease.router, gateway)
    const ping = await vm.pingResult()
    t.true(ping.ok, `the guest pinged the gateway ${gateway} (${ping.tries} tries)`)
    if (capture) {
      const seen = await capture.stop()
      t.is(seen.dhcp, 0, `no DHCP frame on the node's ${hostVeth}`)
      t.true(seen.icmp > 0, `the capture saw the VM's pings on ${hostVeth}`)
    }
    await vm.ready()
    t.true(nodePing(node, lease.ip), 'the node pings the guest')
  } finally {
    for (const fd of fds) closeSync(fd)
    await vm?.kill()
  }
}

test.serial('a QEMU guest on the tap fd from getFDs leases the CNI address, pings the gateway, is reachable; release leaks nothing', async (t) => {
  const { node, server } = setup()
  const podId = node.podId('tmvep')
  try {
    const before = node.snapshot()
    const netnsBefore = netnsNames()
    await server.start()
    const fdsIdle = server.fdCount()
    const t0 = Date.now()
    const csn = JSON.parse((await server.client().addFDs('vm1', addPayload(podId))).toString()) as CsnOut
    t.log(`add: ${Date.now() - t0} ms`)
    const { address, gateway } = csn.Result.ips[0]
    t.is(gateway, '10.73.0.1')
    // the gateway is the bridge's address in the node netns
    t.regex(nsExec(node.name, 'ip', ['-4', 'addr', 'show', 'dev', BRIDGE]), /inet 10\.73\.0\.1\/24/)

    const hostVeth = csn.Result.interfaces.find((i) => !i.sandbox && i.name.startsWith('veth'))?.name
    t.truthy(hostVeth, 'the CNI result names the host-side veth')
    await vmOnPod(t, node, server, 'vm1', address, gateway, hostVeth)

    await server.client().releaseFDs('vm1')
    const after = node.snapshot()
    t.deepEqual(after.links.filter((l) => !l.startsWith(BRIDGE)), before.links)
    t.deepEqual(after.routes.filter((r) => !r.includes(BRIDGE)), before.routes)
    t.deepEqual(after.leases, [])
    // The pod's netns is gone and no other netns of this test's own names appeared (other tests, and other runs
    // of this file on a shared machine, create netns meanwhile: only this test's node and pod names count).
    const mine = (names: string[]) => names.filter((n) => n === node.name || n === podId).sort()
    t.deepEqual(mine(netnsNames()), mine(netnsBefore))
    t.false(netnsNames().includes(podId), 'the pod netns was deleted')
    t.is(server.tapFdCount(), 0, 'the server holds no tap fd')
    t.log(`server fds: idle ${fdsIdle}, after release ${server.fdCount()}`)
    t.deepEqual(await server.stop(), { code: 0, signal: null })
  } finally {
    server.cleanup()
    removeNetns(podId)
    node.cleanup()
  }
})

test.serial('after a server restart the key is recovered and a VM started afterwards gets its fd through retrieve', async (t) => {
  const { node, server } = setup()
  const podId = node.podId('tmver')
  try {
    const before = node.snapshot()
    await server.start()
    const csn = JSON.parse((await server.client().addFDs('vm2', addPayload(podId))).toString()) as CsnOut
    const { address, gateway } = csn.Result.ips[0]
    await server.kill9()

    await server.start()
    t.deepEqual(server.messages('recovered').map((l) => l.key), ['vm2'])
    await vmOnPod(t, node, server, 'vm2', address, gateway)

    await server.client().releaseFDs('vm2')
    const after = node.snapshot()
    t.deepEqual(after.links.filter((l) => !l.startsWith(BRIDGE)), before.links)
    t.deepEqual(after.leases, [])
    t.false(netnsNames().includes(podId))
    t.deepEqual(await server.stop(), { code: 0, signal: null })
  } finally {
    server.cleanup()
    removeNetns(podId)
    node.cleanup()
  }
})
