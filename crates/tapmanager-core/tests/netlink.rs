//! Every link, address and route operation of NetlinkHandle, checked against what `ip` shows, inside
//! namespaces the test creates. Root only; the root netns is never touched.
mod common;

use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;

use common::{require_prereqs, TestNetns};
use tapmanager_core::netlink::{format_mac, parse_mac, rtprot, rtscope, NetlinkHandle, RouteSpec};
use tapmanager_core::netns::open_netns;
use tapmanager_core::ErrorCode;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn open(ns: &TestNetns) -> NetlinkHandle {
    NetlinkHandle::open(Some(&PathBuf::from(ns.path()))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_create_list_set_and_delete() {
    require_prereqs(&["ip"]);
    let pod = TestNetns::new("tmnl");
    let node = TestNetns::new("tmnl");
    let nl = open(&pod);

    // list: a fresh netns has lo (index 1, no kind, up because the helper set it up).
    let links = nl.links().await.unwrap();
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!((links[0].name.as_str(), links[0].index, links[0].kind.as_deref(), links[0].up), ("lo", 1, None, true));

    // bridge with MTU 9000 and ageing time 0.
    let br = nl.create_bridge("br0", Some(9000)).await.unwrap();
    let info = nl.link_by_name("br0").await.unwrap();
    assert_eq!((info.index, info.kind.as_deref(), info.mtu, info.up), (br, Some("bridge"), 9000, false));
    let shown = pod.exec("ip", &["-d", "link", "show", "br0"]);
    assert!(shown.contains("mtu 9000") && shown.contains("ageing_time 0 "), "{shown}");
    assert_eq!(nl.create_bridge("br0", None).await.unwrap_err().code, ErrorCode::Exists);

    // veth pair in the pod, and one whose peer is created directly in the node netns.
    let v = nl.create_veth("va", "vb", None).await.unwrap();
    assert_eq!(nl.link_by_name("vb").await.unwrap().kind.as_deref(), Some("veth"));
    let node_fd = open_netns(&PathBuf::from(node.path())).unwrap();
    let e = nl.create_veth("eth0", "host0", Some(node_fd.as_fd())).await.unwrap();
    assert!(nl.link_by_name("host0").await.unwrap_err().code == ErrorCode::NotFound);
    assert!(node.exec("ip", &["link", "show", "host0"]).contains("host0@"));
    assert_eq!(nl.link_by_index(e).await.unwrap().name, "eth0");

    // up / down.
    nl.set_up(v).await.unwrap();
    assert!(nl.link_by_index(v).await.unwrap().up);
    assert!(pod.exec("ip", &["link", "show", "va"]).contains(",UP"));
    nl.set_down(v).await.unwrap();
    assert!(!nl.link_by_index(v).await.unwrap().up);

    // MAC, MTU, name.
    let mac = parse_mac("02:11:22:33:44:55").unwrap();
    nl.set_mac(v, mac).await.unwrap();
    assert_eq!(nl.link_by_index(v).await.unwrap().mac, Some(mac));
    assert!(pod.exec("ip", &["link", "show", "va"]).contains(&format_mac(&mac)));
    nl.set_mtu(v, 1400).await.unwrap();
    assert!(pod.exec("ip", &["link", "show", "va"]).contains("mtu 1400"));
    nl.set_name(v, "vrenamed").await.unwrap();
    assert_eq!(nl.link_by_index(v).await.unwrap().name, "vrenamed");
    assert_eq!(nl.link_by_name("va").await.unwrap_err().code, ErrorCode::NotFound);

    // master / nomaster.
    nl.set_master(v, br).await.unwrap();
    assert_eq!(nl.link_by_index(v).await.unwrap().master, Some(br));
    assert!(pod.exec("ip", &["link", "show", "vrenamed"]).contains("master br0"));
    nl.set_nomaster(v).await.unwrap();
    assert_eq!(nl.link_by_index(v).await.unwrap().master, None);
    // The kernel answers EINVAL for a master index that does not exist.
    assert_eq!(nl.set_master(v, 999_999).await.unwrap_err().code, ErrorCode::Invalid);

    // netns by fd: the link leaves the pod and appears in the node.
    let vb = nl.link_by_name("vb").await.unwrap().index;
    nl.set_netns(vb, node_fd.as_fd()).await.unwrap();
    assert_eq!(nl.link_by_name("vb").await.unwrap_err().code, ErrorCode::NotFound);
    assert!(node.exec("ip", &["link", "show", "vb"]).contains("vb@"));

    // delete: a veth takes its peer along; deleting again is NOT_FOUND.
    nl.delete_link(v).await.unwrap();
    assert!(!node.exec("ip", &["-o", "link", "show"]).contains("vb@"));
    assert_eq!(nl.delete_link(v).await.unwrap_err().code, ErrorCode::NotFound);
    nl.delete_link(br).await.unwrap();
    nl.delete_link(e).await.unwrap();
    let names: Vec<String> = nl.links().await.unwrap().into_iter().map(|l| l.name).collect();
    assert_eq!(names, vec!["lo".to_string()]);
    assert!(!node.exec("ip", &["-o", "link", "show"]).contains("host0"));

    // bad input.
    assert_eq!(nl.create_bridge("this-name-is-too-long", None).await.unwrap_err().code, ErrorCode::Invalid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_v4_and_v6() {
    require_prereqs(&["ip"]);
    let pod = TestNetns::new("tmnl");
    let nl = open(&pod);
    let br = nl.create_bridge("br0", None).await.unwrap();
    nl.add_address(br, ip("169.254.254.2"), 24).await.unwrap();
    nl.add_address(br, ip("fd00:1::2"), 64).await.unwrap();
    let shown = pod.exec("ip", &["addr", "show", "br0"]);
    assert!(shown.contains("inet 169.254.254.2/24 brd 169.254.254.255"), "{shown}");
    assert!(shown.contains("inet6 fd00:1::2/64"), "{shown}");

    let addrs = nl.addresses(Some(br)).await.unwrap();
    let v4 = addrs.iter().find(|a| a.address == ip("169.254.254.2")).unwrap();
    assert_eq!((v4.prefix_len, v4.index, v4.scope), (24, br, rtscope::UNIVERSE));
    assert!(addrs.iter().any(|a| a.address == ip("fd00:1::2") && a.prefix_len == 64));
    // Listing all includes lo's 127.0.0.1.
    assert!(nl.addresses(None).await.unwrap().iter().any(|a| a.address == ip("127.0.0.1") && a.index == 1));

    assert_eq!(nl.add_address(br, ip("169.254.254.2"), 24).await.unwrap_err().code, ErrorCode::Exists);
    assert_eq!(nl.add_address(br, ip("10.0.0.1"), 33).await.unwrap_err().code, ErrorCode::Invalid);

    nl.delete_address(br, ip("169.254.254.2"), 24).await.unwrap();
    nl.delete_address(br, ip("fd00:1::2"), 64).await.unwrap();
    assert!(nl.addresses(Some(br)).await.unwrap().iter().all(|a| !a.address.is_ipv4() && a.address != ip("fd00:1::2")));
    assert!(!pod.exec("ip", &["addr", "show", "br0"]).contains("169.254.254.2"));
    assert_eq!(nl.delete_address(br, ip("169.254.254.2"), 24).await.unwrap_err().code, ErrorCode::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_list_add_delete() {
    require_prereqs(&["ip"]);
    let pod = TestNetns::new("tmnl");
    let nl = open(&pod);
    let v = nl.create_veth("eth0", "peer0", None).await.unwrap();
    let p = nl.link_by_name("peer0").await.unwrap().index;
    nl.set_up(p).await.unwrap();
    nl.set_up(v).await.unwrap();
    nl.add_address(v, ip("10.1.90.5"), 24).await.unwrap();
    nl.add_address(v, ip("fd00:90::5"), 64).await.unwrap();

    // The kernel's subnet route: protocol kernel, scope link, no gateway.
    let routes = nl.routes().await.unwrap();
    let subnet = routes.iter().find(|r| r.dst == Some(ip("10.1.90.0"))).expect("kernel route");
    assert_eq!(
        (subnet.dst_len, subnet.protocol, subnet.scope, subnet.gateway, subnet.oif),
        (24, rtprot::KERNEL, rtscope::LINK, None, Some(v))
    );

    // Calico-style link-scope host route, a gateway route, a default route, an IPv6 route.
    let calico = RouteSpec { dst: Some(ip("169.254.1.1")), dst_len: 32, oif: Some(v), ..Default::default() };
    let net = RouteSpec {
        dst: Some(ip("10.10.42.0")),
        dst_len: 24,
        gateway: Some(ip("10.1.90.90")),
        oif: Some(v),
        ..Default::default()
    };
    let default = RouteSpec { gateway: Some(ip("10.1.90.1")), priority: Some(100), ..Default::default() };
    let v6 = RouteSpec {
        dst: Some(ip("fd01::")),
        dst_len: 64,
        gateway: Some(ip("fd00:90::1")),
        oif: Some(v),
        protocol: Some(rtprot::STATIC),
        ..Default::default()
    };
    for r in [&calico, &net, &default, &v6] {
        nl.add_route(r).await.unwrap();
    }
    let shown = pod.exec("ip", &["route", "show"]);
    assert!(shown.contains("169.254.1.1 dev eth0 scope link"), "{shown}");
    assert!(shown.contains("10.10.42.0/24 via 10.1.90.90 dev eth0 \n"), "{shown}");
    assert!(shown.contains("default via 10.1.90.1 dev eth0 metric 100"), "{shown}");
    assert!(pod.exec("ip", &["-6", "route", "show"]).contains("fd01::/64 via fd00:90::1 dev eth0 proto static"));

    let routes = nl.routes().await.unwrap();
    let c = routes.iter().find(|r| r.dst == Some(ip("169.254.1.1"))).unwrap();
    assert_eq!((c.dst_len, c.scope, c.gateway, c.protocol), (32, rtscope::LINK, None, rtprot::BOOT));
    let d = routes.iter().find(|r| r.dst.is_none() && !r.ipv6).unwrap();
    assert_eq!(
        (d.dst_len, d.gateway, d.oif, d.priority, d.scope),
        (0, Some(ip("10.1.90.1")), Some(v), Some(100), rtscope::UNIVERSE)
    );
    assert!(routes.iter().any(|r| r.ipv6 && r.dst == Some(ip("fd01::")) && r.protocol == rtprot::STATIC));

    assert_eq!(nl.add_route(&net).await.unwrap_err().code, ErrorCode::Exists);
    // A gateway that is not reachable is refused by the kernel (ENETUNREACH).
    let unreachable =
        RouteSpec { dst: Some(ip("10.20.0.0")), dst_len: 16, gateway: Some(ip("192.0.2.1")), ..Default::default() };
    assert!(nl.add_route(&unreachable).await.is_err());

    for r in [&calico, &net, &default, &v6] {
        nl.delete_route(r).await.unwrap();
    }
    let shown = pod.exec("ip", &["route", "show"]);
    assert_eq!(shown.trim(), "10.1.90.0/24 dev eth0 proto kernel scope link src 10.1.90.5");
    assert_eq!(nl.delete_route(&net).await.unwrap_err().code, ErrorCode::NotFound);
    assert_eq!(nl.add_route(&RouteSpec::default()).await.unwrap_err().code, ErrorCode::Invalid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_links_removes_exactly_the_given_links_in_one_batch() {
    require_prereqs(&["ip"]);
    let pod = TestNetns::new("tmnl");
    let nl = open(&pod);
    let br = nl.create_bridge("br0", None).await.unwrap();
    tapmanager_core::tap::create_tap(Some(&PathBuf::from(pod.path())), "tap0", &Default::default()).unwrap();
    let tap = nl.link_by_name("tap0").await.unwrap().index;
    nl.set_master(tap, br).await.unwrap();
    let keep = nl.create_veth("eth0", "peer0", None).await.unwrap();
    nl.set_master(keep, br).await.unwrap();

    // A missing link: nothing is deleted and the others' groups are restored.
    assert_eq!(nl.delete_links(&[br, tap, 999_999]).await.unwrap_err().code, ErrorCode::NotFound);
    for i in [br, tap, keep] {
        assert_eq!(nl.link_by_index(i).await.unwrap().group, 0);
    }

    nl.delete_links(&[br, tap]).await.unwrap();
    let mut names: Vec<String> = nl.links().await.unwrap().into_iter().map(|l| l.name).collect();
    names.sort();
    assert_eq!(names, vec!["eth0", "lo", "peer0"]);
    let eth = nl.link_by_index(keep).await.unwrap();
    assert_eq!((eth.master, eth.group), (None, 0));
    assert!(pod.exec("ip", &["-d", "link", "show", "eth0"]).contains("group default"));
    nl.delete_links(&[]).await.unwrap();
    nl.delete_links(&[keep]).await.unwrap();
    assert_eq!(nl.links().await.unwrap().len(), 1);
}
