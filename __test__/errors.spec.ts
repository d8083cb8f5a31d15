/**
 * Errors: one ErrorCode union, a TapmanagerError subclass for every code, and native errors wrapped once (in
 * src/native.ts) into those subclasses with err.code and the message unchanged.
 */
import test, { type ExecutionContext } from 'ava'
import { randomBytes } from 'node:crypto'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import {
  BusyError,
  ClosedError,
  ExistsError,
  fromNativeError,
  InvalidInputError,
  IoError,
  NativeLoadError,
  NeedsDummyGatewayError,
  NetlinkError,
  NotFoundError,
  NotRunningError,
  PermissionError,
  ProtocolError,
  ReadError,
  ServerError,
  ServerFailedError,
  SriovNoIommuGroupError,
  SriovNoVfioError,
  SriovPfNotFoundError,
  SriovVfInUseError,
  TapmanagerError,
  TimeoutError,
  TooLargeError,
  UnsupportedError,
  type ErrorCode,
} from '../src/errors'
import { CniError } from '../src/cni/errors'
import { StateCorruptError } from '../src/state'
import { AggregateOperationError } from '../src/tapfdsource'
import { UsageError } from '../src/cli/args'
import * as native from '../src/native'

// The raw addon (napi's generated loader): its functions are not wrapped, so their errors are plain Errors.
import * as rawAddon from '../index.js'
const raw = rawAddon as unknown as Record<string, unknown>

/** One instance per code: a Record over ErrorCode, so a code without a class does not compile. */
const ONE_OF_EACH: Record<ErrorCode, () => TapmanagerError> = {
  ERR_NOT_FOUND: () => new NotFoundError('m'),
  ERR_EXISTS: () => new ExistsError('m'),
  ERR_BUSY: () => new BusyError('m'),
  ERR_PERMISSION: () => new PermissionError('m'),
  ERR_INVALID: () => new InvalidInputError('m'),
  ERR_TIMEOUT: () => new TimeoutError('m'),
  ERR_CLOSED: () => new ClosedError('m'),
  ERR_TOO_LARGE: () => new TooLargeError('m'),
  ERR_NETLINK: () => new NetlinkError('m'),
  ERR_IO: () => new IoError('m'),
  ERR_TAPMANAGER_NATIVE: () => new NativeLoadError('m'),
  ERR_PROTOCOL: () => new ProtocolError('m'),
  ERR_SERVER: () => new ServerFailedError('m'),
  ERR_UNSUPPORTED: () => new UnsupportedError('m'),
  ERR_NOT_RUNNING: () => new NotRunningError('m'),
  ERR_CNI: () => new CniError('ERR_CNI', 'm'),
  ERR_STATE_CORRUPT: () => new StateCorruptError('f', 'm'),
  ERR_MULTIPLE: () => new AggregateOperationError('m', []),
  ERR_READ: () => new ReadError('m'),
  ERR_USAGE: () => new UsageError('m'),
  ERR_NEEDS_DUMMY_GATEWAY: () => new NeedsDummyGatewayError('m'),
  ERR_SRIOV_NO_IOMMU_GROUP: () => new SriovNoIommuGroupError('m'),
  ERR_SRIOV_NO_VFIO: () => new SriovNoVfioError('m'),
  ERR_SRIOV_VF_IN_USE: () => new SriovVfInUseError('m'),
  ERR_SRIOV_PF_NOT_FOUND: () => new SriovPfNotFoundError('m'),
}

/** The classes native codes become. */
const NATIVE: Partial<Record<ErrorCode, abstract new (...a: never[]) => TapmanagerError>> = {
  ERR_NOT_FOUND: NotFoundError,
  ERR_EXISTS: ExistsError,
  ERR_BUSY: BusyError,
  ERR_PERMISSION: PermissionError,
  ERR_INVALID: InvalidInputError,
  ERR_TIMEOUT: TimeoutError,
  ERR_CLOSED: ClosedError,
  ERR_TOO_LARGE: TooLargeError,
  ERR_NETLINK: NetlinkError,
  ERR_IO: IoError,
  ERR_TAPMANAGER_NATIVE: NativeLoadError,
  ERR_NEEDS_DUMMY_GATEWAY: NeedsDummyGatewayError,
  ERR_SRIOV_NO_IOMMU_GROUP: SriovNoIommuGroupError,
  ERR_SRIOV_NO_VFIO: SriovNoVfioError,
  ERR_SRIOV_VF_IN_USE: SriovVfInUseError,
  ERR_SRIOV_PF_NOT_FOUND: SriovPfNotFoundError,
}

test('every code of the Rust core (crates/tapmanager-core/src/error.rs) is an ErrorCode with its own class when it reaches JavaScript', (t) => {
  const source = readFileSync(join(process.cwd(), 'crates/tapmanager-core/src/error.rs'), 'utf8')
  const coreCodes = [...source.matchAll(/=> "(ERR_[A-Z_]+)"/g)].map((m) => m[1])
  t.true(coreCodes.length >= 10, `codes found in error.rs: ${coreCodes.join(' ')}`)
  for (const code of coreCodes) {
    t.true(Object.hasOwn(ONE_OF_EACH, code), `${code} is in the ErrorCode union`)
    t.truthy(NATIVE[code as ErrorCode], `${code} becomes its own class in src/native.ts`)
    const w = fromNativeError(Object.assign(new Error('m'), { code })) as TapmanagerError
    t.is(w.code as string, code)
    t.not(w.constructor, TapmanagerError)
  }
})

