/**
 * TapFDSource end to end, as root, with real parts: an FDServer + TapFDSource in this process, CNI plugins
 * (Debian bridge + host-local, or our tmtest plugin) acting in a test "node" netns, pods in a temp netns dir,
 * an FDClient on a temp socket. For each case of the matrix, plain and after a server restart with recover:
 * the ContainerSideNetwork JSON, the get info JSON, the lease a real `dhcpcd -T` gets through each tap fd (a
 * "VM" netns with its own tap and a frame copier), a ping from the VM side to a peer outside the pod, zero DHCP
 * frames on the node side of the CNI link, and after release: no pod netns, no IPAM lease, the node as before.
 */
import test, { type ExecutionContext } from 'ava'
import { existsSync, readdirSync } from 'node:fs'
import { closeFd, parseFdInfo } from '../src/index'
import { macToBase64 } from '../src/payloads'
import { sh } from './helpers/env'
import { Capture, FakeVm, TapFdHarness, nodePeerOf } from './helpers/tapfd'

/** What one interface of a case must give the VM. */
interface IfaceExpect {
  name: string
  mac: string
  mtu: number
  /** dhcpcd's variables that must be exactly so. */
  lease: Record<string, string>
  /** An address outside the pod the VM must reach through this interface. */
  peer: string
}

interface Case {
  title: string
  /** Writes the CNI config; may prepare the node. */
  configure(h: TapFdHarness): void
  /** Calico: warm the dummy network before the node snapshot (it lives as long as the CNI client). */
  dummy?: boolean
  /** The expected Result.ips/routes of the ContainerSideNetwork, from the add response. */
  result(csn: any, h: TapFdHarness, podId: string): { interfaces?: unknown[]; ips: unknown[]; routes?: unknown[] }
  ifaces(csn: any, h: TapFdHarness, podId: string): IfaceExpect[]
}

const SERVER_ID = '169.254.254.2'

/** The MAC CNI gave the pod link named `name` (from the result's interfaces). */
function resultMac(csn: any, name: string): string {
  const i = csn.Result.interfaces.find((x: any) => x.name === name && x.sandbox)
  if (!i) throw new Error(`no sandbox interface ${name} in ${JSON.stringify(csn.Result)}`)
  return i.mac
}

function bridgeCase(title: string, mtu?: number): Case {
  return {
    title,
    configure: (h) => {
      h.node.writeConf('10-bridge.conflist', h.node.bridgeConflist({ subnet: '10.77.0.0/24', ...(mtu ? { mtu } : {}) }))
    },
    result: (csn, h, podId) => {
      const lease = h.node.leases('tmbridge').filter((l) => l.containerId === podId)
      if (lease.length !== 1) throw new Error(`host-local leases of ${podId}: ${JSON.stringify(lease)}`)
      // bridge 1.1.1 reports [bridge, host veth, pod eth0]: the IP points at the pod's entry (index 2)
      return { ips: [{ version: '4', interface: 2, address: `${lease[0].ip}/24`, gateway: '10.77.0.1' }], routes: [{ dst: '0.0.0.0/0' }] }
    },
    ifaces: (csn) => [
      {
        name: 'eth0',
        mac: resultMac(csn, 'eth0'),
        mtu: mtu ?? 1500,
        lease: {
          new_ip_address: csn.Result.ips[0].address.split('/')[0],
          new_subnet_mask: '255.255.255.0',
          new_routers: '10.77.0.1',
          new_interface_mtu: String(mtu ?? 1500),
          new_dhcp_server_identifier: SERVER_ID,
          new_dhcp_lease_time: '86400',
          new_domain_name_servers: '8.8.8.8',
        },
        peer: '10.77.0.1',
      },
    ],
  }
}

