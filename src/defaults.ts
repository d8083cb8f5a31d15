/**
 * Defaults and path rules used in more than one module, written once: the command line, the daemon, TapFDSource
 * and the CNI client take them from here.
 */
import { join } from 'node:path'

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

/** The netns path of a pod: `<netnsDir>/<podId>` (what CNI plugins get as CNI_NETNS). */
export function podNetnsPath(netnsDir: string, podId: string): string {
  return join(netnsDir, podId)
}
