//! SR-IOV virtual functions (VFs) handed to a VM with vfio-pci (NETWORK.md, "Container side", step 2).
//!
//! Everything here reads and writes sysfs and `/dev/vfio` under roots given in [`SriovPaths`], so the logic
//! runs against a fake tree in unit tests (no root, no hardware) and against `/sys` for real.
//!
//! - A link is a VF when `<sysfs>/class/net/<link>/device/physfn` exists; its PCI address is the name its
//!   `device` link points to; its PF is what `physfn` points to; its index is the `virtfn<N>` link of the PF
//!   that points back to it; its IOMMU group is the name `iommu_group` points to.
//! - Binding to vfio-pci uses `driver_override` + `drivers_probe` ([`bind_vfio`]), not Virtlet's
//!   `new_id`: `new_id` teaches vfio-pci a vendor:device pair, so vfio-pci then claims *every* device with
//!   that pair that gets probed later (the other VFs of the same NIC, a VF rebound to its host driver) until
//!   `remove_id`, and it needs the host driver remembered to bind back. `driver_override` names one device
//!   only; clearing it and probing again gives the device back to whatever driver matches it (igbvf, ixgbevf,
//!   mlx5_core, ...) with nothing to remember ([`unbind_vfio`]).
//! - A launcher passes the VF to QEMU with `-device vfio-pci,host=<bus:dev.fn>`; QEMU (or the launcher for
//!   it) opens `/dev/vfio/vfio` and the group file `/dev/vfio/<group>` ([`vfio_group_path`]), which must be
//!   accessible to the user QEMU runs as.
//!
//! Error codes say what is wrong on the node: [`ErrorCode::SriovNoIommuGroup`] (no IOMMU, e.g. no
//! `intel_iommu=on`), [`ErrorCode::SriovNoVfio`] (the vfio-pci module is not loaded),
//! [`ErrorCode::SriovVfInUse`] (already bound to vfio-pci or overridden to another driver),
//! [`ErrorCode::SriovPfNotFound`] (no PF device, or no PF netdev in the namespaces looked at).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorCode, Result};
use crate::types::MacAddr;

/// The driver VFs are bound to for passthrough.
pub const VFIO_DRIVER: &str = "vfio-pci";

/// Where the SR-IOV code looks: sysfs, `/dev/vfio`, and the directory of VF records (what release restores).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SriovPaths {
    /// The sysfs root (default `/sys`).
    pub sysfs: PathBuf,
    /// The VFIO device directory (default `/dev/vfio`).
    pub dev_vfio: PathBuf,
    /// Where a record per VF in use is kept (default `/run/tapmanager/sriov`): tmpfs, so it goes with a reboot,
    /// as does the binding it describes.
    pub records: PathBuf,
    /// How long binding a driver and the appearance of `/dev/vfio/<group>` or of the VF's netdev may take.
    pub timeout: Duration,
}

impl Default for SriovPaths {
    fn default() -> Self {
        SriovPaths {
            sysfs: PathBuf::from("/sys"),
            dev_vfio: PathBuf::from("/dev/vfio"),
            records: PathBuf::from("/run/tapmanager/sriov"),
            timeout: Duration::from_secs(20),
        }
    }
}

impl SriovPaths {
    /// True when `sysfs` is the real `/sys` (netdev listings then depend on the netns that mounted it).
    pub fn is_real_sysfs(&self) -> bool {
        self.sysfs == Path::new("/sys")
    }

    fn device(&self, pci: &str) -> PathBuf {
        self.sysfs.join("bus/pci/devices").join(pci)
    }
}

/// A VF as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfDevice {
    /// Its PCI address, `0000:00:04.1`.
    pub pci: String,
    /// Its PF's PCI address.
    pub pf_pci: String,
    /// Its number on the PF (`virtfn<N>`, `ip link set <pf> vf <N>`).
    pub index: u32,
    /// Its IOMMU group (the name of `/dev/vfio/<group>`).
    pub iommu_group: String,
    /// The driver bound to it, if any.
    pub driver: Option<String>,
}

