//! Setup, teardown and recovery of the container side over any [`NetOps`].

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::OwnedFd;

use ipnet::{IpNet, Ipv4Net};

use super::fix::{container_links, fix_result, ipv4_of, CalicoOptions, NetSnapshot};
use super::ops::{Addr, Link, NetOps, Route, RTPROT_KERNEL};
use crate::error::{Error, ErrorCode, Result};
use crate::netlink::VfConfig;
use crate::sriov::{VfRecord, VFIO_DRIVER};
use crate::types::{CniResult, ContainerSideNetwork, InterfaceDescription, InterfaceType, MacAddr};

/// The address of every pod bridge: the DHCP server's address, `169.254.254.2/24`.
pub const BRIDGE_ADDR: Ipv4Net = Ipv4Net::new_assert(crate::dhcp::SERVER_IP, 24);

/// The tap of the `i`-th container link.
pub fn tap_name(i: usize) -> String {
    format!("tap{i}")
}

/// The bridge of the `i`-th container link.
pub fn bridge_name(i: usize) -> String {
    format!("br{i}")
}

/// Options of [`setup`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetupOptions {
    /// How Calico results are fixed.
    pub calico: CalicoOptions,
    /// Whether SR-IOV VFs may be passed to the VM.
    pub enable_sriov: bool,
}

/// What [`setup`] produced: the ContainerSideNetwork and one fd per interface, in interface order.
#[derive(Debug)]
pub struct SetupOutput {
    /// The ContainerSideNetwork (with the fixed result).
    pub csn: ContainerSideNetwork,
    /// The VM's end of each tap, in `csn.interfaces` order; `/dev/null` for an SR-IOV VF (as in Virtlet: fd
    /// indexes keep their meaning, the VF itself goes to the VM by its PCI address).
    pub fds: Vec<OwnedFd>,
}

/// The fd that stands for an SR-IOV VF: `/dev/null`, read-only.
pub fn vf_placeholder_fd() -> Result<OwnedFd> {
    std::fs::File::open("/dev/null").map(OwnedFd::from).map_err(|e| Error::io("open /dev/null", e))
}

/// The broadcast address an IPv4 address gets from CNI plugins (and `ip addr add ... brd +`).
pub fn default_broadcast(net: &Ipv4Net) -> Option<Ipv4Addr> {
    (net.prefix_len() < 31).then(|| net.broadcast())
}

/// Reads links, IPv4 addresses and IPv4 main-table routes.
pub fn snapshot(ops: &mut impl NetOps) -> Result<NetSnapshot> {
    Ok(NetSnapshot { links: ops.links()?, addrs: ops.addrs()?, routes: ops.routes()? })
}

/// One step that undoes part of a setup.
#[derive(Debug)]
enum Undo {
    AddAddr(Addr),
    AddRoute(Route),
    RestoreMac { link: u32, mac: [u8; 6], up: bool },
    DeleteLink { index: u32, name: String },
    NoMaster(u32),
    RemoveIsolation { link: String, bridge: String },
    SetDown(u32),
    RemoveVfRecord(String),
    ReturnVf { record: Box<VfRecord>, up: bool, result: Box<CniResult> },
    SetVfConfig { pci: String, config: VfConfig },
}

fn run_undo(ops: &mut impl NetOps, undo: Undo) -> Result<()> {
    match undo {
        Undo::AddAddr(a) => ops.add_addr(&a).map_err(|e| e.context(format!("re-add address {}", a.net))),
        Undo::AddRoute(r) => ops.add_route(&r).map_err(|e| e.context(format!("re-add route {}", r.dst))),
        Undo::RestoreMac { link, mac, up } => restore_mac(ops, link, mac, up),
        Undo::DeleteLink { index, name } => ops.delete_link(index).map_err(|e| e.context(format!("delete {name}"))),
        Undo::NoMaster(link) => ops.set_master(link, None),
        Undo::RemoveIsolation { link, bridge } => ops.remove_isolation(&link, &bridge),
        Undo::SetDown(link) => ops.set_up(link, false),
        Undo::RemoveVfRecord(pci) => ops.remove_vf_record(&pci),
        Undo::ReturnVf { record, up, result } => {
            ops.return_vf(&record.pci, &record.name, &record.alias, record.mac.0, up)?;
            // The netdev came back without its addresses and routes: re-add them from the result.
            let link = ops.links()?.into_iter().find(|l| l.name == record.name);
            match link {
                Some(l) => restore_ips(ops, &result, &l),
                None => Err(Error::new(ErrorCode::NotFound, format!("VF link {} did not come back", record.name))),
            }
        }
        Undo::SetVfConfig { pci, config } => ops.set_vf_config(&pci, &config),
    }
}

