/**
 * `npm run demo`: tapmanager's main job on a built-in default, on a machine where nothing is configured.
 *
 * A sandbox "node" netns gets a CNI config (Debian's bridge + host-local, in a temp dir); `tapmanager serve`
 * runs inside it; two pods are added with the command line; pod A gets a real VM (QEMU, TCG) when QEMU and the
 * test VM assets are there, started the way Virtlet's vmwrapper starts it (`tapmanager get --qemu-args --exec`),
 * pod B a stand-in VM: a frame copier between its tap fd (from FDClient.getFDs) and a tap in a client netns,
 * where busybox udhcpc leases. Each pod's lease and pings through the bridge are shown, then everything is
 * released and the node is shown clean. Nothing touches the machine's own netns; everything made is removed,
 * also on failure or Ctrl-C.
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { FDClient, closeFd } from './client'
import { interfaceInfoFromWire } from './qemu'
import { DEFAULT_NETNS_DIR, podNetnsPath } from './defaults'

const t0 = process.hrtime.bigint()
const elapsed = () => (Number(process.hrtime.bigint() - t0) / 1e9).toFixed(2).padStart(6)
const say = (msg: string) => process.stdout.write(`[${elapsed()}s] ${msg}\n`)
const detail = (msg: string) => process.stdout.write(`${' '.repeat(11)}${msg}\n`)

const CLI = join(__dirname, 'cli.js')
const PROJECT = join(__dirname, '..')
const VM_DIR = process.env.TAPMANAGER_VM_DIR ?? join(PROJECT, '.tmp', 'vm')
const SUBNET = '10.88.0.0/24'

/** Opens tap argv[1] (created in the caller's netns), sets its MAC, brings it up and copies frames both ways
 * between it and the inherited fd 3 (the pod's tap fd): a stand-in for a VM's NIC. */
const FRAME_COPIER = `
import fcntl, os, select, struct, subprocess, sys
name, mac = sys.argv[1], sys.argv[2]
tap = os.open('/dev/net/tun', os.O_RDWR)
fcntl.ioctl(tap, 0x400454ca, struct.pack('16sH22x', name.encode(), 0x0002 | 0x1000))
subprocess.check_call(['ip', 'link', 'set', name, 'address', mac, 'up'])
print('COPIER_READY', flush=True)
pod = 3
while True:
    r, _, _ = select.select([pod, tap], [], [])
    for src in r:
        dst = tap if src == pod else pod
        try:
            frame = os.read(src, 65536)
        except BlockingIOError:
            continue
        if not frame:
            sys.exit(0)
        try:
            os.write(dst, frame)
        except OSError:
            pass
`

const UDHCPC_SCRIPT = `#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && ip route replace default via "$router" dev "$interface"
    echo "LEASE ip=$ip mask=$mask router=$router mtu=$mtu serverid=$serverid lease=$lease"
    ;;
esac
exit 0
`

function sh(cmd: string, args: string[], timeout = 30_000): string {
  return execFileSync(cmd, args, { encoding: 'utf8', timeout, stdio: ['ignore', 'pipe', 'pipe'] })
}

function nsExec(ns: string, cmd: string, args: string[], timeout?: number): string {
  return sh('ip', ['netns', 'exec', ns, cmd, ...args], timeout)
}

function tryPing(ns: string, target: string, tries = 5): { ok: boolean; rtt: string } {
  for (let i = 0; i < tries; i++) {
    const r = spawnSync('ip', ['netns', 'exec', ns, '/bin/busybox', 'ping', '-c', '1', '-W', '2', target], { encoding: 'utf8', timeout: 10_000 })
    if (r.status === 0) return { ok: true, rtt: /time=([\d.]+ ?ms)/.exec(r.stdout)?.[1] ?? '?' }
  }
  return { ok: false, rtt: '-' }
}

function cli(socket: string, args: string[]): string {
  return sh(process.execPath, [CLI, ...args, '--socket', socket], 60_000)
}

