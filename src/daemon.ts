/**
 * The tapmanager daemon: an FDServer serving a TapFDSource, with persisted state and automatic recovery.
 *
 * For each key the daemon records what recover needs (the pod description and the ContainerSideNetwork)
 * in a state dir: an `adding` record before the add starts, a `ready` record after it succeeded, nothing
 * after a release. On start it recovers every `ready` key by itself (no caller bookkeeping, unlike Virtlet
 * where the runtime must call Recover) and cleans up after every `adding` one (an add interrupted by a
 * crash: CNI DEL, netns deleted), so `kill -9` at any moment leaves nothing behind once it is restarted.
 *
 * Production code holds no test failpoints: the kill -9 tests inject theirs through {@link DaemonOptions}
 * (`ops`, `wrapCni`, `afterReady`; see `__test__/helpers/crash-serve.ts`).
 *
 * Pod netns are bind mounts under the netns dir: the daemon must run in the host's mount namespace (or with
 * that dir on a shared mount), or they die with it. It warns at start when they would (e.g. under
 * `ip netns exec`, which unshares a mount namespace; use `nsenter --net=...` to run it in another netns).
 */
import { existsSync, mkdirSync, readFileSync, realpathSync } from 'node:fs'
import { isNetnsMount, setNetnsPool } from './native'
import { dirname, join } from 'node:path'
import { InvalidInputError, messageOf } from './errors'
import { ExecCniClient, type CniClient, type CniPluginRunEvent } from './cni'
import type { FDSource, GetFDsResult } from './fdsource'
import type { RequestLogger } from './log'
import { encodeGetFDPayload, parseContainerSideNetwork, parseGetFDPayload, type PodNetworkDesc, type RecoverPayload } from './payloads'
import { nativePodNetworkOps, podNetworkOpsWithIpv6, type PodNetworkOps } from './podnetwork'
import { FDServer, type RequestLogEntry } from './server'
import { forEachLimited } from './limit'
import { keyToFileName, StateStore } from './state'
import { TapFDSource } from './tapfdsource'
import { DEFAULT_NETNS_DIR, DEFAULT_NETNS_POOL, MAX_NETNS_POOL } from './defaults'

/** Options of {@link startDaemon}. */
export interface DaemonOptions {
  socketPath: string
  socketMode?: number
  /** Group name or numeric gid of the socket file. */
  socketGroup?: string | null
  /** Peers served (SO_PEERCRED): with either list non-empty, only listed uids/gids; both empty: anyone who can open the socket. */
  allowedUids?: number[]
  allowedGids?: number[]
  cniConfigDir?: string
  cniPluginDirs?: string[]
  /** CNI ADD results are cached here (default `<stateDir>/cni`) so DEL works after a restart. */
  cniCacheDir?: string
  cniTimeoutMs?: number
  netnsDir?: string
  stateDir: string
  calicoSubnetSize?: number
  sriov?: boolean
  /**
   * Pod netns keep the kernel's IPv6 defaults (true), or IPv6 is off by default for the links made in them
   * (false, the default): see {@link PodNetworkOps.createNetns}. Only for the real operations (not `ops`).
   */
  podIpv6?: boolean
  /**
   * Spare pod netns kept made ahead of time (default {@link DEFAULT_NETNS_POOL}; 0: none), so an add only binds
   * one (see the native `setNetnsPool`; process-wide, held by fds, mounted nowhere: nothing is left behind
   * however the process ends). With `ops`, only when given. Stopped by `close()`.
   */
  netnsPool?: number
  /** The server's busy wait after an answer, µs (FDServer's `spinUs`; default there). */
  spinUs?: number
  maxDataSize?: number
  /** Connection caps (FDServer's `maxConnections`, `maxConnectionsPerUid`; defaults there). */
  maxConnections?: number
  maxConnectionsPerUid?: number
  /** One log line per request, plus the daemon's own events. */
  log?: RequestLogger
  /** A CNI client to use instead of executing plugins (tests). */
  cni?: CniClient
  /** The native pod network operations to use (tests and benchmarks wrap them; default the real ones). */
  ops?: PodNetworkOps
  /**
   * Wraps the CNI client the source uses (default: none). Tests pass one that acts after a plugin run (e.g. a
   * kill -9 of the process right after a pod's CNI ADD).
   */
  wrapCni?: (cni: CniClient) => CniClient
  /**
   * Called after a key's `ready` record is written, before its add answers (default: none). Tests kill the
   * process here; a throw fails the add (it is released and its record removed).
   */
  afterReady?: (key: string, podId: string) => void
  /**
   * How many persisted keys are recovered (or cleaned up) at once at start (default
   * {@link DEFAULT_RECOVERY_CONCURRENCY}). Each one in flight holds native threads (a blocking-pool thread and
   * a thread inside the pod netns), so this bounds the threads recovery starts, whatever the number of pods.
   */
  recoveryConcurrency?: number
  /** Told what the daemon does (metrics): see {@link DaemonObserver}. */
  observer?: DaemonObserver
}

