/**
 * CNI network configuration loading, as libcni-based runtimes do it: the first valid file, sorted by name,
 * among `*.conf`, `*.json` (one plugin) and `*.conflist` (a list) in the config dir. A single-plugin file
 * becomes a one-plugin list. Invalid files are skipped, and their reasons are reported when nothing is valid.
 *
 * Only regular files (or symlinks to one) are read, at most {@link MAX_CONFIG_SIZE} bytes: a FIFO, a device, a
 * socket, a dir (or a symlink to one of those) is skipped with its reason, never opened; a file is opened
 * O_NONBLOCK and fstat'ed again before the read, so a swap between the check and the open cannot block the daemon.
 */
import { constants as fsc } from 'node:fs'
import { lstat, open, readdir, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { CniError } from './errors'
import { SUPPORTED_CNI_VERSIONS, isSupportedCniVersion } from './result'

/** One plugin of a network list: its config object as written (it goes to the plugin's stdin). */
export interface CniPluginConf {
  /** The plugin's `type`, i.e. the binary name. */
  type: string
  /** The plugin's config as written in the file. */
  raw: Record<string, unknown>
}

/** A network configuration list. */
export interface CniNetworkConfig {
  name: string
  cniVersion: string
  /** `disableCheck` of the list: CHECK is then a no-op. */
  disableCheck: boolean
  plugins: CniPluginConf[]
  /** The file it came from. */
  file: string
}

/** A file that was not used and why. */
export interface SkippedConfig {
  file: string
  reason: string
}

/** The largest config file read (a real one is a few hundred bytes). */
export const MAX_CONFIG_SIZE = 1 << 20

/** What kind of file a stat describes, for skip reasons. */
function kindOf(st: import('node:fs').Stats): string {
  if (st.isFIFO()) return 'a FIFO'
  if (st.isCharacterDevice()) return 'a character device'
  if (st.isBlockDevice()) return 'a block device'
  if (st.isSocket()) return 'a socket'
  if (st.isDirectory()) return 'a directory'
  if (st.isSymbolicLink()) return 'a symlink'
  return 'not a regular file'
}

/**
 * Reads one config file without ever blocking on it: lstat (and stat through a symlink) must show a regular
 * file of at most {@link MAX_CONFIG_SIZE} bytes; it is then opened O_NONBLOCK|O_NOCTTY and fstat'ed again (the
 * same file, still regular and small) before the read. Throws an Error with the reason to skip it.
 */
export async function readConfigFile(file: string): Promise<string> {
  let st = await lstat(file)
  if (st.isSymbolicLink()) st = await stat(file)
  if (!st.isFile()) throw new Error(`not a regular file (${kindOf(st)})`)
  if (st.size > MAX_CONFIG_SIZE) throw new Error(`too large (${st.size} bytes > ${MAX_CONFIG_SIZE})`)
  const fh = await open(file, fsc.O_RDONLY | fsc.O_NONBLOCK | fsc.O_NOCTTY)
  try {
    const fst = await fh.stat()
    if (!fst.isFile() || fst.ino !== st.ino || fst.dev !== st.dev) throw new Error('changed while being opened (not the regular file checked)')
    if (fst.size > MAX_CONFIG_SIZE) throw new Error(`too large (${fst.size} bytes > ${MAX_CONFIG_SIZE})`)
    const buf = Buffer.alloc(Math.min(fst.size, MAX_CONFIG_SIZE) + 1)
    let n = 0
    while (n < buf.length) {
      const { bytesRead } = await fh.read(buf, n, buf.length - n, n)
      if (bytesRead === 0) break
      n += bytesRead
    }
    if (n > MAX_CONFIG_SIZE) throw new Error(`too large (more than ${MAX_CONFIG_SIZE} bytes)`)
    return buf.subarray(0, n).toString('utf8')
  } finally {
    await fh.close()
  }
}

/** The rule libcni applies to network names and container ids. */
export const CNI_NAME_RE = /^[a-zA-Z0-9][a-zA-Z0-9_.-]*$/

/** Parses one config file's text (`kind` from its extension); throws an Error with the reason when invalid. */
export function parseNetworkConfig(text: string, kind: 'conf' | 'conflist', file = '<inline>'): CniNetworkConfig {
  let v: unknown
  try {
    v = JSON.parse(text)
  } catch (e) {
    throw new Error(`invalid JSON: ${(e as Error).message}`)
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not a JSON object')
  const o = v as Record<string, unknown>
  if (typeof o.name !== 'string' || !CNI_NAME_RE.test(o.name)) {
    throw new Error(`missing or invalid "name" (${JSON.stringify(o.name)}; must match ${CNI_NAME_RE})`)
  }
  if (!isSupportedCniVersion(o.cniVersion)) {
    throw new Error(`unsupported "cniVersion" ${JSON.stringify(o.cniVersion)} (supported: ${SUPPORTED_CNI_VERSIONS.join(', ')})`)
  }
  const plugin = (p: unknown, where: string): CniPluginConf => {
    if (typeof p !== 'object' || p === null || Array.isArray(p)) throw new Error(`${where} is not a JSON object`)
    const type = (p as Record<string, unknown>).type
    if (typeof type !== 'string' || type === '' || type.includes('/') || type === '.' || type === '..') {
      throw new Error(`${where} has a missing or invalid "type" (${JSON.stringify(type)})`)
    }
    return { type, raw: p as Record<string, unknown> }
  }
  let plugins: CniPluginConf[]
  if (kind === 'conflist') {
    if (!Array.isArray(o.plugins) || o.plugins.length === 0) throw new Error('"plugins" must be a non-empty array')
    plugins = o.plugins.map((p, i) => plugin(p, `plugins[${i}]`))
  } else {
    plugins = [plugin(o, 'the config')]
  }
  if (o.disableCheck !== undefined && typeof o.disableCheck !== 'boolean') throw new Error('"disableCheck" must be a boolean')
  return { name: o.name, cniVersion: o.cniVersion, disableCheck: o.disableCheck === true, plugins, file }
}

/**
 * Loads the first valid network config of `confDir`. Throws a {@link CniError} (`ERR_NOT_FOUND`) listing every
 * skipped file and its reason when there is none.
 */
export async function loadNetworkConfig(confDir: string): Promise<{ config: CniNetworkConfig; skipped: SkippedConfig[] }> {
  let names: string[]
  try {
    names = await readdir(confDir)
  } catch (e) {
    throw new CniError('ERR_NOT_FOUND', `cannot read the CNI config dir ${confDir}: ${(e as Error).message}`, {}, { cause: e })
  }
  const skipped: SkippedConfig[] = []
  for (const name of names.sort()) {
    const kind = name.endsWith('.conflist') ? 'conflist' : name.endsWith('.conf') || name.endsWith('.json') ? 'conf' : null
    if (!kind) continue
    const file = join(confDir, name)
    try {
      const text = await readConfigFile(file)
      return { config: parseNetworkConfig(text, kind, file), skipped }
    } catch (e) {
      skipped.push({ file, reason: (e as Error).message })
    }
  }
  const why = skipped.length ? `; skipped: ${skipped.map((s) => `${s.file}: ${s.reason}`).join('; ')}` : ''
  throw new CniError('ERR_NOT_FOUND', `no valid CNI network config (*.conf, *.conflist, *.json) in ${confDir}${why}`)
}
