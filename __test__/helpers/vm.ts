/**
 * A real VM for tests: QEMU (TCG) booting Debian's 6.1 kernel with a busybox initramfs built by
 * scripts/vm-assets.sh (cached under .tmp/vm). The guest's only NIC is a virtio-net on a tap; its /init loads the
 * virtio modules, leases eth0 with udhcpc, pings `ping`, and reports each step on the serial console
 * (see the script's header for the line format). With `stay` it keeps running, answers pings and runs commands
 * sent with `run()` until `kill()`.
 */
import { execFileSync, type ChildProcess } from 'node:child_process'
import { join } from 'node:path'
import { spawnWithFds } from '../../src/qemu'
import { requirePrereqs } from './env'

export interface VmAssets {
  dir: string
  kernel: string
  initrd: string
}

let assetsCache: VmAssets | undefined

/** Builds the VM assets if needed (slow only the first time: download + unpack) and returns their paths. */
export function vmAssets(): VmAssets {
  if (assetsCache) return assetsCache
  requirePrereqs(['qemu-system-x86_64', '/bin/busybox', 'apt-get', 'apt-cache', 'dpkg-deb', 'xz', 'od', 'dd', 'mknod'])
  const dir = execFileSync('bash', [join(process.cwd(), 'scripts/vm-assets.sh')], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
    timeout: 600_000,
  }).trim()
  assetsCache = { dir, kernel: join(dir, 'vmlinux'), initrd: join(dir, 'initramfs.cpio') }
  return assetsCache
}

/** The lease the guest's udhcpc got, as its script printed it. */
export interface VmLease {
  ip: string
  /** prefix length */
  mask: number
  /** dotted netmask */
  subnet: string
  router: string
  mtu: number | null
  dns: string[]
  serverId: string
  leaseSecs: number
}

export interface VmPing {
  target: string
  ok: boolean
  tries: number
}

export interface BootVmOptions {
  /** The guest NIC's MAC (colon form); used by the default netArgs and checked against the guest's eth0. */
  mac: string
  /** A tap fd of this process; the guest's NIC uses it as fd 3 (`-netdev tap,id=n0,fd=3`). */
  tapFd?: number
  /** Instead of tapFd: the -netdev/-device arguments (e.g. from buildQemuNetArgs, or `ifname=`). */
  netArgs?: string[]
  /** fds inherited by the child from fd 3 on (with netArgs). */
  fds?: number[]
  /** A command prefix QEMU runs under, e.g. `['ip', 'netns', 'exec', ns]` or {@link pythonTapOpener}. */
  command?: string[]
  /** An address the guest pings after its lease (tm.ping=). */
  ping?: string
  /** Keep the guest running after the ping (tm.stay=1): it then answers pings and runs `run()` commands. */
  stay?: boolean
  /** false: no DHCP in the guest. */
  dhcp?: boolean
  /** Extra kernel command line words. */
  kernelArgs?: string[]
  /** Default bound of each wait (ms); default 120 s (TCG boots in ~7 s alone, slower on a busy machine). */
  timeoutMs?: number
  /** Guest memory in MiB (default 256). */
  memoryMiB?: number
}

export interface VmHandle {
  readonly child: ChildProcess
  /** process.hrtime.bigint() just before QEMU was spawned. */
  readonly startedAt: bigint
  /** All serial output so far. */
  output(): string
  /** Resolves with the first output line matching `re` (also one seen earlier); rejects on timeout or exit. */
  waitFor(re: RegExp, timeoutMs?: number): Promise<RegExpMatchArray>
  /** The guest's eth0 MAC as the guest reports it. */
  linkMac(timeoutMs?: number): Promise<string>
  lease(timeoutMs?: number): Promise<VmLease>
  pingResult(timeoutMs?: number): Promise<VmPing>
  /** Resolves when the guest is up and reading commands (stay: true). */
  ready(timeoutMs?: number): Promise<void>
  /** Runs a shell command in the guest (stay: true) and returns its exit code and output lines. */
  run(cmd: string, timeoutMs?: number): Promise<{ rc: number; output: string[] }>
  /** SIGKILLs QEMU and waits for it to exit. */
  kill(): Promise<void>
  /** Resolves with QEMU's exit code (null if killed by a signal). */
  readonly exited: Promise<number | null>
}

