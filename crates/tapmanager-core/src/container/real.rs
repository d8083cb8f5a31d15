//! [`NetOps`] for real: netlink ([`crate::netlink`]), taps ([`crate::tap`]) and DHCP isolation
//! ([`crate::isolation`]) in the netns of the calling thread.

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

use super::ops::{Addr, Link, NetOps, Route, VfState};
use super::setup::default_broadcast;
use crate::error::{Error, ErrorCode, Result};
use crate::netlink::{NetlinkHandle, RouteSpec, VfConfig};
use crate::sriov::{self, SriovPaths, VfRecord};
use crate::{isolation, netns, tap};

/// The network of the netns the calling thread is in. Create it on a thread made for that netns (inside
/// [`crate::netns::run_in_netns`]) and use it on that thread only: taps and isolation rules are made in the
/// thread's netns. Netlink calls run on a small current-thread runtime owned by this value.
pub struct RealNet {
    rt: tokio::runtime::Runtime,
    nl: NetlinkHandle,
    ns_path: PathBuf,
    sriov: SriovPaths,
}

/// The network namespaces where a PF and a VF's netdev (after it is given back to its host driver) are looked
/// for: the server's own (its main thread's, `/proc/self/ns/net`) and the initial one (`/proc/1/ns/net`), where
/// the kernel puts every netdev a driver creates. The same namespace twice is listed once.
pub fn host_netns_candidates() -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut out: Vec<PathBuf> = Vec::new();
    let mut seen = Vec::new();
    for p in ["/proc/self/ns/net", "/proc/1/ns/net"] {
        if let Ok(m) = std::fs::metadata(p) {
            if !seen.contains(&(m.dev(), m.ino())) {
                seen.push((m.dev(), m.ino()));
                out.push(PathBuf::from(p));
            }
        }
    }
    out
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
        Ok(RealNet { rt, nl, ns_path: ns_path.to_path_buf(), sriov: SriovPaths::default() })
    }

    /// Uses `paths` for SR-IOV (sysfs, `/dev/vfio`, VF records) instead of the defaults.
    pub fn with_sriov_paths(mut self, paths: SriovPaths) -> RealNet {
        self.sriov = paths;
        self
    }

    /// The netdev of VF `pci`: in the pod netns (`None`) or in one of the host's netns, if it has one yet.
    fn find_vf_netdev(&self, pci: &str) -> Result<Option<(Option<PathBuf>, String)>> {
        if let Some(n) = self.netdevs_in(&self.ns_path, pci)?.into_iter().next() {
            return Ok(Some((None, n)));
        }
        for ns in host_netns_candidates() {
            if let Some(n) = self.netdevs_in(&ns, pci)?.into_iter().next() {
                return Ok(Some((Some(ns), n)));
            }
        }
        Ok(None)
    }

    /// The netdevs of PCI device `pci` in the netns at `ns` (a sysfs mounted there lists them).
    fn netdevs_in(&self, ns: &Path, pci: &str) -> Result<Vec<String>> {
        if !self.sriov.is_real_sysfs() {
            return sriov::netdevs_of(&self.sriov.sysfs, pci);
        }
        let pci = pci.to_string();
        netns::run_in_netns_with_sysfs(ns, move || sriov::netdevs_of(Path::new("/sys"), &pci))
    }

    /// The netns and name of the PF `pf_pci`'s netdev.
    fn find_pf(&self, pf_pci: &str) -> Result<(PathBuf, String)> {
        for ns in host_netns_candidates() {
            if let Some(name) = self.netdevs_in(&ns, pf_pci)?.into_iter().next() {
                return Ok((ns, name));
            }
        }
        Err(Error::new(
            ErrorCode::SriovPfNotFound,
            format!("the PF {pf_pci} has no netdev in the server's netns nor in the initial netns"),
        ))
    }

    /// A netlink handle in `ns` (on this value's runtime) and the index of link `name` there.
    fn handle_in(&self, ns: &Path, name: &str) -> Result<(NetlinkHandle, u32)> {
        let nl = {
            let _enter = self.rt.enter();
            NetlinkHandle::open(Some(ns))?
        };
        let index = self.block(nl.link_by_name(name))?.index;
        Ok((nl, index))
    }

    fn pf_handle(&self, pci: &str) -> Result<(sriov::VfDevice, String, NetlinkHandle, u32)> {
        let device = sriov::vf_device(&self.sriov, pci)?;
        let (ns, pf_name) = self.find_pf(&device.pf_pci)?;
        let (nl, index) = self.handle_in(&ns, &pf_name)?;
        Ok((device, pf_name, nl, index))
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
        match netns::set_ipv6_disabled_here(name, true).and_then(|()| self.block(self.nl.link_by_name(name))) {
            Ok(l) => Ok(l.index),
            Err(e) => {
                let _ = tap::delete_tap_here(name);
                Err(e)
            }
        }
    }

    fn create_bridge(&mut self, name: &str, mtu: u32) -> Result<u32> {
        let index = self.block(self.nl.create_bridge(name, Some(mtu)))?;
        if let Err(e) = netns::set_ipv6_disabled_here(name, true) {
            let _ = self.block(self.nl.delete_link(index));
            return Err(e);
        }
        Ok(index)
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
        if !self.sriov.is_real_sysfs() {
            return Ok(sriov::vf_pci_of_link(&self.sriov.sysfs, &link.name)?.is_some());
        }
        let physfn = format!("/sys/class/net/{}/device/physfn", link.name);
        netns::run_in_netns_with_sysfs(&self.ns_path, move || Ok(Path::new(&physfn).exists()))
    }

    fn vf_pci(&mut self, link: &Link) -> Result<String> {
        let name = link.name.clone();
        let found = if self.sriov.is_real_sysfs() {
            netns::run_in_netns_with_sysfs(&self.ns_path, move || sriov::vf_pci_of_link(Path::new("/sys"), &name))?
        } else {
            sriov::vf_pci_of_link(&self.sriov.sysfs, &name)?
        };
        found.ok_or_else(|| Error::new(ErrorCode::NotFound, format!("{} is not an SR-IOV VF", link.name)))
    }

    fn vf_info(&mut self, pci: &str) -> Result<VfState> {
        let (device, pf_name, nl, pf) = self.pf_handle(pci)?;
        let config = self.block(nl.vf_config(pf, device.index))?;
        Ok(VfState { device, pf_name, config })
    }

    fn link_alias(&mut self, link: u32) -> Result<String> {
        self.block(self.nl.link_alias(link))
    }

    fn set_vf_config(&mut self, pci: &str, config: &VfConfig) -> Result<()> {
        let (device, pf_name, nl, pf) = self.pf_handle(pci)?;
        self.block(nl.set_vf_config(pf, device.index, config)).map_err(|e| e.context(format!("PF {pf_name}")))
    }

    fn bind_vfio(&mut self, pci: &str) -> Result<()> {
        let device = sriov::vf_device(&self.sriov, pci)?;
        sriov::bind_vfio(&self.sriov, &device)
    }

    fn return_vf(&mut self, pci: &str, name: &str, alias: &str, mac: [u8; 6], up: bool) -> Result<()> {
        let driver = sriov::unbind_vfio(&self.sriov, pci)?;
        if driver.is_none() {
            return Err(Error::new(ErrorCode::NotFound, format!("no host driver took VF {pci} back")));
        }
        // The host driver registers a new netdev in the initial netns (or it is still here, never unbound).
        let mut found: Option<(Option<PathBuf>, String)> = None;
        sriov::wait_for(self.sriov.timeout, || {
            found = self.find_vf_netdev(pci)?;
            Ok(found.is_some())
        })?;
        let Some((ns, current)) = found else {
            return Err(Error::new(
                ErrorCode::Timeout,
                format!("VF {pci} has no netdev {:?} after binding it to {driver:?}", self.sriov.timeout),
            ));
        };
        let index = match ns {
            None => self.block(self.nl.link_by_name(&current))?.index,
            Some(ns) => {
                // Renamed to a unique name first: its kernel name may be taken in the pod netns.
                let (host, index) = self.handle_in(&ns, &current)?;
                let temp = format!("tmvf{:08x}", rand::random::<u32>());
                let pod = netns::open_netns(&self.ns_path)?;
                self.block(async {
                    host.set_down(index).await?;
                    host.set_name(index, &temp).await?;
                    host.set_netns(index, std::os::fd::AsFd::as_fd(&pod)).await
                })
                .map_err(|e| e.context(format!("move the netdev {current} of VF {pci} into the pod netns")))?;
                self.block(self.nl.link_by_name(&temp))?.index
            }
        };
        let link = self.block(self.nl.link_by_index(index))?;
        self.block(async {
            if link.name != name {
                self.nl.set_down(index).await?;
                self.nl.set_name(index, name).await?;
            }
            self.nl.set_alias(index, alias).await?;
            if link.mac != Some(mac) {
                self.nl.set_down(index).await?;
                self.nl.set_mac(index, mac).await?;
            }
            if up {
                self.nl.set_up(index).await?;
            }
            Ok(())
        })
        .map_err(|e| e.context(format!("return VF {pci} as {name}")))
    }

    fn save_vf_record(&mut self, record: &VfRecord) -> Result<()> {
        sriov::save_record(&self.sriov, record)
    }

    fn load_vf_record(&mut self, pci: &str) -> Result<Option<VfRecord>> {
        sriov::load_record(&self.sriov, pci)
    }

    fn remove_vf_record(&mut self, pci: &str) -> Result<()> {
        sriov::remove_record(&self.sriov, pci)
    }
}
