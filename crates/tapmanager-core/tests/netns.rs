//! Named network namespaces created natively: `ip netns` sees and uses them, reuse/recreate of leftovers,
//! idempotent delete, listing, and the /sys remount variant of run_in_netns. Root only; touches no link,
//! address or route of the root netns.
mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::{require_prereqs, sh, unique_name};
use nix::mount::{umount2, MntFlags};
use tapmanager_core::netns::{
    create_netns, delete_netns, enter_process_netns, in_netns, is_netns_mount, list_netns, run_in_netns,
    run_in_netns_with_sysfs, IfExists, DEFAULT_NETNS_DIR,
};
use tapmanager_core::netns::{create_netns_from, create_netns_with, NetnsPool, NetnsSettings};
use tapmanager_core::ErrorCode;

fn ns_inode(path: &Path) -> u64 {
    let p = path.to_path_buf();
    run_in_netns(&p, || Ok(std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino())).unwrap()
}

/// Deletes the netns on drop, so a failing assertion leaves nothing behind.
struct Cleanup(String);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = delete_netns(Path::new(DEFAULT_NETNS_DIR), &self.0);
    }
}

#[test]
fn create_is_seen_and_usable_by_ip_netns_and_delete_is_idempotent() {
    require_prereqs(&["ip"]);
    let dir = Path::new(DEFAULT_NETNS_DIR);
    let name = unique_name("tmns");
    let _c = Cleanup(name.clone());
    let created = create_netns(dir, &name, IfExists::Fail).unwrap();
    assert!(created.created);
    assert_eq!(created.path, dir.join(&name));
    assert!(is_netns_mount(&created.path));

    // iproute2 sees it and can run commands in it: a fresh netns has only lo.
    let listed = sh("ip", &["netns", "list"]);
    assert!(listed.lines().any(|l| l.split_whitespace().next() == Some(name.as_str())), "{listed}");
    let links = sh("ip", &["netns", "exec", &name, "ip", "-o", "link", "show"]);
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains(": lo:"), "{links}");
    // A link made through `ip netns exec` is seen by our run_in_netns, and the root netns differs.
    sh("ip", &["netns", "exec", &name, "ip", "link", "add", "mark0", "type", "bridge"]);
    let p = created.path.clone();
    let seen = run_in_netns(&p, || Ok(nix::net::if_::if_nametoindex("mark0").is_ok())).unwrap();
    assert!(seen);
    let root_ino = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    assert_ne!(ns_inode(&created.path), root_ino);

    assert!(list_netns(dir).unwrap().contains(&name));
    // No thread of ours is left inside the pod netns.
    assert_eq!(sh("ip", &["netns", "pids", &name]).trim(), "");

    delete_netns(dir, &name).unwrap();
    assert!(!created.path.exists());
    assert!(!list_netns(dir).unwrap().contains(&name));
    assert!(!sh("ip", &["netns", "list"]).contains(&name));
    // Idempotent.
    delete_netns(dir, &name).unwrap();
}

#[test]
fn existing_names_fail_reuse_or_recreate() {
    require_prereqs(&["ip"]);
    let dir = Path::new(DEFAULT_NETNS_DIR);
    let name = unique_name("tmns");
    let _c = Cleanup(name.clone());
    let first = create_netns(dir, &name, IfExists::Fail).unwrap();
    let ino = ns_inode(&first.path);

    let err = create_netns(dir, &name, IfExists::Fail).unwrap_err();
    assert_eq!(err.code, ErrorCode::Exists, "{err}");

    // Reuse returns the same namespace, untouched.
    let reused = create_netns(dir, &name, IfExists::Reuse).unwrap();
    assert!(!reused.created);
    assert_eq!(ns_inode(&reused.path), ino);

    // Recreate gives a new, empty namespace.
    sh("ip", &["netns", "exec", &name, "ip", "link", "add", "old0", "type", "bridge"]);
    let fresh = create_netns(dir, &name, IfExists::Recreate).unwrap();
    assert!(fresh.created);
    assert_ne!(ns_inode(&fresh.path), ino);
    let links = sh("ip", &["netns", "exec", &name, "ip", "-o", "link", "show"]);
    assert!(!links.contains("old0"), "{links}");

    // A crash between creating the file and mounting leaves a plain file: Reuse turns it into a netns.
    delete_netns(dir, &name).unwrap();
    std::fs::write(dir.join(&name), b"").unwrap();
    assert!(!is_netns_mount(&dir.join(&name)));
    assert!(!list_netns(dir).unwrap().contains(&name), "a plain file is not listed as a netns");
    let healed = create_netns(dir, &name, IfExists::Reuse).unwrap();
    assert!(healed.created);
    assert!(is_netns_mount(&healed.path));
    delete_netns(dir, &name).unwrap();
}

