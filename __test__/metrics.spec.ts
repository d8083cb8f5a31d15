/**
 * The Prometheus endpoint of `tapmanager serve --metrics-listen`, scraped during real work: the server runs in a
 * test node netns with the Debian bridge + host-local plugins; a stand-in VM takes a real udhcpc lease through
 * the pod's tap fd; requests (natively answered gets included), live pods, DHCP offers/acks, CNI plugin runs
 * and failures, refused peers and the recovery at a restart all move the counters they should.
 */
import test from 'ava'
import { spawnSync } from 'node:child_process'
import { chmodSync, closeSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { request } from 'node:http'
import { join } from 'node:path'
import { DaemonMetrics, parseMetricsAddress, startMetricsServer } from '../src/metrics'
import { parseFdInfo } from '../src/payloads'
import { CniTestNode } from './helpers/cni'
import { addPayload, CLI_JS, ensureDist, removeNetns, ServerProcess } from './helpers/serve'
import { FakeVm, run } from './helpers/tapfd'
import { requirePrereqs, TestNetns } from './helpers/env'

/** GET `path` over the metrics Unix socket: status and body. */
function httpGet(socketPath: string, path: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, path, method: 'GET' }, (res) => {
      let body = ''
      res.on('data', (d) => (body += d))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }))
    })
    req.on('error', reject)
    req.setTimeout(30_000, () => req.destroy(new Error('scrape timed out')))
    req.end()
  })
}

/** The samples of a Prometheus text exposition: `name{a="b",...}` (labels sorted) to value. */
function parseExposition(text: string): Map<string, number> {
  const out = new Map<string, number>()
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line)
    if (!m) throw new Error(`bad exposition line: ${line}`)
    const labels = m[2] ? [...m[2].matchAll(/([a-zA-Z_]+)="((?:[^"\\]|\\.)*)"/g)].map((l) => `${l[1]}="${l[2]}"`).sort() : []
    out.set(labels.length ? `${m[1]}{${labels.join(',')}}` : m[1], Number(m[3]))
  }
  return out
}

/** One sample's value (0 when absent); labels given in any order. */
function sample(m: Map<string, number>, name: string, labels: Record<string, string> = {}): number {
  const l = Object.entries(labels).map(([k, v]) => `${k}="${v}"`).sort()
  return m.get(l.length ? `${name}{${l.join(',')}}` : name) ?? 0
}

async function scrape(socketPath: string): Promise<Map<string, number>> {
  const r = await httpGet(socketPath, '/metrics')
  if (r.status !== 200) throw new Error(`/metrics answered ${r.status}: ${r.body}`)
  return parseExposition(r.body)
}

/** Scrapes until `cond` holds (bounded: 30 s); returns the last scrape. */
async function scrapeUntil(socketPath: string, cond: (m: Map<string, number>) => boolean): Promise<Map<string, number>> {
  const deadline = Date.now() + 30_000
  for (;;) {
    const m = await scrape(socketPath)
    if (cond(m) || Date.now() > deadline) return m
    await new Promise((r) => setTimeout(r, 50))
  }
}

