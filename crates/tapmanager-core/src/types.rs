//! The Go-compatible JSON types the core reads and writes: the CNI result, `ContainerSideNetwork` and its
//! interface descriptions, with exactly the bytes Virtlet's Go code emits (see `shared/PROTOCOL.md`). The
//! get-info entries and the add/recover payloads are TypeScript's alone (`src/payloads.ts`).
//!
//! Go quirks kept on output:
//! - `net.HardwareAddr` is base64 of the 6 bytes (`"QqSmIoAu"`), a missing one `null` ([`MacAddr`]);
//! - the CNI result is Virtlet's vendored spec-0.3.1 "current" shape: no `cniVersion` key, the IP config's
//!   `interface` index omitted when it is 0 (`omitempty` on an int), empty lists omitted, `dns` always present;
//! - a nil Go slice is `null` (`ContainerSideNetwork.Interfaces` with no interface).
//!
//! On input, CNI results of every spec a plugin may return (0.1.0/0.2.0 `ip4`/`ip6`, 0.3.0 through 1.1.0) are
//! accepted and normalised to that one shape: `version` derived from the address when absent, unknown keys
//! (`mtu`, `socketPath`, `pciID`, route `mtu`/`advmss`/`priority`/`table`/`scope`, ...) dropped.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ipnet::IpNet;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

// ---------------------------------------------------------------------------------------------------------
// MAC addresses
// ---------------------------------------------------------------------------------------------------------

/// A 6-byte Ethernet MAC address. Serialises as Go's `net.HardwareAddr` does in JSON: base64 of the bytes.
/// `Display`/`FromStr` use the usual `42:a4:a6:22:80:2e` form (what CNI results and `ip link` print).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The base64 form Go's `encoding/json` uses for a `net.HardwareAddr` (`42:a4:a6:22:80:2e` -> `QqSmIoAu`).
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    /// Parses Go's base64 form; the decoded value must be exactly 6 bytes.
    pub fn from_base64(s: &str) -> Result<MacAddr> {
        let bytes = BASE64.decode(s.as_bytes()).map_err(|e| Error::invalid(format!("bad base64 MAC {s:?}: {e}")))?;
        MacAddr::from_bytes(&bytes)
    }

    /// A MAC from a 6-byte slice.
    pub fn from_bytes(bytes: &[u8]) -> Result<MacAddr> {
        let arr: [u8; 6] =
            bytes.try_into().map_err(|_| Error::invalid(format!("a MAC address has 6 bytes, got {}", bytes.len())))?;
        Ok(MacAddr(arr))
    }

    /// The raw bytes.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl FromStr for MacAddr {
    type Err = Error;
    /// Parses `42:a4:a6:22:80:2e` or `42-a4-a6-22-80-2e` (case-insensitive), as Go's `net.ParseMAC` does for
    /// 6-byte addresses.
    fn from_str(s: &str) -> Result<MacAddr> {
        let bad = || Error::invalid(format!("invalid MAC address {s:?}"));
        let sep = if s.contains(':') { ':' } else { '-' };
        let mut out = [0u8; 6];
        let mut n = 0;
        for part in s.split(sep) {
            if n == 6 || part.len() != 2 {
                return Err(bad());
            }
            out[n] = u8::from_str_radix(part, 16).map_err(|_| bad())?;
            n += 1;
        }
        if n != 6 {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<MacAddr, D::Error> {
        let s = String::deserialize(d)?;
        MacAddr::from_base64(&s).map_err(|e| D::Error::custom(e.message))
    }
}

/// Serde helper for `Option<MacAddr>` in Go's encoding: `null` when missing; `""` (an empty Go slice) reads as
/// missing.
mod opt_mac {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<MacAddr>, s: S) -> std::result::Result<S::Ok, S::Error> {
        match v {
            Some(m) => s.serialize_str(&m.to_base64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<MacAddr>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) if s.is_empty() => Ok(None),
            Some(s) => MacAddr::from_base64(&s).map(Some).map_err(|e| D::Error::custom(e.message)),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// CNI result
// ---------------------------------------------------------------------------------------------------------

/// A CNI result, normalised to Virtlet's vendored spec-0.3.1 shape (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct CniResult {
    /// The links the plugins created or touched.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<CniInterface>,
    /// The IP configurations.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<CniIpConfig>,
    /// The routes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<CniRoute>,
    /// DNS settings; always emitted (`"dns":{}` when empty), as Go does for a struct field.
    pub dns: CniDns,
}

/// One entry of a CNI result's `interfaces`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CniInterface {
    /// The link name.
    #[serde(default)]
    pub name: String,
    /// The MAC as a string (`42:a4:a6:22:80:2e`), as CNI writes it; empty when unknown.
    #[serde(default, skip_serializing_if = "String::is_empty", deserialize_with = "null_as_default")]
    pub mac: String,
    /// The netns path for container-side links; empty for host-side ones.
    #[serde(default, skip_serializing_if = "String::is_empty", deserialize_with = "null_as_default")]
    pub sandbox: String,
}

impl CniInterface {
    /// The parsed MAC, if any.
    pub fn mac_addr(&self) -> Option<MacAddr> {
        self.mac.parse().ok()
    }
}

/// One IP configuration of a CNI result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniIpConfig {
    /// `"4"` or `"6"`.
    pub version: String,
    /// Index into the result's `interfaces`; omitted on output when 0 (Go `omitempty`), 0 when absent on input.
    #[serde(skip_serializing_if = "is_zero")]
    pub interface: usize,
    /// The address with its prefix length, host bits kept (`10.1.90.5/24`).
    #[serde(serialize_with = "ser_display")]
    pub address: IpNet,
    /// The gateway; omitted when missing.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_opt_display")]
    pub gateway: Option<IpAddr>,
}

