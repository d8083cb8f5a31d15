/**
 * Seeded DHCP packet fuzzing of a real pod's DHCP server (issue 8): random and mutated DHCP packets (see
 * helpers/dhcpfuzz.ts) written into the pod's tap fd, as a hostile VM would send them; then a real client
 * (dhcpcd, through a stand-in VM joined to the same fd) still gets its lease from the same server, and the
 * server process kept its fd count. Reproducible: `TAPMANAGER_FUZZ_SEED` and `TAPMANAGER_FUZZ_COUNT` pick the
 * seed and the number of packets (default 10000, a few seconds).
 */
import test from 'ava'
import { closeSync } from 'node:fs'
import { FakeVm, TapFdHarness, openFds } from './helpers/tapfd'
import { runDhcpFuzz } from './helpers/dhcpfuzz'

const SEED = Number(process.env.TAPMANAGER_FUZZ_SEED ?? 0x5eed8)
const COUNT = Number(process.env.TAPMANAGER_FUZZ_COUNT ?? 10_000)

test.serial(`fuzzed DHCP packets into a pod's tap (seed ${SEED}, ${COUNT} packets): the DHCP server still answers a real client`, async (t) => {
  const h = new TapFdHarness()
  const vm = new FakeVm()
  try {
    h.node.writeConf('10-bridge.conflist', h.node.bridgeConflist({ subnet: '10.89.0.0/24', bridge: 'tmfzbr0' }))
    await h.start()
    const podId = h.node.podId('tmfz')
    const csn = JSON.parse(await h.add(podId))
    const mac = (csn.Result.interfaces as { name: string; mac: string; sandbox?: string }[]).find((i) => i.name === 'eth0' && i.sandbox)!.mac
    const fdsBefore = openFds().size
    const { fds } = await h.client.getFDs(podId)
    let written: number
    try {
      const started = process.hrtime.bigint()
      written = runDhcpFuzz(fds[0], { seed: SEED, count: COUNT, mac })
      const ms = Number(process.hrtime.bigint() - started) / 1e6
      t.log(`${written} of ${COUNT} fuzzed frames written in ${ms.toFixed(0)} ms (seed ${SEED})`)
      t.true(written >= COUNT * 0.9, `${written} frames written`)
      // The server is alive and still serves its key.
      t.regex((await h.client.getFDs(podId).then((r) => { for (const fd of r.fds) closeSync(fd); return r.info })).toString(), /fdIndex/)
      await vm.attach(fds[0], mac, 1500)
    } finally {
      for (const fd of fds) closeSync(fd)
    }
    const lease = await vm.dhcpcd()
    t.is(lease.new_ip_address, h.node.leases('tmbridge')[0].ip)
    t.is(lease.new_routers, '10.89.0.1')
    await h.client.releaseFDs(podId)
    t.true(openFds().size <= fdsBefore + 2, 'no fd leaked by the fuzzing')
  } finally {
    vm.cleanup()
    await h.cleanup()
  }
})
