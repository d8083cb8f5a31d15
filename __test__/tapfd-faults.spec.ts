/**
 * TapFDSource under faults, at scale and after a crash, as root with real parts (see tapfd.spec.ts for the
 * setup): a failing, hanging or garbage-printing plugin, a failure after the taps exist, a conflicting link in
 * the pod: the add fails with a clear error and nothing leaks (netns, links, lease, this process's fds).
 * Teardown restores the pod netns exactly; 20 concurrent adds; a netns left by a crash is cleaned.
 *
 * Serial: the fd-leak checks count this process's open fds.
 */
import test, { type ExecutionContext } from 'ava'
import { spawn } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { closeFd, ServerError } from '../src/index'
import { nativePodNetworkOps, type PodNetworkOps } from '../src/podnetwork'
import { goJsonStringify, macToBase64, toGoCniResult } from '../src/payloads'
import { createNetns } from '../src/native'
import { sh } from './helpers/env'
import { processAlive } from './helpers/cni'
import { FakeVm, TapFdHarness, openFds } from './helpers/tapfd'

const NFT = '/usr/sbin/nft'

/** Everything a failed or released add must not leave: pod netns, node links/addresses/routes/leases, fds. */
interface Baseline {
  node: ReturnType<TapFdHarness['node']['snapshot']>
  netns: string[]
  fds: Map<string, string>
}

function baseline(h: TapFdHarness): Baseline {
  return { node: h.node.snapshot(), netns: h.netnsFiles(), fds: openFds() }
}

/**
 * Asserts nothing leaked since `b` (fds compared as fd -> target; the server closes its side of a client's
 * connection once it sees the client's EOF, so fds are polled for a bounded while).
 */
async function assertNoLeak(t: ExecutionContext, h: TapFdHarness, b: Baseline, what: string): Promise<void> {
  t.deepEqual(h.netnsFiles(), b.netns, `${what}: netns`)
  t.deepEqual(h.node.snapshot(), b.node, `${what}: node links, addresses, routes, IPAM leases`)
  const leakedFds = () => [...openFds()].filter(([fd, target]) => b.fds.get(fd) !== target).map(([fd, target]) => `${fd} -> ${target}`)
  const deadline = Date.now() + 3000
  let leaked = leakedFds()
  while (leaked.length && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 20))
    leaked = leakedFds()
  }
  t.deepEqual(leaked, [], `${what}: fds of this process`)
  t.deepEqual(h.source.keys(), [], `${what}: keys`)
}

async function withHarness(opts: ConstructorParameters<typeof TapFdHarness>[0], fn: (h: TapFdHarness) => Promise<void>): Promise<void> {
  const h = new TapFdHarness(opts)
  try {
    await fn(h)
  } finally {
    await h.cleanup()
  }
}

test.before('warm up the native runtime (its threads and fds are created on first use)', async () => {
  await withHarness({}, async (h) => {
    h.node.writeConf('10-bridge.conflist', h.node.bridgeConflist())
    await h.start()
    const id = h.node.podId()
    await h.add(id)
    const { fds } = await h.client.getFDs(id)
    for (const fd of fds) closeFd(fd)
    await h.client.releaseFDs(id)
  })
})

test.serial('a failing plugin: the error carries its message, the earlier plugin is undone (lease freed)', async (t) => {
  await withHarness({}, async (h) => {
    h.node.writeConf('10-bridge.conflist', h.node.bridgeConflist({ plugins: [h.node.testPlugin({ mode: 'fail', fault: { kind: 'fail', code: 11, msg: 'injected failure' } })] }))
    await h.start()
    await h.prime()
    const b = baseline(h)
    const podId = h.node.podId()
    const err = await t.throwsAsync(h.add(podId), { instanceOf: ServerError })
    t.log(err!.message)
    t.regex(err!.message, /injected failure/)
    t.regex(err!.message, /tmtest/)
    await assertNoLeak(t, h, b, 'after the failed add')
    // bridge+host-local did run ADD (the lease existed) and DEL (it is gone)
    t.deepEqual(
      h.node.log().filter((l) => l.containerId === podId).map((l) => l.command),
      ['ADD', 'DEL'],
    )
  })
})