fn restore_mac(ops: &mut impl NetOps, link: u32, mac: [u8; 6], up: bool) -> Result<()> {
    ops.set_up(link, false)?;
    ops.set_mac(link, mac)?;
    if up {
        ops.set_up(link, true)?;
    }
    Ok(())
}

/// A random locally administered unicast MAC.
pub fn random_mac() -> [u8; 6] {
    let mut mac: [u8; 6] = rand::random();
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// Sets up the container side (NETWORK.md, "Container side") in the netns `ops` works on, whose path is
/// `ns_path`. Fails with everything done so far undone: the netns is left as CNI left it.
pub fn setup(ops: &mut impl NetOps, ns_path: &str, result: CniResult, opts: &SetupOptions) -> Result<SetupOutput> {
    let mut journal = Vec::new();
    match setup_inner(ops, ns_path, result, opts, &mut journal) {
        Ok(out) => Ok(out),
        Err(err) => {
            let mut failures = Vec::new();
            while let Some(undo) = journal.pop() {
                if let Err(e) = run_undo(ops, undo) {
                    failures.push(e.message);
                }
            }
            if failures.is_empty() {
                Err(err)
            } else {
                Err(Error::new(err.code, format!("{}; rolling back also failed: {}", err.message, failures.join("; "))))
            }
        }
    }
}

fn setup_inner(
    ops: &mut impl NetOps,
    ns_path: &str,
    mut result: CniResult,
    opts: &SetupOptions,
    journal: &mut Vec<Undo>,
) -> Result<SetupOutput> {
    let snap = snapshot(ops)?;
    fix_result(&mut result, ns_path, &snap, &opts.calico)?;
    let links = container_links(&result, &snap)?;
    let mut interfaces = Vec::with_capacity(links.len());
    // Per interface: the tap to open, or `None` for a VF.
    let mut taps: Vec<Option<String>> = Vec::with_capacity(links.len());
    for (i, link) in links.iter().enumerate() {
        if ops.is_sriov_vf(link)? {
            if !opts.enable_sriov {
                return Err(Error::invalid(format!("{} is an SR-IOV VF, but SR-IOV is disabled", link.name)));
            }
            // No strip: the netdev, with its addresses and routes, goes away when the VF leaves its driver.
            let desc = setup_vf(ops, link, &result, journal)
                .map_err(|e| e.context(format!("pass VF {} through", link.name)))?;
            interfaces.push(desc);
            taps.push(None);
            continue;
        }
        strip(ops, &snap, link, journal).map_err(|e| e.context(format!("strip {}", link.name)))?;
        let tap = setup_tap(ops, i, link, journal).map_err(|e| e.context(format!("set up {}", link.name)))?;
        taps.push(Some(tap));
        interfaces.push(InterfaceDescription {
            kind: InterfaceType::Tap,
            name: link.name.clone(),
            hardware_addr: Some(MacAddr(link.mac)),
            pci_address: String::new(),
            mtu: mtu_of(link)?,
            vlan_id: 0,
        });
    }
    if let Some(lo) = snap.link_by_name("lo") {
        if !lo.up {
            journal.push(Undo::SetDown(lo.index));
            ops.set_up(lo.index, true).map_err(|e| e.context("set lo up"))?;
        }
    }
    let fds = taps
        .iter()
        .map(|t| match t {
            Some(t) => open_new_tap(ops, t),
            None => vf_placeholder_fd(),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(SetupOutput { csn: ContainerSideNetwork { result, ns_path: ns_path.to_string(), interfaces }, fds })
}

fn mtu_of(link: &Link) -> Result<u16> {
    u16::try_from(link.mtu).map_err(|_| Error::invalid(format!("MTU {} of {} is too large", link.mtu, link.name)))
}

/// Passes the VF `link` through (NETWORK.md, "Container side", step 2): reads its PCI address, PF, index and
/// what the PF holds for it, saves that (release restores it), binds it to vfio-pci, then sets through the
/// PF the link's MAC (the VM gets the CNI MAC) and the VLAN the PF had.
fn setup_vf(
    ops: &mut impl NetOps,
    link: &Link,
    result: &CniResult,
    journal: &mut Vec<Undo>,
) -> Result<InterfaceDescription> {
    let pci = ops.vf_pci(link)?;
    let state = ops.vf_info(&pci)?;
    let alias = ops.link_alias(link.index)?;
    let record = VfRecord {
        pci: pci.clone(),
        name: link.name.clone(),
        alias,
        mac: MacAddr(link.mac),
        pf_mac: MacAddr(state.config.mac),
        vlan: state.config.vlan,
        qos: state.config.qos,
    };
    ops.save_vf_record(&record)?;
    journal.push(Undo::RemoveVfRecord(pci.clone()));
    // Pushed before binding: a bind that fails half way leaves the VF unbound or overridden, and giving it
    // back handles every such state.
    journal.push(Undo::ReturnVf { record: Box::new(record), up: link.up, result: Box::new(result.clone()) });
    ops.bind_vfio(&pci)?;
    journal.push(Undo::SetVfConfig { pci: pci.clone(), config: state.config });
    let config = VfConfig { mac: link.mac, ..state.config };
    ops.set_vf_config(&pci, &config)?;
    Ok(InterfaceDescription {
        kind: InterfaceType::Vf,
        name: link.name.clone(),
        hardware_addr: Some(MacAddr(link.mac)),
        pci_address: pci,
        mtu: mtu_of(link)?,
        vlan_id: i32::try_from(state.config.vlan).unwrap_or(0),
    })
}

/// Gives a VF back (release): restores what its PF held for it, rebinds it to its host driver and returns
/// its netdev to the pod netns with its name, alias and MAC, so CNI DEL (e.g. `host-device`) finds it.
/// The PF is restored first: the host driver reads the VF's MAC from the PF when it binds. A VF neither
/// recorded nor bound to vfio-pci has been given back already.
fn teardown_vf(ops: &mut impl NetOps, desc: &InterfaceDescription) -> Result<()> {
    let pci = desc.pci_address.as_str();
    let record = ops.load_vf_record(pci)?;
    let state = ops.vf_info(pci)?;
    let bound = state.device.driver.as_deref() == Some(VFIO_DRIVER);
    let mac = desc.hardware_addr.map(|m| m.0);
    let (config, alias) = match &record {
        Some(r) => (VfConfig { mac: r.pf_mac.0, vlan: r.vlan, qos: r.qos }, r.alias.clone()),
        None if !bound => return Ok(()),
        None => (
            VfConfig { mac: mac.unwrap_or_default(), vlan: u32::try_from(desc.vlan_id).unwrap_or(0), qos: 0 },
            String::new(),
        ),
    };
    let mut errs = Errors::default();
    errs.step(|| format!("restore VF {pci} on its PF {}", state.pf_name), ops.set_vf_config(pci, &config));
    let mac = mac.or(record.as_ref().map(|r| r.mac.0)).unwrap_or_default();
    errs.step(
        || format!("give VF {pci} back to its driver and the pod"),
        ops.return_vf(pci, &desc.name, &alias, mac, true),
    );
    if errs.0.is_empty() {
        errs.step(|| format!("remove the record of VF {pci}"), ops.remove_vf_record(pci));
    }
    errs.finish()
}

/// Opens a tap this setup has just created. The fd that created it (closed since) can still be attached for a
/// moment: a child forked by this process (e.g. a CNI plugin being spawned by another pod's add) holds a copy of
/// every fd until its exec closes the close-on-exec ones, and the tap stays attached (`EBUSY`) until then. No VM
/// can hold a tap that did not exist a moment ago, so `ERR_BUSY` is retried here for a bounded time.
fn open_new_tap(ops: &mut impl NetOps, name: &str) -> Result<OwnedFd> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match ops.open_tap(name) {
            Err(e) if e.code == ErrorCode::Busy && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            r => return r,
        }
    }
}

/// Deletes the link's IPv4 routes (except kernel-protocol ones), then its IPv4 addresses.
fn strip(ops: &mut impl NetOps, snap: &NetSnapshot, link: &Link, journal: &mut Vec<Undo>) -> Result<()> {
    let mut routes: Vec<&Route> = snap.routes_of(link.index).filter(|r| r.protocol != RTPROT_KERNEL).collect();
    // Routes via a gateway first: they may depend on a gateway-less link route (Calico's 169.254.1.1).
    routes.sort_by_key(|r| r.gateway.is_none());
    for r in routes {
        ops.del_route(r).map_err(|e| e.context(format!("delete route {}", r.dst)))?;
        journal.push(Undo::AddRoute(r.clone()));
    }
    // Secondaries before the primary: deleting a primary takes its secondaries with it.
    let addrs: Vec<&Addr> = snap.addrs_of(link.index).collect();
    for a in addrs.into_iter().rev() {
        ops.del_addr(a).map_err(|e| e.context(format!("delete address {}", a.net)))?;
        journal.push(Undo::AddAddr(a.clone()));
    }
    Ok(())
}

/// MAC swap, tap, bridge, bridge address and isolation for the `i`-th link; returns the tap's name.
fn setup_tap(ops: &mut impl NetOps, i: usize, link: &Link, journal: &mut Vec<Undo>) -> Result<String> {
    journal.push(Undo::RestoreMac { link: link.index, mac: link.mac, up: link.up });
    ops.set_up(link.index, false)?;
    ops.set_mac(link.index, random_mac())?;
    ops.set_up(link.index, true)?;

    let tap = tap_name(i);
    let tap_index = ops.create_tap(&tap, link.mtu)?;
    journal.push(Undo::DeleteLink { index: tap_index, name: tap.clone() });
    ops.set_up(tap_index, true)?;

    let bridge = bridge_name(i);
    let br_index = ops.create_bridge(&bridge, link.mtu)?;
    journal.push(Undo::DeleteLink { index: br_index, name: bridge.clone() });
    journal.push(Undo::NoMaster(link.index));
    ops.set_master(link.index, Some(br_index))?;
    ops.set_master(tap_index, Some(br_index))?;
    ops.set_up(br_index, true)?;
    ops.add_addr(&Addr { link: br_index, net: BRIDGE_ADDR, broadcast: default_broadcast(&BRIDGE_ADDR) })?;
    journal.push(Undo::RemoveIsolation { link: link.name.clone(), bridge: bridge.clone() });
    ops.add_isolation(&link.name, &bridge)?;
    Ok(tap)
}

/// Collects the errors of steps that all run.
#[derive(Default)]
struct Errors(Vec<Error>);

impl Errors {
    fn step(&mut self, what: impl FnOnce() -> String, r: Result<()>) {
        if let Err(e) = r {
            self.0.push(e.context(what()));
        }
    }

    fn finish(self) -> Result<()> {
        match self.0.len() {
            0 => Ok(()),
            1 => Err(self.0.into_iter().next().expect("one error")),
            _ => {
                let code = self.0[0].code;
                let msg = self.0.iter().map(|e| e.message.as_str()).collect::<Vec<_>>().join("; ");
                Err(Error::new(code, format!("{} steps failed: {msg}", self.0.len())))
            }
        }
    }
}

fn ignore(code: ErrorCode, r: Result<()>) -> Result<()> {
    match r {
        Err(e) if e.code == code => Ok(()),
        r => r,
    }
}

/// Options of [`teardown_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TeardownOptions {
    /// Whether the bridges and taps are deleted (the default). `false` is for a netns about to be deleted:
    /// everything CNI needs is still restored (isolation removed, the links out of the bridges with their MACs,
    /// addresses and routes back), but the emptied bridges (their address removed) and taps are only brought
    /// down and left for the kernel to destroy with the netns, which it does asynchronously instead of ~20-45 ms per device here.
    pub delete_devices: bool,
}

