/**
 * `npm run demo` (scripts/demo.sh) runs to the end and says what it did: two pods added, a real VM's lease on
 * pod A (QEMU is installed by setup), a stand-in VM's lease on pod B, pings through the bridge, release, a clean
 * node; and it leaves nothing: no netns, and the root netns's links and routes are what they were.
 */
import test from 'ava'
import { spawn, spawnSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { requirePrereqs } from './helpers/env'
import { processAlive } from './helpers/cni'
import { netnsNames } from './helpers/serve'

/** The demo's netns (other test files create their own meanwhile). */
function demoNetns(names: string[]): string[] {
  return names.filter((n) => n.startsWith('tmdemo-')).sort()
}

function commOf(pid: number): string {
  return spawnSync('cat', [`/proc/${pid}/comm`], { encoding: 'utf8' }).stdout.trim()
}

function descendantsOf(pid: number): number[] {
  const kids = spawnSync('pgrep', ['-P', String(pid)], { encoding: 'utf8' }).stdout.split(/\s+/).filter(Boolean).map(Number)
  return kids.flatMap((k) => [k, ...descendantsOf(k)])
}

function rootNet(): { links: string; routes: string } {
  const r = (args: string[]) => spawnSync('ip', args, { encoding: 'utf8' }).stdout
  return { links: r(['-br', 'link']).replace(/\s+(UP|DOWN|UNKNOWN|LOWERLAYERDOWN)\s+/g, ' '), routes: r(['route', 'show', 'table', 'all']) }
}

test.serial('npm run demo: two pods, leases, pings, release, a clean node, nothing left', (t) => {
  requirePrereqs(['ip', 'qemu-system-x86_64', '/usr/lib/cni/bridge', '/usr/lib/cni/host-local', '/bin/busybox', '/usr/bin/python3'])
  const netnsBefore = netnsNames()
  const rootBefore = rootNet()
  const r = spawnSync('bash', ['scripts/demo.sh'], { encoding: 'utf8', timeout: 600_000 })
  t.log(r.stdout)
  t.is(r.status, 0, r.stderr)
  const out = r.stdout
  t.regex(out, /\$ tapmanager add pod-a --pod-id \S+ \.\.\. {2}\(\d+ ms\)/)
  t.regex(out, /\$ tapmanager add pod-b --pod-id \S+ \.\.\. {2}\(\d+ ms\)/)
  const cni = [...out.matchAll(/CNI gave (10\.88\.0\.\d+)\/24 via 10\.88\.0\.1/g)].map((m) => m[1])
  t.is(cni.length, 2)
  // pod A: the real VM leased its CNI address and pinged the gateway
  t.regex(out, new RegExp(`pod A: the VM leased by DHCP from tapmanager: ip=${cni[0].replace(/\./g, '\\.')} mask=24 \\S+ router=10\\.88\\.0\\.1`))
  t.regex(out, /the VM pinged the node's gateway through the bridge: target=10\.88\.0\.1 ok=1/)
  // pod B: the stand-in's lease, its pings
  t.regex(out, new RegExp(`pod B: busybox udhcpc leased in \\d+ ms: ip=${cni[1].replace(/\./g, '\\.')} mask=24 router=10\\.88\\.0\\.1`))
  t.regex(out, /ping 10\.88\.0\.1 \(node gateway\) from the stand-in VM: ok/)
  t.regex(out, /from pod B, across the node bridge: ok/)
  t.regex(out, /node -> pod A \(\S+\): ping ok/)
  t.regex(out, /node -> pod B \(\S+\): ping ok/)
  t.regex(out, /tapmanager release pod-a: released pod-a/)
  t.regex(out, /tapmanager release pod-b: released pod-b/)
  t.regex(out, /server exited with 0/)
  t.regex(out, /"command":"add","durationMs":[\d.]+,"outcome":"ok"/)
  t.regex(out, /pod netns left: none\n/)
  t.regex(out, /IPAM leases left: none\n/)
  t.regex(out, /state records left: none\n/)
  t.regex(out, /CNI cache entries left: none\n/)
  t.regex(out, /demo OK in [\d.]+ s/)
  t.regex(out, /cleaned up: sandbox netns and temp dir removed/)
  t.deepEqual(demoNetns(netnsNames()), demoNetns(netnsBefore))
  t.deepEqual(rootNet(), rootBefore)
})

test.serial('the demo cleans up when interrupted in the middle (SIGINT while the VM boots)', async (t) => {
  requirePrereqs(['ip', 'qemu-system-x86_64', '/bin/busybox', '/usr/bin/python3'])
  const netnsBefore = netnsNames()
  const rootBefore = rootNet()
  // scripts/demo.sh set everything up in the test above; run the demo program itself.
  const child = spawn(process.execPath, ['dist/demo.js'], { stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  child.stdout.setEncoding('utf8')
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)))
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the demo never started the VM:\n${out}`)), 120_000)
    child.stdout.on('data', (d: string) => {
      out += d
      if (out.includes('booting a real VM')) {
        clearTimeout(timer)
        resolve()
      }
    })
  })
  const node = /sandbox node netns (\S+), temp dir (\S+)/.exec(out)!
  t.true(netnsNames().includes(node[1]))
  // wait (bounded) until QEMU runs under the demo's `tapmanager get --exec`, so there is a VM to clean up
  let descendants: number[] = []
  const deadline = Date.now() + 30_000
  while (!(descendants = descendantsOf(child.pid!)).some((pid) => commOf(pid).startsWith('qemu-system'))) {
    if (Date.now() > deadline) throw new Error('QEMU never started')
    await new Promise((r) => setTimeout(r, 20))
  }
  child.kill('SIGINT')
  t.is(await exited, 130)
  t.deepEqual(demoNetns(netnsNames()), demoNetns(netnsBefore))
  t.false(existsSync(node[2]), 'the temp dir is removed')
  t.deepEqual(rootNet(), rootBefore)
  // none of its processes (server, command line, QEMU, frame copier) outlives it
  t.deepEqual(descendants.filter(processAlive), [])
})
