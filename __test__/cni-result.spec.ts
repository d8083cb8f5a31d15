import test from 'ava'
import { InvalidInputError, formatCniResult, normalizeCniResult, type CniResult } from '../src/index'

// One network attachment as plugins of each spec version print it.
const SHAPES: Record<string, object> = {
  '0.3.0': {
    cniVersion: '0.3.0',
    interfaces: [{ name: 'tmbr0', mac: '0a:58:0a:4d:00:01' }, { name: 'vethab', mac: '22:11:aa:bb:cc:dd' }, { name: 'eth0', mac: '42:a4:a6:22:80:2e', sandbox: '/var/run/netns/p' }],
    ips: [{ version: '4', interface: 2, address: '10.77.0.5/24', gateway: '10.77.0.1' }],
    routes: [{ dst: '0.0.0.0/0' }],
    dns: {},
  },
  '0.3.1': {
    cniVersion: '0.3.1',
    interfaces: [{ name: 'tmbr0', mac: '0a:58:0a:4d:00:01' }, { name: 'vethab', mac: '22:11:aa:bb:cc:dd' }, { name: 'eth0', mac: '42:a4:a6:22:80:2e', sandbox: '/var/run/netns/p' }],
    ips: [{ version: '4', interface: 2, address: '10.77.0.5/24', gateway: '10.77.0.1' }],
    routes: [{ dst: '0.0.0.0/0' }],
    dns: {},
  },
  '0.4.0': {
    cniVersion: '0.4.0',
    interfaces: [{ name: 'tmbr0', mac: '0a:58:0a:4d:00:01' }, { name: 'vethab', mac: '22:11:aa:bb:cc:dd' }, { name: 'eth0', mac: '42:a4:a6:22:80:2e', sandbox: '/var/run/netns/p' }],
    ips: [{ version: '4', interface: 2, address: '10.77.0.5/24', gateway: '10.77.0.1' }],
    routes: [{ dst: '0.0.0.0/0' }],
    dns: {},
  },
  '1.0.0': {
    cniVersion: '1.0.0',
    interfaces: [{ name: 'tmbr0', mac: '0a:58:0a:4d:00:01' }, { name: 'vethab', mac: '22:11:aa:bb:cc:dd' }, { name: 'eth0', mac: '42:a4:a6:22:80:2e', sandbox: '/var/run/netns/p' }],
    ips: [{ interface: 2, address: '10.77.0.5/24', gateway: '10.77.0.1' }],
    routes: [{ dst: '0.0.0.0/0' }],
    dns: {},
  },
  '1.1.0': {
    cniVersion: '1.1.0',
    interfaces: [
      { name: 'tmbr0', mac: '0a:58:0a:4d:00:01', mtu: 1500 },
      { name: 'vethab', mac: '22:11:aa:bb:cc:dd', mtu: 1500 },
      { name: 'eth0', mac: '42:a4:a6:22:80:2e', mtu: 1500, sandbox: '/var/run/netns/p', socketPath: '', pciID: '' },
    ],
    ips: [{ interface: 2, address: '10.77.0.5/24', gateway: '10.77.0.1' }],
    routes: [{ dst: '0.0.0.0/0', priority: 0, table: 254, scope: 0 }],
    dns: {},
  },
}

const EXPECTED: Omit<CniResult, 'cniVersion'> = {
  interfaces: [{ name: 'tmbr0', mac: '0a:58:0a:4d:00:01' }, { name: 'vethab', mac: '22:11:aa:bb:cc:dd' }, { name: 'eth0', mac: '42:a4:a6:22:80:2e', sandbox: '/var/run/netns/p' }],
  ips: [{ interface: 2, address: '10.77.0.5/24', gateway: '10.77.0.1' }],
  routes: [{ dst: '0.0.0.0/0' }],
  dns: {},
}

for (const [version, shape] of Object.entries(SHAPES)) {
  test(`a ${version} result normalises to the one internal shape`, (t) => {
    const r = normalizeCniResult(JSON.stringify(shape))
    t.is(r.cniVersion, version)
    if (version === '1.1.0') {
      // the 1.1.0-only fields are kept, everything else equals the other versions
      t.deepEqual(r.interfaces.map((i) => i.mtu), [1500, 1500, 1500])
      t.deepEqual(r.routes, [{ dst: '0.0.0.0/0', priority: 0, table: 254, scope: 0 }])
      const stripped = {
        interfaces: r.interfaces.map(({ mtu: _m, ...i }) => i),
        ips: r.ips,
        routes: [{ dst: r.routes[0].dst }],
        dns: r.dns,
      }
      t.deepEqual(stripped, EXPECTED)
    } else {
      const { cniVersion: _v, ...rest } = r
      t.deepEqual(rest, EXPECTED)
    }
    // written back in its own version, it reads the same
    t.deepEqual(normalizeCniResult(formatCniResult(r)), r)
  })
}

