/**
 * Issue 8, the node/daemon half: each defect reproduced with real parts (the real `tapmanager serve` in a test
 * node netns, Debian bridge + host-local, real netns and mounts), failing before its fix.
 *
 * 3. Two keys, one pod id: the second key gets a clear error and nothing of the first is touched; 20 concurrent
 *    adds of one pod id: exactly one wins; a crash leftover netns (no live key) is still cleaned by an add.
 * 4. A netns path that is a plain file (kill -9 between creating the file and mounting onto it) is no netns:
 *    recovery runs CNI DEL without a netns (lease released), removes the file and drops the record.
 * 5. Startup sweeps the temp files of interrupted writes (state dir, CNI cache); an add whose CNI ADD and
 *    rollback DEL both failed keeps its cache entry and `adding` record until a DEL succeeds (next start).
 * 7. --cni-timeout bounds a plugin whose child keeps the pipes open.
 * 8. FIFOs, devices, dirs and huge files in the CNI conf dir are skipped with a reason; adds still work.
 * 9. A symlink planted in the netns dir (to another netns) or in the state dir is never followed.
 */
import test from 'ava'
import { spawnSync } from 'node:child_process'
import { chmodSync, closeSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { basename, dirname, join } from 'node:path'
import { execPlugin } from '../src/cni/exec'
import { loadNetworkConfig } from '../src/cni/config'
import { StateCorruptError, StateStore } from '../src/state'
import { tapFdInfo } from '../src/native'
import { CniTestNode, processAlive } from './helpers/cni'
import { sh, uniqueName } from './helpers/env'
import { addPayload, killNetnsProcesses, netnsNames, removeNetns, runCli, ServerProcess } from './helpers/serve'

const NETNS_DIR = '/var/run/netns'

function setup(prefix: string, subnet: string, extraPlugins: object[] = [], serveArgs: string[] = []): { node: CniTestNode; server: ServerProcess } {
  const node = new CniTestNode(prefix)
  node.writeConf('10-bridge.conflist', node.bridgeConflist({ subnet, bridge: `${prefix}br0`, plugins: extraPlugins }))
  return { node, server: new ServerProcess(node, serveArgs) }
}

async function assertServed(t: import('ava').ExecutionContext, server: ServerProcess, key: string): Promise<void> {
  const { fds } = await server.client().getFDs(key)
  try {
    t.is(fds.length, 1, `${key}: one fd`)
    t.is(tapFdInfo(fds[0]).name, 'tap0')
  } finally {
    for (const fd of fds) closeSync(fd)
  }
}

/** True when a mount exists at exactly `path` (its dir resolved, e.g. /var/run -> /run) in this mount namespace. */
function mountedAt(path: string): boolean {
  const real = join(realpathSync(dirname(path)), basename(path))
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((l) => l.split(' ')[4] === real)
}

function lsKeys(server: ServerProcess): [string, string][] {
  const ls = JSON.parse(runCli(['ls', '--state-dir', server.stateDir, '--json']).stdout) as { keys: { key: string; state: string }[] }
  return ls.keys.map((k) => [k.key, k.state])
}

async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms)))])
  } finally {
    clearTimeout(timer)
  }
}

// ------------------------------------------------------------------------------------------------ defect 3