/** The -netdev/-device pair of the harness for a tap that is fd `fd` in QEMU. */
export function tapNetArgs(mac: string, fd = 3): string[] {
  return ['-netdev', `tap,id=n0,fd=${fd}`, '-device', `virtio-net-pci,netdev=n0,mac=${mac},romfile=`]
}

// Opens the tap named argv[1] (in the caller's netns) like a VM launcher's fd source would, makes it fd 3 and
// execs argv[2:]. TUNSETIFF = _IOW('T', 202, int); IFF_TAP | IFF_NO_PI.
const PY_TAP_OPENER = `
import fcntl, os, struct, sys
fd = os.open('/dev/net/tun', os.O_RDWR)
fcntl.ioctl(fd, 0x400454ca, struct.pack('16sH22x', sys.argv[1].encode(), 0x0002 | 0x1000))
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.set_inheritable(3, True)
os.execvp(sys.argv[2], sys.argv[2:])
`

/**
 * A command prefix that attaches to tap `ifname` and execs the rest with the tap as fd 3 (python3 with
 * ioctl TUNSETIFF), for proving the fd=3 path before tapmanager hands out fds. Put `ip netns exec NS` in front
 * when the tap lives in a netns.
 */
export function pythonTapOpener(ifname: string): string[] {
  return ['/usr/bin/python3', '-c', PY_TAP_OPENER, ifname]
}

let cmdSeq = 0