test.serial('a hanging plugin: killed at its timeout, the add fails with a timeout, nothing leaks', async (t) => {
  await withHarness({ client: { timeoutMs: 1500 } }, async (h) => {
    const pidFile = join(h.node.dir, 'hang.pid')
    h.node.writeConf('10-bridge.conflist', h.node.bridgeConflist({ plugins: [h.node.testPlugin({ fault: { kind: 'hang', on: ['ADD'], pidFile } })] }))
    await h.start()
    await h.prime()
    const b = baseline(h)
    const err = await t.throwsAsync(h.add(h.node.podId()), { instanceOf: ServerError })
    t.log(err!.message)
    t.regex(err!.message, /tim(e|ed) ?out/i)
    await assertNoLeak(t, h, b, 'after the timed-out add')
    const pids = readFileSync(pidFile, 'utf8').trim().split(' ').map(Number)
    t.is(pids.length, 2)
    for (const pid of pids) t.false(processAlive(pid), `plugin process ${pid} was killed`)
  })
})

test.serial('a plugin printing garbage: a clear parse error, nothing leaks', async (t) => {
  await withHarness({}, async (h) => {
    h.node.writeConf('10-bridge.conflist', h.node.bridgeConflist({ plugins: [h.node.testPlugin({ fault: { kind: 'garbage', output: 'this is not JSON {' } })] }))
    await h.start()
    await h.prime()
    const b = baseline(h)
    const err = await t.throwsAsync(h.add(h.node.podId()), { instanceOf: ServerError })
    t.log(err!.message)
    t.regex(err!.message, /JSON|parse|invalid/i)
    await assertNoLeak(t, h, b, 'after the add with a garbage result')
  })
})

test.serial('a failure after the taps exist (DHCP server start): everything is rolled back', async (t) => {
  let setups = 0
  const ops: PodNetworkOps = {
    ...nativePodNetworkOps,
    setupContainerSide: async (...args) => {
      const r = await nativePodNetworkOps.setupContainerSide(...args)
      setups++
      // the taps do exist now
      const links = JSON.parse(sh('nsenter', [`--net=${args[0]}`, 'ip', '-j', 'link', 'show'])).map((l: any) => l.ifname)
      if (!links.includes('tap0') || !links.includes('br0')) throw new Error(`no tap0/br0 after setup: ${links}`)
      return r
    },
    startDhcpServer: async () => {
      throw new Error('injected DHCP failure')
    },
  }
  await withHarness({ source: { ops } }, async (h) => {
    h.node.writeConf('10-bridge.conflist', h.node.bridgeConflist())
    await h.start()
    await h.prime()
    const b = baseline(h)
    const err = await t.throwsAsync(h.add(h.node.podId()), { instanceOf: ServerError })
    t.log(err!.message)
    t.regex(err!.message, /injected DHCP failure/)
    t.is(setups, 1)
    await assertNoLeak(t, h, b, 'after the rolled-back add')
  })
})

test.serial('a rollback step that fails too: both errors reported, the later steps (CNI DEL, netns) still ran', async (t) => {
  const ops: PodNetworkOps = {
    ...nativePodNetworkOps,
    startDhcpServer: async () => {
      throw new Error('injected DHCP failure')
    },
    teardownContainerSide: async () => {
      throw new Error('injected teardown failure')
    },
  }
  await withHarness({ source: { ops } }, async (h) => {
    h.node.writeConf('10-bridge.conflist', h.node.bridgeConflist())
    await h.start()
    await h.prime()
    const b = baseline(h)
    const err = await t.throwsAsync(h.add(h.node.podId()), { instanceOf: ServerError })
    t.log(err!.message)
    t.regex(err!.message, /injected DHCP failure; then rolling back failed: injected teardown failure/)
    // the container side was never torn down, but CNI DEL and the netns deletion ran: nothing is left
    await assertNoLeak(t, h, b, 'after the failed rollback')
  })
})

