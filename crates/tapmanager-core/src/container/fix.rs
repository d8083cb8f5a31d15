//! Fixing the CNI result against what the plugins really left in the pod netns (Weave, Calico, broken
//! `interfaces`), and choosing the container links in result order. Pure logic over a [`NetSnapshot`].

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

use super::ops::{Addr, Link, Route, RTPROT_KERNEL, RT_SCOPE_LINK};
use crate::error::{Error, ErrorCode, Result};
use crate::types::{CniInterface, CniIpConfig, CniResult, CniRoute, MacAddr};

/// Calico's link-local gateway: a pod's link with a `169.254.1.1/32 scope link` route is Calico's.
pub const CALICO_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The IPv4 state of a netns: links, addresses and main-table routes.
#[derive(Debug, Clone, Default)]
pub struct NetSnapshot {
    /// Every link.
    pub links: Vec<Link>,
    /// Every IPv4 address.
    pub addrs: Vec<Addr>,
    /// Every IPv4 route of the main table.
    pub routes: Vec<Route>,
}

impl NetSnapshot {
    /// The link named `name`.
    pub fn link_by_name(&self, name: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.name == name)
    }

    /// The link with index `index`.
    pub fn link_by_index(&self, index: u32) -> Option<&Link> {
        self.links.iter().find(|l| l.index == index)
    }

    /// The IPv4 addresses on a link, in the kernel's order (primary first).
    pub fn addrs_of(&self, link: u32) -> impl Iterator<Item = &Addr> {
        self.addrs.iter().filter(move |a| a.link == link)
    }

    /// The routes through a link.
    pub fn routes_of(&self, link: u32) -> impl Iterator<Item = &Route> {
        self.routes.iter().filter(move |r| r.oif == Some(link))
    }
}

/// How Calico results are fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CalicoOptions {
    /// The prefix length given to Calico's `/32` pod address (Virtlet's `calicoSubnetSize`, default 24).
    pub subnet_size: u8,
    /// The IPv4 address of the dummy network's Calico link: the VM's gateway when the pod has a default route
    /// via 169.254.1.1.
    pub dummy_gateway: Option<Ipv4Addr>,
}

impl Default for CalicoOptions {
    fn default() -> Self {
        CalicoOptions { subnet_size: 24, dummy_gateway: None }
    }
}

/// The IPv4 address and prefix of an IP config, `None` for IPv6.
pub fn ipv4_of(ip: &CniIpConfig) -> Option<Ipv4Net> {
    match ip.address {
        IpNet::V4(n) => Some(n),
        IpNet::V6(_) => None,
    }
}

fn is_unusable_v4(ip: &CniIpConfig) -> bool {
    ipv4_of(ip).is_none_or(|n| n.addr().is_unspecified())
}

/// Fixes `result` in place against the netns state `snap` (see NETWORK.md, "Fixing the CNI result").
pub fn fix_result(result: &mut CniResult, ns_path: &str, snap: &NetSnapshot, calico: &CalicoOptions) -> Result<()> {
    if result.ips.len() == 1 && (is_unusable_v4(&result.ips[0]) || result.routes.is_empty()) {
        rebuild_weave_like(result, ns_path, snap)?;
    }
    if result.ips.is_empty() {
        return Err(Error::invalid("the CNI result has no IP configuration"));
    }
    let mut default_via_dummy = None;
    for n in 0..result.ips.len() {
        let Some(net) = ipv4_of(&result.ips[n]) else { continue };
        let addr = snap.addrs.iter().find(|a| a.net.addr() == net.addr()).ok_or_else(|| {
            Error::new(
                ErrorCode::NotFound,
                format!("no link in the pod netns has the address {} of the CNI result", net.addr()),
            )
        })?;
        let link = snap
            .link_by_index(addr.link)
            .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("the link holding {} vanished", net.addr())))?;
        let mac = MacAddr(link.mac).to_string();
        let iface = match result.interfaces.iter().position(|i| i.name == link.name && !i.sandbox.is_empty()) {
            Some(i) => {
                // Teardown finds the link by this MAC: make it the real one.
                result.interfaces[i].mac = mac;
                i
            }
            None => {
                result.interfaces.push(CniInterface { name: link.name.clone(), mac, sandbox: ns_path.to_string() });
                result.interfaces.len() - 1
            }
        };
        let ip = &mut result.ips[n];
        ip.interface = iface;

        let is_calico = snap
            .routes_of(link.index)
            .any(|r| r.dst == Ipv4Net::from(CALICO_GATEWAY) && r.scope == RT_SCOPE_LINK && r.gateway.is_none());
        if !is_calico {
            continue;
        }
        let masked = Ipv4Net::new(net.addr(), calico.subnet_size)
            .map_err(|_| Error::invalid(format!("calicoSubnetSize {} is not a prefix length", calico.subnet_size)))?;
        ip.address = IpNet::V4(masked);
        if snap.routes_of(link.index).any(|r| r.is_default() && r.gateway == Some(CALICO_GATEWAY)) {
            let gw = calico.dummy_gateway.ok_or_else(|| {
                Error::new(
                    ErrorCode::NeedsDummyGateway,
                    format!(
                        "link {} is Calico's with a default route via {CALICO_GATEWAY}, but no dummy network gateway was given",
                        link.name
                    ),
                )
            })?;
            ip.gateway = Some(IpAddr::V4(gw));
            default_via_dummy = Some(gw);
        }
    }
    if let Some(gw) = default_via_dummy {
        result.routes.retain(|r| !matches!(r.dst, IpNet::V4(n) if n.prefix_len() == 0));
        result.routes.push(CniRoute { dst: IpNet::V4(Ipv4Net::default()), gw: Some(IpAddr::V4(gw)) });
    }
    Ok(())
}

