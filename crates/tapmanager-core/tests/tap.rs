//! Taps through /dev/net/tun inside a test netns: persistent creation with MTU, single- and multi-queue
//! opens, vnet header, busy detection, errors without leaked fds, deletion. Root only.
mod common;

use std::os::fd::AsRawFd;
use std::path::PathBuf;

use common::{require_prereqs, TestNetns};
use tapmanager_core::netlink::NetlinkHandle;
use tapmanager_core::tap::{
    create_tap, delete_tap, drain_tap_fd, open_tap, tap_fd_info, TapCreateOptions, TapOpenOptions,
};
use tapmanager_core::ErrorCode;

/// The tests run one at a time: two of them count the whole process's fds.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn single_queue_tap_create_open_busy_and_delete() {
    require_prereqs(&["ip"]);
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pod = TestNetns::new("tmtap");
    let ns = PathBuf::from(pod.path());
    create_tap(Some(&ns), "tap0", &TapCreateOptions { mtu: Some(9000), multi_queue: false, up: true }).unwrap();
    let shown = pod.exec("ip", &["-d", "link", "show", "tap0"]);
    assert!(
        shown.contains("mtu 9000")
            && shown.contains(",UP")
            && shown.contains("tun type tap pi off vnet_hdr off persist on"),
        "{shown}"
    );
    // Created in the pod netns only: the test's own thread (root netns) has no such link.
    let rootns = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let podns =
        tapmanager_core::netns::run_in_netns(&ns, || Ok(std::fs::read_link("/proc/thread-self/ns/net").unwrap()))
            .unwrap();
    assert_ne!(rootns, podns);
    let idx_in_pod =
        tapmanager_core::netns::run_in_netns(&ns, || Ok(nix::net::if_::if_nametoindex("tap0").unwrap())).unwrap();
    assert!(pod.exec("ip", &["-o", "link", "show"]).contains(&format!("{idx_in_pod}: tap0:")));
    assert_eq!(create_tap(Some(&ns), "tap0", &TapCreateOptions::default()).unwrap_err().code, ErrorCode::Exists);

    let before = fd_count();
    let fds = open_tap(Some(&ns), "tap0", &TapOpenOptions::default()).unwrap();
    assert_eq!(fds.len(), 1);
    let info = tap_fd_info(fds[0].as_raw_fd()).unwrap();
    assert_eq!((info.name.as_str(), info.persistent, info.multi_queue, info.vnet_hdr), ("tap0", true, false, false));
    // Attached: the carrier is up.
    assert!(pod.exec("ip", &["link", "show", "tap0"]).contains("LOWER_UP"));

    // A second open while the first fd (the "VM") holds it: busy, distinctly, and no fd leaks.
    let with_one = fd_count();
    let err = open_tap(Some(&ns), "tap0", &TapOpenOptions::default()).unwrap_err();
    assert_eq!(err.code, ErrorCode::Busy, "{err}");
    assert_eq!(fd_count(), with_one);
    // Deleting through the tun device is refused while held; the tap survives.
    assert_eq!(delete_tap(Some(&ns), "tap0").unwrap_err().code, ErrorCode::Busy);
    drop(fds);
    assert_eq!(fd_count(), before);

    // Released: it opens again, now with a vnet header.
    let fds = open_tap(Some(&ns), "tap0", &TapOpenOptions { vnet_hdr: true, queues: 1 }).unwrap();
    assert!(tap_fd_info(fds[0].as_raw_fd()).unwrap().vnet_hdr);
    assert!(pod.exec("ip", &["-d", "link", "show", "tap0"]).contains("vnet_hdr on"));
    // A single-queue tap cannot be opened multi-queue.
    assert_eq!(
        open_tap(Some(&ns), "tap0", &TapOpenOptions { vnet_hdr: false, queues: 2 }).unwrap_err().code,
        ErrorCode::Invalid
    );
    drop(fds);

    delete_tap(Some(&ns), "tap0").unwrap();
    assert!(!pod.exec("ip", &["-o", "link", "show"]).contains("tap0"));
    delete_tap(Some(&ns), "tap0").unwrap(); // idempotent
    assert_eq!(fd_count(), before);
}

#[test]
fn multi_queue_tap_gives_one_fd_per_queue() {
    require_prereqs(&["ip"]);
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pod = TestNetns::new("tmtap");
    let ns = PathBuf::from(pod.path());
    create_tap(Some(&ns), "mq0", &TapCreateOptions { mtu: None, multi_queue: true, up: false }).unwrap();
    assert!(pod.exec("ip", &["-d", "link", "show", "mq0"]).contains("multi_queue"));
    let fds = open_tap(Some(&ns), "mq0", &TapOpenOptions { vnet_hdr: true, queues: 4 }).unwrap();
    assert_eq!(fds.len(), 4);
    let mut raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    raw.dedup();
    assert_eq!(raw.len(), 4);
    for fd in &fds {
        let info = tap_fd_info(fd.as_raw_fd()).unwrap();
        assert_eq!((info.name.as_str(), info.multi_queue, info.vnet_hdr), ("mq0", true, true));
    }
    // Multi-queue taps are not exclusive: more queues can attach; a single-queue open is refused.
    let more = open_tap(Some(&ns), "mq0", &TapOpenOptions { vnet_hdr: true, queues: 2 }).unwrap();
    assert_eq!(more.len(), 2);
    assert_eq!(open_tap(Some(&ns), "mq0", &TapOpenOptions::default()).unwrap_err().code, ErrorCode::Invalid);
    assert_eq!(
        open_tap(Some(&ns), "mq0", &TapOpenOptions { vnet_hdr: false, queues: 0 }).unwrap_err().code,
        ErrorCode::Invalid
    );
    drop(more);
    drop(fds);
    delete_tap(Some(&ns), "mq0").unwrap();
    assert!(!pod.exec("ip", &["-o", "link", "show"]).contains("mq0"));
}