test('an absent interface index, absent version key and a result without cniVersion', (t) => {
  const r = normalizeCniResult({ ips: [{ address: '10.1.0.5/16' }], dns: { nameservers: ['8.8.8.8'], search: [] } }, { defaultVersion: '0.4.0' })
  t.is(r.cniVersion, '0.4.0')
  t.deepEqual(r.ips, [{ address: '10.1.0.5/16' }])
  t.deepEqual(r.interfaces, [])
  t.deepEqual(r.routes, [])
  t.deepEqual(r.dns, { nameservers: ['8.8.8.8'] })
  // Virtlet's JSON: an absent index is index 0
  t.is(normalizeCniResult({ ips: [{ version: '4', address: '10.1.0.5/16' }] }, { absentInterfaceIsZero: true }).ips[0].interface, 0)
  // Go zero values read as absent
  const z = normalizeCniResult({ cniVersion: '0.3.1', interfaces: [{ name: 'eth0', mac: '', sandbox: '' }], ips: [{ version: '4', address: '10.1.0.5/16', gateway: '' }], routes: [{ dst: '0.0.0.0/0', gw: '' }] })
  t.deepEqual(z.interfaces, [{ name: 'eth0' }])
  t.deepEqual(z.ips, [{ address: '10.1.0.5/16' }])
  t.deepEqual(z.routes, [{ dst: '0.0.0.0/0' }])
})

test('IPv6 results', (t) => {
  const r = normalizeCniResult({ cniVersion: '0.4.0', ips: [{ version: '6', address: 'fd00::5/64', gateway: 'fd00::1' }], routes: [{ dst: '::/0', gw: 'fd00::1' }] })
  t.is(r.ips[0].address, 'fd00::5/64')
  t.deepEqual(formatCniResult(r, '0.3.1').ips, [{ version: '6', address: 'fd00::5/64', gateway: 'fd00::1' }])
  t.deepEqual(formatCniResult(r, '1.0.0').ips, [{ address: 'fd00::5/64', gateway: 'fd00::1' }])
})

test('formatCniResult writes each version the way its plugins do', (t) => {
  const r = normalizeCniResult(SHAPES['1.1.0'])
  t.deepEqual(formatCniResult(r, '0.3.1'), { ...SHAPES['0.3.1'] })
  t.deepEqual(formatCniResult(r, '1.0.0'), { ...SHAPES['1.0.0'] })
  t.throws(() => formatCniResult(r, '0.2.0'), { instanceOf: InvalidInputError, message: /unsupported CNI version/ })
})

test('malformed results get a clear error naming the field', (t) => {
  const cases: [unknown, RegExp][] = [
    ['{"ips":', /not valid JSON/],
    ['[]', /result: expected an object/],
    [{ cniVersion: '0.2.0', ip4: { ip: '10.0.0.1/24' } }, /cniVersion: unsupported version "0.2.0"/],
    [{ cniVersion: '1.0.0', ips: {} }, /ips: expected an array/],
    [{ cniVersion: '1.0.0', ips: [{ address: '10.0.0.300/24' }] }, /ips\[0\]\.address: "10.0.0.300\/24" is not an address/],
    [{ cniVersion: '1.0.0', ips: [{ address: '10.0.0.3/33' }] }, /ips\[0\]\.address/],
    [{ cniVersion: '1.0.0', ips: [{ address: '10.0.0.3/24', gateway: 'gw' }] }, /ips\[0\]\.gateway: "gw" is not an IP address/],
    [{ cniVersion: '0.4.0', ips: [{ version: '6', address: '10.0.0.3/24' }] }, /ips\[0\]\.version: "6" does not match/],
    [{ cniVersion: '1.0.0', ips: [{ address: '10.0.0.3/24', interface: -1 }] }, /ips\[0\]\.interface: expected an integer >= 0/],
    [{ cniVersion: '1.0.0', interfaces: [{ mac: 'x' }] }, /interfaces\[0\]\.name: expected a non-empty string/],
    [{ cniVersion: '1.0.0', routes: [{ gw: '10.0.0.1' }] }, /routes\[0\]\.dst: expected a string/],
    [{ cniVersion: '1.0.0', dns: { nameservers: '8.8.8.8' } }, /dns\.nameservers: expected an array/],
  ]
  for (const [input, re] of cases) {
    const err = t.throws(() => normalizeCniResult(input, { source: 'plugin "x" ADD result' }), { instanceOf: InvalidInputError })
    t.regex(err?.message ?? '', re)
    t.regex(err?.message ?? '', /^plugin "x" ADD result: /)
  }
  // lenient by default (as libcni), strict on request
  t.notThrows(() => normalizeCniResult({ cniVersion: '1.0.0', extra: 1 }))
  t.throws(() => normalizeCniResult({ cniVersion: '1.0.0', extra: 1 }, { strict: true }), { message: /unknown key "extra"/ })
})