/// What release restores for a VF, saved before setup changes anything ([`save_record`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfRecord {
    /// The VF's PCI address.
    pub pci: String,
    /// The link's name in the pod netns.
    pub name: String,
    /// The link's alias there (host-device keeps the host-side name in it).
    pub alias: String,
    /// The link's MAC (the VM gets it).
    pub mac: MacAddr,
    /// The MAC the PF held for the VF before (all zeros: none).
    pub pf_mac: MacAddr,
    /// The VLAN the PF held for the VF before.
    pub vlan: u32,
    /// The VLAN priority the PF held for the VF before.
    pub qos: u32,
}

fn link_target_name(path: &Path) -> Result<Option<String>> {
    match fs::read_link(path) {
        Ok(t) => Ok(t.file_name().map(|n| n.to_string_lossy().into_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("read link {}", path.display()), e)),
    }
}

/// The PCI address of the netdev `link` as `<sysfs>/class/net/<link>/device` names it, when it is a VF
/// (`device/physfn` exists); `None` for any other link. The sysfs must belong to the link's netns.
pub fn vf_pci_of_link(sysfs: &Path, link: &str) -> Result<Option<String>> {
    let dev = sysfs.join("class/net").join(link).join("device");
    if !dev.join("physfn").exists() {
        return Ok(None);
    }
    match link_target_name(&dev)? {
        Some(pci) => Ok(Some(pci)),
        None => Err(Error::new(ErrorCode::NotFound, format!("{}: no device link", dev.display()))),
    }
}

/// Reads what passing the VF `pci` through needs: PF, index, IOMMU group, driver.
pub fn vf_device(paths: &SriovPaths, pci: &str) -> Result<VfDevice> {
    let dev = paths.device(pci);
    if !dev.exists() {
        return Err(Error::new(ErrorCode::NotFound, format!("no PCI device {pci} in {}", dev.display())));
    }
    let pf_pci = link_target_name(&dev.join("physfn"))?.ok_or_else(|| {
        Error::new(ErrorCode::SriovPfNotFound, format!("PCI device {pci} has no physfn: not an SR-IOV VF"))
    })?;
    let pf = paths.device(&pf_pci);
    if !pf.exists() {
        return Err(Error::new(ErrorCode::SriovPfNotFound, format!("the PF {pf_pci} of VF {pci} is not in sysfs")));
    }
    let mut index = None;
    let entries = fs::read_dir(&pf).map_err(|e| Error::io(format!("list {}", pf.display()), e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(n) = name.strip_prefix("virtfn").and_then(|n| n.parse::<u32>().ok()) else { continue };
        if link_target_name(&entry.path())?.as_deref() == Some(pci) {
            index = Some(n);
            break;
        }
    }
    let index = index.ok_or_else(|| {
        Error::new(ErrorCode::SriovPfNotFound, format!("the PF {pf_pci} lists no virtfn link to VF {pci}"))
    })?;
    let iommu_group = link_target_name(&dev.join("iommu_group"))?.ok_or_else(|| {
        Error::new(
            ErrorCode::SriovNoIommuGroup,
            format!("VF {pci} has no IOMMU group: turn the IOMMU on (e.g. intel_iommu=on or amd_iommu=on)"),
        )
    })?;
    let driver = link_target_name(&dev.join("driver"))?;
    Ok(VfDevice { pci: pci.to_string(), pf_pci, index, iommu_group, driver })
}

/// Checks that a VF can be given to vfio-pci now: the vfio-pci driver is there and the VF is not taken.
pub fn check_passthrough(paths: &SriovPaths, vf: &VfDevice) -> Result<()> {
    if vf.driver.as_deref() == Some(VFIO_DRIVER) {
        return Err(Error::new(
            ErrorCode::SriovVfInUse,
            format!("VF {} is in use: it is bound to {VFIO_DRIVER} already", vf.pci),
        ));
    }
    let over = read_override(paths, &vf.pci)?;
    if let Some(other) = over.filter(|d| d != VFIO_DRIVER) {
        return Err(Error::new(
            ErrorCode::SriovVfInUse,
            format!("VF {} is in use: its driver_override names {other}", vf.pci),
        ));
    }
    if !paths.sysfs.join("bus/pci/drivers").join(VFIO_DRIVER).exists() {
        return Err(Error::new(
            ErrorCode::SriovNoVfio,
            format!("the {VFIO_DRIVER} driver is not loaded (modprobe vfio-pci) to pass VF {} through", vf.pci),
        ));
    }
    Ok(())
}

fn read_override(paths: &SriovPaths, pci: &str) -> Result<Option<String>> {
    let p = paths.device(pci).join("driver_override");
    match fs::read_to_string(&p) {
        Ok(s) => {
            let s = s.trim();
            Ok((!s.is_empty() && s != "(null)").then(|| s.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("read {}", p.display()), e)),
    }
}

/// Writes `value` to a sysfs attribute in one `write` (as `echo value > path` does).
fn write_attr(path: &Path, value: &str) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io(format!("open {} for writing", path.display()), e))?;
    f.write_all(value.as_bytes()).map_err(|e| Error::io(format!("write {value:?} to {}", path.display()), e))
}