test.serial('metrics move with a real add, DHCP lease, get (native fast path too), refused peer, restart and release', async (t) => {
  requirePrereqs(['busybox', 'setpriv', 'nsenter'])
  const node = new CniTestNode('tmmx')
  node.writeConf('10-bridge.conflist', node.bridgeConflist({ subnet: '10.73.0.0/24', bridge: 'tmmxbr0' }))
  const metricsSock = join(node.dir, 'metrics.sock')
  // 0666: an unprivileged peer can connect, so that the peer filter (root only) is what refuses it.
  const server = new ServerProcess(node, ['--metrics-listen', metricsSock, '--socket-mode', '0666'])
  const vm = new FakeVm()
  const podId = node.podId('tmmxp')
  const failPodId = node.podId('tmmxf')
  const key = 'metrics-vm-1'
  try {
    await server.start()
    t.deepEqual(await httpGet(metricsSock, '/readyz'), { status: 200, body: 'ready\n' })
    t.is((await httpGet(metricsSock, '/healthz')).status, 200)
    t.is((await httpGet(metricsSock, '/nope')).status, 404)
    let m = await scrape(metricsSock)
    t.is(sample(m, 'tapmanager_ready'), 1)
    t.is(sample(m, 'tapmanager_pods'), 0)
    t.is(sample(m, 'tapmanager_dhcp_acks_total'), 0)
    t.is(sample(m, 'tapmanager_connections_refused_total', { reason: 'peer_filter' }), 0)
    t.is(sample(m, 'tapmanager_connections_refused_total', { reason: 'caps' }), 0)
    t.true(sample(m, 'process_resident_memory_bytes') > 0)

    // add: one ok add, one pod, a bridge ADD (and host-local under it: one run of the bridge plugin).
    const client = server.client()
    await client.addFDs(key, addPayload(podId))
    m = await scrapeUntil(metricsSock, (s) => sample(s, 'tapmanager_requests_total', { command: 'add', outcome: 'ok' }) >= 1)
    t.is(sample(m, 'tapmanager_requests_total', { command: 'add', outcome: 'ok' }), 1)
    t.is(sample(m, 'tapmanager_request_duration_seconds_count', { command: 'add', outcome: 'ok' }), 1)
    t.true(sample(m, 'tapmanager_request_duration_seconds_sum', { command: 'add', outcome: 'ok' }) > 0)
    t.is(sample(m, 'tapmanager_pods'), 1)
    t.is(sample(m, 'tapmanager_cni_plugin_duration_seconds_count', { plugin: 'bridge', command: 'ADD' }), 1)

    // get (through TypeScript), then a real DHCP lease through the tap fd: OFFER and ACK counted.
    const first = await client.getFDs(key)
    const iface = parseFdInfo(first.info)[0]
    await vm.attach(first.fds[0], iface.mac!, 1500)
    for (const fd of first.fds) closeSync(fd)
    const lease = await run('ip', ['netns', 'exec', vm.ns.name, 'busybox', 'udhcpc', '-i', 'vm0', '-f', '-n', '-q', '-t', '5', '-T', '2', '-s', '/bin/true'])
    t.regex(lease.out + lease.err, /lease of 10\.73\.0\.\d+ obtained/, lease.out + lease.err)
    m = await scrape(metricsSock)
    t.true(sample(m, 'tapmanager_dhcp_offers_total') >= 1)
    t.true(sample(m, 'tapmanager_dhcp_acks_total') >= 1)
    t.is(sample(m, 'tapmanager_dhcp_naks_total'), 0)

    // Two more gets, answered natively now; they are reported a little after their responses.
    for (let i = 0; i < 2; i++) for (const fd of (await client.getFDs(key)).fds) closeSync(fd)
    m = await scrapeUntil(metricsSock, (s) => sample(s, 'tapmanager_requests_total', { command: 'get', outcome: 'ok' }) >= 3)
    t.is(sample(m, 'tapmanager_requests_total', { command: 'get', outcome: 'ok' }), 3)
    t.is(sample(m, 'tapmanager_request_duration_seconds_count', { command: 'get', outcome: 'ok' }), 3)
    t.is(server.messages('request').filter((l) => l.command === 'get').length, 3)

    // A peer the filter refuses (uid 65534; only root is allowed): the request fails and is counted. The node's
    // temp dir (0700) must let it reach the socket.
    chmodSync(node.dir, 0o711)
    const refused = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, CLI_JS, 'get', key, ...server.sock], {
      encoding: 'utf8',
      timeout: 60_000,
    })
    t.is(refused.status, 1, refused.stderr)
    t.regex(refused.stderr, /permission denied/)
    m = await scrape(metricsSock)
    t.is(sample(m, 'tapmanager_connections_refused_total', { reason: 'peer_filter' }), 1)
    // Refused natively, before any request is read: counted as a refusal, not as a request.
    t.is(sample(m, 'tapmanager_requests_total', { command: 'get', outcome: 'error' }), 0)

    // A failing CNI plugin (the tmtest plugin in fail mode, in a config read first): a failed add, a failure counted.
    const failConf = node.writeConf('00-fail.conflist', node.testConflist([{ mode: 'fail' }]))
    await t.throwsAsync(client.addFDs('metrics-fail', addPayload(failPodId)))
    rmSync(failConf)
    m = await scrapeUntil(metricsSock, (s) => sample(s, 'tapmanager_requests_total', { command: 'add', outcome: 'error' }) >= 1)
    t.is(sample(m, 'tapmanager_requests_total', { command: 'add', outcome: 'error' }), 1)
    t.is(sample(m, 'tapmanager_cni_plugin_failures_total', { plugin: 'tmtest', command: 'ADD', code: 'ERR_CNI' }), 1)
    t.is(sample(m, 'tapmanager_pods'), 1)

    // Restart: the new process recovers the pod and says so; its counters start again from 0.
    t.deepEqual(await server.stop('SIGTERM'), { code: 0, signal: null })
    await server.start()
    m = await scrape(metricsSock)
    t.is(sample(m, 'tapmanager_recovery_keys', { result: 'recovered' }), 1)
    t.is(sample(m, 'tapmanager_recovery_keys', { result: 'skipped' }), 0)
    t.is(sample(m, 'tapmanager_pods'), 1)
    t.is(sample(m, 'tapmanager_requests_total', { command: 'add', outcome: 'ok' }), 0)

    // release: no pod left, the bridge DEL counted; a DHCP server's counts outlive its stop.
    const vmLease2 = await run('ip', ['netns', 'exec', vm.ns.name, 'busybox', 'udhcpc', '-i', 'vm0', '-f', '-n', '-q', '-t', '5', '-T', '2', '-s', '/bin/true'])
    t.regex(vmLease2.out + vmLease2.err, /obtained/)
    await client.releaseFDs(key)
    // A request is counted when its response write has finished, which can be just after the client read it.
    m = await scrapeUntil(metricsSock, (s) => sample(s, 'tapmanager_requests_total', { command: 'release', outcome: 'ok' }) >= 1)
    t.is(sample(m, 'tapmanager_requests_total', { command: 'release', outcome: 'ok' }), 1)
    t.is(sample(m, 'tapmanager_pods'), 0)
    t.is(sample(m, 'tapmanager_cni_plugin_duration_seconds_count', { plugin: 'bridge', command: 'DEL' }), 1)
    t.true(sample(m, 'tapmanager_dhcp_acks_total') >= 1)

    // A clean stop removes the metrics socket too.
    t.deepEqual(await server.stop('SIGTERM'), { code: 0, signal: null })
    t.false(existsSync(metricsSock))
  } finally {
    vm.cleanup()
    server.cleanup()
    removeNetns(podId)
    removeNetns(failPodId)
    node.cleanup()
  }
})

