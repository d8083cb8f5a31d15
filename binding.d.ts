// The native addon (see binding.js): the same exports as the generated index.d.ts.
export * from './index'