/// True when a link of the netns is Calico's (a link-scope route to 169.254.1.1 without gateway) and has a
/// default route via 169.254.1.1: its pod then needs the dummy network's gateway ([`CalicoOptions`]).
pub fn needs_dummy_gateway(snap: &NetSnapshot) -> bool {
    snap.links.iter().any(|link| {
        let mut routes = snap.routes_of(link.index);
        let calico = snap
            .routes_of(link.index)
            .any(|r| r.dst == Ipv4Net::from(CALICO_GATEWAY) && r.scope == RT_SCOPE_LINK && r.gateway.is_none());
        calico && routes.any(|r| r.is_default() && r.gateway == Some(CALICO_GATEWAY))
    })
}

/// Rebuilds a Weave-like result (one IP config, no usable IPv4 address or no routes) from the single veth.
fn rebuild_weave_like(result: &mut CniResult, ns_path: &str, snap: &NetSnapshot) -> Result<()> {
    let veths: Vec<&Link> = snap.links.iter().filter(|l| l.kind.as_deref() == Some("veth")).collect();
    let [veth] = veths[..] else {
        return Err(Error::invalid(format!(
            "cannot rebuild an incomplete CNI result: the pod netns has {} veth links, expected exactly one",
            veths.len()
        )));
    };
    let addrs: Vec<&Addr> = snap.addrs_of(veth.index).collect();
    let [addr] = addrs[..] else {
        return Err(Error::invalid(format!(
            "cannot rebuild an incomplete CNI result: {} has {} IPv4 addresses, expected exactly one",
            veth.name,
            addrs.len()
        )));
    };
    let mut gateway = None;
    let mut routes = Vec::new();
    for r in snap.routes_of(veth.index) {
        let Some(gw) = r.gateway else { continue };
        if r.protocol == RTPROT_KERNEL {
            continue;
        }
        if r.is_default() {
            gateway = Some(IpAddr::V4(gw));
        }
        routes.push(CniRoute { dst: IpNet::V4(r.dst), gw: Some(IpAddr::V4(gw)) });
    }
    result.interfaces = vec![CniInterface {
        name: veth.name.clone(),
        mac: MacAddr(veth.mac).to_string(),
        sandbox: ns_path.to_string(),
    }];
    result.ips = vec![CniIpConfig { version: "4".into(), interface: 0, address: IpNet::V4(addr.net), gateway }];
    result.routes = routes;
    Ok(())
}

/// The container links of a (fixed) result, in order: links referenced by IP configs first, then the other
/// interfaces that live in a sandbox; host-side entries (no `sandbox`) are skipped.
pub fn container_links(result: &CniResult, snap: &NetSnapshot) -> Result<Vec<Link>> {
    let mut order: Vec<usize> = Vec::new();
    for ip in &result.ips {
        // IPv4 configs point at container links once fixed; an IPv6 one left alone may point anywhere.
        let i = ip.interface;
        if result.interfaces.get(i).is_some_and(|iface| !iface.sandbox.is_empty()) && !order.contains(&i) {
            order.push(i);
        }
    }
    for (i, iface) in result.interfaces.iter().enumerate() {
        if !iface.sandbox.is_empty() && !order.contains(&i) {
            order.push(i);
        }
    }
    order
        .into_iter()
        .map(|i| {
            let name = &result.interfaces[i].name;
            snap.link_by_name(name).cloned().ok_or_else(|| {
                Error::new(ErrorCode::NotFound, format!("interface {name} of the CNI result is not in the pod netns"))
            })
        })
        .collect()
}
