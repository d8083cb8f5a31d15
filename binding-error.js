'use strict'
// Why the native addon did not load, in words a user can act on: the platform detected and the package to install.
// Plain CommonJS, so that binding.js can use it before anything else loads, on every runtime (Node, Bun, Deno).
const PLATFORM_PACKAGES = {
  'linux-x64': 'tapmanager-linux-x64-gnu',
  'linux-arm64': 'tapmanager-linux-arm64-gnu',
}

/** The messages of an error and of its `cause` chain (the loader chains one error per place it tried). */
function messagesOf(err) {
  const out = []
  const seen = new Set()
  for (let e = err; e != null && !seen.has(e) && out.length < 32; e = e.cause) {
    seen.add(e)
    if (Array.isArray(e)) {
      for (const x of e) out.push(...messagesOf(x))
      break
    }
    out.push(typeof e.message === 'string' ? e.message : String(e))
  }
  return out
}

/** True on a Linux without glibc (musl): process.report tells, where the runtime has it. */
function isMusl() {
  try {
    const report = process.report && typeof process.report.getReport === 'function' ? process.report.getReport() : null
    const header = report && (typeof report === 'string' ? JSON.parse(report) : report).header
    return header ? !header.glibcVersionRuntime : false
  } catch {
    return false
  }
}

/**
 * The error to throw when the loader failed with `err`: names the platform detected and the package to install,
 * or, when the package is there but did not load (an older glibc, a wrong architecture), what the loader said.
 */
function missingBindingError(err, platform = process.platform, arch = process.arch, musl = platform === 'linux' && isMusl()) {
  const { version } = require('./package.json')
  const detected = `${platform}-${arch}${platform === 'linux' ? (musl ? ' (musl)' : ' (glibc)') : ''}`
  const pkg = PLATFORM_PACKAGES[`${platform}-${arch}`]
  const supported = Object.values(PLATFORM_PACKAGES).map((p) => p.replace('tapmanager-', '')).join(', ')
  let message
  if (!pkg || musl) {
    message = `tapmanager has no native addon for ${detected}; it supports ${supported}`
  } else {
    const messages = messagesOf(err)
    const notFound = (m) => /Cannot find module|MODULE_NOT_FOUND|ERR_MODULE_NOT_FOUND/.test(m)
    const loadFailure = messages.find((m) => !notFound(m) && !/Cannot find native binding/.test(m))
    message = loadFailure
      ? `tapmanager's native addon for ${detected} (package ${pkg}@${version}) did not load: ${loadFailure}`
      : `tapmanager's native addon for ${detected} is not installed: install the package ${pkg}@${version} ` +
        `(\`npm install ${pkg}@${version}\`; it is an optional dependency of tapmanager, which an install with ` +
        `--omit=optional or --no-optional leaves out)`
  }
  // The cause is what the loader tried and why each failed, without its own wrapper (which blames an npm bug).
  const cause = err && typeof err === 'object' && err.cause != null && /Cannot find native binding/.test(err.message) ? err.cause : err
  const error = new Error(message, { cause })
  error.code = 'ERR_TAPMANAGER_NATIVE'
  error.platform = detected
  error.package = pkg ?? null
  return error
}

module.exports = { missingBindingError, PLATFORM_PACKAGES }
