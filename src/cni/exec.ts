/**
 * Running one CNI plugin: lookup in the plugin dirs, the CNI_* environment, the config on stdin, a timeout
 * that kills the plugin's whole process group, and the reading of its answer (result or CNI error JSON).
 */
import { spawn } from 'node:child_process'
import { access, constants } from 'node:fs/promises'
import { join } from 'node:path'
import { CniError, type CniCommand } from './errors'

/** The most stdout/stderr we keep from a plugin; more is an error (a result is a few hundred bytes). */
export const MAX_PLUGIN_OUTPUT = 1 << 20

/** Everything one plugin run needs. */
export interface PluginRun {
  /** Plugin type (binary name). */
  plugin: string
  /** The network name, for errors. */
  network: string
  command: CniCommand
  /** The JSON object written to stdin. */
  stdin: Record<string, unknown>
  /** The CNI_* variables (added to this process's environment). */
  env: Record<string, string>
  binDirs: string[]
  timeoutMs: number
  /** A command prefix, e.g. `['ip', 'netns', 'exec', 'node']`: the plugin runs as `[...execWrapper, pluginPath]`. */
  execWrapper: string[]
}

/** Finds an executable named `plugin` in the first dir that has one. */
export async function findPlugin(plugin: string, binDirs: string[]): Promise<string | undefined> {
  for (const dir of binDirs) {
    const path = join(dir, plugin)
    try {
      await access(path, constants.X_OK)
      return path
    } catch {
      // not in this dir
    }
  }
  return undefined
}

function clip(s: string, n = 4096): string {
  const t = s.trim()
  return t.length > n ? `${t.slice(0, n)}...` : t
}

/**
 * Runs the plugin and returns its parsed stdout (the result object for ADD, `undefined` when a DEL/CHECK
 * printed nothing). Throws {@link CniError}: `ERR_NOT_FOUND` (no binary), `ERR_TIMEOUT` (killed after
 * `timeoutMs`), `ERR_CNI` (plugin error, non-JSON or oversized output).
 */
export async function execPlugin(run: PluginRun): Promise<Record<string, unknown> | undefined> {
  const info = { plugin: run.plugin, network: run.network, command: run.command }
  const path = await findPlugin(run.plugin, run.binDirs)
  if (!path) {
    throw new CniError('ERR_NOT_FOUND', `CNI plugin "${run.plugin}" not found in ${run.binDirs.join(', ')}`, info)
  }
  const argv = [...run.execWrapper, path]
  const child = spawn(argv[0], argv.slice(1), {
    env: { ...process.env, ...run.env },
    stdio: ['pipe', 'pipe', 'pipe'],
    // its own process group (setsid), so a timeout kills everything it started
    detached: true,
  })
  const out: Buffer[] = []
  const err: Buffer[] = []
  let outLen = 0
  let errLen = 0
  let overflow = false
  let timedOut = false
  const killGroup = () => {
    try {
      if (child.pid) process.kill(-child.pid, 'SIGKILL')
    } catch {
      // already gone
    }
  }
  child.stdout.on('data', (b: Buffer) => {
    outLen += b.length
    if (outLen > MAX_PLUGIN_OUTPUT) {
      if (!overflow) killGroup()
      overflow = true
    } else out.push(b)
  })
  child.stderr.on('data', (b: Buffer) => {
    errLen += b.length
    if (errLen <= MAX_PLUGIN_OUTPUT) err.push(b)
  })
  child.stdin.on('error', () => {
    // a plugin that exits without reading its stdin: its exit status tells what happened
  })
  child.stdin.end(JSON.stringify(run.stdin))
  let timer: NodeJS.Timeout | undefined
  const { code, signal, spawnError } = await new Promise<{ code: number | null; signal: string | null; spawnError?: Error }>(
    (resolve) => {
      let exited: { code: number | null; signal: string | null } | undefined
      const stopReading = () => {
        // A descendant (possibly one that left the process group with setsid) may hold the pipes open for
        // ever: stop waiting for them.
        child.stdout.destroy()
        child.stderr.destroy()
      }
      child.once('error', (e) => resolve({ code: null, signal: null, spawnError: e }))
      child.once('close', (c, s) => resolve({ code: c, signal: s }))
      child.once('exit', (c, s) => {
        exited = { code: c, signal: s }
        if (timedOut || overflow) {
          stopReading()
          resolve(exited)
          return
        }
        // The plugin is done. A child of it may still hold the pipes: then the timer below ends the wait (and the
        // output printed is used: the plugin itself did not time out).
      })
      timer = setTimeout(() => {
        timedOut = exited === undefined
        killGroup()
        stopReading()
        resolve(exited ?? { code: null, signal: 'SIGKILL' })
      }, run.timeoutMs)
    },
  )
  clearTimeout(timer)
  const stdout = Buffer.concat(out).toString('utf8')
  const stderr = clip(Buffer.concat(err).toString('utf8'))
  const more = { ...info, exitCode: code, signal, stderr }
  const name = `CNI plugin "${run.plugin}" ${run.command}`
  if (spawnError) throw new CniError('ERR_CNI', `${name}: cannot start ${argv.join(' ')}: ${spawnError.message}`, more, { cause: spawnError })
  if (timedOut) {
    throw new CniError('ERR_TIMEOUT', `${name} timed out after ${run.timeoutMs} ms and was killed`, {
      ...more,
      cniMsg: `timed out after ${run.timeoutMs} ms`,
    })
  }
  if (overflow) throw new CniError('ERR_CNI', `${name}: output larger than ${MAX_PLUGIN_OUTPUT} bytes`, more)
  if (code !== 0) {
    // The spec: a JSON error {"code","msg","details"} on stdout.
    let parsed: unknown
    try {
      parsed = JSON.parse(stdout)
    } catch {
      parsed = undefined
    }
    const e = parsed as { code?: unknown; msg?: unknown; details?: unknown } | undefined
    if (e && typeof e === 'object' && (typeof e.code === 'number' || typeof e.msg === 'string')) {
      const cniCode = typeof e.code === 'number' ? e.code : undefined
      const cniMsg = typeof e.msg === 'string' ? e.msg : ''
      const details = typeof e.details === 'string' && e.details !== '' ? e.details : undefined
      throw new CniError(
        'ERR_CNI',
        `${name} failed: ${cniMsg}${details ? ` (${details})` : ''}${cniCode !== undefined ? ` [CNI code ${cniCode}]` : ''}`,
        { ...more, cniCode, cniMsg, details },
      )
    }
    const how = signal ? `was killed by ${signal}` : `exited with status ${code}`
    const said = clip(stdout, 512) || stderr
    throw new CniError('ERR_CNI', `${name} ${how} without a CNI error${said ? `: ${said}` : ''}`, {
      ...more,
      cniMsg: said || how,
    })
  }
  // DEL and CHECK print nothing on success (spec); whatever they print is not used.
  if (run.command === 'DEL' || run.command === 'CHECK') return undefined
  if (stdout.trim() === '') throw new CniError('ERR_CNI', `${name} succeeded but printed no result`, more)
  let result: unknown
  try {
    result = JSON.parse(stdout)
  } catch (e) {
    throw new CniError('ERR_CNI', `${name} printed output that is not JSON: ${JSON.stringify(clip(stdout, 200))}`, {
      ...more,
      cniMsg: `invalid JSON output: ${(e as Error).message}`,
    })
  }
  if (typeof result !== 'object' || result === null || Array.isArray(result)) {
    throw new CniError('ERR_CNI', `${name} printed JSON that is not an object: ${clip(stdout, 200)}`, more)
  }
  return result as Record<string, unknown>
}
