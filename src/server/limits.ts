/** What FDServer's native listener refused or survived, reported to the owner's `onLimits` hook per interval. */
import type { UnixListener } from '../native'
import type { LimitCounts, LimitsReport } from './options'

export class LimitsReporter {
  private lastLimits: LimitCounts = { overTotal: 0, overUid: 0, refused: 0, acceptErrors: 0 }

  constructor(private readonly onLimits: ((report: LimitsReport) => void) | undefined) {}

  /** What `listener` refused or survived since it started (all zero without one). */
  limits(listener: UnixListener | null): LimitsReport {
    const st = listener?.stats()
    const total: LimitCounts = {
      overTotal: st?.overTotal ?? 0,
      overUid: st?.overUid ?? 0,
      refused: st?.refused ?? 0,
      acceptErrors: st?.acceptErrors ?? 0,
    }
    const interval: LimitCounts = {
      overTotal: total.overTotal - this.lastLimits.overTotal,
      overUid: total.overUid - this.lastLimits.overUid,
      refused: total.refused - this.lastLimits.refused,
      acceptErrors: total.acceptErrors - this.lastLimits.acceptErrors,
    }
    return { interval, total, open: st?.open ?? 0, ...(st?.lastAcceptError ? { lastAcceptError: st.lastAcceptError } : {}) }
  }

  /** Calls `onLimits` when something was refused or failed since the last report. */
  report(listener: UnixListener | null): void {
    if (!listener || !this.onLimits) return
    const r = this.limits(listener)
    if (Object.values(r.interval).every((n) => n === 0)) return
    this.lastLimits = r.total
    try {
      this.onLimits(r)
    } catch {
      // a logging hook must not break serving
    }
  }
}
