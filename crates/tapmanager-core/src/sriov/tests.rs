//! The SR-IOV sysfs logic on a fake sysfs tree (no root, no hardware). A small "kernel" thread reacts to
//! writes to `drivers_probe` and `unbind` the way the PCI core does.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::*;

const PF: &str = "0000:00:04.0";
const VF0: &str = "0000:00:04.1";
const VF1: &str = "0000:00:04.2";

/// A fake sysfs: a PF with two VFs (igbvf bound, IOMMU groups 7 and 8), `vfio-pci` loaded, VF0's netdev `eth1`.
fn tree(root: &Path) -> SriovPaths {
    let sys = root.join("sys");
    let devs = sys.join("bus/pci/devices");
    for d in [PF, VF0, VF1] {
        fs::create_dir_all(devs.join(d)).unwrap();
        fs::write(devs.join(d).join("driver_override"), "(null)\n").unwrap();
    }
    for drv in ["igb", "igbvf", VFIO_DRIVER] {
        fs::create_dir_all(sys.join("bus/pci/drivers").join(drv)).unwrap();
    }
    fs::create_dir_all(sys.join("kernel/iommu_groups/7")).unwrap();
    fs::create_dir_all(sys.join("kernel/iommu_groups/8")).unwrap();
    symlink(sys.join("bus/pci/drivers/igb"), devs.join(PF).join("driver")).unwrap();
    for (i, (vf, group)) in [(VF0, "7"), (VF1, "8")].into_iter().enumerate() {
        symlink(format!("../{vf}"), devs.join(PF).join(format!("virtfn{i}"))).unwrap();
        symlink(format!("../{PF}"), devs.join(vf).join("physfn")).unwrap();
        symlink(sys.join("kernel/iommu_groups").join(group), devs.join(vf).join("iommu_group")).unwrap();
        symlink(sys.join("bus/pci/drivers/igbvf"), devs.join(vf).join("driver")).unwrap();
    }
    fs::create_dir_all(devs.join(VF0).join("net/eth1")).unwrap();
    fs::create_dir_all(sys.join("class/net/eth1")).unwrap();
    symlink(devs.join(VF0), sys.join("class/net/eth1/device")).unwrap();
    fs::create_dir_all(sys.join("class/net/veth0")).unwrap();
    fs::write(sys.join("bus/pci/drivers_probe"), "").unwrap();
    fs::write(sys.join("bus/pci/drivers/igbvf/unbind"), "").unwrap();
    fs::write(sys.join("bus/pci/drivers").join(VFIO_DRIVER).join("unbind"), "").unwrap();
    fs::create_dir_all(root.join("dev/vfio")).unwrap();
    SriovPaths {
        sysfs: sys,
        dev_vfio: root.join("dev/vfio"),
        records: root.join("records"),
        timeout: Duration::from_millis(600),
    }
}

