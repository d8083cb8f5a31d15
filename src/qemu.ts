/**
 * Helpers for VM launchers: the QEMU network arguments Virtlet's vmwrapper builds from a get reply, and
 * spawning a process that inherits the tap fds as fd 3, 4, ...
 */
import { spawn, type ChildProcess, type SpawnOptions, type StdioNull, type StdioPipe } from 'node:child_process'
import { InvalidInputError } from './errors'

/**
 * One interface description from a get reply, in TypeScript form: `mac` in colon form (the wire carries
 * base64), `type` 0 = tap (has an fd), 1 = SR-IOV VF (passed through by PCI address).
 */
export interface InterfaceInfo {
  type: 0 | 1
  mac: string
  fdIndex: number
  pciAddress: string
}

const MAC_RE = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/i
const PCI_RE = /^(?:[0-9a-f]{4}:)?([0-9a-f]{2}:[0-9a-f]{2}\.[0-7])$/i

/**
 * Builds the `-netdev`/`-device` arguments Virtlet's vmwrapper passes to QEMU, in description order:
 * tap => `-netdev tap,id=tap<fdIndex>,fd=<fd> -device virtio-net-pci,netdev=tap<fdIndex>,id=net<i>,mac=<mac>`
 * (i = position in `info`), VF => `-device vfio-pci,host=<bus:dev.fn>,id=hostdev<n>` (n counts VFs).
 * For a VF, QEMU opens the VFIO container `/dev/vfio/vfio` and the VF's group `/dev/vfio/<group>` (the group is
 * the name `/sys/bus/pci/devices/<pciAddress>/iommu_group` links to): the user QEMU runs as must be able to
 * open both, or a launcher opens the group and passes it. The VF's fd in `fds` is `/dev/null` and unused.
 *
 * `<fd>` is the number the fd has in the process that runs QEMU: with `firstFd` (default 3, as
 * {@link spawnWithFds} arranges) it is `firstFd + fdIndex`; with `firstFd = null` it is `fds[fdIndex]` itself
 * (QEMU exec'd in place, as vmwrapper does).
 */
export function buildQemuNetArgs(info: InterfaceInfo[], fds: number[], firstFd: number | null = 3): string[] {
  if (!Array.isArray(info)) throw new InvalidInputError('interface info must be an array')
  checkFds(fds)
  if (firstFd !== null && (!Number.isInteger(firstFd) || firstFd < 0)) {
    throw new InvalidInputError(`firstFd must be a non-negative integer, got ${String(firstFd)}`)
  }
  const args: string[] = []
  let hostdev = 0
  info.forEach((desc, i) => {
    if (desc.type === 0) {
      if (!Number.isInteger(desc.fdIndex) || desc.fdIndex < 0 || desc.fdIndex >= fds.length) {
        throw new InvalidInputError(`interface ${i}: fdIndex ${String(desc.fdIndex)} is not one of the ${fds.length} fds`)
      }
      if (typeof desc.mac !== 'string' || !MAC_RE.test(desc.mac)) {
        throw new InvalidInputError(`interface ${i}: bad MAC address ${JSON.stringify(desc.mac)} (want aa:bb:cc:dd:ee:ff)`)
      }
      const fd = firstFd === null ? fds[desc.fdIndex] : firstFd + desc.fdIndex
      args.push('-netdev', `tap,id=tap${desc.fdIndex},fd=${fd}`)
      args.push('-device', `virtio-net-pci,netdev=tap${desc.fdIndex},id=net${i},mac=${desc.mac.toLowerCase()}`)
    } else if (desc.type === 1) {
      const m = typeof desc.pciAddress === 'string' ? PCI_RE.exec(desc.pciAddress) : null
      if (!m) throw new InvalidInputError(`interface ${i}: bad PCI address ${JSON.stringify(desc.pciAddress)}`)
      args.push('-device', `vfio-pci,host=${m[1].toLowerCase()},id=hostdev${hostdev}`)
      hostdev++
    } else {
      throw new InvalidInputError(`interface ${i}: unknown interface type ${String((desc as { type?: unknown }).type)}`)
    }
  })
  return args
}

/** Options of {@link spawnWithFds}: those of `child_process.spawn` except `stdio`, which only covers 0-2. */
export interface SpawnWithFdsOptions extends Omit<SpawnOptions, 'stdio'> {
  stdio?: [StdioNull | StdioPipe | number, StdioNull | StdioPipe | number, StdioNull | StdioPipe | number]
}

/**
 * Spawns `cmd args` with `fds[0]` as fd 3, `fds[1]` as fd 4, ... in the child (duplicates; the caller keeps
 * and eventually closes its own). stdio 0-2 default to `['ignore', 'inherit', 'inherit']`.
 */
export function spawnWithFds(cmd: string, args: string[], fds: number[], opts: SpawnWithFdsOptions = {}): ChildProcess {
  checkFds(fds)
  const { stdio = ['ignore', 'inherit', 'inherit'], ...rest } = opts
  return spawn(cmd, args, { ...rest, stdio: [...stdio, ...fds] })
}

function checkFds(fds: number[]): void {
  if (!Array.isArray(fds) || fds.some((fd) => !Number.isInteger(fd) || fd < 0)) {
    throw new InvalidInputError(`fds must be an array of non-negative integers, got ${JSON.stringify(fds)}`)
  }
}

/** get info on the wire (`[{"type":0,"mac":"<base64>","fdIndex":0,"pciAddress":""}]`) in TypeScript form. */
export function interfaceInfoFromWire(info: Buffer | string): InterfaceInfo[] {
  const v = JSON.parse(typeof info === 'string' ? info : info.toString('utf8')) as unknown
  if (!Array.isArray(v)) throw new InvalidInputError('get info is not a JSON array')
  return v.map((d: Record<string, unknown>) => {
    const mac = typeof d.mac === 'string' ? Buffer.from(d.mac, 'base64') : Buffer.alloc(0)
    return {
      type: d.type === 1 ? 1 : 0,
      mac: [...mac].map((b) => b.toString(16).padStart(2, '0')).join(':'),
      fdIndex: Number(d.fdIndex ?? 0),
      pciAddress: typeof d.pciAddress === 'string' ? d.pciAddress : '',
    }
  })
}
