/**
 * SR-IOV VF passthrough with real parts, no SR-IOV hardware: a QEMU 10 guest (q35 + intel-iommu, TCG) with an
 * emulated Intel 82576 (`-device igb`) whose igb driver creates two igbvf VFs. In the guest (the guest runner,
 * helpers/guest.ts) runs THIS checkout: a node netns holding VF 0, a conflist whose first plugin is Debian's
 * `host-device` (moving the VF into the pod netns, IPAM host-local) and whose second (tmtest, mergePrev) adds a
 * veth: a pod with a VF and a tap. `tapmanager serve --sriov` runs in the node netns (nsenter --net), then
 * add, get, get --qemu-args, kill -9 + restart (recovery), get, release. Asserted: the info (type 1 with the
 * VF's PCI address, the tap as type 0), the VF bound to vfio-pci with /dev/vfio/<group>, `ip link show <pf>`
 * with the CNI MAC and VLAN 100 on vf 0, the QEMU arguments, recovery leaving the VF bound, and after release
 * the VF back on igbvf in the node netns with its MAC, the PF's vf 0 as before, no pod netns, no lease.
 * With TAPMANAGER_SRIOV_NESTED=1 (opt-in: TCG inside TCG is slow) a nested guest is started from the get reply
 * (`get --qemu-args --exec`) and must see the VF, driven by igbvf, with the MAC tapmanager set.
 */
import test from 'ava'
import { spawnSync } from 'node:child_process'
import { join } from 'node:path'
import { runInGuest } from './helpers/guest'
import { vmAssets } from './helpers/vm'

const PROJECT = process.cwd()

