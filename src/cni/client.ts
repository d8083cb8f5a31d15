/**
 * The CNI client: attaches pod sandboxes (network namespaces) to the node's CNI network by running the
 * plugins of the first valid network config, as a container runtime does (CNI spec, libcni behaviour).
 *
 * It does NOT create pod network namespaces: the caller creates `<netnsDir>/<podId>` before
 * `addSandboxToNetwork` and deletes it after `removeSandboxFromNetwork`. Only the dummy network
 * (`getDummyNetwork`) creates and deletes its own netns, through the injected `createNetns`/`deleteNetns`.
 */
import { stat } from 'node:fs/promises'
import { errorCode, InvalidInputError } from '../errors'
import { isNetnsMount } from '../native'
import { CniCache, type CniCacheEntry } from './cache'
import { CNI_NAME_RE, loadNetworkConfig, type CniNetworkConfig } from './config'
import { CniError, type CniCommand } from './errors'
import { execPlugin } from './exec'
import { compareCniVersions, normalizeCniResult, type CniResult } from './result'
import { DEFAULT_NETNS_DIR, podNetnsPath } from '../defaults'
import { nativePodNetworkOps } from '../podnetwork'

/** One pod attached to the network. */
export interface CniAttachment {
  /** The final result of the plugin list (the last plugin's), normalised. */
  result: CniResult
  /** The same result exactly as the last plugin printed it. */
  raw: Record<string, unknown>
  /** The pod's netns path the plugins got as CNI_NETNS (`<netnsDir>/<podId>`). */
  nsPath: string
  /** The network name of the config used. */
  network: string
}

/**
 * What TapFDSource needs from CNI (Virtlet's `cni.Client`, plus CHECK).
 * - `addSandboxToNetwork`: CNI ADD of the pod's netns (which the caller created) to the network; resolves to
 *   the final result of the plugin list and the netns path. A failed ADD has already run DEL (no IPAM lease
 *   is left) when it rejects.
 * - `removeSandboxFromNetwork`: CNI DEL (idempotent: a pod that was never added, or already removed, is fine).
 * - `checkSandboxNetwork`: CNI CHECK against the cached ADD result (needs cniVersion >= 0.4.0).
 * - `getDummyNetwork`: a throwaway pod added once per client lifetime (for Calico's gateway), with its own netns.
 */
export interface CniClient {
  addSandboxToNetwork(podId: string, podName: string, podNs: string): Promise<CniAttachment>
  removeSandboxFromNetwork(podId: string, podName: string, podNs: string): Promise<void>
  checkSandboxNetwork(podId: string, podName: string, podNs: string): Promise<void>
  getDummyNetwork(): Promise<CniAttachment>
  /** Whether an earlier ADD of the pod left something a DEL still has to undo (its cache entry). Optional. */
  hasLeftover?(podId: string): Promise<boolean>
}

/** Creates or deletes a named network namespace at a path (injected so the native ones can be used). */
export type NetnsFn = (path: string) => Promise<void> | void

/** A create/delete pair of {@link NetnsFn}. */
export interface NetnsOps {
  create: NetnsFn
  delete: NetnsFn
}

/**
 * The default {@link NetnsOps}: the native netns code pods use ({@link nativePodNetworkOps}: `ip netns
 * add/del`-compatible in any dir, without spawning anything; delete unmounts and removes the file, a missing
 * one is fine).
 */
export const nativeNetnsOps: NetnsOps = {
  create: (path) => nativePodNetworkOps.createNetns(path),
  delete: (path) => nativePodNetworkOps.deleteNetns(path),
}

/** @deprecated The former name of {@link nativeNetnsOps} (which no longer spawns `ip`, `unshare` or `umount`). */
export const ipNetnsOps: NetnsOps = nativeNetnsOps

