/**
 * The real command line against a real server: `tapmanager serve` runs inside a test node netns with the
 * Debian bridge + host-local config; client commands run as separate `node dist/cli.js` processes. Every command
 * (add, get, get --qemu-args, get --exec, release, recover --from, ls, status, --json) and its exit codes (0 ok,
 * 1 server error, 2 usage, 3 not running); one JSON log line per request; SIGTERM/SIGINT stop cleanly (socket
 * removed, exit 0, pod netns kept) and a restart recovers; after release nothing is left.
 */
import test from 'ava'
import { spawn, spawnSync } from 'node:child_process'
import { chmodSync, copyFileSync, existsSync, statSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import { CniTestNode } from './helpers/cni'
import { CLI_JS, netnsNames, removeNetns, runCli, ServerProcess } from './helpers/serve'

const SUBNET = '10.71.0.0/24'

function setup(): { node: CniTestNode; server: ServerProcess } {
  const node = new CniTestNode('tmce')
  node.writeConf('10-bridge.conflist', node.bridgeConflist({ subnet: SUBNET, bridge: 'tmcebr0' }))
  return { node, server: new ServerProcess(node) }
}

test.serial('every command against a running server, with human and --json output and exit codes', async (t) => {
  const { node, server } = setup()
  const podId = node.podId('tmcep')
  const key = 'vm-key-1'
  try {
    const before = node.snapshot()
    // Not running yet: status and client commands exit 3.
    let r = runCli(['status', ...server.sock])
    t.is(r.code, 3, r.stderr)
    t.regex(r.stderr, /not running/)
    t.is(r.stdout, '')
    r = runCli(['add', key, '--pod-id', podId, '--pod-name', 'vm', '--pod-ns', 'default', ...server.sock, '--json'])
    t.is(r.code, 3)
    t.is((JSON.parse(r.stderr) as { error: { code: string } }).error.code, 'ERR_NOT_RUNNING')

    await server.start()
    const fdsAtStart = server.fdCount()
    r = runCli(['status', ...server.sock, '--json'])
    t.is(r.code, 0, r.stderr)
    t.deepEqual(JSON.parse(r.stdout), { running: true, socket: server.socket })

    // Usage errors exit 2 and never reach the server.
    const requestsBefore = server.messages('request').length
    t.is(runCli(['add', key, '--pod-name', 'vm', '--pod-ns', 'default', ...server.sock]).code, 2)
    t.is(runCli(['get', ...server.sock]).code, 2)
    t.is(runCli(['get', key, '--exec', ...server.sock]).code, 2)
    t.is(runCli(['release', key, '--bogus', ...server.sock]).code, 2)
    t.is(runCli(['frobnicate']).code, 2)
    t.is(server.messages('request').length, requestsBefore)

    // add: the CNI result (bridge + host-local) and the tap in the ContainerSideNetwork.
    r = runCli(['add', key, '--pod-id', podId, '--pod-name', 'vm', '--pod-ns', 'default', '--dns', '10.96.0.10', ...server.sock, '--json'])
    t.is(r.code, 0, r.stderr)
    const added = JSON.parse(r.stdout) as { key: string; csn: { NsPath: string; Result: { ips: { address: string; gateway: string }[]; dns: { nameservers: string[] } }; Interfaces: { Name: string }[] } }
    t.is(added.key, key)
    t.regex(added.csn.Result.ips[0].address, /^10\.71\.0\.\d+\/24$/)
    t.is(added.csn.Result.ips[0].gateway, '10.71.0.1')
    t.deepEqual(added.csn.Result.dns.nameservers, ['10.96.0.10'])
    t.is(added.csn.NsPath, `/var/run/netns/${podId}`)
    t.deepEqual(node.leases('tmbridge').map((l) => `${l.ip} ${l.containerId}`), [`${added.csn.Result.ips[0].address.split('/')[0]} ${podId}`])
    // A second add of the key is a server error (exit 1) and changes nothing.
    r = runCli(['add', key, '--pod-id', podId, '--pod-name', 'vm', '--pod-ns', 'default', ...server.sock])
    t.is(r.code, 1)
    t.regex(r.stderr, /tapmanager: .*already|exists/)

    // get: human, --json, --qemu-args.
    r = runCli(['get', key, ...server.sock])
    t.is(r.code, 0, r.stderr)
    t.regex(r.stdout, /^vm-key-1: 1 interface\(s\), 1 fd\(s\)\n {2}0 tap fd 0 ([0-9a-f]{2}:){5}[0-9a-f]{2}\n$/)
    r = runCli(['get', key, ...server.sock, '--json'])
    const got = JSON.parse(r.stdout) as { interfaces: { mac: string; type: number; fdIndex: number }[]; fds: number }
    t.is(got.fds, 1)
    const mac = got.interfaces[0].mac
    r = runCli(['get', key, '--qemu-args', ...server.sock])
    t.is(r.code, 0, r.stderr)
    t.is(r.stdout.trim(), `-netdev tap,id=tap0,fd=3 -device virtio-net-pci,netdev=tap0,id=net0,mac=${mac}`)

    // get --exec: the command inherits the tap as fd 3 (the kernel names the tap in fdinfo) and its exit code is ours.
    r = runCli(['get', key, '--exec', ...server.sock, '--', 'sh', '-c', 'readlink /proc/self/fd/3; grep iff /proc/self/fdinfo/3; exit 7'])
    t.is(r.code, 7, r.stderr)
    t.regex(r.stdout, /^\/dev\/net\/tun\niff:\s+tap0\n$/)
    // with --qemu-args the arguments are appended to the command's
    r = runCli(['get', key, '--qemu-args', '--exec', ...server.sock, '--', 'sh', '-c', 'echo "$@"', 'sh'])
    t.is(r.code, 0, r.stderr)
    t.is(r.stdout.trim(), `-netdev tap,id=tap0,fd=3 -device virtio-net-pci,netdev=tap0,id=net0,mac=${mac}`)

    // ls reads the state dir.
    r = runCli(['ls', '--state-dir', server.stateDir])
    t.is(r.code, 0)
    t.regex(r.stdout, new RegExp(`^KEY\\tPOD\\tPOD ID\\tSTATE\\n${key}\\tdefault/vm\\t${podId}\\tready\\n$`))
    const ls = JSON.parse(runCli(['ls', '--state-dir', server.stateDir, '--json']).stdout) as { keys: { key: string; state: string }[] }
    t.deepEqual(ls.keys.map((k) => [k.key, k.state]), [[key, 'ready']])

    // get of an unknown key: server error.
    r = runCli(['get', 'nope', ...server.sock, '--json'])
    t.is(r.code, 1)
    t.regex((JSON.parse(r.stderr) as { error: { message: string } }).error.message, /nope/)

    // One JSON log line per request with key, command, duration and outcome.
    const reqs = server.messages('request')
    const adds = reqs.filter((l) => l.command === 'add')
    t.deepEqual(adds.map((l) => [l.key, l.outcome]), [[key, 'ok'], [key, 'error']])
    for (const l of reqs) {
      t.is(typeof l.durationMs, 'number')
      t.true(['ok', 'error'].includes(l.outcome as string))
      t.is(typeof l.key, 'string')
    }
    t.is(reqs.filter((l) => l.command === 'get').length, 6)

    // SIGTERM: exit 0, socket gone, the pod netns and its state kept for recovery.
    const saved = join(node.dir, 'saved-record.json')
    const recordFile = readdirSync(server.stateDir).find((f) => f.endsWith('.json'))!
    copyFileSync(join(server.stateDir, recordFile), saved)
    t.deepEqual(await server.stop('SIGTERM'), { code: 0, signal: null })
    t.false(existsSync(server.socket))
    t.true(netnsNames().includes(podId))
    t.truthy(server.messages('stopped').length)
    t.is(runCli(['get', key, ...server.sock]).code, 3)

    // Restart: the key is recovered by itself and get retrieves its fd.
    await server.start()
    t.deepEqual(server.messages('recovered').map((l) => l.key), [key], JSON.stringify(server.logs.slice(-8)))
    r = runCli(['get', key, '--exec', ...server.sock, '--', 'sh', '-c', 'grep iff /proc/self/fdinfo/3'])
    t.is(r.code, 0, r.stderr)
    t.regex(r.stdout, /iff:\s+tap0/)

    // recover --from: stop with SIGINT, take the record out of the state dir so the restart does not know the
    // key, and recover it from the saved record file.
    t.deepEqual(await server.stop('SIGINT'), { code: 0, signal: null })
    rmSync(join(server.stateDir, recordFile))
    await server.start()
    t.is(runCli(['get', key, ...server.sock]).code, 1)
    // An unreadable --from file is a failure (1), not a usage error (2).
    t.is(runCli(['recover', key, '--from', join(node.dir, 'missing.json'), ...server.sock]).code, 1)
    r = runCli(['recover', key, '--from', saved, ...server.sock])
    t.is(r.code, 0, r.stderr)
    t.is(r.stdout, `recovered ${key}\n`)
    r = runCli(['get', key, '--exec', ...server.sock, '--', 'sh', '-c', 'grep iff /proc/self/fdinfo/3'])
    t.is(r.code, 0, r.stderr)
    t.regex(r.stdout, /iff:\s+tap0/)
    // a recovered key is persisted again
    t.is(JSON.parse(runCli(['ls', '--state-dir', server.stateDir, '--json']).stdout).keys.length, 1)
    // recover from stdin, of a key that exists: server error
    r = runCli(['recover', key, '--from', '-', ...server.sock], { input: readFileSync(saved, 'utf8') })
    t.is(r.code, 1)

    // release: everything CNI and tapmanager made is gone; a second release is a server error.
    const fdsBeforeRelease = server.fdCount()
    // The source's tap fd, and the native fast path's duplicate (the get above registered the key's response).
    t.is(server.tapFdCount(), 2, 'the server holds the tap fd of the key and its fast-path duplicate')
    r = runCli(['release', key, ...server.sock])
    t.is(r.code, 0, r.stderr)
    t.is(r.stdout, `released ${key}\n`)
    t.is(runCli(['release', key, ...server.sock]).code, 1)
    t.false(netnsNames().includes(podId))
    // The bridge plugin leaves its bridge (with the gateway address and subnet route) on DEL; nothing else stays.
    const after = node.snapshot()
    t.deepEqual(after.links.filter((l) => !l.startsWith('tmcebr0')), before.links)
    t.deepEqual(after.routes.filter((l) => !l.includes('tmcebr0')), before.routes)
    t.deepEqual(after.leases, [])
    t.is(runCli(['ls', '--state-dir', server.stateDir]).stdout, `no keys in ${server.stateDir}\n`)
    t.is(server.tapFdCount(), 0, 'the released tap fd is closed')
    t.log(`server fds: at start ${fdsAtStart}, before release ${fdsBeforeRelease}, after ${server.fdCount()}`)
    t.deepEqual(await server.stop(), { code: 0, signal: null })
    t.deepEqual(server.messages('the netns dir is not on a shared mount: pod netns will not outlive this process (run in the host mount namespace, e.g. nsenter --net rather than ip netns exec)'), [])
  } finally {
    server.cleanup()
    removeNetns(podId)
    node.cleanup()
  }
})

test.serial('serve: bad flags exit 2; a second server on the same socket fails (exit 1) and leaves the first serving', async (t) => {
  const { node, server } = setup()
  try {
    t.is(runCli(['serve', '--socket-mode', '999']).code, 2)
    t.is(runCli(['serve', '--log-level', 'loud']).code, 2)
    t.is(runCli(['serve', '--calico-subnet-size', '40']).code, 2)
    await server.start()
    const second = runCli(['serve', '--socket', server.socket, '--state-dir', join(node.dir, 'state2'), '--cni-conf-dir', node.confDir])
    t.is(second.code, 1, second.stderr)
    t.is(runCli(['status', ...server.sock]).code, 0)
    t.deepEqual(await server.stop(), { code: 0, signal: null })
  } finally {
    server.cleanup()
    node.cleanup()
  }
})

test.serial('serve under `ip netns exec` (a private mount namespace) warns that pod netns would not outlive it', async (t) => {
  const node = new CniTestNode('tmcw')
  try {
    const dir = node.dir
    const args = ['netns', 'exec', node.name, process.execPath, CLI_JS, 'serve', '--socket', join(dir, 's.sock'), '--state-dir', join(dir, 'st'), '--cni-conf-dir', node.confDir]
    const child = spawn('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] })
    let stderr = ''
    child.stderr.setEncoding('utf8')
    child.stderr.on('data', (d: string) => (stderr += d))
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)))
    const deadline = Date.now() + 30_000
    while (!stderr.includes('"msg":"serving"')) {
      if (Date.now() > deadline || child.exitCode !== null) throw new Error(`serve did not start: ${stderr}`)
      await new Promise((r) => setTimeout(r, 20))
    }
    child.kill('SIGTERM')
    t.is(await exited, 0, stderr)
    const lines = stderr.split('\n').filter(Boolean).map((l) => JSON.parse(l) as { level: number; msg: string; netnsDir?: string })
    const warn = lines.find((l) => /not on a shared mount/.test(l.msg))
    t.truthy(warn, stderr)
    t.is(warn!.level, 40)
    t.is(warn!.netnsDir, '/var/run/netns')
    t.is(lines.filter((l) => l.msg === 'stopped').length, 1, 'SIGTERM stops it cleanly')
  } finally {
    node.cleanup()
  }
})

