/**
 * TapFDSource: the FDSource that gives a VM its pod network (Virtlet's TapFDSource, see NETWORK.md).
 *
 * add (getFDs): netns -> CNI ADD -> DNS override -> container side (taps, bridges, isolation) -> DHCP server
 * bound -> ContainerSideNetwork JSON back, one tap fd per interface. Any failure rolls back every step done
 * so far (DHCP stopped, container side torn down, CNI DEL, netns deleted), so nothing is leaked.
 * release: every step runs even when one fails; all errors are reported together. The netns is deleted last, so
 * the teardown leaves the emptied bridges and taps to that deletion (`keepDevices`) instead of deleting each.
 * recover/retrieveFDs: after a server restart, from the saved ContainerSideNetwork, without CNI or a new netns.
 * stop: DHCP servers stopped, fds closed, netns and links kept so a later recover works.
 *
 * Operations on one key are serialised; different keys run in parallel. A pod id belongs to one key from the
 * start of its add (or recover) to its release: an add or recover of the same pod id under another key fails at
 * once with ERR_EXISTS and touches nothing of the first key's pod.
 *
 * get (getInfo): the frames a pod's bridge flooded to a tap while no VM read it (up to txqlen, 1000) are
 * discarded from the tap fds before they are handed out, so a VM starts on an empty queue and its first DHCP
 * OFFER is not dropped behind a stale backlog (see `drainTapFd`).
 */
import { lstatSync } from 'node:fs'
import { TapmanagerError, ExistsError, InvalidInputError, NotFoundError, messageOf } from './errors'
import type { FDSource, GetFDsResult } from './fdsource'
import type { CniClient } from './cni'
import {
  encodeContainerSideNetwork,
  encodeFdInfo,
  goJsonStringify,
  parseContainerSideNetwork,
  parseGetFDPayload,
  parseRecoverPayload,
  toGoCniResult,
  type ContainerSideNetwork,
  type PodNetworkDesc,
  type RecoverPayload,
} from './payloads'
import { closeFd } from './native'
import { nativePodNetworkOps, type PodNetworkOps, type DhcpServerHandle } from './podnetwork'
import { DEFAULT_CALICO_SUBNET_SIZE, DEFAULT_NETNS_DIR, podNetnsPath } from './defaults'

/** Options of {@link TapFDSource}. */
export interface TapFDSourceOptions {
  /** Allow SR-IOV VFs (default false: a VF link is an error). */
  enableSriov?: boolean
  /** The mask length Calico's /32 pod addresses are widened to (default 24). */
  calicoSubnetSize?: number
  /** Where pod netns live, `ip netns` style (default `/var/run/netns`). */
  netnsDir?: string
  /** The native operations (injected by unit tests). */
  ops?: PodNetworkOps
}

/** Several errors from one operation that kept going past failures (release, rollback). */
export class AggregateOperationError extends TapmanagerError {
  /** Every error, the first one first. */
  readonly errors: unknown[]
  /** `listed`: the errors the message lists after `what` (default all). */
  constructor(what: string, listed: unknown[], errors: unknown[] = listed) {
    super('ERR_MULTIPLE', `${what}: ${listed.map(messageOf).join('; ')}`)
    this.errors = errors
  }
}

/** A pod's network as this process holds it. */
interface PodNetwork {
  desc: PodNetworkDesc
  csn: ContainerSideNetwork
  csnJson: string
  /** Tap fds in interface order; null for a tap a running VM holds (recovered, not yet retrieved). */
  fds: (number | null)[]
  dhcp: DhcpServerHandle | null
}

export class TapFDSource implements FDSource {
  /** getInfo depends only on a key's ContainerSideNetwork, fixed from add (or recover) to release. */
  readonly stableInfo = true
  private readonly cni: CniClient
  private readonly ops: PodNetworkOps
  private readonly netnsDir: string
  private readonly enableSriov: boolean
  private readonly calicoSubnetSize: number
  private readonly pods = new Map<string, PodNetwork>()
  /** pod id -> the key whose add or recover holds it (set synchronously when the add starts). */
  private readonly owners = new Map<string, string>()
  /** Frames discarded from idle taps on get, in all (see the class comment). */
  framesDrained = 0
  private readonly locks = new Map<string, Promise<unknown>>()

  constructor(cni: CniClient, options: TapFDSourceOptions = {}) {
    this.cni = cni
    this.ops = options.ops ?? nativePodNetworkOps
    this.netnsDir = options.netnsDir ?? DEFAULT_NETNS_DIR
    this.enableSriov = options.enableSriov ?? false
    this.calicoSubnetSize = options.calicoSubnetSize ?? DEFAULT_CALICO_SUBNET_SIZE
    if (!Number.isInteger(this.calicoSubnetSize) || this.calicoSubnetSize < 1 || this.calicoSubnetSize > 32) {
      throw new InvalidInputError(`calicoSubnetSize must be an integer from 1 to 32, not ${options.calicoSubnetSize}`)
    }
  }

