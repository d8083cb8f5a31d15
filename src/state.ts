/**
 * The server's persisted state: one JSON file per key under a state dir, holding what recover needs (the pod
 * network description and the ContainerSideNetwork, kept as opaque JSON) and whether the add finished.
 *
 * Writes are atomic: a temp file in the same dir is written and fsynced, renamed over the record, and the dir
 * is fsynced, so after a crash at any point a record is either the old one, the new one, or absent, never torn.
 * The native `replaceFile` does all of that (and `removeFile` a remove and its dir fsync) in one call on a
 * blocking thread: one crossing per write instead of a thread-pool round trip per syscall (a pod's add writes
 * its record twice). A crash can leave a temp file (`.<name>.tmp-*`): readers ignore it, `init()` removes it.
 * A record that does not parse is reported (in `list()`, as a StateCorruptError from `read()`), never dropped
 * silently; `quarantine()` moves it aside for an operator to look at.
 * Symlinks are never followed: records are opened O_NOFOLLOW (a symlink, or anything not a regular file, named
 * like a record is reported as corrupt), and unlink/rename act on the entry itself.
 */
import { randomBytes } from 'node:crypto'
import { closeSync, constants as fsc, fstatSync, openSync, readFileSync } from 'node:fs'
import { mkdir, open, readdir, rename, unlink } from 'node:fs/promises'
import { join } from 'node:path'
import { InvalidInputError, TapmanagerError } from './errors'

/**
 * The addon, loaded on the first write: this module is also what the command line's `--help`, `-V` and `ls`
 * use, which must work where the addon is not installed.
 */
let nativeModule: Promise<typeof import('./native')> | undefined
const native = (): Promise<typeof import('./native')> => (nativeModule ??= import('./native'))

/** Where `tapmanager serve` keeps its state unless told otherwise. */
export const DEFAULT_STATE_DIR = '/var/lib/tapmanager'

/** `adding`: written before the add's side effects (netns setup, IPAM); `ready`: the add succeeded. */
export type StateStatus = 'adding' | 'ready'

/** One key's persisted state. */
export interface StateRecord {
  /** Format version of the file. */
  version: 1
  key: string
  status: StateStatus
  /** The add payload's `podNetworkDesc` (opaque here). */
  podNetworkDesc: unknown
  /** The ContainerSideNetwork the add returned (opaque here); null while adding. */
  csn: unknown
  /** ISO 8601 time of the write. */
  updatedAt: string
}

/** What a caller gives to {@link StateStore.write}. */
export interface StateRecordInput {
  key: string
  status: StateStatus
  podNetworkDesc: unknown
  csn?: unknown
}

/** A record file that cannot be used. */
export interface CorruptStateFile {
  /** File name in the state dir. */
  file: string
  /** The key the file name stands for, when it decodes. */
  key: string | null
  /** Why it is unusable. */
  reason: string
}

/** Everything in a state dir. */
export interface StateListing {
  /** Good records, sorted by key. */
  records: StateRecord[]
  /** Record files that do not parse or validate. */
  corrupt: CorruptStateFile[]
  /** Files set aside by quarantine(). */
  quarantined: string[]
  /** Leftover temp files of interrupted writes (ignored; init() removes them). */
  staleTemps: string[]
}

/** A state record file exists but is unusable. */
export class StateCorruptError extends TapmanagerError {
  readonly file: string
  constructor(file: string, reason: string, options?: { cause?: unknown }) {
    super('ERR_STATE_CORRUPT', `corrupt state file ${file}: ${reason}`, options)
    this.file = file
  }
}

const RECORD_SUFFIX = '.json'
const QUARANTINE_SUFFIX = '.corrupt'
const TEMP_MARK = '.tmp-'
const MAX_NAME = 250

/**
 * Maps a key to a safe file name: `[A-Za-z0-9_.-]` stay as they are, every other byte of the UTF-8 key
 * (and `%`, and a leading `.`) becomes `%XX`; then `.json`. Names never start with `.`, so they can't clash
 * with temp files or be `.`/`..`.
 */
export function keyToFileName(key: string): string {
  if (typeof key !== 'string' || key.length === 0) throw new InvalidInputError('state key must be a non-empty string')
  let out = ''
  const bytes = Buffer.from(key, 'utf8')
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i]
    const c = String.fromCharCode(b)
    const safe = /[A-Za-z0-9_.-]/.test(c) && !(i === 0 && c === '.')
    out += safe ? c : `%${b.toString(16).toUpperCase().padStart(2, '0')}`
  }
  const name = out + RECORD_SUFFIX
  if (name.length > MAX_NAME) throw new InvalidInputError(`state key too long for a file name (${name.length} > ${MAX_NAME})`)
  return name
}

