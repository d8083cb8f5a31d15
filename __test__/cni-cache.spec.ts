/** The CNI cache's files: atomic replacement (native replaceFile, no fsync), modes, no temp left, no symlink followed. */
import test from 'ava'
import { lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { CniCache, type CniCacheEntry } from '../src/cni/cache'

const entry = (containerId: string, result: CniCacheEntry['result'] = null): CniCacheEntry => ({
  kind: 'tapmanagerCniCacheV1',
  containerId,
  ifName: 'eth0',
  netns: `/var/run/netns/${containerId}`,
  podName: 'vm',
  podNs: 'default',
  config: { name: 'net', cniVersion: '1.0.0', disableCheck: false, plugins: [{ type: 'bridge' }] },
  result,
})

test('put creates the dir (0700, with its parents) and the entry (0600), replaces it, leaves no temp', async (t) => {
  const parent = mkdtempSync(join(tmpdir(), 'tmcnicache-'))
  try {
    const cache = new CniCache(join(parent, 'state', 'cni'))
    await cache.put(entry('p1'))
    t.is(statSync(cache.dir).mode & 0o777, 0o700)
    t.is(statSync(join(parent, 'state')).mode & 0o777, 0o700)
    t.is(statSync(cache.path('p1', 'eth0')).mode & 0o777, 0o600)
    t.is((await cache.get('p1', 'eth0'))!.result, null)
    await cache.put(entry('p1', { cniVersion: '1.0.0' }))
    t.deepEqual((await cache.get('p1', 'eth0'))!.result, { cniVersion: '1.0.0' })
    t.deepEqual(readdirSync(cache.dir), ['p1-eth0.json'])
    t.deepEqual(await cache.sweepTemps(), [])
  } finally {
    rmSync(parent, { recursive: true, force: true })
  }
})

test('a put that fails leaves no temp file; a symlink at the entry name is replaced, not followed', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'tmcnicache-'))
  try {
    const cache = new CniCache(dir)
    mkdirSync(cache.path('p1', 'eth0'))
    writeFileSync(join(cache.path('p1', 'eth0'), 'inside'), 'x')
    await t.throwsAsync(cache.put(entry('p1')), { message: /^rename .*\/p1-eth0\.json\.\d+\.[0-9a-z]*\.tmp to p1-eth0\.json: / })
    t.deepEqual(readdirSync(dir), ['p1-eth0.json'], 'no temp file left')

    const victim = join(dir, 'victim')
    writeFileSync(victim, 'keep')
    symlinkSync(victim, cache.path('p2', 'eth0'))
    t.is(await cache.get('p2', 'eth0'), undefined, 'a symlink reads as absent')
    await cache.put(entry('p2'))
    t.true(lstatSync(cache.path('p2', 'eth0')).isFile())
    t.is((await cache.get('p2', 'eth0'))!.containerId, 'p2')
    t.is(readFileSync(victim, 'utf8'), 'keep')
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})
