import test from 'ava'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { CniError, loadNetworkConfig, parseNetworkConfig } from '../src/index'

function withDir(files: Record<string, string>, fn: (dir: string) => Promise<void>): () => Promise<void> {
  return async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tapmanager-cniconf-'))
    try {
      for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text)
      await fn(dir)
    } finally {
      rmSync(dir, { recursive: true, force: true })
    }
  }
}

const conflist = (name: string) => JSON.stringify({ cniVersion: '1.0.0', name, plugins: [{ type: 'bridge', bridge: 'b' }, { type: 'portmap' }] })

test('the first valid file by name wins; invalid ones before it are skipped with their reason', async (t) => {
  await withDir(
    {
      '00-broken.conf': '{"cniVersion":',
      '05-notype.conf': '{"cniVersion":"0.4.0","name":"n"}',
      '07-oldversion.conf': '{"cniVersion":"0.2.0","name":"n","type":"bridge"}',
      '08-emptylist.conflist': '{"cniVersion":"0.4.0","name":"n","plugins":[]}',
      '09-badname.json': '{"cniVersion":"0.4.0","name":"a b","type":"x"}',
      '10-readme.txt': 'not a config',
      '20-good.conflist': conflist('good'),
      '30-later.conf': '{"cniVersion":"0.4.0","name":"later","type":"bridge"}',
    },
    async (dir) => {
      const { config, skipped } = await loadNetworkConfig(dir)
      t.is(config.name, 'good')
      t.is(config.cniVersion, '1.0.0')
      t.deepEqual(config.plugins.map((p) => p.type), ['bridge', 'portmap'])
      t.deepEqual(config.plugins[0].raw, { type: 'bridge', bridge: 'b' })
      t.deepEqual(
        skipped.map((s) => s.file.slice(dir.length + 1)),
        ['00-broken.conf', '05-notype.conf', '07-oldversion.conf', '08-emptylist.conflist', '09-badname.json'],
      )
      t.regex(skipped[0].reason, /invalid JSON/)
      t.regex(skipped[1].reason, /missing or invalid "type"/)
      t.regex(skipped[2].reason, /unsupported "cniVersion" "0.2.0"/)
      t.regex(skipped[3].reason, /"plugins" must be a non-empty array/)
      t.regex(skipped[4].reason, /invalid "name"/)
    },
  )()
})

test('a .conf (and .json) becomes a one-plugin list with the whole file as the plugin config', async (t) => {
  await withDir({ '10-one.json': '{"cniVersion":"0.3.1","name":"one","type":"ptp","ipam":{"type":"host-local"}}' }, async (dir) => {
    const { config } = await loadNetworkConfig(dir)
    t.is(config.name, 'one')
    t.is(config.plugins.length, 1)
    t.is(config.plugins[0].type, 'ptp')
    t.deepEqual(config.plugins[0].raw, { cniVersion: '0.3.1', name: 'one', type: 'ptp', ipam: { type: 'host-local' } })
    t.false(config.disableCheck)
  })()
})

test('no valid config: a CniError listing every skipped file', async (t) => {
  await withDir({ 'a.conf': '[]', 'b.conflist': '{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"../../bin/sh"}]}' }, async (dir) => {
    const err = await t.throwsAsync(loadNetworkConfig(dir), { instanceOf: CniError })
    t.is(err?.code, 'ERR_NOT_FOUND')
    t.regex(err?.message ?? '', /a\.conf: not a JSON object/)
    t.regex(err?.message ?? '', /b\.conflist: plugins\[0\] has a missing or invalid "type"/)
  })()
  await withDir({}, async (dir) => {
    const err = await t.throwsAsync(loadNetworkConfig(dir), { instanceOf: CniError })
    t.regex(err?.message ?? '', /no valid CNI network config/)
  })()
  const err = await t.throwsAsync(loadNetworkConfig('/nonexistent/cni/net.d'), { instanceOf: CniError })
  t.is(err?.code, 'ERR_NOT_FOUND')
  t.regex(err?.message ?? '', /cannot read the CNI config dir/)
})

test('parseNetworkConfig reads disableCheck and rejects a bad one', (t) => {
  t.true(parseNetworkConfig(JSON.stringify({ cniVersion: '1.0.0', name: 'n', disableCheck: true, plugins: [{ type: 'x' }] }), 'conflist').disableCheck)
  t.throws(() => parseNetworkConfig(JSON.stringify({ cniVersion: '1.0.0', name: 'n', disableCheck: 'yes', plugins: [{ type: 'x' }] }), 'conflist'), {
    message: /disableCheck/,
  })
})
