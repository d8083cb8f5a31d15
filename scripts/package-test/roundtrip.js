// The package test's consumer program, in one body for both module systems: scripts/test-package.sh writes it
// as roundtrip.mjs (ESM: `import()`) and roundtrip.cjs (CommonJS: `require`), with the HEADER line replaced.
// It imports the installed `tapmanager` (timing the cold import), serves a file-backed FDSource with FDServer,
// adds a key with FDClient, gets its fd, reads the file through that fd, releases, runs the `tapmanager` bin's
// `--version` and `status --json` against the live server, stops, and prints one JSON line of results.
// Environment: RT_NAME (runtime label), RT_EXEC (JSON array: how to run a script with this runtime; default
// [process.execPath]), RT_ITER (timed get+read+close round trips, default 50).
HEADER

const { FDServer, FDClient, closeFd } = tm
const name = process.env.RT_NAME || 'node'
const exec = process.env.RT_EXEC ? JSON.parse(process.env.RT_EXEC) : [process.execPath]
const iterations = Number(process.env.RT_ITER || 50)
const dir = fs.mkdtempSync(path.join(os.tmpdir(), `tm-pkg-${process.pid}-`))
const sock = path.join(dir, 's.sock')
/** The step the program is at, printed with a failure (which request of the round trip failed or hung). */
let step = 'start'
const fail = (msg) => {
  throw new Error(`${name}: ${msg}`)
}

/** A file-backed FDSource: one file per key, opened with the addon (an OS fd on every runtime). */
class FileSource {
  constructor() {
    this.keys = new Map()
  }
  getFDs(key, data) {
    const { content } = JSON.parse(data.toString('utf8'))
    const file = path.join(dir, `k-${this.keys.size}`)
    fs.writeFileSync(file, content)
    const fd = fs.openSync(file, 'r')
    this.keys.set(key, { file, fd })
    return { fds: [fd], data: Buffer.from(JSON.stringify({ file })) }
  }
  release(key) {
    const k = this.keys.get(key)
    if (!k) throw new Error(`unknown key ${key}`)
    fs.closeSync(k.fd) // opened with node:fs: closed with it
    fs.rmSync(k.file)
    this.keys.delete(key)
  }
  getInfo(key) {
    return Buffer.from(JSON.stringify({ file: this.keys.get(key).file }))
  }
  recover() {
    throw new Error('not used')
  }
  retrieveFDs() {
    throw new Error('not used')
  }
  stop() {}
}

function runBin(args) {
  const bin = path.join(path.dirname(resolve('tapmanager/package.json')), 'dist', 'cli.js')
  const r = cp.spawnSync(exec[0], [...exec.slice(1), bin, ...args], { encoding: 'utf8', timeout: 120000 })
  return { code: r.status, stdout: r.stdout, stderr: r.stderr, error: r.error && r.error.message }
}

async function main() {
  const source = new FileSource()
  const server = new FDServer(sock, source)
  step = 'serve'
  await server.serve()
  const client = new FDClient(sock)
  const content = `hello from ${name} ${process.pid}`
  let readWith = 'fs.readSync'
  let first = true
  let denoCloseSync = null
  try {
    step = 'add'
    const added = JSON.parse((await client.addFDs('k1', { content })).toString('utf8'))
    if (!added.file) fail('add response has no file')
    const read = (fd) => {
      const buf = Buffer.alloc(256)
      const n = fs.readSync(fd, buf, 0, buf.length, 0)
      return buf.subarray(0, n).toString('utf8')
    }
    const once = async () => {
      const { fds, info } = await client.getFDs('k1')
      try {
        if (fds.length !== 1) fail(`got ${fds.length} fds`)
        if (JSON.parse(info.toString('utf8')).file !== added.file) fail('get info differs from the add response')
        let text
        try {
          text = read(fds[0])
        } catch (err) {
          // Deno's node:fs only takes fds that it opened itself; an fd from elsewhere (the addon) is EBADF there.
          // Reading the file through /proc/self/fd/N opens it anew, which is what a file fd allows (see README).
          if (err.code !== 'EBADF' || typeof Deno === 'undefined') throw err
          readWith = '/proc/self/fd (fs.readSync: EBADF)'
          text = fs.readFileSync(`/proc/self/fd/${fds[0]}`, 'utf8')
        }
        if (text !== content) fail(`read ${JSON.stringify(text)} through the fd, wanted ${JSON.stringify(content)}`)
      } finally {
        if (first && typeof Deno !== 'undefined') {
          // Deno's node:fs refuses to close an fd that it did not open (and leaves it open): why tapmanager closes
          // received fds with the addon's closeFd, never with fs.closeSync.
          let code = null
          try {
            fs.closeSync(fds[0])
          } catch (err) {
            code = err.code
          }
          if (code !== 'EBADF' || !fs.existsSync(`/proc/self/fd/${fds[0]}`)) fail(`Deno fs.closeSync of a received fd: ${code}`)
          denoCloseSync = 'EBADF'
        }
        first = false
        for (const fd of fds) {
          closeFd(fd)
          if (fs.existsSync(`/proc/self/fd/${fd}`)) fail(`closeFd(${fd}) left it open`)
        }
      }
    }
    step = 'first get'
    await once()
    const times = []
    for (let i = 0; i < iterations; i++) {
      step = `get ${i + 1} of ${iterations}`
      const t0 = performance.now()
      await once()
      times.push(performance.now() - t0)
    }
    times.sort((a, b) => a - b)
    step = 'bin --version'
    const version = runBin(['--version'])
    const expected = JSON.parse(fs.readFileSync(resolve('tapmanager/package.json'), 'utf8')).version
    if (version.code !== 0 || version.stdout.trim() !== expected) fail(`tapmanager --version: ${JSON.stringify(version)}`)
    step = 'bin status'
    const status = runBin(['status', '--json', '--socket', sock])
    if (status.code !== 0) fail(`tapmanager status --json: ${JSON.stringify(status)}`)
    const st = JSON.parse(status.stdout)
    if (st.running !== true || st.socket !== sock) fail(`status --json said ${status.stdout}`)
    step = 'release'
    await client.releaseFDs('k1')
    if (source.keys.size !== 0 || fs.existsSync(added.file)) fail('release left the key or its file')
    step = 'stop'
    await server.stop()
    if (fs.existsSync(sock)) fail('stop left the socket file')
    const down = runBin(['status', '--json', '--socket', sock])
    if (down.code !== 3 || JSON.parse(down.stdout).running !== false) fail(`status after stop: ${JSON.stringify(down)}`)
    console.log(
      JSON.stringify({
        runtime: name,
        version: typeof Deno !== 'undefined' ? `deno ${Deno.version.deno}` : process.versions.bun ? `bun ${process.versions.bun}` : `node ${process.version}`,
        arch: process.arch,
        module: moduleKind,
        ok: true,
        importMs: Math.round(importMs * 10) / 10,
        roundTripMedianMs: Math.round(times[times.length >> 1] * 1000) / 1000,
        iterations,
        readWith,
        denoCloseSync,
        binVersion: version.stdout.trim(),
      }),
    )
  } finally {
    if (server.listening) await server.stop()
    fs.rmSync(dir, { recursive: true, force: true })
  }
}

main().catch((err) => {
  console.error(`${name}: failed at step "${step}" after ${Math.round(performance.now() - started)} ms`)
  console.error(err && err.stack ? err.stack : err)
  process.exit(1)
})
