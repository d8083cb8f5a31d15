/**
 * Proves the real-VM harness with real parts and without tapmanager: a netns "node" with a bridge, a tap on it
 * and busybox udhcpd as a stand-in DHCP server; QEMU boots the test guest on the tap, first with QEMU's own
 * `ifname=`, then the way a VM launcher does it: the tap opened by another process and inherited as fd 3, with
 * the arguments from buildQemuNetArgs. The guest must lease the udhcpd address (mask, router, MTU), ping the
 * bridge, and answer a ping from the node.
 */
import test from 'ava'
import { spawn, type ChildProcess } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { buildQemuNetArgs } from '../src/qemu'
import { TestNetns, requirePrereqs, sh } from './helpers/env'
import { bootVm, pythonTapOpener, vmAssets, type VmHandle } from './helpers/vm'

interface Node {
  ns: TestNetns
  udhcpd: ChildProcess
  dir: string
  cleanup(): void
}

/** A netns with br0 (10.99.0.1/24), tap0 on it, and udhcpd serving 10.99.0.100-150 with MTU 1400. */
function makeNode(): Node {
  const ns = new TestNetns('tmvm')
  const dir = mkdtempSync(join(tmpdir(), 'tmvm-'))
  let udhcpd: ChildProcess | undefined
  try {
    ns.exec('ip', ['link', 'add', 'br0', 'type', 'bridge'])
    ns.exec('ip', ['addr', 'add', '10.99.0.1/24', 'dev', 'br0'])
    ns.exec('ip', ['link', 'set', 'br0', 'up'])
    ns.exec('ip', ['tuntap', 'add', 'dev', 'tap0', 'mode', 'tap'])
    ns.exec('ip', ['link', 'set', 'tap0', 'master', 'br0', 'up'])
    writeFileSync(join(dir, 'leases'), '')
    writeFileSync(
      join(dir, 'udhcpd.conf'),
      [
        'start 10.99.0.100',
        'end 10.99.0.150',
        'interface br0',
        `lease_file ${join(dir, 'leases')}`,
        `pidfile ${join(dir, 'udhcpd.pid')}`,
        'max_leases 51',
        'option subnet 255.255.255.0',
        'option router 10.99.0.1',
        'option mtu 1400',
        'option lease 600',
        '',
      ].join('\n'),
    )
    udhcpd = spawn('ip', ['netns', 'exec', ns.name, 'busybox', 'udhcpd', '-f', join(dir, 'udhcpd.conf')], {
      stdio: 'ignore',
    })
  } catch (err) {
    ns.cleanup()
    rmSync(dir, { recursive: true, force: true })
    throw err
  }
  const d = udhcpd
  return {
    ns,
    udhcpd: d,
    dir,
    cleanup() {
      d.kill('SIGKILL')
      ns.cleanup()
      rmSync(dir, { recursive: true, force: true })
    },
  }
}

function ipToInt(ip: string): number {
  return ip.split('.').reduce((a, o) => a * 256 + Number(o), 0)
}

/** Pings from the node netns, with a bounded number of one-second tries. */
function nodePing(node: Node, ip: string): boolean {
  for (let i = 0; i < 5; i++) {
    try {
      node.ns.exec('busybox', ['ping', '-c', '1', '-W', '2', ip])
      return true
    } catch {
      // no reply within the wait: try again (the bound is 5 tries)
    }
  }
  return false
}

