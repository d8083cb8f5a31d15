/**
 * What a consumer of the npm package gets: the optionalDependencies on both platform packages at the package's
 * version, the files that are shipped (nothing test-only; the license, the changelog, the loader wrapper), source
 * maps that resolve, the clear error when the native addon is missing, and the command line's conventions (help,
 * version, per-command help, exit codes) with and without the addon. The packed tarballs themselves are proven on
 * every runtime by scripts/test-package.sh (`npm run test:package`).
 */
import test, { type ExecutionContext } from 'ava'
import { spawnSync } from 'node:child_process'
import { cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync } from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { EXIT_OK, EXIT_SERVER_ERROR, EXIT_USAGE, runCli, USAGE } from '../src/cli'

const root = process.cwd()
const require = createRequire(join(root, 'package.json'))
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as {
  version: string
  optionalDependencies?: Record<string, string>
  napi: { binaryName: string }
  files: string[]
  repository?: { url?: string }
  license: string
}
const PLATFORMS = ['linux-x64-gnu', 'linux-arm64-gnu']

test('package.json pins both platform packages as optionalDependencies at its own version, as npm/* are', (t) => {
  t.deepEqual(pkg.optionalDependencies, Object.fromEntries(PLATFORMS.map((p) => [`tapmanager-${p}`, pkg.version])))
  for (const p of PLATFORMS) {
    const sub = JSON.parse(readFileSync(join(root, 'npm', p, 'package.json'), 'utf8')) as { name: string; version: string; main: string; files: string[]; license: string }
    t.is(sub.name, `tapmanager-${p}`)
    t.is(sub.version, pkg.version, p)
    t.is(sub.main, `${pkg.napi.binaryName}.${p}.node`)
    t.deepEqual(sub.files, [sub.main])
    t.is(sub.license, pkg.license)
    t.true(existsSync(join(root, 'npm', p, 'LICENSE')), `${p} ships the license`)
  }
  t.regex(pkg.repository?.url ?? '', /^git\+https:\/\//)
  t.regex(readFileSync(join(root, 'LICENSE'), 'utf8'), /Apache License\s+Version 2\.0[\s\S]*END OF TERMS AND CONDITIONS/)
  t.regex(readFileSync(join(root, 'CHANGELOG.md'), 'utf8'), new RegExp(`## ${pkg.version.replace(/\./g, '\\.')}`))
})

test('npm pack ships the build, the loader, the license and the changelog, and nothing test-only', (t) => {
  const r = spawnSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: root, encoding: 'utf8', timeout: 120_000 })
  t.is(r.status, 0, r.stderr)
  const files = (JSON.parse(r.stdout) as { files: { path: string }[] }[])[0].files.map((f) => f.path)
  for (const f of ['package.json', 'LICENSE', 'README.md', 'CHANGELOG.md', 'index.js', 'index.d.ts', 'binding.js', 'binding.d.ts', 'binding-error.js', 'dist/index.js', 'dist/index.d.ts', 'dist/cli.js']) {
    t.true(files.includes(f), `ships ${f}`)
  }
  for (const f of files) {
    t.false(/^(__test__|bench|examples|scripts|crates|src|npm|target|\.tmp)\//.test(f), `does not ship ${f}`)
    t.false(/^dist\/demo\./.test(f), `does not ship the demo (${f})`)
    t.false(f.endsWith('.node'), `the root package carries no binary (${f})`)
  }
})

test('source maps in dist resolve: every source is inlined (sourcesContent)', (t) => {
  const maps: string[] = []
  const walk = (d: string) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      if (e.isDirectory()) walk(join(d, e.name))
      else if (e.name.endsWith('.js.map')) maps.push(join(d, e.name))
    }
  }
  walk(join(root, 'dist'))
  t.true(maps.length > 5)
  for (const m of maps) {
    const map = JSON.parse(readFileSync(m, 'utf8')) as { sources: string[]; sourcesContent?: (string | null)[] }
    t.is(map.sourcesContent?.length, map.sources.length, m)
    t.true((map.sourcesContent ?? []).every((s) => typeof s === 'string' && s.length > 0), m)
  }
})

