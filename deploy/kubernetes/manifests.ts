/**
 * tapmanager's Kubernetes manifests, written with the Kubernetes API types of `kubernetes-models` (so the type
 * checker refuses a misspelt field, and `validate()` refuses a value of the wrong type or a missing required
 * field). `render.ts` prints them as YAML into `tapmanager.yaml`; `__test__/deploy.spec.ts` re-renders and
 * compares, so the committed YAML is always what this file says.
 *
 * One tapmanager per node, as a node agent: a DaemonSet in kube-system.
 * - hostNetwork: the CNI plugins it runs create their host-side devices (bridge, veth ends, iptables rules) in
 *   the node's network namespace, as they would for the container runtime. hostPID is not needed: tapmanager
 *   never looks at or signals host processes (the VM runtime passes nothing by pid).
 * - privileged: netns bind mounts, netlink and nftables in pod namespaces, /dev/net/tun, Bidirectional mounts.
 * - the netns dir is mounted with Bidirectional propagation: the pod netns tapmanager bind-mounts there are
 *   mounts of the host, so they outlive a restart of the container (a rolling update), and the VM runtime sees
 *   them at the same path.
 * - every path is mounted at the same place it has on the host, so the paths tapmanager hands the VM runtime
 *   (NsPath, the socket) mean the same thing on both sides.
 */
import { ServiceAccount } from 'kubernetes-models/v1/ServiceAccount'
import { DaemonSet } from 'kubernetes-models/apps/v1/DaemonSet'
import type { IVolume } from 'kubernetes-models/v1/Volume'
import type { IVolumeMount } from 'kubernetes-models/v1/VolumeMount'

/** What a cluster may want to change; every field has the default the committed YAML uses. */
export interface ManifestOptions {
  namespace: string
  /** The image `scripts/image.sh` builds (`localhost/tapmanager:<version>`). */
  image: string
  /** Directory of the server socket, shared with the VM runtime (hostPath). */
  socketDir: string
  /** Pod netns dir (bind mounts; Bidirectional). */
  netnsDir: string
  /** tapmanager's state dir: what recovery needs, and the CNI result cache for DEL. */
  stateDir: string
  cniConfDir: string
  cniBinDir: string
  /** CNI plugins' own state (host-local IPAM leases): shared with every other CNI user of the node. */
  cniStateDir: string
  /** Group (gid) of the VM runtime that connects to the socket; null: only root (uid 0) is served. */
  vmRuntimeGid: number | null
  /** Where the Prometheus endpoint listens (node network, hostNetwork). */
  metricsPort: number
  /** Requests and limits, from the figures measured by `bench/footprint.ts` (see docs/DEPLOY.md). */
  resources: { cpuRequest: string; memoryRequest: string; memoryLimit: string }
}

export const DEFAULT_MANIFEST_OPTIONS: ManifestOptions = {
  namespace: 'kube-system',
  image: 'localhost/tapmanager:0.1.0',
  socketDir: '/run/tapmanager',
  netnsDir: '/run/netns',
  stateDir: '/var/lib/tapmanager',
  cniConfDir: '/etc/cni/net.d',
  cniBinDir: '/opt/cni/bin',
  cniStateDir: '/var/lib/cni',
  vmRuntimeGid: null,
  metricsPort: 9731,
  resources: { cpuRequest: '20m', memoryRequest: '96Mi', memoryLimit: '384Mi' },
}

const NAME = 'tapmanager'
const LABELS = { 'app.kubernetes.io/name': NAME, 'app.kubernetes.io/component': 'node-agent' }

