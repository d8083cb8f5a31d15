/**
 * The on-disk cache of ADD results, so DEL (and CHECK) get the ADD result as `prevResult` and the config used
 * at ADD time, even after a restart or a config change. One file per (container id, interface name),
 * written atomically (temporary file + rename).
 *
 * The entry is written before the first plugin runs (with `result: null`), so a crash in the middle of ADD
 * still leaves what DEL needs; it gets the result when ADD succeeds, and is removed when DEL succeeds.
 */
import { mkdir, readFile, rename, unlink, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

/** What is kept per attachment. */
export interface CniCacheEntry {
  kind: 'tapmanagerCniCacheV1'
  containerId: string
  ifName: string
  netns: string
  podName: string
  podNs: string
  /** The network config list used at ADD time, as loaded (name, cniVersion, plugins as written). */
  config: { name: string; cniVersion: string; disableCheck: boolean; plugins: Record<string, unknown>[] }
  /** The raw final ADD result (as the last plugin printed it); null while ADD has not finished. */
  result: Record<string, unknown> | null
}

/** Reads and writes cache entries in one directory. */
export class CniCache {
  constructor(readonly dir: string) {}

  path(containerId: string, ifName: string): string {
    return join(this.dir, `${containerId}-${ifName}.json`)
  }

  async get(containerId: string, ifName: string): Promise<CniCacheEntry | undefined> {
    let text: string
    try {
      text = await readFile(this.path(containerId, ifName), 'utf8')
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined
      throw e
    }
    try {
      const v = JSON.parse(text) as CniCacheEntry
      if (v?.kind !== 'tapmanagerCniCacheV1' || !Array.isArray(v.config?.plugins)) return undefined
      return v
    } catch {
      // a torn or foreign file: treat as absent (DEL then runs with the current config and no prevResult)
      return undefined
    }
  }

  async put(entry: CniCacheEntry): Promise<void> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 })
    const file = this.path(entry.containerId, entry.ifName)
    const tmp = `${file}.${process.pid}.${Math.random().toString(36).slice(2)}.tmp`
    await writeFile(tmp, JSON.stringify(entry), { mode: 0o600 })
    await rename(tmp, file)
  }

  async remove(containerId: string, ifName: string): Promise<void> {
    try {
      await unlink(this.path(containerId, ifName))
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e
    }
  }
}
