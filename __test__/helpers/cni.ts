/**
 * A test "node" for CNI: a node netns where plugins run (the client's `execWrapper` is
 * `ip netns exec <node>`, so bridges, host veths and routes land there and never in the root netns), a temp
 * dir with a CNI config dir, a host-local dataDir, the tmtest plugin's state dir and log, and the client's
 * result cache. Pods are netns named by their pod id (`/var/run/netns/<podId>`), as the client expects.
 *
 *   const node = new CniTestNode()
 *   node.writeConf('10-bridge.conflist', node.bridgeConflist({ subnet: '10.77.0.0/24' }))
 *   const client = node.client()
 *   const pod = node.createPod()
 *   const { result } = await client.addSandboxToNetwork(pod.name, 'vm', 'default')
 *   ...
 *   node.cleanup()
 */
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { ExecCniClient, type ExecCniClientOptions } from '../../src/cni'
import { TestNetns, requirePrereqs, sh, uniqueName } from './env'

/** Our test plugins: `tmtest` (Node, every behaviour) and `tmnoop` (sh, prints a result file). */
export const CNI_FIXTURE_BIN = join(process.cwd(), '__test__', 'fixtures', 'cni', 'bin')
/** Debian's containernetworking-plugins. */
export const DEBIAN_CNI_BIN = '/usr/lib/cni'

/** Fails (never skips) unless root, `ip`, `nsenter`, node and the Debian bridge/host-local plugins are there. */
export function requireCniPrereqs(): void {
  requirePrereqs(['ip', 'nsenter', 'node', `${DEBIAN_CNI_BIN}/bridge`, `${DEBIAN_CNI_BIN}/host-local`, `${CNI_FIXTURE_BIN}/tmtest`])
}

/** One host-local lease: the IP and the container id / interface holding it. */
export interface HostLocalLease {
  ip: string
  containerId: string
  ifName: string
}

export class CniTestNode {
  readonly node: TestNetns
  readonly dir: string
  readonly confDir: string
  /** host-local's dataDir (leases live in `<dataDir>/<network name>/<ip>`). */
  readonly dataDir: string
  /** tmtest's stateDir. */
  readonly stateDir: string
  /** tmtest's logFile (one JSON line per invocation). */
  readonly logFile: string
  readonly cacheDir: string
  private readonly pods: TestNetns[] = []

  constructor(prefix = 'tmcn') {
    requireCniPrereqs()
    this.node = new TestNetns(prefix)
    this.dir = mkdtempSync(join(tmpdir(), 'tapmanager-cni-'))
    this.confDir = join(this.dir, 'net.d')
    this.dataDir = join(this.dir, 'ipam')
    this.stateDir = join(this.dir, 'tmtest')
    this.logFile = join(this.dir, 'tmtest.log')
    this.cacheDir = join(this.dir, 'cache')
    for (const d of [this.confDir, this.dataDir, this.stateDir]) mkdirSync(d, { recursive: true })
  }

  /** The node netns name. */
  get name(): string {
    return this.node.name
  }

  /** A client running plugins in the node netns, with this node's config dir and cache. */
  client(options: ExecCniClientOptions = {}): ExecCniClient {
    return new ExecCniClient({
      confDir: this.confDir,
      binDirs: [CNI_FIXTURE_BIN, DEBIAN_CNI_BIN],
      cacheDir: this.cacheDir,
      execWrapper: ['ip', 'netns', 'exec', this.node.name],
      timeoutMs: 20_000,
      ...options,
    })
  }

  /** Writes a config file into the config dir (objects as JSON); returns its path. */
  writeConf(fileName: string, conf: object | string): string {
    const path = join(this.confDir, fileName)
    writeFileSync(path, typeof conf === 'string' ? conf : JSON.stringify(conf, null, 2))
    return path
  }

  /** Removes every file of the config dir. */
  clearConf(): void {
    for (const f of readdirSync(this.confDir)) rmSync(join(this.confDir, f), { force: true })
  }

  /** A conflist: Debian `bridge` with `host-local` IPAM in this node's dataDir, then any extra plugins. */
  bridgeConflist(
    opts: { name?: string; cniVersion?: string; bridge?: string; subnet?: string; gateway?: string; mtu?: number; plugins?: object[] } = {},
  ): object {
    const subnet = opts.subnet ?? '10.77.0.0/24'
    return {
      cniVersion: opts.cniVersion ?? '1.0.0',
      name: opts.name ?? 'tmbridge',
      plugins: [
        {
          type: 'bridge',
          bridge: opts.bridge ?? 'tmbr0',
          isGateway: true,
          ipMasq: false,
          ...(opts.mtu ? { mtu: opts.mtu } : {}),
          ipam: {
            type: 'host-local',
            dataDir: this.dataDir,
            ranges: [[{ subnet, ...(opts.gateway ? { gateway: opts.gateway } : {}) }]],
            routes: [{ dst: '0.0.0.0/0' }],
          },
        },
        ...(opts.plugins ?? []),
      ],
    }
  }

