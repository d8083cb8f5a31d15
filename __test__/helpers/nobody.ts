/** Runs a tiny FDClient as another user (uid/gid 65534, "nobody"), for the peer authorisation tests. */
import { execFile } from 'node:child_process'
import { join } from 'node:path'

/**
 * Runs `body` (ES module code with `FDClient` and `closeFd` imported from src/index.ts and `SOCK`/`KEY` bound)
 * as uid/gid 65534 and resolves to what it prints, trimmed. `body` prints `OK ...`; a throw prints `ERR <message>`.
 */
function runClientAsNobody(sock: string, key: string, body: string): Promise<string> {
  const script = `
    import { FDClient, closeFd } from ${JSON.stringify(join(process.cwd(), 'src/index.ts'))}
    const SOCK = ${JSON.stringify(sock)}, KEY = ${JSON.stringify(key)}
    try { ${body} }
    catch (e) { console.log('ERR ' + e.message) }`
  return new Promise((resolve, reject) => {
    execFile(
      process.execPath,
      ['--import', '@oxc-node/core/register', '--input-type=module', '-e', script],
      { uid: 65534, gid: 65534, cwd: process.cwd(), timeout: 60_000, env: { ...process.env, OXC_TSCONFIG_PATH: './__test__/tsconfig.json' } },
      (err, stdout, stderr) => (err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(stdout.trim())),
    )
  })
}

/** As nobody: an add of `key`; prints `OK` or `ERR <message>`. */
export function addAsNobody(sock: string, key: string): Promise<string> {
  return runClientAsNobody(sock, key, `await new FDClient(SOCK).addFDs(KEY, {}); console.log('OK')`)
}

/** As nobody: a get of `key` (the fds received are closed); prints `OK <fd count>` or `ERR <message>`. */
export function getAsNobody(sock: string, key: string): Promise<string> {
  return runClientAsNobody(sock, key, `const r = await new FDClient(SOCK).getFDs(KEY); r.fds.forEach(closeFd); console.log('OK ' + r.fds.length)`)
}
