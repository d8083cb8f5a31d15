//! An in-memory [`NetOps`] that behaves like the kernel where the container side cares (kernel subnet routes
//! follow addresses, deleting a link drops its addresses, routes and ports), with fault injection.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;

use super::ops::*;
use crate::error::{Error, ErrorCode, Result};
use crate::netlink::VfConfig;
use crate::sriov::{VfDevice, VfRecord, VFIO_DRIVER};

/// A fake SR-IOV VF: its netdev (when bound to its host driver) and what its PF holds for it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FakeVf {
    pub index: u32,
    pub driver: String,
    pub netdev: Option<String>,
    pub mtu: u32,
    pub pf: VfConfig,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct FakeNet {
    pub links: Vec<Link>,
    pub addrs: Vec<Addr>,
    pub routes: Vec<Route>,
    pub isolations: BTreeSet<(String, String)>,
    /// Names of links that are SR-IOV VFs.
    pub vfs: BTreeSet<String>,
    /// SR-IOV VFs by PCI address.
    pub vf_devs: BTreeMap<String, FakeVf>,
    /// Link aliases by link name.
    pub aliases: BTreeMap<String, String>,
    /// Saved VF records by PCI address.
    pub vf_records: BTreeMap<String, VfRecord>,
    /// Taps held by someone else (opening them is `ERR_BUSY`).
    pub held: BTreeSet<String>,
    /// Bridge of each link with ageing 0.
    pub ageing_zero: BTreeSet<String>,
    /// Fail the mutating call with this number (0-based), once.
    pub fail_at: Option<usize>,
    /// Fail every call of these operations.
    pub fail_ops: BTreeSet<&'static str>,
    pub mutations: usize,
    next_index: u32,
}

impl FakeNet {
    pub fn new() -> FakeNet {
        let mut f = FakeNet { next_index: 1, ..Default::default() };
        f.add_link("lo", [0; 6], 65536, None);
        f
    }

    pub fn add_link(&mut self, name: &str, mac: [u8; 6], mtu: u32, kind: Option<&str>) -> u32 {
        let index = self.next_index;
        self.next_index += 1;
        self.links.push(Link {
            index,
            name: name.into(),
            mac,
            mtu,
            kind: kind.map(Into::into),
            master: None,
            up: true,
        });
        index
    }

    /// Adds a VF at `pci` (index `index` on its PF, bound to igbvf) whose netdev `name` is in this netns.
    pub fn add_vf(&mut self, name: &str, mac: [u8; 6], pci: &str, index: u32, pf: VfConfig) {
        self.add_link(name, mac, 1500, None);
        self.vfs.insert(name.into());
        self.vf_devs
            .insert(pci.into(), FakeVf { index, driver: "igbvf".into(), netdev: Some(name.into()), mtu: 1500, pf });
    }

    fn vf_mut(&mut self, pci: &str) -> Result<&mut FakeVf> {
        self.vf_devs.get_mut(pci).ok_or_else(|| Error::new(ErrorCode::NotFound, format!("no PCI device {pci}")))
    }

    pub fn index(&self, name: &str) -> u32 {
        self.links.iter().find(|l| l.name == name).unwrap_or_else(|| panic!("no link {name}")).index
    }

    pub fn link(&self, name: &str) -> &Link {
        self.links.iter().find(|l| l.name == name).unwrap_or_else(|| panic!("no link {name}"))
    }

    /// Adds an address the way a CNI plugin does (with its kernel subnet route).
    pub fn plugin_addr(&mut self, link: &str, net: &str) {
        let net: ipnet::Ipv4Net = net.parse().unwrap();
        let a = Addr { link: self.index(link), net, broadcast: super::setup::default_broadcast(&net) };
        self.add_addr(&a).unwrap();
    }

    pub fn plugin_route(&mut self, link: &str, dst: &str, gw: Option<&str>) {
        let r = Route::new(dst.parse().unwrap(), gw.map(|g| g.parse().unwrap()), self.index(link));
        self.add_route(&r).unwrap();
    }

    fn mutate(&mut self, op: &'static str) -> Result<()> {
        let n = self.mutations;
        self.mutations += 1;
        if self.fail_at == Some(n) {
            self.fail_at = None;
            return Err(Error::new(ErrorCode::Netlink, format!("injected failure at step {n} ({op})")));
        }
        if self.fail_ops.contains(op) {
            return Err(Error::new(ErrorCode::Netlink, format!("injected failure of {op}")));
        }
        Ok(())
    }

