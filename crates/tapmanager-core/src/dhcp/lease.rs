//! What the DHCP server offers to each interface, computed from a [`ContainerSideNetwork`], and which bridge
//! serves it.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;

use super::{DEFAULT_DNS, LEASE_TIME, REBINDING_TIME, RENEWAL_TIME, SERVER_IP};
use crate::error::{Error, Result};
use crate::types::{CniIpConfig, ContainerSideNetwork, InterfaceType, MacAddr};

/// Everything offered to one client MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The client's MAC (the VM's, i.e. the CNI link's original MAC).
    pub mac: MacAddr,
    /// yiaddr and option 1, from the prefix length: `10.1.90.5/24`.
    pub address: Ipv4Net,
    /// Option 26. 0 = unknown: requests of this MAC are not answered (as Virtlet).
    pub mtu: u16,
    /// Option 3; filled only when there is no classless route.
    pub routers: Vec<Ipv4Addr>,
    /// Option 121 (RFC 3442), the default route last when there is one.
    pub classless_routes: Vec<(Ipv4Net, Ipv4Addr)>,
    /// Option 6 (never empty: [`DEFAULT_DNS`] when the result has no IPv4 name server).
    pub dns: Vec<Ipv4Addr>,
    /// Option 119 (RFC 3397), e.g. `default.svc.cluster.local`.
    pub search: Vec<String>,
    /// Option 51, seconds.
    pub lease_time: u32,
    /// Option 58, seconds.
    pub renewal_time: u32,
    /// Option 59, seconds.
    pub rebinding_time: u32,
}

/// One bridge the server listens on and the clients it answers there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeBinding {
    /// The bridge's name in the pod netns (`br0`); the server's socket is bound to it (`SO_BINDTODEVICE`).
    pub bridge: String,
    /// The leases served on this bridge, looked up by client MAC.
    pub leases: Vec<Lease>,
}

/// The configuration of one pod's server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpConfig {
    /// Option 54 (and the address the bridges carry). Default [`SERVER_IP`].
    pub server_ip: Ipv4Addr,
    /// One entry per bridge, each bridge at most once.
    pub bindings: Vec<BridgeBinding>,
}

impl DhcpConfig {
    /// The usual mapping made by the container side: tap interface `i` of `csn.interfaces` is served on
    /// bridge `br<i>`; SR-IOV VFs (no bridge) are skipped.
    pub fn from_csn(csn: &ContainerSideNetwork) -> Result<DhcpConfig> {
        let map: Vec<(String, usize)> = csn
            .interfaces
            .iter()
            .enumerate()
            .filter(|(_, d)| d.kind == InterfaceType::Tap)
            .map(|(i, _)| (format!("br{i}"), i))
            .collect();
        DhcpConfig::from_csn_with_bridges(csn, &map)
    }

    /// An explicit mapping: each `(bridge, index)` serves `csn.interfaces[index]` on `bridge`.
    pub fn from_csn_with_bridges(csn: &ContainerSideNetwork, map: &[(String, usize)]) -> Result<DhcpConfig> {
        let mut bindings: Vec<BridgeBinding> = Vec::new();
        for (bridge, index) in map {
            let lease = Lease::from_csn(csn, *index)?;
            match bindings.iter_mut().find(|b| &b.bridge == bridge) {
                Some(b) => b.leases.push(lease),
                None => bindings.push(BridgeBinding { bridge: bridge.clone(), leases: vec![lease] }),
            }
        }
        let config = DhcpConfig { server_ip: SERVER_IP, bindings };
        config.validate()?;
        Ok(config)
    }

    /// Checks bridge names (valid link names, each at most once) and that there is something to serve.
    pub fn validate(&self) -> Result<()> {
        if self.bindings.is_empty() {
            return Err(Error::invalid("DHCP config: no bridge to serve (no tap interface)"));
        }
        for (i, b) in self.bindings.iter().enumerate() {
            let bad = b.bridge.is_empty()
                || b.bridge.len() > 15
                || b.bridge.bytes().any(|c| c == b'/' || c == 0 || c.is_ascii_whitespace() || c == b':');
            if bad {
                return Err(Error::invalid(format!("DHCP config: bad bridge name {:?}", b.bridge)));
            }
            if self.bindings[..i].iter().any(|o| o.bridge == b.bridge) {
                return Err(Error::invalid(format!("DHCP config: bridge {:?} listed twice", b.bridge)));
            }
            if b.leases.is_empty() {
                return Err(Error::invalid(format!("DHCP config: bridge {:?} serves no interface", b.bridge)));
            }
        }
        Ok(())
    }