/** Options of {@link ExecCniClient}. */
export interface ExecCniClientOptions {
  /** Network config dir. Default `/etc/cni/net.d`. */
  confDir?: string
  /** Plugin dirs, searched in order; also CNI_PATH. Default `['/opt/cni/bin', '/usr/lib/cni']`. */
  binDirs?: string[]
  /** Where pod netns live: the pod's netns is `<netnsDir>/<podId>`. Default `/var/run/netns`. */
  netnsDir?: string
  /** Where ADD results are cached on disk (DEL after a restart). Default `/var/lib/tapmanager/cni`. */
  cacheDir?: string
  /** Timeout per plugin run; the plugin's process group is then killed. Default 60000. */
  timeoutMs?: number
  /** CNI_IFNAME. Default `eth0`. */
  ifName?: string
  /**
   * A command prefix for every plugin run: `[...execWrapper, pluginPath]`. Tests use
   * `['ip', 'netns', 'exec', '<node netns>']` so plugins act in a test "node" netns. Default none.
   */
  execWrapper?: string[]
  /** Creates the dummy network's netns at the given path. Default `nativeNetnsOps.create`. */
  createNetns?: NetnsFn
  /** Deletes the dummy network's netns at the given path. Default `nativeNetnsOps.delete`. */
  deleteNetns?: NetnsFn
  /** The container id (and netns name) of the dummy pod. Default `tapmanager-dummy`. */
  dummyPodId?: string
  /**
   * Whether a path is a live netns (default: natively, an nsfs mount, never following a symlink). DEL of a pod
   * whose netns path is not one runs with an empty CNI_NETNS, as the CNI spec allows (plugins then release what
   * they hold outside the netns, e.g. IPAM leases).
   */
  isNetns?: (path: string) => boolean
  /** Called after every plugin run, ok or not (metrics); a throw is ignored. */
  onPluginRun?: (run: CniPluginRunEvent) => void
}

/** One finished plugin run, for {@link ExecCniClientOptions.onPluginRun}. */
export interface CniPluginRunEvent {
  /** Plugin type (binary name). */
  plugin: string
  command: CniCommand
  durationMs: number
  /** Absent when the run succeeded; else the error's code (`ERR_CNI`, `ERR_TIMEOUT`, `ERR_NOT_FOUND`, ...). */
  errorCode?: string
}

/** Validates an interface name the way libcni does. */
function validIfName(name: string): boolean {
  return name.length > 0 && name.length <= 15 && name !== '.' && name !== '..' && !/[/:\s]/.test(name)
}

/** The CNI client that executes plugin binaries (see {@link CniClient}). */
export class ExecCniClient implements CniClient {
  readonly confDir: string
  readonly binDirs: string[]
  readonly netnsDir: string
  readonly cacheDir: string
  readonly timeoutMs: number
  readonly ifName: string
  readonly execWrapper: string[]
  readonly dummyPodId: string
  private readonly onPluginRun: ((run: CniPluginRunEvent) => void) | undefined
  private readonly netns: NetnsOps
  private readonly isNetns: (path: string) => boolean
  private readonly cache: CniCache
  private dummy: Promise<CniAttachment> | undefined

  constructor(options: ExecCniClientOptions = {}) {
    this.confDir = options.confDir ?? '/etc/cni/net.d'
    this.binDirs = options.binDirs ?? ['/opt/cni/bin', '/usr/lib/cni']
    this.netnsDir = options.netnsDir ?? DEFAULT_NETNS_DIR
    this.cacheDir = options.cacheDir ?? '/var/lib/tapmanager/cni'
    this.timeoutMs = options.timeoutMs ?? 60_000
    this.ifName = options.ifName ?? 'eth0'
    this.execWrapper = options.execWrapper ?? []
    this.netns = { create: options.createNetns ?? nativeNetnsOps.create, delete: options.deleteNetns ?? nativeNetnsOps.delete }
    this.dummyPodId = options.dummyPodId ?? 'tapmanager-dummy'
    this.isNetns = options.isNetns ?? isNetnsMount
    this.onPluginRun = options.onPluginRun
    if (!validIfName(this.ifName)) throw new InvalidInputError(`invalid CNI interface name ${JSON.stringify(this.ifName)}`)
    if (!CNI_NAME_RE.test(this.dummyPodId)) throw new InvalidInputError(`invalid dummy pod id ${JSON.stringify(this.dummyPodId)}`)
    if (!(this.timeoutMs > 0)) throw new InvalidInputError(`timeoutMs must be positive, got ${this.timeoutMs}`)
    this.cache = new CniCache(this.cacheDir)
  }

  /** The netns path of a pod: `<netnsDir>/<podId>`. */
  nsPath(podId: string): string {
    return podNetnsPath(this.netnsDir, podId)
  }

  /** Loads the network config now in use (the first valid file of `confDir`). */
  async loadConfig(): Promise<CniNetworkConfig> {
    return (await loadNetworkConfig(this.confDir)).config
  }

  private validate(podId: string, podName: string, podNs: string): void {
    if (typeof podId !== 'string' || !CNI_NAME_RE.test(podId) || podId.length > 255) {
      throw new InvalidInputError(`invalid pod id ${JSON.stringify(podId)}: must match ${CNI_NAME_RE}`)
    }
    for (const [what, v] of [
      ['pod name', podName],
      ['pod namespace', podNs],
    ] as const) {
      if (typeof v !== 'string' || /[;=\0]/.test(v)) throw new InvalidInputError(`invalid ${what} ${JSON.stringify(v)}: no ';', '=' or NUL allowed`)
    }
  }