#[test]
fn a_custom_directory_is_made_a_shared_mount_and_works() {
    require_prereqs(&["ip", "findmnt"]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("netns");
    let name = unique_name("tmns");
    let created = create_netns(&dir, &name, IfExists::Fail).unwrap();
    let prop = sh("findmnt", &["-n", "-o", "PROPAGATION", dir.to_str().unwrap()]);
    assert!(prop.contains("shared"), "propagation of {}: {prop}", dir.display());
    assert_eq!(list_netns(&dir).unwrap(), vec![name.clone()]);
    let lo = run_in_netns(&created.path, || Ok(nix::net::if_::if_nametoindex("lo").unwrap())).unwrap();
    assert!(lo > 0);
    delete_netns(&dir, &name).unwrap();
    assert!(list_netns(&dir).unwrap().is_empty());
    // Undo the self-bind of the temporary directory (as `ip` leaves /run/netns mounted, we leave nothing).
    nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH).unwrap();
}

/// `ipv6: false`: links created later in the netns have IPv6 off (no link-local address), `lo` keeps `::1`, a
/// link can have IPv6 turned on again (as a CNI plugin giving it an IPv6 address does); the default keeps the
/// kernel's defaults.
#[test]
fn ipv6_can_be_off_by_default_for_the_links_made_in_a_new_netns() {
    require_prereqs(&["ip", "sysctl"]);
    let dir = Path::new(DEFAULT_NETNS_DIR);
    let off = unique_name("tmns");
    let _c1 = Cleanup(off.clone());
    let on = unique_name("tmns");
    let _c2 = Cleanup(on.clone());
    create_netns_with(dir, &off, &NetnsSettings { ipv6: false, ..NetnsSettings::default() }).unwrap();
    create_netns_with(dir, &on, &NetnsSettings::default()).unwrap();
    let exec = |ns: &str, args: &[&str]| {
        let mut a = vec!["netns", "exec", ns];
        a.extend_from_slice(args);
        sh("ip", &a)
    };
    for ns in [&off, &on] {
        exec(ns, &["ip", "link", "add", "tmb0", "type", "bridge"]);
        exec(ns, &["ip", "link", "set", "tmb0", "up"]);
        exec(ns, &["ip", "link", "set", "lo", "up"]);
    }
    assert_eq!(exec(&off, &["sysctl", "-n", "net.ipv6.conf.default.disable_ipv6"]).trim(), "1");
    assert_eq!(exec(&off, &["sysctl", "-n", "net.ipv6.conf.tmb0.disable_ipv6"]).trim(), "1");
    assert_eq!(exec(&off, &["ip", "-6", "-o", "addr", "show", "dev", "tmb0"]).trim(), "");
    assert!(exec(&off, &["ip", "-6", "-o", "addr", "show", "dev", "lo"]).contains("::1/128"));
    // A link can get IPv6 back, e.g. from a plugin that configures an IPv6 address on it.
    exec(&off, &["sysctl", "-qw", "net.ipv6.conf.tmb0.disable_ipv6=0"]);
    exec(&off, &["ip", "addr", "add", "fd00:7::1/64", "dev", "tmb0", "nodad"]);
    assert!(exec(&off, &["ip", "-6", "-o", "addr", "show", "dev", "tmb0"]).contains("fd00:7::1/64"));
    // The default netns settings are the kernel's: the bridge has its link-local address (fe80::/64) at once.
    assert_eq!(exec(&on, &["sysctl", "-n", "net.ipv6.conf.default.disable_ipv6"]).trim(), "0");
    assert_eq!(exec(&on, &["sysctl", "-n", "net.ipv6.conf.tmb0.disable_ipv6"]).trim(), "0");
}

#[test]
fn bad_names_are_refused_and_nothing_is_created() {
    let dir = Path::new(DEFAULT_NETNS_DIR);
    for bad in ["", ".", "..", "a/b", "x\0y"] {
        let err = create_netns(dir, bad, IfExists::Fail).unwrap_err();
        assert_eq!(err.code, ErrorCode::Invalid, "{bad:?}: {err}");
        assert_eq!(delete_netns(dir, bad).unwrap_err().code, ErrorCode::Invalid);
    }
    let err = run_in_netns(Path::new("/var/run/netns/does-not-exist-tm"), || Ok(())).unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
}