test.serial('a link in the pod that conflicts with our bridge name: setup fails clearly, nothing leaks', async (t) => {
  await withHarness({}, async (h) => {
    // the plugin leaves a link named br0 in the pod (referenced by an IP, so it is a container link too)
    h.node.writeConf(
      '10-t.conflist',
      h.node.testConflist([{ links: [{ address: '10.1.90.5/24', hostAddress: '10.1.90.1/24' }, { name: 'br0', address: '10.3.0.5/24' }] }]),
    )
    await h.start()
    await h.prime()
    const b = baseline(h)
    const podId = h.node.podId()
    const err = await t.throwsAsync(h.add(podId), { instanceOf: ServerError })
    t.log(err!.message)
    t.regex(err!.message, /br0/)
    await assertNoLeak(t, h, b, 'after the failed setup')
    t.deepEqual(
      h.node.log().filter((l) => l.containerId === podId).map((l) => l.command),
      ['ADD', 'DEL'],
    )
  })
})

/**
 * The pod netns as CNI left it: links (name, MAC, MTU, flags, master), IPv4 addresses, routes, nft ruleset.
 * `lo` is left out: setup brings it up (a pod's loopback is up; Virtlet does the same) and teardown keeps it up.
 */
function podState(nsPath: string): string {
  const ip = (args: string[]) => JSON.parse(sh('nsenter', [`--net=${nsPath}`, 'ip', '-j', ...args]))
  const notLo = (l: any) => l.ifname !== 'lo' && l.dev !== 'lo'
  const links = ip(['link', 'show']).filter(notLo).map((l: any) => ({ name: l.ifname, mac: l.address, mtu: l.mtu, flags: l.flags, master: l.master, operstate: l.operstate }))
  const addrs = ip(['-4', 'addr', 'show']).filter(notLo).map((l: any) => ({ name: l.ifname, addrs: l.addr_info.map((a: any) => `${a.local}/${a.prefixlen} ${a.scope}`) }))
  const routes = ip(['-4', 'route', 'show', 'table', 'all']).filter(notLo)
  const nft = JSON.parse(sh('nsenter', [`--net=${nsPath}`, NFT, '-j', 'list', 'ruleset'])).nftables.filter((o: any) => !o.metainfo)
  return JSON.stringify({ links, addrs, routes, nft }, null, 1)
}

/** Whether a link is one of setup's bridges or taps. */
const ourDevice = (name: string) => /^(br|tap)\d+$/.test(name)

/**
 * A pod state split in two: without setup's bridges and taps (what a release's teardown, which leaves them to
 * the netns deletion, must restore exactly), and those devices with their IPv4 addresses.
 */
function splitOurDevices(state: string): { rest: string; ours: { name: string; flags: string[]; master?: string; addrs: string[] }[] } {
  const s = JSON.parse(state)
  const addrsOf = (name: string) => s.addrs.find((a: any) => a.name === name)?.addrs ?? []
  return {
    rest: JSON.stringify({ ...s, links: s.links.filter((l: any) => !ourDevice(l.name)), addrs: s.addrs.filter((a: any) => !ourDevice(a.name)) }, null, 1),
    ours: s.links.filter((l: any) => ourDevice(l.name)).map((l: any) => ({ name: l.name, flags: l.flags, master: l.master, addrs: addrsOf(l.name) })),
  }
}

/** The pod state once every UP link's operstate has settled (carrier follows a moment after "up"). */
async function settledPodState(nsPath: string): Promise<string> {
  const deadline = Date.now() + 5000
  for (;;) {
    const s = podState(nsPath)
    const links = JSON.parse(s).links as { flags: string[]; operstate: string }[]
    if (links.every((l) => !l.flags.includes('UP') || l.operstate === 'UP' || l.operstate === 'UNKNOWN')) return s
    if (Date.now() > deadline) throw new Error(`the pod netns does not settle: ${s}`)
    await new Promise((r) => setTimeout(r, 20))
  }
}