/** The orchestration inside the guest: prints `FACT <name> <json>` lines for the test to check. */
const GUEST_SCRIPT = String.raw`
'use strict'
const { execFileSync, spawn } = require('child_process')
const fs = require('fs')
const P = process.env.TM_PROJECT
const CLI = [P + '/dist/cli.js']
const SOCK = '/tmp/tm/sock'
const t0 = Date.now()
const fact = (k, v) => console.log('FACT ' + k + ' ' + JSON.stringify(v))
const sh = (cmd, args, opts = {}) => execFileSync(cmd, args, { encoding: 'utf8', ...opts })
const cli = (...args) => sh('node', [...CLI, '--socket', SOCK, ...args], { timeout: 400000, env: { ...process.env, TAPMANAGER_TIMEOUT_MS: '300000' } })
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
async function waitFor(what, cond, ms) {
  const end = Date.now() + ms
  for (;;) {
    try { if (cond()) return } catch {}
    if (Date.now() > end) throw new Error('timed out waiting for ' + what)
    await sleep(200)
  }
}
const base = (p) => p.split('/').pop()
const link = (p) => { try { return base(fs.readlinkSync(p)) } catch { return null } }
const pfLine = (pf) => sh('ip', ['link', 'show', pf]).split('\n').find((l) => /^\s*vf 0\b/.test(l)).trim()

async function main() {
  const pf = fs.readdirSync('/sys/class/net').find((n) => fs.existsSync('/sys/class/net/' + n + '/device/sriov_totalvfs'))
  if (!pf) throw new Error('no SR-IOV capable NIC in the guest')
  const pfPci = link('/sys/class/net/' + pf + '/device')
  fact('pf', { pf, pfPci, totalVfs: Number(fs.readFileSync('/sys/class/net/' + pf + '/device/sriov_totalvfs', 'utf8')) })
  sh('ip', ['link', 'set', pf, 'up'])
  fs.writeFileSync('/sys/class/net/' + pf + '/device/sriov_numvfs', '2')
  const vfPci = await (async () => {
    await waitFor('VF 0', () => link('/sys/bus/pci/devices/' + pfPci + '/virtfn0') !== null, 60000)
    return link('/sys/bus/pci/devices/' + pfPci + '/virtfn0')
  })()
  await waitFor('the netdev of VF 0', () => fs.readdirSync('/sys/bus/pci/devices/' + vfPci + '/net').length === 1, 60000)
  const vfDev = fs.readdirSync('/sys/bus/pci/devices/' + vfPci + '/net')[0]
  const vfMac = fs.readFileSync('/sys/class/net/' + vfDev + '/address', 'utf8').trim()
  const group = link('/sys/bus/pci/devices/' + vfPci + '/iommu_group')
  // As an SR-IOV CNI setup would: the VF's VLAN is set on the PF before the pod is added.
  sh('ip', ['link', 'set', pf, 'vf', '0', 'vlan', '100'])
  fact('vf', { vfPci, vfDev, vfMac, group, driver: link('/sys/bus/pci/devices/' + vfPci + '/driver'), pfVf0: pfLine(pf) })

  sh('ip', ['netns', 'add', 'node'])
  sh('ip', ['-n', 'node', 'link', 'set', 'lo', 'up'])
  sh('ip', ['link', 'set', vfDev, 'netns', 'node'])
  for (const d of ['/tmp/cni/conf', '/tmp/cni/ipam', '/tmp/cni/state', '/tmp/tm/state']) fs.mkdirSync(d, { recursive: true })
  fs.writeFileSync('/tmp/cni/conf/10-mixed.conflist', JSON.stringify({
    cniVersion: '1.0.0',
    name: 'mixed',
    plugins: [
      { type: 'host-device', device: vfDev, ipam: { type: 'host-local', dataDir: '/tmp/cni/ipam', ranges: [[{ subnet: '10.77.0.0/24' }]] } },
      { type: 'tmtest', stateDir: '/tmp/cni/state', mergePrev: true, links: [{ name: 'net1', address: '10.78.0.5/24', gateway: '10.78.0.1' }] },
    ],
  }))

  let server
  const startServer = async () => {
    const t = Date.now()
    const log = fs.openSync('/tmp/tm/serve.log', 'a')
    server = spawn('nsenter', ['--net=/run/netns/node', 'node', ...CLI, 'serve', '--sriov', '--socket', SOCK,
      '--cni-conf-dir', '/tmp/cni/conf', '--cni-bin-dir', '/usr/lib/cni', '--cni-bin-dir', P + '/__test__/fixtures/cni/bin',
      '--state-dir', '/tmp/tm/state', '--cni-timeout', '120000'], { stdio: ['ignore', log, log] })
    fs.closeSync(log)
    await waitFor('the server', () => { cli('status'); return true }, 240000)
    return Date.now() - t
  }
  fact('serverStartMs', await startServer())

  let t = Date.now()
  const added = JSON.parse(cli('--json', 'add', 'pod1', '--pod-id', 'pod1', '--pod-name', 'vm1', '--pod-ns', 'default'))
  fact('addMs', Date.now() - t)
  fact('added', added)
  fact('get', JSON.parse(cli('--json', 'get', 'pod1')))
  fact('qemuArgs', JSON.parse(cli('--json', 'get', 'pod1', '--qemu-args')))
  const dev = '/sys/bus/pci/devices/' + vfPci
  fact('bound', {
    driver: link(dev + '/driver'),
    override: fs.readFileSync(dev + '/driver_override', 'utf8').trim(),
    vfioGroup: fs.existsSync('/dev/vfio/' + group),
    pfVf0: pfLine(pf),
    netns: fs.readdirSync('/run/netns').sort(),
    podLinks: sh('ip', ['-n', 'pod1', '-o', 'link', 'show']).split('\n').filter(Boolean).map((l) => l.split(': ')[1].split('@')[0]),
  })

  if (process.env.TM_NESTED === '1') {
    // Stretch: a nested guest started the way a VM launcher would (get --qemu-args --exec: the tap fd as fd 4,
    // the VF as -device vfio-pci,host=...) in probe mode: it lists its NICs with their MACs and drivers.
    t = Date.now()
    const out = sh('node', [...CLI, '--socket', SOCK, 'get', 'pod1', '--qemu-args', '--exec', '--', 'qemu-system-x86_64',
      '-machine', 'q35', '-accel', 'tcg', '-cpu', 'max', '-m', '320', '-smp', '1', '-display', 'none', '-serial', 'stdio',
      '-monitor', 'none', '-no-reboot', '-kernel', process.env.TM_KERNEL, '-initrd', process.env.TM_INITRD,
      '-append', 'console=ttyS0 quiet loglevel=3 panic=-1 no_timer_check tm.probe=1'],
      { timeout: 1500000, env: { ...process.env, TAPMANAGER_TIMEOUT_MS: '300000' } })
    fact('nested', { ms: Date.now() - t, nics: out.split('\n').filter((l) => l.startsWith('TM_NIC ')).map((l) => l.trim().split(' ').slice(1)) })
  }

  server.kill('SIGKILL')
  await new Promise((r) => server.once('exit', r))
  fact('restartMs', await startServer())
  fact('getAfterRestart', JSON.parse(cli('--json', 'get', 'pod1')))
  fact('afterRestart', { driver: link(dev + '/driver'), vfioGroup: fs.existsSync('/dev/vfio/' + group), pfVf0: pfLine(pf) })

  t = Date.now()
  cli('release', 'pod1')
  fact('releaseMs', Date.now() - t)
  const nodeLinks = sh('ip', ['-n', 'node', '-o', 'link', 'show']).split('\n').filter(Boolean)
  const back = nodeLinks.find((l) => l.split(': ')[1] === vfDev)
  const ipamFiles = fs.readdirSync('/tmp/cni/ipam/mixed').filter((f) => /^\d+\.\d+\.\d+\.\d+$/.test(f))
  fact('released', {
    driver: link(dev + '/driver'),
    override: fs.readFileSync(dev + '/driver_override', 'utf8').trim(),
    vfioGroup: fs.existsSync('/dev/vfio/' + group),
    pfVf0: pfLine(pf),
    netns: fs.readdirSync('/run/netns').sort(),
    nodeVf: back ? { name: vfDev, mac: /link\/ether (\S+)/.exec(back)[1] } : null,
    nodeLinks: nodeLinks.map((l) => l.split(': ')[1].split('@')[0]),
    leases: ipamFiles,
    records: fs.existsSync('/run/tapmanager/sriov') ? fs.readdirSync('/run/tapmanager/sriov') : [],
  })
  server.kill('SIGTERM')
  await new Promise((r) => server.once('exit', r))
  fact('totalMs', Date.now() - t0)
}
main().then(() => process.exit(0), (e) => {
  console.log('GUEST_ERROR ' + (e && e.stack || e))
  try { console.log(fs.readFileSync('/tmp/tm/serve.log', 'utf8')) } catch {}
  process.exit(1)
})
`

