/**
 * Issue 8, defect 12: a pod left idle on a busy bridge. While no VM reads its tap, the bridge floods broadcast
 * into it until the tap's queue (txqlen 1000) is full; a VM handed that fd then reads the stale backlog first,
 * and the DHCP OFFER answering its first DISCOVER is dropped at the full queue (the guest retries ~1-2 s later).
 * The server drains the queued frames from the tap fds when a get hands them out.
 *
 * The "VM" is a real DHCP client (busybox udhcpc) on a tap in its own netns, joined to the pod's tap fd by a
 * copier that models a guest whose receive path lags its first transmit (as a booting TCG guest's does: QEMU
 * only reads the tap when the guest has posted receive buffers): it forwards the VM's frames at once and starts
 * reading the pod's tap 0.3 s after the first one. The flood (UDP broadcast, ~300 frames/s) comes from the node
 * netns over the CNI bridge. Counted, not timed: the number of DISCOVERs udhcpc sent before its lease.
 * A control pod on the same bridge, handed out without the drain, shows the setup reproduces the defect.
 */
import test from 'ava'
import { spawn, type ChildProcess } from 'node:child_process'
import { closeSync } from 'node:fs'
import { createTap, openTap } from '../src/native'
import { nativePodNetworkOps, type PodNetworkOps } from '../src/podnetwork'
import { TestNetns, requirePrereqs, sh } from './helpers/env'
import { TapFdHarness, run } from './helpers/tapfd'

/** Copies vm -> pod at once; pod -> vm only from 0.3 s after the first vm -> pod frame. fds: 3 pod, 4 vm. */
const LAGGING_COPIER = `
import os, select, sys, time
pod, vm = 3, 4
rx_from = None
sys.stderr.write('ready\\n'); sys.stderr.flush()
while True:
    watch = [vm] + ([pod] if rx_from is not None and time.monotonic() >= rx_from else [])
    r, _, _ = select.select(watch, [], [], 0.02)
    for fd in r:
        try:
            data = os.read(fd, 65536)
        except OSError:
            sys.exit(0)
        if not data:
            sys.exit(0)
        try:
            os.write(pod if fd == vm else vm, data)
        except OSError:
            pass
        if fd == vm and rx_from is None:
            rx_from = time.monotonic() + 0.3
`

/** UDP broadcast out of the node's bridge, ~300 frames/s, until killed. */
const FLOOD = (bridge: string) => `
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b'${bridge}')
while True:
    s.sendto(b'flood' * 20, ('255.255.255.255', 9))
    time.sleep(1 / 300)
`

let drainEnabled = true
const ops: PodNetworkOps = {
  ...nativePodNetworkOps,
  drainTapFd: (fd) => (drainEnabled ? nativePodNetworkOps.drainTapFd!(fd) : 0),
}

/** The tap's TX drops (frames the bridge sent it that found the queue full), read in the pod netns. */
function tapTxDropped(nsPath: string): number {
  const l = JSON.parse(sh('nsenter', [`--net=${nsPath}`, 'ip', '-j', '-s', 'link', 'show', 'tap0']))[0]
  return Number(l.stats64.tx.dropped)
}

async function spawnReady(cmd: string, args: string[], stdio: (number | 'ignore' | 'pipe')[]): Promise<ChildProcess> {
  const proc = spawn(cmd, args, { stdio: stdio as never })
  await new Promise<void>((resolve, reject) => {
    let err = ''
    proc.stderr!.on('data', (d) => {
      err += d
      if (err.includes('ready')) resolve()
    })
    proc.on('exit', (code) => reject(new Error(`${cmd} exited (${code}): ${err}`)))
  })
  return proc
}

/** After the pod idled until its tap dropped frames: get, join a lagging "VM", run udhcpc; the DISCOVERs it sent. */
async function leaseAfterIdle(h: TapFdHarness, podId: string, mac: string): Promise<{ discovers: number; lease: string | null; out: string }> {
  const deadline = Date.now() + 60_000
  while (tapTxDropped(h.nsPath(podId)) < 50) {
    if (Date.now() > deadline) throw new Error('the idle tap never filled up')
    await new Promise((r) => setTimeout(r, 100))
  }
  const vm = new TestNetns('tmidv')
  let copier: ChildProcess | undefined
  try {
    await createTap('vm0', { netns: vm.path, mtu: 1500, up: false })
    vm.exec('ip', ['link', 'set', 'vm0', 'address', mac, 'up'])
    const [vmFd] = await openTap('vm0', { netns: vm.path })
    const { fds } = await h.client.getFDs(podId)
    try {
      copier = await spawnReady('/usr/bin/python3', ['-c', LAGGING_COPIER], ['ignore', 'ignore', 'pipe', fds[0], vmFd])
    } finally {
      for (const fd of [...fds, vmFd]) closeSync(fd)
    }
    const { out, err } = await run('ip', ['netns', 'exec', vm.name, 'timeout', '30', 'busybox', 'udhcpc', '-i', 'vm0', '-f', '-n', '-q', '-T', '2', '-t', '6', '-s', '/bin/true'])
    const text = out + err
    return {
      discovers: (text.match(/(sending|broadcasting) discover/g) ?? []).length,
      lease: /lease of ([0-9.]+) obtained/.exec(text)?.[1] ?? null,
      out: text,
    }
  } finally {
    copier?.kill('SIGKILL')
    vm.cleanup()
  }
}

test.serial('12: a pod left idle on a busy bridge hands out a drained tap: the VM leases on its first DISCOVER', async (t) => {
  requirePrereqs(['/usr/bin/python3', 'busybox'])
  const h = new TapFdHarness({ source: { ops } })
  let flood: ChildProcess | undefined
  try {
    h.node.writeConf('10-bridge.conflist', h.node.bridgeConflist({ subnet: '10.88.0.0/24', bridge: 'tmidbr0' }))
    await h.start()
    const macOf = (csnJson: string) => (JSON.parse(csnJson).Result.interfaces as { name: string; mac: string; sandbox?: string }[]).find((i) => i.name === 'eth0' && i.sandbox)!.mac
    const drained = h.node.podId('tmidd')
    const control = h.node.podId('tmidc')
    const macDrained = macOf(await h.add(drained))
    const macControl = macOf(await h.add(control))
    flood = spawn('ip', ['netns', 'exec', h.node.name, '/usr/bin/python3', '-c', FLOOD('tmidbr0')], { stdio: 'ignore' })

    drainEnabled = true
    const a = await leaseAfterIdle(h, drained, macDrained)
    const framesDrained = h.source.framesDrained
    drainEnabled = false
    const b = await leaseAfterIdle(h, control, macControl)
    t.log(`drained: ${framesDrained} stale frames dropped at get, ${a.discovers} DISCOVER(s); control (no drain): ${b.discovers} DISCOVER(s)`)

    t.truthy(a.lease, a.out)
    t.is(a.discovers, 1, a.out)
    t.true(framesDrained >= 500, `the idle tap held a backlog (${framesDrained} frames drained)`)
    // The same setup without the drain loses the first OFFER: the test reproduces the defect.
    t.true(b.discovers >= 2, b.out)
    await h.client.releaseFDs(drained)
    await h.client.releaseFDs(control)
  } finally {
    flood?.kill('SIGKILL')
    await h.cleanup()
  }
})