/// One route of a CNI result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniRoute {
    /// The destination (`0.0.0.0/0` for the default route).
    #[serde(serialize_with = "ser_display")]
    pub dst: IpNet,
    /// The gateway; omitted when missing (then the IP config's gateway applies).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_opt_display")]
    pub gw: Option<IpAddr>,
}

/// CNI DNS settings; each key is omitted when empty.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CniDns {
    /// Name server addresses, as strings (IPv4 or IPv6).
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    pub nameservers: Vec<String>,
    /// The local domain.
    #[serde(default, skip_serializing_if = "String::is_empty", deserialize_with = "null_as_default")]
    pub domain: String,
    /// The search list.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    pub search: Vec<String>,
    /// resolv.conf options.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    pub options: Vec<String>,
}

impl CniDns {
    /// True when every field is empty.
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty() && self.domain.is_empty() && self.search.is_empty() && self.options.is_empty()
    }
}

impl CniResult {
    /// Parses a CNI result of any supported spec version (see the module docs) and normalises it.
    pub fn from_json(bytes: &[u8]) -> Result<CniResult> {
        from_go_json(bytes, "bad CNI result")
    }

    /// Go's JSON of the normalised result.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a CNI result always serialises")
    }

    /// The first IPv4 configuration, if any.
    pub fn ipv4(&self) -> Option<&CniIpConfig> {
        self.ips.iter().find(|ip| ip.address.addr().is_ipv4())
    }
}

/// Decodes a JSON object into a struct as Go does: only an object is taken (serde would also take an array).
/// Errors are `ERR_INVALID` and start with `what`.
fn from_go_json<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        _ => return Err(Error::invalid(format!("{what}: not a JSON object"))),
    }
    serde_json::from_slice(bytes).map_err(|e| Error::invalid(format!("{what}: {e}")))
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

fn ser_display<T: fmt::Display, S: Serializer>(v: &T, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn ser_opt_display<T: fmt::Display, S: Serializer>(v: &Option<T>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

fn null_as_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> std::result::Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Parses a CIDR keeping the host bits (`10.1.90.5/24`); a bare address gets a full-length prefix.
pub fn parse_cidr(s: &str) -> Result<IpNet> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n);
    }
    s.parse::<IpAddr>().map(IpNet::from).map_err(|_| Error::invalid(format!("bad CIDR {s:?}")))
}

/// Parses an optional IP in Go's encoding: missing, `null` and `""` are all "no IP".
fn parse_opt_ip(s: Option<String>) -> std::result::Result<Option<IpAddr>, String> {
    match s {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| format!("bad IP address {s:?}")),
    }
}