  private env(command: CniCommand, podId: string, podName: string, podNs: string): Record<string, string> {
    const args =
      podName && podNs
        ? `IgnoreUnknown=1;K8S_POD_NAMESPACE=${podNs};K8S_POD_NAME=${podName};K8S_POD_INFRA_CONTAINER_ID=${podId}`
        : 'IgnoreUnknown=1'
    return {
      CNI_COMMAND: command,
      CNI_CONTAINERID: podId,
      CNI_NETNS: this.nsPath(podId),
      CNI_IFNAME: this.ifName,
      CNI_PATH: this.binDirs.join(':'),
      CNI_ARGS: args,
    }
  }

  private run(
    command: CniCommand,
    config: CniCacheEntry['config'],
    plugin: Record<string, unknown>,
    env: Record<string, string>,
    prevResult: Record<string, unknown> | undefined,
  ): Promise<Record<string, unknown> | undefined> {
    const stdin: Record<string, unknown> = { ...plugin, name: config.name, cniVersion: config.cniVersion }
    if (prevResult) stdin.prevResult = prevResult
    else delete stdin.prevResult
    const run = execPlugin({
      plugin: String(plugin.type),
      network: config.name,
      command,
      stdin,
      env: { ...env, CNI_COMMAND: command },
      binDirs: this.binDirs,
      timeoutMs: this.timeoutMs,
      execWrapper: this.execWrapper,
    })
    const hook = this.onPluginRun
    if (!hook) return run
    const started = performance.now()
    const report = (errorCode?: string) => {
      try {
        hook({ plugin: String(plugin.type), command, durationMs: performance.now() - started, ...(errorCode ? { errorCode } : {}) })
      } catch {
        // an observer must not break CNI
      }
    }
    return run.then(
      (r) => {
        report()
        return r
      },
      (err: unknown) => {
        report(errorCode(err))
        throw err
      },
    )
  }

  /** DEL of every plugin in reverse order; runs them all and throws the failure(s) at the end. */
  private async delChain(
    config: CniCacheEntry['config'],
    env: Record<string, string>,
    prevResult: Record<string, unknown> | undefined,
  ): Promise<void> {
    // libcni passes prevResult on DEL only from spec 0.4.0 on; 0.3.x plugins never got one.
    const prev = compareCniVersions(config.cniVersion, '0.4.0') >= 0 ? prevResult : undefined
    const errors: Error[] = []
    for (const plugin of [...config.plugins].reverse()) {
      try {
        await this.run('DEL', config, plugin, env, prev)
      } catch (e) {
        errors.push(e as Error)
      }
    }
    if (errors.length === 1) throw errors[0]
    if (errors.length > 1) {
      const err = new CniError('ERR_CNI', `CNI DEL of network "${config.name}" failed: ${errors.map((e) => e.message).join('; ')}`, {
        network: config.name,
        command: 'DEL',
      })
      err.cleanupErrors = errors
      throw err
    }
  }

  async addSandboxToNetwork(podId: string, podName: string, podNs: string): Promise<CniAttachment> {
    this.validate(podId, podName, podNs)
    const nsPath = this.nsPath(podId)
    const config = await this.loadConfig()
    if (!this.isNetns(nsPath)) {
      throw new CniError('ERR_NOT_FOUND', `the pod netns ${nsPath} does not exist (no netns is mounted there; the caller creates it before CNI ADD)`, {
        network: config.name,
        command: 'ADD',
      })
    }
    const conf: CniCacheEntry['config'] = {
      name: config.name,
      cniVersion: config.cniVersion,
      disableCheck: config.disableCheck,
      plugins: config.plugins.map((p) => p.raw),
    }
    const entry: CniCacheEntry = {
      kind: 'tapmanagerCniCacheV1',
      containerId: podId,
      ifName: this.ifName,
      netns: nsPath,
      podName,
      podNs,
      config: conf,
      result: null,
    }
    await this.cache.put(entry)
    const env = this.env('ADD', podId, podName, podNs)
    let prev: Record<string, unknown> | undefined
    let result: CniResult | undefined
    try {
      for (const plugin of conf.plugins) {
        const raw = await this.run('ADD', conf, plugin, env, prev)
        try {
          result = normalizeCniResult(raw, { defaultVersion: conf.cniVersion, source: `CNI plugin "${String(plugin.type)}" ADD result` })
        } catch (e) {
          throw new CniError('ERR_CNI', (e as Error).message, { plugin: String(plugin.type), network: conf.name, command: 'ADD' }, { cause: e })
        }
        prev = raw
      }
    } catch (e) {
      // Undo what the plugins did so far (IPAM leases, links): DEL of the whole list, with the last good result.
      const err = e as Error
      try {
        await this.delChain(conf, env, prev)
        await this.cache.remove(podId, this.ifName)
      } catch (cleanup) {
        const list = (cleanup as CniError).cleanupErrors?.length ? (cleanup as CniError).cleanupErrors : [cleanup as Error]
        if (err instanceof CniError) err.cleanupErrors.push(...list)
        else (err as Error & { cleanupErrors?: Error[] }).cleanupErrors = list
      }
      throw err
    }
    if (!prev || !result) throw new CniError('ERR_CNI', `network "${conf.name}" has no plugins`, { network: conf.name, command: 'ADD' })
    await this.cache.put({ ...entry, result: prev })
    return { result, raw: prev, nsPath, network: conf.name }
  }