  /** The keys this source holds. */
  keys(): string[] {
    return [...this.pods.keys()]
  }

  /**
   * The pod description and ContainerSideNetwork of a key (what recover needs), or undefined; `csnJson` is the
   * ContainerSideNetwork as the core's JSON (what setupContainerSide answered, or what recover passed on).
   */
  describe(key: string): { podNetworkDesc: PodNetworkDesc; csn: ContainerSideNetwork; csnJson: string } | undefined {
    const pod = this.pods.get(key)
    return pod && { podNetworkDesc: pod.desc, csn: pod.csn, csnJson: pod.csnJson }
  }

  getFDs(key: string, data: Buffer): Promise<GetFDsResult> {
    return this.serialised(key, () => this.add(key, data))
  }

  release(key: string): Promise<void> {
    return this.serialised(key, () => this.remove(key))
  }

  getInfo(key: string): Buffer {
    const pod = this.pods.get(key)
    if (!pod) throw new NotFoundError(`no pod network for key ${JSON.stringify(key)}`)
    // getInfo answers a get, which hands the fds out: drop the backlog an idle tap collected meanwhile.
    this.drainTaps(pod)
    const info = pod.csn.interfaces.map((i, fdIndex) => ({ type: i.type, mac: i.hardwareAddr, fdIndex, pciAddress: i.pciAddress }))
    return Buffer.from(encodeFdInfo(info))
  }

  recover(key: string, data: Buffer): Promise<void> {
    return this.serialised(key, () => this.recoverPod(key, () => parseRecoverPayload(data)))
  }

  /**
   * {@link recover} from a payload already parsed (a daemon's own state record). `csnJson`, when given, is
   * `payload.csn` as the core's JSON (e.g. what setupContainerSide answered) and goes to the core as it is,
   * instead of being encoded again.
   */
  recoverParsed(key: string, payload: RecoverPayload, csnJson?: string): Promise<void> {
    return this.serialised(key, () => this.recoverPod(key, () => payload, csnJson))
  }

  retrieveFDs(key: string): Promise<number[]> {
    return this.serialised(key, async () => {
      const pod = this.pods.get(key)
      if (!pod) throw new NotFoundError(`no pod network for key ${JSON.stringify(key)}`)
      if (pod.fds.every((fd) => fd !== null)) return pod.fds as number[]
      const fds = await this.ops.reopenTaps(pod.csn.nsPath, pod.csnJson)
      for (const fd of pod.fds) if (fd !== null) closeQuietly(fd)
      pod.fds = fds
      return fds
    })
  }

  /** The key holding a pod id (from the start of its add or recover to its release), if any. */
  ownerOf(podId: string): string | undefined {
    return this.owners.get(podId)
  }

  /**
   * Cleans what an interrupted add left for a pod (after a crash): its container side if a saved
   * ContainerSideNetwork is given, its CNI attachment (DEL, from the CNI cache; with no netns when the path is
   * not a live netns mount) and its netns file. Resolves to false, touching nothing, when the pod id belongs to
   * a live key (the leftover record was a second key's failed claim on it).
   */
  cleanupPod(desc: PodNetworkDesc, csnJson?: string): Promise<boolean> {
    return this.serialised(`cleanup:${desc.podId}`, async () => {
      if (this.owners.has(desc.podId)) return false
      const errors: unknown[] = []
      const nsPath = this.nsPath(desc.podId)
      if (csnJson && this.ops.netnsExists(nsPath)) {
        // The netns at nsPath is deleted below: its deletion takes the bridges and taps.
        await this.ops.teardownContainerSide(nsPath, csnJson, { keepDevices: true }).catch((e) => errors.push(e))
      }
      await this.cni.removeSandboxFromNetwork(desc.podId, desc.podName, desc.podNs).catch((e) => errors.push(e))
      await this.ops.deleteNetns(nsPath).catch((e) => errors.push(e))
      if (errors.length) throw new AggregateOperationError(`cleaning up pod ${desc.podId}`, errors)
      return true
    })
  }

  async stop(): Promise<void> {
    await Promise.allSettled([...this.locks.values()])
    const errors: unknown[] = []
    for (const pod of this.pods.values()) {
      if (pod.dhcp) await pod.dhcp.stop().catch((e) => errors.push(e))
      pod.dhcp = null
      for (const fd of pod.fds) if (fd !== null) closeQuietly(fd)
      pod.fds = pod.fds.map(() => null)
    }
    this.pods.clear()
    this.owners.clear()
    if (errors.length) throw new AggregateOperationError('stopping TapFDSource', errors)
  }