/// Every key any supported spec version may use; unknown keys are ignored.
#[derive(Deserialize)]
struct RawResult {
    #[serde(default, deserialize_with = "null_as_default")]
    interfaces: Vec<CniInterface>,
    #[serde(default, deserialize_with = "null_as_default")]
    ips: Vec<RawIpConfig>,
    #[serde(default, deserialize_with = "null_as_default")]
    routes: Vec<RawRoute>,
    #[serde(default, deserialize_with = "null_as_default")]
    dns: CniDns,
    // spec 0.1.0 / 0.2.0
    #[serde(default)]
    ip4: Option<RawLegacyIp>,
    #[serde(default)]
    ip6: Option<RawLegacyIp>,
}

#[derive(Deserialize)]
struct RawIpConfig {
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    interface: Option<usize>,
    address: String,
    #[serde(default)]
    gateway: Option<String>,
}

#[derive(Deserialize)]
struct RawRoute {
    dst: String,
    #[serde(default)]
    gw: Option<String>,
}

#[derive(Deserialize)]
struct RawLegacyIp {
    ip: String,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    routes: Vec<RawRoute>,
}

fn convert_ip(ip: RawIpConfig) -> std::result::Result<CniIpConfig, String> {
    let address = parse_cidr(&ip.address).map_err(|e| e.message)?;
    let derived = if address.addr().is_ipv4() { "4" } else { "6" };
    let version = match ip.version.as_deref() {
        None | Some("") => derived.to_string(),
        Some(v) if v == derived => v.to_string(),
        Some(v) => return Err(format!("IP config version {v:?} does not match address {}", ip.address)),
    };
    Ok(CniIpConfig { version, interface: ip.interface.unwrap_or(0), address, gateway: parse_opt_ip(ip.gateway)? })
}

fn convert_route(r: RawRoute) -> std::result::Result<CniRoute, String> {
    Ok(CniRoute { dst: parse_cidr(&r.dst).map_err(|e| e.message)?, gw: parse_opt_ip(r.gw)? })
}

impl<'de> Deserialize<'de> for CniResult {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<CniResult, D::Error> {
        let raw = RawResult::deserialize(d)?;
        let conv = || -> std::result::Result<CniResult, String> {
            let mut ips = raw.ips.into_iter().map(convert_ip).collect::<std::result::Result<Vec<_>, _>>()?;
            let mut routes = raw.routes.into_iter().map(convert_route).collect::<std::result::Result<Vec<_>, _>>()?;
            for (legacy, version) in [(raw.ip4, "4"), (raw.ip6, "6")] {
                if let Some(l) = legacy {
                    ips.push(CniIpConfig {
                        version: version.to_string(),
                        interface: 0,
                        address: parse_cidr(&l.ip).map_err(|e| e.message)?,
                        gateway: parse_opt_ip(l.gateway)?,
                    });
                    for r in l.routes {
                        routes.push(convert_route(r)?);
                    }
                }
            }
            Ok(CniResult { interfaces: raw.interfaces, ips, routes, dns: raw.dns })
        };
        conv().map_err(D::Error::custom)
    }
}

impl<'de> Deserialize<'de> for CniIpConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<CniIpConfig, D::Error> {
        convert_ip(RawIpConfig::deserialize(d)?).map_err(D::Error::custom)
    }
}

impl<'de> Deserialize<'de> for CniRoute {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<CniRoute, D::Error> {
        convert_route(RawRoute::deserialize(d)?).map_err(D::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Interface descriptions and ContainerSideNetwork
// ---------------------------------------------------------------------------------------------------------

/// The kind of a VM network interface; JSON is Go's int (`0` tap, `1` SR-IOV VF).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum InterfaceType {
    /// A tap device (`0`).
    #[default]
    Tap,
    /// An SR-IOV virtual function passed through with vfio-pci (`1`).
    Vf,
}

impl InterfaceType {
    /// Go's integer value.
    pub fn as_int(self) -> u8 {
        match self {
            InterfaceType::Tap => 0,
            InterfaceType::Vf => 1,
        }
    }

    /// From Go's integer value.
    pub fn from_int(v: i64) -> Result<InterfaceType> {
        match v {
            0 => Ok(InterfaceType::Tap),
            1 => Ok(InterfaceType::Vf),
            _ => Err(Error::invalid(format!("unknown interface type {v}"))),
        }
    }
}

impl Serialize for InterfaceType {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_u8(self.as_int())
    }
}

impl<'de> Deserialize<'de> for InterfaceType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<InterfaceType, D::Error> {
        InterfaceType::from_int(i64::deserialize(d)?).map_err(|e| D::Error::custom(e.message))
    }
}

