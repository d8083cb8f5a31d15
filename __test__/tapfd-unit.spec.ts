/**
 * TapFDSource's own logic with fakes (order of steps, rollback, serialisation per key, parallelism across
 * keys, release past failures, stop): the native operations and CNI are recorded fakes; the "tap fds" are
 * real fds on /dev/null so closing them is observable. The real parts are in tapfd.spec.ts.
 */
import test from 'ava'
import { fstatSync, openSync } from 'node:fs'
import { TapFDSource, AggregateOperationError } from '../src/tapfdsource'
import type { PodNetworkOps } from '../src/podnetwork'
import type { CniAttachment, CniClient } from '../src/cni'
import { encodeGetFDPayload } from '../src/payloads'

const CSN = (ns: string, vf = false) =>
  JSON.stringify({
    Result: { interfaces: [{ name: 'eth0', mac: '42:a4:a6:22:80:2e', sandbox: ns }], ips: [{ version: '4', interface: 0, address: '10.1.90.5/24' }], routes: [], dns: {} },
    NsPath: ns,
    Interfaces: [vf
      ? { Type: 1, Name: 'eth0', HardwareAddr: 'QqSmIoAu', PCIAddress: '0000:00:04.1', MTU: 1500, VlanID: 100 }
      : { Type: 0, Name: 'eth0', HardwareAddr: 'QqSmIoAu', PCIAddress: '', MTU: 1500, VlanID: 0 }],
  })

function isOpen(fd: number): boolean {
  try {
    fstatSync(fd)
    return true
  } catch {
    return false
  }
}

/**
 * Recorded fakes; `gate` makes setupContainerSide wait for a test's signal; `fail` names steps that throw;
 * `calico`: setupContainerSide wants the dummy network's gateway (as the native one does for a Calico pod with
 * a default route via 169.254.1.1).
 */
function fakes(opts: { fail?: string[]; gate?: Promise<void>; vf?: boolean; calico?: boolean } = {}) {
  const calls: string[] = []
  const fds: number[] = []
  /** What startDhcpServer got as `parsed`, per call. */
  const dhcpParsed: unknown[] = []
  const fail = new Set(opts.fail ?? [])
  const step = (name: string) => {
    calls.push(name)
    if (fail.has(name.split(' ')[0])) throw new Error(`${name.split(' ')[0]} failed`)
  }
  const netns = new Set<string>()
  const ops: PodNetworkOps = {
    netnsExists: (p) => netns.has(p),
    createNetns: async (p) => {
      step(`createNetns ${p}`)
      netns.add(p)
    },
    deleteNetns: async (p) => {
      step(`deleteNetns ${p}`)
      netns.delete(p)
    },
    setupContainerSide: async (p, _result, o) => {
      calls.push(`setup-start ${p}`)
      if (opts.gate) await opts.gate
      if (opts.calico && !o.dummyGateway) {
        calls.push('setup-needs-dummy-gateway')
        throw Object.assign(new Error('no dummy network gateway was given'), { code: 'ERR_NEEDS_DUMMY_GATEWAY' })
      }
      step(`setupContainerSide ${p}${o.dummyGateway ? ` via ${o.dummyGateway}` : ''}`)
      const fd = openSync('/dev/null', 'r')
      fds.push(fd)
      return { csn: CSN(p, opts.vf), fds: [fd], parsed: { parsedOf: p } }
    },
    teardownContainerSide: async (p, _csn, o) => step(`teardownContainerSide ${p}${o?.keepDevices ? ' keepDevices' : ''}`),
    recoverContainerSide: async (p) => {
      step(`recoverContainerSide ${p}`)
      return { fds: [null] }
    },
    reopenTaps: async (p) => {
      step(`reopenTaps ${p}`)
      return [openSync('/dev/null', 'r')]
    },
    startDhcpServer: async (p, _csn, parsed) => {
      dhcpParsed.push(parsed)
      step(`startDhcpServer ${p}`)
      return { stop: async () => step(`dhcpStop ${p}`) }
    },
  }
  const attachment = (podId: string): CniAttachment => ({ result: { interfaces: [], ips: [{ address: '10.1.90.5/24' }], routes: [], dns: {} } as any, nsPath: `/ns/${podId}`, raw: {} } as any)
  const cni: CniClient = {
    addSandboxToNetwork: async (podId) => {
      step(`cniAdd ${podId}`)
      return attachment(podId)
    },
    removeSandboxFromNetwork: async (podId) => step(`cniDel ${podId}`),
    checkSandboxNetwork: async () => undefined,
    getDummyNetwork: async () => {
      step('dummyNetwork')
      return { ...attachment('dummy'), result: { interfaces: [], ips: [{ address: '10.254.0.3/24' }], routes: [], dns: {} } as any }
    },
  }
  const source = new TapFDSource(cni, { ops, netnsDir: '/ns' })
  return { calls, fds, source, netns, dhcpParsed }
}

