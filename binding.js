'use strict'
// The native addon through the napi-rs generated loader (index.js), with a clear error when it cannot be loaded:
// the loader's own message blames an npm bug and names no package. Written by hand (index.js is generated).
try {
  require('./index.js')
} catch (err) {
  throw require('./binding-error.js').missingBindingError(err)
}
module.exports = require('./index.js')
