/**
 * Structured logs: pino JSON lines, one per request (key, command, duration, outcome), for the server.
 */
import pino, { type DestinationStream, type Logger } from 'pino'
import { errorCode } from './errors'

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const
export type LogLevel = (typeof LOG_LEVELS)[number]

/** One handled request, as logged. */
export interface RequestLogEntry {
  /** The request's key (trimmed, as the server uses it). */
  key: string
  /** `add`, `get`, `release`, `recover`, or another operation name (e.g. `startup-recover`). */
  command: string
  /** Wall time in milliseconds. */
  durationMs: number
  outcome: 'ok' | 'error'
  /** With outcome `error`: the error's stable code and message. */
  code?: string
  error?: string
  /** Anything else worth a field (e.g. `fds: 1`). */
  [extra: string]: unknown
}

export interface RequestLogger {
  /** The underlying pino logger, for other messages (`logger.info({...}, 'msg')`). */
  readonly logger: Logger
  /** Logs one request line: info for ok, warn for error. */
  request(entry: RequestLogEntry): void
  /**
   * Runs `fn`, then logs its key, command, duration and outcome; returns its result or rethrows its error.
   * `extra(result)` may add fields to the ok line.
   */
  time<T>(command: string, key: string, fn: () => Promise<T>, extra?: (result: T) => Record<string, unknown>): Promise<T>
}

/**
 * A request logger writing JSON lines to `destination` (default: stderr, synchronously, so that lines
 * survive a crash). Example line:
 * `{"level":30,"time":...,"pid":...,"hostname":...,"key":"pod-1","command":"add","durationMs":84.2,"outcome":"ok","msg":"request"}`
 */
export function createRequestLogger(level: LogLevel = 'info', destination?: DestinationStream): RequestLogger {
  if (!(LOG_LEVELS as readonly string[]).includes(level)) throw new TypeError(`unknown log level ${JSON.stringify(level)}`)
  const logger = pino({ level, base: { pid: process.pid } }, destination ?? pino.destination({ dest: 2, sync: true }))
  const request = (entry: RequestLogEntry): void => {
    if (entry.outcome === 'ok') logger.info(entry, 'request')
    else logger.warn(entry, 'request')
  }
  return {
    logger,
    request,
    async time(command, key, fn, extra) {
      const start = process.hrtime.bigint()
      const ms = () => Number(process.hrtime.bigint() - start) / 1e6
      try {
        const result = await fn()
        request({ key, command, durationMs: round(ms()), outcome: 'ok', ...(extra ? extra(result) : {}) })
        return result
      } catch (err) {
        request({ key, command, durationMs: round(ms()), outcome: 'error', code: errorCode(err), error: (err as Error)?.message ?? String(err) })
        throw err
      }
    },
  }
}

function round(ms: number): number {
  return Math.round(ms * 1000) / 1000
}