async function checkGuest(t: import('ava').ExecutionContext, node: Node, vm: VmHandle, mac: string): Promise<void> {
  t.is(await vm.linkMac(), mac, 'the guest NIC carries the MAC QEMU was given')
  const lease = await vm.lease()
  t.log(`QEMU start to DHCP lease: ${(Number(process.hrtime.bigint() - vm.startedAt) / 1e9).toFixed(1)} s (TCG)`)
  t.true(ipToInt(lease.ip) >= ipToInt('10.99.0.100') && ipToInt(lease.ip) <= ipToInt('10.99.0.150'), lease.ip)
  t.is(lease.mask, 24)
  t.is(lease.subnet, '255.255.255.0')
  t.is(lease.router, '10.99.0.1')
  t.is(lease.mtu, 1400)
  t.is(lease.serverId, '10.99.0.1')
  const ping = await vm.pingResult()
  t.deepEqual({ target: ping.target, ok: ping.ok }, { target: '10.99.0.1', ok: true }, 'guest pings the bridge')
  await vm.ready()
  t.true(nodePing(node, lease.ip), 'node pings the guest')
  const addr = await vm.run('ip -4 -o addr show dev eth0; cat /sys/class/net/eth0/mtu')
  t.is(addr.rc, 0)
  t.regex(addr.output.join('\n'), new RegExp(`inet ${lease.ip.replace(/\./g, '\\.')}/24 `))
  t.true(addr.output.includes('1400'), 'the guest applied the leased MTU')
  // The node's neighbour table learned the guest's MAC through the bridge.
  t.regex(node.ns.exec('ip', ['neigh', 'show', lease.ip]), new RegExp(mac))
  // kill() leaves nothing running in the node but the DHCP server.
  await vm.kill()
  t.deepEqual(sh('ip', ['netns', 'pids', node.ns.name]).split(/\s+/).filter(Boolean), [String(node.udhcpd.pid)])
}

test.before(() => {
  requirePrereqs(['ip', 'qemu-system-x86_64', '/bin/busybox', '/usr/bin/python3'])
  vmAssets()
})

test.serial('guest on a tap opened by QEMU (ifname=) leases from udhcpd and pings both ways', async (t) => {
  const node = makeNode()
  const mac = '52:54:00:a1:b2:01'
  const vm = bootVm({
    mac,
    command: ['ip', 'netns', 'exec', node.ns.name],
    netArgs: ['-netdev', 'tap,id=n0,ifname=tap0,script=no,downscript=no', '-device', `virtio-net-pci,netdev=n0,mac=${mac},romfile=`],
    ping: '10.99.0.1',
    stay: true,
  })
  try {
    await checkGuest(t, node, vm, mac)
  } finally {
    await vm.kill()
    node.cleanup()
  }
})

test.serial('guest on a tap inherited as fd 3 with buildQemuNetArgs arguments (the VM launcher path)', async (t) => {
  const node = makeNode()
  const mac = '52:54:00:a1:b2:02'
  const netArgs = buildQemuNetArgs([{ type: 0, mac, fdIndex: 0, pciAddress: '' }], [3])
  t.deepEqual(netArgs, ['-netdev', 'tap,id=tap0,fd=3', '-device', `virtio-net-pci,netdev=tap0,id=net0,mac=${mac}`])
  const vm = bootVm({
    mac,
    command: ['ip', 'netns', 'exec', node.ns.name, ...pythonTapOpener('tap0')],
    netArgs,
    ping: '10.99.0.1',
    stay: true,
  })
  try {
    await checkGuest(t, node, vm, mac)
  } finally {
    await vm.kill()
    node.cleanup()
  }
})

test.serial('a guest powers off by itself without tm.stay, so QEMU exits 0', async (t) => {
  const node = makeNode()
  const mac = '52:54:00:a1:b2:03'
  const vm = bootVm({
    mac,
    command: ['ip', 'netns', 'exec', node.ns.name, ...pythonTapOpener('tap0')],
    netArgs: ['-netdev', 'tap,id=n0,fd=3', '-device', `virtio-net-pci,netdev=n0,mac=${mac},romfile=`],
    ping: '10.99.0.1',
  })
  try {
    t.true((await vm.pingResult()).ok)
    await vm.waitFor(/^TM_POWEROFF$/)
    t.is(await vm.exited, 0)
  } finally {
    await vm.kill()
    node.cleanup()
  }
})
