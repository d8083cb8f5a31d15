// PACKAGING TEST: builds dist/ with tsc, runs `npm pack`, installs the tarball plus a platform package holding the
// native addon (as `napi prepublish` would publish it) into a scratch project, and there imports
// { FDServer, FDClient } from 'tapmanager' and runs an add/get/release round trip. Its dependencies (pino) come from
// npm's cache when there (--prefer-offline), else from the registry: a fresh machine's cache has no pino packument.
import test from 'ava'
import { execFileSync } from 'node:child_process'
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

test('npm pack, install in a scratch project, import { FDServer, FDClient } from tapmanager', (t) => {
  const root = process.cwd()
  const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'))
  const scratch = mkdtempSync(join(tmpdir(), 'tm-pack-'))
  try {
    execFileSync(process.execPath, [join(root, 'node_modules/typescript/bin/tsc'), '-p', 'tsconfig.json'], { cwd: root, stdio: 'pipe' })
    const packOut = execFileSync('npm', ['pack', '--json', '--pack-destination', scratch], { cwd: root, encoding: 'utf8' })
    const tarball = join(scratch, JSON.parse(packOut)[0].filename)
    // The platform package the loader falls back to when no .node file sits next to index.js.
    const plat = join(scratch, 'platform')
    const nodeFile = `${pkg.napi.binaryName}.linux-x64-gnu.node`
    execFileSync('mkdir', ['-p', plat])
    copyFileSync(join(root, nodeFile), join(plat, nodeFile))
    // The committed platform package manifest, as `napi prepublish` publishes it.
    const platPkg = JSON.parse(readFileSync(join(root, 'npm/linux-x64-gnu/package.json'), 'utf8'))
    t.is(platPkg.main, nodeFile)
    t.is(platPkg.version, pkg.version)
    writeFileSync(join(plat, 'package.json'), JSON.stringify(platPkg))
    const platOut = execFileSync('npm', ['pack', '--json', '--pack-destination', scratch], { cwd: plat, encoding: 'utf8' })
    const platTarball = join(scratch, JSON.parse(platOut)[0].filename)
    const app = join(scratch, 'app')
    execFileSync('mkdir', ['-p', app])
    writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'scratch-app', version: '1.0.0', type: 'module', private: true }))
    execFileSync('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline', tarball, platTarball], { cwd: app, stdio: 'pipe' })
    writeFileSync(
      join(app, 'main.mjs'),
      `import { FDServer, FDClient } from 'tapmanager'
import { openSync, readSync } from 'node:fs'
const sock = ${JSON.stringify(join(scratch, 'app.sock'))}
const fds = new Map()
const source = {
  getFDs: (key) => { const fd = openSync(${JSON.stringify(join(app, 'package.json'))}, 'r'); fds.set(key, fd); return { fds: [fd], data: Buffer.from('hi ' + key) } },
  release: (key) => { fds.delete(key) },
  getInfo: (key) => Buffer.from('info ' + key),
  recover: () => {}, retrieveFDs: () => [], stop: () => {},
}
const server = new FDServer(sock, source)
await server.serve()
const client = new FDClient(sock)
const added = (await client.addFDs('k', {})).toString()
const got = await client.getFDs('k')
const buf = Buffer.alloc(16); const n = readSync(got.fds[0], buf, 0, 16, 0)
await client.releaseFDs('k')
await server.stop()
console.log(JSON.stringify({ added, info: got.info.toString(), nfds: got.fds.length, head: buf.subarray(0, n).toString() }))
`,
    )
    const out = execFileSync(process.execPath, ['main.mjs'], { cwd: app, encoding: 'utf8' })
    t.deepEqual(JSON.parse(out), { added: 'hi k', info: 'info k', nfds: 1, head: '{"name":"scratch' })
  } finally {
    rmSync(scratch, { recursive: true, force: true })
  }
})
