/**
 * Helpers for TapFDSource tests: an FDServer + TapFDSource on a temp socket over a CNI test node (pods live in
 * a temp netns dir), a "VM" netns whose tap is joined to a pod's tap fd by a frame copier process, a real
 * `dhcpcd -T` lease through it, a ping from the VM side, and a tcpdump capture on the node side.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { closeSync, mkdtempSync, readdirSync, readlinkSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { FDClient, FDServer } from '../../src/index'
import { TapFDSource, type TapFDSourceOptions } from '../../src/tapfdsource'
import { nativePodNetworkOps } from '../../src/podnetwork'
import { encodeGetFDPayload, encodeRecoverPayload, parseContainerSideNetwork, base64ToMac } from '../../src/payloads'
import { createTap, openTap, deleteNetns } from '../../src/native'
import type { CniClient, CniDns, ExecCniClientOptions } from '../../src/cni'
import { CNI_FIXTURE_BIN, CniTestNode, DEBIAN_CNI_BIN } from './cni'
import { TestNetns, sh, uniqueName } from './env'

/** The frame copier: copies every frame between fds 3 and 4 until one side goes away (tap deleted). */
const COPIER = `
import os, select, sys
a, b = 3, 4
peer = {a: b, b: a}
sys.stderr.write('ready\\n'); sys.stderr.flush()
while True:
    r, _, _ = select.select([a, b], [], [])
    for fd in r:
        try:
            data = os.read(fd, 65536)
        except OSError:
            sys.exit(0)
        if not data:
            sys.exit(0)
        try:
            os.write(peer[fd], data)
        except OSError:
            pass
`

/** A running frame copier between two tap fds (a separate process: it owns its duplicates of the fds). */
export class FrameCopier {
  readonly proc: ChildProcess
  private constructor(proc: ChildProcess) {
    this.proc = proc
  }
  /** Starts copying between `fdA` and `fdB`; resolves once the copier runs. The caller may close its fds. */
  static async start(fdA: number, fdB: number): Promise<FrameCopier> {
    const proc = spawn('/usr/bin/python3', ['-c', COPIER], { stdio: ['ignore', 'ignore', 'pipe', fdA, fdB] })
    await new Promise<void>((resolve, reject) => {
      let err = ''
      proc.stderr!.on('data', (d) => {
        err += d
        if (err.includes('ready')) resolve()
      })
      proc.on('exit', (code) => reject(new Error(`frame copier exited (${code}): ${err}`)))
    })
    return new FrameCopier(proc)
  }
  stop(): void {
    this.proc.kill('SIGKILL')
  }
}

let dhcpcdQueue: Promise<void> = Promise.resolve()

/** A stand-in VM: a netns with a tap `vm0` (given the VM's MAC) joined to a pod's tap fd. */
export class FakeVm {
  readonly ns: TestNetns
  private copier: FrameCopier | null = null
  constructor() {
    this.ns = new TestNetns('tmvm')
  }

  /** Creates vm0 with the MAC and MTU the VM would have, and joins it to `podTapFd` (which stays the caller's). */
  async attach(podTapFd: number, mac: string, mtu: number): Promise<void> {
    await createTap('vm0', { netns: this.ns.path, mtu, up: false })
    this.ns.exec('ip', ['link', 'set', 'vm0', 'address', mac, 'up'])
    const [vmFd] = await openTap('vm0', { netns: this.ns.path })
    try {
      this.copier = await FrameCopier.start(podTapFd, vmFd)
    } finally {
      closeSync(vmFd)
    }
  }

  /**
   * `dhcpcd -T` on vm0 (test mode: prints the offer), with private state dirs; returns its variables.
   * Bookworm's dhcpcd 9.4.1 segfaults at exit (TESTING.md), and now and then before it printed: its stdout is
   * unbuffered (stdbuf) so nothing printed is lost, and a run that crashed before printing is retried (up to 7
   * times: a CI run once saw 4 crashes in a row, each after the offer had come).
   */
  dhcpcd(): Promise<Record<string, string>> {
    // one dhcpcd at a time in this process: under load its early crash comes more often
    const run = dhcpcdQueue.then(() => this.dhcpcdOnce())
    dhcpcdQueue = run.then(
      () => undefined,
      () => undefined,
    )
    return run
  }

