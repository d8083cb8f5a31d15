/**
 * The native addon, loaded once through binding.js at the package root: the napi-rs generated loader (`index.js`)
 * wrapped so that a missing or unloadable platform package gives an error naming the package and the platform.
 * Every other module imports the binding from here, never from the loader directly.
 */
export * from '../binding.js'