async function waitFor<T>(what: string, fn: () => T | undefined | Promise<T | undefined>, timeoutMs: number, everyMs = 50): Promise<T> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const v = await fn()
    if (v !== undefined) return v
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    await new Promise((r) => setTimeout(r, everyMs))
  }
}

/** Collects a child's output lines and resolves waits for a line matching a pattern. */
function lines(child: ChildProcess, stream: 'stdout' | 'stderr') {
  let buf = ''
  const all: string[] = []
  child[stream]!.setEncoding('utf8')
  child[stream]!.on('data', (d: string) => {
    buf += d.replace(/\r/g, '')
    let i
    while ((i = buf.indexOf('\n')) >= 0) {
      all.push(buf.slice(0, i))
      buf = buf.slice(i + 1)
    }
  })
  let exited = false
  child.once('exit', () => (exited = true))
  return {
    all,
    wait: (re: RegExp, timeoutMs: number) =>
      waitFor(`${re}`, () => {
        const m = all.map((l) => re.exec(l)).find(Boolean)
        if (m) return m
        if (exited) throw new Error(`process exited before ${re}; last output:\n${all.slice(-20).join('\n')}`)
        return undefined
      }, timeoutMs),
  }
}

interface Pod {
  key: string
  podId: string
  ip: string
  gateway: string
  mac: string
}

