/**
 * The CNI client against real plugins: Debian's bridge + host-local and our tmtest plugin, all run inside a
 * test "node" netns (execWrapper `ip netns exec <node>`), never in the root netns.
 */
import test from 'ava'
import { spawnSync } from 'node:child_process'
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { CniError, ExecCniClient, InvalidInputError, type CniResult } from '../src/index'
import { deleteNetns, isNetnsMount } from '../src/native'
import { CniTestNode, processAlive } from './helpers/cni'
import { sh } from './helpers/env'

async function withNode(fn: (node: CniTestNode) => Promise<void>): Promise<void> {
  const node = new CniTestNode()
  try {
    await fn(node)
  } finally {
    node.cleanup()
  }
}

function podAddrs(ns: string, ifName = 'eth0'): string[] {
  const j = JSON.parse(sh('ip', ['-n', ns, '-j', 'addr', 'show', 'dev', ifName])) as { addr_info: { family: string; local: string; prefixlen: number }[] }[]
  return j[0].addr_info.filter((a) => a.family === 'inet').map((a) => `${a.local}/${a.prefixlen}`)
}

function podRoutes(ns: string): string[] {
  return sh('ip', ['-n', ns, '-4', 'route', 'show'])
    .split('\n')
    .map((l) => l.trim())
    .filter(Boolean)
}

test('bridge + host-local: ADD gives a normalised result and a lease, DEL frees it and removes the veth', async (t) => {
  await withNode(async (node) => {
    node.writeConf('10-bridge.conflist', node.bridgeConflist({ subnet: '10.77.0.0/24', mtu: 1400 }))
    const client = node.client()
    const pod = node.createPod()
    const linksBefore = node.nodeLinks()
    const att = await client.addSandboxToNetwork(pod.name, 'vm', 'default')
    t.is(att.nsPath, `/var/run/netns/${pod.name}`)
    t.is(att.network, 'tmbridge')
    const r = att.result
    t.is(r.cniVersion, '1.0.0')
    t.is(r.ips.length, 1)
    const ip = r.ips[0]
    t.regex(ip.address, /^10\.77\.0\.\d+\/24$/)
    t.is(ip.gateway, '10.77.0.1')
    const podIface = r.interfaces[ip.interface ?? -1]
    t.is(podIface.name, 'eth0')
    t.is(podIface.sandbox, att.nsPath)
    t.deepEqual(r.routes, [{ dst: '0.0.0.0/0' }])
    // the pod really has it, the bridge and host veth are in the node netns (not the root netns)
    t.deepEqual(podAddrs(pod.name), [ip.address])
    t.is(JSON.parse(sh('ip', ['-n', pod.name, '-j', 'link', 'show', 'eth0']))[0].mtu, 1400)
    t.true(node.nodeLinks().includes('tmbr0'))
    t.false(sh('ip', ['-o', 'link', 'show']).includes('tmbr0'))
    const hostVeths = node.nodeLinks().filter((l) => !linksBefore.includes(l) && l !== 'tmbr0')
    t.is(hostVeths.length, 1)
    // host-local's lease names our container id and interface
    t.deepEqual(node.leases('tmbridge'), [{ ip: ip.address.split('/')[0], containerId: pod.name, ifName: 'eth0' }])
    t.true(existsSync(join(node.cacheDir, `${pod.name}-eth0.json`)))

    await client.removeSandboxFromNetwork(pod.name, 'vm', 'default')
    t.deepEqual(node.leases('tmbridge'), [])
    t.deepEqual(node.nodeLinks().filter((l) => !linksBefore.includes(l) && l !== 'tmbr0'), [])
    t.deepEqual(node.linksIn(pod.name), ['lo'])
    t.false(existsSync(join(node.cacheDir, `${pod.name}-eth0.json`)))
    // DEL is idempotent
    await t.notThrowsAsync(client.removeSandboxFromNetwork(pod.name, 'vm', 'default'))
  })
})

