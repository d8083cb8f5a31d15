/**
 * The guest runner: runs a shell script of this project inside a QEMU guest (TCG) that boots a given kernel
 * with given devices and sees the HOST's root filesystem (read-only over 9p, under a tmpfs overlay), so the
 * guest runs this very checkout: its node, its .node addon, dist/, Debian's /usr/lib/cni and tools.
 *
 * The initramfs (scripts/vm-assets.sh, `runner.cpio`) loads its modules (virtio, 9p, overlay, igb, igbvf,
 * vfio, vfio-pci, tun, bridge, veth, nf_tables), mounts the host root as `/` of a chroot with fresh proc,
 * sysfs, devtmpfs, devpts, cgroup2 and tmpfs /run and /tmp, and runs `sh /tmjob/run.sh` there. /tmjob is a
 * per-run host directory shared read-write (the script and extra files; removed after the run).
 * The script's output streams on the serial console; `TM_EXIT <rc>` ends it and the guest powers off.
 *
 * Reuse it for other kernels (`kernel`, with a runner initramfs built for it) and devices (`qemuArgs`).
 */
import { spawn } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { requirePrereqs } from './env'
import { vmAssets } from './vm'

export interface GuestOptions {
  /** The shell script (busybox-compatible `sh` of the host: /bin/sh) run in the chroot, cwd /tmjob. */
  script: string
  /** More files for the job dir (name -> content), e.g. configs the script uses. */
  files?: Record<string, string>
  /** Extra QEMU arguments: devices, netdevs (e.g. `-netdev user,id=n0,restrict=on -device igb,netdev=n0`). */
  qemuArgs?: string[]
  /** Extra kernel command line words (e.g. `intel_iommu=on`). */
  kernelArgs?: string[]
  /** An emulated IOMMU (q35 `intel-iommu` with interrupt remapping and caching mode, for VFIO in the guest). */
  iommu?: boolean
  /** Kernel image (default: the cached Debian 6.1 vmlinux) and runner initramfs. */
  kernel?: string
  initrd?: string
  /** Guest memory in MiB (default 1024) and vCPUs (default 2). */
  memoryMiB?: number
  cpus?: number
  /** Bound of the whole run (default 15 minutes: TCG on a busy 2-core machine). */
  timeoutMs?: number
  /** Called with each console line as it arrives (progress in the test log). */
  onLine?: (line: string) => void
}

export interface GuestResult {
  /** The script's exit status (`TM_EXIT`), or null when the guest never said (crash, timeout). */
  exitCode: number | null
  /** The script's output: the console lines between `TM_START` and `TM_EXIT`. */
  lines: string[]
  /** Every console line (kernel messages included). */
  console: string[]
  /** Wall time from spawning QEMU to its exit (ms). */
  durationMs: number
  /** Whether the run hit `timeoutMs`. */
  timedOut: boolean
}

/** The QEMU arguments of a run (exported for the record and for reuse). */
export function guestQemuArgs(opts: GuestOptions, jobDir: string): string[] {
  const assets = vmAssets()
  const kernel = opts.kernel ?? assets.kernel
  const initrd = opts.initrd ?? join(assets.dir, 'runner.cpio')
  const machine = opts.iommu ? ['-machine', 'q35,kernel-irqchip=split', '-device', 'intel-iommu,intremap=on,caching-mode=on'] : ['-machine', 'q35']
  // no_timer_check: under TCG on a loaded host the kernel's timer IRQ check fails now and then, and with
  // interrupt remapping that is a panic ("timer doesn't work through Interrupt-remapped IO-APIC").
  const append = ['console=ttyS0', 'quiet', 'loglevel=3', 'panic=-1', 'no_timer_check', ...(opts.iommu ? ['intel_iommu=on'] : []), ...(opts.kernelArgs ?? [])]
  return [
    ...machine,
    '-accel', 'tcg',
    '-cpu', 'max',
    '-m', String(opts.memoryMiB ?? 1024),
    '-smp', String(opts.cpus ?? 2),
    '-display', 'none', '-serial', 'stdio', '-monitor', 'none', '-no-reboot',
    '-kernel', kernel,
    '-initrd', initrd,
    '-append', append.join(' '),
    '-virtfs', 'local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap',
    '-virtfs', `local,path=${jobDir},mount_tag=tmjob,security_model=none,multidevs=remap`,
    ...(opts.qemuArgs ?? []),
  ]
}

/** Boots a guest, runs the script, and resolves when QEMU exits (never rejects for a failing script). */
export async function runInGuest(opts: GuestOptions): Promise<GuestResult> {
  requirePrereqs(['qemu-system-x86_64'])
  const jobDir = mkdtempSync(join(tmpdir(), `tm-guest-${process.pid}-`))
  try {
    writeFileSync(join(jobDir, 'run.sh'), opts.script)
    for (const [name, content] of Object.entries(opts.files ?? {})) writeFileSync(join(jobDir, name), content)
    const args = guestQemuArgs(opts, jobDir)
    const started = Date.now()
    const child = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] })
    const consoleLines: string[] = []
    let buf = ''
    const onData = (chunk: Buffer): void => {
      buf += chunk.toString('utf8')
      let nl: number
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl).replace(/\r$/, '')
        buf = buf.slice(nl + 1)
        consoleLines.push(line)
        opts.onLine?.(line)
      }
    }
    child.stdout.on('data', onData)
    child.stderr.on('data', onData)
    let timedOut = false
    const timer = setTimeout(() => {
      timedOut = true
      child.kill('SIGKILL')
    }, opts.timeoutMs ?? 15 * 60_000)
    await new Promise<void>((resolve) => child.on('close', () => resolve()))
    clearTimeout(timer)
    if (buf) consoleLines.push(buf)
    const start = consoleLines.indexOf('TM_START')
    const exitAt = consoleLines.findIndex((l) => /^TM_EXIT \d+$/.test(l))
    const exitCode = exitAt >= 0 ? Number(consoleLines[exitAt].split(' ')[1]) : null
    const lines = consoleLines.slice(start + 1, exitAt >= 0 ? exitAt : undefined)
    return { exitCode, lines, console: consoleLines, durationMs: Date.now() - started, timedOut }
  } finally {
    rmSync(jobDir, { recursive: true, force: true })
  }
}
