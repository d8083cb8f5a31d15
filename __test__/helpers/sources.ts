/** FDSources for protocol tests. */
import type { ExecutionContext } from 'ava'
import { closeSync, openSync, readSync, writeFileSync } from 'node:fs'
import type { FDClient } from '../../src/client'
import type { FDSource } from '../../src/fdsource'

/**
 * A source whose add opens `count` read-only fds of `file` (answering `added:<key>`), whose get info is
 * `info:<key>`, and whose release closes them. `held`: the fds of each key added and not released yet.
 */
export function sameFileSource(file: string, count: number): FDSource & { readonly held: Map<string, number[]> } {
  const held = new Map<string, number[]>()
  return {
    held,
    getFDs(key) {
      const fds = Array.from({ length: count }, () => openSync(file, 'r'))
      held.set(key, fds)
      return { fds, data: Buffer.from(`added:${key}`) }
    },
    release(key) {
      for (const fd of held.get(key) ?? []) closeSync(fd)
      held.delete(key)
    },
    getInfo: (key) => Buffer.from(`info:${key}`),
    recover() {},
    retrieveFDs: () => [],
    stop() {},
  }
}

/**
 * One get of `key` from a {@link sameFileSource} server: checks the info and the number of fds, reads `content`
 * through fd `readIndex`, closes every fd.
 */
export async function getAndRead(t: ExecutionContext, client: FDClient, key: string, count: number, readIndex: number, content: string): Promise<void> {
  const { fds, info } = await client.getFDs(key)
  t.is(info.toString(), `info:${key}`)
  t.is(fds.length, count)
  const buf = Buffer.alloc(content.length)
  t.is(readSync(fds[readIndex], buf, 0, content.length, 0), content.length)
  t.is(buf.toString(), content)
  for (const fd of fds) closeSync(fd)
}

/**
 * A source whose key "nN" or "iN" (optionally followed by "-anything") has N fds of one file (`content` written to
 * `file`), its add answering `added:<payload>`. Its get info is `info-<key>`: for every key with `infoForAll`,
 * else only for "i" keys (empty for the others). With `stableInfo` a server answers later gets natively;
 * `infoCalls` counts the getInfo calls.
 */
export class CountingSource implements FDSource {
  readonly open = new Map<string, number[]>()
  readonly stableInfo: boolean
  infoCalls = 0
  constructor(
    readonly file: string,
    content: string,
    private readonly opts: { stableInfo?: boolean; infoForAll?: boolean } = {},
  ) {
    writeFileSync(file, content)
    this.stableInfo = opts.stableInfo ?? false
  }
  getFDs(key: string, data: Buffer) {
    const fds = Array.from({ length: Number(key.slice(1).split('-')[0]) }, () => openSync(this.file, 'r'))
    this.open.set(key, fds)
    return { fds, data: Buffer.from(`added:${data.toString()}`) }
  }
  release(key: string) {
    for (const fd of this.open.get(key) ?? []) closeSync(fd)
    this.open.delete(key)
  }
  getInfo(key: string) {
    this.infoCalls++
    return this.opts.infoForAll || key.startsWith('i') ? Buffer.from(`info-${key}`) : Buffer.alloc(0)
  }
  recover() {}
  retrieveFDs(): number[] {
    return []
  }
  stop() {
    for (const k of [...this.open.keys()]) this.release(k)
  }
}
