/** FDSources for protocol tests. */
import { closeSync, openSync } from 'node:fs'
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
