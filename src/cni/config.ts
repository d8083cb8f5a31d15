/**
 * CNI network configuration loading, as libcni-based runtimes do it: the first valid file, sorted by name,
 * among `*.conf`, `*.json` (one plugin) and `*.conflist` (a list) in the config dir. A single-plugin file
 * becomes a one-plugin list. Invalid files are skipped, and their reasons are reported when nothing is valid.
 */
import { readdir, readFile } from 'node:fs/promises'
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
      const text = await readFile(file, 'utf8')
      return { config: parseNetworkConfig(text, kind, file), skipped }
    } catch (e) {
      skipped.push({ file, reason: (e as Error).message })
    }
  }
  const why = skipped.length ? `; skipped: ${skipped.map((s) => `${s.file}: ${s.reason}`).join('; ')}` : ''
  throw new CniError('ERR_NOT_FOUND', `no valid CNI network config (*.conf, *.conflist, *.json) in ${confDir}${why}`)
}