    fn link_mut(&mut self, index: u32) -> Result<&mut Link> {
        self.links
            .iter_mut()
            .find(|l| l.index == index)
            .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("no link {index}")))
    }

    fn new_link(&mut self, name: &str, mtu: u32, kind: &str) -> Result<u32> {
        if self.links.iter().any(|l| l.name == name) {
            return Err(Error::new(ErrorCode::Exists, format!("{name}: File exists")));
        }
        let mac = super::setup::random_mac();
        let i = self.add_link(name, mac, mtu, Some(kind));
        self.link_mut(i)?.up = false;
        Ok(i)
    }
}

impl NetOps for FakeNet {
    fn links(&mut self) -> Result<Vec<Link>> {
        Ok(self.links.clone())
    }
    fn addrs(&mut self) -> Result<Vec<Addr>> {
        Ok(self.addrs.clone())
    }
    fn routes(&mut self) -> Result<Vec<Route>> {
        Ok(self.routes.clone())
    }
    fn add_addr(&mut self, addr: &Addr) -> Result<()> {
        self.mutate("add_addr")?;
        self.link_mut(addr.link)?;
        if self.addrs.iter().any(|a| a.link == addr.link && a.net.addr() == addr.net.addr()) {
            return Err(Error::new(ErrorCode::Exists, "address exists"));
        }
        self.addrs.push(addr.clone());
        if addr.net.prefix_len() < 32 {
            self.routes.push(Route {
                protocol: RTPROT_KERNEL,
                prefsrc: Some(addr.net.addr()),
                ..Route::new(addr.net.trunc(), None, addr.link)
            });
        }
        Ok(())
    }
    fn del_addr(&mut self, addr: &Addr) -> Result<()> {
        self.mutate("del_addr")?;
        let n = self.addrs.len();
        self.addrs.retain(|a| !(a.link == addr.link && a.net == addr.net));
        if n == self.addrs.len() {
            return Err(Error::new(ErrorCode::NotFound, "no such address"));
        }
        self.routes.retain(|r| r.prefsrc != Some(addr.net.addr()));
        if !self.addrs.iter().any(|a| a.link == addr.link) {
            // The last address gone: the kernel flushes the link's routes.
            self.routes.retain(|r| r.oif != Some(addr.link));
        }
        Ok(())
    }
    fn add_route(&mut self, route: &Route) -> Result<()> {
        self.mutate("add_route")?;
        if self.routes.iter().any(|r| r.dst == route.dst && r.priority == route.priority && r.table == route.table) {
            return Err(Error::new(ErrorCode::Exists, "route exists"));
        }
        if let Some(gw) = route.gateway {
            let reachable =
                self.routes.iter().any(|r| r.oif == route.oif && r.gateway.is_none() && r.dst.contains(&gw));
            if !reachable {
                return Err(Error::new(ErrorCode::Netlink, format!("gateway {gw} unreachable")));
            }
        }
        self.routes.push(route.clone());
        Ok(())
    }
    fn del_route(&mut self, route: &Route) -> Result<()> {
        self.mutate("del_route")?;
        let n = self.routes.len();
        self.routes.retain(|r| r != route);
        if n == self.routes.len() {
            return Err(Error::new(ErrorCode::NotFound, "no such route"));
        }
        Ok(())
    }
    fn set_up(&mut self, link: u32, up: bool) -> Result<()> {
        self.mutate("set_up")?;
        self.link_mut(link)?.up = up;
        Ok(())
    }
    fn set_mac(&mut self, link: u32, mac: [u8; 6]) -> Result<()> {
        self.mutate("set_mac")?;
        self.link_mut(link)?.mac = mac;
        Ok(())
    }
    fn set_master(&mut self, link: u32, master: Option<u32>) -> Result<()> {
        self.mutate("set_master")?;
        if let Some(m) = master {
            self.link_mut(m)?;
        }
        self.link_mut(link)?.master = master;
        Ok(())
    }
    fn create_tap(&mut self, name: &str, mtu: u32) -> Result<u32> {
        self.mutate("create_tap")?;
        self.new_link(name, mtu, "tun")
    }
    fn create_bridge(&mut self, name: &str, mtu: u32) -> Result<u32> {
        self.mutate("create_bridge")?;
        let i = self.new_link(name, mtu, "bridge")?;
        self.ageing_zero.insert(name.to_string());
        Ok(i)
    }
    fn delete_link(&mut self, link: u32) -> Result<()> {
        self.mutate("delete_link")?;
        let name = self.link_mut(link)?.name.clone();
        self.links.retain(|l| l.index != link);
        self.ageing_zero.remove(&name);
        for l in &mut self.links {
            if l.master == Some(link) {
                l.master = None;
            }
        }
        self.addrs.retain(|a| a.link != link);
        self.routes.retain(|r| r.oif != Some(link));
        Ok(())
    }
    fn add_isolation(&mut self, link: &str, bridge: &str) -> Result<()> {
        self.mutate("add_isolation")?;
        if !self.isolations.insert((link.into(), bridge.into())) {
            return Err(Error::new(ErrorCode::Exists, "isolation exists"));
        }
        Ok(())
    }
    fn remove_isolation(&mut self, link: &str, bridge: &str) -> Result<()> {
        self.mutate("remove_isolation")?;
        self.isolations.remove(&(link.to_string(), bridge.to_string()));
        Ok(())
    }
    fn open_tap(&mut self, name: &str) -> Result<OwnedFd> {
        self.mutate("open_tap")?;
        if self.links.iter().all(|l| l.name != name) {
            return Err(Error::new(ErrorCode::NotFound, format!("no tap {name}")));
        }
        if self.held.contains(name) {
            return Err(Error::new(ErrorCode::Busy, format!("open tap {name}: Device or resource busy")));
        }
        Ok(std::fs::File::open("/dev/null").expect("open /dev/null").into())
    }
    fn is_sriov_vf(&mut self, link: &Link) -> Result<bool> {
        Ok(self.vfs.contains(&link.name))
    }
    fn vf_pci(&mut self, link: &Link) -> Result<String> {
        self.vf_devs
            .iter()
            .find(|(_, v)| v.netdev.as_deref() == Some(link.name.as_str()))
            .map(|(pci, _)| pci.clone())
            .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("{} is not a VF", link.name)))
    }
    fn vf_info(&mut self, pci: &str) -> Result<VfState> {
        let v = self.vf_mut(pci)?.clone();
        Ok(VfState {
            device: VfDevice {
                pci: pci.into(),
                pf_pci: "0000:00:04.0".into(),
                index: v.index,
                iommu_group: format!("{}", 7 + v.index),
                driver: Some(v.driver.clone()),
            },
            pf_name: "pf0".into(),
            config: v.pf,
        })
    }
    fn link_alias(&mut self, link: u32) -> Result<String> {
        let name = self.link_mut(link)?.name.clone();
        Ok(self.aliases.get(&name).cloned().unwrap_or_default())
    }
    fn set_vf_config(&mut self, pci: &str, config: &VfConfig) -> Result<()> {
        self.mutate("set_vf_config")?;
        self.vf_mut(pci)?.pf = *config;
        Ok(())
    }
    fn bind_vfio(&mut self, pci: &str) -> Result<()> {
        self.mutate("bind_vfio")?;
        let v = self.vf_mut(pci)?;
        if v.driver == VFIO_DRIVER {
            return Err(Error::new(ErrorCode::SriovVfInUse, format!("VF {pci} is in use")));
        }
        v.driver = VFIO_DRIVER.into();
        if let Some(name) = v.netdev.take() {
            let index = self.index(&name);
            self.vfs.remove(&name);
            self.aliases.remove(&name);
            self.links.retain(|l| l.index != index);
            self.addrs.retain(|a| a.link != index);
            self.routes.retain(|r| r.oif != Some(index));
        }
        Ok(())
    }
    fn return_vf(&mut self, pci: &str, name: &str, alias: &str, mac: [u8; 6], up: bool) -> Result<()> {
        self.mutate("return_vf")?;
        let v = self.vf_mut(pci)?;
        if v.netdev.is_some() {
            v.driver = "igbvf".into();
            return Ok(());
        }
        v.driver = "igbvf".into();
        v.netdev = Some(name.into());
        let mtu = v.mtu;
        let index = self.add_link(name, mac, mtu, None);
        self.link_mut(index)?.up = up;
        self.vfs.insert(name.into());
        if !alias.is_empty() {
            self.aliases.insert(name.into(), alias.into());
        }
        Ok(())
    }
    fn save_vf_record(&mut self, record: &VfRecord) -> Result<()> {
        self.mutate("save_vf_record")?;
        self.vf_records.insert(record.pci.clone(), record.clone());
        Ok(())
    }
    fn load_vf_record(&mut self, pci: &str) -> Result<Option<VfRecord>> {
        Ok(self.vf_records.get(pci).cloned())
    }
    fn remove_vf_record(&mut self, pci: &str) -> Result<()> {
        self.mutate("remove_vf_record")?;
        self.vf_records.remove(pci);
        Ok(())
    }
}
