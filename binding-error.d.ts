/** The Linux platforms with a native addon package, as `<platform>-<arch>`: package name. */
export declare const PLATFORM_PACKAGES: Readonly<Record<string, string>>
/** The error thrown when the native addon does not load; `code` is 'ERR_TAPMANAGER_NATIVE'. */
export declare function missingBindingError(
  err: unknown,
  platform?: string,
  arch?: string,
  musl?: boolean,
): Error & { code: 'ERR_TAPMANAGER_NATIVE'; platform: string; package: string | null }