const payload = (podId: string) => Buffer.from(encodeGetFDPayload({ podNetworkDesc: { podId, podName: 'vm', podNs: 'default', dns: null } }))

test('add hands the DHCP server the ContainerSideNetwork setup answered as parsed (no JSON parsed again); recover has none', async (t) => {
  const { source, dhcpParsed, netns } = fakes()
  await source.getFDs('p1', payload('p1'))
  t.deepEqual(dhcpParsed, [{ parsedOf: '/ns/p1' }])
  netns.add('/ns/p2')
  await source.recover('p2', Buffer.from(JSON.stringify({ podNetworkDesc: { podId: 'p2', podName: 'vm', podNs: 'default' }, csn: JSON.parse(CSN('/ns/p2')) })))
  t.deepEqual(dhcpParsed, [{ parsedOf: '/ns/p1' }, undefined])
  await source.release('p1')
  await source.release('p2')
})

test('a pod of SR-IOV VFs only gets no DHCP server, on add and on recover; get says type 1 with the PCI address', async (t) => {
  const { calls, source } = fakes({ vf: true })
  await source.getFDs('p1', payload('p1'))
  t.deepEqual(calls, ['createNetns /ns/p1', 'cniAdd p1', 'setup-start /ns/p1', 'setupContainerSide /ns/p1'])
  t.deepEqual(JSON.parse(source.getInfo('p1').toString()), [{ type: 1, mac: 'QqSmIoAu', fdIndex: 0, pciAddress: '0000:00:04.1' }])
  calls.length = 0
  await source.release('p1')
  t.deepEqual(calls, ['teardownContainerSide /ns/p1 keepDevices', 'cniDel p1', 'deleteNetns /ns/p1'])

  const { calls: calls2, source: source2, netns } = fakes({ vf: true })
  netns.add('/ns/p2')
  const recoverPayload = Buffer.from(JSON.stringify({ podNetworkDesc: { podId: 'p2', podName: 'vm', podNs: 'default' }, csn: JSON.parse(CSN('/ns/p2', true)) }))
  await source2.recover('p2', recoverPayload)
  t.deepEqual(calls2, ['recoverContainerSide /ns/p2'])
})

test('only a pod whose setup asks for it (Calico, ERR_NEEDS_DUMMY_GATEWAY) gets the dummy network, and setup runs again with its gateway', async (t) => {
  const { calls, source } = fakes({ calico: true })
  await source.getFDs('p1', payload('p1'))
  t.deepEqual(calls, [
    'createNetns /ns/p1', 'cniAdd p1', 'setup-start /ns/p1', 'setup-needs-dummy-gateway', 'dummyNetwork',
    'setup-start /ns/p1', 'setupContainerSide /ns/p1 via 10.254.0.3', 'startDhcpServer /ns/p1',
  ])
  // Any other setup error fails the add (rolled back) without a second try.
  const { calls: calls2, source: source2 } = fakes({ fail: ['setupContainerSide'] })
  await t.throwsAsync(source2.getFDs('p2', payload('p2')), { message: 'setupContainerSide failed' })
  t.deepEqual(calls2, ['createNetns /ns/p2', 'cniAdd p2', 'setup-start /ns/p2', 'setupContainerSide /ns/p2', 'cniDel p2', 'deleteNetns /ns/p2'])
})

test('add runs netns, CNI, container side, DHCP in order; release undoes them in reverse and closes the fds', async (t) => {
  const { calls, source, fds } = fakes()
  const r = await source.getFDs('p1', payload('p1'))
  t.deepEqual(r.fds, fds)
  t.deepEqual(calls, ['createNetns /ns/p1', 'cniAdd p1', 'setup-start /ns/p1', 'setupContainerSide /ns/p1', 'startDhcpServer /ns/p1'])
  t.is(JSON.parse(source.getInfo('p1').toString())[0].mac, 'QqSmIoAu')
  calls.length = 0
  await source.release('p1')
  // The netns is deleted last, so the teardown leaves the bridges and taps to its deletion.
  t.deepEqual(calls, ['dhcpStop /ns/p1', 'teardownContainerSide /ns/p1 keepDevices', 'cniDel p1', 'deleteNetns /ns/p1'])
  t.false(isOpen(fds[0]))
  t.deepEqual(source.keys(), [])
})

