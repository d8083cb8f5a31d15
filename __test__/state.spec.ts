import test from 'ava'
import { spawn } from 'node:child_process'
import { existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { TapmanagerError } from '../src/errors'
import { removeFile, replaceFile } from '../src/native'
import { StateCorruptError, StateStore, fileNameToKey, keyToFileName } from '../src/state'

const desc = (podId: string) => ({ podId, podNs: 'default', podName: `vm-${podId}`, DNS: null })
const csn = (n: number) => ({
  Result: { interfaces: [{ name: 'eth0', mac: '42:a4:a6:22:80:2e' }], ips: [], routes: [], dns: {} },
  NsPath: `/var/run/netns/${n}`,
  Interfaces: [{ Type: 0, Name: 'eth0', HardwareAddr: 'QqSmIoAu', PCIAddress: '', MTU: 1500, VlanID: 0 }],
})

function tmp(): string {
  return mkdtempSync(join(tmpdir(), 'tmstate-'))
}

test('keys that are not safe file names are encoded, and decode back', (t) => {
  const keys = ['plain-key_1.2', 'a/b', '../../etc/passwd', '.hidden', '..', 'sp ace', '100%', 'ключ', 'tab\there', 'x'.repeat(64)]
  const names = new Set<string>()
  for (const key of keys) {
    const name = keyToFileName(key)
    t.false(name.includes('/'), name)
    t.false(name.startsWith('.'), name)
    t.regex(name, /^[A-Za-z0-9_.%-]+\.json$/)
    t.is(fileNameToKey(name), key)
    names.add(name)
  }
  t.is(names.size, keys.length, 'distinct keys give distinct names')
  t.is(keyToFileName('plain-key_1.2'), 'plain-key_1.2.json')
  t.is(keyToFileName('a/b'), 'a%2Fb.json')
  t.is(fileNameToKey('a%2fb.json'), null, 'only the canonical spelling decodes')
  t.is(fileNameToKey('.a.json'), null)
  t.throws(() => keyToFileName(''), { code: 'ERR_INVALID' } as never)
  t.throws(() => keyToFileName('/'.repeat(100)), { code: 'ERR_INVALID', message: /too long/ } as never)
})

test('write, read, overwrite (adding -> ready), list, remove', async (t) => {
  const dir = tmp()
  try {
    const store = new StateStore(dir)
    await store.init()
    const a = await store.write({ key: 'pod/a', status: 'adding', podNetworkDesc: desc('a') })
    t.is(a.csn, null)
    t.deepEqual(await store.read('pod/a'), a)
    const ready = await store.write({ key: 'pod/a', status: 'ready', podNetworkDesc: desc('a'), csn: csn(1) })
    t.deepEqual(await store.read('pod/a'), ready)
    t.deepEqual((await store.read('pod/a'))!.csn, csn(1))
    await store.write({ key: 'b', status: 'ready', podNetworkDesc: desc('b'), csn: csn(2) })
    const listing = await store.list()
    t.deepEqual(listing.records.map((r) => [r.key, r.status]), [['b', 'ready'], ['pod/a', 'ready']])
    t.deepEqual(listing.corrupt, [])
    t.deepEqual(listing.staleTemps, [])
    t.is(statSync(store.pathOf('b')).mode & 0o777, 0o600)
    t.true(await store.remove('pod/a'))
    t.false(await store.remove('pod/a'))
    t.is(await store.read('pod/a'), null)
    t.deepEqual(readdirSync(dir), ['b.json'])
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})

test('a ready record without csn, or a bad status, is refused before anything is written', async (t) => {
  const dir = tmp()
  try {
    const store = new StateStore(dir)
    await t.throwsAsync(store.write({ key: 'k', status: 'ready', podNetworkDesc: desc('k') }), { message: /needs csn/ })
    await t.throwsAsync(store.write({ key: 'k', status: 'done' as 'ready', podNetworkDesc: desc('k'), csn: csn(1) }), {
      message: /bad status/,
    })
    t.deepEqual(readdirSync(dir), [])
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})

test('missing state dir: lists empty, reads null, and the first write creates it (0700)', async (t) => {
  const parent = tmp()
  const dir = join(parent, 'not', 'there')
  try {
    const store = new StateStore(dir)
    t.deepEqual(await store.list(), { records: [], corrupt: [], quarantined: [], staleTemps: [] })
    t.is(await store.read('k'), null)
    t.false(await store.remove('k'))
    t.false(existsSync(dir), 'reading does not create it')
    await store.write({ key: 'k', status: 'adding', podNetworkDesc: desc('k') })
    t.is(statSync(dir).mode & 0o777, 0o700)
    t.is(statSync(join(parent, 'not')).mode & 0o777, 0o700, 'missing parents too')
    t.is(statSync(store.pathOf('k')).mode & 0o777, 0o600)
    t.deepEqual(readdirSync(dir), ['k.json'])
    t.is((await store.read('k'))!.status, 'adding')
  } finally {
    rmSync(parent, { recursive: true, force: true })
  }
})

test('corrupt files are reported, not dropped and not fatal; quarantine sets them aside', async (t) => {
  const dir = tmp()
  try {
    const store = new StateStore(dir)
    await store.write({ key: 'good', status: 'ready', podNetworkDesc: desc('g'), csn: csn(1) })
    writeFileSync(join(dir, keyToFileName('torn')), '{"version":1,"key":"torn","sta')
    writeFileSync(join(dir, keyToFileName('other')), JSON.stringify({ ...(await store.read('good')), key: 'good' }))
    writeFileSync(join(dir, 'bad%zzname.json'), '{}')
    writeFileSync(join(dir, 'README'), 'not a record: ignored')
    const listing = await store.list()
    t.deepEqual(listing.records.map((r) => r.key), ['good'])
    t.deepEqual(
      listing.corrupt.map((c) => [c.file, c.key]),
      [['bad%zzname.json', null], ['other.json', 'other'], ['torn.json', 'torn']],
    )
    t.regex(listing.corrupt.find((c) => c.key === 'torn')!.reason, /bad JSON/)
    t.regex(listing.corrupt.find((c) => c.key === 'other')!.reason, /does not match the file name/)
    const err = await t.throwsAsync(store.read('torn'), { instanceOf: StateCorruptError })
    t.is(err!.code, 'ERR_STATE_CORRUPT')
    t.is((err as StateCorruptError).file, 'torn.json')

    const moved = await store.quarantine('torn.json')
    t.regex(moved, /^torn\.json\..*\.corrupt$/)
    t.is(readFileSync(join(dir, moved), 'utf8'), '{"version":1,"key":"torn","sta', 'the bytes are kept')
    const after = await store.list()
    t.deepEqual(after.quarantined, [moved])
    t.deepEqual(after.corrupt.map((c) => c.file), ['bad%zzname.json', 'other.json'])
    t.is(await store.read('torn'), null, 'the key is free again')
    await t.throwsAsync(store.quarantine('../x.json'), { code: 'ERR_INVALID' } as never)
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})

test('a write that fails leaves no temp file and the old entry as it was; the error names the step', async (t) => {
  const dir = tmp()
  try {
    const store = new StateStore(dir)
    // A non-empty dir where the record goes: the temp file is written and fsynced, then the rename fails.
    mkdirSync(join(dir, keyToFileName('k')))
    writeFileSync(join(dir, keyToFileName('k'), 'inside'), 'x')
    const err = await t.throwsAsync(store.write({ key: 'k', status: 'adding', podNetworkDesc: desc('k') }), { instanceOf: TapmanagerError })
    t.regex(err!.message, /^rename .*\/\.k\.json\.tmp-\d+-[0-9a-f]{8} to k\.json: /)
    t.is(err!.code, 'ERR_IO')
    t.deepEqual(readdirSync(dir), ['k.json'], 'no temp file left')
    t.is(readFileSync(join(dir, 'k.json', 'inside'), 'utf8'), 'x')
    // A state dir that is a file: nothing can be written, nothing is.
    const file = join(dir, 'file')
    writeFileSync(file, '')
    const err2 = await t.throwsAsync(new StateStore(file).write({ key: 'k', status: 'adding', podNetworkDesc: desc('k') }))
    t.regex(err2!.message, /^open dir .*\/file: /)
    t.deepEqual(readdirSync(dir).sort(), ['file', 'k.json'])
    // Removing a dir named like a record fails too (the entry is not a record file).
    await t.throwsAsync(store.remove('k'), { message: /^remove .*\/k\.json: / })
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})

test('a symlink planted at a record name is replaced and removed, never followed', async (t) => {
  const dir = tmp()
  try {
    const store = new StateStore(dir)
    const victim = join(dir, 'victim')
    writeFileSync(victim, 'keep')
    symlinkSync(victim, store.pathOf('k'))
    const rec = await store.write({ key: 'k', status: 'adding', podNetworkDesc: desc('k') })
    t.true(lstatSync(store.pathOf('k')).isFile(), 'the link itself was replaced')
    t.is(statSync(store.pathOf('k')).mode & 0o777, 0o600)
    t.deepEqual(await store.read('k'), rec)
    t.is(readFileSync(victim, 'utf8'), 'keep')
    symlinkSync(victim, store.pathOf('l'))
    t.true(await store.remove('l'))
    t.is(readFileSync(victim, 'utf8'), 'keep', 'the link was removed, not its target')
    t.deepEqual(readdirSync(dir).sort(), ['k.json', 'victim'])
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})

test('the native replaceFile and removeFile: one plain name each, an entry at the temp name is left alone', async (t) => {
  const dir = tmp()
  try {
    for (const [name, temp] of [['a/b.json', '.t'], ['k.json', '../t'], ['..', '.t'], ['k.json', 'k.json'], ['k.json', '']]) {
      await t.throwsAsync(replaceFile(dir, name, temp, 'x'), { code: 'ERR_INVALID' } as never, `${name} ${temp}`)
    }
    await t.throwsAsync(removeFile(dir, '../x'), { code: 'ERR_INVALID' } as never)
    const victim = join(dir, 'victim')
    symlinkSync(victim, join(dir, '.k.json.tmp-1-00'))
    await t.throwsAsync(replaceFile(dir, 'k.json', '.k.json.tmp-1-00', 'x'), { code: 'ERR_EXISTS', message: /^create .*\/\.k\.json\.tmp-1-00: / } as never)
    t.false(existsSync(victim), 'O_EXCL|O_NOFOLLOW: the link was not followed')
    t.deepEqual(readdirSync(dir), ['.k.json.tmp-1-00'], 'not ours: left alone')
    await replaceFile(dir, 'k.json', '.k.json.tmp-1-01', Buffer.from('bytes'))
    t.is(readFileSync(join(dir, 'k.json'), 'utf8'), 'bytes')
    t.true(await removeFile(dir, 'k.json'))
    t.false(await removeFile(dir, 'k.json'))
    t.false(await removeFile(join(dir, 'missing'), 'k.json'))
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})

test('crash between temp write and rename: the old record stands, the temp is ignored and init() removes it', async (t) => {
  const dir = tmp()
  try {
    const store = new StateStore(dir)
    const old = await store.write({ key: 'k/1', status: 'adding', podNetworkDesc: desc('k') })
    // What a process killed after writing (part of) the temp file and before rename leaves behind.
    const temp = `.${keyToFileName('k/1')}.tmp-4242-deadbeef`
    writeFileSync(join(dir, temp), JSON.stringify({ ...old, status: 'ready', csn: csn(1) }).slice(0, 40))
    t.deepEqual(await store.read('k/1'), old)
    const listing = await store.list()
    t.deepEqual(listing.records, [old])
    t.deepEqual(listing.corrupt, [])
    t.deepEqual(listing.staleTemps, [temp])
    t.deepEqual(await store.init(), { removedTemps: [temp] })
    t.deepEqual(readdirSync(dir), [keyToFileName('k/1')])
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})

test('kill -9 of a writer at arbitrary moments never leaves a torn or missing record', async (t) => {
  const dir = tmp()
  const writer = `
    import { StateStore } from ${JSON.stringify(join(process.cwd(), 'src/state.ts'))}
    const store = new StateStore(${JSON.stringify(dir)})
    for (let n = 1; ; n++) {
      await store.write({ key: 'pod/x', status: 'ready', podNetworkDesc: { podId: 'x', pad: 'p'.repeat(n % 4096) }, csn: { n } })
      process.stdout.write(n + '\\n')
    }`
  try {
    for (let round = 0; round < 6; round++) {
      const child = spawn(process.execPath, ['--import', '@oxc-node/core/register', '--input-type=module', '-e', writer], {
        stdio: ['ignore', 'pipe', 'inherit'],
        env: { ...process.env, OXC_TSCONFIG_PATH: './__test__/tsconfig.json' },
      })
      // Kill it after a varying number of completed writes (a condition, not a delay).
      const target = 5 + round * 7
      let acked = 0
      await new Promise<void>((resolve, reject) => {
        let buf = ''
        child.stdout!.setEncoding('utf8').on('data', (d: string) => {
          buf += d
          const lines = buf.split('\n')
          buf = lines.pop()!
          for (const l of lines) acked = Math.max(acked, Number(l))
          if (acked >= target) child.kill('SIGKILL')
        })
        child.on('exit', (code, signal) => (signal === 'SIGKILL' ? resolve() : reject(new Error(`writer exited ${code}`))))
      })
      const store = new StateStore(dir)
      const listing = await store.list()
      t.deepEqual(listing.corrupt, [], `round ${round}: no corrupt record`)
      t.is(listing.records.length, 1)
      const n = (listing.records[0].csn as { n: number }).n
      t.true(n >= acked, `round ${round}: record ${n} is at least the last acknowledged write ${acked}`)
      t.is((listing.records[0].podNetworkDesc as { pad: string }).pad.length, n % 4096, 'record is whole')
      await store.init()
      t.deepEqual((await store.list()).staleTemps, [])
    }
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})