/** The inverse of {@link keyToFileName}; null for a name it cannot have produced. */
export function fileNameToKey(name: string): string | null {
  if (!name.endsWith(RECORD_SUFFIX) || name.startsWith('.')) return null
  const body = name.slice(0, -RECORD_SUFFIX.length)
  if (!/^(?:[A-Za-z0-9_.-]|%[0-9A-F]{2})+$/.test(body)) return null
  const bytes: number[] = []
  for (let i = 0; i < body.length; ) {
    if (body[i] === '%') {
      bytes.push(parseInt(body.slice(i + 1, i + 3), 16))
      i += 3
    } else {
      bytes.push(body.charCodeAt(i))
      i++
    }
  }
  const key = Buffer.from(bytes).toString('utf8')
  return keyToFileName(key) === name ? key : null
}

function validate(value: unknown, expectedKey: string | null): StateRecord {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new Error('not a JSON object')
  const r = value as Record<string, unknown>
  if (r.version !== 1) throw new Error(`unsupported version ${JSON.stringify(r.version)}`)
  if (typeof r.key !== 'string' || r.key.length === 0) throw new Error('missing key')
  if (expectedKey !== null && r.key !== expectedKey) throw new Error(`key ${JSON.stringify(r.key)} does not match the file name`)
  if (r.status !== 'adding' && r.status !== 'ready') throw new Error(`bad status ${JSON.stringify(r.status)}`)
  if (!('podNetworkDesc' in r) || typeof r.podNetworkDesc !== 'object' || r.podNetworkDesc === null) {
    throw new Error('missing podNetworkDesc')
  }
  if (r.status === 'ready' && (typeof r.csn !== 'object' || r.csn === null)) throw new Error('a ready record needs csn')
  if (typeof r.updatedAt !== 'string') throw new Error('missing updatedAt')
  return {
    version: 1,
    key: r.key,
    status: r.status,
    podNetworkDesc: r.podNetworkDesc,
    csn: r.csn ?? null,
    updatedAt: r.updatedAt,
  }
}

/** The largest record read (a real one is a few KiB). */
const MAX_RECORD_SIZE = 1 << 20

/** Reads a record file: never follows a symlink (ELOOP), never blocks on a FIFO, regular files only. */
async function readRecordFile(path: string): Promise<string> {
  const fh = await open(path, fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK | fsc.O_NOCTTY)
  try {
    const st = await fh.stat()
    if (!st.isFile()) throw new Error('not a regular file')
    if (st.size > MAX_RECORD_SIZE) throw new Error(`too large (${st.size} bytes)`)
    return await fh.readFile('utf8')
  } finally {
    await fh.close()
  }
}

/** {@link readRecordFile}, synchronously (the same checks: no symlink, a regular file, bounded size). */
function readRecordFileSync(path: string): string {
  const fd = openSync(path, fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK | fsc.O_NOCTTY)
  try {
    const st = fstatSync(fd)
    if (!st.isFile()) throw new Error('not a regular file')
    if (st.size > MAX_RECORD_SIZE) throw new Error(`too large (${st.size} bytes)`)
    return readFileSync(fd, 'utf8')
  } finally {
    closeSync(fd)
  }
}

function isErrno(err: unknown, code: string): boolean {
  return (err as NodeJS.ErrnoException | null)?.code === code
}

/** The per-key state files of one state dir. One server owns a dir at a time. */
export class StateStore {
  readonly dir: string

  constructor(dir: string = DEFAULT_STATE_DIR) {
    this.dir = dir
  }

