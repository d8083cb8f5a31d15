import test from 'ava'
import { closeSync, mkdtempSync, openSync, readlinkSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { buildQemuNetArgs, spawnWithFds, type InterfaceInfo } from '../src/qemu'
import { openFdCount } from './helpers/env'

const tap = (fdIndex: number, mac: string): InterfaceInfo => ({ type: 0, mac, fdIndex, pciAddress: '' })
const vf = (pciAddress: string, mac = '42:a4:a6:22:80:2f'): InterfaceInfo => ({ type: 1, mac, fdIndex: 0, pciAddress })

test('one tap: the vmwrapper pair with the fd as the child sees it (fd 3)', (t) => {
  t.deepEqual(buildQemuNetArgs([tap(0, '42:a4:a6:22:80:2e')], [17]), [
    '-netdev',
    'tap,id=tap0,fd=3',
    '-device',
    'virtio-net-pci,netdev=tap0,id=net0,mac=42:a4:a6:22:80:2e',
  ])
})

test('firstFd null uses the fds themselves (QEMU exec in place, as vmwrapper does)', (t) => {
  t.deepEqual(buildQemuNetArgs([tap(0, '42:a4:a6:22:80:2e'), tap(1, '42:a4:a6:22:80:30')], [17, 21], null), [
    '-netdev',
    'tap,id=tap0,fd=17',
    '-device',
    'virtio-net-pci,netdev=tap0,id=net0,mac=42:a4:a6:22:80:2e',
    '-netdev',
    'tap,id=tap1,fd=21',
    '-device',
    'virtio-net-pci,netdev=tap1,id=net1,mac=42:a4:a6:22:80:30',
  ])
})

test('mixed taps and VFs: net<i> counts descriptions, hostdev<n> counts VFs, the PCI domain is dropped', (t) => {
  const info = [vf('0000:03:10.2'), tap(1, '42:A4:A6:22:80:2E'), vf('0000:03:10.4'), tap(0, '42:a4:a6:22:80:31')]
  t.deepEqual(buildQemuNetArgs(info, [30, 31], 5), [
    '-device',
    'vfio-pci,host=03:10.2,id=hostdev0',
    '-netdev',
    'tap,id=tap1,fd=6',
    '-device',
    'virtio-net-pci,netdev=tap1,id=net1,mac=42:a4:a6:22:80:2e',
    '-device',
    'vfio-pci,host=03:10.4,id=hostdev1',
    '-netdev',
    'tap,id=tap0,fd=5',
    '-device',
    'virtio-net-pci,netdev=tap0,id=net3,mac=42:a4:a6:22:80:31',
  ])
})

test('no interfaces: no arguments', (t) => {
  t.deepEqual(buildQemuNetArgs([], []), [])
})

test('bad input is refused with ERR_INVALID', (t) => {
  const bad: Array<[InterfaceInfo[], number[], RegExp]> = [
    [[tap(1, '42:a4:a6:22:80:2e')], [3], /fdIndex 1 is not one of the 1 fds/],
    [[tap(0, 'QqSmIoAu')], [3], /bad MAC address "QqSmIoAu"/],
    [[tap(0, '42:a4:a6:22:80')], [3], /bad MAC address/],
    [[vf('zz')], [], /bad PCI address "zz"/],
    [[{ type: 2 as 0, mac: '42:a4:a6:22:80:2e', fdIndex: 0, pciAddress: '' }], [3], /unknown interface type 2/],
    [[tap(0, '42:a4:a6:22:80:2e')], [-1], /fds must be an array of non-negative integers/],
  ]
  for (const [info, fds, re] of bad) {
    const err = t.throws(() => buildQemuNetArgs(info, fds))
    t.is((err as { code?: string }).code, 'ERR_INVALID')
    t.regex(err!.message, re)
  }
  t.throws(() => buildQemuNetArgs([], [], -3), { code: 'ERR_INVALID' } as never)
})

test('spawnWithFds: the child has the fds as 3, 4, ... in order, and the parent keeps its own', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'tmqemu-'))
  const a = join(dir, 'a')
  const b = join(dir, 'b')
  writeFileSync(a, '')
  writeFileSync(b, '')
  const before = openFdCount()
  const fa = openSync(a, 'r')
  const fb = openSync(b, 'r')
  try {
    const child = spawnWithFds('sh', ['-c', 'readlink /proc/self/fd/3 /proc/self/fd/4; if [ -e /proc/self/fd/5 ]; then echo extra; fi'], [fb, fa], {
      stdio: ['ignore', 'pipe', 'inherit'],
    })
    let out = ''
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d))
    const code = await new Promise<number | null>((resolve) => child.on('close', resolve))
    t.is(code, 0)
    t.deepEqual(out.trim().split('\n'), [b, a])
    t.is(readlinkSync(`/proc/self/fd/${fa}`), a, 'the parent still has its fd')
  } finally {
    closeSync(fa)
    closeSync(fb)
    rmSync(dir, { recursive: true })
  }
  t.is(openFdCount(), before)
})

test('spawnWithFds refuses fds that are not fd numbers', (t) => {
  t.throws(() => spawnWithFds('true', [], [1.5]), { code: 'ERR_INVALID' } as never)
})