/// Reacts like the PCI core: a write of a device to a driver's `unbind` drops its `driver` link; a write to
/// `drivers_probe` binds the override driver (or igbvf) and, for vfio-pci, creates `/dev/vfio/<group>`.
struct FakeKernel {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl FakeKernel {
    fn start(paths: &SriovPaths, bind_works: bool) -> FakeKernel {
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (paths.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let drivers = p.sysfs.join("bus/pci/drivers");
                for drv in ["igbvf", VFIO_DRIVER] {
                    let unbind = drivers.join(drv).join("unbind");
                    let pci = fs::read_to_string(&unbind).unwrap_or_default();
                    if !pci.is_empty() {
                        let _ = fs::remove_file(p.device(pci.trim()).join("driver"));
                        fs::write(&unbind, "").unwrap();
                    }
                }
                let probe = p.sysfs.join("bus/pci/drivers_probe");
                let pci = fs::read_to_string(&probe).unwrap_or_default();
                if !pci.is_empty() {
                    let pci = pci.trim().to_string();
                    fs::write(&probe, "").unwrap();
                    let dev = p.device(&pci);
                    let over = fs::read_to_string(dev.join("driver_override")).unwrap_or_default();
                    let want = if over.trim() == VFIO_DRIVER { VFIO_DRIVER } else { "igbvf" };
                    if bind_works && !dev.join("driver").exists() {
                        symlink(drivers.join(want), dev.join("driver")).unwrap();
                        if want == VFIO_DRIVER {
                            let group = link_target_name(&dev.join("iommu_group")).unwrap().unwrap();
                            fs::write(p.dev_vfio.join(group), "").unwrap();
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        FakeKernel { stop, handle: Some(handle) }
    }
}

impl Drop for FakeKernel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
    }
}

#[test]
fn finds_a_vf_its_pf_index_group_and_driver() {
    let dir = tempfile::tempdir().unwrap();
    let p = tree(dir.path());
    assert_eq!(vf_pci_of_link(&p.sysfs, "eth1").unwrap().as_deref(), Some(VF0));
    assert_eq!(vf_pci_of_link(&p.sysfs, "veth0").unwrap(), None);
    assert_eq!(vf_pci_of_link(&p.sysfs, "nosuch").unwrap(), None);
    let vf = vf_device(&p, VF1).unwrap();
    assert_eq!(
        vf,
        VfDevice {
            pci: VF1.into(),
            pf_pci: PF.into(),
            index: 1,
            iommu_group: "8".into(),
            driver: Some("igbvf".into())
        }
    );
    assert_eq!(netdevs_of(&p.sysfs, VF0).unwrap(), vec!["eth1".to_string()]);
    assert!(netdevs_of(&p.sysfs, VF1).unwrap().is_empty());
    assert_eq!(qemu_host(VF0), "00:04.1");
    assert_eq!(qemu_host("00:04.1"), "00:04.1");
}

#[test]
fn errors_name_the_node_problem() {
    let dir = tempfile::tempdir().unwrap();
    let p = tree(dir.path());
    let devs = p.sysfs.join("bus/pci/devices");

    fs::remove_file(devs.join(VF0).join("iommu_group")).unwrap();
    let e = vf_device(&p, VF0).unwrap_err();
    assert_eq!(e.code.as_str(), "ERR_SRIOV_NO_IOMMU_GROUP", "{}", e.message);
    assert!(e.message.contains("intel_iommu=on"), "{}", e.message);

    fs::remove_file(devs.join(VF1).join("physfn")).unwrap();
    assert_eq!(vf_device(&p, VF1).unwrap_err().code, ErrorCode::SriovPfNotFound);
    symlink("../0000:00:09.0", devs.join(VF1).join("physfn")).unwrap();
    let e = vf_device(&p, VF1).unwrap_err();
    assert_eq!(e.code.as_str(), "ERR_SRIOV_PF_NOT_FOUND", "{}", e.message);

    let p2 = tree(&dir.path().join("b"));
    let vf = vf_device(&p2, VF0).unwrap();
    fs::remove_dir(p2.sysfs.join("bus/pci/drivers").join(VFIO_DRIVER).join("unbind")).ok();
    fs::remove_dir_all(p2.sysfs.join("bus/pci/drivers").join(VFIO_DRIVER)).unwrap();
    let e = check_passthrough(&p2, &vf).unwrap_err();
    assert_eq!(e.code.as_str(), "ERR_SRIOV_NO_VFIO", "{}", e.message);
    assert!(e.message.contains("modprobe vfio-pci"), "{}", e.message);

    let p3 = tree(&dir.path().join("c"));
    let mut vf = vf_device(&p3, VF0).unwrap();
    vf.driver = Some(VFIO_DRIVER.into());
    assert_eq!(check_passthrough(&p3, &vf).unwrap_err().code.as_str(), "ERR_SRIOV_VF_IN_USE");
    let vf = vf_device(&p3, VF1).unwrap();
    fs::write(p3.device(VF1).join("driver_override"), "pci-stub\n").unwrap();
    let e = check_passthrough(&p3, &vf).unwrap_err();
    assert_eq!(e.code, ErrorCode::SriovVfInUse);
    assert!(e.message.contains("pci-stub"), "{}", e.message);
}

#[test]
fn binds_to_vfio_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let p = tree(dir.path());
    let _kernel = FakeKernel::start(&p, true);
    let vf = vf_device(&p, VF0).unwrap();
    bind_vfio(&p, &vf).unwrap();
    assert_eq!(current_driver(&p, VF0).unwrap().as_deref(), Some(VFIO_DRIVER));
    assert!(vfio_group_path(&p, "7").exists());
    assert_eq!(read_override(&p, VF0).unwrap().as_deref(), Some(VFIO_DRIVER));
    // Bound already: in use.
    let again = vf_device(&p, VF0).unwrap();
    assert_eq!(bind_vfio(&p, &again).unwrap_err().code, ErrorCode::SriovVfInUse);

    assert_eq!(unbind_vfio(&p, VF0).unwrap().as_deref(), Some("igbvf"));
    assert_eq!(read_override(&p, VF0).unwrap(), None);
    // VF1 was never touched.
    assert_eq!(current_driver(&p, VF1).unwrap().as_deref(), Some("igbvf"));
}

#[test]
fn a_bind_that_never_happens_times_out_and_unbind_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let p = tree(dir.path());
    let kernel = FakeKernel::start(&p, false);
    let vf = vf_device(&p, VF0).unwrap();
    let e = bind_vfio(&p, &vf).unwrap_err();
    assert_eq!(e.code, ErrorCode::Timeout, "{}", e.message);
    assert!(e.message.contains("/dev/vfio/7") || e.message.contains("vfio/7"), "{}", e.message);
    assert_eq!(current_driver(&p, VF0).unwrap(), None, "unbound, nothing took it");
    drop(kernel);
    let _kernel = FakeKernel::start(&p, true);
    assert_eq!(unbind_vfio(&p, VF0).unwrap().as_deref(), Some("igbvf"));
    assert_eq!(read_override(&p, VF0).unwrap(), None);
}

#[test]
fn records_round_trip_and_reject_bad_names() {
    let dir = tempfile::tempdir().unwrap();
    let p = tree(dir.path());
    assert_eq!(load_record(&p, VF0).unwrap(), None);
    let rec = VfRecord {
        pci: VF0.into(),
        name: "net1".into(),
        alias: "eth1".into(),
        mac: MacAddr([2, 0, 0, 0, 0, 1]),
        pf_mac: MacAddr([0; 6]),
        vlan: 100,
        qos: 0,
    };
    save_record(&p, &rec).unwrap();
    assert_eq!(load_record(&p, VF0).unwrap(), Some(rec));
    remove_record(&p, VF0).unwrap();
    remove_record(&p, VF0).unwrap();
    assert_eq!(load_record(&p, VF0).unwrap(), None);
    assert_eq!(load_record(&p, "../x").unwrap_err().code, ErrorCode::Invalid);
}
