//! The DHCP server against real clients (dhcpcd, busybox udhcpc) and crafted packets, as root, in
//! namespaces made by the tests (see `dhcp_util`).

mod common;
mod dhcp_util;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use common::require_prereqs;
use dhcp_util::*;
use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Encodable, Encoder};

#[test]
fn dhcpcd_gets_classless_routes_mtu_dns_and_search() {
    require_prereqs(&["ip", "dhcpcd", "unshare", "timeout"]);
    let t = Topology::new();
    let rt = runtime();
    let server = t.start(&rt, &csn(&t.pod.path(), CLASSLESS_ROUTES, DNS_SEARCH, 9000));
    let out = t.dhcpcd(&[]);
    assert_eq!(line(&out, "new_ip_address"), Some("'10.1.90.5'"), "{out}");
    assert_eq!(line(&out, "new_subnet_mask"), Some("'255.255.255.0'"), "{out}");
    assert_eq!(
        line(&out, "new_classless_static_routes"),
        Some("'10.10.42.0/24 10.1.90.90 0.0.0.0/0 10.1.90.1'"),
        "{out}"
    );
    assert_eq!(line(&out, "new_routers"), None, "option 3 is left out when 121 is sent: {out}");
    assert_eq!(line(&out, "new_interface_mtu"), Some("'9000'"), "{out}");
    assert_eq!(line(&out, "new_dhcp_server_identifier"), Some("'169.254.254.2'"), "{out}");
    assert_eq!(line(&out, "new_dhcp_lease_time"), Some("'86400'"), "{out}");
    assert_eq!(line(&out, "new_dhcp_renewal_time"), Some("'43200'"), "{out}");
    assert_eq!(line(&out, "new_dhcp_rebinding_time"), Some("'64800'"), "{out}");
    assert_eq!(line(&out, "new_domain_name_servers"), Some("'10.96.0.10 10.96.0.11'"), "{out}");
    assert_eq!(line(&out, "new_domain_search"), Some("'default.svc.cluster.local cluster.local'"), "{out}");
    assert!(wait_for(Duration::from_secs(5), || server.stats().offers >= 1), "{:?}", server.stats());
    rt.block_on(server.stop());
}

#[test]
fn dhcpcd_gets_default_route_as_router_and_default_dns() {
    require_prereqs(&["ip", "dhcpcd", "unshare", "timeout"]);
    let t = Topology::new();
    let rt = runtime();
    let server = t.start(&rt, &csn(&t.pod.path(), DEFAULT_ROUTE, "{}", 1500));
    let out = t.dhcpcd(&[]);
    assert_eq!(line(&out, "new_ip_address"), Some("'10.1.90.5'"), "{out}");
    assert_eq!(line(&out, "new_routers"), Some("'10.1.90.1'"), "{out}");
    assert_eq!(line(&out, "new_classless_static_routes"), None, "{out}");
    assert_eq!(line(&out, "new_interface_mtu"), Some("'1500'"), "{out}");
    assert_eq!(line(&out, "new_domain_name_servers"), Some("'8.8.8.8'"), "{out}");
    assert_eq!(line(&out, "new_domain_search"), None, "{out}");
    rt.block_on(server.stop());
}

#[test]
fn udhcpc_gets_classless_routes_mtu_dns_and_search() {
    require_prereqs(&["ip", "busybox", "timeout"]);
    let t = Topology::new();
    let rt = runtime();
    let server = t.start(&rt, &csn(&t.pod.path(), CLASSLESS_ROUTES, DNS_SEARCH, 9000));
    let out = t.udhcpc();
    assert_eq!(line(&out, "ip"), Some("10.1.90.5"), "{out}");
    assert_eq!(line(&out, "subnet"), Some("255.255.255.0"), "{out}");
    assert_eq!(line(&out, "staticroutes"), Some("10.10.42.0/24 10.1.90.90 0.0.0.0/0 10.1.90.1"), "{out}");
    assert_eq!(line(&out, "router"), Some(""), "{out}");
    assert_eq!(line(&out, "mtu"), Some("9000"), "{out}");
    assert_eq!(line(&out, "dns"), Some("10.96.0.10 10.96.0.11"), "{out}");
    assert_eq!(line(&out, "search"), Some("default.svc.cluster.local cluster.local"), "{out}");
    assert_eq!(line(&out, "serverid"), Some("169.254.254.2"), "{out}");
    assert_eq!(line(&out, "lease"), Some("86400"), "{out}");
    let counted = wait_for(Duration::from_secs(5), || server.stats().offers >= 1 && server.stats().acks >= 1);
    assert!(counted, "{:?}", server.stats());
    rt.block_on(server.stop());
}

