/**
 * The JSON payloads of TapFDSource, byte-compatible with what Virtlet's Go code emits (encoding/json):
 * GetFDPayload (add data), RecoverPayload (recover data), ContainerSideNetwork (add response, persisted for
 * recover), the get info array, and the CNI result inside ContainerSideNetwork (Virtlet's vendored CNI 0.3.1
 * types: no `cniVersion`, `interface` omitted when 0, empty lists omitted, `dns` always present).
 *
 * TypeScript side: camelCase objects, MACs as `aa:bb:cc:dd:ee:ff` strings. Wire side: Go's field names and
 * encodings (MAC = base64 of its 6 bytes, `null` when missing), written by {@link goJsonStringify}.
 *
 * Parsing is stricter than Go's, on purpose (documented deviation): Go ignores unknown keys and matches keys
 * case-insensitively; we reject any key that is not exactly one of the known ones (naming it), reject `null`
 * where Go would silently keep a zero value for a string/number/bool, and require `podNetworkDesc`, its `podId`
 * and (in RecoverPayload) `csn`. Anything Virtlet itself emits parses. Every error is an {@link InvalidInputError}.
 */
import { InvalidInputError, capText } from './errors'
import { CNI_NAME_RE } from './cni/config'
import { normalizeCniDns, normalizeCniResult, parseCidr, type CniDns, type CniResult } from './cni/result'

/** The pod a GetFDPayload/RecoverPayload is about (Go `tapmanager.PodNetworkDesc`). */
export interface PodNetworkDesc {
  /** Pod sandbox id: the CNI container id and the name of the pod's netns. */
  podId: string
  podNs: string
  podName: string
  /** DNS that replaces the CNI result's DNS; null when none (`"DNS":null`). */
  dns: CniDns | null
}

/** add data of TapFDSource (Go `GetFDPayload`). */
export interface GetFDPayload {
  podNetworkDesc: PodNetworkDesc
}

/** Interface types (Go `network.InterfaceType`). */
export const InterfaceType = { Tap: 0, Vf: 1 } as const
export type InterfaceType = (typeof InterfaceType)[keyof typeof InterfaceType]

/** One VM-side interface (Go `network.InterfaceDescription`, without its fd). */
export interface InterfaceDescription {
  type: InterfaceType
  /** The CNI link's name in the pod netns, e.g. `eth0`. */
  name: string
  /** The original MAC of the CNI link (the VM gets it), `aa:bb:cc:dd:ee:ff`; null when unknown. */
  hardwareAddr: string | null
  /** PCI address of an SR-IOV VF (`0000:01:10.0`), empty for taps. */
  pciAddress: string
  /** MTU (0..65535). */
  mtu: number
  vlanId: number
}

/** The add response of TapFDSource, and what a caller keeps for recover (Go `network.ContainerSideNetwork`). */
export interface ContainerSideNetwork {
  /** The (fixed) CNI result; null only if Go sent `null`. */
  result: CniResult | null
  /** The pod's netns path, `/var/run/netns/<podId>`. */
  nsPath: string
  interfaces: InterfaceDescription[]
}

/** recover data of TapFDSource (Go `RecoverPayload`). */
export interface RecoverPayload {
  podNetworkDesc: PodNetworkDesc
  csn: ContainerSideNetwork
  haveRunningContainers: boolean
}

/** One entry of TapFDSource's get info (Go `tapmanager.InterfaceDescription`), in fd order. */
export interface FdInfo {
  type: InterfaceType
  /** MAC `aa:bb:cc:dd:ee:ff`, or null. */
  mac: string | null
  fdIndex: number
  pciAddress: string
}

// ---------------------------------------------------------------------------------------------------------
// Go-compatible JSON writing

/**
 * `JSON.stringify` with Go encoding/json's string escaping: `<`, `>`, `&`, U+2028 and U+2029 as `\u003c`...,
 * and `\b`, `\f` as `\u0008`, `\u000c` (as the Go of Virtlet's time). Object keys are written in insertion
 * order, so callers build objects in Go's struct field order.
 */