/// Virtlet's `InterfaceDescription`: one VM network interface (field names are Go's).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct InterfaceDescription {
    /// Tap or VF.
    #[serde(rename = "Type", default)]
    pub kind: InterfaceType,
    /// The container-side link name (`eth0`).
    #[serde(rename = "Name", default)]
    pub name: String,
    /// The original MAC of the CNI link, which the VM gets; `null` when missing.
    #[serde(rename = "HardwareAddr", default, with = "opt_mac")]
    pub hardware_addr: Option<MacAddr>,
    /// The VF's PCI address (`0000:03:10.2`), empty for taps.
    #[serde(rename = "PCIAddress", default, deserialize_with = "null_as_default")]
    pub pci_address: String,
    /// The link MTU (0 = unknown).
    #[serde(rename = "MTU", default)]
    pub mtu: u16,
    /// The VF's VLAN id (0 = none).
    #[serde(rename = "VlanID", default)]
    pub vlan_id: i32,
}

/// Virtlet's `ContainerSideNetwork`: the add response of TapFDSource and what a caller persists for recover.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ContainerSideNetwork {
    /// The (fixed) CNI result. A Go `null` reads as an empty result.
    #[serde(rename = "Result", default, deserialize_with = "null_as_default")]
    pub result: CniResult,
    /// The pod netns path (`/var/run/netns/<podId>`).
    #[serde(rename = "NsPath", default, deserialize_with = "null_as_default")]
    pub ns_path: String,
    /// One description per VM interface, in fd order; `null` when empty (a nil Go slice).
    #[serde(rename = "Interfaces", default, serialize_with = "ser_nil_slice", deserialize_with = "null_as_default")]
    pub interfaces: Vec<InterfaceDescription>,
}

fn ser_nil_slice<T: Serialize, S: Serializer>(v: &[T], s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.is_empty() {
        s.serialize_none()
    } else {
        v.serialize(s)
    }
}

impl ContainerSideNetwork {
    /// Parses Go's JSON (CNI result of any supported spec, normalised).
    pub fn from_json(bytes: &[u8]) -> Result<ContainerSideNetwork> {
        from_go_json(bytes, "bad ContainerSideNetwork")
    }

    /// Go's JSON bytes.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a ContainerSideNetwork always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: &str = "42:a4:a6:22:80:2e";
    const MAC_B64: &str = "QqSmIoAu";

    /// Go's exact bytes of a ContainerSideNetwork with one tap (PROTOCOL.md shape).
    const CSN_GO: &str = concat!(
        r#"{"Result":{"interfaces":[{"name":"eth0","mac":"42:a4:a6:22:80:2e","sandbox":"/var/run/netns/pod1"}],"#,
        r#""ips":[{"version":"4","address":"10.1.90.5/24","gateway":"10.1.90.1"}],"#,
        r#""routes":[{"dst":"0.0.0.0/0","gw":"10.1.90.1"}],"dns":{}},"#,
        r#""NsPath":"/var/run/netns/pod1","#,
        r#""Interfaces":[{"Type":0,"Name":"eth0","HardwareAddr":"QqSmIoAu","PCIAddress":"","MTU":1500,"VlanID":0}]}"#
    );

    #[test]
    fn mac_base64_both_ways() {
        assert_eq!(MAC.parse::<MacAddr>().unwrap().to_base64(), MAC_B64);
        assert_eq!(MacAddr::from_base64(MAC_B64).unwrap().to_string(), MAC);
        assert_eq!("42-A4-A6-22-80-2E".parse::<MacAddr>().unwrap().to_string(), MAC);
        for bad in [
            "",
            "42:a4:a6:22:80",
            "42:a4:a6:22:80:2e:00",
            "42:a4:a6:22:80:zz",
            "42a4a6:22:80:2e:00:11",
            "4:a4:a6:22:80:2e",
        ] {
            assert_eq!(bad.parse::<MacAddr>().unwrap_err().code, crate::ErrorCode::Invalid, "{bad}");
        }
        // base64 of 5 bytes / not base64
        assert!(MacAddr::from_base64("QqSmIoA=").is_err());
        assert!(MacAddr::from_base64("!!!").is_err());
    }

