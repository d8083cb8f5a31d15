/**
 * The Kubernetes manifests: the committed YAML is what `deploy/kubernetes/manifests.ts` renders, the manifests
 * have what a node agent needs, and a misspelt field or a wrong value type is refused.
 */
import test from 'ava'
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import ts from 'typescript'
import { parseAllDocuments } from 'yaml'
import { buildManifests } from '../deploy/kubernetes/manifests'
import { renderYaml, YAML_PATH } from '../deploy/kubernetes/render'

const ROOT = join(import.meta.dirname, '..')

test('the committed tapmanager.yaml is what manifests.ts renders (run npm run deploy:render after a change)', (t) => {
  t.is(readFileSync(YAML_PATH, 'utf8'), renderYaml())
})

test('the DaemonSet: privileged node agent, shared netns dir, host paths, one-at-a-time update, probes', (t) => {
  const docs = parseAllDocuments(readFileSync(YAML_PATH, 'utf8')).map((d) => d.toJS())
  t.deepEqual(
    docs.map((d) => d.kind),
    ['ServiceAccount', 'DaemonSet'],
  )
  const ds = docs[1]
  const pod = ds.spec.template.spec
  t.true(pod.hostNetwork)
  t.falsy(pod.hostPID, 'hostPID is not needed')
  t.is(pod.automountServiceAccountToken, false)
  t.deepEqual(ds.spec.updateStrategy, { type: 'RollingUpdate', rollingUpdate: { maxUnavailable: 1, maxSurge: 0 } })
  const c = pod.containers[0]
  t.true(c.securityContext.privileged)
  const mounts = new Map<string, { mountPath: string; mountPropagation?: string; readOnly?: boolean; name: string }>(
    c.volumeMounts.map((m: { mountPath: string; name: string }) => [m.mountPath, m]),
  )
  t.is(mounts.get('/run/netns')?.mountPropagation, 'Bidirectional')
  for (const p of ['/run/tapmanager', '/var/lib/tapmanager', '/etc/cni/net.d', '/opt/cni/bin', '/var/lib/cni']) t.true(mounts.has(p), p)
  // Every mount is a hostPath at the same path as on the host.
  for (const v of pod.volumes) t.is(mounts.get(v.hostPath.path)?.name, v.name)
  // The flags it is started with point at those mounts.
  const args: string[] = c.args
  const flag = (f: string) => args[args.indexOf(f) + 1]
  t.is(flag('--netns-dir'), '/run/netns')
  t.is(flag('--state-dir'), '/var/lib/tapmanager')
  t.is(flag('--socket'), '/run/tapmanager/tapmanager.sock')
  t.is(flag('--metrics-listen'), `0.0.0.0:${c.ports[0].containerPort}`)
  t.deepEqual(c.livenessProbe.httpGet, { path: '/healthz', port: 'metrics' })
  t.deepEqual(c.startupProbe.httpGet, { path: '/readyz', port: 'metrics' })
  t.deepEqual(c.readinessProbe.httpGet, { path: '/readyz', port: 'metrics' })
  t.is(c.ports[0].name, 'metrics')
  t.truthy(c.resources.requests.memory)
})

test('a VM runtime group goes to --socket-group and --allow-gid', (t) => {
  const [, ds] = buildManifests({ vmRuntimeGid: 107 })
  const args = ds.spec!.template.spec!.containers[0].args!
  t.is(args[args.indexOf('--socket-group') + 1], '107')
  t.is(args[args.indexOf('--allow-gid') + 1], '107')
})

test('a value of the wrong type or a missing required field fails validation', (t) => {
  const [, ds] = buildManifests()
  const port = ds.spec!.template.spec!.containers[0].ports![0]
  ;(port as { containerPort: unknown }).containerPort = '9731'
  t.throws(() => ds.validate(), { message: /containerPort must be integer/ })
  const [, ds2] = buildManifests()
  delete (ds2.spec as { selector?: unknown }).selector
  t.throws(() => ds2.validate(), { message: /selector/ })
})

test('a misspelt field in manifests.ts fails the type check', (t) => {
  // The same source twice: as it is (must type-check) and with one field misspelt (must not).
  const dir = join(ROOT, '.tmp', `deploy-typo-${process.pid}-${randomBytes(3).toString('hex')}`)
  mkdirSync(dir, { recursive: true })
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const src = readFileSync(join(ROOT, 'deploy/kubernetes/manifests.ts'), 'utf8')
  t.true(src.includes('hostNetwork: true'))
  const good = join(dir, 'good.ts')
  const typo = join(dir, 'typo.ts')
  writeFileSync(good, src)
  writeFileSync(typo, src.replace('hostNetwork: true', 'hostNetwrok: true'))
  const program = ts.createProgram([good, typo], {
    strict: true,
    noEmit: true,
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.ESNext,
    moduleResolution: ts.ModuleResolutionKind.Bundler,
    skipLibCheck: true,
    types: ['node'],
  })
  const diags = ts.getPreEmitDiagnostics(program).map((d) => ({
    file: d.file?.fileName,
    text: ts.flattenDiagnosticMessageText(d.messageText, '\n'),
  }))
  t.deepEqual(
    diags.filter((d) => d.file === good),
    [],
  )
  const bad = diags.filter((d) => d.file === typo)
  t.is(bad.length, 1)
  t.regex(bad[0].text, /hostNetwrok/)
})