#[test]
fn udhcpc_gets_default_route_as_router() {
    require_prereqs(&["ip", "busybox", "timeout"]);
    let t = Topology::new();
    let rt = runtime();
    let server = t.start(&rt, &csn(&t.pod.path(), DEFAULT_ROUTE, "{}", 1500));
    let out = t.udhcpc();
    assert_eq!(line(&out, "ip"), Some("10.1.90.5"), "{out}");
    assert_eq!(line(&out, "router"), Some("10.1.90.1"), "{out}");
    assert_eq!(line(&out, "staticroutes"), Some(""), "{out}");
    assert_eq!(line(&out, "dns"), Some("8.8.8.8"), "{out}");
    assert_eq!(line(&out, "mtu"), Some("1500"), "{out}");
    rt.block_on(server.stop());
}

#[test]
fn request_of_another_address_gets_nak_and_ours_gets_ack() {
    require_prereqs(&["ip"]);
    let t = Topology::new();
    let rt = runtime();
    let server = t.start(&rt, &csn(&t.pod.path(), DEFAULT_ROUTE, "{}", 1500));
    let sock = t.raw_client();
    let sid = DhcpOption::ServerIdentifier(Ipv4Addr::new(169, 254, 254, 2));
    let req = craft(
        MessageType::Request,
        &VM_MAC_BYTES,
        77,
        vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 1, 90, 77))],
    );
    let nak = exchange(&sock, &req, 77, Duration::from_secs(10)).expect("a NAK");
    assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(nak.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(nak.opts().get(OptionCode::ServerIdentifier), Some(&sid));
    let req = craft(
        MessageType::Request,
        &VM_MAC_BYTES,
        78,
        vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 1, 90, 5)), sid],
    );
    let ack = exchange(&sock, &req, 78, Duration::from_secs(10)).expect("an ACK");
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), Ipv4Addr::new(10, 1, 90, 5));
    assert!(wait_for(Duration::from_secs(5), || server.stats().acks == 1), "{:?}", server.stats());
    assert_eq!(server.stats().naks, 1);
    rt.block_on(server.stop());
}

#[test]
fn unknown_mac_and_garbage_are_ignored_and_the_server_keeps_serving() {
    require_prereqs(&["ip"]);
    let t = Topology::new();
    let rt = runtime();
    let server = t.start(&rt, &csn(&t.pod.path(), DEFAULT_ROUTE, "{}", 1500));
    let sock = t.raw_client();
    let unknown = craft(MessageType::Discover, &[0x02, 0, 0, 0, 0, 0x99], 5, vec![]);
    assert!(exchange(&sock, &unknown, 5, Duration::from_millis(1500)).is_none(), "no reply to an unknown MAC");
    // garbage: short, wrong op, hlen 200, truncated options, random bytes, FQDN option of length 1
    let good = craft(MessageType::Discover, &VM_MAC_BYTES, 6, vec![]);
    let mut hlen = good.clone();
    hlen[2] = 200;
    let mut fqdn = good.clone();
    let end = fqdn.len() - 1;
    fqdn.splice(end..end, [81u8, 1, 0]);
    let junk: Vec<Vec<u8>> = vec![
        vec![],
        vec![1; 10],
        vec![2; 300],
        hlen,
        good[..241].to_vec(),
        (0..=255u8).cycle().take(1000).collect(),
        fqdn,
    ];
    for j in &junk {
        sock.send_to(j, SocketAddrV4::new(Ipv4Addr::BROADCAST, 67)).unwrap();
    }
    let offer = exchange(&sock, &good, 6, Duration::from_secs(10)).expect("still serving after garbage");
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 1, 90, 5));
    // The FQDN packet is a valid DISCOVER once screened: it got an OFFER too (xid 6). Wait for the count.
    wait_for(Duration::from_secs(5), || server.stats().ignored >= 6);
    let s = server.stats();
    assert_eq!(s.errors, 0, "no handler fault: {s:?}");
    assert!(s.ignored >= 6, "unknown MAC + 5 garbage datagrams (the empty one may not count): {s:?}");
    assert!(server.is_running());
    rt.block_on(server.stop());
}