    #[test]
    fn container_side_network_round_trips_go_bytes() {
        let csn = ContainerSideNetwork::from_json(CSN_GO.as_bytes()).unwrap();
        assert_eq!(csn.ns_path, "/var/run/netns/pod1");
        assert_eq!(csn.interfaces[0].hardware_addr, Some(MAC.parse().unwrap()));
        assert_eq!(csn.interfaces[0].mtu, 1500);
        assert_eq!(csn.result.ips[0].address.to_string(), "10.1.90.5/24");
        assert_eq!(csn.result.ips[0].interface, 0);
        assert_eq!(csn.to_json(), CSN_GO);
    }

    #[test]
    fn go_quirks_on_output() {
        let mut csn = ContainerSideNetwork::from_json(CSN_GO.as_bytes()).unwrap();
        // interface index 1 is emitted, 0 is not
        csn.result.ips[0].interface = 1;
        assert!(csn
            .to_json()
            .contains(r#"{"version":"4","interface":1,"address":"10.1.90.5/24","gateway":"10.1.90.1"}"#));
        // missing MAC => null; VF with PCI address and VLAN
        csn.interfaces[0] = InterfaceDescription {
            kind: InterfaceType::Vf,
            name: "eth1".into(),
            hardware_addr: None,
            pci_address: "0000:03:10.2".into(),
            mtu: 9000,
            vlan_id: 42,
        };
        assert!(csn.to_json().ends_with(
            r#""Interfaces":[{"Type":1,"Name":"eth1","HardwareAddr":null,"PCIAddress":"0000:03:10.2","MTU":9000,"VlanID":42}]}"#
        ));
        // no interfaces => null (nil Go slice); empty result => only "dns":{}
        let empty = ContainerSideNetwork::default();
        assert_eq!(empty.to_json(), r#"{"Result":{"dns":{}},"NsPath":"","Interfaces":null}"#);
        assert_eq!(ContainerSideNetwork::from_json(empty.to_json().as_bytes()).unwrap(), empty);
        // Go's null Result reads as empty
        let n = ContainerSideNetwork::from_json(br#"{"Result":null,"NsPath":"/x","Interfaces":null}"#).unwrap();
        assert_eq!(n.result, CniResult::default());
    }

    #[test]
    fn dns_keys_omitted_when_empty() {
        let mut r = CniResult::default();
        r.dns.nameservers = vec!["10.96.0.10".into()];
        r.dns.search = vec!["default.svc.cluster.local".into(), "svc.cluster.local".into()];
        assert_eq!(
            r.to_json(),
            r#"{"dns":{"nameservers":["10.96.0.10"],"search":["default.svc.cluster.local","svc.cluster.local"]}}"#
        );
        r.dns.domain = "cluster.local".into();
        r.dns.options = vec!["ndots:5".into()];
        let j = r.to_json();
        assert_eq!(
            j,
            r#"{"dns":{"nameservers":["10.96.0.10"],"domain":"cluster.local","search":["default.svc.cluster.local","svc.cluster.local"],"options":["ndots:5"]}}"#
        );
        assert_eq!(CniResult::from_json(j.as_bytes()).unwrap(), r);
    }

    #[test]
    fn reads_every_spec_version_and_normalises() {
        let want = r#"{"interfaces":[{"name":"eth0","mac":"42:a4:a6:22:80:2e","sandbox":"/var/run/netns/p"}],"ips":[{"version":"4","address":"10.1.90.5/24","gateway":"10.1.90.1"}],"routes":[{"dst":"0.0.0.0/0","gw":"10.1.90.1"}],"dns":{}}"#;
        let inputs = [
            // 0.3.0: interface present as 0 (not a pointer there), cniVersion present
            r#"{"cniVersion":"0.3.0","interfaces":[{"name":"eth0","mac":"42:a4:a6:22:80:2e","sandbox":"/var/run/netns/p"}],"ips":[{"version":"4","interface":0,"address":"10.1.90.5/24","gateway":"10.1.90.1"}],"routes":[{"dst":"0.0.0.0/0","gw":"10.1.90.1"}],"dns":{}}"#,
            // 0.3.1 with interface absent
            r#"{"cniVersion":"0.3.1","interfaces":[{"name":"eth0","mac":"42:a4:a6:22:80:2e","sandbox":"/var/run/netns/p"}],"ips":[{"version":"4","address":"10.1.90.5/24","gateway":"10.1.90.1"}],"routes":[{"dst":"0.0.0.0/0","gw":"10.1.90.1"}]}"#,
            // 0.4.0
            r#"{"cniVersion":"0.4.0","interfaces":[{"name":"eth0","mac":"42:a4:a6:22:80:2e","sandbox":"/var/run/netns/p"}],"ips":[{"version":"4","interface":0,"address":"10.1.90.5/24","gateway":"10.1.90.1"}],"routes":[{"dst":"0.0.0.0/0","gw":"10.1.90.1"}],"dns":null}"#,
            // 1.0.0: no version, extra keys
            r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","mac":"42:a4:a6:22:80:2e","sandbox":"/var/run/netns/p"}],"ips":[{"interface":0,"address":"10.1.90.5/24","gateway":"10.1.90.1"}],"routes":[{"dst":"0.0.0.0/0","gw":"10.1.90.1"}],"dns":{}}"#,
            // 1.1.0: interface mtu/socketPath/pciID, route mtu/priority/table/scope
            r#"{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","mac":"42:a4:a6:22:80:2e","mtu":1500,"sandbox":"/var/run/netns/p","socketPath":"","pciID":""}],"ips":[{"address":"10.1.90.5/24","gateway":"10.1.90.1","interface":0}],"routes":[{"dst":"0.0.0.0/0","gw":"10.1.90.1","mtu":1500,"priority":10,"table":254,"scope":0}],"dns":{}}"#,
            // 0.2.0: ip4
            r#"{"cniVersion":"0.2.0","interfaces":[{"name":"eth0","mac":"42:a4:a6:22:80:2e","sandbox":"/var/run/netns/p"}],"ip4":{"ip":"10.1.90.5/24","gateway":"10.1.90.1","routes":[{"dst":"0.0.0.0/0","gw":"10.1.90.1"}]},"dns":{}}"#,
        ];
        for input in inputs {
            let r = CniResult::from_json(input.as_bytes()).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.to_json(), want, "{input}");
        }
        // 1.0 with interface index 1 and IPv6 without version
        let r = CniResult::from_json(
            br#"{"cniVersion":"1.0.0","ips":[{"interface":1,"address":"fd00::5/64","gateway":""},{"address":"10.0.0.2/8"}],"routes":[{"dst":"10.10.0.0/16"}]}"#,
        )
        .unwrap();
        assert_eq!(
            r.to_json(),
            r#"{"ips":[{"version":"6","interface":1,"address":"fd00::5/64"},{"version":"4","address":"10.0.0.2/8"}],"routes":[{"dst":"10.10.0.0/16"}],"dns":{}}"#
        );
        assert_eq!(r.ipv4().unwrap().address.to_string(), "10.0.0.2/8");
    }

    #[test]
    fn rejects_bad_results_clearly() {
        for bad in [
            &br#"{"ips":[{"version":"4","address":"nonsense"}]}"#[..],
            br#"{"ips":[{"version":"6","address":"10.0.0.1/8"}]}"#,
            br#"{"ips":[{"version":"4","address":"10.0.0.1/8","gateway":"x"}]}"#,
            br#"{"routes":[{"dst":"0.0.0.0/0","gw":"300.1.1.1"}]}"#,
            br#"[]"#,
            br#"{"#,
        ] {
            let e = CniResult::from_json(bad).unwrap_err();
            assert_eq!(e.code, crate::ErrorCode::Invalid);
            assert!(e.message.starts_with("bad CNI result: "), "{}", e.message);
        }
        let e = ContainerSideNetwork::from_json(br#"{"Interfaces":[{"Type":7}]}"#).unwrap_err();
        assert!(e.message.contains("unknown interface type 7"), "{}", e.message);
        let e = ContainerSideNetwork::from_json(br#"{"Interfaces":[{"HardwareAddr":"AAEC"}]}"#).unwrap_err();
        assert!(e.message.contains("6 bytes"), "{}", e.message);
    }
}