/** The manifests in apply order (ServiceAccount, DaemonSet); each is validated before it is returned. */
export function buildManifests(overrides: Partial<ManifestOptions> = {}): [ServiceAccount, DaemonSet] {
  const o: ManifestOptions = { ...DEFAULT_MANIFEST_OPTIONS, ...overrides }
  const socketPath = `${o.socketDir}/tapmanager.sock`

  // tapmanager never talks to the API server: its service account exists so that no token is mounted.
  const sa = new ServiceAccount({
    metadata: { name: NAME, namespace: o.namespace, labels: LABELS },
    automountServiceAccountToken: false,
  })

  const hostDirs: { name: string; path: string; readOnly?: boolean; bidirectional?: boolean; type: 'DirectoryOrCreate' | 'FileOrCreate' }[] = [
    { name: 'netns', path: o.netnsDir, bidirectional: true, type: 'DirectoryOrCreate' },
    { name: 'socket-dir', path: o.socketDir, type: 'DirectoryOrCreate' },
    { name: 'state', path: o.stateDir, type: 'DirectoryOrCreate' },
    { name: 'cni-conf', path: o.cniConfDir, readOnly: true, type: 'DirectoryOrCreate' },
    { name: 'cni-bin', path: o.cniBinDir, readOnly: true, type: 'DirectoryOrCreate' },
    { name: 'cni-state', path: o.cniStateDir, type: 'DirectoryOrCreate' },
    // The iptables lock shared with kube-proxy and the container runtime's CNI runs (bridge ipMasq rules).
    { name: 'xtables-lock', path: '/run/xtables.lock', type: 'FileOrCreate' },
  ]
  const volumes: IVolume[] = hostDirs.map((d) => ({ name: d.name, hostPath: { path: d.path, type: d.type } }))
  const volumeMounts: IVolumeMount[] = hostDirs.map((d) => ({
    name: d.name,
    mountPath: d.path,
    ...(d.readOnly ? { readOnly: true } : {}),
    ...(d.bidirectional ? { mountPropagation: 'Bidirectional' } : {}),
  }))

  const args = [
    'serve',
    '--socket',
    socketPath,
    '--socket-mode',
    '0660',
    '--netns-dir',
    o.netnsDir,
    '--state-dir',
    o.stateDir,
    '--cni-conf-dir',
    o.cniConfDir,
    '--cni-bin-dir',
    o.cniBinDir,
    // The image's Debian plugins, for configs whose plugins the node lacks.
    '--cni-bin-dir',
    '/usr/lib/cni',
    '--metrics-listen',
    `0.0.0.0:${o.metricsPort}`,
    ...(o.vmRuntimeGid === null ? [] : ['--socket-group', String(o.vmRuntimeGid), '--allow-gid', String(o.vmRuntimeGid)]),
  ]
  // HTTP probes on the metrics port cost next to nothing; an exec probe (`tapmanager status`, exit 0 when the
  // socket accepts, 3 when nothing listens) starts a Node process each time: ~0.35 s CPU and ~60 MiB, counted in
  // this container's limits. /readyz: the socket is served (after recovery); /healthz: it accepts connections now.
  const probe = (path: string) => ({ httpGet: { path, port: 'metrics' }, timeoutSeconds: 5 })

  const ds = new DaemonSet({
    metadata: { name: NAME, namespace: o.namespace, labels: LABELS },
    spec: {
      selector: { matchLabels: { 'app.kubernetes.io/name': NAME } },
      // One at a time, never two on a node (maxSurge 0): the old one stops cleanly (SIGTERM: DHCP servers and
      // fds closed, netns and state kept), the new one recovers every recorded pod before it binds the socket.
      updateStrategy: { type: 'RollingUpdate', rollingUpdate: { maxUnavailable: 1, maxSurge: 0 } },
      template: {
        metadata: {
          labels: LABELS,
          annotations: { 'prometheus.io/scrape': 'true', 'prometheus.io/port': String(o.metricsPort), 'prometheus.io/path': '/metrics' },
        },
        spec: {
          serviceAccountName: NAME,
          automountServiceAccountToken: false,
          hostNetwork: true,
          dnsPolicy: 'ClusterFirstWithHostNet',
          priorityClassName: 'system-node-critical',
          nodeSelector: { 'kubernetes.io/os': 'linux' },
          tolerations: [{ operator: 'Exists' }],
          terminationGracePeriodSeconds: 30,
          containers: [
            {
              name: NAME,
              image: o.image,
              imagePullPolicy: 'IfNotPresent',
              command: ['tapmanager'],
              args,
              env: [{ name: 'TAPMANAGER_SOCKET', value: socketPath }],
              securityContext: { privileged: true },
              ports: [{ name: 'metrics', containerPort: o.metricsPort, protocol: 'TCP' }],
              resources: {
                requests: { cpu: o.resources.cpuRequest, memory: o.resources.memoryRequest },
                limits: { memory: o.resources.memoryLimit },
              },
              // Recovery of every recorded pod runs before the socket is bound: give it time (5 min).
              startupProbe: { ...probe('/readyz'), periodSeconds: 2, failureThreshold: 150 },
              livenessProbe: { ...probe('/healthz'), periodSeconds: 20, failureThreshold: 3 },
              readinessProbe: { ...probe('/readyz'), periodSeconds: 10 },
              volumeMounts,
            },
          ],
          volumes,
        },
      },
    },
  })

  sa.validate()
  ds.validate()
  return [sa, ds]
}