test('--metrics-listen addresses: HOST:PORT, [IPV6]:PORT, :PORT, a path; anything else refused', (t) => {
  t.deepEqual(parseMetricsAddress('127.0.0.1:9731'), { host: '127.0.0.1', port: 9731 })
  t.deepEqual(parseMetricsAddress(':9731'), { host: '0.0.0.0', port: 9731 })
  t.deepEqual(parseMetricsAddress('[::1]:9731'), { host: '::1', port: 9731 })
  t.deepEqual(parseMetricsAddress('/run/tapmanager/metrics.sock'), { path: '/run/tapmanager/metrics.sock' })
  for (const bad of ['localhost', '127.0.0.1', '1.2.3.4:99999', '1.2.3.4:x', '']) {
    t.throws(() => parseMetricsAddress(bad), { code: 'ERR_INVALID' }, bad)
  }
})

test('the TCP endpoint, in a test netns: /metrics answers, /readyz and /healthz are 503 before the daemon started', async (t) => {
  // The endpoint runs in a child process inside a netns of ours, so nothing listens in the root netns.
  const ns = new TestNetns('tmmt')
  try {
    ensureDist()
    const script = `
      const { DaemonMetrics, startMetricsServer } = require(${JSON.stringify(join(process.cwd(), 'dist', 'metrics.js'))})
      const http = require('node:http')
      const get = (port, path) => new Promise((res, rej) => http.get({ host: '127.0.0.1', port, path }, (r) => {
        let b = ''; r.on('data', (d) => (b += d)); r.on('end', () => res({ status: r.statusCode, body: b, type: r.headers['content-type'] }))
      }).on('error', rej))
      ;(async () => {
        const srv = await startMetricsServer('127.0.0.1:0', new DaemonMetrics())
        const port = Number(srv.address.split(':').pop())
        const m = await get(port, '/metrics'), r = await get(port, '/readyz'), h = await get(port, '/healthz')
        await srv.close()
        console.log(JSON.stringify({ address: srv.address, metrics: m.status, type: m.type, hasReady: m.body.includes('tapmanager_ready 0'), readyz: r.status, healthz: h.status }))
      })().catch((e) => { console.error(e); process.exit(1) })`
    const r = spawnSync('ip', ['netns', 'exec', ns.name, process.execPath, '-e', script], { encoding: 'utf8', timeout: 60_000 })
    t.is(r.status, 0, r.stderr)
    const out = JSON.parse(r.stdout) as { address: string; metrics: number; type: string; hasReady: boolean; readyz: number; healthz: number }
    t.regex(out.address, /^127\.0\.0\.1:\d+$/)
    t.is(out.metrics, 200)
    t.regex(out.type, /^text\/plain; version=0\.0\.4/)
    t.true(out.hasReady)
    t.is(out.readyz, 503)
    t.is(out.healthz, 503)
  } finally {
    ns.cleanup()
  }
})

