import test from 'ava'
import {
  InvalidInputError,
  base64ToMac,
  encodeContainerSideNetwork,
  encodeFdInfo,
  encodeGetFDPayload,
  encodeRecoverPayload,
  fromGoCniResult,
  goIpString,
  goJsonStringify,
  macToBase64,
  parseContainerSideNetwork,
  parseFdInfo,
  parseGetFDPayload,
  parseRecoverPayload,
  toGoCniResult,
} from '../src/index'

// Exact bytes from PROTOCOL.md (Virtlet's Go encoding/json output).
const RESULT =
  '{"interfaces":[{"name":"eth0","mac":"42:a4:a6:22:80:2e","sandbox":"/var/run/netns/pod-1"}],' +
  '"ips":[{"version":"4","address":"10.1.90.5/24","gateway":"10.1.90.1"}],' +
  '"routes":[{"dst":"0.0.0.0/0","gw":"10.1.90.1"}],"dns":{}}'
const IFACE = '{"Type":0,"Name":"eth0","HardwareAddr":"QqSmIoAu","PCIAddress":"","MTU":1500,"VlanID":0}'
const CSN = `{"Result":${RESULT},"NsPath":"/var/run/netns/pod-1","Interfaces":[${IFACE}]}`
const DESC = '{"podId":"pod-1","podNs":"default","podName":"vm","DNS":null}'
const GETFD = `{"podNetworkDesc":${DESC}}`
const RECOVER = `{"podNetworkDesc":${DESC},"csn":${CSN},"HaveRunningContainers":false}`
const INFO = '[{"type":0,"mac":"QqSmIoAu","fdIndex":0,"pciAddress":""}]'

test('MAC <-> base64 as Go marshals net.HardwareAddr', (t) => {
  t.is(macToBase64('42:a4:a6:22:80:2e'), 'QqSmIoAu')
  t.is(macToBase64('42:A4:A6:22:80:2E'), 'QqSmIoAu')
  t.is(base64ToMac('QqSmIoAu'), '42:a4:a6:22:80:2e')
  t.is(base64ToMac(macToBase64('ff:ff:ff:00:00:01')), 'ff:ff:ff:00:00:01')
  for (const bad of ['', 'QqSmIoA', 'QqSmIoAu==', 'QqSm-oAu', 'QqSmIoAuQq==']) {
    t.throws(() => base64ToMac(bad), { instanceOf: InvalidInputError }, bad)
  }
  for (const bad of ['42:a4:a6:22:80', '42-a4-a6-22-80-2e', 'zz:a4:a6:22:80:2e']) {
    t.throws(() => macToBase64(bad), { instanceOf: InvalidInputError }, bad)
  }
})

test('GetFDPayload round-trips byte for byte', (t) => {
  const p = parseGetFDPayload(Buffer.from(GETFD))
  t.deepEqual(p, { podNetworkDesc: { podId: 'pod-1', podNs: 'default', podName: 'vm', dns: null } })
  t.is(encodeGetFDPayload(p), GETFD)
})

test('GetFDPayload with DNS: empty DNS keys are omitted, as Go omitempty does', (t) => {
  const text =
    '{"podNetworkDesc":{"podId":"p","podNs":"n","podName":"m","DNS":{"nameservers":["10.96.0.10"],"search":["default.svc.cluster.local","svc.cluster.local"],"options":["ndots:5"]}}}'
  const p = parseGetFDPayload(text)
  t.deepEqual(p.podNetworkDesc.dns, {
    nameservers: ['10.96.0.10'],
    search: ['default.svc.cluster.local', 'svc.cluster.local'],
    options: ['ndots:5'],
  })
  t.is(encodeGetFDPayload(p), text)
  t.is(
    encodeGetFDPayload({ podNetworkDesc: { podId: 'p', podNs: '', podName: '', dns: { nameservers: [], domain: '' } } }),
    '{"podNetworkDesc":{"podId":"p","podNs":"","podName":"","DNS":{}}}',
  )
})

test('ContainerSideNetwork round-trips byte for byte (interface 0 omitted, no cniVersion)', (t) => {
  const csn = parseContainerSideNetwork(CSN)
  t.is(csn.nsPath, '/var/run/netns/pod-1')
  t.deepEqual(csn.interfaces, [{ type: 0, name: 'eth0', hardwareAddr: '42:a4:a6:22:80:2e', pciAddress: '', mtu: 1500, vlanId: 0 }])
  t.deepEqual(csn.result?.ips, [{ address: '10.1.90.5/24', gateway: '10.1.90.1', interface: 0 }])
  t.deepEqual(csn.result?.routes, [{ dst: '0.0.0.0/0', gw: '10.1.90.1' }])
  t.is(encodeContainerSideNetwork(csn), CSN)
})