/** The options through which a test changes what the daemon does (the command line passes them on as they are). */
export type DaemonHooks = Pick<DaemonOptions, 'ops' | 'wrapCni' | 'afterReady'>

/**
 * Hook points for an observer of the daemon (e.g. `DaemonMetrics`); every method is optional and a throw from
 * one is ignored.
 */
export interface DaemonObserver {
  /** Each request served (natively answered gets included), as the request log sees it. */
  onRequest?(entry: RequestLogEntry): void
  /** Each CNI plugin run (with the daemon's own CNI client; not with `DaemonOptions.cni`). */
  onCniPluginRun?(run: CniPluginRunEvent): void
  /** What the start did with the persisted keys. */
  onRecovery?(report: RecoveryReport): void
  /** The daemon serves its socket. */
  onStarted?(daemon: Daemon): void
  /** Wraps the pod network operations the source uses (e.g. to follow DHCP servers). */
  wrapOps?(ops: PodNetworkOps): PodNetworkOps
}

/** Default of {@link DaemonOptions.recoveryConcurrency}. */
export const DEFAULT_RECOVERY_CONCURRENCY = 8

/** What the daemon did with the persisted keys when it started. */
export interface RecoveryReport {
  recovered: string[]
  /** Keys whose add had been interrupted, cleaned up. */
  cleaned: string[]
  /**
   * Keys that could not be recovered or cleaned, with the reason. A key whose netns vanished is released (CNI
   * DEL) and its record removed; any other failure keeps the record, so the next start tries again.
   */
  skipped: { key: string; reason: string }[]
  /** State files that could not be read (quarantined). */
  corrupt: string[]
}

/** A running daemon. */
export interface Daemon {
  server: FDServer
  source: TapFDSource
  store: StateStore
  recovery: RecoveryReport
  /** Clean stop: no new requests, DHCP servers and fds closed; netns, links and state kept for recovery. */
  close(): Promise<void>
}

/** Records each key's recovery data around the TapFDSource calls. */
class PersistingSource implements FDSource {
  readonly stableInfo = true
  /**
   * Keys being recovered at start from their own state record, with the record already parsed: recover uses it
   * (no second parse of the payload, the ContainerSideNetwork handed to the core as the record holds it) and
   * need not write that record again (a rewrite is two fsyncs per pod, the largest part of recovering hundreds
   * of pods).
   */
  readonly restoringFromState = new Map<string, { payload: RecoverPayload; csnJson: string }>()
  constructor(
    private readonly inner: TapFDSource,
    private readonly store: StateStore,
    private readonly afterReady?: (key: string, podId: string) => void,
  ) {}

  async getFDs(key: string, data: Buffer): Promise<GetFDsResult> {
    const desc = parseGetFDPayload(data).podNetworkDesc
    // Records keep the pod description in its wire form, so a record is a valid RecoverPayload as it is.
    const podNetworkDesc = wireDesc(desc)
    await this.store.write({ key, status: 'adding', podNetworkDesc })
    let res: GetFDsResult
    try {
      res = await this.inner.getFDs(key, data)
    } catch (err) {
      // An add whose CNI ADD and rollback DEL both failed keeps its `adding` record (and the CNI cache entry
      // a DEL needs), so the next start runs the DEL again; any other failure left nothing behind.
      if (!(err as { cniLeftover?: boolean } | null)?.cniLeftover) await this.store.remove(key)
      throw err
    }
    try {
      await this.store.write({ key, status: 'ready', podNetworkDesc, csn: JSON.parse(String(res.data)) })
      this.afterReady?.(key, desc.podId)
    } catch (err) {
      await this.inner.release(key).catch(() => undefined)
      await this.store.remove(key).catch(() => undefined)
      throw err
    }
    return res
  }

