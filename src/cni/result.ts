/**
 * CNI results of every spec version from 0.3.0 to 1.1.0, normalised to one internal shape.
 *
 * What differs between versions (CNI SPEC.md, "Success"):
 * - 0.3.0, 0.3.1, 0.4.0: `ips[].version` ("4"/"6") is required; `ips[].interface` is optional.
 * - 1.0.0: `ips[].version` is gone.
 * - 1.1.0: adds `interfaces[].mtu`, `socketPath`, `pciID` and `routes[].mtu`, `advmss`, `priority`, `table`, `scope`.
 * The normalised shape holds the union; the IP family is derived from the address, never from `version`.
 * Empty strings for optional IPs/MACs (Go's zero values) read as absent.
 */
import { isIP } from 'node:net'
import { InvalidInputError } from '../errors'

/** The CNI spec versions whose results we read and whose configs we run. */
export const SUPPORTED_CNI_VERSIONS = ['0.3.0', '0.3.1', '0.4.0', '1.0.0', '1.1.0'] as const

/** One interface a plugin created or touched. */
export interface CniInterface {
  name: string
  /** MAC address as the plugin wrote it (normally `aa:bb:cc:dd:ee:ff`). */
  mac?: string
  /** The netns path for container-side interfaces; absent for host-side ones. */
  sandbox?: string
  mtu?: number
  socketPath?: string
  pciID?: string
}

/** One IP configuration. */
export interface CniIpConfig {
  /** The address with its prefix length, e.g. `10.1.90.5/24`. */
  address: string
  /** The gateway, absent when none. */
  gateway?: string
  /** Index into `interfaces`, absent when the plugin gave none. */
  interface?: number
}

/** One route. */
export interface CniRoute {
  /** Destination prefix, e.g. `0.0.0.0/0`. */
  dst: string
  /** Next hop; absent means the plugin's default gateway choice (spec) / on-link. */
  gw?: string
  mtu?: number
  advmss?: number
  priority?: number
  table?: number
  scope?: number
}

/** DNS settings (each key absent when empty). */
export interface CniDns {
  nameservers?: string[]
  domain?: string
  search?: string[]
  options?: string[]
}

/** A CNI result in the internal, version-independent shape. */
export interface CniResult {
  /** The spec version the result was written in (from the result, or the config when the result has none). */
  cniVersion: string
  interfaces: CniInterface[]
  ips: CniIpConfig[]
  routes: CniRoute[]
  dns: CniDns
}

/** Options of {@link normalizeCniResult}. */
export interface NormalizeOptions {
  /** The version to assume when the result carries no `cniVersion` (e.g. the config's). Default `0.3.1`. */
  defaultVersion?: string
  /**
   * Reject keys that no spec version defines (for payloads from peers; plugin output is read leniently,
   * as libcni does). Default false.
   */
  strict?: boolean
  /**
   * Read an absent `ips[].interface` as 0. Virtlet's vendored Go types hold it in an `int` with `omitempty`, so
   * its JSON drops index 0; readers of Virtlet's JSON must use this. Default false.
   */
  absentInterfaceIsZero?: boolean
  /** Where the result came from, for error messages (e.g. `plugin "bridge"`). */
  source?: string
}

const RESULT_KEYS = ['cniVersion', 'interfaces', 'ips', 'routes', 'dns']
const IFACE_KEYS = ['name', 'mac', 'sandbox', 'mtu', 'socketPath', 'pciID']
const IP_KEYS = ['version', 'interface', 'address', 'gateway']
const ROUTE_KEYS = ['dst', 'gw', 'mtu', 'advmss', 'priority', 'table', 'scope']
const DNS_KEYS = ['nameservers', 'domain', 'search', 'options']

/** True when `a` is a spec version we support. */
export function isSupportedCniVersion(v: unknown): v is string {
  return typeof v === 'string' && (SUPPORTED_CNI_VERSIONS as readonly string[]).includes(v)
}

/** Compares two dotted versions numerically (-1, 0, 1). */
export function compareCniVersions(a: string, b: string): number {
  const pa = a.split('.').map(Number)
  const pb = b.split('.').map(Number)
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const d = (pa[i] ?? 0) - (pb[i] ?? 0)
    if (d !== 0) return d < 0 ? -1 : 1
  }
  return 0
}

/** Checks an IP address string (no prefix); returns its family (4 or 6). */
export function ipFamily(ip: string): 4 | 6 | 0 {
  const f = isIP(ip)
  return f === 4 || f === 6 ? f : 0
}