test('ContainerSideNetwork with two interfaces, a VF and a non-zero interface index', (t) => {
  const text =
    '{"Result":{"interfaces":[{"name":"eth0","mac":"42:a4:a6:22:80:2e","sandbox":"/var/run/netns/p"},{"name":"eth1","mac":"42:a4:a6:22:80:2f","sandbox":"/var/run/netns/p"}],' +
    '"ips":[{"version":"4","address":"10.1.90.5/24","gateway":"10.1.90.1"},{"version":"4","interface":1,"address":"10.2.0.7/16"}],' +
    '"routes":[{"dst":"0.0.0.0/0","gw":"10.1.90.1"},{"dst":"10.10.42.0/24","gw":"10.1.90.90"}],"dns":{"nameservers":["10.96.0.10"],"domain":"x"}},' +
    '"NsPath":"/var/run/netns/p","Interfaces":[{"Type":0,"Name":"eth0","HardwareAddr":"QqSmIoAu","PCIAddress":"","MTU":9000,"VlanID":0},' +
    '{"Type":1,"Name":"eth1","HardwareAddr":"QqSmIoAv","PCIAddress":"0000:03:10.2","MTU":1500,"VlanID":100}]}'
  const csn = parseContainerSideNetwork(text)
  t.is(csn.result?.ips[1].interface, 1)
  t.is(csn.interfaces[1].type, 1)
  t.is(csn.interfaces[1].hardwareAddr, '42:a4:a6:22:80:2f')
  t.is(encodeContainerSideNetwork(csn), text)
})

test('RecoverPayload round-trips byte for byte', (t) => {
  const p = parseRecoverPayload(RECOVER)
  t.false(p.haveRunningContainers)
  t.is(p.podNetworkDesc.podId, 'pod-1')
  t.is(p.csn.interfaces.length, 1)
  t.is(encodeRecoverPayload(p), RECOVER)
  const running = RECOVER.replace('"HaveRunningContainers":false', '"HaveRunningContainers":true')
  t.true(parseRecoverPayload(running).haveRunningContainers)
  t.is(encodeRecoverPayload(parseRecoverPayload(running)), running)
})

test('get info round-trips byte for byte; a null MAC is null', (t) => {
  const infos = parseFdInfo(INFO)
  t.deepEqual(infos, [{ type: 0, mac: '42:a4:a6:22:80:2e', fdIndex: 0, pciAddress: '' }])
  t.is(encodeFdInfo(infos), INFO)
  const two = '[{"type":0,"mac":"QqSmIoAu","fdIndex":0,"pciAddress":""},{"type":1,"mac":null,"fdIndex":1,"pciAddress":"0000:03:10.2"}]'
  t.is(encodeFdInfo(parseFdInfo(two)), two)
  t.deepEqual(parseFdInfo('null'), [])
})

test('a result of any spec version inside a payload is read and written in Virtlet form', (t) => {
  const v1 = {
    cniVersion: '1.1.0',
    interfaces: [{ name: 'eth0', mac: '42:a4:a6:22:80:2e', mtu: 9000, sandbox: '/var/run/netns/pod-1' }],
    ips: [{ address: '10.1.90.5/24', gateway: '10.1.90.1', interface: 0 }],
    routes: [{ dst: '0.0.0.0/0', gw: '10.1.90.1', table: 100 }],
    dns: {},
  }
  const r = fromGoCniResult(v1)
  t.is(r.cniVersion, '1.1.0')
  t.is(r.interfaces[0].mtu, 9000)
  t.is(goJsonStringify(toGoCniResult(r)), RESULT)
  // cniVersion present: an absent interface stays absent; written the same way (omitted)
  const r2 = fromGoCniResult({ cniVersion: '0.4.0', ips: [{ version: '4', address: '10.1.90.5/24' }] })
  t.is(r2.ips[0].interface, undefined)
  t.is(goJsonStringify(toGoCniResult(r2)), '{"ips":[{"version":"4","address":"10.1.90.5/24"}],"dns":{}}')
})

test('Go string escaping: <, >, &, U+2028 and \\b/\\f are written as Go writes them', (t) => {
  t.is(goJsonStringify({ a: '<x&y>\u2028\b\f\\b' }), '{"a":"\\u003cx\\u0026y\\u003e\\u2028\\u0008\\u000c\\\\b"}')
  const p = { podNetworkDesc: { podId: 'p', podNs: 'a&b', podName: '<vm>', dns: null } }
  const text = encodeGetFDPayload(p)
  t.is(text, '{"podNetworkDesc":{"podId":"p","podNs":"a\\u0026b","podName":"\\u003cvm\\u003e","DNS":null}}')
  t.deepEqual(parseGetFDPayload(text), p)
})