  /** Creates the dir (mode 0700) if missing and removes temp files left by interrupted writes. */
  async init(): Promise<{ removedTemps: string[] }> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 })
    const removedTemps: string[] = []
    for (const name of await readdir(this.dir)) {
      if (name.startsWith('.') && name.includes(TEMP_MARK)) {
        await unlink(join(this.dir, name)).catch((err) => {
          if (!isErrno(err, 'ENOENT')) throw err
        })
        removedTemps.push(name)
      }
    }
    if (removedTemps.length > 0) await this.syncDir()
    return { removedTemps }
  }

  /** The path of a key's record file. */
  pathOf(key: string): string {
    return join(this.dir, keyToFileName(key))
  }

  /**
   * Atomically and durably replaces the key's record (write temp, fsync, rename, fsync dir: the native
   * `replaceFile`, one call). Creates the dir (0700) if missing. Rejects with the native error (its `code`
   * follows the errno, its message names the step and the path); no temp file is left behind then.
   */
  async write(input: StateRecordInput): Promise<StateRecord> {
    const name = keyToFileName(input.key)
    const record = validate(
      {
        version: 1,
        key: input.key,
        status: input.status,
        podNetworkDesc: input.podNetworkDesc,
        csn: input.csn ?? null,
        updatedAt: new Date().toISOString(),
      },
      input.key,
    )
    const tmp = `.${name}${TEMP_MARK}${process.pid}-${randomBytes(4).toString('hex')}`
    await (await native()).replaceFile(this.dir, name, tmp, JSON.stringify(record) + '\n')
    return record
  }

  /** The key's record, or null if there is none. Throws StateCorruptError for an unusable file. */
  async read(key: string): Promise<StateRecord | null> {
    const name = keyToFileName(key)
    let text: string
    try {
      text = await readRecordFile(join(this.dir, name))
    } catch (err) {
      if (isErrno(err, 'ENOENT')) return null
      if (isErrno(err, 'ELOOP')) throw new StateCorruptError(name, 'a symlink (never followed)', { cause: err })
      if (err instanceof Error && !(err as NodeJS.ErrnoException).code) throw new StateCorruptError(name, err.message, { cause: err })
      throw err
    }
    return this.parse(name, key, text)
  }

  /** Removes the key's record and fsyncs the dir (the native `removeFile`). Returns false if there was none. */
  async remove(key: string): Promise<boolean> {
    return (await native()).removeFile(this.dir, keyToFileName(key))
  }

  /**
   * Lists the dir: good records, corrupt files (reported, left in place), quarantined files and stale temps.
   * A missing dir lists as empty.
   */
  async list(): Promise<StateListing> {
    const listing: StateListing = { records: [], corrupt: [], quarantined: [], staleTemps: [] }
    let names: string[]
    try {
      names = await readdir(this.dir)
    } catch (err) {
      if (isErrno(err, 'ENOENT')) return listing
      throw err
    }
    for (const name of names.sort()) {
      if (name.startsWith('.') && name.includes(TEMP_MARK)) {
        listing.staleTemps.push(name)
        continue
      }
      if (name.endsWith(QUARANTINE_SUFFIX)) {
        listing.quarantined.push(name)
        continue
      }
      if (!name.endsWith(RECORD_SUFFIX)) continue
      const key = fileNameToKey(name)
      if (key === null) {
        listing.corrupt.push({ file: name, key: null, reason: 'file name is not an encoded key' })
        continue
      }
      let text: string
      try {
        // Synchronous on purpose: hundreds of small files read one after the other through the thread pool
        // (shared with other fsyncs) cost an event-loop round trip each; this took seconds at start on a busy node.
        text = readRecordFileSync(join(this.dir, name))
      } catch (err) {
        if (isErrno(err, 'ENOENT')) continue // removed meanwhile
        const reason = isErrno(err, 'ELOOP') ? 'a symlink (never followed)' : (err as Error).message
        listing.corrupt.push({ file: name, key, reason })
        continue
      }
      try {
        listing.records.push(this.parse(name, key, text))
      } catch (err) {
        listing.corrupt.push({ file: name, key, reason: (err as StateCorruptError).message })
      }
    }
    listing.records.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0))
    return listing
  }

  /**
   * Moves an unusable record file (a `file` from `list().corrupt`) aside as `<file>.<time>.corrupt`, so the key
   * is free again while the bytes stay for an operator. Returns the new name.
   */
  async quarantine(file: string): Promise<string> {
    if (file.includes('/') || file.startsWith('.') || !file.endsWith(RECORD_SUFFIX)) {
      throw new InvalidInputError(`not a state record file name: ${JSON.stringify(file)}`)
    }
    const target = `${file}.${new Date().toISOString().replace(/[:.]/g, '-')}${QUARANTINE_SUFFIX}`
    await rename(join(this.dir, file), join(this.dir, target))
    await this.syncDir()
    return target
  }

  private parse(name: string, key: string, text: string): StateRecord {
    let value: unknown
    try {
      value = JSON.parse(text)
    } catch (err) {
      throw new StateCorruptError(name, `bad JSON (${(err as Error).message})`, { cause: err })
    }
    try {
      return validate(value, key)
    } catch (err) {
      throw new StateCorruptError(name, (err as Error).message, { cause: err })
    }
  }

  private async syncDir(): Promise<void> {
    const dh = await open(this.dir, fsc.O_RDONLY | fsc.O_DIRECTORY)
    try {
      await dh.sync()
    } finally {
      await dh.close()
    }
  }
}