test.serial('3: a second key with the same pod id gets a clear error and the first key is untouched', async (t) => {
  const { node, server } = setup('tmh3', '10.81.0.0/24')
  const pod = node.podId('tmh3p')
  try {
    await server.start()
    const client = server.client()
    await client.addFDs('first', addPayload(pod))
    const lease = node.leases('tmbridge')
    t.is(lease.length, 1)

    const err = await t.throwsAsync(client.addFDs('second', addPayload(pod)))
    t.regex(err?.message ?? '', /pod id "tmh3p[0-9a-f]+" is in use by another key \("first"\)/)
    // Nothing of the first key was touched: its netns, lease, record and fd are as they were.
    t.true(netnsNames().includes(pod))
    t.deepEqual(node.leases('tmbridge'), lease)
    t.deepEqual(lsKeys(server), [['first', 'ready']])
    await assertServed(t, server, 'first')
    await t.throwsAsync(client.releaseFDs('second'), { message: /bad fd key/ })
    await assertServed(t, server, 'first')

    // 20 concurrent adds of one pod id under 20 keys: exactly one wins, the others get the clear error.
    const contested = node.podId('tmh3c')
    const keys = Array.from({ length: 20 }, (_, i) => `k${i}`)
    const results = await Promise.allSettled(keys.map((k) => client.addFDs(k, addPayload(contested))))
    const won = keys.filter((_, i) => results[i].status === 'fulfilled')
    t.is(won.length, 1, JSON.stringify(results.map((r) => (r.status === 'rejected' ? String(r.reason.message) : 'ok'))))
    for (const r of results) if (r.status === 'rejected') t.regex(String(r.reason.message), /is in use by another key/)
    t.is(node.leases('tmbridge').length, 2)
    t.deepEqual(lsKeys(server).map(([k]) => k).sort(), ['first', won[0]].sort())
    await assertServed(t, server, won[0])

    // A crash leftover (a live netns at the pod id's path, no key holds it) is still cleaned by an add.
    const leftover = node.podId('tmh3l')
    sh('ip', ['netns', 'add', leftover])
    sh('ip', ['-n', leftover, 'link', 'add', 'stale0', 'type', 'bridge'])
    await client.addFDs('third', addPayload(leftover))
    t.false(node.linksIn(leftover).includes('stale0'), 'the leftover netns was replaced')
    await assertServed(t, server, 'third')

    for (const k of ['first', won[0], 'third']) await client.releaseFDs(k)
    t.deepEqual(node.leases('tmbridge'), [])
    for (const id of [pod, contested, leftover]) t.false(netnsNames().includes(id))
    t.deepEqual(lsKeys(server), [])
    t.deepEqual(await server.stop(), { code: 0, signal: null })
  } finally {
    server.cleanup()
    killNetnsProcesses(node.name)
    node.cleanup()
  }
})

// ------------------------------------------------------------------------------------------------ defect 4

test.serial('4: a netns path that is a plain file (no nsfs mount) is no netns: DEL without netns, file removed, record dropped', async (t) => {
  const { node, server } = setup('tmh4', '10.82.0.0/24')
  const victim = node.podId('tmh4v')
  const plain = node.podId('tmh4f')
  const kept = node.podId('tmh4k')
  try {
    await server.start({}, `after-cni:${victim}`)
    const client = server.client()
    await client.addFDs('kept', addPayload(kept))
    await t.throwsAsync(client.addFDs('victim', addPayload(victim)))
    t.is((await server.exited()).signal, 'SIGKILL')
    t.is(node.leases('tmbridge').length, 2)
    // What a kill between creating the netns file and mounting onto it leaves: a plain file. Here the victim's
    // mount is taken away after its CNI ADD (its lease is held), and a second key has only a file and a record.
    sh('umount', [join(NETNS_DIR, victim)])
    t.true(existsSync(join(NETNS_DIR, victim)))
    t.false(mountedAt(join(NETNS_DIR, victim)))
    writeFileSync(join(NETNS_DIR, plain), '')
    await new StateStore(server.stateDir).write({ key: 'plain', status: 'adding', podNetworkDesc: addPayload(plain).podNetworkDesc })
    t.deepEqual(lsKeys(server).sort(), [
      ['kept', 'ready'],
      ['plain', 'adding'],
      ['victim', 'adding'],
    ])

    await server.start()
    t.deepEqual(server.messages('cleaned up an interrupted add').map((l) => l.key).sort(), ['plain', 'victim'])
    t.deepEqual(server.messages('skipped: could not recover'), [])
    t.false(existsSync(join(NETNS_DIR, victim)), 'the plain file is removed')
    t.false(existsSync(join(NETNS_DIR, plain)))
    t.deepEqual(node.leases('tmbridge').map((l) => l.containerId), [kept], 'the victim lease was released by a DEL without netns')
    t.deepEqual(lsKeys(server), [['kept', 'ready']])
    await assertServed(t, server, 'kept')
    await client.releaseFDs('kept')
    t.deepEqual(node.leases('tmbridge'), [])
    t.deepEqual(await server.stop(), { code: 0, signal: null })
  } finally {
    server.cleanup()
    killNetnsProcesses(node.name)
    for (const id of [victim, plain, kept]) {
      removeNetns(id)
      rmSync(join(NETNS_DIR, id), { force: true })
    }
    node.cleanup()
  }
})