  private async dhcpcdOnce(): Promise<Record<string, string>> {
    const script =
      'mount -t tmpfs none /var/lib/dhcpcd && mount -t tmpfs none /run && ' +
      'exec timeout 30 stdbuf -o0 dhcpcd -T -4 -1 -A -t 20 -f /dev/null --option classless_static_routes --option interface_mtu ' +
      '--option domain_search --option domain_name_servers vm0'
    let last = ''
    for (let attempt = 0; attempt < 8; attempt++) {
      const { code, out, err } = await run('ip', ['netns', 'exec', this.ns.name, 'unshare', '-m', 'sh', '-c', script], () => this.killLeftovers())
      if (code !== 0 && code !== 139) throw new Error(`dhcpcd exit ${code}: ${out}\n${err}`)
      const vars: Record<string, string> = {}
      for (const m of out.matchAll(/^(new_[a-z_]+)='([^']*)'$/gm)) vars[m[1]] = m[2]
      if (vars.new_ip_address) return vars
      last = `exit ${code}: ${out}\n${err}`
      if (code !== 139) break
    }
    throw new Error(`dhcpcd got no lease (${last})`)
  }

  /** Configures vm0 with the lease (address and routes) as a guest would. */
  configure(lease: Record<string, string>): void {
    const prefix = maskToPrefix(lease.new_subnet_mask)
    this.ns.exec('ip', ['addr', 'add', `${lease.new_ip_address}/${prefix}`, 'dev', 'vm0'])
    const routes: [string, string][] = []
    if (lease.new_classless_static_routes) {
      const parts = lease.new_classless_static_routes.split(' ')
      for (let i = 0; i < parts.length; i += 2) routes.push([parts[i], parts[i + 1]])
    } else if (lease.new_routers) {
      routes.push(['0.0.0.0/0', lease.new_routers.split(' ')[0]])
    }
    for (const [dst, gw] of routes) this.ns.exec('ip', ['route', 'replace', dst === '0.0.0.0/0' ? 'default' : dst, 'via', gw, 'dev', 'vm0', 'onlink'])
  }

  /** Pings `peer` from the VM side (up to 3 tries of one echo each); true when a reply came. */
  async ping(peer: string): Promise<boolean> {
    for (let i = 0; i < 3; i++) {
      const { code } = await run('ip', ['netns', 'exec', this.ns.name, 'busybox', 'ping', '-c', '1', '-W', '2', peer])
      if (code === 0) return true
    }
    return false
  }

  private killLeftovers(): void {
    const pids = sh('ip', ['netns', 'pids', this.ns.name]).split(/\s+/).filter(Boolean)
    for (const pid of pids) if (this.copier?.proc.pid !== Number(pid)) spawnKill(pid)
  }

  cleanup(): void {
    this.copier?.stop()
    this.ns.cleanup()
  }
}

function spawnKill(pid: string): void {
  try {
    process.kill(Number(pid), 'SIGKILL')
  } catch {
    // gone
  }
}

/** Runs a command; resolves with its exit code (128+signal) and output. `after` runs once it exited. */
export function run(cmd: string, args: string[], after?: () => void): Promise<{ code: number; out: string; err: string }> {
  return new Promise((resolve, reject) => {
    // dhcpcd's helpers may hold stdout open after the main process exits: resolve on 'exit', not 'close'.
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] })
    let out = ''
    let err = ''
    p.stdout.on('data', (d) => (out += d))
    p.stderr.on('data', (d) => (err += d))
    p.on('error', reject)
    p.on('exit', (code, signal) => {
      after?.()
      // let the last buffered output arrive
      setImmediate(() => resolve({ code: code ?? 128 + (signal ? (({ SIGSEGV: 11, SIGKILL: 9, SIGTERM: 15 }) as Record<string, number>)[signal] ?? 0 : 0), out, err }))
    })
  })
}