#[test]
fn no_mtu_means_no_answer() {
    require_prereqs(&["ip"]);
    let t = Topology::new();
    let rt = runtime();
    let server = t.start(&rt, &csn(&t.pod.path(), DEFAULT_ROUTE, "{}", 0));
    let sock = t.raw_client();
    let d = craft(MessageType::Discover, &VM_MAC_BYTES, 9, vec![]);
    assert!(exchange(&sock, &d, 9, Duration::from_millis(1500)).is_none());
    assert_eq!(server.stats().offers, 0);
    rt.block_on(server.stop());
}

#[test]
fn two_pods_are_independent() {
    require_prereqs(&["ip"]);
    let a = Topology::new();
    let b = Topology::new();
    let rt = runtime();
    let sa = a.start(&rt, &csn(&a.pod.path(), DEFAULT_ROUTE, "{}", 1500));
    let sb = b.start(&rt, &csn(&b.pod.path(), DEFAULT_ROUTE, "{}", 1500));
    let (ca, cb) = (a.raw_client(), b.raw_client());
    // flood pod a with garbage, then stop it: pod b keeps answering
    for _ in 0..200 {
        ca.send_to(&[0xff; 600], SocketAddrV4::new(Ipv4Addr::BROADCAST, 67)).unwrap();
    }
    rt.block_on(sa.stop());
    let d = craft(MessageType::Discover, &VM_MAC_BYTES, 31, vec![]);
    assert!(exchange(&cb, &d, 31, Duration::from_secs(10)).is_some());
    let d = craft(MessageType::Discover, &VM_MAC_BYTES, 32, vec![]);
    assert!(exchange(&ca, &d, 32, Duration::from_millis(300)).is_none());
    assert!(wait_for(Duration::from_secs(5), || sb.stats().offers == 1), "{:?}", sb.stats());
    rt.block_on(sb.stop());
}

#[test]
fn dhcpcd_requesting_an_address_that_is_not_ours_gets_nak_then_leases_ours() {
    require_prereqs(&["ip", "dhcpcd", "unshare", "timeout"]);
    let t = Topology::new();
    let rt = runtime();
    let server = t.start(&rt, &csn(&t.pod.path(), DEFAULT_ROUTE, "{}", 1500));
    // A lease dhcpcd "remembers" for 10.1.90.77: it starts by requesting it again.
    let mut ack = Message::default();
    ack.set_opcode(Opcode::BootReply).set_chaddr(&VM_MAC_BYTES).set_yiaddr(Ipv4Addr::new(10, 1, 90, 77));
    for o in [
        DhcpOption::MessageType(MessageType::Ack),
        DhcpOption::ServerIdentifier(Ipv4Addr::new(169, 254, 254, 2)),
        DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)),
        DhcpOption::AddressLeaseTime(86400),
    ] {
        ack.opts_mut().insert(o);
    }
    let mut lease = Vec::new();
    ack.encode(&mut Encoder::new(&mut lease)).unwrap();
    let (out, err) = t.dhcpcd_with_lease(&[], Some(&lease));
    // (dhcpcd 9.4.1 says "rebinding lease of 10.1.90.77": a REQUEST with ciaddr 10.1.90.77)
    assert!(err.contains("lease of 10.1.90.77"), "dhcpcd re-requested the old lease: {err}");
    assert!(err.contains("NAK: from 169.254.254.2"), "dhcpcd got our NAK: {err}");
    assert!(wait_for(Duration::from_secs(5), || server.stats().naks == 1), "{:?}", server.stats());
    assert_eq!(line(&out, "new_ip_address"), Some("'10.1.90.5'"), "then it leased ours: {out}");
    rt.block_on(server.stop());
}
