import test from 'ava'
import { spawnSync } from 'node:child_process'
import { mkdtempSync, openSync, readlinkSync, rmSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import {
  createRequestLogger,
  EXIT_NOT_RUNNING,
  EXIT_OK,
  EXIT_SERVER_ERROR,
  EXIT_USAGE,
  runCli,
  type CliClient,
  type CliDeps,
  type ServeOptions,
} from '../src/cli'
import { StateStore } from '../src/state'
import { FDServer, FDClient, ServerError } from '../src/index'
import { validateKey } from '../src/protocol'
import { FileFDSource } from '../examples/file-fd-source'

interface Run {
  code: number
  stdout: string
  stderr: string
  clientCalls: string[]
}

/** Runs the command line in-process with captured output and an optional client stand-in. */
async function run(argv: string[], deps: Omit<CliDeps, 'io'> & { files?: Record<string, string> } = {}): Promise<Run> {
  let stdout = ''
  let stderr = ''
  const clientCalls: string[] = []
  const { files, createClient, ...rest } = deps
  const code = await runCli(argv, {
    env: {},
    ...rest,
    createClient: createClient
      ? (path) => {
          clientCalls.push(`connect ${path}`)
          return createClient(path)
        }
      : undefined,
    io: {
      stdout: (t) => (stdout += t),
      stderr: (t) => (stderr += t),
      readFile: (p) => {
        if (files && p in files) return files[p]
        throw new Error(`ENOENT: no such file '${p}'`)
      },
    },
  })
  return { code, stdout, stderr, clientCalls }
}

const tmp = () => mkdtempSync(join(tmpdir(), 'tmcli-'))
const CSN = {
  Result: {
    interfaces: [{ name: 'eth0', mac: '42:a4:a6:22:80:2e', sandbox: '/var/run/netns/p1' }],
    ips: [{ version: '4', address: '10.1.90.5/24', gateway: '10.1.90.1' }],
    routes: [{ dst: '0.0.0.0/0', gw: '10.1.90.1' }],
    dns: {},
  },
  NsPath: '/var/run/netns/p1',
  Interfaces: [{ Type: 0, Name: 'eth0', HardwareAddr: 'QqSmIoAu', PCIAddress: '', MTU: 1500, VlanID: 0 }],
}

/**
 * What an fd of this process points at (null when closed). Tests of received-fd closing check this instead of
 * closing the fd number again: tests in this file run concurrently, so a closed number may already belong to
 * another test's file or socket.
 */
function fdTarget(fd: number): string | null {
  try {
    return readlinkSync(`/proc/self/fd/${fd}`)
  } catch {
    return null
  }
}

/** A client stand-in that records calls (for output formatting and argument plumbing). */
function fakeClient(calls: unknown[], over: Partial<CliClient> = {}): () => CliClient {
  return () => ({
    isRunning: async () => true,
    addFDs: async (key, data) => {
      calls.push(['add', key, data])
      return Buffer.from(JSON.stringify(CSN))
    },
    getFDs: async (key) => {
      calls.push(['get', key])
      return { fds: [], info: Buffer.from('[{"type":0,"mac":"QqSmIoAu","fdIndex":0,"pciAddress":""}]') }
    },
    releaseFDs: async (key) => {
      calls.push(['release', key])
    },
    recover: async (key, data) => {
      calls.push(['recover', key, data])
    },
    ...over,
  })
}

test('usage errors exit 2 with a clear message and never connect', async (t) => {
  const cases: Array<[string[], RegExp]> = [
    [[], /missing command/],
    [['frobnicate'], /unknown command "frobnicate"/],
    [['status', '--bogus'], /Unknown option '--bogus'/],
    [['ls', '--pod-id', 'x'], /--pod-id does not apply to ls/],
    [['status', 'extra'], /status takes no arguments/],
    [['add', '--pod-id', 'a', '--pod-name', 'b', '--pod-ns', 'c'], /add needs a KEY/],
    [['add', 'k', '--pod-name', 'b', '--pod-ns', 'c'], /add needs --pod-id/],
    [['add', 'k', '--pod-id', 'a', '--pod-name', 'b', '--pod-ns', 'c', '--dns', '{bad'], /--dns: bad JSON/],
    [['add', 'k', 'k2', '--pod-id', 'a', '--pod-name', 'b', '--pod-ns', 'c'], /takes one KEY/],
    [['get', 'x'.repeat(65)], /at most 64/],
    [['get', 'k '], /whitespace/],
    [['get', ''], /KEY: fd key is empty/],
    [['get', 'k', '--exec'], /get --exec needs -- CMD/],
    [['release', 'k', '--', 'echo'], /only for get --exec/],
    [['recover', 'k'], /recover needs --from/],
    [['recover', 'k', '--from', 'bad.json'], /bad.json: bad JSON/],
    [['recover', 'k', '--from', 'nocsn.json'], /no csn/],
    [['serve', '--socket-mode', '999'], /--socket-mode must be octal/],
    [['serve', '--log-level', 'loud'], /--log-level must be one of/],
    [['serve', '--allow-uid', '1000,x'], /--allow-uid: "x" is not an id \(an integer from 0 to 4294967295\)/],
    // uids/gids are u32: 4294967297 would wrap to 1 in the native filter
    [['serve', '--allow-uid', '4294967297'], /--allow-uid: "4294967297" is not an id/],
    [['serve', '--allow-gid', '4294967296'], /--allow-gid: "4294967296" is not an id/],
    [['serve', '--allow-uid=-1'], /--allow-uid: "-1" is not an id/],
    [['serve', '--allow-gid', '1.5'], /--allow-gid: "1.5" is not an id/],
    [['serve', '--allow-uid', '1e3'], /--allow-uid: "1e3" is not an id/],
    [['serve', '--calico-subnet-size', '33'], /--calico-subnet-size must be an integer from 1 to 32/],
    [['status', '--socket'], /argument missing/],
  ]
  const files = { 'bad.json': '{', 'nocsn.json': '{"podNetworkDesc":{"podId":"p"}}' }
  for (const [argv, re] of cases) {
    const calls: unknown[] = []
    const r = await run(argv, { files, createClient: fakeClient(calls), startServer: async () => t.fail('started') as never })
    t.is(r.code, EXIT_USAGE, argv.join(' '))
    t.regex(r.stderr, re, argv.join(' '))
    t.regex(r.stderr, /tapmanager --help/)
    t.deepEqual(r.clientCalls, [], `${argv.join(' ')}: no connection`)
    t.is(r.stdout, '')
  }
})

test('KEY is checked by the protocol one key rule: the command line refuses exactly the keys the client refuses', async (t) => {
  const keys = ['k', 'ключ', 'pod/1 a', '\x01k', 'x'.repeat(64), 'й'.repeat(32), 'й'.repeat(33), 'x'.repeat(65), ' k', 'k\u00a0', '\u3000k', '']
  for (const key of keys) {
    let clientErr: string | undefined
    try {
      validateKey(key)
    } catch (err) {
      clientErr = (err as Error).message
    }
    const calls: unknown[] = []
    const r = await run(['release', key], { createClient: fakeClient(calls) })
    if (clientErr === undefined) {
      t.is(r.code, EXIT_OK, `${JSON.stringify(key)}: ${r.stderr}`)
      t.deepEqual(calls, [['release', key]])
    } else {
      t.is(r.code, EXIT_USAGE, JSON.stringify(key))
      t.is(r.stderr.split('\n')[0], `tapmanager: KEY: ${clientErr}`)
      t.deepEqual(calls, [])
    }
  }
})

test('--json usage errors are one JSON document with the code', async (t) => {
  const r = await run(['get', '--json'])
  t.is(r.code, EXIT_USAGE)
  t.deepEqual(JSON.parse(r.stderr), { error: { code: 'ERR_USAGE', message: 'get needs a KEY' }, exitCode: 2 })
})

test('--help prints usage and exits 0', async (t) => {
  const r = await run(['--help'])
  t.is(r.code, EXIT_OK)
  for (const cmd of ['serve', 'add KEY', 'get KEY', 'release KEY', 'recover KEY', 'ls', 'status', '--socket', '--json']) {
    t.true(r.stdout.includes(cmd), cmd)
  }
})

test('not running: every client command exits 3 for a missing socket and for a socket nobody listens on', async (t) => {
  const dir = tmp()
  try {
    const missing = join(dir, 'missing.sock')
    const dead = join(dir, 'dead.sock')
    // A bound socket file without a listener: connect() gets ECONNREFUSED.
    const py = spawnSync('/usr/bin/python3', ['-c', 'import socket,sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])', dead])
    t.is(py.status, 0, py.stderr?.toString())
    const recoverFile = join(dir, 'rec.json')
    writeFileSync(recoverFile, JSON.stringify({ podNetworkDesc: { podId: 'p' }, csn: CSN }))
    for (const sock of [missing, dead]) {
      const cmds = [
        ['status'],
        ['add', 'k', '--pod-id', 'p', '--pod-name', 'n', '--pod-ns', 'default'],
        ['get', 'k'],
        ['get', 'k', '--qemu-args'],
        ['release', 'k'],
        ['recover', 'k', '--from', recoverFile],
      ]
      for (const argv of cmds) {
        // The not-running message is on stderr, and only there, for every command (status included).
        let stdout = ''
        let stderr = ''
        const r = await runCli([...argv, '--socket', sock], {
          env: {},
          io: { stdout: (s) => (stdout += s), stderr: (s) => (stderr += s), readFile: (p) => (p === recoverFile ? JSON.stringify({ podNetworkDesc: { podId: 'p' }, csn: CSN }) : '') },
        })
        t.is(r, EXIT_NOT_RUNNING, `${argv.join(' ')} at ${sock}`)
        t.is(stderr, `tapmanager: the server is not running at ${sock}\n`, argv.join(' '))
        t.is(stdout, '', argv.join(' '))
      }
    }
    // $TAPMANAGER_SOCKET is used when --socket is not given.
    let out = ''
    const code = await runCli(['status', '--json'], { env: { TAPMANAGER_SOCKET: missing }, io: { stdout: (s) => (out += s), stderr: () => {} } })
    t.is(code, EXIT_NOT_RUNNING)
    t.deepEqual(JSON.parse(out), { running: false, socket: missing })
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})

test('status exits 0 when something listens on the socket', async (t) => {
  const dir = tmp()
  const sock = join(dir, 's.sock')
  const server = createServer((c) => c.destroy())
  await new Promise<void>((resolve) => server.listen(sock, resolve))
  try {
    let out = ''
    const code = await runCli(['status', '--socket', sock], { env: {}, io: { stdout: (s) => (out += s), stderr: () => {} } })
    t.is(code, EXIT_OK)
    t.is(out, `tapmanager is running at ${sock}\n`)
  } finally {
    await new Promise((resolve) => server.close(resolve))
    rmSync(dir, { recursive: true, force: true })
  }
})

test('add sends Virtlet\'s GetFDPayload (DNS from flags) and prints the ContainerSideNetwork', async (t) => {
  const calls: unknown[] = []
  const r = await run(
    ['add', 'pod-1', '--pod-id', 'p1', '--pod-name', 'vm1', '--pod-ns', 'default', '--dns', '10.96.0.10,10.96.0.11', '--dns-search', 'svc.cluster.local', '--dns-option', 'ndots:5', '--socket', '/s'],
    { createClient: fakeClient(calls) },
  )
  t.is(r.code, EXIT_OK, r.stderr)
  t.deepEqual(r.clientCalls, ['connect /s'])
  t.deepEqual(calls, [
    ['add', 'pod-1', { podNetworkDesc: { podId: 'p1', podNs: 'default', podName: 'vm1', DNS: { nameservers: ['10.96.0.10', '10.96.0.11'], search: ['svc.cluster.local'], options: ['ndots:5'] } } }],
  ])
  t.is(JSON.stringify((calls[0] as unknown[])[2]), '{"podNetworkDesc":{"podId":"p1","podNs":"default","podName":"vm1","DNS":{"nameservers":["10.96.0.10","10.96.0.11"],"search":["svc.cluster.local"],"options":["ndots:5"]}}}')
  t.is(r.stdout, 'added pod-1\n  eth0 tap 42:a4:a6:22:80:2e 10.1.90.5/24 via 10.1.90.1 mtu 1500\n')

  calls.length = 0
  const j = await run(['add', 'pod-2', '--pod-id', 'p2', '--pod-name', 'vm2', '--pod-ns', 'ns', '--json'], { createClient: fakeClient(calls) })
  t.deepEqual(calls, [['add', 'pod-2', { podNetworkDesc: { podId: 'p2', podNs: 'ns', podName: 'vm2', DNS: null } }]])
  t.deepEqual(JSON.parse(j.stdout), { key: 'pod-2', csn: CSN })
})

test('get prints descriptions, --qemu-args the vmwrapper arguments, --json both forms', async (t) => {
  const calls: unknown[] = []
  const plain = await run(['get', 'pod-1'], { createClient: fakeClient(calls) })
  t.is(plain.code, EXIT_OK)
  t.is(plain.stdout, 'pod-1: 1 interface(s), 0 fd(s)\n  0 tap fd 0 42:a4:a6:22:80:2e\n')
  const info = Buffer.from('[{"type":0,"mac":"QqSmIoAu","fdIndex":0,"pciAddress":""},{"type":1,"mac":"QqSmIoAv","fdIndex":0,"pciAddress":"0000:03:10.2"}]')
  const dir = tmp()
  const fdFile = join(dir, 'f')
  writeFileSync(fdFile, '')
  try {
    const fd = openSync(fdFile, 'r')
    const q = await run(['get', 'pod-1', '--qemu-args'], { createClient: fakeClient(calls, { getFDs: async () => ({ fds: [fd], info }) }) })
    t.is(q.code, EXIT_OK)
    t.is(q.stdout, '-netdev tap,id=tap0,fd=3 -device virtio-net-pci,netdev=tap0,id=net0,mac=42:a4:a6:22:80:2e -device vfio-pci,host=03:10.2,id=hostdev0\n')
    t.not(fdTarget(fd), fdFile, 'the received fds are closed after printing')

    const fd2 = openSync(fdFile, 'r')
    const j = await run(['get', 'pod-1', '--json'], { createClient: fakeClient(calls, { getFDs: async () => ({ fds: [fd2], info }) }) })
    t.deepEqual(JSON.parse(j.stdout), {
      key: 'pod-1',
      fds: 1,
      interfaces: [
        { type: 0, mac: '42:a4:a6:22:80:2e', fdIndex: 0, pciAddress: '' },
        { type: 1, mac: '42:a4:a6:22:80:2f', fdIndex: 0, pciAddress: '0000:03:10.2' },
      ],
    })
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})

test('get --exec runs the command with the fds from 3 on (plus --qemu-args) and exits with its code', async (t) => {
  const dir = tmp()
  const fdFile = join(dir, 'tapstand-in')
  writeFileSync(fdFile, '')
  const outFile = join(dir, 'out')
  try {
    const fd = openSync(fdFile, 'r')
    const info = Buffer.from('[{"type":0,"mac":"QqSmIoAu","fdIndex":0,"pciAddress":""}]')
    const r = await run(['get', 'pod-1', '--qemu-args', '--exec', '--', 'sh', '-c', `{ readlink /proc/self/fd/3; echo "$@"; } > ${outFile}; exit 7`, 'sh'], {
      createClient: fakeClient([], { getFDs: async () => ({ fds: [fd], info }) }),
    })
    t.is(r.code, 7)
    const { readFileSync } = await import('node:fs')
    t.is(readFileSync(outFile, 'utf8'), `${fdFile}\n-netdev tap,id=tap0,fd=3 -device virtio-net-pci,netdev=tap0,id=net0,mac=42:a4:a6:22:80:2e\n`)
    t.not(fdTarget(fd), fdFile, 'the parent closed its copy')
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})

test('release and recover call the client; recover takes a RecoverPayload or a state record', async (t) => {
  const calls: unknown[] = []
  const rel = await run(['release', 'pod-1'], { createClient: fakeClient(calls) })
  t.is(rel.code, EXIT_OK)
  t.is(rel.stdout, 'released pod-1\n')
  const record = { version: 1, key: 'pod-1', status: 'ready', podNetworkDesc: { podId: 'p1' }, csn: CSN, updatedAt: 'x' }
  const rec = await run(['recover', 'pod-1', '--from', 'state.json', '--json'], { createClient: fakeClient(calls), files: { 'state.json': JSON.stringify(record) } })
  t.is(rec.code, EXIT_OK, rec.stderr)
  t.deepEqual(JSON.parse(rec.stdout), { key: 'pod-1', recovered: true })
  t.deepEqual(calls, [['release', 'pod-1'], ['recover', 'pod-1', { podNetworkDesc: { podId: 'p1' }, csn: CSN, HaveRunningContainers: false }]])
})

test('a server error exits 1 with its message', async (t) => {
  const r = await run(['get', 'nope'], {
    createClient: fakeClient([], { getFDs: async () => Promise.reject(new Error('server returned error: bad fd key: "nope"')) }),
  })
  t.is(r.code, EXIT_SERVER_ERROR)
  t.is(r.stderr, 'tapmanager: server returned error: bad fd key: "nope"\n')
})

test('ls lists keys with pod and state from the state dir, corrupt files included', async (t) => {
  const dir = tmp()
  try {
    const store = new StateStore(dir)
    await store.write({ key: 'pod/b', status: 'adding', podNetworkDesc: { podId: 'id-b', podNs: 'ns1', podName: 'vm-b' } })
    await store.write({ key: 'a', status: 'ready', podNetworkDesc: { podId: 'id-a', podNs: 'default', podName: 'vm-a' }, csn: CSN })
    writeFileSync(join(dir, 'torn.json'), '{')
    const r = await run(['ls', '--state-dir', dir])
    t.is(r.code, EXIT_OK)
    const lines = r.stdout.trim().split('\n')
    t.deepEqual(lines.slice(0, 3), ['KEY\tPOD\tPOD ID\tSTATE', 'a\tdefault/vm-a\tid-a\tready', 'pod/b\tns1/vm-b\tid-b\tadding'])
    t.regex(lines[3], /^torn\t-\t-\tcorrupt \(corrupt state file torn\.json: bad JSON/)
    const j = JSON.parse((await run(['ls', '--state-dir', dir, '--json'])).stdout)
    t.deepEqual(j.keys.map((k: { key: string; state: string; podName: string }) => [k.key, k.podName, k.state]), [['a', 'vm-a', 'ready'], ['pod/b', 'vm-b', 'adding']])
    t.is(j.corrupt[0].file, 'torn.json')
    const empty = await run(['ls', '--state-dir', join(dir, 'missing')])
    t.is(empty.code, EXIT_OK)
    t.is(empty.stdout, `no keys in ${join(dir, 'missing')}\n`)
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})

test('serve passes every flag (and the defaults) to startServer and closes it on the stop signal', async (t) => {
  const seen: ServeOptions[] = []
  let closed = 0
  const deps = {
    startServer: async (o: ServeOptions) => {
      seen.push(o)
      return { close: async () => void closed++ }
    },
    stopSignal: async () => 'SIGTERM',
    logDestination: new Writable({ write: (_c, _e, cb) => cb() }),
  }
  const d = await run(['serve'], deps)
  t.is(d.code, EXIT_OK, d.stderr)
  const { log, ...defaults } = seen[0]
  t.is(typeof log.time, 'function')
  t.deepEqual(defaults, {
    socketPath: '/run/tapmanager/tapmanager.sock',
    socketMode: 0o660,
    socketGroup: null,
    allowedUids: [],
    allowedGids: [],
    cniConfigDir: '/etc/cni/net.d',
    cniPluginDirs: ['/opt/cni/bin', '/usr/lib/cni'],
    netnsDir: '/var/run/netns',
    stateDir: '/var/lib/tapmanager',
    calicoSubnetSize: 24,
    sriov: false,
    podIpv6: false,
    netnsPool: 2,
    spinUs: 50,
    logLevel: 'info',
    maxDataSize: 65536,
    cniTimeoutMs: 60000,
    metricsListen: null,
    maxConnections: null,
    maxConnectionsPerUid: null,
  })
  const f = await run(
    ['serve', '--socket', '/tmp/x.sock', '--socket-mode', '0600', '--socket-group', 'kvm', '--allow-uid', '0,1000', '--allow-uid', '107', '--allow-gid', '36',
      '--cni-conf-dir', '/c', '--cni-bin-dir', '/b1', '--cni-bin-dir', '/b2', '--netns-dir', '/n', '--state-dir', '/s', '--calico-subnet-size', '26', '--sriov', '--pod-ipv6', '--netns-pool', '0', '--spin-us', '0',
      '--log-level', 'silent', '--max-data-size', '4096', '--cni-timeout', '5000', '--metrics-listen', '127.0.0.1:9731', '--max-connections', '100', '--max-connections-per-uid', '10'],
    deps,
  )
  t.is(f.code, EXIT_OK, f.stderr)
  const { log: _l, ...flags } = seen[1]
  t.deepEqual(flags, {
    socketPath: '/tmp/x.sock',
    socketMode: 0o600,
    socketGroup: 'kvm',
    allowedUids: [0, 1000, 107],
    allowedGids: [36],
    cniConfigDir: '/c',
    cniPluginDirs: ['/b1', '/b2'],
    netnsDir: '/n',
    stateDir: '/s',
    calicoSubnetSize: 26,
    sriov: true,
    podIpv6: true,
    netnsPool: 0,
    spinUs: 0,
    logLevel: 'silent',
    maxDataSize: 4096,
    cniTimeoutMs: 5000,
    metricsListen: '127.0.0.1:9731',
    maxConnections: 100,
    maxConnectionsPerUid: 10,
  })
  t.is(closed, 2)
  // A metrics address that is neither HOST:PORT nor a path is a usage error (exit 2), before anything starts.
  const badMetrics = await run(['serve', '--metrics-listen', 'localhost', '--log-level', 'silent'], deps)
  t.is(badMetrics.code, EXIT_USAGE, badMetrics.stderr)
  t.regex(badMetrics.stderr, /--metrics-listen/)
  t.is(seen.length, 2)
  const failing = await run(['serve', '--log-level', 'silent'], { startServer: async () => Promise.reject(new Error('EADDRINUSE')) })
  t.is(failing.code, EXIT_SERVER_ERROR)
})

test('serve never exits 0 silently: a server that stops serving by itself makes serve log it and exit 1', async (t) => {
  const lines: Record<string, unknown>[] = []
  let closed = 0
  const r = await run(['serve'], {
    startServer: async () => ({ close: async () => void closed++, failed: Promise.resolve(new Error('accept loop ended')) }),
    stopSignal: () => new Promise(() => {}), // no signal ever comes
    logDestination: new Writable({
      write: (c, _e, cb) => {
        for (const l of c.toString().split('\n').filter(Boolean)) lines.push(JSON.parse(l))
        cb()
      },
    }),
  })
  t.is(r.code, EXIT_SERVER_ERROR)
  t.is(closed, 1)
  t.true(lines.some((l) => l.level === 50 && l.err === 'accept loop ended'), JSON.stringify(lines))
})

test('ls asks the running server (keys held, keys skipped at recovery and why); without one it says it reads the state dir', async (t) => {
  const dir = tmp()
  const sock = join(dir, 'fd.sock')
  const server = new FDServer(sock, new FileFDSource(join(dir, 'files')), {
    listInfo: () => ({ skipped: [{ key: 'lost', reason: 'netns /x: not a netns mount' }] }),
  })
  await server.serve()
  try {
    const store = new StateStore(join(dir, 'state'))
    // The state dir says "ready" for a key the server does not serve: ls must show the server's view.
    await store.write({ key: 'lost', status: 'ready', podNetworkDesc: { podId: 'id-l', podNs: 'ns', podName: 'vm-l' }, csn: CSN })
    const client = new FDClient(sock)
    await client.addFDs('a', { contents: ['x'] })
    const r = await run(['ls', '--socket', sock, '--state-dir', join(dir, 'state')], { createClient: (p) => new FDClient(p) })
    t.is(r.code, EXIT_OK, r.stderr)
    t.is(r.stdout, `from the server at ${sock}\nKEY\tSTATE\na\tready\nlost\tskipped at recovery: netns /x: not a netns mount\n`)
    t.is(r.stderr, '')
    // The command line's own client (the addon loaded lazily) asks the server too.
    const own = await run(['ls', '--socket', sock, '--state-dir', join(dir, 'state')])
    t.is(own.stdout, r.stdout, own.stderr)
    const j = JSON.parse((await run(['ls', '--socket', sock, '--json'], { createClient: (p) => new FDClient(p) })).stdout)
    t.is(j.source, 'server')
    t.deepEqual(j.keys, [{ key: 'a', state: 'ready' }])
    t.deepEqual(j.skipped, [{ key: 'lost', reason: 'netns /x: not a netns mount' }])
    // A server without the list command (Virtlet's answers "bad command"): falls back, and says so.
    const goLike = await run(['ls', '--socket', sock, '--state-dir', join(dir, 'state')], {
      createClient: fakeClient([], { list: async () => Promise.reject(new ServerError('bad command')) }),
    })
    t.is(goLike.code, EXIT_OK)
    t.regex(goLike.stderr, /the server does not support list: reading the state dir/)
    t.regex(goLike.stdout, /^KEY\tPOD\tPOD ID\tSTATE\nlost\tns\/vm-l\tid-l\tready/)
    await server.stop()
    // No server at all.
    const none = await run(['ls', '--socket', sock, '--state-dir', join(dir, 'state'), '--json'], { createClient: (p) => new FDClient(p) })
    const nj = JSON.parse(none.stdout)
    t.is(nj.source, 'state-dir')
    t.regex(nj.fallbackReason, /no server at/)
  } finally {
    await server.stop()
    rmSync(dir, { recursive: true, force: true })
  }
})

test('createRequestLogger writes one JSON line per request: key, command, duration, outcome', async (t) => {
  const lines: Record<string, unknown>[] = []
  const dest = new Writable({
    write(chunk, _enc, cb) {
      for (const l of chunk.toString().split('\n').filter(Boolean)) lines.push(JSON.parse(l))
      cb()
    },
  })
  const log = createRequestLogger('info', dest)
  t.is(await log.time('add', 'pod-1', async () => 42, () => ({ fds: 1 })), 42)
  const boom = Object.assign(new Error('bad fd key: "x"'), { code: 'ERR_NOT_FOUND' })
  await t.throwsAsync(log.time('get', 'x', async () => Promise.reject(boom)), { is: boom })
  await new Promise((resolve) => setImmediate(resolve))
  t.is(lines.length, 2)
  t.like(lines[0], { level: 30, key: 'pod-1', command: 'add', outcome: 'ok', fds: 1, msg: 'request' })
  t.like(lines[1], { level: 40, key: 'x', command: 'get', outcome: 'error', code: 'ERR_NOT_FOUND', error: 'bad fd key: "x"' })
  for (const l of lines) t.true(typeof l.durationMs === 'number' && (l.durationMs as number) >= 0)
  t.throws(() => createRequestLogger('loud' as 'info', dest), { message: /unknown log level/ })
})

test('the executable: exit codes 0, 2 and 3 from a real process', (t) => {
  const dir = tmp()
  try {
    const exe = (args: string[]) =>
      spawnSync(process.execPath, ['--import', '@oxc-node/core/register', '--input-type=module', '-e', `import { main } from ${JSON.stringify(join(process.cwd(), 'src/cli.ts'))}; await main(process.argv.slice(1))`, "--", ...args], {
        encoding: 'utf8',
        env: { ...process.env, OXC_TSCONFIG_PATH: './__test__/tsconfig.json', TAPMANAGER_SOCKET: join(dir, 'none.sock') },
        timeout: 60_000,
      })
    const help = exe(['--help'])
    t.is(help.status, 0, help.stderr)
    t.regex(help.stdout, /^Usage: tapmanager/)
    const usage = exe(['nope'])
    t.is(usage.status, 2)
    t.regex(usage.stderr, /unknown command "nope"/)
    const down = exe(['status'])
    t.is(down.status, 3)
    t.is(down.stdout, '')
    t.is(down.stderr, `tapmanager: the server is not running at ${join(dir, 'none.sock')}\n`)
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})
