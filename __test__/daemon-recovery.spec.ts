/**
 * Persisted state and automatic recovery of the real daemon (`tapmanager serve` in a test node netns, Debian
 * bridge + host-local): kill -9 of the server at several points of an add, then a restart. Every key added before
 * the kill is served by get (its fd through the retrieve path); the interrupted add leaves nothing once the
 * restarted server has cleaned up (its netns, host veth and IPAM lease are gone, its state record removed).
 *
 * The points: during CNI ADD (a chained tmtest plugin hangs after the bridge plugin leased; the test kills the
 * server from outside), and, through a test failpoint (the command line run by helpers/crash-serve.ts, whose
 * daemon hooks SIGKILL the process), after CNI, after the container side, after the DHCP server started, after the state
 * became ready. Also: a key whose netns vanished while the server was down is skipped, reported and released.
 */
import test from 'ava'
import { closeSync } from 'node:fs'
import { tapFdInfo } from '../src/native'
import { CniTestNode } from './helpers/cni'
import { addPayload, killNetnsProcesses, netnsNames, removeNetns, runCli, ServerProcess } from './helpers/serve'

interface Ctx {
  node: CniTestNode
  server: ServerProcess
  hangPod: string
}

function setup(): Ctx {
  const node = new CniTestNode('tmdr')
  const hangPod = node.podId('tmdrh')
  node.writeConf(
    '10-bridge.conflist',
    node.bridgeConflist({
      subnet: '10.72.0.0/24',
      bridge: 'tmdrbr0',
      // tmtest passes the bridge's result through, and hangs after it (the lease is taken) for hangPod's ADD only.
      plugins: [node.testPlugin({ mode: 'passthrough', perContainer: { [hangPod]: { fault: { kind: 'hang', after: true, on: ['ADD'] } } } })],
    }),
  )
  return { node, server: new ServerProcess(node), hangPod }
}

/** get retrieves a live tap fd for the key. */
async function assertServed(t: import('ava').ExecutionContext, server: ServerProcess, key: string): Promise<void> {
  const { fds, info } = await server.client().getFDs(key)
  try {
    t.is(fds.length, 1, `${key}: one fd`)
    t.is(tapFdInfo(fds[0]).name, 'tap0')
    t.regex(info.toString(), /"fdIndex":0/)
  } finally {
    for (const fd of fds) closeSync(fd)
  }
}

const bridgeOnly = (s: { links: string[]; routes: string[]; leases: string[] }) => ({
  links: s.links.filter((l) => !l.startsWith('tmdrbr0')),
  routes: s.routes.filter((r) => !r.includes('tmdrbr0')),
  leases: s.leases,
})

type Point = 'during-cni-add' | 'after-cni' | 'after-container-side' | 'after-dhcp' | 'after-ready'

