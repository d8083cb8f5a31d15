/**
 * The network binding driven from TypeScript: named namespaces, netlink links/addresses/routes, taps and DHCP
 * isolation, each checked against what iproute2/nft show. Runs as root in namespaces it creates.
 */
import test from 'ava'
import { spawnSync } from 'node:child_process'
import { closeSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import {
  NetlinkHandle,
  addDhcpIsolation,
  createNetns,
  createTap,
  deleteNetns,
  deleteTap,
  listDhcpIsolation,
  listNetns,
  netnsPath,
  openTap,
  removeDhcpIsolation,
  tapFdInfo,
} from '../src/native'
import { TestNetns, listNetns as ipNetnsList, nsExec, openFdCount, requirePrereqs, sh, uniqueName } from './helpers/env'

/** nftables' CLI by absolute path: under npm, `nft` on PATH may be @vercel/nft from node_modules/.bin. */
const NFT = '/usr/sbin/nft'

test('createNetns makes an `ip netns` namespace; reuse, recreate and idempotent delete', async (t) => {
  requirePrereqs(['ip'])
  const name = uniqueName('tmjs')
  try {
    const ns = await createNetns(name)
    t.deepEqual(ns, { name, path: `/var/run/netns/${name}`, created: true })
    t.is(netnsPath(name), ns.path)
    t.true(ipNetnsList().includes(name))
    t.true((await listNetns()).includes(name))
    t.regex(nsExec(name, 'ip', ['-o', 'link', 'show']), /^1: lo:/)

    const again = await t.throwsAsync(createNetns(name))
    t.is((again as { code?: string }).code, 'ERR_EXISTS')
    t.false((await createNetns(name, { ifExists: 'reuse' })).created)
    nsExec(name, 'ip', ['link', 'add', 'old0', 'type', 'bridge'])
    t.true((await createNetns(name, { ifExists: 'recreate' })).created)
    t.false(nsExec(name, 'ip', ['-o', 'link', 'show']).includes('old0'))
    const bad = await t.throwsAsync(createNetns(name, { ifExists: 'maybe' as 'reuse' }))
    t.is((bad as { code?: string }).code, 'ERR_INVALID')

    await deleteNetns(name)
    t.false(ipNetnsList().includes(name))
    t.false((await listNetns()).includes(name))
    await deleteNetns(name) // idempotent
    const invalid = await t.throwsAsync(createNetns('a/b'))
    t.is((invalid as { code?: string }).code, 'ERR_INVALID')
  } finally {
    await deleteNetns(name)
  }
})

test('links, addresses and routes through NetlinkHandle', async (t) => {
  requirePrereqs(['ip'])
  const pod = new TestNetns('tmjs')
  const node = new TestNetns('tmjs')
  const nl = NetlinkHandle.open(pod.path)
  try {
    const links = await nl.links()
    t.deepEqual(links.map((l) => l.name), ['lo'])

    const br = await nl.createBridge('br0', 9000)
    const bridge = await nl.linkByName('br0')
    t.like(bridge, { index: br, kind: 'bridge', mtu: 9000, up: false })
    t.regex(pod.exec('ip', ['-d', 'link', 'show', 'br0']), /ageing_time 0 /)

    const eth = await nl.createVeth('eth0', 'host0', node.path)
    t.regex(node.exec('ip', ['link', 'show', 'host0']), /host0@/)
    await nl.setMac(eth, '02:aa:bb:cc:dd:ee')
    await nl.setMtu(eth, 9000)
    await nl.setMaster(eth, br)
    await nl.setUp(eth)
    await nl.setUp(br)
    t.like(await nl.linkByIndex(eth), { name: 'eth0', kind: 'veth', mac: '02:aa:bb:cc:dd:ee', mtu: 9000, master: br, up: true })
    t.regex(pod.exec('ip', ['link', 'show', 'eth0']), /master br0/)
    await nl.setNomaster(eth)
    t.is((await nl.linkByIndex(eth)).master, undefined)
    await nl.setDown(eth)
    await nl.setName(eth, 'eth9')
    t.is((await nl.linkByIndex(eth)).name, 'eth9')

    await nl.addAddress(br, '169.254.254.2', 24)
    await nl.addAddress(br, 'fd00:2::2', 64)
    const addrs = await nl.addresses(br)
    t.true(addrs.some((a) => a.address === '169.254.254.2' && a.prefixLen === 24 && a.family === 4))
    t.true(addrs.some((a) => a.address === 'fd00:2::2' && a.prefixLen === 64 && a.family === 6))
    t.regex(pod.exec('ip', ['addr', 'show', 'br0']), /inet 169\.254\.254\.2\/24/)

    await nl.addRoute({ dst: '10.10.42.0', dstLen: 24, gateway: '169.254.254.1', oif: br })
    await nl.addRoute({ dst: '169.254.1.1', oif: br })
    const routes = await nl.routes()
    t.like(routes.find((r) => r.dst === '10.10.42.0'), { dstLen: 24, gateway: '169.254.254.1', oif: br, protocol: 3, scope: 0, family: 4 })
    t.like(routes.find((r) => r.dst === '169.254.1.1'), { dstLen: 32, scope: 253 })
    t.like(routes.find((r) => r.dst === '169.254.254.0'), { protocol: 2, scope: 253 })
    t.regex(pod.exec('ip', ['route', 'show']), /10\.10\.42\.0\/24 via 169\.254\.254\.1 dev br0/)
    await nl.deleteRoute({ dst: '10.10.42.0', dstLen: 24, gateway: '169.254.254.1', oif: br })
    await nl.deleteRoute({ dst: '169.254.1.1', oif: br })
    t.false(pod.exec('ip', ['route', 'show']).includes('10.10.42.0'))
    await nl.deleteAddress(br, '169.254.254.2', 24)
    t.false(pod.exec('ip', ['addr', 'show', 'br0']).includes('169.254.254.2'))

    const codeOf = async (p: Promise<unknown>) => ((await t.throwsAsync(p)) as { code?: string }).code
    t.is(await codeOf(nl.linkByName('missing0')), 'ERR_NOT_FOUND')
    t.is(await codeOf(nl.createBridge('br0')), 'ERR_EXISTS')
    t.is(await codeOf(nl.addAddress(br, 'not-an-ip', 24)), 'ERR_INVALID')
    t.is(await codeOf(nl.setMac(br, '02:zz:00:00:00:00')), 'ERR_INVALID')
    t.is(await codeOf(nl.addRoute({})), 'ERR_INVALID')

    await nl.setNetns(eth, node.path)
    t.regex(node.exec('ip', ['-o', 'link', 'show']), /eth9@/)
    await createTap('tap0', { netns: pod.path })
    const tap = (await nl.linkByName('tap0')).index
    t.like(await nl.linkByIndex(tap), { kind: 'tun', group: 0 })
    await nl.deleteLinks([br, tap])
    t.deepEqual((await nl.links()).map((l) => l.name), ['lo'])
    const br2 = await nl.createBridge('br0')
    await nl.deleteLink(br2)
    t.deepEqual((await nl.links()).map((l) => l.name), ['lo'])
    nl.close()
    t.is(await codeOf(nl.links()), 'ERR_CLOSED')
  } finally {
    nl.close()
    pod.cleanup()
    node.cleanup()
  }
})

test('taps: create in a netns, open (single, vnet header, multi-queue), busy, delete; no fd leaks', async (t) => {
  requirePrereqs(['ip'])
  const pod = new TestNetns('tmjs')
  const before = openFdCount()
  try {
    await createTap('tap0', { netns: pod.path, mtu: 9000, up: true })
    t.regex(pod.exec('ip', ['-d', 'link', 'show', 'tap0']), /mtu 9000.*\n.*\n\s+tun type tap pi off vnet_hdr off persist on/)
    const [fd] = await openTap('tap0', { netns: pod.path })
    t.deepEqual(tapFdInfo(fd), { name: 'tap0', persistent: true, multiQueue: false, vnetHdr: false })
    const busy = await t.throwsAsync(openTap('tap0', { netns: pod.path }))
    t.is((busy as { code?: string }).code, 'ERR_BUSY')
    const heldDelete = await t.throwsAsync(deleteTap('tap0', pod.path))
    t.is((heldDelete as { code?: string }).code, 'ERR_BUSY')
    closeSync(fd)
    const [vfd] = await openTap('tap0', { netns: pod.path, vnetHdr: true })
    t.true(tapFdInfo(vfd).vnetHdr)
    closeSync(vfd)

    await createTap('mq0', { netns: pod.path, multiQueue: true })
    const fds = await openTap('mq0', { netns: pod.path, queues: 3 })
    t.is(new Set(fds).size, 3)
    for (const q of fds) t.like(tapFdInfo(q), { name: 'mq0', multiQueue: true })
    for (const q of fds) closeSync(q)

    const missing = await t.throwsAsync(openTap('nope0', { netns: pod.path }))
    t.is((missing as { code?: string }).code, 'ERR_NOT_FOUND')
    const exists = await t.throwsAsync(createTap('tap0', { netns: pod.path }))
    t.is((exists as { code?: string }).code, 'ERR_EXISTS')

    await deleteTap('tap0', pod.path)
    await deleteTap('mq0', pod.path)
    await deleteTap('mq0', pod.path)
    t.deepEqual(pod.exec('ip', ['-o', 'link', 'show']).trim().split('\n').length, 1)
    t.is(openFdCount(), before)
  } finally {
    pod.cleanup()
  }
})

test('DHCP isolation rules are added and removed exactly, inside the pod netns only', async (t) => {
  requirePrereqs(['ip', NFT])
  const pod = new TestNetns('tmjs')
  const node = new TestNetns('tmjs')
  try {
    await addDhcpIsolation(pod.path, 'eth0')
    await addDhcpIsolation(pod.path, 'eth1')
    t.deepEqual(await listDhcpIsolation(pod.path), ['eth0', 'eth1'])
    const table = pod.exec(NFT, ['list', 'table', 'bridge', 'tapmanager-dhcp-eth0'])
    t.regex(table, /hook forward[\s\S]*oifname "eth0" udp dport 67 counter packets 0 bytes 0 drop/)
    t.regex(table, /hook output[\s\S]*oifname "eth0" udp sport 67 counter packets 0 bytes 0 drop/)
    const again = await t.throwsAsync(addDhcpIsolation(pod.path, 'eth0'))
    t.is((again as { code?: string }).code, 'ERR_EXISTS')

    await removeDhcpIsolation(pod.path, 'eth0')
    t.deepEqual(await listDhcpIsolation(pod.path), ['eth1'])
    t.false(pod.exec(NFT, ['list', 'ruleset']).includes('"eth0"'))
    await removeDhcpIsolation(pod.path, 'eth1')
    await removeDhcpIsolation(pod.path, 'eth1')
    t.is(pod.exec(NFT, ['list', 'ruleset']).trim(), '')
    t.is(node.exec(NFT, ['list', 'ruleset']).trim(), '')
    const bad = await t.throwsAsync(addDhcpIsolation(pod.path, 'no such link name'))
    t.is((bad as { code?: string }).code, 'ERR_INVALID')
  } finally {
    pod.cleanup()
    node.cleanup()
  }
})

test('pod netns: IPv6 off by default for new links (nativePodNetworkOps), kernel defaults with podNetworkOpsWithIpv6 (serve --pod-ipv6)', async (t) => {
  requirePrereqs(['ip', 'nsenter'])
  const { nativePodNetworkOps, podNetworkOpsWithIpv6 } = await import('../src/podnetwork')
  const dir = mkdtempSync(join(tmpdir(), 'tm-v6-'))
  const reference = new TestNetns('tmv6r')
  const off = join(dir, uniqueName('tmv6o'))
  const on = join(dir, uniqueName('tmv6k'))
  const sysctl = (ns: string, conf: string) =>
    sh('nsenter', [`--net=${ns}`, 'cat', `/proc/sys/net/ipv6/conf/${conf}/disable_ipv6`]).trim()
  try {
    await nativePodNetworkOps.createNetns(off)
    await podNetworkOpsWithIpv6.createNetns(on)
    t.is(sysctl(off, 'default'), '1', 'links made later in a pod netns get no IPv6')
    t.is(sysctl(off, 'lo'), sysctl(reference.path, 'lo'), 'lo keeps its IPv6 (::1)')
    t.is(sysctl(on, 'default'), sysctl(reference.path, 'default'), '--pod-ipv6: as `ip netns add` makes it')
    // A link made in the pod netns afterwards (as a CNI plugin's veth end) has no IPv6 address.
    sh('nsenter', [`--net=${off}`, 'ip', 'link', 'add', 'tmv6d', 'type', 'veth', 'peer', 'name', 'tmv6p'])
    sh('nsenter', [`--net=${off}`, 'ip', 'link', 'set', 'tmv6d', 'up'])
    t.is(sysctl(off, 'tmv6d'), '1')
    t.is(sh('nsenter', [`--net=${off}`, 'ip', '-6', '-o', 'addr', 'show', 'dev', 'tmv6d']).trim(), '')
  } finally {
    await nativePodNetworkOps.deleteNetns(off)
    await nativePodNetworkOps.deleteNetns(on)
    reference.cleanup()
    // The netns code made the dir a (shared) mount point of its own.
    spawnSync('umount', ['-l', dir])
    rmSync(dir, { recursive: true, force: true })
  }
})