for (const [title, conf] of [
  ['bridge + host-local', (h: TapFdHarness) => h.node.bridgeConflist({ mtu: 9000 })],
  [
    'two interfaces, routes',
    (h: TapFdHarness) =>
      h.node.testConflist([
        {
          links: [
            { address: '10.1.90.5/24', gateway: '10.1.90.1', hostAddress: '10.1.90.1/24', routes: [{ dst: '0.0.0.0/0', gw: '10.1.90.1' }, { dst: '10.10.42.0/24', gw: '10.1.90.90' }] },
            { name: 'eth1', address: '10.2.0.7/16', mtu: 9000, routes: [{ dst: '10.20.0.0/16', gw: '10.2.0.1' }] },
          ],
        },
      ]),
  ],
] as const)
for (const restart of [false, true]) {
  const when = restart ? ', released after a server restart with recover' : ''
  test.serial(`teardown on release restores the pod netns exactly as CNI left it, but for the emptied bridges and taps left to the netns deletion (${title}${when})`, async (t) => {
    const states: { beforeSetup?: string; afterSetup?: string; afterTeardown?: string; loUp?: boolean; keepDevices?: boolean } = {}
    const ops: PodNetworkOps = {
      ...nativePodNetworkOps,
      setupContainerSide: async (ns, r, o) => {
        states.beforeSetup = await settledPodState(ns)
        const out = await nativePodNetworkOps.setupContainerSide(ns, r, o)
        states.afterSetup = podState(ns)
        return out
      },
      teardownContainerSide: async (ns, csn, o) => {
        await nativePodNetworkOps.teardownContainerSide(ns, csn, o)
        states.keepDevices = o?.keepDevices
        states.afterTeardown = await settledPodState(ns)
        states.loUp = JSON.parse(sh('nsenter', [`--net=${ns}`, 'ip', '-j', 'link', 'show', 'lo']))[0].flags.includes('UP')
      },
    }
    await withHarness({ source: { ops } }, async (h) => {
      h.node.writeConf('10-net.conflist', conf(h))
      await h.start()
      const podId = h.node.podId()
      const csnJson = await h.add(podId)
      if (restart) {
        await h.restart()
        await h.recover(podId, csnJson)
      }
      t.truthy(states.beforeSetup)
      t.not(states.afterSetup, states.beforeSetup, 'setup changed the netns')
      await h.client.releaseFDs(podId)
      // Release deletes the netns right after, so its teardown leaves the bridges and taps to that deletion:
      // everything else is exactly as CNI left it, and those devices are down, no ports, without addresses.
      t.true(states.keepDevices)
      t.is(splitOurDevices(states.beforeSetup!).ours.length, 0)
      const after = splitOurDevices(states.afterTeardown!)
      t.is(after.rest, states.beforeSetup!)
      const ifaces = JSON.parse(states.afterSetup!).links.filter((l: any) => ourDevice(l.name)).length
      t.true(ifaces >= 2, 'setup made a bridge and a tap per interface')
      t.is(after.ours.length, ifaces)
      for (const d of after.ours) t.deepEqual({ ...d, up: d.flags.includes('UP') }, { ...d, up: false, master: undefined, addrs: [] }, d.name)
      t.false(existsSync(h.nsPath(podId)), 'release deleted the netns')
      t.true(states.loUp)
    })
  })
}