const ETH0 = {
  address: '10.1.90.5/24',
  gateway: '10.1.90.1',
  hostAddress: '10.1.90.1/24',
  mac: '42:a4:a6:22:80:2e',
  routes: [
    { dst: '0.0.0.0/0', gw: '10.1.90.1' },
    { dst: '10.10.42.0/24', gw: '10.1.90.90' },
  ],
}
const ETH1 = { name: 'eth1', address: '10.2.0.7/16', hostAddress: '10.2.0.1/16', mac: '42:a4:a6:22:80:2f', mtu: 9000 }
const ETH0_LEASE = {
  new_ip_address: '10.1.90.5',
  new_subnet_mask: '255.255.255.0',
  new_classless_static_routes: '10.10.42.0/24 10.1.90.90 0.0.0.0/0 10.1.90.1',
  new_interface_mtu: '1500',
  new_dhcp_server_identifier: SERVER_ID,
  new_domain_name_servers: '10.96.0.10',
}
const ETH1_LEASE = {
  new_ip_address: '10.2.0.7',
  new_subnet_mask: '255.255.0.0',
  new_interface_mtu: '9000',
  new_dhcp_server_identifier: SERVER_ID,
  new_domain_name_servers: '10.96.0.10',
}

function twoCase(title: string, reverse: boolean): Case {
  return {
    title,
    configure: (h) => {
      h.node.writeConf('10-t.conflist', h.node.testConflist([{ links: [ETH0, ETH1], reverse, dns: { nameservers: ['10.96.0.10'] } }]))
    },
    result: () => {
      // tmtest lists [host0, eth0, host1, eth1] (reversed: [host1, eth1, host0, eth0]), each IP pointing at its pod link
      const e0 = { version: '4', interface: reverse ? 3 : 1, address: ETH0.address, gateway: ETH0.gateway }
      const e1 = { version: '4', interface: reverse ? 1 : 3, address: ETH1.address }
      return { ips: reverse ? [e1, e0] : [e0, e1], routes: ETH0.routes }
    },
    ifaces: () => {
      const e0 = { name: 'eth0', mac: ETH0.mac, mtu: 1500, lease: ETH0_LEASE, peer: '10.1.90.1' }
      const e1 = { name: 'eth1', mac: ETH1.mac, mtu: 9000, lease: ETH1_LEASE, peer: '10.2.0.1' }
      return reverse ? [e1, e0] : [e0, e1]
    },
  }
}

const CALICO_POD = { address: '192.168.7.9/32', mac: '42:a4:a6:22:81:01' }
const CALICO_LEASE = {
  new_ip_address: '192.168.7.9',
  new_subnet_mask: '255.255.255.0',
  new_routers: '192.168.7.200',
  new_interface_mtu: '1500',
  new_dhcp_server_identifier: SERVER_ID,
  new_domain_name_servers: '8.8.8.8',
}

/**
 * A Calico node: forwarding on, and a default route (via an "uplink" veth pair kept inside the node netns), so
 * the host-side proxy ARP answers the pods' 169.254.1.1 (the kernel proxies only addresses it has a route to,
 * out of another link).
 */
function calicoNode(h: TapFdHarness): void {
  const node = h.node.node
  node.exec('sysctl', ['-qw', 'net.ipv4.ip_forward=1'])
  node.exec('ip', ['link', 'add', 'tmup0', 'type', 'veth', 'peer', 'name', 'tmup1'])
  node.exec('ip', ['addr', 'add', '10.255.0.1/30', 'dev', 'tmup0'])
  node.exec('ip', ['link', 'set', 'tmup0', 'up'])
  node.exec('ip', ['link', 'set', 'tmup1', 'up'])
  node.exec('ip', ['route', 'add', 'default', 'via', '10.255.0.2', 'dev', 'tmup0'])
}

