/**
 * Recovery at start runs with bounded concurrency: the real daemon (`tapmanager serve` in a test node netns,
 * Debian bridge + host-local) with many persisted live pods starts only a bounded number of threads while it
 * recovers them (each recover in flight holds a blocking-pool thread and a thread inside the pod netns; recovering
 * every pod at once used to start one pair per pod). The server's thread count is sampled from
 * /proc/<pid>/status as fast as this process can read it, from the spawn until the socket answers, and compared
 * with the same server idle after recovery. Recovery leaves the state records as they are (it used to rewrite each
 * one, two fsyncs per pod). Every pod is served again afterwards.
 */
import test from 'ava'
import { closeSync, readdirSync, readFileSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { CniTestNode } from './helpers/cni'
import { addPayload, killNetnsProcesses, removeNetns, ServerProcess } from './helpers/serve'
import { requirePrereqs } from './helpers/env'

const PODS = 30

function threadsOf(pid: number): number | null {
  try {
    const m = /^Threads:\s+(\d+)$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
    return m ? Number(m[1]) : null
  } catch {
    return null
  }
}

test.serial(`recovering ${PODS} live pods at start starts a bounded number of threads, and serves them all`, async (t) => {
  requirePrereqs(['/usr/lib/cni/bridge', '/usr/lib/cni/host-local', 'nsenter'])
  const node = new CniTestNode('tmrt')
  node.writeConf('10-bridge.conflist', node.bridgeConflist({ subnet: '10.73.0.0/24', bridge: 'tmrtbr0' }))
  const server = new ServerProcess(node)
  const pods = Array.from({ length: PODS }, () => node.podId('tmrtp'))
  try {
    await server.start()
    const client = server.client()
    for (let i = 0; i < pods.length; i += 8) {
      await Promise.all(pods.slice(i, i + 8).map((id, k) => client.addFDs(`k${i + k}`, addPayload(id))))
    }
    t.deepEqual(await server.stop(), { code: 0, signal: null })
    // Each state record as a file identity: recovery reads the records, it need not write them again.
    const records = () =>
      readdirSync(server.stateDir)
        .filter((f) => f.endsWith('.json'))
        .sort()
        .map((f) => {
          const st = statSync(join(server.stateDir, f))
          return `${f} ${st.ino} ${st.mtimeMs}`
        })
    const before = records()
    t.is(before.length, PODS)

    // Restart and sample the new process's threads until it serves (recovery runs before it listens).
    let peak = 0
    let samples = 0
    let running = false
    const started = server.start().then(() => (running = true))
    let pid: number | undefined
    while (!running) {
      pid ??= server.child?.pid
      const n = pid === undefined ? null : threadsOf(pid)
      if (n !== null) {
        peak = Math.max(peak, n)
        samples++
      }
      await new Promise((r) => setImmediate(r))
    }
    await started
    t.is(server.messages('recovered').length, PODS, 'every pod recovered')
    t.true(samples > 10, `sampled the threads during recovery (${samples} samples)`)
    t.deepEqual(records(), before, 'recovery left every state record as it was (no rewrite, no fsync)')

    // The same server, idle: its runtime threads and the blocking-pool threads recovery left (they linger).
    const idle = threadsOf(server.pid)!
    t.log(`threads: peak during recovery ${peak}, idle after ${idle}, ${samples} samples`)
    // Node's own threads (main, V8 platform, libuv pool, inspector...) and the native runtime's are ~15-20;
    // recovery adds at most 2 per pod in flight (DEFAULT_RECOVERY_CONCURRENCY = 8). Unbounded, 40 pods peaked at 67 threads.
    t.true(peak <= 40, `at most 40 threads while recovering ${PODS} pods (peak ${peak})`)

    // Every pod is served again (its tap reopened) and released cleanly.
    for (let i = 0; i < pods.length; i++) {
      const { fds } = await client.getFDs(`k${i}`)
      t.is(fds.length, 1)
      for (const fd of fds) closeSync(fd)
    }
    for (let i = 0; i < pods.length; i += 8) {
      await Promise.all(pods.slice(i, i + 8).map((_, k) => client.releaseFDs(`k${i + k}`)))
    }
    t.deepEqual(await server.stop(), { code: 0, signal: null })
  } finally {
    server.cleanup()
    killNetnsProcesses(node.name)
    for (const id of pods) removeNetns(id)
    node.cleanup()
  }
})