    /// The lease of `mac` on `bridge`, if that bridge serves it.
    pub fn lease_for(&self, bridge: &str, mac: &MacAddr) -> Option<&Lease> {
        self.bindings.iter().find(|b| b.bridge == bridge)?.leases.iter().find(|l| &l.mac == mac)
    }
}

impl Lease {
    /// The lease of `csn.interfaces[index]`:
    /// - the MAC is the description's `HardwareAddr` (else the MAC of the sandbox entry of the result's
    ///   `interfaces` with the same name);
    /// - the address is the IPv4 config whose `interface` points at the result entry with that MAC (or, failing
    ///   that, the only IPv4 config of a single-interface network);
    /// - the routes are the result's IPv4 routes whose gateway (else the IP config's gateway) lies in the
    ///   address's subnet: a lone default route becomes option 3; with any other route, all go into option 121,
    ///   the default route last, and option 3 is left out;
    /// - DNS: the result's IPv4 name servers, else 8.8.8.8; the search list as is.
    pub fn from_csn(csn: &ContainerSideNetwork, index: usize) -> Result<Lease> {
        let desc = csn.interfaces.get(index).ok_or_else(|| {
            Error::invalid(format!("DHCP config: no interface {index} (the network has {})", csn.interfaces.len()))
        })?;
        let result = &csn.result;
        let mac = match desc.hardware_addr {
            Some(m) => m,
            None => result
                .interfaces
                .iter()
                .find(|i| i.name == desc.name && !i.sandbox.is_empty())
                .and_then(|i| i.mac_addr())
                .ok_or_else(|| Error::invalid(format!("DHCP config: interface {index} ({}) has no MAC", desc.name)))?,
        };
        let entry = result.interfaces.iter().position(|i| i.mac_addr() == Some(mac));
        let v4: Vec<&CniIpConfig> = result.ips.iter().filter(|ip| ip.address.addr().is_ipv4()).collect();
        let ip = match entry {
            Some(j) => v4.iter().find(|ip| ip.interface == j).copied(),
            None => None,
        };
        let ip =
            ip.or(if v4.len() == 1 && csn.interfaces.len() == 1 { Some(v4[0]) } else { None }).ok_or_else(|| {
                Error::invalid(format!("DHCP config: no IPv4 address for interface {index} ({}, {mac})", desc.name))
            })?;
        let address = match ip.address {
            ipnet::IpNet::V4(n) => n,
            ipnet::IpNet::V6(_) => unreachable!("filtered to IPv4 above"),
        };
        let subnet = address.trunc();
        let ip_gw = match ip.gateway {
            Some(IpAddr::V4(g)) => Some(g),
            _ => None,
        };

        let mut default_gw = None;
        let mut classless = Vec::new();
        for r in &result.routes {
            let ipnet::IpNet::V4(dst) = r.dst else { continue };
            let gw = match r.gw {
                Some(IpAddr::V4(g)) => Some(g),
                Some(IpAddr::V6(_)) => None,
                None => ip_gw,
            };
            let Some(gw) = gw.filter(|g| subnet.contains(g)) else { continue };
            if dst.prefix_len() == 0 {
                default_gw.get_or_insert(gw);
            } else {
                let route = (dst.trunc(), gw);
                if !classless.contains(&route) {
                    classless.push(route);
                }
            }
        }
        let mut routers = Vec::new();
        if classless.is_empty() {
            routers.extend(default_gw);
        } else if let Some(gw) = default_gw {
            classless.push((Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).expect("/0 is valid"), gw));
        }

        let mut dns: Vec<Ipv4Addr> = result.dns.nameservers.iter().filter_map(|s| s.trim().parse().ok()).collect();
        if dns.is_empty() {
            dns.push(DEFAULT_DNS);
        }