const CASES: Case[] = [
  bridgeCase('one interface (Debian bridge + host-local)'),
  bridgeCase('MTU 9000 on the CNI link', 9000),
  twoCase('two interfaces', false),
  twoCase('two interfaces listed in reverse order', true),
  {
    title: 'Weave-like result (one IP, no routes, no interfaces)',
    configure: (h) => {
      h.node.writeConf(
        '10-t.conflist',
        h.node.testConflist(
          [{ mode: 'weave', links: [{ address: '10.32.0.5/12', gateway: '10.32.0.1', hostAddress: '10.32.0.1/12', mac: '42:a4:a6:22:80:30', routes: [{ dst: '0.0.0.0/0', gw: '10.32.0.1' }] }] }],
          { cniVersion: '0.3.1' },
        ),
      )
    },
    // rebuilt from the pod's one veth: its address, its default route; the interface added
    result: (_csn, h, podId) => ({
      interfaces: [{ name: 'eth0', mac: '42:a4:a6:22:80:30', sandbox: h.nsPath(podId) }],
      ips: [{ version: '4', address: '10.32.0.5/12', gateway: '10.32.0.1' }],
      routes: [{ dst: '0.0.0.0/0', gw: '10.32.0.1' }],
    }),
    ifaces: () => [
      {
        name: 'eth0',
        mac: '42:a4:a6:22:80:30',
        mtu: 1500,
        lease: { new_ip_address: '10.32.0.5', new_subnet_mask: '255.240.0.0', new_routers: '10.32.0.1', new_interface_mtu: '1500', new_dhcp_server_identifier: SERVER_ID },
        peer: '10.32.0.1',
      },
    ],
  },
  {
    title: 'Calico (dummy network provides the gateway)',
    dummy: true,
    configure: (h) => {
      calicoNode(h)
      h.node.writeConf(
        '10-t.conflist',
        h.node.testConflist([{ mode: 'calico', links: [CALICO_POD], perContainer: { [h.dummyPodId]: { links: [{ address: '192.168.7.200/32' }] } } }], { cniVersion: '0.3.1' }),
      )
    },
    // one IP and no routes: rebuilt from the link like Weave, then widened to /24 with the dummy's gateway
    result: (_csn, h, podId) => ({
      interfaces: [{ name: 'eth0', mac: CALICO_POD.mac, sandbox: h.nsPath(podId) }],
      ips: [{ version: '4', address: '192.168.7.9/24', gateway: '192.168.7.200' }],
      routes: [{ dst: '0.0.0.0/0', gw: '192.168.7.200' }],
    }),
    ifaces: () => [{ name: 'eth0', mac: CALICO_POD.mac, mtu: 1500, lease: CALICO_LEASE, peer: '192.168.7.200' }],
  },
  {
    title: 'Calico plus a second network',
    dummy: true,
    configure: (h) => {
      calicoNode(h)
      h.node.writeConf(
        '10-t.conflist',
        h.node.testConflist([
          {
            links: [{ ...CALICO_POD, style: 'calico' }, ETH1],
            perContainer: { [h.dummyPodId]: { links: [{ address: '192.168.7.200/32', style: 'calico' }] } },
          },
        ]),
      )
    },
    result: () => ({
      // tmtest lists [calico host, eth1 host, eth1]; the Calico IP gets the appended eth0 entry (3)
      ips: [
        { version: '4', interface: 3, address: '192.168.7.9/24', gateway: '192.168.7.200' },
        { version: '4', interface: 2, address: ETH1.address },
      ],
      routes: [{ dst: '0.0.0.0/0', gw: '192.168.7.200' }],
    }),
    ifaces: () => [
      { name: 'eth0', mac: CALICO_POD.mac, mtu: 1500, lease: CALICO_LEASE, peer: '192.168.7.200' },
      { name: 'eth1', mac: ETH1.mac, mtu: 9000, lease: { ...ETH1_LEASE, new_domain_name_servers: '8.8.8.8' }, peer: '10.2.0.1' },
    ],
  },
]

/** tmtest's per-attachment state files of a pod (left only when its DEL did not run). */
function tmtestState(h: TapFdHarness, podId: string): string[] {
  return existsSync(h.node.stateDir) ? readdirSync(h.node.stateDir).filter((f) => f.includes(podId)) : []
}