  async release(key: string): Promise<void> {
    try {
      await this.inner.release(key)
    } finally {
      // The source forgets the key even when a step failed; so does the state.
      await this.store.remove(key)
    }
  }

  getInfo(key: string): Buffer {
    return this.inner.getInfo(key)
  }

  async recover(key: string, data: Buffer): Promise<void> {
    const restoring = this.restoringFromState.get(key)
    if (restoring) return this.inner.recoverParsed(key, restoring.payload, restoring.csnJson)
    await this.inner.recover(key, data)
    const d = this.inner.describe(key)
    if (d) await this.store.write({ key, status: 'ready', podNetworkDesc: wireDesc(d.podNetworkDesc), csn: JSON.parse(d.csnJson) })
  }

  retrieveFDs(key: string): Promise<number[]> {
    return this.inner.retrieveFDs(key)
  }

  stop(): Promise<void> {
    return this.inner.stop()
  }
}

/** Starts the daemon: recovers persisted keys, then serves. */
export async function startDaemon(opts: DaemonOptions): Promise<Daemon> {
  const netnsDir = opts.netnsDir ?? DEFAULT_NETNS_DIR
  const observer = opts.observer
  const observe = <A extends unknown[]>(fn: ((...a: A) => void) | undefined, ...a: A) => {
    try {
      fn?.apply(observer, a)
    } catch {
      // an observer must not break the daemon
    }
  }
  const execCni =
    opts.cni ??
    new ExecCniClient({
      confDir: opts.cniConfigDir,
      binDirs: opts.cniPluginDirs,
      netnsDir,
      cacheDir: opts.cniCacheDir ?? join(opts.stateDir, 'cni'),
      timeoutMs: opts.cniTimeoutMs,
      onPluginRun: observer?.onCniPluginRun ? (r) => observe(observer.onCniPluginRun, r) : undefined,
    })
  const cni: CniClient = opts.wrapCni ? opts.wrapCni(execCni) : execCni
  const baseOps = opts.ops ?? (opts.podIpv6 ? podNetworkOpsWithIpv6 : nativePodNetworkOps)
  const poolSize = opts.netnsPool ?? DEFAULT_NETNS_POOL
  if (!Number.isInteger(poolSize) || poolSize < 0 || poolSize > MAX_NETNS_POOL) {
    throw new InvalidInputError(`netnsPool must be an integer from 0 to ${MAX_NETNS_POOL}, not ${poolSize}`)
  }
  const usesPool = poolSize > 0 && (opts.ops === undefined || opts.netnsPool !== undefined)
  const source = new TapFDSource(cni, {
    enableSriov: opts.sriov,
    calicoSubnetSize: opts.calicoSubnetSize,
    netnsDir,
    ops: observer?.wrapOps ? observer.wrapOps(baseOps) : baseOps,
  })
  const store = new StateStore(opts.stateDir)
  // Both sweep the temp files a kill between write and rename left (state records, CNI cache entries).
  const { removedTemps } = await store.init()
  const cniTemps = execCni instanceof ExecCniClient ? await execCni.sweepTempFiles() : []
  const persisting = new PersistingSource(source, store, opts.afterReady)
  const server = new FDServer(opts.socketPath, persisting, {
    socketMode: opts.socketMode,
    socketGid: resolveGroup(opts.socketGroup),
    allowedUids: opts.allowedUids?.length || opts.allowedGids?.length ? opts.allowedUids : undefined,
    allowedGids: opts.allowedUids?.length || opts.allowedGids?.length ? opts.allowedGids : undefined,
    maxDataSize: opts.maxDataSize,
    maxConnections: opts.maxConnections,
    maxConnectionsPerUid: opts.maxConnectionsPerUid,
    spinUs: opts.spinUs,
    // `tapmanager ls` asks the server: what it serves, and what recovery skipped and why.
    listInfo: () => ({ skipped: recovery?.skipped ?? [] }),
    onLimits: opts.log ? (r) => opts.log!.logger.warn(r, 'connections refused or accept() failed') : undefined,
    onFatal: opts.log ? (err) => opts.log!.logger.error({ err: err.message }, 'server stopped serving') : undefined,
    onRequest:
      opts.log || observer?.onRequest
        ? (e) => {
            opts.log?.request({ ...e, durationMs: Math.round(e.durationMs * 1000) / 1000, peer: e.peer ? { ...e.peer } : undefined })
            observe(observer?.onRequest, e)
          }
        : undefined,
  })

  if (opts.log) {
    warnPrivateMountNs(opts.log, netnsDir)
    if (removedTemps.length || cniTemps.length) {
      opts.log.logger.info({ stateTemps: removedTemps.length, cniCacheTemps: cniTemps.length }, 'removed temp files of interrupted writes')
    }
  }
  let recovery: RecoveryReport | undefined
  try {
    recovery = await recoverPersisted(persisting, source, store, server, opts.recoveryConcurrency ?? DEFAULT_RECOVERY_CONCURRENCY)
    if (opts.log) logRecovery(opts.log, recovery)
    observe(observer?.onRecovery, recovery)
    mkdirSync(dirname(opts.socketPath), { recursive: true })
    // After recovery (which makes no netns): the pool fills while the server starts.
    if (usesPool) setNetnsPool(poolSize, opts.podIpv6 === true)
    await server.serve()
  } catch (err) {
    // Nothing may stay open after a failed start (DHCP servers of recovered keys, their fds, spare netns).
    await server.stop().catch(() => undefined)
    if (usesPool) setNetnsPool(0)
    throw err
  }
  const daemon: Daemon = {
    server,
    source,
    store,
    recovery,
    close: async () => {
      try {
        await server.stop()
      } finally {
        if (usesPool) setNetnsPool(0)
      }
    },
  }
  observe(observer?.onStarted, daemon)
  return daemon
}