export function maskToPrefix(mask: string): number {
  return mask.split('.').reduce((n, o) => n + (Number(o).toString(2).match(/1/g)?.length ?? 0), 0)
}

/** tcpdump in a netns on one interface; `stop()` returns how many packets it captured. */
export class Capture {
  private constructor(
    private readonly proc: ChildProcess,
    private readonly err: () => string,
    private readonly out: () => string,
  ) {}
  static async start(ns: string, iface: string, filter: string): Promise<Capture> {
    const proc = spawn('ip', ['netns', 'exec', ns, 'tcpdump', '-i', iface, '-n', '-l', filter], { stdio: ['ignore', 'pipe', 'pipe'] })
    let err = ''
    let out = ''
    proc.stdout!.on('data', (d) => (out += d))
    await new Promise<void>((resolve, reject) => {
      proc.stderr!.on('data', (d) => {
        err += d
        if (err.includes('listening on')) resolve()
      })
      proc.on('exit', () => reject(new Error(`tcpdump exited: ${err}`)))
    })
    return new Capture(proc, () => err, () => out)
  }
  /** Stops tcpdump; resolves to the number of packets captured and the lines printed. */
  async stop(): Promise<{ captured: number; lines: string }> {
    const exited = new Promise<void>((r) => this.proc.on('exit', () => r()))
    this.proc.kill('SIGINT')
    await exited
    const m = /(\d+) packets? captured/.exec(this.err())
    if (!m) throw new Error(`tcpdump did not report its count: ${this.err()}`)
    return { captured: Number(m[1]), lines: this.out() }
  }
}

/** The node-side peer of a veth in a pod netns (by the pod link's peer ifindex). */
export function nodePeerOf(nodeNs: string, podNsPath: string, podLink: string): string {
  const l = JSON.parse(sh('nsenter', [`--net=${podNsPath}`, 'ip', '-j', 'link', 'show', podLink]))[0]
  const nodeLinks = JSON.parse(sh('ip', ['-n', nodeNs, '-j', 'link', 'show'])) as { ifindex: number; ifname: string }[]
  const peer = nodeLinks.find((n) => n.ifindex === l.link_index)
  if (!peer) throw new Error(`no peer of ${podLink} (ifindex ${l.link_index}) in ${nodeNs}`)
  return peer.ifname
}

/** An FDServer + TapFDSource on a CNI test node, with pods in a temp netns dir. `restart()` replaces both. */
export class TapFdHarness {
  readonly node: CniTestNode
  readonly netnsDir: string
  readonly sock: string
  readonly dummyPodId: string
  server!: FDServer
  source!: TapFDSource
  /** The CNI client of the current source. */
  cni!: ReturnType<CniTestNode['client']>
  readonly client: FDClient
  /** Plugin dirs searched before the test plugins and Debian's (benchmarks add their own). */
  readonly binDirs: string[] = []
  /** Wraps the CNI client the source gets (benchmarks time it). */
  wrapCni?: (c: CniClient) => CniClient
  private readonly sourceOpts: TapFDSourceOptions
  private readonly clientOpts: ExecCniClientOptions

  constructor(opts: { source?: TapFDSourceOptions; client?: ExecCniClientOptions } = {}) {
    this.node = new CniTestNode('tmtn')
    // IPv4 only on the node: IPv6 link-local addresses and routes come and go with carrier, after the fact
    this.node.node.exec('sysctl', ['-qw', 'net.ipv6.conf.all.disable_ipv6=1', 'net.ipv6.conf.default.disable_ipv6=1'])
    this.netnsDir = mkdtempSync(join(tmpdir(), 'tapmanager-netns-'))
    this.sock = join(this.node.dir, 'tapmanager.sock')
    this.dummyPodId = uniqueName('tmdum')
    this.sourceOpts = opts.source ?? {}
    this.clientOpts = opts.client ?? {}
    this.client = new FDClient(this.sock)
  }