test('bad JSON and unknown keys get InvalidInputError naming the problem', (t) => {
  const cases: [() => unknown, RegExp][] = [
    [() => parseGetFDPayload('{"podNetworkDesc":'), /GetFDPayload: bad JSON/],
    [() => parseGetFDPayload('[]'), /GetFDPayload: expected an object/],
    [() => parseGetFDPayload('{}'), /podNetworkDesc: missing/],
    [() => parseGetFDPayload('{"podNetworkDesc":null}'), /podNetworkDesc: missing/],
    [() => parseGetFDPayload(`{"podNetworkDesc":${DESC},"extra":1}`), /unknown key "extra"/],
    [() => parseGetFDPayload('{"podNetworkDesc":{"podid":"x","podId":"p"}}'), /podNetworkDesc: unknown key "podid"/],
    [() => parseGetFDPayload('{"podNetworkDesc":{"podNs":"n"}}'), /podId: expected a string, got nothing/],
    [() => parseGetFDPayload('{"podNetworkDesc":{"podId":5}}'), /podId: expected a string, got 5/],
    [() => parseGetFDPayload('{"podNetworkDesc":{"podId":"../etc"}}'), /not a valid pod id/],
    [() => parseGetFDPayload('{"podNetworkDesc":{"podId":"p","DNS":{"nameserver":["1.1.1.1"]}}}'), /unknown key "nameserver"/],
    [() => parseGetFDPayload('{"podNetworkDesc":{"podId":"p","DNS":{"search":"x"}}}'), /DNS.search: expected an array/],
    [() => parseRecoverPayload(`{"podNetworkDesc":${DESC}}`), /csn: missing/],
    [() => parseRecoverPayload(`{"podNetworkDesc":${DESC},"csn":${CSN},"haveRunningContainers":true}`), /unknown key "haveRunningContainers"/],
    [() => parseRecoverPayload(`{"podNetworkDesc":${DESC},"csn":${CSN},"HaveRunningContainers":"yes"}`), /expected true or false/],
    [() => parseRecoverPayload(RECOVER.replace('"NsPath"', '"NSPath"')), /csn: unknown key "NSPath"/],
    [() => parseRecoverPayload(RECOVER.replace('"MTU":1500', '"MTU":70000')), /Interfaces\[0\]\.MTU: expected an integer in 0..65535/],
    [() => parseRecoverPayload(RECOVER.replace('"Type":0', '"Type":2')), /Interfaces\[0\]\.Type/],
    [() => parseRecoverPayload(RECOVER.replace('QqSmIoAu', '42:a4:a6:22:80:2e')), /HardwareAddr: invalid MAC/],
    [() => parseRecoverPayload(RECOVER.replace('"gateway"', '"gw"')), /Result: ips\[0\]: unknown key "gw"/],
    [() => parseRecoverPayload(RECOVER.replace('10.1.90.5/24', '10.1.90.5')), /ips\[0\]\.address: "10.1.90.5" is not an address with a prefix/],
    [() => parseContainerSideNetwork('{"Result":{},"NsPath":"/x","Interfaces":{}}'), /Interfaces: expected an array or null/],
    [() => parseFdInfo('[{"type":0,"mac":"QqSmIoAu","fdIndex":0,"pciAddress":"","fd":3}]'), /unknown key "fd"/],
    [() => parseFdInfo('{"type":0}'), /expected an array/],
  ]
  for (const [fn, re] of cases) {
    const err = t.throws(fn, { instanceOf: InvalidInputError }, String(re))
    t.regex(err?.message ?? '', re)
    t.is((err as InvalidInputError | undefined)?.code, 'ERR_INVALID')
  }
})

test('IPs in the result are written as Go writes net.IP (IPv6 canonical, v4-mapped as IPv4)', (t) => {
  t.is(goIpString('10.1.90.1'), '10.1.90.1')
  t.is(goIpString('2001:DB8:0:0:0:0:0:1'), '2001:db8::1')
  t.is(goIpString('fd00:0:0:1:0:0:0:5'), 'fd00:0:0:1::5')
  t.is(goIpString('::ffff:10.1.2.3'), '10.1.2.3')
  t.is(goIpString('::'), '::')
  const r = fromGoCniResult({
    cniVersion: '1.0.0',
    ips: [{ address: 'FD00:0:0:0::5/64', gateway: 'fd00:0000::1' }],
    routes: [{ dst: '0:0::0/0', gw: 'FD00::1' }],
  })
  t.is(
    goJsonStringify(toGoCniResult(r)),
    '{"ips":[{"version":"6","address":"fd00::5/64","gateway":"fd00::1"}],"routes":[{"dst":"::/0","gw":"fd00::1"}],"dns":{}}',
  )
})