const { missingBindingError } = require('./binding-error.js') as typeof import('../binding-error')
const notFound = (m: string) => Object.assign(new Error(`Cannot find module '${m}'`), { code: 'MODULE_NOT_FOUND' })
const chain = (...errs: Error[]) => errs.reduce<Error | null>((prev, e) => Object.assign(new Error(e.message), { cause: prev }), null)

test('missing platform package: the error names the package, its version and the platform detected', (t) => {
  const loaderErr = Object.assign(new Error('Cannot find native binding. npm has a bug related to optional dependencies'), {
    cause: chain(notFound('./tapmanager.linux-x64-gnu.node'), notFound('tapmanager-linux-x64-gnu')),
  })
  const e = missingBindingError(loaderErr, 'linux', 'x64', false)
  t.is(e.code, 'ERR_TAPMANAGER_NATIVE')
  t.is(e.package, 'tapmanager-linux-x64-gnu')
  t.is(e.platform, 'linux-x64 (glibc)')
  t.regex(e.message, new RegExp(`linux-x64 \\(glibc\\) is not installed: install the package tapmanager-linux-x64-gnu@${pkg.version}`))
  t.is(e.cause, loaderErr.cause, 'the paths tried, without the loader\'s wrapper')
  t.regex(missingBindingError(loaderErr, 'linux', 'arm64', false).message, /tapmanager-linux-arm64-gnu@/)
})

test('a platform package that is there but does not load: the loader\'s reason, not "install it"', (t) => {
  const glibc = new Error("/lib/x86_64-linux-gnu/libc.so.6: version `GLIBC_2.99' not found")
  const e = missingBindingError(Object.assign(new Error('Cannot find native binding.'), { cause: chain(notFound('./x.node'), glibc) }), 'linux', 'x64', false)
  t.regex(e.message, /did not load: .*GLIBC_2\.99/)
  t.notRegex(e.message, /is not installed/)
})

test('unsupported platforms and musl are named as such', (t) => {
  t.regex(missingBindingError(new Error('x'), 'darwin', 'arm64', false).message, /no native addon for darwin-arm64; it supports linux-x64-gnu, linux-arm64-gnu/)
  t.regex(missingBindingError(new Error('x'), 'linux', 'x64', true).message, /no native addon for linux-x64 \(musl\)/)
  t.regex(missingBindingError(new Error('x'), 'linux', 'riscv64', false).message, /no native addon for linux-riscv64 \(glibc\)/)
})

/** The package as installed without its platform package: a copy of what npm ships, minus any .node file. */
function barePackage(t: ExecutionContext): string {
  const dir = mkdtempSync(join(tmpdir(), `tm-bare-${process.pid}-`))
  for (const f of ['package.json', 'index.js', 'binding.js', 'binding-error.js', 'dist']) cpSync(join(root, f), join(dir, f), { recursive: true })
  // Its dependencies (pino) from the repo's node_modules, which has no platform package (never published).
  symlinkSync(join(root, 'node_modules'), join(dir, 'node_modules'))
  t.false(existsSync(join(dir, 'node_modules', 'tapmanager-linux-x64-gnu')))
  return dir
}