  /**
   * The CNI client the source uses (plugins in the node netns, pods in the temp netns dir; the Calico dummy netns
   * made there by the client's default, native netns ops).
   */
  cniClient(): ReturnType<CniTestNode['client']> {
    return this.node.client({
      netnsDir: this.netnsDir,
      dummyPodId: this.dummyPodId,
      ...(this.binDirs.length ? { binDirs: [...this.binDirs, CNI_FIXTURE_BIN, DEBIAN_CNI_BIN] } : {}),
      ...this.clientOpts,
    })
  }

  async start(): Promise<void> {
    this.cni = this.cniClient()
    this.source = new TapFDSource(this.wrapCni ? this.wrapCni(this.cni) : this.cni, { netnsDir: this.netnsDir, ...this.sourceOpts })
    this.server = new FDServer(this.sock, this.source)
    await this.server.serve()
  }

  /**
   * One CNI ADD + DEL of a throwaway pod with the current config (errors ignored), so what plugins create once
   * and keep (the bridge plugin's bridge and its gateway address) exists before a test snapshots the node.
   */
  async prime(): Promise<void> {
    const id = uniqueName('tmprime')
    const path = this.nsPath(id)
    await nativePodNetworkOps.createNetns(path)
    try {
      await this.cni.addSandboxToNetwork(id, '', '')
      await this.cni.removeSandboxFromNetwork(id, '', '')
    } catch {
      // a faulty config: its own rollback ran
    } finally {
      await nativePodNetworkOps.deleteNetns(path)
    }
  }

  /** Stops the server and its source (netns and links stay), then starts new ones. */
  async restart(): Promise<void> {
    await this.server.stop()
    await this.start()
  }

  nsPath(podId: string): string {
    return join(this.netnsDir, podId)
  }

  /** The netns files in the temp netns dir. */
  netnsFiles(): string[] {
    return readdirSync(this.netnsDir).sort()
  }

  /** add through the FDClient: returns the ContainerSideNetwork JSON text. */
  async add(podId: string, podName = 'vm', podNs = 'default', dns: CniDns | null = null): Promise<string> {
    const payload = encodeGetFDPayload({ podNetworkDesc: { podId, podName, podNs, dns } })
    return (await this.client.addFDs(podId, Buffer.from(payload))).toString()
  }

  /** recover through the FDClient from a saved ContainerSideNetwork JSON. */
  async recover(podId: string, csnJson: string, podName = 'vm', podNs = 'default'): Promise<void> {
    const payload = encodeRecoverPayload({
      podNetworkDesc: { podId, podName, podNs, dns: null },
      csn: parseContainerSideNetwork(csnJson),
      haveRunningContainers: false,
    })
    await this.client.recover(podId, Buffer.from(payload))
  }

  async cleanup(): Promise<void> {
    await this.server?.stop().catch(() => undefined)
    for (const f of readdirSync(this.netnsDir)) await deleteNetns(f, this.netnsDir).catch(() => undefined)
    try {
      // createNetns made the dir a (shared) mount point, as `ip netns add` does with /var/run/netns
      spawnSync('umount', ['-l', this.netnsDir])
      rmSync(this.netnsDir, { recursive: true, force: true })
    } finally {
      this.node.cleanup()
    }
  }
}

/** The MAC (aa:bb:..) of a base64 HardwareAddr. */
export const macOf = base64ToMac

/** This process's open fds, as `fd -> target` (to tell which fd leaked). */
export function openFds(): Map<string, string> {
  const m = new Map<string, string>()
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      m.set(fd, readlinkSync(`/proc/self/fd/${fd}`))
    } catch {
      // closed meanwhile (readdir's own fd)
    }
  }
  return m
}