impl Default for TeardownOptions {
    fn default() -> Self {
        TeardownOptions { delete_devices: true }
    }
}

/// Tears the container side down (NETWORK.md, "Teardown"), restoring the netns to what CNI left. The tap fds
/// must be closed by their owner. Every step runs even when one fails; all errors come back together.
/// Things already gone (a bridge, a tap, an address already there) are not errors, so a teardown can be
/// repeated after a partial failure. This is [`teardown_with`] and the default options (devices deleted).
pub fn teardown(ops: &mut impl NetOps, csn: &ContainerSideNetwork) -> Result<()> {
    teardown_with(ops, csn, &TeardownOptions::default())
}

/// [`teardown`] with options: with `delete_devices: false` the bridges and taps are taken down (`ip link set
/// DEV down`, and `ip addr del 169.254.254.2/24 dev br<i>`) instead of deleted, for a netns whose deletion
/// follows.
pub fn teardown_with(ops: &mut impl NetOps, csn: &ContainerSideNetwork, opts: &TeardownOptions) -> Result<()> {
    let mut errs = Errors::default();
    let links = match ops.links() {
        Ok(l) => l,
        Err(e) => return Err(e.context("list links")),
    };
    let by_name = |name: &str| links.iter().find(|l| l.name == name).cloned();
    for (i, desc) in csn.interfaces.iter().enumerate() {
        if desc.kind == InterfaceType::Vf {
            errs.step(|| format!("give back VF {}", desc.name), teardown_vf(ops, desc));
            continue;
        }
        let (bridge, tap) = (bridge_name(i), tap_name(i));
        let link = by_name(&desc.name);
        errs.step(|| format!("remove the DHCP isolation of {}", desc.name), ops.remove_isolation(&desc.name, &bridge));
        let br = by_name(&bridge);
        let tap_link = by_name(&tap);
        if let (Some(l), Some(_)) = (&link, &br) {
            errs.step(|| format!("take {} out of {bridge}", desc.name), ops.set_master(l.index, None));
        }
        if let (Some(t), Some(_)) = (&tap_link, &br) {
            errs.step(|| format!("take {tap} out of {bridge}"), ops.set_master(t.index, None));
        }
        if opts.delete_devices {
            if let Some(b) = &br {
                errs.step(|| format!("delete {bridge}"), ops.delete_link(b.index));
            }
            if let Some(t) = &tap_link {
                errs.step(|| format!("delete {tap}"), ops.delete_link(t.index));
            }
        } else {
            // Left to the netns deletion: down and without its address, the bridge forwards nothing and no
            // route (not even the local one) refers to it.
            if let Some(b) = &br {
                errs.step(|| format!("set {bridge} down"), ops.set_up(b.index, false));
                let addr = Addr { link: b.index, net: BRIDGE_ADDR, broadcast: default_broadcast(&BRIDGE_ADDR) };
                errs.step(
                    || format!("delete the address of {bridge}"),
                    ignore(ErrorCode::NotFound, ops.del_addr(&addr)),
                );
            }
            if let Some(t) = &tap_link {
                errs.step(|| format!("set {tap} down"), ops.set_up(t.index, false));
            }
        }
        match (&link, desc.hardware_addr) {
            (Some(l), Some(MacAddr(mac))) if l.mac != mac => {
                errs.step(|| format!("restore the MAC of {}", desc.name), restore_mac(ops, l.index, mac, true));
            }
            (None, _) => {
                errs.0.push(Error::new(ErrorCode::NotFound, format!("link {} is not in the pod netns", desc.name)))
            }
            _ => {}
        }
    }
    match ops.links() {
        Ok(links) => {
            for desc in &csn.interfaces {
                if let Some(link) = links.iter().find(|l| l.name == desc.name) {
                    let r = restore_ips(ops, &csn.result, link);
                    errs.step(|| format!("restore the addresses and routes of {}", link.name), r);
                }
            }
        }
        Err(e) => errs.0.push(e.context("list links")),
    }
    errs.finish()
}