test('without the native addon: require and import fail clearly; --help, -V, help COMMAND and ls work; status exits 1', (t) => {
  const dir = barePackage(t)
  try {
    const node = (args: string[]) => spawnSync(process.execPath, args, { cwd: dir, encoding: 'utf8', timeout: 60_000, env: { ...process.env, NAPI_RS_NATIVE_LIBRARY_PATH: '' } })
    const cjs = node(['-e', 'require("./dist/index.js")'])
    t.not(cjs.status, 0)
    t.regex(cjs.stderr, new RegExp(`linux-x64 \\(glibc\\) is not installed: install the package tapmanager-linux-x64-gnu@${pkg.version}`))
    t.notRegex(cjs.stderr, /npm has a bug/)
    const esm = node(['--input-type=module', '-e', 'await import(process.cwd() + "/binding.js")'])
    t.not(esm.status, 0)
    t.regex(esm.stderr, /install the package tapmanager-linux-x64-gnu@/)
    const help = node(['dist/cli.js', '--help'])
    t.is(help.status, 0, help.stderr)
    t.is(help.stdout, USAGE)
    for (const v of ['--version', '-V']) {
      const r = node(['dist/cli.js', v])
      t.is(r.status, 0, r.stderr)
      t.is(r.stdout, `${pkg.version}\n`)
    }
    const helpGet = node(['dist/cli.js', 'help', 'get'])
    t.is(helpGet.status, 0, helpGet.stderr)
    t.regex(helpGet.stdout, /^Usage: tapmanager get/)
    const ls = node(['dist/cli.js', 'ls', '--state-dir', join(dir, 'state')])
    t.is(ls.status, 0, ls.stderr)
    t.regex(ls.stdout, /no keys in/)
    // KEY is checked by the protocol's key rule, which needs no addon: a usage error, exit 2.
    const badKey = node(['dist/cli.js', 'release', 'k '])
    t.is(badKey.status, 2, badKey.stderr)
    t.regex(badKey.stderr, /^tapmanager: KEY: fd key "k " has leading or trailing whitespace/)
    const status = node(['dist/cli.js', 'status', '--socket', join(dir, 'none.sock')])
    t.is(status.status, EXIT_SERVER_ERROR)
    t.is(status.stdout, '')
    t.regex(status.stderr, /^tapmanager: tapmanager's native addon for linux-x64 \(glibc\) is not installed: install the package tapmanager-linux-x64-gnu@/)
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})

async function cli(argv: string[]) {
  let stdout = ''
  let stderr = ''
  const code = await runCli(argv, { env: {}, io: { stdout: (s) => (stdout += s), stderr: (s) => (stderr += s), readFile: (p) => readFileSync(p, 'utf8') } })
  return { code, stdout, stderr }
}

test('help [COMMAND], COMMAND --help and -h print that command\'s help on stdout and exit 0', async (t) => {
  t.deepEqual(await cli(['help']), { code: EXIT_OK, stdout: USAGE, stderr: '' })
  for (const cmd of ['serve', 'add', 'get', 'release', 'recover', 'ls', 'status']) {
    for (const argv of [['help', cmd], [cmd, '--help'], [cmd, '-h']]) {
      const r = await cli(argv)
      t.is(r.code, EXIT_OK, argv.join(' '))
      t.is(r.stderr, '')
      t.true(r.stdout.startsWith(`Usage: tapmanager ${cmd} [options]\n\n  ${cmd}`), `${argv.join(' ')}: ${r.stdout}`)
      t.regex(r.stdout, /Global options:\n {2}--socket PATH/)
    }
  }
  const serve = await cli(['help', 'serve'])
  t.regex(serve.stdout, /--cni-timeout MS/)
  t.notRegex(serve.stdout, /--pod-id/)
})

test('-V and --version print the version; usage errors of help exit 2 on stderr', async (t) => {
  // In-process the version is read relative to the module (exact in the dist test above); -V is --version.
  t.deepEqual(await cli(['-V']), await cli(['--version']))
  const v = await cli(['-V'])
  t.is(v.code, EXIT_OK)
  t.is(v.stderr, '')
  for (const [argv, re] of [
    [['help', 'nope'], /unknown command "nope"/],
    [['help', 'get', 'add'], /help takes at most one COMMAND/],
    [['-x'], /Unknown option '-x'/],
  ] as const) {
    const r = await cli([...argv])
    t.is(r.code, EXIT_USAGE, argv.join(' '))
    t.is(r.stdout, '')
    t.regex(r.stderr, re)
  }
})

test('recover --from an unreadable file is a failure (exit 1), not a usage error', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), `tm-rec-${process.pid}-`))
  try {
    for (const from of [join(dir, 'missing.json'), dir]) {
      const r = await cli(['recover', 'k', '--from', from, '--socket', join(dir, 'none.sock')])
      t.is(r.code, EXIT_SERVER_ERROR, from)
      t.is(r.stdout, '')
      t.regex(r.stderr, new RegExp(`^tapmanager: --from ${from}: (ENOENT|EISDIR)`))
      t.notRegex(r.stderr, /--help/)
    }
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})
