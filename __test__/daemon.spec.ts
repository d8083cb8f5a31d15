/**
 * startDaemon in-process (the TypeScript API the command line wraps), on a test node with the Debian bridge +
 * host-local config: close() closes the DHCP servers and the tap fds but keeps the pod netns and the state, so a
 * new DHCP server can bind in the pod at once and a second startDaemon recovers the key by itself; a corrupt state
 * file is quarantined and reported, not fatal; bad options fail the start without leaving anything open.
 */
import test from 'ava'
import { closeSync, readdirSync, readlinkSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { FDClient } from '../src/client'
import { startDaemon } from '../src/daemon'
import { DEFAULT_NETNS_DIR, podNetnsPath } from '../src/defaults'
import { netnsPoolStatus, startDhcpServer, tapFdInfo } from '../src/native'
import { nativePodNetworkOps, type PodNetworkOps } from '../src/podnetwork'
import { CniTestNode } from './helpers/cni'
import { until } from './helpers/env'
import { addPayload, netnsNames, removeNetns } from './helpers/serve'

/** This process's fds on network namespaces, as `<fd> net:[<inode>]`. */
function netnsFds(): string[] {
  return readdirSync('/proc/self/fd').flatMap((f) => {
    try {
      const target = readlinkSync(`/proc/self/fd/${f}`)
      return target.startsWith('net:[') ? [`${f} ${target}`] : []
    } catch {
      return []
    }
  })
}

function tapFds(): number {
  return readdirSync('/proc/self/fd').filter((f) => {
    try {
      return readlinkSync(`/proc/self/fd/${f}`) === '/dev/net/tun'
    } catch {
      return false
    }
  }).length
}

test.serial('close() stops DHCP and closes fds but keeps netns and state; a new daemon recovers the key', async (t) => {
  const node = new CniTestNode('tmdd')
  node.writeConf('10-bridge.conflist', node.bridgeConflist({ subnet: '10.74.0.0/24', bridge: 'tmddbr0' }))
  const podId = node.podId('tmddp')
  const stateDir = join(node.dir, 'state')
  const socketPath = join(node.dir, 'sub', 'dir', 'tm.sock') // the socket's dir is made
  const opts = { socketPath, stateDir, cni: node.client({ cacheDir: join(stateDir, 'cni') }) }
  try {
    const tapsBefore = tapFds()
    let daemon = await startDaemon(opts)
    t.deepEqual(daemon.recovery, { recovered: [], cleaned: [], skipped: [], corrupt: [] })
    const client = new FDClient(socketPath)
    const csn = JSON.parse((await client.addFDs('k', addPayload(podId))).toString()) as { NsPath: string }
    t.is(tapFds(), tapsBefore + 1)
    t.deepEqual((await daemon.store.list()).records.map((r) => [r.key, r.status]), [['k', 'ready']])

    await daemon.close()
    t.is(tapFds(), tapsBefore, 'the tap fd is closed')
    t.false(await client.isRunning())
    t.true(netnsNames().includes(podId), 'the pod netns is kept')
    t.is((await daemon.store.list()).records.length, 1, 'the state is kept')
    // The DHCP server let go of its socket: another one binds in the pod at once.
    const dhcp = await startDhcpServer(csn.NsPath, JSON.stringify(csn))
    t.true(dhcp.running)
    await dhcp.stop()

    // Recovery hands the core the record's ContainerSideNetwork as the record holds it (nothing re-encoded).
    const record = (await daemon.store.list()).records[0]
    t.deepEqual(record.csn, csn, 'the record holds what the add answered')
    const coreGot: string[] = []
    const ops: PodNetworkOps = {
      ...nativePodNetworkOps,
      recoverContainerSide: (nsPath, csnJson) => (coreGot.push(`recover ${csnJson}`), nativePodNetworkOps.recoverContainerSide(nsPath, csnJson)),
      startDhcpServer: (nsPath, csnJson) => (coreGot.push(`dhcp ${csnJson}`), nativePodNetworkOps.startDhcpServer(nsPath, csnJson)),
    }
    daemon = await startDaemon({ ...opts, ops })
    t.deepEqual(daemon.recovery.recovered, ['k'])
    t.deepEqual(coreGot, [`recover ${JSON.stringify(record.csn)}`, `dhcp ${JSON.stringify(record.csn)}`])
    const { fds } = await client.getFDs('k')
    t.is(tapFdInfo(fds[0]).name, 'tap0')
    for (const fd of fds) closeSync(fd)
    await client.releaseFDs('k')
    t.false(netnsNames().includes(podId))
    t.deepEqual(node.leases('tmbridge'), [])
    t.deepEqual((await daemon.store.list()).records, [])
    await daemon.close()
    t.is(tapFds(), tapsBefore)
  } finally {
    removeNetns(podId)
    node.cleanup()
  }
})

test.serial('a corrupt state file is quarantined and reported; the daemon still starts', async (t) => {
  const node = new CniTestNode('tmdc')
  const stateDir = join(node.dir, 'state')
  const socketPath = join(node.dir, 'tm.sock')
  try {
    const daemon = await startDaemon({ socketPath, stateDir, cni: node.client() })
    await daemon.close()
    writeFileSync(join(stateDir, 'broken.json'), '{"key": "broken", "status": "rea')
    const again = await startDaemon({ socketPath, stateDir, cni: node.client() })
    t.deepEqual(again.recovery.corrupt, ['broken.json'])
    t.true((await again.store.list()).quarantined.some((f) => f.startsWith('broken.json.')))
    t.true(await new FDClient(socketPath).isRunning())
    await again.close()
  } finally {
    node.cleanup()
  }
})

test.serial('bad options fail the start and leave nothing open or listening', async (t) => {
  const node = new CniTestNode('tmdb')
  const socketPath = join(node.dir, 'tm.sock')
  try {
    const fdsBefore = readdirSync('/proc/self/fd').length
    await t.throwsAsync(startDaemon({ socketPath, stateDir: join(node.dir, 'state'), cni: node.client(), calicoSubnetSize: 40 }), { message: /calicoSubnetSize/ })
    await t.throwsAsync(startDaemon({ socketPath, stateDir: join(node.dir, 'state'), cni: node.client(), socketGroup: 'no-such-group-xyz' }), { message: /unknown group/ })
    t.false(await new FDClient(socketPath).isRunning())
    t.is(readdirSync('/proc/self/fd').length, fdsBefore)
  } finally {
    node.cleanup()
  }
})

test.serial('the daemon keeps spare netns made ahead: adds bind them, they are mounted nowhere, close() lets them go', async (t) => {
  const node = new CniTestNode('tmdp')
  node.writeConf('10-bridge.conflist', node.bridgeConflist({ subnet: '10.75.0.0/24', bridge: 'tmdpbr0' }))
  const pods = [node.podId('tmdpa'), node.podId('tmdpb')]
  const stateDir = join(node.dir, 'state')
  const socketPath = join(node.dir, 'tm.sock')
  const daemons: Array<{ close(): Promise<void> }> = []
  try {
    await t.throwsAsync(startDaemon({ socketPath, stateDir, cni: node.client(), netnsPool: -1 }), { code: 'ERR_INVALID', message: /netnsPool/ })
    t.is(netnsPoolStatus(), null)
    const fdsBefore = netnsFds()
    // Other spec files make and delete netns at the same time: only this test's pods and the spares' inodes count.
    const mine = () => netnsNames().filter((n) => pods.includes(n))
    /** Inodes of the namespaces mounted in the netns dir now. */
    const mountedInodes = () =>
      netnsNames().flatMap((n) => {
        try {
          return [statSync(podNetnsPath(DEFAULT_NETNS_DIR, n)).ino]
        } catch {
          return []
        }
      })
    const daemon = await startDaemon({ socketPath, stateDir, cni: node.client({ cacheDir: join(stateDir, 'cni') }), netnsPool: 3 })
    daemons.push(daemon)
    t.true(await until(() => netnsPoolStatus()?.spare === 3), JSON.stringify(netnsPoolStatus()))
    t.deepEqual(netnsPoolStatus(), { size: 3, spare: 3, ipv6: false })
    const sparesNow = () => netnsFds().filter((f) => !fdsBefore.includes(f))
    t.is(sparesNow().length, 3, 'three spare namespaces, each held by an fd')
    const spareInodes = sparesNow().map((f) => Number(/net:\[(\d+)\]/.exec(f)![1]))
    t.deepEqual(mountedInodes().filter((i) => spareInodes.includes(i)), [], 'spares are mounted nowhere')

    const client = new FDClient(socketPath)
    for (const podId of pods) {
      t.true(await until(() => netnsPoolStatus()?.spare === 3))
      const spares = sparesNow()
      const csn = JSON.parse((await client.addFDs(podId, addPayload(podId))).toString()) as { NsPath: string; Result: { ips: unknown[] } }
      t.is(csn.Result.ips.length, 1, 'CNI configured the pod in its netns')
      // The pod's netns is one of the spares (bound onto its path by the add), not one made on the way.
      const ino = statSync(csn.NsPath).ino
      t.true(spares.some((f) => f.endsWith(`net:[${ino}]`)), `pod netns ${ino} came from the pool: ${spares.join(', ')}`)
    }
    t.deepEqual(mine().sort(), [...pods].sort())
    t.true(await until(() => netnsPoolStatus()?.spare === 3), 'the pool fills up again')
    for (const podId of pods) await client.releaseFDs(podId)
    t.deepEqual(mine(), [])
    t.deepEqual(node.leases('tmbridge'), [])
    await daemon.close()
    t.is(netnsPoolStatus(), null)
    t.deepEqual(netnsFds(), fdsBefore, 'no spare left open')

    // netnsPool 0: no pool, adds make their own netns.
    const plain = await startDaemon({ socketPath, stateDir, cni: node.client({ cacheDir: join(stateDir, 'cni') }), netnsPool: 0 })
    daemons.push(plain)
    t.is(netnsPoolStatus(), null)
    await client.addFDs(pods[0], addPayload(pods[0]))
    t.true(netnsNames().includes(pods[0]))
    await client.releaseFDs(pods[0])
    await plain.close()
    t.deepEqual(netnsFds(), fdsBefore)
  } finally {
    for (const d of daemons) await d.close().catch(() => undefined)
    for (const p of pods) removeNetns(p)
    node.cleanup()
  }
})