async function recoverPersisted(
  persisting: PersistingSource,
  source: TapFDSource,
  store: StateStore,
  server: FDServer,
  concurrency: number,
): Promise<RecoveryReport> {
  const report: RecoveryReport = { recovered: [], cleaned: [], skipped: [], corrupt: [] }
  const listing = await store.list()
  for (const c of listing.corrupt) {
    await store.quarantine(c.file).catch(() => undefined)
    report.corrupt.push(c.file)
  }
  // Ready keys first: they claim their pod ids, so the cleanup of an interrupted add that tried to take a pod id
  // a live key holds (a second key's failed claim) drops that record and touches nothing of the live pod.
  const ready = listing.records.filter((r) => r.status === 'ready')
  const adding = listing.records.filter((r) => r.status !== 'ready')
  const recoverOne = async (rec: (typeof listing.records)[number]): Promise<void> => {
    let desc: PodNetworkDesc
    try {
      desc = parseGetFDPayload(JSON.stringify({ podNetworkDesc: rec.podNetworkDesc })).podNetworkDesc
    } catch (err) {
      report.skipped.push({ key: rec.key, reason: `bad pod description: ${messageOf(err)}` })
      await store.quarantine(keyToFileName(rec.key)).catch(() => undefined)
      return
    }
    if (rec.status === 'adding') {
      try {
        await source.cleanupPod(desc)
        report.cleaned.push(rec.key)
        await store.remove(rec.key)
      } catch (err) {
        // The record stays, so the next start tries again (a new add of the key replaces it).
        report.skipped.push({ key: rec.key, reason: `cleanup of an interrupted add: ${messageOf(err)}` })
      }
      return
    }
    try {
      // The record's csn is what the core answered at add (or what recover passed on): it goes back as it is.
      const csnJson = JSON.stringify(rec.csn)
      const csn = parseContainerSideNetwork(csnJson)
      // A record is a valid RecoverPayload as it is (its pod description is kept in wire form); the source is
      // given the parsed form too, so it parses and encodes nothing again.
      const payload = JSON.stringify({ podNetworkDesc: rec.podNetworkDesc, csn: rec.csn, haveRunningContainers: false })
      persisting.restoringFromState.set(rec.key, { payload: { podNetworkDesc: desc, csn, haveRunningContainers: false }, csnJson })
      try {
        await server.restore(rec.key, Buffer.from(payload))
      } finally {
        persisting.restoringFromState.delete(rec.key)
      }
      report.recovered.push(rec.key)
    } catch (err) {
      report.skipped.push({ key: rec.key, reason: messageOf(err) })
      // A pod whose netns vanished can never come back: release its IPAM lease and forget it. Any other
      // failure keeps the record, so a later start can try again.
      // "Vanished" means no live netns mount at the path (a plain file or a symlink there is none).
      const nsPath = (rec.csn as { NsPath?: unknown } | undefined)?.NsPath
      if (typeof nsPath !== 'string' || !isNetnsMount(nsPath)) {
        await source.cleanupPod(desc).catch(() => undefined)
        await store.remove(rec.key)
      }
    }
  }
  // At most `concurrency` keys at once (each holds native threads while it runs).
  await forEachLimited(ready, concurrency, recoverOne)
  await forEachLimited(adding, concurrency, recoverOne)
  return report
}

