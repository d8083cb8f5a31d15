/**
 * Bounded concurrency for batches of native work: each native netns operation holds a blocking thread (and
 * spawns one inside the netns) while it runs, so starting hundreds at once starts hundreds of threads.
 */

/**
 * Runs `fn` on every item with at most `limit` calls in flight (at least 1), in item order. Resolves when all
 * have settled; `fn` is expected to handle its own errors (a rejection is rethrown after every call settled).
 */
export async function forEachLimited<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  const width = Math.max(1, Math.min(Math.floor(limit) || 1, items.length))
  let next = 0
  let failed: { err: unknown } | undefined
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const item = items[next++]
      try {
        await fn(item)
      } catch (err) {
        failed ??= { err }
      }
    }
  }
  await Promise.all(Array.from({ length: width }, worker))
  if (failed) throw failed.err
}