#[test]
fn sysfs_variant_shows_the_pods_links_and_leaves_the_callers_sys_alone() {
    require_prereqs(&["ip"]);
    let dir = Path::new(DEFAULT_NETNS_DIR);
    let name = unique_name("tmns");
    let _c = Cleanup(name.clone());
    let ns = create_netns(dir, &name, IfExists::Fail).unwrap();
    let link = unique_name("tmsys");
    sh("ip", &["netns", "exec", &name, "ip", "link", "add", &link, "type", "bridge"]);
    let l = link.clone();
    let (listed, mtu) = run_in_netns_with_sysfs(&ns.path, move || {
        let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mtu = std::fs::read_to_string(format!("/sys/class/net/{l}/mtu")).unwrap();
        Ok((names, mtu))
    })
    .unwrap();
    let mut expected = vec![link.clone(), "lo".to_string()];
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(mtu.trim(), "1500");
    // The caller's /sys still shows the root netns: the pod's bridge is not there.
    assert!(!Path::new(&format!("/sys/class/net/{link}")).exists());
    // Without the remount, /sys of a netns thread still shows the root netns (why the variant exists).
    let l = link.clone();
    let plain = run_in_netns(&ns.path, move || Ok(Path::new(&format!("/sys/class/net/{l}")).exists())).unwrap();
    assert!(!plain);
}

#[test]
fn in_netns_switches_only_when_asked_and_a_thread_can_return_to_the_process_netns() {
    require_prereqs(&["ip"]);
    let dir = Path::new(DEFAULT_NETNS_DIR);
    let name = unique_name("tmns");
    let _c = Cleanup(name.clone());
    let created = create_netns(dir, &name, IfExists::Fail).unwrap();
    let pod_ino = ns_inode(&created.path);
    let root_ino = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    let here = || Ok(std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino());
    let me = std::thread::current().id();

    // Some(path): on a thread inside the pod netns; None: on the calling thread, in its netns.
    assert_eq!(in_netns(Some(&created.path), here).unwrap(), pod_ino);
    let (ino, tid) = in_netns(None, move || Ok((here()?, std::thread::current().id()))).unwrap();
    assert_eq!((ino, tid), (root_ino, me));

    // A thread inside the pod netns moves back to the process's (what nf_tables' closer thread does).
    let back = run_in_netns(&created.path, move || {
        let before = here()?;
        enter_process_netns()?;
        Ok((before, here()?))
    })
    .unwrap();
    assert_eq!(back, (pod_ino, root_ino));
    assert_eq!(sh("ip", &["netns", "pids", &name]).trim(), "");
    delete_netns(dir, &name).unwrap();
}

/// Issue 8 (defects 4 and 9): a plain file (a crash between creating the netns file and mounting onto it) and
/// a symlink (even to a live netns) are not namespaces; deleting either never follows the link, so the netns
/// behind a planted symlink stays mounted.
#[test]
fn plain_files_and_symlinks_are_no_netns_and_delete_never_follows_a_symlink() {
    require_prereqs(&["ip"]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("netns");
    let live = unique_name("tmnsl");
    let created = create_netns(&dir, &live, IfExists::Fail).unwrap();
    assert!(is_netns_mount(&created.path));

    let plain = unique_name("tmnsp");
    std::fs::write(dir.join(&plain), b"").unwrap();
    assert!(!is_netns_mount(&dir.join(&plain)), "a plain file is no netns");
    let link = unique_name("tmnss");
    std::os::unix::fs::symlink(&created.path, dir.join(&link)).unwrap();
    assert!(!is_netns_mount(&dir.join(&link)), "a symlink is never followed, even to a live netns");
    assert!(!is_netns_mount(&dir.join("missing")));
    assert_eq!(list_netns(&dir).unwrap(), vec![live.clone()]);

    delete_netns(&dir, &link).unwrap();
    assert!(std::fs::symlink_metadata(dir.join(&link)).is_err(), "the symlink itself is removed");
    assert!(is_netns_mount(&created.path), "the netns behind the symlink is still mounted");
    delete_netns(&dir, &plain).unwrap();
    assert!(!dir.join(&plain).exists());

    // A symlink where a netns is to be created is replaced (Reuse), never followed.
    std::os::unix::fs::symlink(&created.path, dir.join(&link)).unwrap();
    let again = create_netns(&dir, &link, IfExists::Reuse).unwrap();
    assert!(again.created, "a new netns, not the one behind the symlink");
    assert_ne!(ns_inode(&again.path), ns_inode(&created.path));
    assert!(is_netns_mount(&created.path));

    delete_netns(&dir, &link).unwrap();
    delete_netns(&dir, &live).unwrap();
    nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH).unwrap();
}