#[test]
fn errors_are_clear_and_netlink_sees_taps() {
    require_prereqs(&["ip"]);
    // The runtime is built and dropped while the guard is held: its own fds never show in another test's count.
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let pod = TestNetns::new("tmtap");
        let ns = PathBuf::from(pod.path());
        let before = fd_count();
        assert_eq!(open_tap(Some(&ns), "nope0", &TapOpenOptions::default()).unwrap_err().code, ErrorCode::NotFound);
        // A missing tap is not created by the open.
        assert!(!pod.exec("ip", &["-o", "link", "show"]).contains("nope0"));
        pod.exec("ip", &["link", "add", "br0", "type", "bridge"]);
        let err = open_tap(Some(&ns), "br0", &TapOpenOptions::default()).unwrap_err();
        assert_eq!(err.code, ErrorCode::Invalid, "{err}");
        assert_eq!(create_tap(Some(&ns), "br0", &TapCreateOptions::default()).unwrap_err().code, ErrorCode::Exists);
        assert_eq!(
            create_tap(Some(&ns), "bad name", &TapCreateOptions::default()).unwrap_err().code,
            ErrorCode::Invalid
        );
        // An MTU the tap refuses leaves no tap behind.
        let err =
            create_tap(Some(&ns), "tapbig", &TapCreateOptions { mtu: Some(70000), multi_queue: false, up: false })
                .unwrap_err();
        assert_eq!(err.code, ErrorCode::Invalid, "{err}");
        assert!(!pod.exec("ip", &["-o", "link", "show"]).contains("tapbig"));
        assert_eq!(fd_count(), before);

        // netlink sees a tap as kind "tun" and can delete one even while a VM holds it.
        create_tap(Some(&ns), "tap1", &TapCreateOptions::default()).unwrap();
        let held = open_tap(Some(&ns), "tap1", &TapOpenOptions::default()).unwrap();
        let nl = NetlinkHandle::open(Some(&ns)).unwrap();
        let link = nl.link_by_name("tap1").await.unwrap();
        assert_eq!(link.kind.as_deref(), Some("tun"));
        nl.delete_link(link.index).await.unwrap();
        assert_eq!(nl.link_by_name("tap1").await.unwrap_err().code, ErrorCode::NotFound);
        drop(held);
    })
}

/// Issue 8 (defect 12): the frames queued on an unread tap are discarded by `drain_tap_fd` without blocking,
/// and the fd's blocking mode is put back.
#[test]
fn drain_discards_the_queued_frames_without_blocking() {
    require_prereqs(&["ip", "/usr/bin/python3"]);
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pod = TestNetns::new("tmdr");
    let ns = PathBuf::from(pod.path());
    let name = "tmdrain0";
    create_tap(Some(&ns), name, &TapCreateOptions { mtu: None, multi_queue: false, up: true }).unwrap();
    let fds = open_tap(Some(&ns), name, &TapOpenOptions { vnet_hdr: false, queues: 1 }).unwrap();
    let fd = fds[0].as_raw_fd();
    // Nothing queued: returns at once with 0.
    assert_eq!(drain_tap_fd(fd, 4096).unwrap(), 0);
    // Queue 20 frames: UDP broadcasts sent out of the tap, which no one reads.
    pod.exec("ip", &["addr", "add", "10.123.0.1/24", "dev", name]);
    pod.exec(
        "/usr/bin/python3",
        &[
            "-c",
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.setsockopt(socket.SOL_SOCKET,socket.SO_BROADCAST,1)\ns.setsockopt(socket.SOL_SOCKET,socket.SO_BINDTODEVICE,b'tmdrain0')\nfor i in range(20): s.sendto(b'x'*64,('10.123.0.255',9))",
        ],
    );
    let queued = drain_tap_fd(fd, 4096).unwrap();
    assert!(queued >= 20, "drained {queued} frames");
    assert_eq!(drain_tap_fd(fd, 4096).unwrap(), 0, "the queue is empty after a drain");
    // SAFETY: F_GETFL on an fd we own.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    assert_eq!(fl & libc::O_NONBLOCK, 0, "the fd is blocking again");
    assert!(drain_tap_fd(-1, 1).is_err());
    drop(fds);
    delete_tap(Some(&ns), name).unwrap();
}