/** Boots the test VM. Call `kill()` in a finally/teardown. */
export function bootVm(opts: BootVmOptions): VmHandle {
  const assets = vmAssets()
  const timeoutMs = opts.timeoutMs ?? 120_000
  let fds: number[] = opts.fds ?? []
  let netArgs = opts.netArgs
  if (opts.tapFd !== undefined) {
    if (netArgs) throw new Error('bootVm: give tapFd or netArgs, not both')
    fds = [opts.tapFd]
    netArgs = tapNetArgs(opts.mac, 3)
  }
  if (!netArgs) throw new Error('bootVm: give tapFd or netArgs')
  // no_timer_check: under TCG on a loaded machine the kernel's boot-time timer IRQ check fails now and then
  // ("IO-APIC + timer doesn't work!" panic); the timer works, the check is what is too impatient.
  const append = ['console=ttyS0', 'panic=-1', 'loglevel=3', 'no_timer_check']
  if (opts.ping) append.push(`tm.ping=${opts.ping}`)
  if (opts.stay) append.push('tm.stay=1')
  if (opts.dhcp === false) append.push('tm.dhcp=0')
  append.push(...(opts.kernelArgs ?? []))
  const qemu = [
    'qemu-system-x86_64',
    '-accel', 'tcg',
    '-machine', 'pc',
    '-cpu', 'max',
    '-m', String(opts.memoryMiB ?? 256),
    '-nodefaults',
    '-no-reboot',
    '-display', 'none',
    '-serial', 'stdio',
    '-monitor', 'none',
    '-kernel', assets.kernel,
    '-initrd', assets.initrd,
    '-append', append.join(' '),
    ...netArgs,
  ]
  const argv = [...(opts.command ?? []), ...qemu]
  const startedAt = process.hrtime.bigint()
  const child = spawnWithFds(argv[0], argv.slice(1), fds, { stdio: ['pipe', 'pipe', 'pipe'] })

  let out = ''
  let stderr = ''
  let exitCode: number | null | undefined
  const listeners = new Set<() => void>()
  const notify = () => {
    for (const l of [...listeners]) l()
  }
  child.stdout!.setEncoding('utf8')
  child.stdout!.on('data', (d: string) => {
    out += d.replace(/\r/g, '')
    notify()
  })
  child.stderr!.setEncoding('utf8')
  child.stderr!.on('data', (d: string) => {
    stderr += d
  })
  child.stdin!.on('error', () => {})
  const exited = new Promise<number | null>((resolve) => {
    child.on('exit', (code) => {
      exitCode = code
      resolve(code)
      notify()
    })
    child.on('error', (err) => {
      stderr += `spawn error: ${err.message}\n`
      exitCode = null
      resolve(null)
      notify()
    })
  })

  const waitFor = (re: RegExp, ms = timeoutMs): Promise<RegExpMatchArray> =>
    new Promise((resolve, reject) => {
      const lineRe = new RegExp(re.source, re.flags.replace('g', '') + (re.flags.includes('m') ? '' : 'm'))
      const check = (): boolean => {
        // Only complete lines: a chunk can end in the middle of one.
        const m = lineRe.exec(out.slice(0, out.lastIndexOf('\n') + 1))
        if (m) {
          done()
          resolve(m)
          return true
        }
        if (exitCode !== undefined) {
          done()
          reject(new Error(`VM exited (${String(exitCode)}) before ${re}; serial:\n${out.slice(-3000)}\nstderr:\n${stderr.slice(-2000)}`))
          return true
        }
        return false
      }
      const timer = setTimeout(() => {
        done()
        reject(new Error(`timed out after ${ms} ms waiting for ${re}; serial:\n${out.slice(-3000)}\nstderr:\n${stderr.slice(-2000)}`))
      }, ms)
      const done = () => {
        clearTimeout(timer)
        listeners.delete(listener)
      }
      const listener = () => {
        check()
      }
      listeners.add(listener)
      check()
    })

  const fields = (line: string): Record<string, string> =>
    Object.fromEntries(line.trim().split(/\s+/).map((w) => {
      const i = w.indexOf('=')
      return i < 0 ? [w, ''] : [w.slice(0, i), w.slice(i + 1)]
    }))

  return {
    child,
    startedAt,
    exited,
    output: () => out,
    waitFor,
    async linkMac(ms) {
      return (await waitFor(/^TM_LINK mac=(\S+)/, ms))[1]
    },
    async lease(ms) {
      const m = await waitFor(/^(TM_LEASE .*|TM_NOLEASE)$/, ms)
      if (m[1] === 'TM_NOLEASE') throw new Error(`the guest got no DHCP lease; serial:\n${out.slice(-3000)}`)
      const f = fields(m[1])
      return {
        ip: f.ip,
        mask: Number(f.mask),
        subnet: f.subnet,
        router: f.router,
        mtu: f.mtu ? Number(f.mtu) : null,
        dns: f.dns ? f.dns.split(',') : [],
        serverId: f.serverid,
        leaseSecs: Number(f.lease),
      }
    },
    async pingResult(ms) {
      const f = fields((await waitFor(/^(TM_PING .*)$/, ms))[1])
      return { target: f.target, ok: f.ok === '1', tries: Number(f.tries) }
    },
    async ready(ms) {
      await waitFor(/^TM_READY$/, ms)
    },
    async run(cmd, ms) {
      if (cmd.includes('\n')) throw new Error('run: one line only')
      const id = `c${++cmdSeq}`
      child.stdin!.write(`TM_CMD ${id} ${cmd}\n`)
      const rc = Number((await waitFor(new RegExp(`^TM_RC ${id} (\\d+)$`), ms))[1])
      const output = [...out.matchAll(new RegExp(`^TM_OUT ${id} (.*)$`, 'gm'))].map((m) => m[1])
      return { rc, output }
    },
    async kill() {
      if (exitCode === undefined) child.kill('SIGKILL')
      await exited
    },
  }
}