// ------------------------------------------------------------------------------------------------ defect 5

/** A chained CNI plugin (python): ADD takes a "lease" file, then fails while `fail-add` exists; DEL fails while `fail-del` exists. */
function flakyPlugin(binDir: string, stateDir: string): void {
  mkdirSync(binDir, { recursive: true })
  const path = join(binDir, 'tmflaky')
  writeFileSync(
    path,
    `#!/usr/bin/python3
import json, os, sys
conf = json.load(sys.stdin)
cmd = os.environ.get('CNI_COMMAND')
d = ${JSON.stringify(stateDir)}
lease = os.path.join(d, os.environ.get('CNI_CONTAINERID', 'x'))
def fail(msg):
    print(json.dumps({'cniVersion': conf.get('cniVersion', '1.0.0'), 'code': 11, 'msg': msg}))
    sys.exit(1)
if cmd == 'ADD':
    open(lease, 'w').close()
    if os.path.exists(os.path.join(d, 'fail-add')): fail('tmflaky: ADD fails')
    print(json.dumps(conf['prevResult']))
elif cmd == 'DEL':
    if os.path.exists(os.path.join(d, 'fail-del')): fail('tmflaky: DEL fails')
    if os.path.exists(lease): os.unlink(lease)
elif cmd == 'VERSION':
    print(json.dumps({'cniVersion': '1.0.0', 'supportedVersions': ['0.4.0', '1.0.0']}))
`,
  )
  chmodSync(path, 0o755)
}