/** What a failed ping needs to be understood. */
function diagnostics(h: TapFdHarness, vm: FakeVm): string {
  const node = (args: string[]) => h.node.node.exec(args[0], args.slice(1))
  return [
    'node routes:', node(['ip', 'route']), 'node neigh:', node(['ip', 'neigh']), 'node forwarding:', node(['sysctl', 'net.ipv4.ip_forward']),
    'vm addr:', vm.ns.exec('ip', ['-br', 'addr']), 'vm routes:', vm.ns.exec('ip', ['route']), 'vm neigh:', vm.ns.exec('ip', ['neigh']),
  ].join('\n')
}

async function runCase(t: ExecutionContext, c: Case, restart: boolean): Promise<void> {
  const h = new TapFdHarness()
  const vms: FakeVm[] = []
  try {
    c.configure(h)
    await h.start()
    if (c.dummy) await h.cni.getDummyNetwork()
    await h.prime()
    const before = h.node.snapshot()
    const podId = h.node.podId('tmpod')

    const csnJson = await h.add(podId)
    const csn = JSON.parse(csnJson)
    t.log(csnJson)
    const want = c.ifaces(csn, h, podId)
    t.is(csn.NsPath, h.nsPath(podId))
    t.deepEqual(
      csn.Interfaces,
      want.map((w) => ({ Type: 0, Name: w.name, HardwareAddr: macToBase64(w.mac), PCIAddress: '', MTU: w.mtu, VlanID: 0 })),
    )
    const wantResult = c.result(csn, h, podId)
    t.deepEqual(csn.Result.ips, wantResult.ips)
    if (wantResult.routes) t.deepEqual(csn.Result.routes, wantResult.routes)
    if (wantResult.interfaces) t.deepEqual(csn.Result.interfaces, wantResult.interfaces)
    // the VM gets the original MAC; the pod link itself now has another one
    for (const w of want) {
      const link = JSON.parse(sh('nsenter', [`--net=${csn.NsPath}`, 'ip', '-j', 'link', 'show', w.name]))[0]
      t.not(link.address, w.mac, `${w.name} keeps its CNI MAC`)
      t.is(link.master, `br${want.indexOf(w)}`)
    }
    // IPv6 is off for every link in the pod netns but lo (the pods here are IPv4): no link-local address, so no
    // DAD, router solicitations or MLD reports that the node bridge would flood into every other pod.
    const v6 = sh('nsenter', [`--net=${csn.NsPath}`, 'ip', '-6', '-o', 'addr', 'show'])
    t.deepEqual(v6.split('\n').filter((l) => l.trim() && !/^\d+:\s+lo\s/.test(l)), [], v6)

    if (restart) {
      await h.restart()
      t.deepEqual(h.source.keys(), [])
      await h.recover(podId, csnJson)
    }

    const { fds, info } = await h.client.getFDs(podId)
    t.is(fds.length, want.length)
    t.is(info.toString(), JSON.stringify(want.map((w, i) => ({ type: 0, mac: macToBase64(w.mac), fdIndex: i, pciAddress: '' }))))
    t.deepEqual(parseFdInfo(info).map((i) => i.mac), want.map((w) => w.mac))

    for (const [i, w] of want.entries()) {
      const vm = new FakeVm()
      vms.push(vm)
      await vm.attach(fds[i], w.mac, w.mtu)
      const peer = nodePeerOf(h.node.name, csn.NsPath, w.name)
      const capture = await Capture.start(h.node.name, peer, 'udp port 67 or udp port 68')
      const lease = await vm.dhcpcd()
      for (const [k, v] of Object.entries(w.lease)) t.is(lease[k], v, `${w.name}: ${k}`)
      if (!w.lease.new_classless_static_routes) t.false('new_classless_static_routes' in lease, `${w.name}: no option 121`)
      if (!w.lease.new_routers) t.false('new_routers' in lease, `${w.name}: no option 3`)
      vm.configure(lease)
      const pinged = await vm.ping(w.peer)
      if (!pinged) t.log(diagnostics(h, vm))
      t.true(pinged, `${w.name}: ping ${w.peer} from the VM side`)
      const { captured, lines } = await capture.stop()
      t.is(captured, 0, `DHCP frames on ${peer} in the node netns: ${lines}`)
    }
    for (const fd of fds) closeFd(fd)

    await h.client.releaseFDs(podId)
    t.false(h.netnsFiles().includes(podId), 'the pod netns is gone')
    t.deepEqual(tmtestState(h, podId), [], 'tmtest DEL ran')
    t.deepEqual(h.node.snapshot(), before, 'node links, addresses, routes and IPAM leases as before the add')
    t.deepEqual(h.source.keys(), [])
  } finally {
    for (const vm of vms) vm.cleanup()
    await h.cleanup()
  }
}