  private nsPath(podId: string): string {
    return podNetnsPath(this.netnsDir, podId)
  }

  private async add(key: string, data: Buffer): Promise<GetFDsResult> {
    if (this.pods.has(key)) throw new ExistsError(`pod network for key ${JSON.stringify(key)} exists`)
    const { podNetworkDesc: desc } = parseGetFDPayload(data)
    // Claimed here, before the first await, so of concurrent adds of one pod id exactly one goes on.
    this.claim(desc.podId, key)
    const nsPath = this.nsPath(desc.podId)
    const undo: (() => Promise<void>)[] = []
    try {
      // A netns left by a crash (no live key holds this pod id) is cleaned (CNI DEL from the cache, then
      // deleted) rather than failing forever; a plain file or a symlink at the path is just removed (never
      // followed).
      if (this.ops.netnsExists(nsPath)) {
        await this.cni.removeSandboxFromNetwork(desc.podId, desc.podName, desc.podNs).catch(() => undefined)
        await this.ops.deleteNetns(nsPath)
      } else {
        if (entryExists(nsPath)) await this.ops.deleteNetns(nsPath)
        // An earlier add whose ADD and rollback DEL both failed left its CNI cache entry: DEL it first, or the
        // plugins (host-local) refuse to allocate twice for the same container id.
        if (this.cni.hasLeftover && (await this.cni.hasLeftover(desc.podId))) {
          await this.cni.removeSandboxFromNetwork(desc.podId, desc.podName, desc.podNs).catch(() => undefined)
        }
      }
      await this.ops.createNetns(nsPath)
      undo.push(() => this.ops.deleteNetns(nsPath))

      // A failed ADD has run DEL itself; a successful one is undone by DEL.
      const attachment = await this.cni.addSandboxToNetwork(desc.podId, desc.podName, desc.podNs)
      undo.push(() => this.cni.removeSandboxFromNetwork(desc.podId, desc.podName, desc.podNs))
      const result = { ...attachment.result }
      if (desc.dns) result.dns = { ...desc.dns }

      const resultJson = goJsonStringify(toGoCniResult(result))
      const setup = (dummyGateway?: string) =>
        this.ops.setupContainerSide(nsPath, resultJson, {
          enableSriov: this.enableSriov,
          calicoSubnetSize: this.calicoSubnetSize,
          dummyGateway,
        })
      // Only a Calico pod with a default route via 169.254.1.1 needs the dummy network's gateway: setup says so
      // (ERR_NEEDS_DUMMY_GATEWAY, before changing anything), and only then is it fetched. No separate look into
      // the netns for every pod.
      const side = await setup().catch(async (err) => {
        if ((err as { code?: unknown } | null)?.code !== 'ERR_NEEDS_DUMMY_GATEWAY') throw err
        return setup(await this.dummyGateway())
      })
      undo.push(async () => {
        for (const fd of side.fds) closeQuietly(fd)
        await this.ops.teardownContainerSide(nsPath, side.csn)
      })

      const csn = parseContainerSideNetwork(Buffer.from(side.csn))
      // No DHCP for SR-IOV VFs (the VM configures them from the CNI result): a pod of VFs only has no server.
      const dhcp = hasTap(csn) ? await this.ops.startDhcpServer(nsPath, side.csn, side.parsed) : null
      if (dhcp) undo.push(() => dhcp.stop())

      this.pods.set(key, { desc, csn, csnJson: side.csn, fds: [...side.fds], dhcp })
      return { fds: side.fds, data: Buffer.from(side.csn) }
    } catch (err) {
      this.unclaim(desc.podId, key)
      const errors = await runAll(undo.reverse())
      // A failed ADD whose own rollback DEL failed too leaves its CNI cache entry: a later DEL needs it.
      const cniLeftover = ((err as { cleanupErrors?: unknown[] }).cleanupErrors?.length ?? 0) > 0
      const out = errors.length ? new AggregateOperationError(`${messageOf(err)}; then rolling back failed`, errors, [err, ...errors]) : err
      if (cniLeftover && out && typeof out === 'object') (out as { cniLeftover?: boolean }).cniLeftover = true
      throw out
    }
  }

  /** Takes `podId` for `key`; ERR_EXISTS when another key holds it. */
  private claim(podId: string, key: string): void {
    const owner = this.owners.get(podId)
    if (owner !== undefined && owner !== key) {
      throw new ExistsError(`pod id ${JSON.stringify(podId)} is in use by another key (${JSON.stringify(owner)})`)
    }
    this.owners.set(podId, key)
  }

  private unclaim(podId: string, key: string): void {
    if (this.owners.get(podId) === key) this.owners.delete(podId)
  }

