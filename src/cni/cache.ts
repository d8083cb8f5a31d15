/**
 * The on-disk cache of ADD results, so DEL (and CHECK) get the ADD result as `prevResult` and the config used
 * at ADD time, even after a restart or a config change. One file per (container id, interface name),
 * written atomically (temporary file + rename).
 *
 * The entry is written before the first plugin runs (with `result: null`), so a crash in the middle of ADD
 * still leaves what DEL needs; it gets the result when ADD succeeds, and is removed when DEL succeeds. When an
 * ADD fails and its rollback DEL fails too, the entry stays: the plugins may still hold something (an IPAM
 * lease) that only a later DEL with this config releases; the next DEL of the pod removes it.
 *
 * Writes are atomic, not durable (no fsync: a power loss may lose an entry, and DEL then runs with the current
 * config and no prevResult): the native `replaceFile` with `durable: false` writes the temp file and renames it
 * over the entry in one call. Entries are read with O_NOFOLLOW and replaced by rename (a symlink planted in the
 * dir is never followed). A kill between writing a temp file and renaming it leaves
 * `<entry>.<pid>.<random>.tmp`: {@link CniCache.sweepTemps} removes them.
 */
import { constants as fsc } from 'node:fs'
import { open, readdir, unlink } from 'node:fs/promises'
import { join } from 'node:path'
import { replaceFile } from '../native'

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

/** An entry is a few KiB; anything bigger is not ours. */
const MAX_ENTRY_SIZE = 1 << 20
/** The temp files of {@link CniCache.put}. */
const TEMP_RE = /\.json\.\d+\.[0-9a-z]*\.tmp$/

/** The file name of an attachment's entry. */
function entryName(containerId: string, ifName: string): string {
  return `${containerId}-${ifName}.json`
}

/** Reads and writes cache entries in one directory. */
export class CniCache {
  constructor(readonly dir: string) {}

  path(containerId: string, ifName: string): string {
    return join(this.dir, entryName(containerId, ifName))
  }

  async get(containerId: string, ifName: string): Promise<CniCacheEntry | undefined> {
    let text: string
    try {
      const fh = await open(this.path(containerId, ifName), fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK)
      try {
        const st = await fh.stat()
        if (!st.isFile() || st.size > MAX_ENTRY_SIZE) return undefined
        text = await fh.readFile('utf8')
      } finally {
        await fh.close()
      }
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code
      // ELOOP: a symlink, never followed; treated as absent like any foreign file
      if (code === 'ENOENT' || code === 'ELOOP') return undefined
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

  /** Atomically replaces the attachment's entry (mode 0600); creates the dir (0700) if missing. */
  async put(entry: CniCacheEntry): Promise<void> {
    const name = entryName(entry.containerId, entry.ifName)
    const tmp = `${name}.${process.pid}.${Math.random().toString(36).slice(2)}.tmp`
    await replaceFile(this.dir, name, tmp, JSON.stringify(entry), { durable: false })
  }

  /** Whether an entry file exists for the attachment (an earlier ADD may have left something to DEL). */
  async has(containerId: string, ifName: string): Promise<boolean> {
    return (await this.get(containerId, ifName)) !== undefined
  }

  /**
   * Removes the temp files interrupted writes left (`*.json.<pid>.<random>.tmp`); returns their names. Call it
   * at start, before any write of this process (one owner per dir).
   */
  async sweepTemps(): Promise<string[]> {
    let names: string[]
    try {
      names = await readdir(this.dir)
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return []
      throw e
    }
    const removed: string[] = []
    for (const name of names) {
      if (!TEMP_RE.test(name)) continue
      try {
        await unlink(join(this.dir, name))
        removed.push(name)
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e
      }
    }
    return removed
  }

  async remove(containerId: string, ifName: string): Promise<void> {
    try {
      await unlink(this.path(containerId, ifName))
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e
    }
  }
}