async function main(): Promise<number> {
  if (process.getuid?.() !== 0) {
    process.stderr.write('demo: must run as root (it creates network namespaces)\n')
    return 1
  }
  for (const tool of ['/usr/bin/ip', '/usr/lib/cni/bridge', '/usr/lib/cni/host-local', '/bin/busybox', '/usr/bin/python3']) {
    if (!existsSync(tool)) {
      process.stderr.write(`demo: missing ${tool} (run scripts/setup.sh)\n`)
      return 1
    }
  }
  const tag = randomBytes(3).toString('hex')
  const node = `tmdemo-${tag}`
  const clientNs = `tmdemo-${tag}-b`
  const dir = mkdtempSync(join(tmpdir(), 'tapmanager-demo-'))
  const socket = join(dir, 'tapmanager.sock')
  const stateDir = join(dir, 'state')
  const ipamDir = join(dir, 'ipam')
  const confDir = join(dir, 'net.d')
  const pods: Pod[] = []
  const podIds = [`tmdemo-${tag}-pod-a`, `tmdemo-${tag}-pod-b`]
  const children: ChildProcess[] = []
  let server: ChildProcess | undefined
  const useVm =
    process.arch === 'x64' &&
    existsSync('/usr/bin/qemu-system-x86_64') &&
    existsSync(join(VM_DIR, 'vmlinux')) &&
    existsSync(join(VM_DIR, 'initramfs.cpio')) &&
    process.env.TAPMANAGER_DEMO_VM !== '0'

  const cleanup = () => {
    for (const c of children) {
      if (c.pid && c.exitCode === null && c.signalCode === null) {
        try {
          process.kill(-c.pid, 'SIGKILL') // its process group (QEMU under the command line)
        } catch {
          c.kill('SIGKILL')
        }
      }
    }
    if (server && server.exitCode === null && server.signalCode === null) server.kill('SIGKILL')
    for (const ns of [...podIds, clientNs, node]) {
      if (existsSync(podNetnsPath(DEFAULT_NETNS_DIR, ns))) {
        for (const pid of spawnSync('ip', ['netns', 'pids', ns], { encoding: 'utf8' }).stdout.split(/\s+/).filter(Boolean)) {
          spawnSync('kill', ['-9', pid])
        }
        spawnSync('ip', ['netns', 'del', ns])
      }
    }
    rmSync(dir, { recursive: true, force: true })
  }
  const onSignal = () => {
    cleanup()
    process.exit(130)
  }
  process.once('SIGINT', onSignal)
  process.once('SIGTERM', onSignal)

  try {
    say(`tapmanager demo: a sandbox node netns ${node}, temp dir ${dir}`)
    sh('ip', ['netns', 'add', node])
    nsExec(node, 'ip', ['link', 'set', 'lo', 'up'])
    mkdirSync(confDir)
    mkdirSync(ipamDir)
    const conf = {
      cniVersion: '1.0.0',
      name: 'demo-net',
      plugins: [
        {
          type: 'bridge',
          bridge: 'demobr0',
          isGateway: true,
          ipMasq: false,
          ipam: { type: 'host-local', dataDir: ipamDir, ranges: [[{ subnet: SUBNET }]], routes: [{ dst: '0.0.0.0/0' }] },
        },
      ],
    }
    writeFileSync(join(confDir, '10-demo.conflist'), JSON.stringify(conf, null, 2))
    detail(`CNI config: bridge "demobr0" + host-local ${SUBNET} (${join(confDir, '10-demo.conflist')})`)

    say('starting `tapmanager serve` inside the node netns')
    // nsenter --net (not `ip netns exec`, which adds a private mount namespace where the pod netns mounts
    // would be invisible to everyone else and die with the server).
    server = spawn(
      'nsenter',
      [`--net=${podNetnsPath(DEFAULT_NETNS_DIR, node)}`, process.execPath, CLI, 'serve', '--socket', socket, '--cni-conf-dir', confDir, '--cni-bin-dir', '/usr/lib/cni', '--state-dir', stateDir],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    )
    const serverLog = lines(server, 'stderr')
    const client = new FDClient(socket)
    await waitFor('the server socket', async () => ((await client.isRunning()) ? true : undefined), 15_000)
    detail(`$ tapmanager status\n${' '.repeat(11)}${cli(socket, ['status']).trim()}`)

    for (const [i, podId] of podIds.entries()) {
      const key = `pod-${'ab'[i]}`
      const t = Date.now()
      const out = JSON.parse(cli(socket, ['add', key, '--pod-id', podId, '--pod-name', `vm-${'ab'[i]}`, '--pod-ns', 'default', '--json'])) as {
        csn: { Result: { ips: { address: string; gateway?: string }[] }; Interfaces: { HardwareAddr: string }[] }
      }
      const ip = out.csn.Result.ips[0]
      const mac = interfaceInfoFromWire(JSON.stringify([{ mac: out.csn.Interfaces[0].HardwareAddr }]))[0].mac
      pods.push({ key, podId, ip: ip.address, gateway: ip.gateway ?? '', mac })
      say(`$ tapmanager add ${key} --pod-id ${podId} ...  (${Date.now() - t} ms)`)
      detail(`CNI gave ${ip.address} via ${ip.gateway ?? '-'}; the VM's MAC is ${mac}`)
    }
    detail(`$ tapmanager ls --state-dir ${stateDir}`)
    for (const l of sh(process.execPath, [CLI, 'ls', '--state-dir', stateDir]).trim().split('\n')) detail(`  ${l}`)

    const [a, b] = pods
    const addrOf = (p: Pod) => p.ip.split('/')[0]

    // Pod A: a real VM, started the way Virtlet's vmwrapper starts QEMU (fds inherited, -netdev tap,fd=N).
    if (useVm) {
      say(`pod A: booting a real VM (QEMU, TCG) on its tap: tapmanager get ${a.key} --qemu-args --exec -- qemu-system-x86_64 ...`)
      const qemu = ['qemu-system-x86_64', '-accel', 'tcg', '-machine', 'pc', '-cpu', 'max', '-m', '256', '-nodefaults', '-no-reboot']
      qemu.push('-display', 'none', '-serial', 'stdio', '-monitor', 'none', '-kernel', join(VM_DIR, 'vmlinux'), '-initrd', join(VM_DIR, 'initramfs.cpio'))
      // no_timer_check: the boot-time timer IRQ check fails now and then under TCG on a loaded machine.
      qemu.push('-append', `console=ttyS0 panic=-1 loglevel=3 no_timer_check tm.ping=${a.gateway} tm.stay=1`)
      const vm = spawn(process.execPath, [CLI, 'get', a.key, '--socket', socket, '--qemu-args', '--exec', '--', ...qemu], {
        stdio: ['pipe', 'pipe', 'pipe'],
        detached: true,
      })
      children.push(vm)
      const serial = lines(vm, 'stdout')
      const lease = (await serial.wait(/^TM_LEASE (.*)$/, 120_000))[1]
      say(`pod A: the VM leased by DHCP from tapmanager: ${lease}`)
      const ping = (await serial.wait(/^TM_PING (.*)$/, 60_000))[1]
      detail(`the VM pinged the node's gateway through the bridge: ${ping}`)
      await serial.wait(/^TM_READY$/, 60_000)
    } else {
      say('pod A: a stand-in VM too (no QEMU or VM assets here, or TAPMANAGER_DEMO_VM=0)')
    }

    // Pod B (and pod A without QEMU): a stand-in VM, a frame copier between the pod's tap fd and a client tap.
    const standIns = useVm ? [b] : [a, b]
    for (const p of standIns) {
      const ns = p === b ? clientNs : `${clientNs.slice(0, -1)}a`
      if (p !== b) podIds.push(ns)
      sh('ip', ['netns', 'add', ns])
      nsExec(ns, 'ip', ['link', 'set', 'lo', 'up'])
      const { fds, info } = await client.getFDs(p.key)
      const iface = interfaceInfoFromWire(info)[0]
      say(`pod ${p.key.slice(-1).toUpperCase()}: FDClient.getFDs("${p.key}") gave tap fd ${fds[0]} (MAC ${iface.mac}); a frame copier puts a stand-in VM (netns ${ns}) on it`)
      const copier = spawn('ip', ['netns', 'exec', ns, '/usr/bin/python3', '-c', FRAME_COPIER, 'eth0', iface.mac], {
        stdio: ['ignore', 'pipe', 'pipe', fds[0]],
        detached: true,
      })
      children.push(copier)
      for (const fd of fds) closeFd(fd)
      await lines(copier, 'stdout').wait(/^COPIER_READY$/, 15_000)
      const script = join(dir, 'udhcpc.sh')
      writeFileSync(script, UDHCPC_SCRIPT, { mode: 0o755 })
      const t = Date.now()
      const out = nsExec(ns, '/bin/busybox', ['udhcpc', '-i', 'eth0', '-f', '-n', '-q', '-t', '5', '-T', '2', '-s', script], 30_000)
      const lease = /^LEASE (.*)$/m.exec(out)?.[1]
      if (!lease) throw new Error(`pod ${p.key}: udhcpc got no lease:\n${out}`)
      say(`pod ${p.key.slice(-1).toUpperCase()}: busybox udhcpc leased in ${Date.now() - t} ms: ${lease}`)
      const g = tryPing(ns, p.gateway)
      detail(`ping ${p.gateway} (node gateway) from the stand-in VM: ${g.ok ? `ok, ${g.rtt}` : 'FAILED'}`)
      if (!g.ok) throw new Error(`pod ${p.key}: no ping to the gateway`)
      if (p === b && useVm) {
        const v = tryPing(ns, addrOf(a))
        detail(`ping ${addrOf(a)} (pod A's VM) from pod B, across the node bridge: ${v.ok ? `ok, ${v.rtt}` : 'FAILED'}`)
        if (!v.ok) throw new Error('pod B cannot reach pod A')
      }
    }
    for (const p of pods) {
      const r = tryPing(node, addrOf(p))
      say(`node -> pod ${p.key.slice(-1).toUpperCase()} (${addrOf(p)}): ping ${r.ok ? `ok, ${r.rtt}` : 'FAILED'}`)
      if (!r.ok) throw new Error(`the node cannot reach ${p.key}`)
    }

    say('releasing: the VMs stop, then tapmanager release each pod')
    for (const c of children.splice(0)) {
      const gone = new Promise((r) => c.once('exit', r))
      try {
        process.kill(-c.pid!, 'SIGKILL')
      } catch {
        c.kill('SIGKILL')
      }
      await gone
    }
    for (const p of pods) {
      const t = Date.now()
      const out = cli(socket, ['release', p.key]).trim()
      detail(`$ tapmanager release ${p.key}: ${out} (${Date.now() - t} ms)`)
    }
    for (const ns of [clientNs, `${clientNs.slice(0, -1)}a`]) if (existsSync(podNetnsPath(DEFAULT_NETNS_DIR, ns))) sh('ip', ['netns', 'del', ns])

    say('stopping the server with SIGTERM')
    const code = await new Promise<number | null>((resolve) => {
      server!.once('exit', (c) => resolve(c))
      server!.kill('SIGTERM')
    })
    detail(`server exited with ${String(code)}`)
    const requests = serverLog.all
      .map((l) => {
        try {
          return JSON.parse(l) as Record<string, unknown>
        } catch {
          return null
        }
      })
      .filter((e): e is Record<string, unknown> => e !== null && e.msg === 'request')
    detail(`server log: ${requests.length} request lines, e.g.`)
    for (const e of requests.slice(0, 6)) detail(`  ${JSON.stringify({ key: e.key, command: e.command, durationMs: Math.round(Number(e.durationMs) * 10) / 10, outcome: e.outcome })}`)
    if (code !== 0) throw new Error(`the server exited with ${String(code)}`)

    say('the node is clean:')
    const leftNs = podIds.filter((id) => existsSync(podNetnsPath(DEFAULT_NETNS_DIR, id)))
    const links = nsExec(node, 'ip', ['-br', 'link']).trim().split('\n').map((l) => l.split(/\s+/)[0].split('@')[0])
    const leases = existsSync(join(ipamDir, 'demo-net')) ? readdirSync(join(ipamDir, 'demo-net')).filter((f) => /^\d/.test(f)) : []
    const state = existsSync(stateDir) ? readdirSync(stateDir).filter((f) => f.endsWith('.json')) : []
    const cniCache = join(stateDir, 'cni')
    const cached = existsSync(cniCache) ? readdirSync(cniCache, { recursive: true }).map(String).filter((f) => f.endsWith('.json')) : []
    detail(`pod netns left: ${leftNs.length ? leftNs.join(' ') : 'none'}`)
    detail(`node links: ${links.join(' ')} (the bridge stays, as CNI's bridge plugin leaves it)`)
    detail(`IPAM leases left: ${leases.length ? leases.join(' ') : 'none'}`)
    detail(`state records left: ${state.length ? state.join(' ') : 'none'}`)
    detail(`CNI cache entries left: ${cached.length ? cached.join(' ') : 'none'}`)
    const veths = links.filter((l) => l.startsWith('veth'))
    if (leftNs.length || leases.length || state.length || cached.length || veths.length) throw new Error('something was left behind')
    say(`demo OK in ${elapsed().trim()} s`)
    return 0
  } catch (err) {
    process.stderr.write(`demo FAILED: ${(err as Error).stack ?? String(err)}\n`)
    return 1
  } finally {
    cleanup()
    process.off('SIGINT', onSignal)
    process.off('SIGTERM', onSignal)
    const left = [node, clientNs, ...podIds].filter((ns) => existsSync(podNetnsPath(DEFAULT_NETNS_DIR, ns)))
    process.stdout.write(left.length ? `cleanup: left ${left.join(' ')}\n` : `[${elapsed()}s] cleaned up: sandbox netns and temp dir removed\n`)
  }
}

if (require.main === module) {
  void main().then((code) => {
    process.exitCode = code
  })
}