test('a VF of an emulated igb NIC is passed through, recovered and given back (QEMU guest)', async (t) => {
  t.timeout(process.env.TAPMANAGER_SRIOV_NESTED === '1' ? 70 * 60_000 : 20 * 60_000)
  const started = Date.now()
  const facts: Record<string, unknown> = {}
  const devices = spawnSync('qemu-system-x86_64', ['-device', 'help'], { encoding: 'utf8' }).stdout ?? ''
  if (!devices.includes('"igb"')) throw new Error('prerequisite missing: a QEMU with -device igb (QEMU 10 from bookworm-backports: run scripts/setup.sh)')
  const nested = process.env.TAPMANAGER_SRIOV_NESTED === '1'
  const assets = vmAssets()
  const r = await runInGuest({
    iommu: true,
    memoryMiB: nested ? 1536 : 1024,
    timeoutMs: nested ? 60 * 60_000 : 15 * 60_000,
    script: [
      `export TM_PROJECT=${PROJECT} TM_NESTED=${nested ? 1 : 0}`,
      `export TM_KERNEL=${assets.kernel} TM_INITRD=${join(assets.dir, 'runner.cpio')}`,
      'exec node /tmjob/run.cjs',
      '',
    ].join('\n'),
    files: { 'run.cjs': GUEST_SCRIPT },
    qemuArgs: ['-netdev', 'user,id=n0,restrict=on', '-device', 'igb,netdev=n0'],
    onLine: (l) => {
      const m = /^FACT (\S+) (.*)$/.exec(l)
      if (m) facts[m[1]] = JSON.parse(m[2])
      if (m || l.startsWith('GUEST_ERROR')) t.log(l.slice(0, 400))
    },
  })
  t.log(`guest run: ${r.durationMs} ms (exit ${String(r.exitCode)}, timed out ${String(r.timedOut)})`)
  if (r.exitCode !== 0) t.log(r.console.slice(-80).join('\n'))
  t.is(r.exitCode, 0)

  const vf = facts.vf as { vfPci: string; vfDev: string; vfMac: string; group: string; driver: string; pfVf0: string }
  t.is(vf.driver, 'igbvf')
  t.regex(vf.pfVf0, /vlan 100/)
  t.regex(vf.pfVf0, /link\/ether 00:00:00:00:00:00/)

  // add: the VF first (host-device's eth0 has the IP of interface 0), then the tap of tmtest's net1
  const added = facts.added as { csn: { Interfaces: Array<{ Type: number; Name: string; PCIAddress: string; VlanID: number; MTU: number }> } }
  const ifs = added.csn.Interfaces
  t.deepEqual(ifs.map((i) => [i.Type, i.Name]), [[1, 'eth0'], [0, 'net1']])
  t.is(ifs[0].PCIAddress, vf.vfPci)
  t.is(ifs[0].VlanID, 100)

  const get = facts.get as { interfaces: Array<{ type: number; mac: string; fdIndex: number; pciAddress: string }>; fds: number }
  t.is(get.fds, 2, 'one fd per interface (/dev/null for the VF)')
  t.deepEqual(get.interfaces[0], { type: 1, mac: vf.vfMac, fdIndex: 0, pciAddress: vf.vfPci })
  t.is(get.interfaces[1].type, 0)
  t.is(get.interfaces[1].pciAddress, '')

  const bdf = vf.vfPci.replace(/^0000:/, '')
  const q = facts.qemuArgs as { args: string[] }
  t.deepEqual(q.args.slice(0, 2), ['-device', `vfio-pci,host=${bdf},id=hostdev0`])
  t.deepEqual(q.args.slice(2, 4), ['-netdev', 'tap,id=tap1,fd=4'])
  t.regex(q.args[5], /^virtio-net-pci,netdev=tap1,id=net1,mac=/)

  const bound = facts.bound as { driver: string; override: string; vfioGroup: boolean; pfVf0: string; netns: string[]; podLinks: string[] }
  t.is(bound.driver, 'vfio-pci')
  t.is(bound.override, 'vfio-pci')
  t.true(bound.vfioGroup, `/dev/vfio/${vf.group} exists`)
  t.regex(bound.pfVf0, new RegExp(`link/ether ${vf.vfMac}.*vlan 100`))
  t.deepEqual(bound.netns, ['node', 'pod1'])
  t.false(bound.podLinks.includes('eth0'), 'the VF netdev left the pod netns with its host driver')
  t.true(bound.podLinks.includes('br1') && bound.podLinks.includes('tap1'), bound.podLinks.join(','))

  if (nested) {
    // Stretch, opt-in (TAPMANAGER_SRIOV_NESTED=1: TCG inside TCG takes long): the nested guest sees the VF
    // with the MAC tapmanager set on the PF, read by its igbvf driver, and the tap's virtio NIC.
    // Measured once (2026-12-02, loaded machine): the nested boot took 1206 s; the nested guest saw the tap's
    // virtio NIC with the CNI MAC and the VF driven by igbvf, but with a random MAC, not the PF's: this
    // assertion failed. Not investigated yet (a guess: igbvf's bounded wait for the PF's mailbox answer to its
    // reset runs out at nested-TCG speed, and igbvf then picks a random MAC).
    const n = facts.nested as { ms: number; nics: string[][] }
    t.log(`nested guest: ${n.ms} ms, NICs ${JSON.stringify(n.nics)}`)
    t.true(n.nics.some(([, mac, driver]) => mac === vf.vfMac && driver === 'igbvf'), JSON.stringify(n.nics))
  }

  const g2 = facts.getAfterRestart as typeof get
  t.deepEqual(g2.interfaces, get.interfaces, 'recovered after kill -9 + restart')
  const ar = facts.afterRestart as { driver: string; vfioGroup: boolean; pfVf0: string }
  t.deepEqual(ar, { driver: 'vfio-pci', vfioGroup: true, pfVf0: bound.pfVf0 }, 'recovery left the bound VF alone')

  const rel = facts.released as {
    driver: string; override: string; vfioGroup: boolean; pfVf0: string; netns: string[]
    nodeVf: { name: string; mac: string } | null; nodeLinks: string[]; leases: string[]; records: string[]
  }
  t.is(rel.driver, 'igbvf', 'back on its host driver')
  t.is(rel.override, '(null)')
  t.false(rel.vfioGroup)
  t.is(rel.pfVf0, vf.pfVf0, 'the PF holds for vf 0 what it held before')
  t.deepEqual(rel.nodeVf, { name: vf.vfDev, mac: vf.vfMac }, 'host-device DEL returned the VF to the node with its MAC')
  t.deepEqual(rel.netns, ['node'])
  t.deepEqual(rel.leases, [])
  t.deepEqual(rel.records, [])
  t.log(`figures: ${JSON.stringify({ serverStartMs: facts.serverStartMs, addMs: facts.addMs, restartMs: facts.restartMs, releaseMs: facts.releaseMs, guestScriptMs: facts.totalMs, wholeTestMs: Date.now() - started })}`)
})