/** Parses `addr/len`; returns the family, or throws. */
export function parseCidr(cidr: string, what: string): { ip: string; prefix: number; family: 4 | 6 } {
  const slash = cidr.indexOf('/')
  const ip = slash < 0 ? cidr : cidr.slice(0, slash)
  const lenText = slash < 0 ? '' : cidr.slice(slash + 1)
  const family = ipFamily(ip)
  const prefix = /^(0|[1-9][0-9]{0,2})$/.test(lenText) ? Number(lenText) : NaN
  if (!family || !(prefix <= (family === 4 ? 32 : 128))) {
    throw new InvalidInputError(`${what}: ${JSON.stringify(cidr)} is not an address with a prefix length (like 10.1.90.5/24)`)
  }
  return { ip, prefix, family }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v)
}

class Reader {
  constructor(
    private readonly source: string,
    private readonly strict: boolean,
  ) {}

  fail(path: string, msg: string): never {
    throw new InvalidInputError(`${this.source}: ${path}: ${msg}`)
  }

  object(v: unknown, path: string, keys: string[]): Record<string, unknown> {
    if (!isObject(v)) this.fail(path, `expected an object, got ${JSON.stringify(v)}`)
    if (this.strict) {
      for (const k of Object.keys(v)) if (!keys.includes(k)) this.fail(path, `unknown key ${JSON.stringify(k)}`)
    }
    return v
  }

  array(v: unknown, path: string): unknown[] {
    if (v === undefined || v === null) return []
    if (!Array.isArray(v)) this.fail(path, `expected an array, got ${JSON.stringify(v)}`)
    return v
  }

  /** An optional string; `""` and null read as absent (Go zero values). */
  optString(v: unknown, path: string): string | undefined {
    if (v === undefined || v === null || v === '') return undefined
    if (typeof v !== 'string') this.fail(path, `expected a string, got ${JSON.stringify(v)}`)
    return v
  }

  optInt(v: unknown, path: string, min = 0): number | undefined {
    if (v === undefined || v === null) return undefined
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min) this.fail(path, `expected an integer >= ${min}, got ${JSON.stringify(v)}`)
    return v
  }

  optIp(v: unknown, path: string): string | undefined {
    const s = this.optString(v, path)
    if (s !== undefined && !ipFamily(s)) this.fail(path, `${JSON.stringify(s)} is not an IP address`)
    return s
  }

  stringList(v: unknown, path: string): string[] | undefined {
    const a = this.array(v, path)
    a.forEach((s, i) => {
      if (typeof s !== 'string') this.fail(`${path}[${i}]`, `expected a string, got ${JSON.stringify(s)}`)
    })
    return a.length ? (a as string[]) : undefined
  }
}

/** Reads a DNS object (absent/null => `{}`), dropping empty keys. */
export function normalizeCniDns(v: unknown, opts: { strict?: boolean; source?: string; path?: string } = {}): CniDns {
  const r: Reader = new Reader(opts.source ?? 'CNI DNS', !!opts.strict)
  const path = opts.path ?? 'dns'
  if (v === undefined || v === null) return {}
  const o = r.object(v, path, DNS_KEYS)
  const dns: CniDns = {}
  const nameservers = r.stringList(o.nameservers, `${path}.nameservers`)
  if (nameservers) dns.nameservers = nameservers
  const domain = r.optString(o.domain, `${path}.domain`)
  if (domain) dns.domain = domain
  const search = r.stringList(o.search, `${path}.search`)
  if (search) dns.search = search
  const options = r.stringList(o.options, `${path}.options`)
  if (options) dns.options = options
  return dns
}

/**
 * Reads a CNI result of any supported version (an object or its JSON text) into the internal shape.
 * Throws {@link InvalidInputError} naming the bad field.
 */