/// Re-adds the link's IPs from the result (the link found by MAC in `interfaces`) and the routes whose gateway
/// lies in an address's subnet.
fn restore_ips(ops: &mut impl NetOps, result: &CniResult, link: &Link) -> Result<()> {
    let Some(iface) = result
        .interfaces
        .iter()
        .position(|i| !i.sandbox.is_empty() && i.mac.parse::<MacAddr>().ok() == Some(MacAddr(link.mac)))
    else {
        return Ok(());
    };
    let mut errs = Errors::default();
    for ip in result.ips.iter().filter(|ip| ip.interface == iface) {
        let Some(net) = ipv4_of(ip) else { continue };
        let addr = Addr { link: link.index, net, broadcast: default_broadcast(&net) };
        errs.step(|| format!("add address {net}"), ignore(ErrorCode::Exists, ops.add_addr(&addr)));
        let subnet = net.trunc();
        for r in &result.routes {
            let IpNet::V4(dst) = r.dst else { continue };
            let gw = match (r.gw, ip.gateway) {
                (Some(IpAddr::V4(gw)), _) => gw,
                (None, Some(IpAddr::V4(gw))) => gw,
                _ => continue,
            };
            if !subnet.contains(&gw) {
                continue;
            }
            let route = Route::new(dst.trunc(), Some(gw), link.index);
            errs.step(|| format!("add route {dst} via {gw}"), ignore(ErrorCode::Exists, ops.add_route(&route)));
        }
    }
    errs.finish()
}

