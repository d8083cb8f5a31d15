// The `tapmanager` command line with a kill -9 failpoint, for the crash recovery tests (the production code has
// none). Run as `node --import @oxc-node/core/register __test__/helpers/crash-serve.ts <point>:<podId> serve ...`:
// the process SIGKILLs itself during the add of pod <podId>, at
//   after-cni             after the pod's CNI ADD returned        (the state record is `adding`)
//   after-container-side  after the native container-side setup   (`adding`)
//   after-dhcp            after the pod's DHCP server started     (`adding`)
//   after-ready           after the `ready` record was written    (`ready`)
// Everything else is the real command line and daemon (real CNI plugins, real native operations).
import { basename } from 'node:path'
import { runCli } from '../../src/cli/main'
import { startServer } from '../../src/cli/commands'
import { nativePodNetworkOps, type PodNetworkOps } from '../../src/podnetwork'
import type { CniClient } from '../../src/cni'
import type { DaemonHooks } from '../../src/daemon'

export const CRASH_POINTS = ['after-cni', 'after-container-side', 'after-dhcp', 'after-ready'] as const
export type CrashPointName = (typeof CRASH_POINTS)[number]

/** The daemon hooks that kill this process at `spec` (`<point>:<podId>`); throws on a malformed spec. */
export function crashHooks(spec: string): DaemonHooks {
  const i = spec.indexOf(':')
  const point = spec.slice(0, i) as CrashPointName
  const podId = spec.slice(i + 1)
  if (i < 0 || !CRASH_POINTS.includes(point) || !podId) {
    throw new Error(`crash point must be <${CRASH_POINTS.join('|')}>:<podId>, not ${JSON.stringify(spec)}`)
  }
  const hit = (p: CrashPointName, id: string) => {
    if (p === point && id === podId) process.kill(process.pid, 'SIGKILL')
  }
  const wrapCni = (cni: CniClient): CniClient => ({
    addSandboxToNetwork: async (id, podName, podNs) => {
      const r = await cni.addSandboxToNetwork(id, podName, podNs)
      hit('after-cni', id)
      return r
    },
    removeSandboxFromNetwork: (id, podName, podNs) => cni.removeSandboxFromNetwork(id, podName, podNs),
    checkSandboxNetwork: (id, podName, podNs) => cni.checkSandboxNetwork(id, podName, podNs),
    getDummyNetwork: () => cni.getDummyNetwork(),
  })
  // The pod netns is <netnsDir>/<podId>.
  const ops: PodNetworkOps = {
    ...nativePodNetworkOps,
    setupContainerSide: async (nsPath, resultJson, o) => {
      const r = await nativePodNetworkOps.setupContainerSide(nsPath, resultJson, o)
      hit('after-container-side', basename(nsPath))
      return r
    },
    startDhcpServer: async (nsPath, csnJson, parsed) => {
      const r = await nativePodNetworkOps.startDhcpServer(nsPath, csnJson, parsed)
      hit('after-dhcp', basename(nsPath))
      return r
    },
  }
  return { wrapCni, ops, afterReady: (_key, id) => hit('after-ready', id) }
}

if (process.argv[1]?.endsWith('crash-serve.ts')) {
  const [spec, ...argv] = process.argv.slice(2)
  const hooks = crashHooks(spec ?? '')
  process.exitCode = await runCli(argv, { startServer: (opts) => startServer(opts, hooks) })
}
