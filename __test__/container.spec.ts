/**
 * The native container-side calls (setupContainerSide, teardownContainerSide, recoverContainerSide, reopenTaps)
 * against real namespaces: a pod netns with a veth eth0 whose peer is in a node netns, addressed and routed as a
 * CNI bridge plugin leaves it (built here with `ip`).
 */
import test from 'ava'
import { spawn } from 'node:child_process'
import { closeSync, writeSync } from 'node:fs'
import { randomBytes } from 'node:crypto'
import { recoverContainerSide, reopenTaps, setupContainerSide, teardownContainerSide } from '../src/native'
import { openFdCount, requirePrereqs, TestNetns, uniqueName } from './helpers/env'

/** The real nft (npx puts @vercel/nft's `nft` first on PATH). */
const NFT = '/usr/sbin/nft'

interface Pod {
  node: TestNetns
  pod: TestNetns
  peers: string[]
  cleanup(): void
}

function makePod(links: { name: string; mac: string; mtu: number; addr: string; routes: string[][] }[]): Pod {
  requirePrereqs(['ip', NFT, 'tcpdump'])
  const node = new TestNetns('tmjn')
  const pod = new TestNetns('tmjp')
  const peers: string[] = []
  for (const l of links) {
    const peer = uniqueName('tmv')
    node.exec('ip', ['link', 'add', peer, 'mtu', `${l.mtu}`, 'type', 'veth', 'peer', 'name', l.name, 'netns', pod.name])
    node.exec('ip', ['link', 'set', peer, 'up'])
    pod.exec('ip', ['link', 'set', l.name, 'address', l.mac, 'mtu', `${l.mtu}`, 'up'])
    pod.exec('ip', ['addr', 'add', l.addr, 'brd', '+', 'dev', l.name])
    for (const r of l.routes) pod.exec('ip', ['route', 'add', ...r])
    peers.push(peer)
  }
  return { node, pod, peers, cleanup: () => { pod.cleanup(); node.cleanup() } }
}

const ETH0 = { name: 'eth0', mac: '42:a4:a6:22:80:2e', addr: '10.1.90.5/24', routes: [['default', 'via', '10.1.90.1', 'dev', 'eth0']] }
const ETH1 = { name: 'eth1', mac: '42:a4:a6:22:80:3f', mtu: 1450, addr: '10.2.0.7/16', routes: [['10.3.0.0/16', 'via', '10.2.0.1', 'dev', 'eth1']] }

function result(p: Pod, withEth1: boolean): string {
  const r: any = {
    cniVersion: '1.0.0',
    interfaces: [{ name: 'eth0', mac: ETH0.mac, sandbox: p.pod.path }],
    ips: [{ interface: 0, address: '10.1.90.5/24', gateway: '10.1.90.1' }],
    routes: [{ dst: '0.0.0.0/0' }],
  }
  if (withEth1) {
    r.interfaces.push({ name: 'eth1', mac: ETH1.mac, sandbox: p.pod.path })
    r.ips.push({ interface: 1, address: '10.2.0.7/16', gateway: '10.2.0.1' })
    r.routes.push({ dst: '10.3.0.0/16', gw: '10.2.0.1' })
  }
  return JSON.stringify(r)
}

/** The pod netns as `ip` and `nft` show it (links without counters, IPv4 addresses and routes, ruleset). */
function snapshot(p: Pod): string {
  const j = (args: string[]) => JSON.parse(p.pod.exec('ip', args))
  const nft = JSON.parse(p.pod.exec(NFT, ['-j', 'list', 'ruleset'])).nftables.filter((o: any) => !o.metainfo)
  return JSON.stringify({ links: j(['-j', '-d', 'link', 'show']), addrs: j(['-j', '-4', 'addr', 'show']), routes: j(['-j', '-4', 'route', 'show', 'table', 'all']), nft })
}

/** Polls (bounded) until the snapshot equals `want`: link operstate settles a moment after a link comes up. */
async function waitSnapshot(p: Pod, want: string): Promise<string> {
  const deadline = Date.now() + 5000
  let got = snapshot(p)
  while (got !== want && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 20))
    got = snapshot(p)
  }
  return got
}

/** A snapshot taken once the links are up and stable. */
async function settled(p: Pod): Promise<string> {
  const deadline = Date.now() + 5000
  for (;;) {
    const links = JSON.parse(p.pod.exec('ip', ['-j', 'link', 'show']))
    const ok = links.every((l: any) => !l.flags.includes('UP') || l.operstate === 'UP' || l.operstate === 'UNKNOWN')
    if (ok) return snapshot(p)
    if (Date.now() > deadline) throw new Error('the pod netns does not settle')
    await new Promise((r) => setTimeout(r, 20))
  }
}

/** Writes a frame to the tap fd and resolves once tcpdump on the node-side peer has seen it. */
async function frameCrosses(p: Pod, fd: number, peer: string): Promise<boolean> {
  const marker = randomBytes(8)
  const td = spawn('ip', ['netns', 'exec', p.node.name, 'tcpdump', '-i', peer, '-n', '-c', '1', '-x', '-l', 'ether proto 0x88b5'], { stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  td.stdout.on('data', (d) => { out += d })
  await new Promise<void>((resolve, reject) => {
    let err = ''
    td.stderr.on('data', (d) => { err += d; if (err.includes('listening on')) resolve() })
    td.on('exit', () => reject(new Error(`tcpdump exited: ${err}`)))
  })
  const frame = Buffer.alloc(60)
  frame.fill(0xff, 0, 6)
  Buffer.from([0x02, 0x11, 0x22, 0x33, 0x44, 0x55, 0x88, 0xb5]).copy(frame, 6)
  marker.copy(frame, 14)
  writeSync(fd, frame)
  const seen = await new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => { td.kill('SIGKILL'); resolve(false) }, 5000)
    td.on('exit', () => { clearTimeout(timer); resolve(true) })
  })
  const hex = out.replace(/^.*?:\s+/gm, '').replace(/\s+/g, '')
  return seen && hex.includes(marker.toString('hex'))
}

