//! [`NetOps`] for real: netlink ([`crate::netlink`]), taps ([`crate::tap`]) and DHCP isolation
//! ([`crate::isolation`]) in the netns of the calling thread.

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

use super::ops::{Addr, Link, NetOps, Route};
use super::setup::default_broadcast;
use crate::error::{Error, ErrorCode, Result};
use crate::netlink::{NetlinkHandle, RouteSpec};
use crate::{isolation, netns, tap};

/// The network of the netns the calling thread is in. Create it on a thread made for that netns (inside
/// [`crate::netns::run_in_netns`]) and use it on that thread only: taps and isolation rules are made in the
/// thread's netns. Netlink calls run on a small current-thread runtime owned by this value.
pub struct RealNet {
    rt: tokio::runtime::Runtime,
    nl: NetlinkHandle,
    ns_path: PathBuf,
}

impl RealNet {
    /// Opens the calling thread's netns, which is the one at `ns_path` (used to look at its `/sys`).
    pub fn here(ns_path: &Path) -> Result<RealNet> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("start a netlink runtime", e))?;
        let nl = {
            let _enter = rt.enter();
            NetlinkHandle::open(None)?
        };
        Ok(RealNet { rt, nl, ns_path: ns_path.to_path_buf() })
    }

    fn block<T>(&self, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        self.rt.block_on(f)
    }
}

fn route_spec(r: &Route) -> RouteSpec {
    RouteSpec {
        dst: Some(IpAddr::V4(r.dst.network())),
        dst_len: r.dst.prefix_len(),
        gateway: r.gateway.map(IpAddr::V4),
        oif: r.oif,
        scope: Some(r.scope),
        protocol: Some(r.protocol),
        priority: r.priority,
        table: Some(r.table),
    }
}

impl NetOps for RealNet {
    fn links(&mut self) -> Result<Vec<Link>> {
        let links = self.block(self.nl.links())?;
        Ok(links
            .into_iter()
            .map(|l| Link {
                index: l.index,
                name: l.name,
                mac: l.mac.unwrap_or_default(),
                mtu: l.mtu,
                kind: l.kind,
                master: l.master,
                up: l.up,
            })
            .collect())
    }

    fn addrs(&mut self) -> Result<Vec<Addr>> {
        let addrs = self.block(self.nl.addresses(None))?;
        let mut out = Vec::new();
        for a in addrs {
            let IpAddr::V4(ip) = a.address else { continue };
            let net = Ipv4Net::new(ip, a.prefix_len).map_err(|_| Error::invalid(format!("bad prefix of {ip}")))?;
            // Addresses are re-added the way CNI plugins and `ip addr add ... brd +` add them.
            out.push(Addr { link: a.index, net, broadcast: default_broadcast(&net) });
        }
        Ok(out)
    }

    fn routes(&mut self) -> Result<Vec<Route>> {
        let routes = self.block(self.nl.routes())?;
        let mut out = Vec::new();
        for r in routes {
            if r.ipv6 {
                continue;
            }
            let dst = match r.dst {
                Some(IpAddr::V4(d)) => {
                    Ipv4Net::new(d, r.dst_len).map_err(|_| Error::invalid(format!("bad prefix of {d}")))?
                }
                None => Ipv4Net::default(),
                Some(IpAddr::V6(_)) => continue,
            };
            let v4 = |a: Option<IpAddr>| match a {
                Some(IpAddr::V4(a)) => Some(a),
                _ => None,
            };
            out.push(Route {
                dst,
                gateway: v4(r.gateway),
                oif: r.oif,
                protocol: r.protocol,
                scope: r.scope,
                priority: r.priority,
                prefsrc: v4(r.pref_src),
                table: r.table,
            });
        }
        Ok(out)
    }

    fn add_addr(&mut self, addr: &Addr) -> Result<()> {
        self.block(self.nl.add_address(addr.link, IpAddr::V4(addr.net.addr()), addr.net.prefix_len()))
    }

    fn del_addr(&mut self, addr: &Addr) -> Result<()> {
        self.block(self.nl.delete_address(addr.link, IpAddr::V4(addr.net.addr()), addr.net.prefix_len()))
    }

    fn add_route(&mut self, route: &Route) -> Result<()> {
        self.block(self.nl.add_route(&route_spec(route)))
    }

    fn del_route(&mut self, route: &Route) -> Result<()> {
        self.block(self.nl.delete_route(&route_spec(route)))
    }

    fn set_up(&mut self, link: u32, up: bool) -> Result<()> {
        if up {
            self.block(self.nl.set_up(link))
        } else {
            self.block(self.nl.set_down(link))
        }
    }

    fn set_mac(&mut self, link: u32, mac: [u8; 6]) -> Result<()> {
        self.block(self.nl.set_mac(link, mac))
    }

    fn set_master(&mut self, link: u32, master: Option<u32>) -> Result<()> {
        match master {
            Some(m) => self.block(self.nl.set_master(link, m)),
            None => self.block(self.nl.set_nomaster(link)),
        }
    }

    fn create_tap(&mut self, name: &str, mtu: u32) -> Result<u32> {
        tap::create_tap_here(name, &tap::TapCreateOptions { mtu: Some(mtu), multi_queue: false, up: false })?;
        match self.block(self.nl.link_by_name(name)) {
            Ok(l) => Ok(l.index),
            Err(e) => {
                let _ = tap::delete_tap_here(name);
                Err(e)
            }
        }
    }

    fn create_bridge(&mut self, name: &str, mtu: u32) -> Result<u32> {
        self.block(self.nl.create_bridge(name, Some(mtu)))
    }

    fn delete_link(&mut self, link: u32) -> Result<()> {
        self.block(self.nl.delete_link(link))
    }

    fn add_isolation(&mut self, link: &str, _bridge: &str) -> Result<()> {
        isolation::add_dhcp_isolation_here(link)
    }

    fn remove_isolation(&mut self, link: &str, _bridge: &str) -> Result<()> {
        isolation::remove_dhcp_isolation_here(link)
    }

    fn open_tap(&mut self, name: &str) -> Result<OwnedFd> {
        let mut fds = tap::open_tap_here(name, &tap::TapOpenOptions::default())?;
        fds.pop().ok_or_else(|| Error::new(ErrorCode::Io, format!("open tap {name:?}: no fd")))
    }

    fn is_sriov_vf(&mut self, link: &Link) -> Result<bool> {
        // Virtual links (veth, macvlan, ...) carry a kind; only a physical NIC can be a VF. Skipping them
        // saves remounting /sys on the common path.
        if link.kind.is_some() {
            return Ok(false);
        }
        let physfn = format!("/sys/class/net/{}/device/physfn", link.name);
        netns::run_in_netns_with_sysfs(&self.ns_path, move || Ok(Path::new(&physfn).exists()))
    }
}
