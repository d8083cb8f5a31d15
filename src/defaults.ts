/**
 * Defaults and path rules used in more than one module, written once: the command line, the daemon, TapFDSource
 * and the CNI client take them from here.
 */
import { join } from 'node:path'
import { InvalidInputError } from './errors'

/** Where pod network namespaces live, `ip netns` style. */
export const DEFAULT_NETNS_DIR = '/var/run/netns'

/** The prefix length Calico's /32 pod addresses are widened to. */
export const DEFAULT_CALICO_SUBNET_SIZE = 24

/**
 * Spare pod netns the daemon keeps made ahead of time (`serve --netns-pool`): an add then only binds one onto
 * its path, and making a namespace (which waits behind the kernel's cleanup of deleted ones) happens off it.
 */
export const DEFAULT_NETNS_POOL = 2
/** The most spare pod netns `serve --netns-pool` / `DaemonOptions.netnsPool` take. */
export const MAX_NETNS_POOL = 64

/**
 * How long (µs) an event loop busy-waits before it sleeps: an FDClient for a response after sending a request,
 * an FDServer for the next request after answering one (`spinUs` of both, `serve --spin-us`). Long enough for
 * a get answered at once or a client's next request; at most this much CPU per request.
 */
export const DEFAULT_SPIN_US = 50
/** The longest busy wait `spinUs` takes (µs). */
export const MAX_SPIN_US = 1000

/** A `spinUs` option, or the default when absent: an integer from 0 to {@link MAX_SPIN_US}, else ERR_INVALID. */
export function spinUsOf(spinUs: number | undefined): number {
  const us = spinUs ?? DEFAULT_SPIN_US
  if (!Number.isInteger(us) || us < 0 || us > MAX_SPIN_US) throw new InvalidInputError(`spinUs must be an integer from 0 to ${MAX_SPIN_US}, not ${us}`)
  return us
}

/** The netns path of a pod: `<netnsDir>/<podId>` (what CNI plugins get as CNI_NETNS). */
export function podNetnsPath(netnsDir: string, podId: string): string {
  return join(netnsDir, podId)
}