export function normalizeCniResult(raw: unknown, opts: NormalizeOptions = {}): CniResult {
  const source = opts.source ?? 'CNI result'
  const r: Reader = new Reader(source, !!opts.strict)
  let v = raw
  if (typeof v === 'string' || Buffer.isBuffer(v)) {
    try {
      v = JSON.parse(v.toString())
    } catch (e) {
      throw new InvalidInputError(`${source}: not valid JSON: ${(e as Error).message}`)
    }
  }
  const o = r.object(v, 'result', RESULT_KEYS)
  let cniVersion = opts.defaultVersion ?? '0.3.1'
  if (o.cniVersion !== undefined) {
    if (!isSupportedCniVersion(o.cniVersion)) {
      r.fail('cniVersion', `unsupported version ${JSON.stringify(o.cniVersion)} (supported: ${SUPPORTED_CNI_VERSIONS.join(', ')})`)
    }
    cniVersion = o.cniVersion
  }
  const interfaces = r.array(o.interfaces, 'interfaces').map((x, i): CniInterface => {
    const p = `interfaces[${i}]`
    const io = r.object(x, p, IFACE_KEYS)
    if (typeof io.name !== 'string' || io.name === '') r.fail(`${p}.name`, `expected a non-empty string, got ${JSON.stringify(io.name)}`)
    const iface: CniInterface = { name: io.name }
    const mac = r.optString(io.mac, `${p}.mac`)
    if (mac !== undefined) iface.mac = mac
    const sandbox = r.optString(io.sandbox, `${p}.sandbox`)
    if (sandbox !== undefined) iface.sandbox = sandbox
    const mtu = r.optInt(io.mtu, `${p}.mtu`)
    if (mtu) iface.mtu = mtu
    const socketPath = r.optString(io.socketPath, `${p}.socketPath`)
    if (socketPath !== undefined) iface.socketPath = socketPath
    const pciID = r.optString(io.pciID, `${p}.pciID`)
    if (pciID !== undefined) iface.pciID = pciID
    return iface
  })
  const ips = r.array(o.ips, 'ips').map((x, i): CniIpConfig => {
    const p = `ips[${i}]`
    const io = r.object(x, p, IP_KEYS)
    if (typeof io.address !== 'string') r.fail(`${p}.address`, `expected a string, got ${JSON.stringify(io.address)}`)
    const { family } = parseCidr(io.address, `${source}: ${p}.address`)
    if (io.version !== undefined && io.version !== null && io.version !== '') {
      if (io.version !== '4' && io.version !== '6') r.fail(`${p}.version`, `expected "4" or "6", got ${JSON.stringify(io.version)}`)
      if (Number(io.version) !== family) r.fail(`${p}.version`, `"${io.version}" does not match address ${io.address}`)
    }
    const ip: CniIpConfig = { address: io.address }
    const gateway = r.optIp(io.gateway, `${p}.gateway`)
    if (gateway !== undefined) ip.gateway = gateway
    const index = r.optInt(io.interface, `${p}.interface`)
    if (index !== undefined) ip.interface = index
    else if (opts.absentInterfaceIsZero) ip.interface = 0
    return ip
  })
  const routes = r.array(o.routes, 'routes').map((x, i): CniRoute => {
    const p = `routes[${i}]`
    const ro = r.object(x, p, ROUTE_KEYS)
    if (typeof ro.dst !== 'string') r.fail(`${p}.dst`, `expected a string, got ${JSON.stringify(ro.dst)}`)
    parseCidr(ro.dst, `${source}: ${p}.dst`)
    const route: CniRoute = { dst: ro.dst }
    const gw = r.optIp(ro.gw, `${p}.gw`)
    if (gw !== undefined) route.gw = gw
    for (const k of ['mtu', 'advmss', 'priority', 'table', 'scope'] as const) {
      const n = r.optInt(ro[k], `${p}.${k}`)
      if (n !== undefined) route[k] = n
    }
    return route
  })
  const dns = normalizeCniDns(o.dns, { strict: opts.strict, source, path: 'dns' })
  return { cniVersion, interfaces, ips, routes, dns }
}

/**
 * Writes a normalised result as the JSON object of the given spec version (what a plugin of that version
 * would print): `version` in `ips` before 1.0.0, the 1.1.0-only fields only for 1.1.0, empty lists left out.
 */
export function formatCniResult(result: CniResult, cniVersion: string = result.cniVersion): Record<string, unknown> {
  if (!isSupportedCniVersion(cniVersion)) throw new InvalidInputError(`unsupported CNI version ${JSON.stringify(cniVersion)}`)
  const v11 = compareCniVersions(cniVersion, '1.1.0') >= 0
  const withVersion = compareCniVersions(cniVersion, '1.0.0') < 0
  const out: Record<string, unknown> = { cniVersion }
  if (result.interfaces.length) {
    out.interfaces = result.interfaces.map((i) => {
      const o: Record<string, unknown> = { name: i.name }
      if (i.mac !== undefined) o.mac = i.mac
      if (v11 && i.mtu !== undefined) o.mtu = i.mtu
      if (i.sandbox !== undefined) o.sandbox = i.sandbox
      if (v11 && i.socketPath !== undefined) o.socketPath = i.socketPath
      if (v11 && i.pciID !== undefined) o.pciID = i.pciID
      return o
    })
  }
  if (result.ips.length) {
    out.ips = result.ips.map((ip) => {
      const o: Record<string, unknown> = {}
      if (withVersion) o.version = String(parseCidr(ip.address, 'ips[].address').family)
      if (ip.interface !== undefined) o.interface = ip.interface
      o.address = ip.address
      if (ip.gateway !== undefined) o.gateway = ip.gateway
      return o
    })
  }
  if (result.routes.length) {
    out.routes = result.routes.map((rt) => {
      const o: Record<string, unknown> = { dst: rt.dst }
      if (rt.gw !== undefined) o.gw = rt.gw
      if (v11) for (const k of ['mtu', 'advmss', 'priority', 'table', 'scope'] as const) if (rt[k] !== undefined) o[k] = rt[k]
      return o
    })
  }
  out.dns = { ...result.dns }
  return out
}