// Serial: the fd-leak checks count this process's open fds.
test.before('warm up the native runtime (its threads and fds are created on first use)', async () => {
  await teardownContainerSide('/var/run/netns/tm-no-such-netns', '{}').catch(() => undefined)
})

test.serial('setup bridges a tap to the CNI link, teardown restores the netns exactly, no fd leaks', async (t) => {
  const p = makePod([{ ...ETH0, mtu: 9000 }])
  try {
    const before = await settled(p)
    const fdsBefore = openFdCount()
    const { csn, fds } = await setupContainerSide(p.pod.path, result(p, false), { calicoSubnetSize: 24 })
    t.is(fds.length, 1)
    const parsed = JSON.parse(csn)
    t.deepEqual(parsed.Interfaces, [{ Type: 0, Name: 'eth0', HardwareAddr: 'QqSmIoAu', PCIAddress: '', MTU: 9000, VlanID: 0 }])
    t.is(parsed.NsPath, p.pod.path)
    t.deepEqual(parsed.Result.ips, [{ version: '4', address: '10.1.90.5/24', gateway: '10.1.90.1' }])
    const br0 = JSON.parse(p.pod.exec('ip', ['-j', '-d', 'link', 'show', 'br0']))[0]
    t.is(br0.mtu, 9000)
    t.is(br0.linkinfo.info_data.ageing_time, 0)
    t.is(JSON.parse(p.pod.exec('ip', ['-j', 'link', 'show', 'tap0']))[0].master, 'br0')
    t.regex(p.pod.exec('ip', ['-4', 'addr', 'show', 'br0']), /169\.254\.254\.2\/24/)
    t.not(JSON.parse(p.pod.exec('ip', ['-j', 'link', 'show', 'eth0']))[0].address, ETH0.mac)
    t.true(await frameCrosses(p, fds[0], p.peers[0]), 'a frame written to the tap fd comes out on the node side')
    closeSync(fds[0])
    await teardownContainerSide(p.pod.path, csn)
    t.is(await waitSnapshot(p, before), before)
    t.is(openFdCount(), fdsBefore)
  } finally {
    p.cleanup()
  }
})

test.serial('a conflicting br1 fails the second interface with ERR_EXISTS and the netns is restored', async (t) => {
  const p = makePod([{ ...ETH0, mtu: 1500 }, ETH1])
  try {
    p.pod.exec('ip', ['link', 'add', 'br1', 'type', 'bridge'])
    const before = await settled(p)
    const fdsBefore = openFdCount()
    const err: any = await t.throwsAsync(setupContainerSide(p.pod.path, result(p, true), {}))
    t.is(err.code, 'ERR_EXISTS')
    t.regex(err.message, /eth1/)
    t.is(await waitSnapshot(p, before), before)
    t.is(openFdCount(), fdsBefore)
  } finally {
    p.cleanup()
  }
})

test.serial('recover gives null for a tap a VM holds; reopenTaps is ERR_BUSY until it is released', async (t) => {
  const p = makePod([{ ...ETH0, mtu: 1500 }, ETH1])
  try {
    const { csn, fds } = await setupContainerSide(p.pod.path, result(p, true), {})
    closeSync(fds[0])
    const rec = await recoverContainerSide(p.pod.path, csn)
    t.is(rec.fds.length, 2)
    t.is(typeof rec.fds[0], 'number')
    t.is(rec.fds[1], null)
    closeSync(rec.fds[0]!)
    const err: any = await t.throwsAsync(reopenTaps(p.pod.path, csn))
    t.is(err.code, 'ERR_BUSY')
    closeSync(fds[1])
    const again = await reopenTaps(p.pod.path, csn)
    t.is(again.length, 2)
    t.true(await frameCrosses(p, again[1], p.peers[1]))
    again.forEach((fd) => closeSync(fd))
    await teardownContainerSide(p.pod.path, csn)
  } finally {
    p.cleanup()
  }
})

test.serial('bad input rejects with ERR_INVALID and touches nothing', async (t) => {
  const p = makePod([{ ...ETH0, mtu: 1500 }])
  try {
    const before = await settled(p)
    const e1: any = await t.throwsAsync(setupContainerSide(p.pod.path, result(p, false), { calicoSubnetSize: 40 }))
    t.is(e1.code, 'ERR_INVALID')
    const e2: any = await t.throwsAsync(setupContainerSide(p.pod.path, result(p, false), { dummyGateway: 'nope' }))
    t.is(e2.code, 'ERR_INVALID')
    const e3: any = await t.throwsAsync(setupContainerSide(p.pod.path, '{"ips": 3}', {}))
    t.is(e3.code, 'ERR_INVALID')
    const e4: any = await t.throwsAsync(teardownContainerSide(p.pod.path, 'not json'))
    t.is(e4.code, 'ERR_INVALID')
    const e5: any = await t.throwsAsync(setupContainerSide('/var/run/netns/tm-no-such-netns', result(p, false), {}))
    t.is(e5.code, 'ERR_NOT_FOUND')
    t.is(await waitSnapshot(p, before), before)
  } finally {
    p.cleanup()
  }
})