  async removeSandboxFromNetwork(podId: string, podName: string, podNs: string): Promise<void> {
    this.validate(podId, podName, podNs)
    const entry = await this.cache.get(podId, this.ifName)
    let conf: CniCacheEntry['config']
    if (entry) {
      conf = entry.config
    } else {
      const c = await this.loadConfig()
      conf = { name: c.name, cniVersion: c.cniVersion, disableCheck: c.disableCheck, plugins: c.plugins.map((p) => p.raw) }
    }
    const env = this.env('DEL', podId, podName, podNs)
    // No live netns at the path (gone, or a plain file a crash left before the mount): DEL without one.
    if (!this.isNetns(env.CNI_NETNS)) env.CNI_NETNS = ''
    await this.delChain(conf, env, entry?.result ?? undefined)
    await this.cache.remove(podId, this.ifName)
  }

  async hasLeftover(podId: string): Promise<boolean> {
    return this.cache.has(podId, this.ifName)
  }

  /** Removes the temp files of cache writes a kill interrupted (call at start); returns their names. */
  sweepTempFiles(): Promise<string[]> {
    return this.cache.sweepTemps()
  }

  async checkSandboxNetwork(podId: string, podName: string, podNs: string): Promise<void> {
    this.validate(podId, podName, podNs)
    const entry = await this.cache.get(podId, this.ifName)
    if (!entry || !entry.result) {
      throw new CniError('ERR_NOT_FOUND', `no cached CNI ADD result for pod ${podId} (interface ${this.ifName}): nothing to check`, {
        command: 'CHECK',
      })
    }
    const conf = entry.config
    if (compareCniVersions(conf.cniVersion, '0.4.0') < 0) {
      throw new CniError('ERR_INVALID', `network "${conf.name}" has cniVersion ${conf.cniVersion}: CHECK needs 0.4.0 or later`, {
        network: conf.name,
        command: 'CHECK',
      })
    }
    if (conf.disableCheck) return
    const env = this.env('CHECK', podId, podName, podNs)
    for (const plugin of conf.plugins) await this.run('CHECK', conf, plugin, env, entry.result)
  }

  /**
   * The dummy network: on the first call (per client), deletes what a previous lifetime left (CNI DEL of the
   * cached dummy attachment, the stale netns), creates the netns `<netnsDir>/<dummyPodId>` and adds it with
   * empty pod name and namespace. Later calls return the same attachment. A failure is not memoised.
   */
  getDummyNetwork(): Promise<CniAttachment> {
    if (!this.dummy) {
      this.dummy = this.createDummy()
      this.dummy.catch(() => {
        this.dummy = undefined
      })
    }
    return this.dummy
  }

  private async createDummy(): Promise<CniAttachment> {
    const id = this.dummyPodId
    const path = this.nsPath(id)
    await this.removeDummy()
    await this.netns.create(path)
    try {
      return await this.addSandboxToNetwork(id, '', '')
    } catch (e) {
      try {
        await this.netns.delete(path)
      } catch {
        // the ADD error is the one to report
      }
      throw e
    }
  }

  private async removeDummy(): Promise<void> {
    const id = this.dummyPodId
    const path = this.nsPath(id)
    const exists = await stat(path).then(
      () => true,
      () => false,
    )
    if ((await this.cache.get(id, this.ifName)) || exists) await this.removeSandboxFromNetwork(id, '', '')
    if (exists) await this.netns.delete(path)
  }

  /** Removes the dummy pod (CNI DEL, netns deleted), e.g. at shutdown or in tests. Safe when there is none. */
  async releaseDummyNetwork(): Promise<void> {
    const pending = this.dummy
    this.dummy = undefined
    if (pending) await pending.catch(() => undefined)
    await this.removeDummy()
  }
}