  private drainTaps(pod: PodNetwork): void {
    if (!this.ops.drainTapFd) return
    for (const fd of pod.fds) {
      if (fd === null) continue
      try {
        this.framesDrained += this.ops.drainTapFd(fd)
      } catch {
        // a tap that cannot be read (down, detached) has no backlog to drop; the get goes on
      }
    }
  }

  private async remove(key: string): Promise<void> {
    const pod = this.pods.get(key)
    if (!pod) throw new NotFoundError(`no pod network for key ${JSON.stringify(key)}`)
    const { desc, csn } = pod
    const nsPath = csn.nsPath || this.nsPath(desc.podId)
    const errors = await runAll([
      async () => {
        if (pod.dhcp) await pod.dhcp.stop()
        pod.dhcp = null
      },
      async () => {
        for (const fd of pod.fds) if (fd !== null) closeQuietly(fd)
        pod.fds = pod.fds.map(() => null)
      },
      // The netns at nsPath is deleted two steps below: its deletion takes the bridges and taps, asynchronously.
      // No live netns at the path (a file or a symlink there): nothing to tear down, and nothing is entered.
      async () => {
        if (this.ops.netnsExists(nsPath)) await this.ops.teardownContainerSide(nsPath, pod.csnJson, { keepDevices: true })
      },
      () => this.cni.removeSandboxFromNetwork(desc.podId, desc.podName, desc.podNs),
      () => this.ops.deleteNetns(nsPath),
    ])
    this.pods.delete(key)
    this.unclaim(desc.podId, key)
    if (errors.length) throw new AggregateOperationError(`releasing pod network ${desc.podId}`, errors)
  }

  private async recoverPod(key: string, payloadOf: () => RecoverPayload, givenCsnJson?: string): Promise<void> {
    if (this.pods.has(key)) throw new ExistsError(`pod network for key ${JSON.stringify(key)} exists`)
    const payload = payloadOf()
    const desc = payload.podNetworkDesc
    const csn = payload.csn
    const nsPath = csn.nsPath || this.nsPath(desc.podId)
    this.claim(desc.podId, key)
    let fds: (number | null)[] = []
    try {
      if (!this.ops.netnsExists(nsPath)) throw new NotFoundError(`netns ${nsPath} of pod ${desc.podId} is gone`)
      const csnJson = givenCsnJson ?? encodeContainerSideNetwork(csn)
      fds = (await this.ops.recoverContainerSide(nsPath, csnJson)).fds
      // No DHCP for a pod of VFs only (the VM configures a VF from the CNI result).
      const dhcp: DhcpServerHandle | null = hasTap(csn) ? await this.ops.startDhcpServer(nsPath, csnJson) : null
      this.pods.set(key, { desc, csn, csnJson, fds, dhcp })
    } catch (err) {
      for (const fd of fds) if (fd !== null) closeQuietly(fd)
      this.unclaim(desc.podId, key)
      throw err
    }
  }

  /** The IPv4 address of the dummy network's (Calico) link: the gateway Calico pods get. */
  private async dummyGateway(): Promise<string> {
    const dummy = await this.cni.getDummyNetwork()
    const ip = dummy.result.ips.find((c) => !c.address.includes(':'))
    if (!ip) throw new InvalidInputError('the dummy network has no IPv4 address for the Calico gateway')
    return ip.address.split('/')[0]
  }

  private serialised<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(key) ?? Promise.resolve()
    const next = prev.then(fn, fn)
    const settled = next.then(
      () => undefined,
      () => undefined,
    )
    this.locks.set(key, settled)
    void settled.then(() => {
      if (this.locks.get(key) === settled) this.locks.delete(key)
    })
    return next
  }
}

/** Whether a pod network has a tap (type 0) interface: only those get DHCP. */
function hasTap(csn: ContainerSideNetwork): boolean {
  return csn.interfaces.some((i) => i.type === 0)
}

/** Runs every step in order, even past failures; returns the errors. */
async function runAll(steps: (() => Promise<void>)[]): Promise<unknown[]> {
  const errors: unknown[] = []
  for (const step of steps) {
    try {
      await step()
    } catch (e) {
      errors.push(e)
    }
  }
  return errors
}

/** True when anything (a file, a symlink, even a dangling one) is at `path`, never following a symlink. */
function entryExists(path: string): boolean {
  try {
    lstatSync(path)
    return true
  } catch {
    return false
  }
}

function closeQuietly(fd: number): void {
  try {
    // The fds are the addon's (OS fds): close them natively. node:fs's closeSync takes Deno's own fd numbers
    // there, and would fail (EBADF) and leak the tap.
    closeFd(fd)
  } catch {
    // already closed
  }
}

