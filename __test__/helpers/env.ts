/**
 * Test prerequisites and throwaway network namespaces.
 *
 * Tests need root and Debian tools (scripts/setup.sh installs them). A missing prerequisite fails the test
 * with a clear message: it never skips silently (and under CI=true nothing is ever skipped).
 */
import { execFileSync, spawnSync } from 'node:child_process'
import { existsSync, readdirSync } from 'node:fs'
import { randomBytes } from 'node:crypto'

/** Throws unless running as root and every named executable exists. */
export function requirePrereqs(tools: string[] = []): void {
  if (process.getuid?.() !== 0) throw new Error('prerequisite missing: these tests need root')
  for (const tool of tools) {
    const found = tool.startsWith('/') ? existsSync(tool) : spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0
    if (!found) throw new Error(`prerequisite missing: ${tool} (run scripts/setup.sh)`)
  }
}

/** A short unique name with a prefix, usable as a netns or link name (at most 15 characters). */
export function uniqueName(prefix: string): string {
  return `${prefix}${randomBytes(4).toString('hex')}`.slice(0, 15)
}

/** Runs a command and returns its stdout; throws with stderr on failure. */
export function sh(cmd: string, args: string[], opts: { input?: string; timeout?: number } = {}): string {
  return execFileSync(cmd, args, { encoding: 'utf8', input: opts.input, timeout: opts.timeout ?? 30_000 })
}

/** Runs a command inside a named netns (`ip netns exec`). */
export function nsExec(ns: string, cmd: string, args: string[], opts: { input?: string; timeout?: number } = {}): string {
  return sh('ip', ['netns', 'exec', ns, cmd, ...args], opts)
}

/** A test netns created with `ip netns add` and removed by `cleanup()` (kills what still runs in it). */
export class TestNetns {
  readonly name: string
  constructor(prefix = 'tmt') {
    this.name = uniqueName(prefix)
    sh('ip', ['netns', 'add', this.name])
    nsExec(this.name, 'ip', ['link', 'set', 'lo', 'up'])
  }
  get path(): string {
    return `/var/run/netns/${this.name}`
  }
  exec(cmd: string, args: string[], opts: { input?: string; timeout?: number } = {}): string {
    return nsExec(this.name, cmd, args, opts)
  }
  cleanup(): void {
    const pids = spawnSync('ip', ['netns', 'pids', this.name], { encoding: 'utf8' }).stdout.split(/\s+/).filter(Boolean)
    for (const pid of pids) spawnSync('kill', ['-9', pid])
    spawnSync('ip', ['netns', 'del', this.name])
  }
}

/** Lists the named netns (names only). */
export function listNetns(): string[] {
  return sh('ip', ['netns', 'list']).split('\n').map((l) => l.split(' ')[0]).filter(Boolean)
}

/** The number of open fds of this process. */
export function openFdCount(): number {
  return readdirSync('/proc/self/fd').length
}

/** Polls `cond` every `everyMs` until it holds or `ms` have passed; returns whether it did (a last look at the end). */
export async function until(cond: () => boolean | Promise<boolean>, ms = 10_000, everyMs = 10): Promise<boolean> {
  const end = Date.now() + ms
  while (Date.now() < end) {
    if (await cond()) return true
    await new Promise((r) => setTimeout(r, everyMs))
  }
  return cond()
}
