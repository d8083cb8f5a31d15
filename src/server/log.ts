/**
 * FDServer's request log: one {@link RequestLogEntry} per request to the owner's `onRequest` hook, including the
 * gets the native fast path answered (taken from its log queue).
 */
import type { PeerCredentials, UnixListener } from '../native'
import { commandName } from '../protocol'
import type { RequestLogEntry } from './options'

export class RequestLog {
  private droppedLogs = 0

  constructor(private readonly onRequest: ((entry: RequestLogEntry) => void) | undefined) {}

  /** How many log entries of natively answered gets were lost in all (the native queue was full). */
  get dropped(): number {
    return this.droppedLogs
  }

  log(key: string, command: number, started: number, error: string | undefined, peer?: PeerCredentials, durationMs?: number): void {
    if (!this.onRequest) return
    this.emit({
      key,
      command: commandName(command),
      durationMs: durationMs ?? performance.now() - started,
      outcome: error === undefined ? 'ok' : 'error',
      ...(error === undefined ? {} : { error }),
      ...(peer ? { peer } : {}),
    })
  }

  /** Reports the gets the native fast path answered since the last take (oldest first), one entry each. */
  takeFastLog(listener: UnixListener): void {
    const { entries, dropped } = listener.takeFastLog()
    this.droppedLogs += dropped
    const last = entries.length - 1
    entries.forEach((e, i) =>
      this.emit({
        key: e.key,
        command: 'get',
        durationMs: e.durationMs,
        outcome: e.error ? 'error' : 'ok',
        ...(e.error ? { error: `response not sent: ${e.error}` } : {}),
        ...(e.peer ? { peer: e.peer } : {}),
        // The dropped entries all came after the queued ones.
        ...(dropped > 0 && i === last ? { dropped } : {}),
      }),
    )
  }

  private emit(entry: RequestLogEntry): void {
    try {
      this.onRequest?.(entry)
    } catch {
      // a logging hook must not break serving
    }
  }
}