test('a stale metrics socket file is replaced; another kind of file is not', async (t) => {
  const dir = join(process.cwd(), '.tmp', `metrics-${process.pid}-${Math.random().toString(16).slice(2, 8)}`)
  mkdirSync(dir, { recursive: true })
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const sock = join(dir, 'm.sock')
  // A socket file nobody listens on, as a killed daemon leaves it.
  const stale = spawnSync(process.execPath, ['-e', `require('node:net').createServer().listen(${JSON.stringify(sock)}, () => process.exit(0))`])
  t.is(stale.status, 0)
  const srv = await startMetricsServer(sock, new DaemonMetrics())
  t.is((await httpGet(sock, '/metrics')).status, 200)
  await srv.close()
  const file = join(dir, 'plain')
  writeFileSync(file, 'x')
  await t.throwsAsync(startMetricsServer(file, new DaemonMetrics()), { code: 'EADDRINUSE' })
  t.is(readFileSync(file, 'utf8'), 'x')
})

test('DaemonMetrics logic: unknown commands share one label, DHCP counts outlive a stopped server, CNI failures by code', async (t) => {
  const m = new DaemonMetrics()
  m.onRequest({ key: 'k', command: 'get', durationMs: 0.2, outcome: 'ok' })
  m.onRequest({ key: '', command: '0x7f00ff01', durationMs: 0.1, outcome: 'error' })
  m.onRequest({ key: '', command: '0x00000009', durationMs: 0.1, outcome: 'error' })
  m.onRequest({ key: 'k', command: 'get', durationMs: 0.3, outcome: 'ok', dropped: 4 })
  m.onCniPluginRun({ plugin: 'bridge', command: 'ADD', durationMs: 80 })
  m.onCniPluginRun({ plugin: 'bridge', command: 'ADD', durationMs: 60_000, errorCode: 'ERR_TIMEOUT' })
  // Refusals and accept() errors are the native listener's totals, read at scrape time.
  m.onStarted({ server: { limits: () => ({ total: { refused: 1, overTotal: 1, overUid: 2, acceptErrors: 3 } }) }, source: { keys: () => [] } } as never)
  m.onRecovery({ recovered: ['a', 'b'], cleaned: ['c'], skipped: [{ key: 'd', reason: 'x' }], corrupt: [] })
  // A fake pod network whose DHCP server counts what the test says it answered.
  const counts = { offers: 2, acks: 1, naks: 1, ignored: 0, errors: 0 }
  let stopped = false
  const ops = m.wrapOps({
    startDhcpServer: async () => ({
      stop: async () => {
        stopped = true
      },
      stats: () => ({ ...counts }),
    }),
  } as never)
  const h = await ops.startDhcpServer('/ns', '{}')
  let s = parseExposition(await m.metrics())
  t.is(sample(s, 'tapmanager_dhcp_offers_total'), 2)
  counts.acks = 3
  await h.stop()
  t.true(stopped)
  counts.acks = 100 // a stopped server is no longer read: its last counts were kept
  s = parseExposition(await m.metrics())
  t.is(sample(s, 'tapmanager_requests_total', { command: 'get', outcome: 'ok' }), 2)
  t.is(sample(s, 'tapmanager_requests_total', { command: 'unknown', outcome: 'error' }), 2)
  t.is([...s.keys()].filter((k) => k.includes('0x')).length, 0)
  t.is(sample(s, 'tapmanager_fast_get_reports_dropped_total'), 4)
  t.is(sample(s, 'tapmanager_cni_plugin_duration_seconds_count', { plugin: 'bridge', command: 'ADD' }), 2)
  t.is(sample(s, 'tapmanager_cni_plugin_failures_total', { plugin: 'bridge', command: 'ADD', code: 'ERR_TIMEOUT' }), 1)
  t.is(sample(s, 'tapmanager_connections_refused_total', { reason: 'peer_filter' }), 1)
  t.is(sample(s, 'tapmanager_connections_refused_total', { reason: 'caps' }), 3)
  t.is(sample(s, 'tapmanager_accept_errors_total'), 3)
  t.is(sample(s, 'tapmanager_recovery_keys', { result: 'recovered' }), 2)
  t.is(sample(s, 'tapmanager_recovery_keys', { result: 'skipped' }), 1)
  t.is(sample(s, 'tapmanager_dhcp_offers_total'), 2)
  t.is(sample(s, 'tapmanager_dhcp_acks_total'), 3)
  t.is(sample(s, 'tapmanager_dhcp_naks_total'), 1)
  t.is(sample(s, 'tapmanager_ready'), 0)
})