/** A group name or numeric gid to a gid (undefined keeps the process's group). */
function resolveGroup(group: string | null | undefined): number | undefined {
  if (group == null || group === '') return undefined
  if (/^\d+$/.test(group)) return Number(group)
  for (const line of readFileSync('/etc/group', 'utf8').split('\n')) {
    const [name, , gid] = line.split(':')
    if (name === group) return Number(gid)
  }
  throw new Error(`unknown group ${JSON.stringify(group)}`)
}


/** One line per persisted key: recovered, cleaned up (interrupted add), skipped (with the reason), corrupt. */
function logRecovery(log: RequestLogger, r: RecoveryReport): void {
  for (const key of r.recovered) log.logger.info({ key }, 'recovered')
  for (const key of r.cleaned) log.logger.info({ key }, 'cleaned up an interrupted add')
  for (const s of r.skipped) log.logger.warn({ key: s.key, reason: s.reason }, 'skipped: could not recover')
  for (const file of r.corrupt) log.logger.warn({ file }, 'corrupt state file quarantined')
  log.logger.info({ recovered: r.recovered.length, cleaned: r.cleaned.length, skipped: r.skipped.length, corrupt: r.corrupt.length }, 'recovery done')
}

/** A pod description in its wire (Go JSON) form. */
function wireDesc(desc: PodNetworkDesc): unknown {
  return (JSON.parse(encodeGetFDPayload({ podNetworkDesc: desc })) as { podNetworkDesc: unknown }).podNetworkDesc
}

/**
 * Warns when the pod netns the daemon bind-mounts under `netnsDir` would not be seen outside this process's
 * mount namespace (the mount holding the dir is not shared, as under `ip netns exec`, which unshares a slave
 * mount namespace): such mounts die with the process, so a restart cannot recover the pods. Run the daemon in
 * the host's mount namespace (`nsenter --net=...` to pick a netns), or with the dir mounted rshared.
 */
function warnPrivateMountNs(log: RequestLogger, netnsDir: string): void {
  let path: string
  let mountinfo: string
  try {
    path = realpathSync(existsSync(netnsDir) ? netnsDir : dirname(netnsDir))
    mountinfo = readFileSync('/proc/self/mountinfo', 'utf8')
  } catch {
    return
  }
  let best: { point: string; shared: boolean } | undefined
  for (const line of mountinfo.split('\n')) {
    const f = line.split(' ')
    const point = f[4]?.replace(/\\040/g, ' ')
    if (!point || !(path === point || path.startsWith(point === '/' ? '/' : `${point}/`))) continue
    if (best && best.point.length > point.length) continue
    const optional = f.slice(6, f.indexOf('-'))
    best = { point, shared: optional.some((o) => o.startsWith('shared:')) }
  }
  if (best && !best.shared) {
    log.logger.warn(
      { netnsDir, mount: best.point },
      'the netns dir is not on a shared mount: pod netns will not outlive this process (run in the host mount namespace, e.g. nsenter --net rather than ip netns exec)',
    )
  }
}
