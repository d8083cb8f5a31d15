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
 * Operations on one key are serialised; different keys run in parallel.
 */
import { closeSync } from 'node:fs'
import { join } from 'node:path'
import { TapmanagerError, InvalidInputError, NotFoundError, messageOf } from './errors'
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
} from './payloads'
import { nativePodNetworkOps, type PodNetworkOps, type DhcpServerHandle } from './podnetwork'

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
  private readonly locks = new Map<string, Promise<unknown>>()

  constructor(cni: CniClient, options: TapFDSourceOptions = {}) {
    this.cni = cni
    this.ops = options.ops ?? nativePodNetworkOps
    this.netnsDir = options.netnsDir ?? '/var/run/netns'
    this.enableSriov = options.enableSriov ?? false
    this.calicoSubnetSize = options.calicoSubnetSize ?? 24
    if (!Number.isInteger(this.calicoSubnetSize) || this.calicoSubnetSize < 1 || this.calicoSubnetSize > 32) {
      throw new InvalidInputError(`calicoSubnetSize must be an integer from 1 to 32, not ${options.calicoSubnetSize}`)
    }
  }

  /** The keys this source holds. */
  keys(): string[] {
    return [...this.pods.keys()]
  }

  /** The pod description and ContainerSideNetwork of a key (what recover needs), or undefined. */
  describe(key: string): { podNetworkDesc: PodNetworkDesc; csn: ContainerSideNetwork } | undefined {
    const pod = this.pods.get(key)
    return pod && { podNetworkDesc: pod.desc, csn: pod.csn }
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
    const info = pod.csn.interfaces.map((i, fdIndex) => ({ type: i.type, mac: i.hardwareAddr, fdIndex, pciAddress: i.pciAddress }))
    return Buffer.from(encodeFdInfo(info))
  }

  recover(key: string, data: Buffer): Promise<void> {
    return this.serialised(key, () => this.recoverPod(key, data))
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

  /**
   * Cleans what an interrupted add left for a pod (after a crash): its container side if a saved
   * ContainerSideNetwork is given, its CNI attachment (DEL, from the CNI cache) and its netns.
   */
  cleanupPod(desc: PodNetworkDesc, csnJson?: string): Promise<void> {
    return this.serialised(`cleanup:${desc.podId}`, async () => {
      const errors: unknown[] = []
      const nsPath = this.nsPath(desc.podId)
      if (csnJson && this.ops.netnsExists(nsPath)) {
        // The netns at nsPath is deleted below: its deletion takes the bridges and taps.
        await this.ops.teardownContainerSide(nsPath, csnJson, { keepDevices: true }).catch((e) => errors.push(e))
      }
      await this.cni.removeSandboxFromNetwork(desc.podId, desc.podName, desc.podNs).catch((e) => errors.push(e))
      await this.ops.deleteNetns(nsPath).catch((e) => errors.push(e))
      if (errors.length) throw new AggregateOperationError(`cleaning up pod ${desc.podId}`, errors)
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
    if (errors.length) throw new AggregateOperationError('stopping TapFDSource', errors)
  }

  private nsPath(podId: string): string {
    return join(this.netnsDir, podId)
  }

  private async add(key: string, data: Buffer): Promise<GetFDsResult> {
    if (this.pods.has(key)) throw new TapmanagerError('ERR_EXISTS', `pod network for key ${JSON.stringify(key)} exists`)
    const { podNetworkDesc: desc } = parseGetFDPayload(data)
    const nsPath = this.nsPath(desc.podId)
    const undo: (() => Promise<void>)[] = []
    try {
      // A netns left by a crash is cleaned (CNI DEL from the cache, then deleted) rather than failing forever.
      if (this.ops.netnsExists(nsPath)) {
        await this.cni.removeSandboxFromNetwork(desc.podId, desc.podName, desc.podNs).catch(() => undefined)
        await this.ops.deleteNetns(nsPath)
      }
      await this.ops.createNetns(nsPath)
      undo.push(() => this.ops.deleteNetns(nsPath))

      // A failed ADD has run DEL itself; a successful one is undone by DEL.
      const attachment = await this.cni.addSandboxToNetwork(desc.podId, desc.podName, desc.podNs)
      undo.push(() => this.cni.removeSandboxFromNetwork(desc.podId, desc.podName, desc.podNs))
      const result = { ...attachment.result }
      if (desc.dns) result.dns = { ...desc.dns }

      let dummyGateway: string | undefined
      if (await this.ops.needsDummyGateway(nsPath)) dummyGateway = await this.dummyGateway()

      const resultJson = goJsonStringify(toGoCniResult(result))
      const side = await this.ops.setupContainerSide(nsPath, resultJson, {
        enableSriov: this.enableSriov,
        calicoSubnetSize: this.calicoSubnetSize,
        dummyGateway,
      })
      undo.push(async () => {
        for (const fd of side.fds) closeQuietly(fd)
        await this.ops.teardownContainerSide(nsPath, side.csn)
      })

      const csn = parseContainerSideNetwork(Buffer.from(side.csn))
      // No DHCP for SR-IOV VFs (the VM configures them from the CNI result): a pod of VFs only has no server.
      const dhcp = hasTap(csn) ? await this.ops.startDhcpServer(nsPath, side.csn) : null
      if (dhcp) undo.push(() => dhcp.stop())

      this.pods.set(key, { desc, csn, csnJson: side.csn, fds: [...side.fds], dhcp })
      return { fds: side.fds, data: Buffer.from(side.csn) }
    } catch (err) {
      const errors = await runAll(undo.reverse())
      if (errors.length) throw new AggregateOperationError(`${messageOf(err)}; then rolling back failed`, errors, [err, ...errors])
      throw err
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
      () => this.ops.teardownContainerSide(nsPath, pod.csnJson, { keepDevices: true }),
      () => this.cni.removeSandboxFromNetwork(desc.podId, desc.podName, desc.podNs),
      () => this.ops.deleteNetns(nsPath),
    ])
    this.pods.delete(key)
    if (errors.length) throw new AggregateOperationError(`releasing pod network ${desc.podId}`, errors)
  }

  private async recoverPod(key: string, data: Buffer): Promise<void> {
    if (this.pods.has(key)) throw new TapmanagerError('ERR_EXISTS', `pod network for key ${JSON.stringify(key)} exists`)
    const payload = parseRecoverPayload(data)
    const desc = payload.podNetworkDesc
    const csn = payload.csn
    const nsPath = csn.nsPath || this.nsPath(desc.podId)
    if (!this.ops.netnsExists(nsPath)) throw new NotFoundError(`netns ${nsPath} of pod ${desc.podId} is gone`)
    const csnJson = encodeContainerSideNetwork(csn)
    const { fds } = await this.ops.recoverContainerSide(nsPath, csnJson)
    let dhcp: DhcpServerHandle | null
    try {
      dhcp = hasTap(csn) ? await this.ops.startDhcpServer(nsPath, csnJson) : null
    } catch (err) {
      for (const fd of fds) if (fd !== null) closeQuietly(fd)
      throw err
    }
    this.pods.set(key, { desc, csn, csnJson, fds, dhcp })
  }

  /** The IPv4 address of the dummy network's (Calico) link: the gateway Calico pods get. */
  private async dummyGateway(): Promise<string> {
    const dummy = await this.cni.getDummyNetwork()
    const ip = dummy.result.ips.find((c) => !c.address.includes(':'))
    if (!ip) throw new TapmanagerError('ERR_INVALID', 'the dummy network has no IPv4 address for the Calico gateway')
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

function closeQuietly(fd: number): void {
  try {
    closeSync(fd)
  } catch {
    // already closed
  }
}