test('a failure after the taps exist rolls back in reverse: fds closed, teardown, CNI DEL, netns', async (t) => {
  const { calls, source, fds } = fakes({ fail: ['startDhcpServer'] })
  await t.throwsAsync(source.getFDs('p1', payload('p1')), { message: 'startDhcpServer failed' })
  t.deepEqual(calls.slice(4), ['startDhcpServer /ns/p1', 'teardownContainerSide /ns/p1', 'cniDel p1', 'deleteNetns /ns/p1'])
  t.false(isOpen(fds[0]))
  t.deepEqual(source.keys(), [])
})

test('release keeps going past failing steps and reports every error', async (t) => {
  const { calls, source } = fakes({ fail: ['teardownContainerSide', 'cniDel'] })
  await source.getFDs('p1', payload('p1'))
  calls.length = 0
  const err = await t.throwsAsync(source.release('p1'), { instanceOf: AggregateOperationError })
  t.deepEqual(calls, ['dhcpStop /ns/p1', 'teardownContainerSide /ns/p1 keepDevices', 'cniDel p1', 'deleteNetns /ns/p1'])
  t.is(err!.errors.length, 2)
  t.regex(err!.message, /teardownContainerSide failed; cniDel failed/)
  t.deepEqual(source.keys(), [])
})

test('operations on one key are serialised; different keys run in parallel', async (t) => {
  let open!: () => void
  const gate = new Promise<void>((r) => (open = r))
  const { calls, source } = fakes({ gate })
  const a = source.getFDs('p1', payload('p1'))
  const rel = source.release('p1')
  const b = source.getFDs('p2', payload('p2'))
  // both adds reach the (gated) container setup at the same time; p1's release waits for p1's add
  const deadline = Date.now() + 2000
  while (calls.filter((c) => c.startsWith('setup-start')).length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5))
  t.deepEqual(calls.filter((c) => c.startsWith('setup-start')).sort(), ['setup-start /ns/p1', 'setup-start /ns/p2'])
  t.false(calls.some((c) => c.startsWith('dhcpStop')))
  open()
  await Promise.all([a, rel, b])
  t.true(calls.indexOf('startDhcpServer /ns/p1') < calls.indexOf('dhcpStop /ns/p1'))
  t.deepEqual(source.keys(), ['p2'])
})

test('stop stops DHCP servers and closes fds but keeps netns and links; recover + retrieveFDs reopen', async (t) => {
  const { calls, source, fds, netns } = fakes()
  await source.getFDs('p1', payload('p1'))
  const saved = source.describe('p1')!
  calls.length = 0
  await source.stop()
  t.deepEqual(calls, ['dhcpStop /ns/p1'])
  t.false(isOpen(fds[0]))
  t.true(netns.has('/ns/p1'))
  t.deepEqual(source.keys(), [])

  const { encodeRecoverPayload } = await import('../src/payloads')
  calls.length = 0
  await source.recover('p1', Buffer.from(encodeRecoverPayload({ podNetworkDesc: saved.podNetworkDesc, csn: saved.csn, haveRunningContainers: false })))
  t.deepEqual(calls, ['recoverContainerSide /ns/p1', 'startDhcpServer /ns/p1'])
  const reopened = await source.retrieveFDs('p1')
  t.is(reopened.length, 1)
  t.true(isOpen(reopened[0]))
  t.deepEqual(await source.retrieveFDs('p1'), reopened, 'a second retrieve returns the same fds')
  await source.release('p1')
  t.false(isOpen(reopened[0]))
})

test('a second add of a live key is refused; recover of a key whose netns is gone is refused', async (t) => {
  const { source } = fakes()
  await source.getFDs('p1', payload('p1'))
  await t.throwsAsync(source.getFDs('p1', payload('p1')), { message: /exists/ })
  const saved = source.describe('p1')!
  await source.release('p1')
  const { encodeRecoverPayload } = await import('../src/payloads')
  await t.throwsAsync(source.recover('p1', Buffer.from(encodeRecoverPayload({ podNetworkDesc: saved.podNetworkDesc, csn: saved.csn, haveRunningContainers: false }))), {
    message: /is gone/,
  })
})