  /** A tmtest plugin config (for a conflist's `plugins`), with this node's stateDir and logFile. */
  testPlugin(conf: Record<string, unknown> = {}): Record<string, unknown> {
    return { type: 'tmtest', stateDir: this.stateDir, logFile: this.logFile, ...conf }
  }

  /** A conflist of tmtest plugins. */
  testConflist(plugins: Record<string, unknown>[], opts: { name?: string; cniVersion?: string } = {}): object {
    return { cniVersion: opts.cniVersion ?? '1.0.0', name: opts.name ?? 'tmtestnet', plugins: plugins.map((p) => this.testPlugin(p)) }
  }

  /** Creates a pod netns (named by a fresh pod id); removed by `cleanup()`. */
  createPod(prefix = 'tmpod'): TestNetns {
    const pod = new TestNetns(prefix)
    this.pods.push(pod)
    return pod
  }

  /** A fresh pod id whose netns does not exist. */
  podId(prefix = 'tmpod'): string {
    return uniqueName(prefix)
  }

  /** The host-local leases of a network (files `<dataDir>/<network>/<ip>`). */
  leases(network: string): HostLocalLease[] {
    const dir = join(this.dataDir, network)
    if (!existsSync(dir)) return []
    return readdirSync(dir)
      .filter((f) => !f.startsWith('last_reserved_ip') && f !== 'lock')
      .map((ip) => {
        const [containerId, ifName] = readFileSync(join(dir, ip), 'utf8').split(/\r?\n/)
        return { ip, containerId: containerId.trim(), ifName: (ifName ?? '').trim() }
      })
  }

  /** Every host-local lease of every network in this node's dataDir, as `<network>/<ip> <containerId>`, sorted. */
  allLeases(): string[] {
    if (!existsSync(this.dataDir)) return []
    return readdirSync(this.dataDir)
      .flatMap((net) => this.leases(net).map((l) => `${net}/${l.ip} ${l.containerId}`))
      .sort()
  }

  /**
   * A snapshot of the node for leak checks: link names with their addresses, routes, and all leases.
   * Compare a snapshot taken before a test with one taken after release.
   */
  snapshot(): { links: string[]; routes: string[]; leases: string[] } {
    const addrs = JSON.parse(this.node.exec('ip', ['-j', 'addr', 'show'])) as { ifname: string; addr_info: { local: string; prefixlen: number }[] }[]
    return {
      links: addrs.map((l) => `${l.ifname} ${l.addr_info.map((a) => `${a.local}/${a.prefixlen}`).join(' ')}`.trim()).sort(),
      routes: this.node
        .exec('ip', ['route', 'show', 'table', 'all'])
        .split('\n')
        // carrier state ("linkdown") follows the ports asynchronously: not part of what a test leaves
        .map((l) => l.replace(/ linkdown\b/, '').trim())
        // nor is the local route of an IPv6 link-local address: the kernel adds it once DAD has finished, which
        // may be after a snapshot (the address itself is compared under links)
        .filter((l) => l && !/^local fe80:/.test(l))
        .sort(),
      leases: this.allLeases(),
    }
  }

  /** tmtest's invocation log. */
  log(): { command: string; containerId: string; netns: string; ifName: string; args: string; path: string; stdin: Record<string, unknown> }[] {
    if (!existsSync(this.logFile)) return []
    return readFileSync(this.logFile, 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l))
  }

  /** Link names in the node netns. */
  nodeLinks(): string[] {
    return (JSON.parse(this.node.exec('ip', ['-j', 'link', 'show'])) as { ifname: string }[]).map((l) => l.ifname).sort()
  }

  /** Link names in a netns (by name). */
  linksIn(ns: string): string[] {
    return (JSON.parse(sh('ip', ['-n', ns, '-j', 'link', 'show'])) as { ifname: string }[]).map((l) => l.ifname).sort()
  }

  /** Removes pods, the node netns (killing what runs there) and the temp dir. */
  cleanup(): void {
    for (const p of this.pods) p.cleanup()
    this.node.cleanup()
    rmSync(this.dir, { recursive: true, force: true })
  }
}

/** True when a process exists and is not a zombie. */
export function processAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z'
  } catch {
    return false
  }
}