test('results of every Debian-plugin spec version (0.3.1, 0.4.0, 1.0.0) normalise alike', async (t) => {
  await withNode(async (node) => {
    const shapes: Omit<CniResult, 'cniVersion'>[] = []
    for (const v of ['0.3.1', '0.4.0', '1.0.0']) {
      node.clearConf()
      node.writeConf('10-bridge.conflist', node.bridgeConflist({ cniVersion: v, name: `net${v.replace(/\./g, '')}` }))
      const client = node.client()
      const pod = node.createPod()
      const { result } = await client.addSandboxToNetwork(pod.name, 'vm', 'default')
      t.is(result.cniVersion, v)
      const { cniVersion: _v, ...rest } = result
      // normalise away what differs per pod (MACs, names, netns, the leased address)
      shapes.push({
        ...rest,
        interfaces: rest.interfaces.map((i) => ({ name: i.sandbox ? i.name : 'host', sandbox: i.sandbox ? 'pod' : undefined })),
        ips: rest.ips.map((i) => ({ ...i, address: i.address.replace(/\.\d+\//, '.X/') })),
      })
      await client.removeSandboxFromNetwork(pod.name, 'vm', 'default')
    }
    t.deepEqual(shapes[0], shapes[1])
    t.deepEqual(shapes[1], shapes[2])
  })
})

test('tmtest results of 0.3.0, 0.3.1, 0.4.0, 1.0.0 and 1.1.0 normalise to the same shape', async (t) => {
  await withNode(async (node) => {
    const seen: string[] = []
    for (const v of ['0.3.0', '0.3.1', '0.4.0', '1.0.0', '1.1.0']) {
      node.clearConf()
      node.writeConf(
        '10-t.conflist',
        node.testConflist(
          [{ links: [{ address: '10.9.0.5/24', gateway: '10.9.0.1', mac: '42:a4:a6:22:80:2e', routes: [{ dst: '0.0.0.0/0', gw: '10.9.0.1' }] }] }],
          { cniVersion: v },
        ),
      )
      const client = node.client()
      const pod = node.createPod()
      const { result, raw } = await client.addSandboxToNetwork(pod.name, 'vm', 'default')
      t.is(raw.cniVersion, v)
      t.is(((raw.ips as Record<string, unknown>[])[0].version), v < '1.0.0' ? '4' : undefined)
      t.is(result.cniVersion, v)
      t.deepEqual(result.ips, [{ address: '10.9.0.5/24', gateway: '10.9.0.1', interface: 1 }])
      t.deepEqual(result.interfaces[1], { name: 'eth0', mac: '42:a4:a6:22:80:2e', sandbox: `/var/run/netns/${pod.name}` })
      seen.push(JSON.stringify({ ...result, cniVersion: 'x', interfaces: result.interfaces.slice(1) }).replace(pod.name, 'POD'))
      await client.removeSandboxFromNetwork(pod.name, 'vm', 'default')
    }
    t.is(new Set(seen).size, 1)
  })
})

test('CHECK: passes on a healthy bridge attachment; a broken tmtest attachment fails with the plugin\'s CNI error', async (t) => {
  await withNode(async (node) => {
    node.writeConf('10-bridge.conflist', node.bridgeConflist({ cniVersion: '1.0.0' }))
    const client = node.client()
    const pod = node.createPod()
    await client.addSandboxToNetwork(pod.name, 'vm', 'default')
    await t.notThrowsAsync(client.checkSandboxNetwork(pod.name, 'vm', 'default'))
    await client.removeSandboxFromNetwork(pod.name, 'vm', 'default')
    const none = await t.throwsAsync(client.checkSandboxNetwork(pod.name, 'vm', 'default'), { instanceOf: CniError })
    t.is(none?.code, 'ERR_NOT_FOUND')

    node.clearConf()
    node.writeConf('10-t.conflist', node.testConflist([{ links: [{ address: '10.9.0.5/24' }] }], { cniVersion: '0.4.0' }))
    const pod2 = node.createPod()
    const { result } = await client.addSandboxToNetwork(pod2.name, 'vm', 'default')
    await t.notThrowsAsync(client.checkSandboxNetwork(pod2.name, 'vm', 'default'))
    const check = node.log().filter((l) => l.command === 'CHECK')
    t.is(check.length, 1)
    t.deepEqual(check[0].stdin.prevResult, JSON.parse(readFileSync(join(node.cacheDir, `${pod2.name}-eth0.json`), 'utf8')).result)
    // break it: remove the host side
    node.node.exec('ip', ['link', 'del', result.interfaces[0].name])
    const err = await t.throwsAsync(client.checkSandboxNetwork(pod2.name, 'vm', 'default'), { instanceOf: CniError })
    t.is(err?.code, 'ERR_CNI')
    t.is(err?.cniCode, 100)
    t.is(err?.plugin, 'tmtest')
    t.is(err?.command, 'CHECK')
    t.regex(err?.cniMsg ?? '', /host link .* is missing/)
    await client.removeSandboxFromNetwork(pod2.name, 'vm', 'default')
  })
})

test('CHECK is refused for a 0.3.x network and is a no-op with disableCheck', async (t) => {
  await withNode(async (node) => {
    node.writeConf('10-t.conflist', node.testConflist([{ links: [{ address: '10.9.0.5/24' }] }], { cniVersion: '0.3.1' }))
    const client = node.client()
    const pod = node.createPod()
    await client.addSandboxToNetwork(pod.name, 'vm', 'default')
    const err = await t.throwsAsync(client.checkSandboxNetwork(pod.name, 'vm', 'default'), { instanceOf: CniError })
    t.is(err?.code, 'ERR_INVALID')
    t.regex(err?.message ?? '', /CHECK needs 0.4.0/)
    await client.removeSandboxFromNetwork(pod.name, 'vm', 'default')

    node.clearConf()
    node.writeConf('10-t.conflist', { ...node.testConflist([{ links: [{ address: '10.9.0.5/24' }] }]), disableCheck: true })
    const pod2 = node.createPod()
    await client.addSandboxToNetwork(pod2.name, 'vm', 'default')
    await client.checkSandboxNetwork(pod2.name, 'vm', 'default')
    t.is(node.log().filter((l) => l.command === 'CHECK').length, 0)
    await client.removeSandboxFromNetwork(pod2.name, 'vm', 'default')
  })
})

test('a chain: env and stdin per plugin, prevResult passed along, DEL in reverse with the cached result', async (t) => {
  await withNode(async (node) => {
    node.writeConf(
      '10-chain.conflist',
      node.bridgeConflist({ name: 'chain', plugins: [node.testPlugin({ mode: 'passthrough', addSearch: ['one.test'] }), node.testPlugin({ mode: 'passthrough', addSearch: ['two.test'] })] }),
    )
    const client = node.client()
    const pod = node.createPod()
    const att = await client.addSandboxToNetwork(pod.name, 'vm', 'kube-system')
    t.deepEqual(att.result.dns.search, ['one.test', 'two.test'])
    const adds = node.log().filter((l) => l.command === 'ADD')
    t.is(adds.length, 2)
    for (const a of adds) {
      t.is(a.containerId, pod.name)
      t.is(a.netns, `/var/run/netns/${pod.name}`)
      t.is(a.ifName, 'eth0')
      t.is(a.args, `IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=vm;K8S_POD_INFRA_CONTAINER_ID=${pod.name}`)
      t.is(a.path.split(':')[1], '/usr/lib/cni')
      t.is(a.stdin.name, 'chain')
      t.is(a.stdin.cniVersion, '1.0.0')
    }
    // the first passthrough got bridge's result, the second got the first's
    const bridgeResult = adds[0].stdin.prevResult as { ips: unknown[]; dns?: { search?: string[] } }
    t.deepEqual(bridgeResult.ips.length, 1)
    t.is(bridgeResult.dns?.search, undefined)
    t.deepEqual((adds[1].stdin.prevResult as { dns: { search: string[] } }).dns.search, ['one.test'])

    await client.removeSandboxFromNetwork(pod.name, 'vm', 'kube-system')
    const dels = node.log().filter((l) => l.command === 'DEL')
    // reverse order: the last passthrough first; both get the final ADD result
    t.deepEqual(dels.map((d) => (d.stdin.addSearch as string[])[0]), ['two.test', 'one.test'])
    for (const d of dels) t.deepEqual(d.stdin.prevResult, att.raw)
    t.deepEqual(node.leases('chain'), [])
  })
})

test('empty pod name or namespace: CNI_ARGS is only IgnoreUnknown=1', async (t) => {
  await withNode(async (node) => {
    node.writeConf('10-t.conflist', node.testConflist([{ mode: 'noop' }]))
    const client = node.client()
    const pod = node.createPod()
    await client.addSandboxToNetwork(pod.name, 'vm', '')
    await client.removeSandboxFromNetwork(pod.name, '', 'default')
    t.deepEqual(node.log().map((l) => l.args), ['IgnoreUnknown=1', 'IgnoreUnknown=1'])
  })
})

test('DEL after a restart: a new client uses the on-disk cache (config and result), even after the config changed', async (t) => {
  await withNode(async (node) => {
    node.writeConf('10-bridge.conflist', node.bridgeConflist({ name: 'first', plugins: [node.testPlugin({ mode: 'passthrough' })] }))
    const pod = node.createPod()
    const att = await node.client().addSandboxToNetwork(pod.name, 'vm', 'default')
    t.is(node.leases('first').length, 1)
    // the operator switches the node to another network; the old pod must still be removed from "first"
    node.clearConf()
    node.writeConf('10-other.conflist', node.bridgeConflist({ name: 'other', bridge: 'tmbr1', subnet: '10.78.0.0/24' }))
    const restarted = node.client()
    await restarted.removeSandboxFromNetwork(pod.name, 'vm', 'default')
    t.deepEqual(node.leases('first'), [])
    const del = node.log().filter((l) => l.command === 'DEL')
    t.is(del.length, 1)
    t.deepEqual(del[0].stdin.prevResult, att.raw)
    t.deepEqual(node.linksIn(pod.name), ['lo'])
  })
})

test('DEL without a cache entry still runs every plugin, without prevResult', async (t) => {
  await withNode(async (node) => {
    node.writeConf('10-bridge.conflist', node.bridgeConflist({ plugins: [node.testPlugin({ mode: 'passthrough' })] }))
    const pod = node.createPod()
    const client = node.client()
    await client.addSandboxToNetwork(pod.name, 'vm', 'default')
    for (const f of readdirSync(node.cacheDir)) writeFileSync(join(node.cacheDir, f), 'torn{')
    await client.removeSandboxFromNetwork(pod.name, 'vm', 'default')
    const del = node.log().filter((l) => l.command === 'DEL')
    t.is(del.length, 1)
    t.false('prevResult' in del[0].stdin)
    t.deepEqual(node.leases('tmbridge'), [])
    // never added at all: DEL is fine too
    await t.notThrowsAsync(client.removeSandboxFromNetwork(node.podId(), 'vm', 'default'))
  })
})

test('0.3.x networks: DEL gets no prevResult (as libcni)', async (t) => {
  await withNode(async (node) => {
    node.writeConf('10-t.conflist', node.bridgeConflist({ cniVersion: '0.3.1', plugins: [node.testPlugin({ mode: 'passthrough' })] }))
    const pod = node.createPod()
    const client = node.client()
    await client.addSandboxToNetwork(pod.name, 'vm', 'default')
    await client.removeSandboxFromNetwork(pod.name, 'vm', 'default')
    const del = node.log().filter((l) => l.command === 'DEL')
    t.false('prevResult' in del[0].stdin)
    t.deepEqual(node.leases('tmbridge'), [])
  })
})

for (const fault of ['fail', 'garbage', 'badresult', 'fail-after-setup'] as const) {
  test(`a plugin that ${fault === 'badresult' ? 'returns an invalid result' : fault === 'garbage' ? 'returns garbage' : fault === 'fail' ? 'fails' : 'fails after making its links'}: clear error, DEL run, no lease, link or cache left`, async (t) => {
    await withNode(async (node) => {
      const second =
        fault === 'fail'
          ? node.testPlugin({ mode: 'fail', fault: { code: 42, msg: 'quota exceeded', details: 'try a smaller pod' } })
          : fault === 'garbage'
            ? node.testPlugin({ mode: 'garbage' })
            : fault === 'badresult'
              ? node.testPlugin({ mode: 'noop', result: { ips: [{ address: 'bogus' }] } })
              : node.testPlugin({ links: [{ name: 'net1', address: '10.9.0.5/24' }], fault: { kind: 'fail', after: true, msg: 'late failure' } })
      node.writeConf('10-bridge.conflist', node.bridgeConflist({ plugins: [second] }))
      const client = node.client()
      const pod = node.createPod()
      const before = node.nodeLinks()
      const err = await t.throwsAsync(client.addSandboxToNetwork(pod.name, 'vm', 'default'), { instanceOf: CniError })
      t.is(err?.code, 'ERR_CNI')
      t.is(err?.plugin, 'tmtest')
      t.is(err?.command, 'ADD')
      t.deepEqual(err?.cleanupErrors, [])
      if (fault === 'fail') {
        t.is(err?.cniCode, 42)
        t.is(err?.cniMsg, 'quota exceeded')
        t.is(err?.details, 'try a smaller pod')
        t.is(err?.exitCode, 1)
        t.regex(err?.message ?? '', /CNI plugin "tmtest" ADD failed: quota exceeded \(try a smaller pod\) \[CNI code 42\]/)
      } else if (fault === 'garbage') {
        t.regex(err?.message ?? '', /printed output that is not JSON: "this is not JSON \{"/)
      } else if (fault === 'badresult') {
        t.regex(err?.message ?? '', /ips\[0\]\.address: "bogus" is not an address/)
      } else {
        t.is(err?.cniMsg, 'late failure')
      }
      // the rollback DEL ran for the whole list (reverse order), so bridge/host-local freed the lease
      t.deepEqual(node.leases('tmbridge'), [])
      t.deepEqual(node.nodeLinks().filter((l) => !before.includes(l) && l !== 'tmbr0'), []) // the bridge is node infrastructure: bridge's DEL keeps it
      t.deepEqual(node.linksIn(pod.name), ['lo'])
      t.deepEqual(existsSync(node.cacheDir) ? readdirSync(node.cacheDir) : [], [])
    })
  })
}

test('a plugin that hangs is killed with its process group at the timeout; DEL runs; nothing leaks', async (t) => {
  await withNode(async (node) => {
    const pidFile = join(node.dir, 'hang.pid')
    node.writeConf('10-bridge.conflist', node.bridgeConflist({ plugins: [node.testPlugin({ mode: 'hang', fault: { pidFile } })] }))
    const client = node.client({ timeoutMs: 2000 })
    const pod = node.createPod()
    const err = await t.throwsAsync(client.addSandboxToNetwork(pod.name, 'vm', 'default'), { instanceOf: CniError })
    t.is(err?.code, 'ERR_TIMEOUT')
    t.is(err?.plugin, 'tmtest')
    t.is(err?.signal, 'SIGKILL')
    t.regex(err?.message ?? '', /timed out after 2000 ms and was killed/)
    const pids = readFileSync(pidFile, 'utf8').trim().split(' ').map(Number)
    t.is(pids.length, 2)
    // the plugin and the child it started are both gone (reaped or zombie-free) soon after the kill
    const deadline = Date.now() + 5000
    while (pids.some(processAlive) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20))
    t.deepEqual(pids.filter(processAlive), [])
    t.deepEqual(node.leases('tmbridge'), [])
    t.deepEqual(node.linksIn(pod.name), ['lo'])
  })
})

test('bad input and missing things: clear errors before any plugin runs', async (t) => {
  await withNode(async (node) => {
    node.writeConf('10-t.conflist', node.testConflist([{ mode: 'noop' }]))
    const client = node.client()
    for (const id of ['', '../x', 'a b', '-x']) {
      const err = await t.throwsAsync(client.addSandboxToNetwork(id, 'vm', 'default'), { instanceOf: InvalidInputError })
      t.regex(err?.message ?? '', /invalid pod id/)
    }
    await t.throwsAsync(client.addSandboxToNetwork(node.podId(), 'vm;x=y', 'default'), { instanceOf: InvalidInputError, message: /invalid pod name/ })
    const missing = await t.throwsAsync(client.addSandboxToNetwork(node.podId(), 'vm', 'default'), { instanceOf: CniError })
    t.is(missing?.code, 'ERR_NOT_FOUND')
    t.regex(missing?.message ?? '', /pod netns \/var\/run\/netns\/.* does not exist/)
    t.throws(() => new ExecCniClient({ ifName: 'a/b' }), { instanceOf: InvalidInputError })

    node.clearConf()
    node.writeConf('10-t.conflist', { cniVersion: '1.0.0', name: 'n', plugins: [{ type: 'no-such-plugin' }] })
    const pod = node.createPod()
    const nf = await t.throwsAsync(client.addSandboxToNetwork(pod.name, 'vm', 'default'), { instanceOf: CniError })
    t.is(nf?.code, 'ERR_NOT_FOUND')
    t.regex(nf?.message ?? '', /CNI plugin "no-such-plugin" not found in .*fixtures\/cni\/bin, \/usr\/lib\/cni/)
    t.is(node.log().length, 0)
  })
})

test('getDummyNetwork: creates its netns once per client, adds it with empty name/namespace; a new lifetime replaces the old one', async (t) => {
  await withNode(async (node) => {
    node.writeConf('10-bridge.conflist', node.bridgeConflist({ plugins: [node.testPlugin({ mode: 'passthrough' })] }))
    const dummyPodId = node.podId('tmdummy')
    const calls: string[] = []
    // synchronous ones, as a native binding may provide
    const ops = {
      createNetns(path: string) {
        calls.push(`create ${path}`)
        sh('ip', ['netns', 'add', path.split('/').pop() as string])
      },
      async deleteNetns(path: string) {
        calls.push(`delete ${path}`)
        sh('ip', ['netns', 'del', path.split('/').pop() as string])
      },
    }
    const client = node.client({ dummyPodId, ...ops })
    const [a, b] = await Promise.all([client.getDummyNetwork(), client.getDummyNetwork()])
    t.is(a, b)
    t.is(a, await client.getDummyNetwork())
    t.is(a.nsPath, `/var/run/netns/${dummyPodId}`)
    t.deepEqual(calls, [`create /var/run/netns/${dummyPodId}`])
    t.true(existsSync(a.nsPath))
    t.is(node.leases('tmbridge').length, 1)
    t.is(node.log()[0].args, 'IgnoreUnknown=1')
    // a restarted server: its first getDummyNetwork removes the old dummy (DEL, netns) and adds a new one
    const restarted = node.client({ dummyPodId, ...ops })
    const c = await restarted.getDummyNetwork()
    t.not(c, a)
    t.deepEqual(calls.slice(1), [`delete /var/run/netns/${dummyPodId}`, `create /var/run/netns/${dummyPodId}`])
    t.deepEqual(node.leases('tmbridge').map((l) => l.containerId), [dummyPodId])
    await restarted.releaseDummyNetwork()
    t.false(existsSync(c.nsPath))
    t.deepEqual(node.leases('tmbridge'), [])
    t.deepEqual(readdirSync(node.cacheDir), [])
  })
})

test('getDummyNetwork with the default (native) netns ops, and a failed ADD leaves no netns and is retried', async (t) => {
  await withNode(async (node) => {
    node.writeConf('10-t.conflist', node.testConflist([{ mode: 'fail' }]))
    const dummyPodId = node.podId('tmdummy')
    const client = node.client({ dummyPodId })
    await t.throwsAsync(client.getDummyNetwork(), { instanceOf: CniError, message: /injected failure/ })
    t.false(existsSync(`/var/run/netns/${dummyPodId}`))
    node.clearConf()
    node.writeConf('10-t.conflist', node.testConflist([{ links: [{ address: '169.254.1.9/32' }], mode: 'calico' }]))
    const d = await client.getDummyNetwork()
    t.deepEqual(d.result.ips, [{ address: '169.254.1.9/32' }])
    t.true(isNetnsMount(d.nsPath), 'a live netns is mounted at the dummy path')
    t.true(sh('ip', ['netns', 'list']).split('\n').some((l) => l.split(' ')[0] === dummyPodId), '`ip netns` sees it')
    await client.releaseDummyNetwork()
    t.false(existsSync(d.nsPath))
  })
})

test('getDummyNetwork in a netns dir of its own (native netns code, no `ip`/`unshare`/`umount`): made, added, released, file gone', async (t) => {
  await withNode(async (node) => {
    node.writeConf('10-t.conflist', node.testConflist([{ links: [{ address: '169.254.1.9/32' }], mode: 'calico' }]))
    const netnsDir = join(node.dir, 'netns')
    const dummyPodId = node.podId('tmdummy')
    const client = node.client({ dummyPodId, netnsDir })
    const d = await client.getDummyNetwork()
    try {
      t.is(d.nsPath, join(netnsDir, dummyPodId))
      t.true(isNetnsMount(d.nsPath))
      // The plugin ran inside it: the calico-like link is there.
      t.true(sh('nsenter', [`--net=${d.nsPath}`, 'ip', '-br', 'addr']).includes('169.254.1.9/32'))
      // A new client lifetime replaces it (DEL, delete, create) in the same dir.
      const again = node.client({ dummyPodId, netnsDir })
      const d2 = await again.getDummyNetwork()
      t.true(isNetnsMount(d2.nsPath))
      await again.releaseDummyNetwork()
      t.false(existsSync(d2.nsPath))
      t.deepEqual(readdirSync(netnsDir), [])
    } finally {
      if (existsSync(d.nsPath)) await deleteNetns(dummyPodId, netnsDir).catch(() => undefined)
      // Creating a netns made the dir a (shared) mount point, as `ip netns add` does with /var/run/netns.
      spawnSync('umount', ['-l', netnsDir])
    }
  })
})

test('tmtest modes do what they report: normal (MTU, routes, ping), weave-like, calico-like', async (t) => {
  await withNode(async (node) => {
    const client = node.client()
    // normal, two links, MTU 9000, an extra route
    node.writeConf(
      '10-t.conflist',
      node.testConflist([
        {
          links: [
            { address: '10.1.90.5/24', gateway: '10.1.90.1', hostAddress: '10.1.90.1/24', mtu: 9000, routes: [{ dst: '0.0.0.0/0', gw: '10.1.90.1' }, { dst: '10.10.42.0/24', gw: '10.1.90.90' }] },
            { name: 'eth1', address: '10.2.0.7/16' },
          ],
          dns: { nameservers: ['10.96.0.10'] },
        },
      ]),
    )
    const pod = node.createPod()
    const { result } = await client.addSandboxToNetwork(pod.name, 'vm', 'default')
    t.deepEqual(result.ips, [
      { address: '10.1.90.5/24', gateway: '10.1.90.1', interface: 1 },
      { address: '10.2.0.7/16', interface: 3 },
    ])
    t.deepEqual(result.routes, [{ dst: '0.0.0.0/0', gw: '10.1.90.1' }, { dst: '10.10.42.0/24', gw: '10.1.90.90' }])
    t.deepEqual(result.dns, { nameservers: ['10.96.0.10'] })
    t.deepEqual(node.linksIn(pod.name), ['eth0', 'eth1', 'lo'])
    t.deepEqual(podAddrs(pod.name), ['10.1.90.5/24'])
    t.deepEqual(podAddrs(pod.name, 'eth1'), ['10.2.0.7/16'])
    t.is(JSON.parse(sh('ip', ['-n', pod.name, '-j', 'link', 'show', 'eth0']))[0].mtu, 9000)
    t.is(JSON.parse(sh('ip', ['-n', pod.name, '-j', 'link', 'show', 'eth0']))[0].address, result.interfaces[1].mac)
    t.true(podRoutes(pod.name).includes('10.10.42.0/24 via 10.1.90.90 dev eth0'))
    t.regex(pod.exec('busybox', ['ping', '-c', '1', '-W', '2', '10.1.90.1']), /1 packets received/)
    await client.removeSandboxFromNetwork(pod.name, 'vm', 'default')
    t.deepEqual(node.linksIn(pod.name), ['lo'])

    // weave-like: the pod is fully set up, the result has one IP and nothing else
    node.clearConf()
    node.writeConf('10-t.conflist', node.testConflist([{ mode: 'weave', links: [{ address: '10.32.0.5/12', gateway: '10.32.0.1', routes: [{ dst: '0.0.0.0/0', gw: '10.32.0.1' }] }] }], { cniVersion: '0.3.1' }))
    const weave = node.createPod()
    const w = await client.addSandboxToNetwork(weave.name, 'vm', 'default')
    t.deepEqual(w.raw, { cniVersion: '0.3.1', ips: [{ version: '4', address: '10.32.0.5/12', gateway: '10.32.0.1' }], dns: {} })
    t.deepEqual(w.result.interfaces, [])
    t.deepEqual(w.result.routes, [])
    t.true(podRoutes(weave.name).includes('default via 10.32.0.1 dev eth0'))
    t.deepEqual(podAddrs(weave.name), ['10.32.0.5/12'])
    await client.removeSandboxFromNetwork(weave.name, 'vm', 'default')

    // calico-like
    node.clearConf()
    node.writeConf('10-t.conflist', node.testConflist([{ mode: 'calico', links: [{ address: '192.168.7.9/32' }] }], { cniVersion: '0.3.1' }))
    const cal = node.createPod()
    const c = await client.addSandboxToNetwork(cal.name, 'vm', 'default')
    t.deepEqual(c.result.ips, [{ address: '192.168.7.9/32' }])
    t.is(c.result.interfaces.length, 1)
    t.is(c.result.interfaces[0].mac, 'ee:ee:ee:ee:ee:ee')
    t.is(c.result.interfaces[0].sandbox, undefined)
    t.deepEqual(podAddrs(cal.name), ['192.168.7.9/32'])
    t.deepEqual(podRoutes(cal.name), ['default via 169.254.1.1 dev eth0', '169.254.1.1 dev eth0 scope link'])
    const hostIf = c.result.interfaces[0].name
    t.is(node.node.exec('cat', [`/proc/sys/net/ipv4/conf/${hostIf}/proxy_arp`]).trim(), '1')
    t.true(node.node.exec('ip', ['-4', 'route', 'show']).includes(`192.168.7.9 dev ${hostIf}`))
    await client.removeSandboxFromNetwork(cal.name, 'vm', 'default')
    t.false(node.nodeLinks().includes(hostIf))
  })
})

test('tmnoop (the sh plugin for benchmarks) prints its result file, per container when given', async (t) => {
  await withNode(async (node) => {
    const fixed = { cniVersion: '1.0.0', ips: [{ address: '10.1.90.5/24', gateway: '10.1.90.1' }], dns: {} }
    const resultFile = join(node.dir, 'noop.json')
    writeFileSync(resultFile, JSON.stringify(fixed))
    const resultDir = join(node.dir, 'noop')
    sh('mkdir', ['-p', resultDir])
    node.writeConf('10-noop.conf', { cniVersion: '1.0.0', name: 'noop', type: 'tmnoop', resultFile, resultDir })
    const client = node.client()
    const pod = node.createPod()
    const a = await client.addSandboxToNetwork(pod.name, 'vm', 'default')
    t.deepEqual(a.raw, fixed)
    t.deepEqual(node.linksIn(pod.name), ['lo'])
    const pod2 = node.createPod()
    writeFileSync(join(resultDir, `${pod2.name}.json`), JSON.stringify({ ...fixed, ips: [{ address: '10.1.90.6/24' }] }))
    t.deepEqual((await client.addSandboxToNetwork(pod2.name, 'vm', 'default')).result.ips, [{ address: '10.1.90.6/24' }])
    await client.removeSandboxFromNetwork(pod.name, 'vm', 'default')
    await client.removeSandboxFromNetwork(pod2.name, 'vm', 'default')
    t.deepEqual(readdirSync(node.cacheDir), [])
  })
})

test('concurrent ADDs of 8 pods with bridge + host-local: distinct leases, all freed by DEL', async (t) => {
  await withNode(async (node) => {
    node.writeConf('10-bridge.conflist', node.bridgeConflist())
    const client = node.client()
    // a first pod creates the node's bridge (which stays, as with any bridge CNI setup); then take the snapshot
    const first = node.createPod()
    await client.addSandboxToNetwork(first.name, 'vm', 'default')
    await client.removeSandboxFromNetwork(first.name, 'vm', 'default')
    const before = node.snapshot()
    t.deepEqual(before.leases, [])
    const pods = Array.from({ length: 8 }, () => node.createPod())
    const atts = await Promise.all(pods.map((p) => client.addSandboxToNetwork(p.name, p.name, 'default')))
    const ips = atts.map((a) => a.result.ips[0].address.split('/')[0])
    t.is(new Set(ips).size, 8)
    const leases = node.leases('tmbridge')
    t.deepEqual(leases.map((l) => `${l.ip} ${l.containerId}`).sort(), pods.map((p, i) => `${ips[i]} ${p.name}`).sort())
    for (let i = 0; i < 8; i++) t.deepEqual(podAddrs(pods[i].name), [atts[i].result.ips[0].address])
    await Promise.all(pods.map((p) => client.removeSandboxFromNetwork(p.name, p.name, 'default')))
    t.deepEqual(node.leases('tmbridge'), [])
    t.deepEqual(node.nodeLinks(), ['lo', 'tmbr0'])
    t.deepEqual(node.snapshot(), before)
  })
})

test('plugins that exit non-zero without a CNI error, die by a signal, or print too much: clear errors with stderr', async (t) => {
  await withNode(async (node) => {
    const bin = join(node.dir, 'bin')
    sh('mkdir', ['-p', bin])
    const script = (name: string, body: string) => {
      writeFileSync(join(bin, name), `#!/bin/sh\ncat >/dev/null\n[ "$CNI_COMMAND" = ADD ] || exit 0\n${body}\n`, { mode: 0o755 })
    }
    script('exit3', 'echo "cannot frobnicate" >&2\nexit 3')
    script('selfkill', 'kill -SEGV $$')
    script('huge', 'head -c 2000000 /dev/zero | tr "\\0" "x"')
    script('errjson', 'echo \'{"code":7,"msg":"invalid network config"}\'\nexit 1')
    const client = node.client({ binDirs: [bin] })
    const cases: [string, (e: CniError) => void][] = [
      [
        'exit3',
        (e) => {
          t.is(e.exitCode, 3)
          t.is(e.stderr, 'cannot frobnicate')
          t.regex(e.message, /CNI plugin "exit3" ADD exited with status 3 without a CNI error: cannot frobnicate/)
        },
      ],
      [
        'selfkill',
        (e) => {
          t.is(e.signal, 'SIGSEGV')
          t.regex(e.message, /was killed by SIGSEGV/)
        },
      ],
      ['huge', (e) => t.regex(e.message, /output larger than 1048576 bytes/)],
      [
        'errjson',
        (e) => {
          t.is(e.cniCode, 7)
          t.is(e.cniMsg, 'invalid network config')
          t.is(e.details, undefined)
        },
      ],
    ]
    for (const [type, check] of cases) {
      node.clearConf()
      node.writeConf('10-x.conf', { cniVersion: '1.0.0', name: 'x', type })
      const pod = node.createPod()
      const err = await t.throwsAsync(client.addSandboxToNetwork(pod.name, 'vm', 'default'), { instanceOf: CniError })
      t.is(err?.code, 'ERR_CNI')
      t.is(err?.plugin, type)
      if (err) check(err)
    }
  })
})

test('DEL runs every plugin even when one fails, reports all failures, and keeps the cache for a retry', async (t) => {
  await withNode(async (node) => {
    node.writeConf(
      '10-bridge.conflist',
      node.bridgeConflist({
        plugins: [
          node.testPlugin({ mode: 'passthrough', fault: { kind: 'fail', on: ['DEL'], code: 5, msg: 'first DEL failure' } }),
          node.testPlugin({ mode: 'passthrough', fault: { kind: 'fail', on: ['DEL'], code: 6, msg: 'second DEL failure' } }),
        ],
      }),
    )
    const client = node.client()
    const pod = node.createPod()
    await client.addSandboxToNetwork(pod.name, 'vm', 'default')
    const err = await t.throwsAsync(client.removeSandboxFromNetwork(pod.name, 'vm', 'default'), { instanceOf: CniError })
    t.is(err?.command, 'DEL')
    t.regex(err?.message ?? '', /second DEL failure.*first DEL failure/)
    t.deepEqual(err?.cleanupErrors.map((e) => (e as CniError).cniCode), [6, 5])
    // bridge's DEL (last in reverse order) still ran: the lease and the pod's link are gone
    t.deepEqual(node.leases('tmbridge'), [])
    t.deepEqual(node.linksIn(pod.name), ['lo'])
    t.true(existsSync(join(node.cacheDir, `${pod.name}-eth0.json`)))
  })
})

test('tmtest: per-container settings (dummy vs pod), a mixed Calico + second network result, reverse order', async (t) => {
  await withNode(async (node) => {
    const dummyPodId = node.podId('tmdummy')
    const pod = node.createPod()
    node.writeConf(
      '10-t.conflist',
      node.testConflist([
        {
          reverse: true,
          links: [
            { style: 'calico', address: '192.168.7.9/32' },
            { name: 'eth1', address: '10.2.0.7/16', gateway: '10.2.0.1' },
          ],
          perContainer: { [dummyPodId]: { mode: 'calico', links: [{ address: '192.168.7.1/32' }] } },
        },
      ]),
    )
    const client = node.client({ dummyPodId })
    const dummy = await client.getDummyNetwork()
    t.deepEqual(dummy.result.ips, [{ address: '192.168.7.1/32' }])
    const { result } = await client.addSandboxToNetwork(pod.name, 'vm', 'default')
    // reverse: eth1's pair first, then the Calico link (host side only, IP without index/gateway)
    t.deepEqual(
      result.interfaces.map((i) => (i.sandbox ? i.name : i.mac === 'ee:ee:ee:ee:ee:ee' ? 'calico-host' : 'host')),
      ['host', 'eth1', 'calico-host'],
    )
    t.deepEqual(result.ips, [{ address: '10.2.0.7/16', gateway: '10.2.0.1', interface: 1 }, { address: '192.168.7.9/32' }])
    t.deepEqual(podAddrs(pod.name), ['192.168.7.9/32'])
    t.deepEqual(podAddrs(pod.name, 'eth1'), ['10.2.0.7/16'])
    t.true(podRoutes(pod.name).includes('169.254.1.1 dev eth0 scope link'))
    await client.removeSandboxFromNetwork(pod.name, 'vm', 'default')
    await client.releaseDummyNetwork()
    t.deepEqual(node.nodeLinks(), ['lo'])
  })
})
