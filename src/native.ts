/**
 * The native addon, loaded once through the napi-rs generated loader (`index.js` at the package root).
 * Every other module imports the binding from here, never from the loader directly.
 */
export * from '../index.js'
