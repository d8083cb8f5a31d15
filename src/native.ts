/**
 * The native addon, loaded once through binding.js at the package root: the napi-rs generated loader (`index.js`)
 * wrapped so that a missing or unloadable platform package gives an error naming the package and the platform.
 * Every other module imports the binding from here, never from the loader directly.
 *
 * This is the one place native errors become TypeScript errors: every exported function, every method (static
 * or not) of every exported class and every class constructor is wrapped once, at load, so that an error the
 * addon throws or rejects with (a plain `Error` with the core's `code`) arrives as its {@link TapmanagerError}
 * subclass ({@link fromNativeError}: same `code` and message, the original as `cause`). (Failing to load the
 * addon at all still throws binding-error.js's plain Error with code `ERR_TAPMANAGER_NATIVE`.)
 */
import * as binding from '../binding.js'
import { fromNativeError } from './errors'

export * from '../binding.js'

const WRAPPED = Symbol.for('tapmanager.nativeErrorsWrapped')

/** `fn` with its throws and rejections passed through {@link fromNativeError}. */
function wrapFunction<F extends (...args: never[]) => unknown>(fn: F): F {
  const wrapped = function (this: unknown, ...args: Parameters<F>): unknown {
    let result: unknown
    try {
      result = fn.apply(this, args)
    } catch (err) {
      throw fromNativeError(err)
    }
    if (result instanceof Promise) {
      return result.catch((err: unknown) => {
        throw fromNativeError(err)
      })
    }
    return result
  }
  Object.defineProperty(wrapped, 'name', { value: fn.name })
  return wrapped as unknown as F
}

/** Wraps the own methods of `target` (a class or its prototype) in place, once; accessors are left alone. */
function wrapMethods(target: object): void {
  if (Object.hasOwn(target, WRAPPED)) return
  for (const name of Object.getOwnPropertyNames(target)) {
    if (name === 'constructor' || name === 'prototype' || name === 'length' || name === 'name') continue
    const desc = Object.getOwnPropertyDescriptor(target, name)
    if (!desc || typeof desc.value !== 'function' || !desc.writable) continue
    Object.defineProperty(target, name, { ...desc, value: wrapFunction(desc.value as (...args: never[]) => unknown) })
  }
  Object.defineProperty(target, WRAPPED, { value: true })
}

/**
 * One of the addon's classes with its methods wrapped: instance methods in place on its prototype (so instances
 * and `instanceof` stay the addon's), static methods (napi makes them read-only) through a Proxy that answers
 * for the class: `new`, `instanceof` and every other property go to the addon class.
 */
function wrapClass<C extends abstract new (...args: never[]) => unknown>(cls: C): C {
  wrapMethods(cls.prototype as object)
  const statics = new Map<string | symbol, unknown>()
  for (const name of Object.getOwnPropertyNames(cls)) {
    const v = (cls as unknown as Record<string, unknown>)[name]
    if (name !== 'prototype' && typeof v === 'function') statics.set(name, wrapFunction(v as (...args: never[]) => unknown))
  }
  // The target is a plain function (its `prototype` is writable, so `get` may answer with the addon's).
  const stand = function () {} as unknown as C
  return new Proxy(stand, {
    get: (_t, prop) => (prop === 'prototype' ? cls.prototype : statics.has(prop) ? statics.get(prop) : Reflect.get(cls, prop)),
    construct: (_t, args, newTarget) => {
      try {
        return Reflect.construct(cls, args, newTarget === proxyOf.get(cls) ? cls : newTarget) as object
      } catch (err) {
        throw fromNativeError(err)
      }
    },
    has: (_t, prop) => Reflect.has(cls, prop),
  })
}
const proxyOf = new Map<unknown, unknown>()
function classExport<C extends abstract new (...args: never[]) => unknown>(cls: C): C {
  const p = wrapClass(cls)
  proxyOf.set(cls, p)
  return p
}

