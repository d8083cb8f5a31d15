/** The CNI client: config loading, plugin execution, result normalisation, the on-disk result cache. */
export * from './errors'
export * from './result'
export * from './config'
export * from './exec'
export * from './cache'
export * from './client'
