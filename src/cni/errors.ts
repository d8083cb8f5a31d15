/**
 * Errors of the CNI client. Every one is a {@link TapmanagerError}, so callers branch on `err.code`:
 * - `ERR_CNI`: a plugin failed (its CNI error code, message and details are kept) or answered garbage;
 * - `ERR_TIMEOUT`: a plugin ran past its timeout and was killed (with its whole process group);
 * - `ERR_NOT_FOUND`: no valid network configuration, or the plugin binary is in none of the plugin dirs;
 * - `ERR_INVALID`: a bad argument (container id, interface name) or a bad result/config shape.
 */
import { TapmanagerError } from '../errors'

/** The CNI operations. */
export type CniCommand = 'ADD' | 'DEL' | 'CHECK' | 'VERSION'

/** What a {@link CniError} knows about the plugin run that failed. */
export interface CniErrorInfo {
  /** The plugin `type` (binary name), e.g. `bridge`; empty when no plugin was involved (config loading). */
  plugin?: string
  /** The network name of the config. */
  network?: string
  command?: CniCommand
  /** The CNI error code the plugin reported (`{"code": N}`), when it reported one. */
  cniCode?: number
  /** The CNI error message (`msg`) the plugin reported, or our description of what went wrong. */
  cniMsg?: string
  /** The CNI error `details`, when reported. */
  details?: string
  /** The plugin's exit status (null when it was killed by a signal). */
  exitCode?: number | null
  /** The signal that ended the plugin, e.g. `SIGKILL` after a timeout. */
  signal?: string | null
  /** The plugin's stderr (trimmed, at most 4 KiB). */
  stderr?: string
}

/** A CNI failure: a plugin error, a timeout, garbage output, a missing plugin or config. */
export class CniError extends TapmanagerError {
  readonly plugin: string
  readonly network: string
  readonly command: CniCommand | undefined
  readonly cniCode: number | undefined
  readonly cniMsg: string
  readonly details: string | undefined
  readonly exitCode: number | null | undefined
  readonly signal: string | null | undefined
  readonly stderr: string | undefined
  /** Errors of the clean-up (DEL) run after a failed ADD, when that failed too. */
  cleanupErrors: Error[] = []

  constructor(code: 'ERR_CNI' | 'ERR_TIMEOUT' | 'ERR_NOT_FOUND' | 'ERR_INVALID', message: string, info: CniErrorInfo = {}, options?: { cause?: unknown }) {
    super(code, message, options)
    this.plugin = info.plugin ?? ''
    this.network = info.network ?? ''
    this.command = info.command
    this.cniCode = info.cniCode
    this.cniMsg = info.cniMsg ?? message
    this.details = info.details
    this.exitCode = info.exitCode
    this.signal = info.signal
    this.stderr = info.stderr
  }
}