test.serial('20 pods added at once: all succeed with distinct correct leases, a sample leases over DHCP, all released cleanly', async (t) => {
  await withHarness({}, async (h) => {
    h.node.writeConf('10-bridge.conflist', h.node.bridgeConflist({ subnet: '10.78.0.0/24' }))
    await h.start()
    await h.prime()
    const b = baseline(h)
    const ids = Array.from({ length: 20 }, () => h.node.podId())
    const csns = (await Promise.all(ids.map((id) => h.add(id)))).map((j) => JSON.parse(j))
    const leases = new Map(h.node.leases('tmbridge').map((l) => [l.containerId, l.ip]))
    t.is(leases.size, 20)
    for (const [i, csn] of csns.entries()) {
      t.is(csn.NsPath, h.nsPath(ids[i]))
      t.deepEqual(csn.Result.ips, [{ version: '4', interface: 2, address: `${leases.get(ids[i])}/24`, gateway: '10.78.0.1' }])
      const mac = csn.Result.interfaces.find((x: any) => x.sandbox).mac
      t.deepEqual(csn.Interfaces, [{ Type: 0, Name: 'eth0', HardwareAddr: macToBase64(mac), PCIAddress: '', MTU: 1500, VlanID: 0 }])
    }
    t.is(new Set(csns.map((c) => c.Result.ips[0].address)).size, 20)
    // a sample gets its lease from its own pod's DHCP server, through the fd
    for (const i of [0, 9, 19]) {
      const { fds } = await h.client.getFDs(ids[i])
      const vm = new FakeVm()
      try {
        const mac = csns[i].Result.interfaces.find((x: any) => x.sandbox).mac
        await vm.attach(fds[0], mac, 1500)
        const lease = await vm.dhcpcd()
        t.is(lease.new_ip_address, leases.get(ids[i]) ?? 'no host-local lease')
        t.is(lease.new_routers, '10.78.0.1')
      } finally {
        for (const fd of fds) closeFd(fd)
        vm.cleanup()
      }
    }
    await Promise.all(ids.map((id) => h.client.releaseFDs(id)))
    await assertNoLeak(t, h, b, 'after releasing 20 pods')
  })
})

test.serial('adds while this process keeps forking children: a just-created tap held by a forked child for a moment is not "busy"', async (t) => {
  await withHarness({}, async (h) => {
    h.node.writeConf('10-bridge.conflist', h.node.bridgeConflist({ subnet: '10.81.0.0/24' }))
    await h.start()
    await h.prime()
    const b = baseline(h)
    // a stream of forks from this process, as when many CNI plugins are spawned at once
    let forking = true
    const forks = (async () => {
      let n = 0
      while (forking) {
        await Promise.all(Array.from({ length: 8 }, () => new Promise((r) => spawn('/bin/true').on('exit', r))))
        n += 8
      }
      return n
    })()
    const ids = Array.from({ length: 12 }, () => h.node.podId())
    const results = await Promise.allSettled(ids.map((id) => h.add(id)))
    forking = false
    t.log(`${await forks} children forked during the adds`)
    t.deepEqual(results.filter((r) => r.status === 'rejected').map((r) => String((r as PromiseRejectedResult).reason)), [])
    await Promise.all(ids.filter((_, i) => results[i].status === 'fulfilled').map((id) => h.client.releaseFDs(id)))
    await assertNoLeak(t, h, b, 'after releasing')
  })
})

test.serial('a netns left by a crash (with its CNI attachment) is cleaned and the add succeeds', async (t) => {
  await withHarness({}, async (h) => {
    h.node.writeConf('10-bridge.conflist', h.node.bridgeConflist())
    await h.start()
    await h.prime()
    const b = baseline(h)
    const podId = h.node.podId()
    // a previous life: netns created, CNI ADD done, container side set up, then the process died
    await createNetns(podId, { dir: h.netnsDir })
    const { result } = await h.cni.addSandboxToNetwork(podId, 'vm', 'default')
    const old = await nativePodNetworkOps.setupContainerSide(h.nsPath(podId), goJsonStringify(toGoCniResult(result)), {})
    for (const fd of old.fds) closeFd(fd)
    t.is(h.node.leases('tmbridge').length, 1)
    const csn = JSON.parse(await h.add(podId))
    const leases = h.node.leases('tmbridge')
    t.is(leases.length, 1, 'the stale lease was freed')
    t.is(csn.Result.ips[0].address, `${leases[0].ip}/24`)
    // one pod veth on the node bridge: the old one is gone
    const ports = JSON.parse(h.node.node.exec('ip', ['-j', 'link', 'show', 'master', 'tmbr0']))
    t.is(ports.length, 1)
    const { fds } = await h.client.getFDs(podId)
    t.is(fds.length, 1)
    for (const fd of fds) closeFd(fd)
    await h.client.releaseFDs(podId)
    t.false(existsSync(h.nsPath(podId)))
    await assertNoLeak(t, h, b, 'after the release')
  })
})