// The addon's classes (these exports, value and type, take the place of the same names from `export *` above).
export const DhcpServer = classExport(binding.DhcpServer)
export type DhcpServer = binding.DhcpServer
export const FdRequestPort = classExport(binding.FdRequestPort)
export type FdRequestPort = binding.FdRequestPort
export const FrameSink = classExport(binding.FrameSink)
export type FrameSink = binding.FrameSink
export const NetlinkHandle = classExport(binding.NetlinkHandle)
export type NetlinkHandle = binding.NetlinkHandle
export const UnixConnection = classExport(binding.UnixConnection)
export type UnixConnection = binding.UnixConnection
export const UnixListener = classExport(binding.UnixListener)
export type UnixListener = binding.UnixListener
/** The addon's classes, unwrapped (for tests: every method is wrapped). */
/**
 * Bun and Deno lack libuv's functions or stub them: only on Node does the addon wait on the JavaScript thread's
 * own event loop (the client's responses, the server's next requests).
 */
export const LOOP_WAITS_POSSIBLE = typeof process === 'object' && !process.versions.bun && !process.versions.deno

/**
 * A request frame handed over by `FrameSink` or `startIncomingOnLoop` (header at 0 of `buf`, then `dataLen`
 * payload bytes; -2: the payload was not read), copied out (the inbox is overwritten by the next frame).
 */
export function frameFrom(buf: Buffer, dataLen: number): binding.Frame {
  return {
    header: Buffer.from(buf.subarray(0, 77)),
    data: dataLen >= 0 ? Buffer.from(buf.subarray(77, 77 + dataLen)) : undefined,
    fds: [],
  }
}

export const NATIVE_CLASSES = [binding.DhcpServer, binding.FdRequestPort, binding.FrameSink, binding.NetlinkHandle, binding.UnixConnection, binding.UnixListener] as const

// The addon's functions, wrapped (these exports take the place of the same names from `export *` above).
export const addDhcpIsolation = wrapFunction(binding.addDhcpIsolation)
export const closeFd = wrapFunction(binding.closeFd)
export const closeFds = wrapFunction(binding.closeFds)
export const cmsgSpace = wrapFunction(binding.cmsgSpace)
export const createNetns = wrapFunction(binding.createNetns)
export const createTap = wrapFunction(binding.createTap)
export const deleteNetns = wrapFunction(binding.deleteNetns)
export const deleteTap = wrapFunction(binding.deleteTap)
export const drainTapFd = wrapFunction(binding.drainTapFd)
export const dupFds = wrapFunction(binding.dupFds)
export const fdRequest = wrapFunction(binding.fdRequest)
export const prepareEventLoop = wrapFunction(binding.prepareEventLoop)
export const isNetnsMount = wrapFunction(binding.isNetnsMount)
export const listDhcpIsolation = wrapFunction(binding.listDhcpIsolation)
export const listNetns = wrapFunction(binding.listNetns)
export const nativeVersion = wrapFunction(binding.nativeVersion)
export const needsDummyGateway = wrapFunction(binding.needsDummyGateway)
export const netnsPath = wrapFunction(binding.netnsPath)
export const netnsPoolStatus = wrapFunction(binding.netnsPoolStatus)
export const openTap = wrapFunction(binding.openTap)
export const recoverContainerSide = wrapFunction(binding.recoverContainerSide)
export const removeDhcpIsolation = wrapFunction(binding.removeDhcpIsolation)
export const removeFile = wrapFunction(binding.removeFile)
export const reopenTaps = wrapFunction(binding.reopenTaps)
export const replaceFile = wrapFunction(binding.replaceFile)
export const setNetnsPool = wrapFunction(binding.setNetnsPool)
export const setupContainerSide = wrapFunction(binding.setupContainerSide)
export const startDhcpServer = wrapFunction(binding.startDhcpServer)
export const startDhcpServerParsed = wrapFunction(binding.startDhcpServerParsed)
export const tapFdInfo = wrapFunction(binding.tapFdInfo)
export const teardownContainerSide = wrapFunction(binding.teardownContainerSide)

// The loop's waits share one epoll set per thread: made now, so its fd is there from the start (not from the
// first request), as the runtime's own fds are.
if (LOOP_WAITS_POSSIBLE) prepareEventLoop()