test.serial('5: startup sweeps temp files of interrupted writes; an add whose ADD and rollback DEL failed is DELed later', async (t) => {
  const binDir = mkdtempSync(join(tmpdir(), 'tapmanager-h5bin-'))
  const flakyDir = mkdtempSync(join(tmpdir(), 'tapmanager-h5st-'))
  flakyPlugin(binDir, flakyDir)
  const { node, server } = setup('tmh5', '10.83.0.0/24', [{ type: 'tmflaky' }], ['--cni-bin-dir', binDir])
  const pod = node.podId('tmh5p')
  const cacheDir = () => join(server.stateDir, 'cni')
  try {
    await server.start()
    await server.stop()
    // Temp files a kill between write and rename leaves, and a file that is not ours.
    const cniTemp = `${pod}-eth0.json.4242.k3x9.tmp`
    const stateTemp = `.${pod}.json.tmp-4242-0a0b0c0d`
    mkdirSync(cacheDir(), { recursive: true })
    writeFileSync(join(cacheDir(), cniTemp), '{"kind":"tapmanagerCni')
    writeFileSync(join(cacheDir(), 'README'), 'not ours')
    writeFileSync(join(server.stateDir, stateTemp), '{')
    await server.start()
    t.false(existsSync(join(cacheDir(), cniTemp)), 'CNI cache temp swept')
    t.false(existsSync(join(server.stateDir, stateTemp)), 'state temp swept')
    t.true(existsSync(join(cacheDir(), 'README')), 'other files are left alone')

    // ADD fails after the bridge leased, and the rollback DEL fails too (the chained plugin's DEL).
    writeFileSync(join(flakyDir, 'fail-add'), '')
    writeFileSync(join(flakyDir, 'fail-del'), '')
    const client = server.client()
    const err = await t.throwsAsync(client.addFDs('k', addPayload(pod)))
    t.regex(err?.message ?? '', /ADD fails/)
    // The cache entry stays (a later DEL needs it), the flaky plugin's "lease" is held, the record stays adding.
    t.true(existsSync(join(cacheDir(), `${pod}-eth0.json`)))
    t.true(existsSync(join(flakyDir, pod)))
    t.deepEqual(lsKeys(server), [['k', 'adding']])
    t.false(netnsNames().includes(pod), 'the netns was rolled back')

    // Once the plugin's DEL works again, the next start DELs from the cache: everything is released.
    rmSync(join(flakyDir, 'fail-del'))
    await server.stop()
    await server.start()
    t.deepEqual(server.messages('cleaned up an interrupted add').map((l) => l.key), ['k'])
    t.false(existsSync(join(cacheDir(), `${pod}-eth0.json`)), 'cache entry removed by the DEL')
    t.false(existsSync(join(flakyDir, pod)), 'the plugin released what it held')
    t.deepEqual(node.leases('tmbridge'), [])
    t.deepEqual(lsKeys(server), [])

    // The same without a restart: a new add of the pod DELs the leftover first, then adds.
    writeFileSync(join(flakyDir, 'fail-del'), '')
    await t.throwsAsync(client.addFDs('k', addPayload(pod)))
    t.true(existsSync(join(cacheDir(), `${pod}-eth0.json`)))
    rmSync(join(flakyDir, 'fail-del'))
    rmSync(join(flakyDir, 'fail-add'))
    await client.addFDs('k', addPayload(pod))
    t.deepEqual(lsKeys(server), [['k', 'ready']])
    t.is(node.leases('tmbridge').length, 1)
    await client.releaseFDs('k')
    t.deepEqual(node.leases('tmbridge'), [])
    t.false(existsSync(join(cacheDir(), `${pod}-eth0.json`)))
    t.deepEqual(await server.stop(), { code: 0, signal: null })
  } finally {
    server.cleanup()
    killNetnsProcesses(node.name)
    removeNetns(pod)
    node.cleanup()
    rmSync(binDir, { recursive: true, force: true })
    rmSync(flakyDir, { recursive: true, force: true })
  }
})

// ------------------------------------------------------------------------------------------------ defect 7

/** A plugin script whose ADD leaves a child holding stdout open (`setsid`: out of the plugin's process group). */
function pipeHolder(dir: string, name: string, opts: { setsid: boolean; hang: boolean }): { pidFile: string } {
  const pidFile = join(dir, `${name}.pid`)
  const path = join(dir, name)
  writeFileSync(
    path,
    `#!/bin/sh
cat >/dev/null
case "$CNI_COMMAND" in
ADD)
  ${opts.setsid ? 'setsid ' : ''}sleep 300 &
  echo $! > ${pidFile}
  printf '%s' '{"cniVersion":"1.0.0","ips":[{"address":"10.84.0.5/24"}]}'
  ${opts.hang ? 'sleep 300' : 'exit 0'}
  ;;
esac
`,
  )
  chmodSync(path, 0o755)
  return { pidFile }
}

async function childPid(pidFile: string): Promise<number> {
  const deadline = Date.now() + 20_000
  while (!existsSync(pidFile) || !readFileSync(pidFile, 'utf8').trim()) {
    if (Date.now() > deadline) throw new Error('the plugin never wrote its child pid')
    await new Promise((r) => setTimeout(r, 10))
  }
  return Number(readFileSync(pidFile, 'utf8').trim())
}

function kill(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL')
  } catch {
    // gone
  }
}