/// Waits (bounded) until `f` holds.
fn until(what: &str, mut f: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !f() {
        assert!(std::time::Instant::now() < end, "timed out waiting until {what}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// This process's fds on namespace files, as (fd, target) pairs (`net:[<inode>]`).
fn netns_fds() -> Vec<(String, String)> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let t = std::fs::read_link(e.path()).ok()?.to_string_lossy().into_owned();
            t.starts_with("net:[").then(|| (e.file_name().to_string_lossy().into_owned(), t))
        })
        .collect()
}

#[test]
fn a_pool_hands_out_fresh_namespaces_with_its_settings_refills_and_leaves_nothing_when_dropped() {
    require_prereqs(&["ip", "sysctl", "nsenter"]);
    // Its own netns dir, so names and counts are this test's alone.
    let tmp = tempfile::tempdir().unwrap();
    let dir_buf = tmp.path().join("netns");
    let dir = dir_buf.as_path();
    let before = netns_fds();
    let pool = NetnsPool::new(2, false).unwrap();
    until("the pool holds 2 spares", || pool.spare() == 2);
    // The spares: namespace fds that appeared, each on a namespace of its own (tests running alongside may open
    // namespace files too: those are never the pool's namespaces).
    let spares: Vec<_> = netns_fds().into_iter().filter(|f| !before.contains(f)).collect();
    assert!(spares.len() >= 2, "{spares:?}");
    let exec = |path: &Path, args: &[&str]| {
        let net = format!("--net={}", path.display());
        let mut a = vec![net.as_str()];
        a.extend_from_slice(args);
        sh("nsenter", &a)
    };

    // Two namespaces from the pool: distinct, mounted, fresh (only lo), with the pool's IPv6 setting.
    let settings = NetnsSettings { ipv6: false, ..NetnsSettings::default() };
    let pa = create_netns_from(dir, "a", &settings, Some(&pool)).unwrap().path;
    let pb = create_netns_from(dir, "b", &settings, Some(&pool)).unwrap().path;
    assert!(is_netns_mount(&pa) && is_netns_mount(&pb));
    assert_ne!(ns_inode(&pa), ns_inode(&pb));
    assert_ne!(ns_inode(&pa), std::fs::metadata("/proc/self/ns/net").unwrap().ino());
    for p in [&pa, &pb] {
        assert_eq!(exec(p, &["sysctl", "-n", "net.ipv6.conf.default.disable_ipv6"]).trim(), "1");
        let links = exec(p, &["ip", "-o", "link", "show"]);
        assert_eq!(links.lines().count(), 1, "only lo: {links}");
    }
    // The pool's namespaces are the ones it held: both inodes were among the spares' fds.
    for p in [&pa, &pb] {
        let target = format!("net:[{}]", ns_inode(p));
        assert!(spares.iter().any(|(_, t)| *t == target), "{target} was not a spare: {spares:?}");
    }
    // A namespace with another IPv6 setting is made on the spot (not from the pool).
    let pc = create_netns_from(dir, "c", &NetnsSettings::default(), Some(&pool)).unwrap().path;
    assert_eq!(exec(&pc, &["sysctl", "-n", "net.ipv6.conf.default.disable_ipv6"]).trim(), "0");
    let target = format!("net:[{}]", ns_inode(&pc));
    assert!(!spares.iter().any(|(_, t)| *t == target));
    until("the pool is full again", || pool.spare() == 2);
    assert_eq!(pool.last_error(), None);
    // The spares are mounted nowhere: the dir lists exactly the three created by name.
    assert_eq!(list_netns(dir).unwrap(), vec!["a", "b", "c"]);
    delete_netns(dir, "a").unwrap();
    assert_eq!(list_netns(dir).unwrap(), vec!["b", "c"]);
    // Dropping the pool stops its thread and closes its spares (the refills' too).
    // (Other tests' short-lived namespace fds may be among those counted here: they close by themselves soon.)
    let held: Vec<_> = netns_fds().into_iter().filter(|f| !before.contains(f)).collect();
    drop(pool);
    until("no spare is left open", || {
        let after = netns_fds();
        held.iter().all(|f| !after.contains(f))
    });
    for n in ["b", "c"] {
        delete_netns(dir, n).unwrap();
    }
    let _ = umount2(dir, MntFlags::MNT_DETACH);
}