/// Unbinds `pci` from its driver and waits (bounded) until sysfs shows it without one (the kernel does it
/// before the write returns; the wait is for trees that react later). `echo <pci> > .../<pci>/driver/unbind`.
fn unbind(paths: &SriovPaths, pci: &str) -> Result<()> {
    write_attr(&paths.device(pci).join("driver/unbind"), pci).map_err(|e| e.context(format!("unbind {pci}")))?;
    if wait_for(paths.timeout, || Ok(current_driver(paths, pci)?.is_none()))? {
        Ok(())
    } else {
        Err(Error::new(ErrorCode::Timeout, format!("{pci} still has a driver {:?} after unbind", paths.timeout)))
    }
}

/// The driver bound to `pci` now.
pub fn current_driver(paths: &SriovPaths, pci: &str) -> Result<Option<String>> {
    link_target_name(&paths.device(pci).join("driver"))
}

/// `/dev/vfio/<group>`: the file a VM launcher (QEMU) opens, with `/dev/vfio/vfio`, to use the VF.
pub fn vfio_group_path(paths: &SriovPaths, group: &str) -> PathBuf {
    paths.dev_vfio.join(group)
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub(crate) fn wait_for(timeout: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Binds the VF to vfio-pci and waits for `/dev/vfio/<group>`. Equivalent to
/// `echo vfio-pci > .../<pci>/driver_override; echo <pci> > .../<pci>/driver/unbind;
/// echo <pci> > /sys/bus/pci/drivers_probe`. A failure may leave the VF half way (unbound, overridden):
/// [`unbind_vfio`] gives it back from any of those states.
pub fn bind_vfio(paths: &SriovPaths, vf: &VfDevice) -> Result<()> {
    check_passthrough(paths, vf)?;
    let dev = paths.device(&vf.pci);
    write_attr(&dev.join("driver_override"), VFIO_DRIVER)?;
    if current_driver(paths, &vf.pci)?.is_some() {
        unbind(paths, &vf.pci)?;
    }
    write_attr(&paths.sysfs.join("bus/pci/drivers_probe"), &vf.pci)
        .map_err(|e| e.context(format!("probe VF {} for {VFIO_DRIVER}", vf.pci)))?;
    let group = vfio_group_path(paths, &vf.iommu_group);
    let ok = wait_for(paths.timeout, || {
        Ok(current_driver(paths, &vf.pci)?.as_deref() == Some(VFIO_DRIVER) && group.exists())
    })?;
    if !ok {
        return Err(Error::new(
            ErrorCode::Timeout,
            format!(
                "VF {} not bound to {VFIO_DRIVER} with {} within {:?} (driver now {:?})",
                vf.pci,
                group.display(),
                paths.timeout,
                current_driver(paths, &vf.pci)?
            ),
        ));
    }
    Ok(())
}

/// Gives the VF back to its host driver: clears `driver_override`, unbinds it from vfio-pci (if bound) and
/// probes it, then waits (bounded) for a driver. Returns that driver (`None`: no driver matched it).
/// Equivalent to `echo > .../<pci>/driver_override; echo <pci> > .../<pci>/driver/unbind;
/// echo <pci> > /sys/bus/pci/drivers_probe`.
pub fn unbind_vfio(paths: &SriovPaths, pci: &str) -> Result<Option<String>> {
    let dev = paths.device(pci);
    write_attr(&dev.join("driver_override"), "\n")?;
    if current_driver(paths, pci)?.as_deref() == Some(VFIO_DRIVER) {
        unbind(paths, pci)?;
    }
    if current_driver(paths, pci)?.is_none() {
        write_attr(&paths.sysfs.join("bus/pci/drivers_probe"), pci)
            .map_err(|e| e.context(format!("probe VF {pci} for its host driver")))?;
    }
    wait_for(paths.timeout, || Ok(current_driver(paths, pci)?.is_some()))?;
    current_driver(paths, pci)
}

/// The netdevs of PCI device `pci` as `<sysfs>/bus/pci/devices/<pci>/net` lists them. With the real sysfs
/// this lists only netdevs of the netns that mounted it.
pub fn netdevs_of(sysfs: &Path, pci: &str) -> Result<Vec<String>> {
    let dir = sysfs.join("bus/pci/devices").join(pci).join("net");
    match fs::read_dir(&dir) {
        Ok(entries) => {
            let mut names: Vec<String> =
                entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
            names.sort();
            Ok(names)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::io(format!("list {}", dir.display()), e)),
    }
}

fn record_path(paths: &SriovPaths, pci: &str) -> Result<PathBuf> {
    if pci.is_empty() || pci.contains('/') || pci.starts_with('.') {
        return Err(Error::invalid(format!("bad PCI address {pci:?}")));
    }
    Ok(paths.records.join(format!("{pci}.json")))
}

/// Saves what release restores for a VF (atomically: a temporary file renamed into place).
pub fn save_record(paths: &SriovPaths, rec: &VfRecord) -> Result<()> {
    let path = record_path(paths, &rec.pci)?;
    fs::create_dir_all(&paths.records).map_err(|e| Error::io(format!("create {}", paths.records.display()), e))?;
    let tmp = path.with_extension("json.tmp");
    let json = serde_json::to_vec(rec).map_err(|e| Error::invalid(format!("encode VF record: {e}")))?;
    fs::write(&tmp, json).map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
    fs::rename(&tmp, &path).map_err(|e| Error::io(format!("rename {}", tmp.display()), e))
}

/// The saved record of a VF, if any.
pub fn load_record(paths: &SriovPaths, pci: &str) -> Result<Option<VfRecord>> {
    let path = record_path(paths, pci)?;
    match fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::invalid(format!("bad VF record {}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
    }
}

/// Removes the record of a VF (none is fine).
pub fn remove_record(paths: &SriovPaths, pci: &str) -> Result<()> {
    let path = record_path(paths, pci)?;
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
    }
}

/// `0000:00:04.1` -> `00:04.1`: the `host=` QEMU's vfio-pci takes (domain 0000 implied).
pub fn qemu_host(pci: &str) -> &str {
    match pci.split_once(':') {
        Some((dom, rest)) if dom.len() == 4 && rest.contains(':') => rest,
        _ => pci,
    }
}

#[cfg(test)]
mod tests;