test.serial('7: the CNI timeout bounds a plugin whose child keeps the pipes open', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'tapmanager-h7-'))
  const run = (plugin: string, timeoutMs: number) =>
    execPlugin({ plugin, network: 'n', command: 'ADD', stdin: { cniVersion: '1.0.0', name: 'n', type: plugin }, env: { CNI_COMMAND: 'ADD' }, binDirs: [dir], timeoutMs, execWrapper: [] })
  const pids: number[] = []
  try {
    // 1. The plugin succeeds at once, a setsid'd child keeps its stdout for 300 s: the run ends at the timeout
    //    (not when that child exits), and the result the plugin printed is used (no "timed out": it exited).
    const ok = pipeHolder(dir, 'holdok', { setsid: true, hang: false })
    const res = await run('holdok', 2000)
    const okChild = await childPid(ok.pidFile)
    pids.push(okChild)
    t.deepEqual(res, { cniVersion: '1.0.0', ips: [{ address: '10.84.0.5/24' }] })
    t.true(processAlive(okChild), 'the run did not wait for the child holding the pipe')

    // 2. The plugin hangs, its setsid'd child holds the pipes: the timeout ends the run, says so, and the run
    //    ends while that child (out of reach of the group kill) still lives.
    const hung = pipeHolder(dir, 'holdhang', { setsid: true, hang: true })
    const err = await t.throwsAsync(run('holdhang', 1500))
    const hungChild = await childPid(hung.pidFile)
    pids.push(hungChild)
    t.regex(err?.message ?? '', /timed out after 1500 ms/)
    t.is((err as { code?: string }).code, 'ERR_TIMEOUT')
    t.true(processAlive(hungChild))

    // 3. The plugin hangs with a child in its own process group: the group is killed, child included.
    const grp = pipeHolder(dir, 'holdgrp', { setsid: false, hang: true })
    const err3 = await t.throwsAsync(run('holdgrp', 1500))
    const grpChild = await childPid(grp.pidFile)
    pids.push(grpChild)
    t.regex(err3?.message ?? '', /timed out/)
    const deadline = Date.now() + 20_000
    while (processAlive(grpChild) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20))
    t.false(processAlive(grpChild), 'the whole process group was killed')
  } finally {
    for (const p of pids) kill(p)
    rmSync(dir, { recursive: true, force: true })
  }
})

// ------------------------------------------------------------------------------------------------ defect 8

test.serial('8: FIFOs, devices, dirs and huge files in the CNI conf dir are skipped with a reason; adds and releases work', async (t) => {
  const { node, server } = setup('tmh8', '10.85.0.0/24')
  const pod = node.podId('tmh8p')
  try {
    const c = node.confDir
    t.is(spawnSync('mkfifo', [join(c, '00-fifo.conflist')]).status, 0)
    t.is(spawnSync('mknod', [join(c, '01-zero.conf'), 'c', '1', '5']).status, 0) // like /dev/zero: endless
    symlinkSync('/dev/zero', join(c, '02-zerolink.json'))
    mkdirSync(join(c, '03-dir.conf'))
    // A valid config (another subnet) padded to 2 MiB: it must not be read, so the 10-bridge one is used.
    const big = JSON.stringify(node.bridgeConflist({ subnet: '10.86.0.0/24', bridge: 'tmh8big0' }))
    writeFileSync(join(c, '04-huge.conflist'), big + ' '.repeat(2 * 1024 * 1024 - big.length))
    symlinkSync(join(c, '00-fifo.conflist'), join(c, '05-fifolink.conf'))

    const { config, skipped } = await within(loadNetworkConfig(c), 10_000, 'loadNetworkConfig')
    t.is(config.file, join(c, '10-bridge.conflist'))
    const why = Object.fromEntries(skipped.map((s) => [s.file.slice(c.length + 1), s.reason]))
    t.regex(why['00-fifo.conflist'], /not a regular file \(a FIFO\)/)
    t.regex(why['01-zero.conf'], /not a regular file \(a character device\)/)
    t.regex(why['02-zerolink.json'], /not a regular file \(a character device\)/)
    t.regex(why['03-dir.conf'], /not a regular file \(a directory\)/)
    t.regex(why['04-huge.conflist'], new RegExp(`too large \\(${2 * 1024 * 1024} bytes > 1048576\\)`))
    t.regex(why['05-fifolink.conf'], /a FIFO/)

    await server.start()
    const client = server.client()
    await within(client.addFDs('k', addPayload(pod)), 60_000, 'add')
    t.deepEqual(node.leases('tmbridge').map((l) => l.ip.split('.').slice(0, 3).join('.')), ['10.85.0'])
    await assertServed(t, server, 'k')
    await within(client.releaseFDs('k'), 60_000, 'release')
    t.deepEqual(node.leases('tmbridge'), [])
    t.deepEqual(await server.stop(), { code: 0, signal: null })
  } finally {
    server.cleanup()
    killNetnsProcesses(node.name)
    removeNetns(pod)
    node.cleanup()
  }
})