test('every ErrorCode has its own TapmanagerError subclass carrying it', (t) => {
  const names = new Set<string>()
  for (const [code, make] of Object.entries(ONE_OF_EACH) as [ErrorCode, () => TapmanagerError][]) {
    const err = make()
    t.true(err instanceof TapmanagerError, code)
    t.not(err.constructor, TapmanagerError, `${code} has a subclass`)
    t.is(err.code, code)
    t.is(err.name, err.constructor.name)
    names.add(err.constructor.name)
  }
  t.is(names.size, Object.keys(ONE_OF_EACH).length, 'one class per code')
  // ServerError (the wire's error text) has the code its text maps to; ERR_SERVER for an unknown text.
  t.is(new ServerError('something else').code, 'ERR_SERVER')
})

test('fromNativeError: a coded native Error becomes its subclass, same code and message; others pass as they are', (t) => {
  for (const [code, cls] of Object.entries(NATIVE) as [ErrorCode, (typeof NATIVE)[ErrorCode]][]) {
    const e = Object.assign(new Error(`boom ${code}`), { code })
    const w = fromNativeError(e) as TapmanagerError
    t.true(w instanceof cls!, code)
    t.is(w.code, code)
    t.is(w.message, e.message)
    t.is(w.cause, e)
  }
  const napiStatus = Object.assign(new Error('x'), { code: 'InvalidArg' })
  t.is(fromNativeError(napiStatus), napiStatus)
  const ours = new InvalidInputError('y')
  t.is(fromNativeError(ours), ours)
  t.is(fromNativeError('str'), 'str')
  // A TS-only code on a plain Error is not the addon's: left alone.
  const usage = Object.assign(new Error('z'), { code: 'ERR_USAGE' })
  t.is(fromNativeError(usage), usage)
})

function checkWrapped(t: ExecutionContext, err: unknown, rawErr: unknown): void {
  t.false(rawErr instanceof TapmanagerError, 'the raw addon error is a plain Error')
  const code = (rawErr as { code: ErrorCode }).code
  const cls = NATIVE[code]
  t.truthy(cls, `native code ${code}`)
  t.true(err instanceof cls!, `${code} arrives as ${cls!.name}`)
  t.is((err as TapmanagerError).code, code)
  t.is((err as Error).message, (rawErr as Error).message)
}

async function rejection(p: () => unknown): Promise<unknown> {
  try {
    await p()
  } catch (err) {
    return err
  }
  throw new Error('did not fail')
}

test('native functions (sync and async) throw the subclasses; the raw addon the plain Error', async (t) => {
  checkWrapped(t, await rejection(() => native.closeFd(-1)), await rejection(() => (raw.closeFd as typeof native.closeFd)(-1)))
  checkWrapped(t, await rejection(() => native.netnsPath('a/b')), await rejection(() => (raw.netnsPath as typeof native.netnsPath)('a/b')))
  const dir = mkdtempSync(join(tmpdir(), `tm-errors-${process.pid}-`))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const missing = join(dir, `none-${randomBytes(4).toString('hex')}.sock`)
  // A static async method of a class.
  const err = await rejection(() => native.UnixConnection.connect(missing))
  t.true(err instanceof NotFoundError)
  t.is((err as TapmanagerError).code, 'ERR_NOT_FOUND')
})

test('native class methods (static and instance) throw the subclasses; instances stay the addon classes', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), `tm-errors-${process.pid}-`))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const sock = join(dir, `s-${randomBytes(4).toString('hex')}.sock`)
  const listener = native.UnixListener.bind(sock)
  t.teardown(() => listener.close(true))
  t.true(listener instanceof native.UnixListener)
  t.true(listener instanceof (raw.UnixListener as typeof native.UnixListener), 'instances are the addon class')
  // Static sync: the path is taken.
  const taken = await rejection(() => native.UnixListener.bind(sock))
  t.true(taken instanceof TapmanagerError, String(taken))
  t.true(taken instanceof NATIVE[(taken as TapmanagerError).code]!)
  // Instance async: a read that times out.
  const accepted = listener.accept()
  const conn = await native.UnixConnection.connect(sock)
  const server = await accepted
  t.teardown(() => {
    conn.close()
    server.close()
  })
  const timedOut = await rejection(() => conn.readExact(4, 50))
  t.true(timedOut instanceof TimeoutError, String(timedOut))
  t.is((timedOut as TapmanagerError).code, 'ERR_TIMEOUT')
})

test('every function the addon exports is wrapped, and every class method', (t) => {
  const classes = new Set<unknown>(native.NATIVE_CLASSES as readonly unknown[])
  for (const [name, v] of Object.entries(raw)) {
    if (typeof v !== 'function') continue
    if (classes.has(v)) continue
    t.not((native as Record<string, unknown>)[name], v, `${name} is wrapped`)
    t.is(typeof (native as Record<string, unknown>)[name], 'function', name)
  }
  const marker = Symbol.for('tapmanager.nativeErrorsWrapped')
  for (const cls of native.NATIVE_CLASSES) {
    t.true(Object.hasOwn(cls.prototype, marker), `${cls.name}.prototype`)
    t.not((native as Record<string, unknown>)[cls.name], cls, `${cls.name} statics are wrapped`)
  }
  t.is(classes.size, Object.values(raw).filter((v) => typeof v === 'function' && (v as { prototype?: object }).prototype && Object.getOwnPropertyNames((v as { prototype: object }).prototype).length > 1).length)
})
