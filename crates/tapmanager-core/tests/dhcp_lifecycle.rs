//! DHCP server lifecycle: listening when `start` returns, `stop` releases the socket, errors leak nothing.
//! One test function, so that counting this process's fds is not disturbed by other tests running in parallel.

mod common;
mod dhcp_util;

use std::time::Duration;

use common::{require_prereqs, unique_name};
use dhcp_util::*;
use dhcproto::v4::MessageType;
use tapmanager_core::dhcp::{DhcpConfig, DhcpServer};
use tapmanager_core::ErrorCode;

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn lifecycle() {
    require_prereqs(&["ip", "ss"]);
    listening_when_start_returns_and_stop_releases_the_socket();
    bad_netns_or_bridge_is_a_clear_error_without_leaks();
}

fn listening_when_start_returns_and_stop_releases_the_socket() {
    let t = Topology::new();
    let rt = runtime();
    let net = csn(&t.pod.path(), DEFAULT_ROUTE, "{}", 1500);
    let sock = t.raw_client();
    let fds_before = fd_count();
    for round in 0..5u32 {
        let server = t.start(&rt, &net);
        // no sleep: the first DISCOVER right after start is answered
        let d = craft(MessageType::Discover, &VM_MAC_BYTES, 100 + round, vec![]);
        let offer = exchange(&sock, &d, 100 + round, Duration::from_secs(10)).expect("offer right after start");
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        // a second server on the same netns is refused while the first runs
        let e = rt.block_on(DhcpServer::start(t.pod.path(), DhcpConfig::from_csn(&net).unwrap())).unwrap_err();
        assert_eq!(e.code, ErrorCode::Exists, "{}", e.message);
        rt.block_on(server.stop());
        // stopped: port 67 is free in the pod netns (ss shows no listener) and nothing answers
        let ss = t.pod.exec("ss", &["-uanp", "sport", "= :67"]);
        assert!(!ss.contains(":67"), "socket released: {ss}");
    }
    let d = craft(MessageType::Discover, &VM_MAC_BYTES, 999, vec![]);
    assert!(exchange(&sock, &d, 999, Duration::from_millis(500)).is_none(), "stopped server answers nothing");
    drop(sock);
    let fds_after = fd_count();
    assert!(fds_after < fds_before, "no fd leaked: {fds_before} -> {fds_after}");
}

fn bad_netns_or_bridge_is_a_clear_error_without_leaks() {
    let t = Topology::new();
    let rt = runtime();
    let net = csn(&t.pod.path(), DEFAULT_ROUTE, "{}", 1500);
    let fds_before = fd_count();
    let missing = format!("/var/run/netns/{}", unique_name("nope"));
    let e = rt.block_on(DhcpServer::start(&missing, DhcpConfig::from_csn(&net).unwrap())).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound, "{}", e.message);
    // br0 exists, br7 does not: the br0 socket made first must be closed again
    let cfg = DhcpConfig::from_csn_with_bridges(&net, &[("br0".into(), 0), ("br7".into(), 0)]).unwrap();
    let e = rt.block_on(DhcpServer::start(t.pod.path(), cfg)).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound, "{}", e.message);
    assert!(e.message.contains("br7"), "{}", e.message);
    assert_eq!(fd_count(), fds_before, "no fd leaked");
    // and br0 is free: a proper start works
    let server = t.start(&rt, &net);
    rt.block_on(server.stop());
}