// ------------------------------------------------------------------------------------------------ defect 9

test.serial('9: a symlink planted in the netns dir (to another netns) is never followed: that netns stays mounted', async (t) => {
  const { node, server } = setup('tmh9', '10.87.0.0/24')
  const other = uniqueName('tmh9o')
  const planted = node.podId('tmh9s')
  try {
    sh('ip', ['netns', 'add', other])
    const otherPath = join(NETNS_DIR, other)
    t.true(mountedAt(otherPath))
    symlinkSync(otherPath, join(NETNS_DIR, planted))

    await server.start()
    const client = server.client()
    // The add of the planted pod id removes the symlink (never following it) and makes its own netns.
    await client.addFDs('k', addPayload(planted))
    t.true(mountedAt(otherPath), 'the netns the symlink pointed at is still mounted')
    t.true(mountedAt(join(NETNS_DIR, planted)), 'the pod got a netns of its own')
    await assertServed(t, server, 'k')
    await client.releaseFDs('k')
    t.false(existsSync(join(NETNS_DIR, planted)))

    // A symlink at a pod's netns path when it is released: removed, not followed.
    await client.addFDs('k2', addPayload(planted))
    sh('umount', [join(NETNS_DIR, planted)])
    rmSync(join(NETNS_DIR, planted))
    symlinkSync(otherPath, join(NETNS_DIR, planted))
    await client.releaseFDs('k2').catch(() => undefined)
    t.true(mountedAt(otherPath), 'release did not unmount the netns behind the symlink')
    t.false(existsSync(join(NETNS_DIR, planted)))
    t.deepEqual(node.leases('tmbridge'), [])
    t.deepEqual(await server.stop(), { code: 0, signal: null })
  } finally {
    server.cleanup()
    killNetnsProcesses(node.name)
    rmSync(join(NETNS_DIR, planted), { force: true })
    removeNetns(planted)
    removeNetns(other)
    node.cleanup()
  }
})

test('9: a symlink in the state dir is never followed (reported corrupt; its target is untouched)', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'tapmanager-h9st-'))
  const outside = mkdtempSync(join(tmpdir(), 'tapmanager-h9out-'))
  try {
    const store = new StateStore(dir)
    await store.init()
    const target = join(outside, 'victim.json')
    const record = JSON.stringify({ version: 1, key: 'evil', status: 'ready', podNetworkDesc: {}, csn: {}, updatedAt: 'x' })
    writeFileSync(target, record)
    symlinkSync(target, join(dir, 'evil.json'))
    await t.throwsAsync(store.read('evil'), { instanceOf: StateCorruptError, message: /symlink/ })
    const listing = await store.list()
    t.deepEqual(listing.records, [])
    t.deepEqual(listing.corrupt.map((c) => [c.file, c.reason]), [['evil.json', 'a symlink (never followed)']])
    await store.quarantine('evil.json')
    t.is(readFileSync(target, 'utf8'), record, 'the target is untouched')
    t.is(readdirSync(dir).filter((f) => f.endsWith('.corrupt')).length, 1)
    t.false(await store.remove('evil'))
    t.true(existsSync(target))
  } finally {
    rmSync(dir, { recursive: true, force: true })
    rmSync(outside, { recursive: true, force: true })
  }
})