test.serial('serve --socket-mode/--allow-uid: only root and the allowed uids are served', async (t) => {
  const node = new CniTestNode('tmca')
  const nobody = ['setpriv', '--reuid', '65534', '--regid', '65534', '--clear-groups', process.execPath, CLI_JS]
  const asNobody = (server: ServerProcess, args: string[]) => {
    const r = spawnSync(nobody[0], [...nobody.slice(1), ...args, ...server.sock, '--json'], { encoding: 'utf8', timeout: 30_000 })
    return { code: r.status, stderr: r.stderr }
  }
  let server: ServerProcess | undefined
  try {
    chmodSync(node.dir, 0o755) // the socket's dir must be reachable by the unprivileged client
    server = new ServerProcess(node, ['--socket-mode', '0666'])
    await server.start()
    t.is((statSync(server.socket).mode & 0o777).toString(8), '666')
    // nobody can connect (status) but is refused by the peer check
    t.is(asNobody(server, ['status']).code, 0)
    let r = asNobody(server, ['get', 'some-key'])
    t.is(r.code, 1)
    t.regex(r.stderr, /permission denied: peer uid 65534/)
    // root is served (an unknown key: the source's error, not a refusal)
    const rr = runCli(['get', 'some-key', ...server.sock])
    t.is(rr.code, 1)
    t.notRegex(rr.stderr, /permission denied/)
    t.deepEqual(await server.stop(), { code: 0, signal: null })

    server = new ServerProcess(node, ['--socket-mode', '0666', '--allow-uid', '65534'])
    await server.start()
    r = asNobody(server, ['get', 'some-key'])
    t.is(r.code, 1)
    t.notRegex(r.stderr, /permission denied/)
    t.regex(r.stderr, /some-key/)
    t.deepEqual(await server.stop(), { code: 0, signal: null })
  } finally {
    server?.cleanup()
    node.cleanup()
  }
})
