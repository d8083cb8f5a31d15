/**
 * FDServer and its public types (the code lives in src/server/: fdserver.ts the server's life, connections.ts the
 * request path, registry.ts the keys, log.ts the request log, limits.ts the listener's refusals, options.ts the
 * options and shapes).
 */
export { FDServer } from './server/fdserver'
export {
  FAST_LOG_CAPACITY,
  MAX_ERROR_TEXT,
  defaultMaxConnections,
  type FDServerOptions,
  type LimitCounts,
  type LimitsReport,
  type RequestLogEntry,
  type ServerListing,
} from './server/options'