export function goJsonStringify(value: unknown): string {
  return JSON.stringify(value)
    .replace(/[<>&\u2028\u2029]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`)
    .replace(/\\[\s\S]/g, (esc) => (esc === '\\b' ? '\\u0008' : esc === '\\f' ? '\\u000c' : esc))
}

// ---------------------------------------------------------------------------------------------------------
// MACs

const MAC_RE = /^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$/
const MAC_B64_RE = /^[A-Za-z0-9+/]{8}$/

/** `42:a4:a6:22:80:2e` => `QqSmIoAu` (Go's JSON of a `net.HardwareAddr`). */
export function macToBase64(mac: string): string {
  if (typeof mac !== 'string' || !MAC_RE.test(mac)) throw new InvalidInputError(`invalid MAC address ${shown(mac)}`)
  return Buffer.from(mac.split(':').map((h) => parseInt(h, 16))).toString('base64')
}

/** `QqSmIoAu` => `42:a4:a6:22:80:2e` (lower case). Only 6-byte addresses in standard base64 are accepted. */
export function base64ToMac(b64: string): string {
  if (typeof b64 !== 'string' || !MAC_B64_RE.test(b64)) {
    throw new InvalidInputError(`invalid MAC ${shown(b64)}: expected base64 of 6 bytes (8 characters)`)
  }
  return [...Buffer.from(b64, 'base64')].map((b) => b.toString(16).padStart(2, '0')).join(':')
}

// ---------------------------------------------------------------------------------------------------------
// Strict reading helpers

type Obj = Record<string, unknown>

function fail(path: string, msg: string): never {
  throw new InvalidInputError(`${path}: ${msg}`)
}

/** At most this many bytes of a peer's value are echoed in an error message (then `...`). */
export const ECHO_LIMIT = 256

/** A value as JSON for an error message, cut to {@link ECHO_LIMIT} bytes (`...` marks the cut). */
export function shown(v: unknown): string {
  let s: string
  try {
    s = v === undefined ? 'undefined' : JSON.stringify(v)
  } catch {
    s = String(v)
  }
  return capText(s, ECHO_LIMIT)
}

/** How deeply arrays and objects may nest in a payload (Virtlet's payloads need 6 levels). */
export const MAX_JSON_DEPTH = 64

/**
 * The nesting depth of JSON text, counted on its brackets outside strings (no parse): a cheap check before
 * `JSON.parse`, which would recurse that deep.
 */
export function jsonDepth(text: string, stopAt = Infinity): number {
  let depth = 0
  let max = 0
  let inString = false
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i)
    if (inString) {
      if (c === 0x5c) i++ // backslash: skip the escaped character
      else if (c === 0x22) inString = false
    } else if (c === 0x22) inString = true
    else if (c === 0x5b || c === 0x7b) {
      if (++depth > max) {
        max = depth
        if (max > stopAt) return max
      }
    } else if (c === 0x5d || c === 0x7d) depth--
  }
  return max
}

function parseJson(data: Buffer | string | unknown, what: string): unknown {
  if (typeof data !== 'string' && !Buffer.isBuffer(data)) return data
  const text = data.toString()
  if (jsonDepth(text, MAX_JSON_DEPTH) > MAX_JSON_DEPTH) {
    throw new InvalidInputError(`${what}: bad JSON: too deeply nested (more than ${MAX_JSON_DEPTH} levels)`)
  }
  try {
    return JSON.parse(text)
  } catch (e) {
    const msg = e instanceof RangeError ? `too deeply nested (${e.message})` : capText((e as Error).message, ECHO_LIMIT)
    throw new InvalidInputError(`${what}: bad JSON: ${msg}`)
  }
}

function object(v: unknown, path: string, keys: readonly string[]): Obj {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) fail(path, `expected an object, got ${shown(v)}`)
  for (const k of Object.keys(v)) if (!keys.includes(k)) fail(path, `unknown key ${shown(k)}`)
  return v as Obj
}

function str(o: Obj, key: string, path: string, required = false): string {
  const v = o[key]
  if (v === undefined && !required) return ''
  if (typeof v !== 'string') fail(`${path}.${key}`, `expected a string, got ${v === undefined ? 'nothing' : shown(v)}`)
  return v
}

function int(o: Obj, key: string, path: string, min: number, max: number): number {
  const v = o[key]
  if (v === undefined) return 0
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
    fail(`${path}.${key}`, `expected an integer in ${min}..${max}, got ${shown(v)}`)
  }
  return v
}

function bool(o: Obj, key: string, path: string): boolean {
  const v = o[key]
  if (v === undefined) return false
  if (typeof v !== 'boolean') fail(`${path}.${key}`, `expected true or false, got ${shown(v)}`)
  return v
}

function mac(o: Obj, key: string, path: string): string | null {
  const v = o[key]
  if (v === undefined || v === null) return null
  if (typeof v !== 'string') fail(`${path}.${key}`, `expected a base64 MAC or null, got ${shown(v)}`)
  try {
    return base64ToMac(v)
  } catch (e) {
    fail(`${path}.${key}`, (e as Error).message)
  }
}

function ifaceType(o: Obj, key: string, path: string): InterfaceType {
  const t = int(o, key, path, 0, 1)
  return t as InterfaceType
}

// ---------------------------------------------------------------------------------------------------------
// PodNetworkDesc, GetFDPayload

function readPodNetworkDesc(v: unknown, path: string): PodNetworkDesc {
  if (v === undefined || v === null) fail(path, 'missing (the pod description is required)')
  const o = object(v, path, ['podId', 'podNs', 'podName', 'DNS'])
  const podId = str(o, 'podId', path, true)
  if (!CNI_NAME_RE.test(podId) || podId.length > 255) {
    fail(`${path}.podId`, `${shown(podId)} is not a valid pod id (must match ${CNI_NAME_RE}; it names the netns)`)
  }
  const dns = o.DNS === undefined || o.DNS === null ? null : normalizeCniDns(o.DNS, { strict: true, source: path, path: 'DNS' })
  return { podId, podNs: str(o, 'podNs', path), podName: str(o, 'podName', path), dns }
}

function writeDns(dns: CniDns): Obj {
  const o: Obj = {}
  if (dns.nameservers?.length) o.nameservers = dns.nameservers
  if (dns.domain) o.domain = dns.domain
  if (dns.search?.length) o.search = dns.search
  if (dns.options?.length) o.options = dns.options
  return o
}

function writePodNetworkDesc(d: PodNetworkDesc): Obj {
  return { podId: d.podId, podNs: d.podNs, podName: d.podName, DNS: d.dns ? writeDns(d.dns) : null }
}

/** Parses add data: `{"podNetworkDesc":{"podId","podNs","podName","DNS"}}`. */
export function parseGetFDPayload(data: Buffer | string): GetFDPayload {
  const o = object(parseJson(data, 'GetFDPayload'), 'GetFDPayload', ['podNetworkDesc'])
  return { podNetworkDesc: readPodNetworkDesc(o.podNetworkDesc, 'GetFDPayload.podNetworkDesc') }
}

/** Writes add data as Virtlet's FDClient sends it. */
export function encodeGetFDPayload(p: GetFDPayload): string {
  return goJsonStringify({ podNetworkDesc: writePodNetworkDesc(p.podNetworkDesc) })
}

// ---------------------------------------------------------------------------------------------------------
// The CNI result as Virtlet emits it

/**
 * An IP as Go's `net.IP.String()` writes it: IPv4 dotted, IPv6 in RFC 5952 form (lower case, the longest run
 * of zero groups compressed), an IPv4-mapped IPv6 address as plain IPv4.
 */
export function goIpString(ip: string): string {
  if (!ip.includes(':')) return ip
  const host = new URL(`http://[${ip}]/`).hostname.slice(1, -1)
  const mapped = /^::ffff:([0-9a-f]{1,4}):([0-9a-f]{1,4})$/.exec(host)
  if (mapped) {
    const a = parseInt(mapped[1], 16)
    const b = parseInt(mapped[2], 16)
    return `${a >> 8}.${a & 255}.${b >> 8}.${b & 255}`
  }
  return host
}

function goCidrString(cidr: string): string {
  const slash = cidr.indexOf('/')
  return slash < 0 ? goIpString(cidr) : `${goIpString(cidr.slice(0, slash))}${cidr.slice(slash)}`
}

/**
 * The CNI result object in Virtlet's form (vendored CNI "current" types, spec 0.3.1): no `cniVersion`;
 * `interfaces`, `ips`, `routes` left out when empty; interface `mac`/`sandbox` left out when empty; ip
 * `version` always, `interface` left out when 0 (Go `omitempty` on an int), `gateway` left out when none;
 * route `gw` left out when none; `dns` always, its keys left out when empty. IPs are written as Go writes them
 * ({@link goIpString}). Fields that spec 0.3.1 does not know (1.1.0's `mtu`, `pciID`, route `table`...)
 * are dropped, as Go drops them.
 */
export function toGoCniResult(result: CniResult): Obj {
  const out: Obj = {}
  if (result.interfaces.length) {
    out.interfaces = result.interfaces.map((i) => {
      const o: Obj = { name: i.name }
      if (i.mac) o.mac = i.mac
      if (i.sandbox) o.sandbox = i.sandbox
      return o
    })
  }
  if (result.ips.length) {
    out.ips = result.ips.map((ip) => {
      const o: Obj = { version: String(parseCidr(ip.address, 'ips[].address').family) }
      if (ip.interface) o.interface = ip.interface
      o.address = goCidrString(ip.address)
      if (ip.gateway) o.gateway = goIpString(ip.gateway)
      return o
    })
  }
  if (result.routes.length) {
    out.routes = result.routes.map((r) => {
      const o: Obj = { dst: goCidrString(r.dst) }
      if (r.gw) o.gw = goIpString(r.gw)
      return o
    })
  }
  out.dns = writeDns(result.dns)
  return out
}

/**
 * Reads a CNI result from a peer's JSON (Virtlet's form, or any spec version 0.3.0..1.1.0). Without a
 * `cniVersion` it is Virtlet's form, where an absent `interface` means index 0. Unknown keys are rejected.
 */
export function fromGoCniResult(v: unknown, path = 'Result'): CniResult {
  const hasVersion = typeof v === 'object' && v !== null && 'cniVersion' in v
  return normalizeCniResult(v, { strict: true, absentInterfaceIsZero: !hasVersion, defaultVersion: '0.3.1', source: path })
}

// ---------------------------------------------------------------------------------------------------------
// ContainerSideNetwork

function readInterfaceDescription(v: unknown, path: string): InterfaceDescription {
  const o = object(v, path, ['Type', 'Name', 'HardwareAddr', 'PCIAddress', 'MTU', 'VlanID'])
  return {
    type: ifaceType(o, 'Type', path),
    name: str(o, 'Name', path),
    hardwareAddr: mac(o, 'HardwareAddr', path),
    pciAddress: str(o, 'PCIAddress', path),
    mtu: int(o, 'MTU', path, 0, 65535),
    vlanId: int(o, 'VlanID', path, -(2 ** 53 - 1), 2 ** 53 - 1),
  }
}

function readContainerSideNetwork(v: unknown, path: string): ContainerSideNetwork {
  const o = object(v, path, ['Result', 'NsPath', 'Interfaces'])
  const result = o.Result === undefined || o.Result === null ? null : fromGoCniResult(o.Result, `${path}.Result`)
  const ifs = o.Interfaces
  if (ifs !== undefined && ifs !== null && !Array.isArray(ifs)) fail(`${path}.Interfaces`, `expected an array or null, got ${shown(ifs)}`)
  return {
    result,
    nsPath: str(o, 'NsPath', path),
    interfaces: (ifs ?? []).map((x, i) => readInterfaceDescription(x, `${path}.Interfaces[${i}]`)),
  }
}

function writeContainerSideNetwork(csn: ContainerSideNetwork): Obj {
  return {
    Result: csn.result ? toGoCniResult(csn.result) : null,
    NsPath: csn.nsPath,
    // Go writes a nil slice as null; Virtlet's slice is nil until the first interface is appended
    Interfaces: csn.interfaces.length
      ? csn.interfaces.map((i) => ({
          Type: i.type,
          Name: i.name,
          HardwareAddr: i.hardwareAddr === null ? null : macToBase64(i.hardwareAddr),
          PCIAddress: i.pciAddress,
          MTU: i.mtu,
          VlanID: i.vlanId,
        }))
      : null,
  }
}

/** Parses a ContainerSideNetwork JSON (`{"Result","NsPath","Interfaces"}`). */
export function parseContainerSideNetwork(data: Buffer | string): ContainerSideNetwork {
  return readContainerSideNetwork(parseJson(data, 'ContainerSideNetwork'), 'ContainerSideNetwork')
}

/** Writes a ContainerSideNetwork exactly as Virtlet's Go code does. */
export function encodeContainerSideNetwork(csn: ContainerSideNetwork): string {
  return goJsonStringify(writeContainerSideNetwork(csn))
}

// ---------------------------------------------------------------------------------------------------------
// RecoverPayload

/** Parses recover data: `{"podNetworkDesc":{...},"csn":{...},"HaveRunningContainers":false}`. */
export function parseRecoverPayload(data: Buffer | string): RecoverPayload {
  const o = object(parseJson(data, 'RecoverPayload'), 'RecoverPayload', ['podNetworkDesc', 'csn', 'HaveRunningContainers'])
  if (o.csn === undefined || o.csn === null) fail('RecoverPayload.csn', 'missing (the saved ContainerSideNetwork is required)')
  return {
    podNetworkDesc: readPodNetworkDesc(o.podNetworkDesc, 'RecoverPayload.podNetworkDesc'),
    csn: readContainerSideNetwork(o.csn, 'RecoverPayload.csn'),
    haveRunningContainers: bool(o, 'HaveRunningContainers', 'RecoverPayload'),
  }
}

/** Writes recover data as Virtlet's FDClient sends it. */
export function encodeRecoverPayload(p: RecoverPayload): string {
  return goJsonStringify({
    podNetworkDesc: writePodNetworkDesc(p.podNetworkDesc),
    csn: writeContainerSideNetwork(p.csn),
    HaveRunningContainers: p.haveRunningContainers,
  })
}

// ---------------------------------------------------------------------------------------------------------
// get info

/** Writes TapFDSource's get info: `[{"type":0,"mac":"QqSmIoAu","fdIndex":0,"pciAddress":""}]`. */
export function encodeFdInfo(infos: FdInfo[]): string {
  return goJsonStringify(
    infos.map((i) => ({
      type: i.type,
      mac: i.mac === null ? null : macToBase64(i.mac),
      fdIndex: i.fdIndex,
      pciAddress: i.pciAddress,
    })),
  )
}

/** Parses TapFDSource's get info (what an FDClient receives). `null` (Go's nil slice) reads as `[]`. */
export function parseFdInfo(data: Buffer | string): FdInfo[] {
  const v = parseJson(data, 'get info')
  if (v === null) return []
  if (!Array.isArray(v)) fail('get info', `expected an array, got ${shown(v)}`)
  return v.map((x, i) => {
    const path = `get info[${i}]`
    const o = object(x, path, ['type', 'mac', 'fdIndex', 'pciAddress'])
    return {
      type: ifaceType(o, 'type', path),
      mac: mac(o, 'mac', path),
      fdIndex: int(o, 'fdIndex', path, 0, 2 ** 31 - 1),
      pciAddress: str(o, 'pciAddress', path),
    }
  })
}