for (const c of CASES) {
  test(`${c.title}`, (t) => runCase(t, c, false))
  test(`${c.title}, after a server restart with recover`, (t) => runCase(t, c, true))
}

test('DNS in the add payload replaces the result\'s DNS: in the ContainerSideNetwork and in the lease', async (t) => {
  const h = new TapFdHarness()
  const vm = new FakeVm()
  try {
    h.node.writeConf('10-t.conflist', h.node.testConflist([{ links: [ETH0], dns: { nameservers: ['10.96.0.10'] } }]))
    await h.start()
    const podId = h.node.podId()
    const dns = { nameservers: ['10.96.0.53', '10.96.0.54'], domain: 'cluster.local', search: ['default.svc.cluster.local', 'svc.cluster.local'] }
    const csn = JSON.parse(await h.add(podId, 'vm', 'default', dns))
    t.deepEqual(csn.Result.dns, dns)
    const { fds } = await h.client.getFDs(podId)
    await vm.attach(fds[0], ETH0.mac, 1500)
    for (const fd of fds) closeFd(fd)
    const lease = await vm.dhcpcd()
    t.is(lease.new_domain_name_servers, '10.96.0.53 10.96.0.54')
    t.is(lease.new_domain_search, 'default.svc.cluster.local svc.cluster.local')
    await h.client.releaseFDs(podId)
    t.deepEqual(h.netnsFiles(), [])
  } finally {
    vm.cleanup()
    await h.cleanup()
  }
})

test('a VM holding its tap across a server restart: it gets DHCP from the recovered server; get is busy until it exits, then reopens the tap', async (t) => {
  const h = new TapFdHarness()
  const vm = new FakeVm()
  try {
    h.node.writeConf('10-bridge.conflist', h.node.bridgeConflist({ subnet: '10.79.0.0/24' }))
    await h.start()
    const podId = h.node.podId()
    const csnJson = await h.add(podId)
    const mac = JSON.parse(csnJson).Result.interfaces.find((x: any) => x.sandbox).mac
    const first = await h.client.getFDs(podId)
    await vm.attach(first.fds[0], mac, 1500)
    for (const fd of first.fds) closeFd(fd)

    // the VM (its copier) keeps the tap open while the server restarts
    await h.restart()
    await h.recover(podId, csnJson)
    const lease = await vm.dhcpcd()
    t.is(lease.new_ip_address, JSON.parse(csnJson).Result.ips[0].address.split('/')[0])
    t.is(lease.new_dhcp_server_identifier, SERVER_ID)
    const busy = await t.throwsAsync(h.client.getFDs(podId))
    t.log(busy!.message)
    t.regex(busy!.message, /held by another process/)

    // the VM exits: the tap can be reopened for its next start
    vm.cleanup()
    const deadline = Date.now() + 5000
    let again: Awaited<ReturnType<typeof h.client.getFDs>> | undefined
    while (!again) {
      again = await h.client.getFDs(podId).catch((e) => {
        if (Date.now() > deadline) throw e
        return undefined
      })
      if (!again) await new Promise((r) => setTimeout(r, 20))
    }
    t.is(again.fds.length, 1)
    for (const fd of again.fds) closeFd(fd)
    await h.client.releaseFDs(podId)
    t.deepEqual(h.netnsFiles(), [])
    t.deepEqual(h.node.leases('tmbridge'), [])
  } finally {
    vm.cleanup()
    await h.cleanup()
  }
})
