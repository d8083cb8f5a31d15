/**
 * A file-backed FDSource: each key gets real files whose fds the server hands out. Used by the tests and
 * usable by a demo. Add data (JSON): `{"contents": ["text of file 0", "text of file 1"]}`; the add response
 * and get info are JSON `{"key": ..., "paths": [...]}`. Recover data is the add response, so a restarted
 * server reopens the same files on the first get.
 */
import { closeSync, mkdirSync, openSync, rmSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import type { FDSource, GetFDsResult } from '../src/fdsource'

interface KeyState {
  paths: string[]
  fds: number[]
}

export class FileFDSource implements FDSource {
  /** getInfo depends only on the key's files, fixed from add to release. */
  readonly stableInfo = true
  readonly dir: string
  private readonly keys = new Map<string, KeyState>()
  private seq = 0
  /** Every key the source was asked to release, in order (for tests). */
  readonly released: string[] = []

  constructor(dir: string) {
    this.dir = dir
    mkdirSync(dir, { recursive: true })
  }

  getFDs(key: string, data: Buffer): GetFDsResult {
    const parsed = JSON.parse(data.toString('utf8')) as { contents?: unknown }
    if (!Array.isArray(parsed.contents) || !parsed.contents.every((c) => typeof c === 'string')) {
      throw new Error('add data must be {"contents": [string, ...]}')
    }
    const paths: string[] = []
    const fds: number[] = []
    try {
      for (const content of parsed.contents as string[]) {
        const path = join(this.dir, `f${++this.seq}`)
        writeFileSync(path, content)
        paths.push(path)
        fds.push(openSync(path, 'r'))
      }
    } catch (err) {
      for (const fd of fds) closeSync(fd)
      for (const p of paths) rmSync(p, { force: true })
      throw err
    }
    // A duplicate add never reaches the source (the server refuses it first); still, never leak.
    const old = this.keys.get(key)
    if (old) this.closeKey(old)
    this.keys.set(key, { paths, fds })
    return { fds, data: this.infoOf(key, paths) }
  }

  release(key: string): void {
    const st = this.keys.get(key)
    if (!st) throw new Error(`unknown key ${key}`)
    this.closeKey(st)
    for (const p of st.paths) rmSync(p, { force: true })
    this.keys.delete(key)
    this.released.push(key)
  }

  getInfo(key: string): Buffer {
    const st = this.keys.get(key)
    if (!st) throw new Error(`unknown key ${key}`)
    return this.infoOf(key, st.paths)
  }

  recover(key: string, data: Buffer): void {
    const parsed = JSON.parse(data.toString('utf8')) as { paths?: unknown }
    if (!Array.isArray(parsed.paths) || !parsed.paths.every((p) => typeof p === 'string')) {
      throw new Error('recover data must be {"paths": [string, ...]}')
    }
    this.keys.set(key, { paths: parsed.paths as string[], fds: [] })
  }

  retrieveFDs(key: string): number[] {
    const st = this.keys.get(key)
    if (!st) throw new Error(`unknown key ${key}`)
    if (st.fds.length === 0) st.fds = st.paths.map((p) => openSync(p, 'r'))
    return st.fds
  }

  stop(): void {
    for (const st of this.keys.values()) this.closeKey(st)
    this.keys.clear()
  }

  /** The number of keys held. */
  get size(): number {
    return this.keys.size
  }

  private closeKey(st: KeyState): void {
    for (const fd of st.fds) closeSync(fd)
    st.fds = []
  }

  private infoOf(key: string, paths: string[]): Buffer {
    return Buffer.from(JSON.stringify({ key, paths }))
  }
}