for (const point of ['during-cni-add', 'after-cni', 'after-container-side', 'after-dhcp', 'after-ready'] as Point[]) {
  test.serial(`kill -9 ${point}: keys added before are served again, the interrupted add ${point === 'after-ready' ? 'is served too' : 'leaves nothing'}`, async (t) => {
    const { node, server, hangPod } = setup()
    const victim = point === 'during-cni-add' ? hangPod : node.podId('tmdrv')
    const kept = node.podId('tmdrk')
    try {
      const before = node.snapshot()
      await server.start({}, point === 'during-cni-add' ? undefined : `${point}:${victim}`)
      const client = server.client()
      await client.addFDs('kept', addPayload(kept))
      const keptLease = node.leases('tmbridge').map((l) => l.ip)
      t.is(keptLease.length, 1)

      const adding = client.addFDs('victim', addPayload(victim)).then(
        () => 'ok',
        (e: Error) => e.message,
      )
      if (point === 'during-cni-add') {
        // Wait until the chained plugin runs (the bridge has leased), then kill the server from outside.
        const deadline = Date.now() + 20_000
        while (!node.log().some((l) => l.command === 'ADD' && l.containerId === victim)) {
          if (Date.now() > deadline) throw new Error('tmtest ADD never ran')
          await new Promise((r) => setTimeout(r, 20))
        }
        t.is(node.leases('tmbridge').length, 2)
        await server.kill9()
        killNetnsProcesses(node.name) // the hung plugin (and its sleep) outlive the server
      }
      const ended = await server.exited()
      t.is(ended.signal, 'SIGKILL')
      t.not(await adding, 'ok')
      // What the kill left: the victim's netns and lease (all points), its record.
      t.true(netnsNames().includes(victim), 'the interrupted add left its netns')
      t.is(node.leases('tmbridge').length, 2)
      const ls = JSON.parse(runCli(['ls', '--state-dir', server.stateDir, '--json']).stdout) as { keys: { key: string; state: string }[] }
      t.deepEqual(ls.keys.map((k) => [k.key, k.state]), [['kept', 'ready'], ['victim', point === 'after-ready' ? 'ready' : 'adding']])

      await server.start()
      await assertServed(t, server, 'kept')
      if (point === 'after-ready') {
        t.deepEqual(server.messages('recovered').map((l) => l.key).sort(), ['kept', 'victim'])
        await assertServed(t, server, 'victim')
        await client.releaseFDs('victim')
      } else {
        t.deepEqual(server.messages('recovered').map((l) => l.key), ['kept'])
        t.deepEqual(server.messages('cleaned up an interrupted add').map((l) => l.key), ['victim'])
        await t.throwsAsync(client.getFDs('victim'))
      }
      // The victim left nothing: no netns, no lease, no host veth beyond the kept pod's, no record.
      t.false(netnsNames().includes(victim))
      t.deepEqual(node.leases('tmbridge').map((l) => l.ip), keptLease)
      t.is(node.snapshot().links.filter((l) => l.startsWith('veth')).length, 1)
      t.deepEqual((JSON.parse(runCli(['ls', '--state-dir', server.stateDir, '--json']).stdout) as { keys: { key: string }[] }).keys.map((k) => k.key), ['kept'])

      await client.releaseFDs('kept')
      t.false(netnsNames().includes(kept))
      t.deepEqual(bridgeOnly(node.snapshot()), before)
      t.deepEqual(await server.stop(), { code: 0, signal: null })
    } finally {
      server.cleanup()
      killNetnsProcesses(node.name)
      for (const id of [victim, kept]) removeNetns(id)
      node.cleanup()
    }
  })
}

test.serial('a key whose netns vanished while the server was down is skipped, reported and its lease released', async (t) => {
  const { node, server } = setup()
  const gone = node.podId('tmdrg')
  const kept = node.podId('tmdrk')
  try {
    await server.start()
    const client = server.client()
    await client.addFDs('gone', addPayload(gone))
    await client.addFDs('kept', addPayload(kept))
    await server.kill9()
    killNetnsProcesses(gone)
    removeNetns(gone)
    t.false(netnsNames().includes(gone))

    await server.start()
    const skipped = server.messages('skipped: could not recover')
    t.deepEqual(skipped.map((l) => l.key), ['gone'])
    t.regex(String(skipped[0].reason), /gone/)
    await t.throwsAsync(client.getFDs('gone'))
    await assertServed(t, server, 'kept')
    // the vanished pod's lease and host veth were released by the CNI DEL of the skip
    t.deepEqual(node.leases('tmbridge').map((l) => l.containerId), [kept])
    t.is(node.snapshot().links.filter((l) => l.startsWith('veth')).length, 1)
    t.deepEqual((JSON.parse(runCli(['ls', '--state-dir', server.stateDir, '--json']).stdout) as { keys: { key: string }[] }).keys.map((k) => k.key), ['kept'])
    await client.releaseFDs('kept')
    t.deepEqual(node.leases('tmbridge'), [])
    t.deepEqual(await server.stop(), { code: 0, signal: null })
  } finally {
    server.cleanup()
    for (const id of [gone, kept]) if (netnsNames().includes(id)) killNetnsProcesses(id)
    node.cleanup()
  }
})
