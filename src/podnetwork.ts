/**
 * The native operations TapFDSource orchestrates, behind one interface so its logic (ordering, rollback,
 * serialisation) can be unit-tested with fakes, while the real implementation calls the Rust core.
 */
import { basename, dirname } from 'node:path'
import * as native from './native'

/** A running per-pod DHCP server. */
export interface DhcpServerHandle {
  stop(): Promise<void>
  /** Its counters (the native server has them; frozen at their last values after `stop()`). */
  stats?(): DhcpServerCounts
}

/** What a DHCP server answered (and did not). */
export interface DhcpServerCounts {
  offers: number
  acks: number
  naks: number
  ignored: number
  errors: number
}

/** Options of the container-side teardown. */
export interface TeardownOptions {
  /**
   * Leave the emptied bridges and taps (down, the bridge's address removed) instead of deleting them: only for
   * a netns deleted right after, whose deletion destroys them (the kernel takes ~20-45 ms per device to
   * unregister one). What CNI DEL needs is restored either way. Default false.
   */
  keepDevices?: boolean
}

/** Options of the container-side setup. */
export interface ContainerSideOptions {
  enableSriov?: boolean
  calicoSubnetSize?: number
  /** IPv4 address of the dummy network's Calico link, when the pod is Calico's and has a default route. */
  dummyGateway?: string
}

export interface PodNetworkOps {
  /**
   * True when a live netns is mounted at the path (nsfs, checked natively without following a symlink). A plain
   * file left by a kill -9 between creating the file and mounting onto it, or a symlink, is not a netns.
   */
  netnsExists(nsPath: string): boolean
  /**
   * Creates the named netns at `nsPath` (`ip netns add`); fails with ERR_EXISTS when it exists. The real one
   * makes IPv6 off by default for the links created in it (`net.ipv6.conf.default.disable_ipv6=1`): a pod's
   * links are bridge ports and taps that need no IPv6 of their own, and each link-local address's DAD, router
   * solicitations and MLD reports would be flooded by the node bridge into every other pod (while the kernel
   * holds the rtnl lock every netns creation and link change waits for). A plugin that gives a link an IPv6
   * address turns IPv6 on for that link.
   */
  createNetns(nsPath: string): Promise<void>
  /** Deletes the netns at `nsPath`; a missing one is not an error. */
  deleteNetns(nsPath: string): Promise<void>
  /**
   * Rewires the netns for a VM; returns the ContainerSideNetwork JSON and one tap fd per interface. Fails with
   * ERR_NEEDS_DUMMY_GATEWAY, having changed nothing, for a Calico pod with a default route via 169.254.1.1 when
   * `opts.dummyGateway` is not given. The real one also answers `parsed`: the same ContainerSideNetwork as the
   * core holds it (an opaque native value), which `startDhcpServer` takes instead of parsing the JSON again.
   */
  setupContainerSide(nsPath: string, cniResultJson: string, opts: ContainerSideOptions): Promise<{ csn: string; fds: number[]; parsed?: unknown }>
  /** Restores the netns to what CNI left (with `keepDevices`, but for the emptied bridges and taps). */
  teardownContainerSide(nsPath: string, csnJson: string, opts?: TeardownOptions): Promise<void>
  /** Reopens the taps after a restart; a tap a running VM holds gives null. */
  recoverContainerSide(nsPath: string, csnJson: string): Promise<{ fds: (number | null)[] }>
  /** Reopens the taps of a recovered pod (ERR_BUSY while a VM holds one). */
  reopenTaps(nsPath: string, csnJson: string): Promise<number[]>
  /**
   * Starts the pod's DHCP server; it is bound when this resolves. `parsed` (what setupContainerSide answered, when
   * it did) is used instead of `csnJson` when given.
   */
  startDhcpServer(nsPath: string, csnJson: string, parsed?: unknown): Promise<DhcpServerHandle>
  /** Discards the frames queued on a tap fd (non-blocking); returns how many. Optional (fakes may leave it out). */
  drainTapFd?(fd: number): number
}

/** The real operations, in the Rust core. */
export const nativePodNetworkOps: PodNetworkOps = {
  netnsExists: (nsPath) => native.isNetnsMount(nsPath),
  createNetns: async (nsPath) => {
    await native.createNetns(basename(nsPath), { dir: dirname(nsPath), ipv6: false })
  },
  deleteNetns: (nsPath) => native.deleteNetns(basename(nsPath), dirname(nsPath)),
  setupContainerSide: (nsPath, resultJson, opts) => native.setupContainerSide(nsPath, resultJson, opts),
  teardownContainerSide: (nsPath, csnJson, opts) => native.teardownContainerSide(nsPath, csnJson, opts),
  recoverContainerSide: async (nsPath, csnJson) => {
    const { fds } = await native.recoverContainerSide(nsPath, csnJson)
    return { fds: fds.map((fd) => fd ?? null) }
  },
  reopenTaps: (nsPath, csnJson) => native.reopenTaps(nsPath, csnJson),
  startDhcpServer: (nsPath, csnJson, parsed) =>
    parsed === undefined
      ? native.startDhcpServer(nsPath, csnJson)
      : native.startDhcpServerParsed(nsPath, parsed as Parameters<typeof native.startDhcpServerParsed>[1]),
  drainTapFd: (fd) => native.drainTapFd(fd),
}

/**
 * The real operations, but pod netns keep the kernel's IPv6 defaults (`serve --pod-ipv6`): for CNI plugins that
 * give a link an IPv6 address without turning IPv6 on for it, or pods that rely on SLAAC before the rewiring.
 */
export const podNetworkOpsWithIpv6: PodNetworkOps = {
  ...nativePodNetworkOps,
  createNetns: async (nsPath) => {
    await native.createNetns(basename(nsPath), { dir: dirname(nsPath), ipv6: true })
  },
}