        Ok(Lease {
            mac,
            address,
            mtu: desc.mtu,
            routers,
            classless_routes: classless,
            dns,
            search: result.dns.search.clone(),
            lease_time: LEASE_TIME,
            renewal_time: RENEWAL_TIME,
            rebinding_time: REBINDING_TIME,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csn(routes: &str, dns: &str, mtu: u16) -> ContainerSideNetwork {
        let json = format!(
            r#"{{"Result":{{"interfaces":[{{"name":"cni0","mac":"aa:aa:aa:aa:aa:aa"}},{{"name":"eth0","mac":"42:a4:a6:22:80:2e","sandbox":"/var/run/netns/p"}}],
            "ips":[{{"version":"4","interface":1,"address":"10.1.90.5/24","gateway":"10.1.90.1"}}],
            "routes":{routes},"dns":{dns}}},"NsPath":"/var/run/netns/p",
            "Interfaces":[{{"Type":0,"Name":"eth0","HardwareAddr":"QqSmIoAu","PCIAddress":"","MTU":{mtu},"VlanID":0}}]}}"#
        );
        ContainerSideNetwork::from_json(json.as_bytes()).unwrap()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn default_route_alone_is_option_3() {
        let l = Lease::from_csn(&csn(r#"[{"dst":"0.0.0.0/0","gw":"10.1.90.1"}]"#, "{}", 1500), 0).unwrap();
        assert_eq!(l.mac.to_string(), "42:a4:a6:22:80:2e");
        assert_eq!(l.address, net("10.1.90.5/24"));
        assert_eq!(l.routers, vec![Ipv4Addr::new(10, 1, 90, 1)]);
        assert!(l.classless_routes.is_empty());
        assert_eq!(l.dns, vec![DEFAULT_DNS]);
        assert_eq!((l.lease_time, l.renewal_time, l.rebinding_time), (86400, 43200, 64800));
    }

    #[test]
    fn other_routes_go_to_121_with_default_last() {
        let routes = r#"[{"dst":"0.0.0.0/0","gw":"10.1.90.1"},{"dst":"10.10.42.7/24","gw":"10.1.90.90"},
            {"dst":"172.16.0.0/12"},{"dst":"192.168.0.0/16","gw":"192.168.1.1"},{"dst":"fd00::/8","gw":"fd00::1"}]"#;
        let l = Lease::from_csn(&csn(routes, "{}", 1500), 0).unwrap();
        assert!(l.routers.is_empty());
        assert_eq!(
            l.classless_routes,
            vec![
                (net("10.10.42.0/24"), Ipv4Addr::new(10, 1, 90, 90)),
                // no gw: the IP config's gateway; 192.168.1.1 is outside the subnet and skipped
                (net("172.16.0.0/12"), Ipv4Addr::new(10, 1, 90, 1)),
                (net("0.0.0.0/0"), Ipv4Addr::new(10, 1, 90, 1)),
            ]
        );
    }

    #[test]
    fn dns_ipv4_only_and_search() {
        let l = Lease::from_csn(
            &csn(
                "[]",
                r#"{"nameservers":["fd00::10","10.96.0.10","bogus"],"search":["a.svc.cluster.local","cluster.local"]}"#,
                9000,
            ),
            0,
        )
        .unwrap();
        assert_eq!(l.dns, vec![Ipv4Addr::new(10, 96, 0, 10)]);
        assert_eq!(l.search, vec!["a.svc.cluster.local", "cluster.local"]);
        assert_eq!(l.mtu, 9000);
        assert!(l.routers.is_empty() && l.classless_routes.is_empty());
        let l = Lease::from_csn(&csn("[]", r#"{"nameservers":["fd00::10"]}"#, 9000), 0).unwrap();
        assert_eq!(l.dns, vec![DEFAULT_DNS]);
    }

    #[test]
    fn config_mapping() {
        let c = csn("[]", "{}", 1500);
        let cfg = DhcpConfig::from_csn(&c).unwrap();
        assert_eq!(cfg.server_ip, SERVER_IP);
        assert_eq!(cfg.bindings.len(), 1);
        assert_eq!(cfg.bindings[0].bridge, "br0");
        let mac: MacAddr = "42:a4:a6:22:80:2e".parse().unwrap();
        assert!(cfg.lease_for("br0", &mac).is_some());
        assert!(cfg.lease_for("br1", &mac).is_none());
        let cfg = DhcpConfig::from_csn_with_bridges(&c, &[("brX".into(), 0)]).unwrap();
        assert_eq!(cfg.bindings[0].bridge, "brX");
        for bad in [vec![("br0".to_string(), 1)], vec![("a/b".into(), 0)], vec![("0123456789abcdef".into(), 0)], vec![]]
        {
            assert_eq!(
                DhcpConfig::from_csn_with_bridges(&c, &bad).unwrap_err().code,
                crate::ErrorCode::Invalid,
                "{bad:?}"
            );
        }
        // a VF only network has nothing to serve
        let mut vf = c.clone();
        vf.interfaces[0].kind = InterfaceType::Vf;
        assert_eq!(DhcpConfig::from_csn(&vf).unwrap_err().code, crate::ErrorCode::Invalid);
        // no MAC anywhere / no IPv4
        let mut nomac = c.clone();
        nomac.interfaces[0].hardware_addr = None;
        nomac.result.interfaces[1].mac.clear();
        assert!(Lease::from_csn(&nomac, 0).unwrap_err().message.contains("no MAC"));
        let mut noip = c.clone();
        noip.result.ips.clear();
        assert!(Lease::from_csn(&noip, 0).unwrap_err().message.contains("no IPv4"));
        // MAC from the result's sandbox entry when the description has none
        let mut fromres = c;
        fromres.interfaces[0].hardware_addr = None;
        assert_eq!(Lease::from_csn(&fromres, 0).unwrap().mac, mac);
    }
}
