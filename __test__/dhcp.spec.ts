/**
 * The per-pod DHCP server through the binding, against a real client (busybox udhcpc): a "pod" netns with
 * bridge br0 at 169.254.254.2/24 and a veth whose peer (the VM's link, with the VM's MAC) sits in a client netns.
 */
import test from 'ava'
import { spawnSync } from 'node:child_process'
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { startDhcpServer } from '../src/native'
import { requirePrereqs, TestNetns, uniqueName } from './helpers/env'

const VM_MAC = '42:a4:a6:22:80:2e'

function csnJson(nsPath: string, mtu: number): string {
  return JSON.stringify({
    Result: {
      interfaces: [{ name: 'eth0', mac: VM_MAC, sandbox: nsPath }],
      ips: [{ version: '4', address: '10.1.90.5/24', gateway: '10.1.90.1' }],
      routes: [
        { dst: '0.0.0.0/0', gw: '10.1.90.1' },
        { dst: '10.10.42.0/24', gw: '10.1.90.90' },
      ],
      dns: { nameservers: ['10.96.0.10'], search: ['default.svc.cluster.local'] },
    },
    NsPath: nsPath,
    Interfaces: [{ Type: 0, Name: 'eth0', HardwareAddr: Buffer.from(VM_MAC.split(':').map((h) => parseInt(h, 16))).toString('base64'), PCIAddress: '', MTU: mtu, VlanID: 0 }],
  })
}

function topology(): { pod: TestNetns; client: TestNetns; cleanup: () => void } {
  const pod = new TestNetns('tmdp')
  const client = new TestNetns('tmdc')
  pod.exec('ip', ['link', 'add', 'br0', 'type', 'bridge'])
  pod.exec('ip', ['addr', 'add', '169.254.254.2/24', 'dev', 'br0'])
  pod.exec('ip', ['link', 'add', 'vp0', 'type', 'veth', 'peer', 'name', 'vm0', 'netns', client.name])
  pod.exec('ip', ['link', 'set', 'vp0', 'master', 'br0', 'up'])
  pod.exec('ip', ['link', 'set', 'br0', 'up'])
  client.exec('ip', ['link', 'set', 'vm0', 'address', VM_MAC, 'up'])
  return { pod, client, cleanup: () => { pod.cleanup(); client.cleanup() } }
}

/** Runs busybox udhcpc in the client netns with a script that prints the lease; returns `key -> value`. */
function udhcpc(client: TestNetns, tries = 3): { ok: boolean; lease: Record<string, string>; stderr: string } {
  const dir = mkdtempSync(join(tmpdir(), 'tmdhcp-'))
  try {
    const script = join(dir, 'print.sh')
    writeFileSync(script, '#!/bin/sh\n[ "$1" = bound ] || exit 0\nfor v in ip subnet router dns serverid lease mtu search staticroutes; do eval "echo $v=\\"\\$$v\\""; done\n')
    chmodSync(script, 0o755)
    const r = spawnSync('ip', ['netns', 'exec', client.name, 'timeout', '30', 'busybox', 'udhcpc', '-i', 'vm0', '-f', '-n', '-q', '-t', String(tries), '-T', '1', '-O', 'staticroutes', '-O', 'search', '-O', 'mtu', '-s', script], { encoding: 'utf8' })
    const lease: Record<string, string> = {}
    for (const line of r.stdout.split('\n')) {
      const i = line.indexOf('=')
      if (i > 0) lease[line.slice(0, i)] = line.slice(i + 1)
    }
    return { ok: r.status === 0, lease, stderr: r.stderr }
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
}

test('startDhcpServer serves a real client; stop releases the port so a new server starts at once', async (t) => {
  requirePrereqs(['ip', 'busybox', 'timeout'])
  const { pod, client, cleanup } = topology()
  try {
    const csn = csnJson(pod.path, 9000)
    const server = await startDhcpServer(pod.path, csn)
    t.deepEqual(server.bridges, ['br0'])
    t.is(server.nsPath, pod.path)
    t.true(server.running)

    // bound when the Promise resolves: the client's first DISCOVER is answered
    const first = udhcpc(client)
    t.true(first.ok, first.stderr)
    t.is(first.lease.ip, '10.1.90.5')
    t.is(first.lease.subnet, '255.255.255.0')
    t.is(first.lease.staticroutes, '10.10.42.0/24 10.1.90.90 0.0.0.0/0 10.1.90.1')
    t.is(first.lease.router, '')
    t.is(first.lease.mtu, '9000')
    t.is(first.lease.dns, '10.96.0.10')
    t.is(first.lease.search, 'default.svc.cluster.local')
    t.is(first.lease.serverid, '169.254.254.2')
    t.is(first.lease.lease, '86400')

    // a second server on the same netns is refused while the first runs
    const dup = await t.throwsAsync(startDhcpServer(pod.path, csn))
    t.is((dup as Error & { code?: string }).code, 'ERR_EXISTS')

    await server.stop()
    t.false(server.running)
    const stats = server.stats()
    t.true(stats.offers >= 1 && stats.acks >= 1, JSON.stringify(stats))
    t.is(stats.errors, 0)
    await server.stop() // idempotent

    // stopped: nothing answers
    const none = udhcpc(client, 1)
    t.false(none.ok)
    t.false('ip' in none.lease)

    // and the port is free again: a new server (explicit mapping, MTU 1500) starts right after stop
    const again = await startDhcpServer(pod.path, csnJson(pod.path, 1500), { bridges: [{ bridge: 'br0', interface: 0 }] })
    const second = udhcpc(client)
    t.true(second.ok, second.stderr)
    t.is(second.lease.ip, '10.1.90.5')
    t.is(second.lease.mtu, '1500')
    await again.stop()
  } finally {
    cleanup()
  }
})

test('startDhcpServer rejects bad input with stable codes', async (t) => {
  requirePrereqs(['ip'])
  const { pod, cleanup } = topology()
  try {
    const cases: Array<[Promise<unknown>, string]> = [
      [startDhcpServer(`/var/run/netns/${uniqueName('nope')}`, csnJson(pod.path, 1500)), 'ERR_NOT_FOUND'],
      [startDhcpServer(pod.path, csnJson(pod.path, 1500), { bridges: [{ bridge: 'br9', interface: 0 }] }), 'ERR_NOT_FOUND'],
      [startDhcpServer(pod.path, '{"Result":'), 'ERR_INVALID'],
      [startDhcpServer(pod.path, csnJson(pod.path, 1500), { bridges: [{ bridge: 'br0', interface: 3 }] }), 'ERR_INVALID'],
      [startDhcpServer(pod.path, csnJson(pod.path, 1500), { serverIp: 'nope' }), 'ERR_INVALID'],
      [startDhcpServer(pod.path, JSON.stringify({ Result: null, NsPath: pod.path, Interfaces: null })), 'ERR_INVALID'],
    ]
    for (const [p, code] of cases) {
      const e = await t.throwsAsync(p)
      t.is((e as Error & { code?: string }).code, code, e?.message)
    }
    // nothing was left bound: a proper start works
    const server = await startDhcpServer(pod.path, csnJson(pod.path, 1500))
    await server.stop()
  } finally {
    cleanup()
  }
})