/// Reopens the taps of a ContainerSideNetwork after a restart (NETWORK.md, "recover"): a tap that a running VM
/// holds gives `None` (its fd is fetched later with [`reopen_taps`]). A VF still bound to vfio-pci is left
/// alone (Virtlet's `ReconstructVFs`); one whose netdev is back in the pod netns (a crash during release) is
/// bound again from its record. Its fd is `/dev/null`.
pub fn recover(ops: &mut impl NetOps, csn: &ContainerSideNetwork) -> Result<Vec<Option<OwnedFd>>> {
    let mut fds = Vec::with_capacity(csn.interfaces.len());
    for (i, desc) in csn.interfaces.iter().enumerate() {
        if desc.kind == InterfaceType::Vf {
            reconstruct_vf(ops, desc).map_err(|e| e.context(format!("recover VF {}", desc.name)))?;
            fds.push(Some(vf_placeholder_fd()?));
            continue;
        }
        match ops.open_tap(&tap_name(i)) {
            Ok(fd) => fds.push(Some(fd)),
            Err(e) if e.code == ErrorCode::Busy => fds.push(None),
            Err(e) => return Err(e.context(format!("reopen the tap of {}", desc.name))),
        }
    }
    Ok(fds)
}

fn reconstruct_vf(ops: &mut impl NetOps, desc: &InterfaceDescription) -> Result<()> {
    let pci = desc.pci_address.as_str();
    let state = ops.vf_info(pci)?;
    if state.device.driver.as_deref() == Some(VFIO_DRIVER) {
        return Ok(());
    }
    let mac = desc.hardware_addr.map(|m| m.0).ok_or_else(|| Error::invalid(format!("VF {pci} has no MAC")))?;
    if ops.load_vf_record(pci)?.is_none() {
        return Err(Error::new(
            ErrorCode::NotFound,
            format!("VF {pci} is not bound to {VFIO_DRIVER} and has no record"),
        ));
    }
    ops.bind_vfio(pci)?;
    ops.set_vf_config(pci, &VfConfig { mac, ..state.config })
}

/// Reopens every tap of a ContainerSideNetwork (NETWORK.md, "retrieveFDs"); `ERR_BUSY` if one is still held.
/// A VF gives `/dev/null`.
pub fn reopen_taps(ops: &mut impl NetOps, csn: &ContainerSideNetwork) -> Result<Vec<OwnedFd>> {
    csn.interfaces
        .iter()
        .enumerate()
        .map(|(i, desc)| {
            if desc.kind == InterfaceType::Vf {
                return vf_placeholder_fd();
            }
            ops.open_tap(&tap_name(i)).map_err(|e| e.context(format!("reopen the tap of {}", desc.name)))
        })
        .collect()
}
