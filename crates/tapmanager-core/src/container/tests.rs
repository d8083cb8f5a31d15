//! Unit tests of the container-side logic over the in-memory [`FakeNet`].

use std::net::Ipv4Addr;

use super::fake::FakeNet;
use super::fix::CalicoOptions;
use super::setup::*;
use crate::error::ErrorCode;
use crate::netlink::VfConfig;
use crate::sriov::VFIO_DRIVER;
use crate::types::{CniResult, InterfaceType, MacAddr};

const NS: &str = "/var/run/netns/pod1";
const ETH0_MAC: [u8; 6] = [0x42, 0xa4, 0xa6, 0x22, 0x80, 0x2e];
const ETH1_MAC: [u8; 6] = [0x42, 0xa4, 0xa6, 0x22, 0x80, 0x3f];

fn result(json: &str) -> CniResult {
    serde_json::from_str(json).expect("result JSON")
}

/// What the bridge plugin leaves: eth0 10.1.90.5/24, default route via 10.1.90.1 and 10.10.42.0/24 via .90.
fn bridge_pod(mtu: u32) -> (FakeNet, CniResult) {
    let mut net = FakeNet::new();
    net.add_link("eth0", ETH0_MAC, mtu, Some("veth"));
    net.plugin_addr("eth0", "10.1.90.5/24");
    net.plugin_route("eth0", "0.0.0.0/0", Some("10.1.90.1"));
    net.plugin_route("eth0", "10.10.42.0/24", Some("10.1.90.90"));
    let r = result(
        r#"{"interfaces":[{"name":"cni0","mac":"0a:58:0a:01:5a:01"},{"name":"veth1234","mac":"0a:58:0a:01:5a:02"},
            {"name":"eth0","mac":"42:a4:a6:22:80:2e","sandbox":"/var/run/netns/pod1"}],
           "ips":[{"version":"4","interface":2,"address":"10.1.90.5/24","gateway":"10.1.90.1"}],
           "routes":[{"dst":"0.0.0.0/0"},{"dst":"10.10.42.0/24","gw":"10.1.90.90"}],"dns":{}}"#,
    );
    (net, r)
}

fn opts() -> SetupOptions {
    SetupOptions::default()
}

/// Links (by name, without indexes), addresses and routes (by link name), sorted: a netns as `ip` shows it.
fn view(net: &FakeNet) -> (Vec<String>, Vec<String>, Vec<String>) {
    let name = |i: Option<u32>| i.map(|i| net.links.iter().find(|l| l.index == i).unwrap().name.clone());
    let mut links: Vec<String> = net
        .links
        .iter()
        .map(|l| format!("{} {} mtu {} up {} master {:?}", l.name, MacAddr(l.mac), l.mtu, l.up, name(l.master)))
        .collect();
    let mut addrs: Vec<String> =
        net.addrs.iter().map(|a| format!("{:?} {} brd {:?}", name(Some(a.link)), a.net, a.broadcast)).collect();
    let mut routes: Vec<String> = net.routes.iter().map(|r| format!("{:?} dev {:?}", Route2(r), name(r.oif))).collect();
    links.sort();
    addrs.sort();
    routes.sort();
    (links, addrs, routes)
}

struct Route2<'a>(&'a super::ops::Route);
impl std::fmt::Debug for Route2<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.0;
        write!(
            f,
            "{} via {:?} proto {} scope {} src {:?} metric {:?}",
            r.dst, r.gateway, r.protocol, r.scope, r.prefsrc, r.priority
        )
    }
}

#[test]
fn setup_builds_mac_swap_tap_bridge_isolation_and_teardown_restores_everything() {
    let (mut net, r) = bridge_pod(9000);
    let before = view(&net);
    let out = setup(&mut net, NS, r.clone(), &opts()).unwrap();

    assert_eq!(out.fds.len(), 1);
    let d = &out.csn.interfaces[0];
    assert_eq!(
        (d.kind, d.name.as_str(), d.hardware_addr, d.mtu, d.vlan_id),
        (InterfaceType::Tap, "eth0", Some(MacAddr(ETH0_MAC)), 9000, 0)
    );
    assert_eq!(out.csn.ns_path, NS);
    assert_eq!(out.csn.result, r, "a correct result is kept as it is");

    let eth0 = net.link("eth0").clone();
    assert_ne!(eth0.mac, ETH0_MAC);
    assert_eq!(eth0.mac[0] & 0x03, 0x02, "locally administered unicast");
    assert!(eth0.up);
    let (br0, tap0) = (net.link("br0").clone(), net.link("tap0").clone());
    assert_eq!((br0.mtu, tap0.mtu), (9000, 9000));
    assert!(br0.up && tap0.up);
    assert_eq!((eth0.master, tap0.master), (Some(br0.index), Some(br0.index)));
    assert!(net.ageing_zero.contains("br0"));
    assert!(net.isolations.contains(&("eth0".to_string(), "br0".to_string())));
    let addrs: Vec<String> = net.addrs.iter().map(|a| format!("{}@{}", a.net, a.link)).collect();
    assert_eq!(addrs, vec![format!("169.254.254.2/24@{}", br0.index)]);
    assert!(net.routes.iter().all(|r| r.oif != Some(eth0.index)), "eth0 keeps no route");

    drop(out.fds);
    teardown(&mut net, &out.csn).unwrap();
    assert_eq!(view(&net), before);
    assert!(net.isolations.is_empty());
    // Repeating a teardown finds nothing to do and fails nothing.
    teardown(&mut net, &out.csn).unwrap();
    assert_eq!(view(&net), before);
}

#[test]
fn a_failure_at_any_step_leaves_the_netns_exactly_as_cni_left_it() {
    let mut failed = 0;
    for step in 0.. {
        let (mut net, r) = two_interfaces();
        let before = view(&net);
        net.mutations = 0;
        net.fail_at = Some(step);
        match setup(&mut net, NS, r, &opts()) {
            Ok(_) => break,
            Err(e) => {
                failed += 1;
                assert!(e.message.contains(&format!("injected failure at step {step}")), "{}", e.message);
                assert_eq!(view(&net), before, "after a failure at step {step}");
                assert!(net.isolations.is_empty(), "step {step}");
            }
        }
    }
    assert!(failed > 20, "only {failed} steps");
}

#[test]
fn a_failing_rollback_is_reported_with_the_original_error() {
    let (mut net, r) = bridge_pod(1500);
    net.fail_ops.insert("add_isolation");
    net.fail_ops.insert("remove_isolation");
    let e = setup(&mut net, NS, r, &opts()).unwrap_err();
    assert!(e.message.contains("injected failure of add_isolation"), "{}", e.message);
    assert!(e.message.contains("rolling back also failed: injected failure of remove_isolation"), "{}", e.message);
    assert!(net.links.iter().all(|l| l.name != "br0" && l.name != "tap0"), "the rest was still undone");
}

fn two_interfaces() -> (FakeNet, CniResult) {
    let (mut net, _) = bridge_pod(1500);
    net.add_link("eth1", ETH1_MAC, 1450, Some("veth"));
    net.plugin_addr("eth1", "10.2.0.7/16");
    net.plugin_route("eth1", "10.3.0.0/16", Some("10.2.0.1"));
    // Interfaces listed in reverse order, the IPs pointing at eth0 first.
    let r = result(
        r#"{"interfaces":[{"name":"eth1","mac":"42:a4:a6:22:80:3f","sandbox":"/var/run/netns/pod1"},
            {"name":"eth0","mac":"42:a4:a6:22:80:2e","sandbox":"/var/run/netns/pod1"}],
           "ips":[{"version":"4","interface":1,"address":"10.1.90.5/24","gateway":"10.1.90.1"},
                  {"version":"4","interface":0,"address":"10.2.0.7/16","gateway":"10.2.0.1"}],
           "routes":[{"dst":"0.0.0.0/0","gw":"10.1.90.1"},{"dst":"10.3.0.0/16","gw":"10.2.0.1"},{"dst":"10.10.42.0/24","gw":"10.1.90.90"}]}"#,
    );
    (net, r)
}

#[test]
fn links_referenced_by_ips_come_first_and_each_gets_its_own_bridge() {
    let (mut net, r) = two_interfaces();
    let before = view(&net);
    let out = setup(&mut net, NS, r, &opts()).unwrap();
    let names: Vec<(&str, u16)> = out.csn.interfaces.iter().map(|d| (d.name.as_str(), d.mtu)).collect();
    assert_eq!(names, vec![("eth0", 1500), ("eth1", 1450)]);
    assert_eq!(out.fds.len(), 2);
    assert_eq!(net.link("eth0").master, Some(net.index("br0")));
    assert_eq!(net.link("eth1").master, Some(net.index("br1")));
    assert_eq!(net.link("tap1").mtu, 1450);
    teardown(&mut net, &out.csn).unwrap();
    assert_eq!(view(&net), before);
}

#[test]
fn a_conflicting_bridge_for_the_second_interface_fails_and_undoes_the_first() {
    let (mut net, r) = two_interfaces();
    net.create_bridge_for_test("br1");
    let before = view(&net);
    let e = setup(&mut net, NS, r, &opts()).unwrap_err();
    assert_eq!(e.code, ErrorCode::Exists);
    assert!(e.message.contains("set up eth1"), "{}", e.message);
    assert_eq!(view(&net), before);
}

impl FakeNet {
    fn create_bridge_for_test(&mut self, name: &str) {
        use super::ops::NetOps;
        self.create_bridge(name, 1500).unwrap();
    }
}

#[test]
fn host_side_entries_are_skipped_and_missing_interfaces_are_added() {
    let (mut net, _) = bridge_pod(1500);
    // interfaces lacks eth0 entirely and the IP points nowhere.
    let r = result(
        r#"{"interfaces":[{"name":"cni0","mac":"0a:58:0a:01:5a:01"}],
           "ips":[{"version":"4","address":"10.1.90.5/24","gateway":"10.1.90.1"}],
           "routes":[{"dst":"0.0.0.0/0","gw":"10.1.90.1"}]}"#,
    );
    let before = view(&net);
    let out = setup(&mut net, NS, r, &opts()).unwrap();
    let res = &out.csn.result;
    assert_eq!(res.interfaces.len(), 2);
    assert_eq!((res.interfaces[1].name.as_str(), res.interfaces[1].mac.as_str()), ("eth0", "42:a4:a6:22:80:2e"));
    assert_eq!(res.interfaces[1].sandbox, NS);
    assert_eq!(res.ips[0].interface, 1);
    assert_eq!(out.csn.interfaces.len(), 1);
    teardown(&mut net, &out.csn).unwrap();
    // The 10.10.42.0/24 route was not in the result: teardown cannot know it (as in Virtlet).
    let mut expected = before;
    expected.2.retain(|r| !r.starts_with("10.10.42.0/24"));
    assert_eq!(view(&net), expected);
}

#[test]
fn weave_like_results_are_rebuilt_from_the_single_veth() {
    let mut net = FakeNet::new();
    net.add_link("eth0", ETH0_MAC, 1376, Some("veth"));
    net.plugin_addr("eth0", "10.32.0.4/12");
    net.plugin_route("eth0", "0.0.0.0/0", Some("10.32.0.1"));
    net.plugin_route("eth0", "10.96.0.0/12", Some("10.32.0.1"));
    net.plugin_route("eth0", "224.0.0.0/4", None);
    let r = result(r#"{"ips":[{"version":"4","address":"10.32.0.4/12"}],"dns":{"nameservers":["10.96.0.10"]}}"#);
    let before = view(&net);
    let out = setup(&mut net, NS, r, &opts()).unwrap();
    let fixed = serde_json::to_value(&out.csn.result).unwrap();
    assert_eq!(
        fixed,
        serde_json::json!({
            "interfaces":[{"name":"eth0","mac":"42:a4:a6:22:80:2e","sandbox":NS}],
            "ips":[{"version":"4","address":"10.32.0.4/12","gateway":"10.32.0.1"}],
            "routes":[{"dst":"0.0.0.0/0","gw":"10.32.0.1"},{"dst":"10.96.0.0/12","gw":"10.32.0.1"}],
            "dns":{"nameservers":["10.96.0.10"]}
        })
    );
    assert_eq!(out.csn.interfaces[0].mtu, 1376);
    teardown(&mut net, &out.csn).unwrap();
    // The gateway-less multicast route is not part of the rebuilt result (as in Virtlet).
    let mut expected = before;
    expected.2.retain(|r| !r.starts_with("224.0.0.0/4"));
    assert_eq!(view(&net), expected);
}

#[test]
fn weave_like_results_need_exactly_one_veth_with_one_address() {
    let (mut net, _) = two_interfaces();
    let r = result(r#"{"ips":[{"version":"4","address":"10.1.90.5/24"}]}"#);
    let before = view(&net);
    let e = setup(&mut net, NS, r.clone(), &opts()).unwrap_err();
    assert_eq!(e.code, ErrorCode::Invalid);
    assert!(e.message.contains("2 veth links"), "{}", e.message);
    assert_eq!(view(&net), before);

    let (mut net, _) = bridge_pod(1500);
    net.plugin_addr("eth0", "10.1.91.5/24");
    let e = setup(&mut net, NS, r, &opts()).unwrap_err();
    assert!(e.message.contains("2 IPv4 addresses"), "{}", e.message);
}

#[test]
fn results_without_ips_or_with_unknown_addresses_are_refused() {
    let (mut net, _) = bridge_pod(1500);
    let e = setup(&mut net, NS, result(r#"{"interfaces":[],"ips":[]}"#), &opts()).unwrap_err();
    assert_eq!(e.code, ErrorCode::Invalid);
    let r = result(
        r#"{"ips":[{"version":"4","address":"10.9.9.9/24"},{"version":"4","address":"10.1.90.5/24"}],
            "routes":[{"dst":"0.0.0.0/0","gw":"10.1.90.1"}]}"#,
    );
    let e = setup(&mut net, NS, r, &opts()).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    assert!(e.message.contains("10.9.9.9"), "{}", e.message);
}

/// Calico: eth0 with a /32, a `169.254.1.1 scope link` route and a default route via 169.254.1.1.
fn calico_pod() -> FakeNet {
    let mut net = FakeNet::new();
    net.add_link("eth0", ETH0_MAC, 1440, Some("veth"));
    net.plugin_addr("eth0", "192.168.84.7/32");
    net.plugin_route("eth0", "169.254.1.1/32", None);
    net.plugin_route("eth0", "0.0.0.0/0", Some("169.254.1.1"));
    net
}

#[test]
fn calico_gets_the_subnet_size_and_the_dummy_gateway_plus_a_second_network() {
    let mut net = calico_pod();
    net.add_link("eth1", ETH1_MAC, 1500, Some("veth"));
    net.plugin_addr("eth1", "10.2.0.7/16");
    net.plugin_route("eth1", "10.3.0.0/16", Some("10.2.0.1"));
    let before = view(&net);
    let r = result(
        r#"{"interfaces":[{"name":"eth0","sandbox":"/var/run/netns/pod1"},{"name":"eth1","mac":"42:a4:a6:22:80:3f","sandbox":"/var/run/netns/pod1"}],
            "ips":[{"version":"4","interface":0,"address":"192.168.84.7/32"},
                   {"version":"4","interface":1,"address":"10.2.0.7/16","gateway":"10.2.0.1"}],
            "routes":[{"dst":"0.0.0.0/0"},{"dst":"10.3.0.0/16","gw":"10.2.0.1"}]}"#,
    );
    let o = SetupOptions {
        calico: CalicoOptions { subnet_size: 26, dummy_gateway: Some(Ipv4Addr::new(192, 168, 84, 2)) },
        ..opts()
    };
    let out = setup(&mut net, NS, r, &o).unwrap();
    let fixed = serde_json::to_value(&out.csn.result).unwrap();
    assert_eq!(
        fixed["ips"][0],
        serde_json::json!({"version":"4","address":"192.168.84.7/26","gateway":"192.168.84.2"})
    );
    assert_eq!(fixed["ips"][1]["address"], "10.2.0.7/16");
    assert_eq!(fixed["interfaces"][0]["mac"], "42:a4:a6:22:80:2e", "the missing MAC is filled in");
    assert_eq!(
        fixed["routes"],
        serde_json::json!([{"dst":"10.3.0.0/16","gw":"10.2.0.1"},{"dst":"0.0.0.0/0","gw":"192.168.84.2"}])
    );
    let names: Vec<&str> = out.csn.interfaces.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["eth0", "eth1"]);
    assert!(net.routes.iter().all(|r| r.oif != Some(net.index("eth0"))), "Calico's routes are stripped");
    teardown(&mut net, &out.csn).unwrap();
    // eth1 is restored exactly; Calico's eth0 gets the widened address and the dummy gateway is outside
    // nothing it can route: its /32 and link route are not in the result (as in Virtlet; CNI DEL removes eth0).
    let after = view(&net);
    assert_eq!(after.0, before.0);
    for line in before.1.iter().chain(&before.2).filter(|l| l.contains("eth1")) {
        assert!(after.1.contains(line) || after.2.contains(line), "{line}");
    }
    assert!(after.1.iter().any(|a| a.contains("192.168.84.7/26")), "{after:?}");
}

#[test]
fn calico_default_route_without_dummy_gateway_is_an_error_and_undone() {
    let mut net = calico_pod();
    let before = view(&net);
    let r = result(
        r#"{"interfaces":[{"name":"eth0","mac":"42:a4:a6:22:80:2e","sandbox":"/var/run/netns/pod1"}],
            "ips":[{"version":"4","interface":0,"address":"192.168.84.7/32"}],"routes":[{"dst":"0.0.0.0/0"}]}"#,
    );
    // Its own code, before any change: the caller (TapFDSource) gets the dummy gateway only then and calls again.
    let e = setup(&mut net, NS, r.clone(), &opts()).unwrap_err();
    assert_eq!(e.code, ErrorCode::NeedsDummyGateway);
    assert!(e.message.contains("dummy network gateway"), "{}", e.message);
    assert_eq!(view(&net), before);
    // Without the default route no gateway is needed; the mask still widens to the default 24.
    net.routes.retain(|r| r.gateway.is_none());
    let out = setup(&mut net, NS, r, &opts()).unwrap();
    assert_eq!(out.csn.result.ips[0].address.to_string(), "192.168.84.7/24");
    assert_eq!(out.csn.result.ips[0].gateway, None);
}

#[test]
fn an_sriov_vf_is_refused_when_sriov_is_disabled() {
    let (mut net, r) = tap_and_vf();
    let before = view(&net);
    let e = setup(&mut net, NS, r, &opts()).unwrap_err();
    assert_eq!(e.code, ErrorCode::Invalid);
    assert!(e.message.contains("SR-IOV is disabled"), "{}", e.message);
    assert_eq!(view(&net), before);
    assert_eq!(net.vf_devs[VF_PCI].driver, "igbvf");
}

const VF_PCI: &str = "0000:00:04.1";
const VF_MAC: [u8; 6] = [0x42, 0xa4, 0xa6, 0x22, 0x80, 0x50];
const PF_HELD: VfConfig = VfConfig { mac: [0; 6], vlan: 100, qos: 0 };

/// A pod with a bridge-plugin veth `eth0` and a VF `net1` (10.2.0.5/24, as host-device with IPAM leaves it,
/// alias `eth1`: its name on the node), whose PF holds no MAC and VLAN 100 for it.
fn tap_and_vf() -> (FakeNet, CniResult) {
    let (mut net, _) = bridge_pod(1500);
    net.add_vf("net1", VF_MAC, VF_PCI, 0, PF_HELD);
    net.aliases.insert("net1".into(), "eth1".into());
    net.plugin_addr("net1", "10.2.0.5/24");
    net.plugin_route("net1", "10.20.0.0/16", Some("10.2.0.1"));
    let r = result(
        r#"{"interfaces":[{"name":"cni0","mac":"0a:58:0a:01:5a:01"},{"name":"veth1234","mac":"0a:58:0a:01:5a:02"},
            {"name":"eth0","mac":"42:a4:a6:22:80:2e","sandbox":"/var/run/netns/pod1"},
            {"name":"net1","mac":"42:a4:a6:22:80:50","sandbox":"/var/run/netns/pod1"}],
           "ips":[{"version":"4","interface":2,"address":"10.1.90.5/24","gateway":"10.1.90.1"},
                  {"version":"4","interface":3,"address":"10.2.0.5/24"}],
           "routes":[{"dst":"0.0.0.0/0"},{"dst":"10.10.42.0/24","gw":"10.1.90.90"},{"dst":"10.20.0.0/16","gw":"10.2.0.1"}],
           "dns":{}}"#,
    );
    (net, r)
}

fn sriov() -> SetupOptions {
    SetupOptions { enable_sriov: true, ..opts() }
}

#[test]
fn a_vf_is_bound_to_vfio_with_the_cni_mac_and_given_back_on_teardown() {
    let (mut net, r) = tap_and_vf();
    let before = view(&net);
    let out = setup(&mut net, NS, r, &sriov()).unwrap();

    assert_eq!(out.fds.len(), 2, "one fd per interface, /dev/null for the VF");
    let vf = &out.csn.interfaces[1];
    assert_eq!(
        (vf.kind, vf.name.as_str(), vf.hardware_addr, vf.pci_address.as_str(), vf.mtu, vf.vlan_id),
        (InterfaceType::Vf, "net1", Some(MacAddr(VF_MAC)), VF_PCI, 1500, 100)
    );
    assert_eq!(out.csn.interfaces[0].kind, InterfaceType::Tap);
    let fd1 = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&out.fds[1]))).unwrap();
    assert_eq!(fd1, std::path::Path::new("/dev/null"));
    let dev = &net.vf_devs[VF_PCI];
    assert_eq!(dev.driver, VFIO_DRIVER);
    assert_eq!(dev.pf, VfConfig { mac: VF_MAC, vlan: 100, qos: 0 }, "the PF gives the VF the CNI MAC, VLAN kept");
    assert!(net.links.iter().all(|l| l.name != "net1"), "the netdev went with the host driver");
    assert!(net.links.iter().all(|l| l.name != "br1" && l.name != "tap1"), "no bridge or tap for a VF");
    let rec = &net.vf_records[VF_PCI];
    assert_eq!((rec.alias.as_str(), rec.pf_mac, rec.vlan), ("eth1", MacAddr([0; 6]), 100));

    drop(out.fds);
    teardown(&mut net, &out.csn).unwrap();
    assert_eq!(view(&net), before, "links, MACs, addresses and routes as CNI left them");
    let dev = &net.vf_devs[VF_PCI];
    assert_eq!((dev.driver.as_str(), dev.pf), ("igbvf", PF_HELD), "host driver back, PF restored");
    assert_eq!(net.aliases.get("net1").map(String::as_str), Some("eth1"), "host-device finds its alias");
    assert!(net.vf_records.is_empty());
    // A second teardown has nothing to give back: any VF step would fail here.
    net.fail_ops.extend(["set_vf_config", "return_vf", "bind_vfio", "remove_vf_record"]);
    teardown(&mut net, &out.csn).unwrap();
    assert_eq!(view(&net), before);
    assert_eq!(net.vf_devs[VF_PCI].pf, PF_HELD);
}

#[test]
fn a_failure_at_any_step_with_a_vf_gives_the_vf_back_as_it_was() {
    let mut failed = 0;
    for step in 0.. {
        let (mut net, r) = tap_and_vf();
        let before = view(&net);
        net.mutations = 0;
        net.fail_at = Some(step);
        match setup(&mut net, NS, r, &sriov()) {
            Ok(_) => break,
            Err(e) => {
                failed += 1;
                assert!(e.message.contains(&format!("injected failure at step {step}")), "{}", e.message);
                assert_eq!(view(&net), before, "after a failure at step {step}");
                let dev = &net.vf_devs[VF_PCI];
                assert_eq!((dev.driver.as_str(), dev.pf), ("igbvf", PF_HELD), "step {step}");
                assert_eq!(net.aliases.get("net1").map(String::as_str), Some("eth1"), "step {step}");
                assert!(net.vf_records.is_empty(), "step {step}");
            }
        }
    }
    assert!(failed > 15, "only {failed} steps");
}

#[test]
fn recover_leaves_a_bound_vf_alone() {
    let (mut net, r) = tap_and_vf();
    let out = setup(&mut net, NS, r, &sriov()).unwrap();
    // Any VF step would fail here.
    net.fail_ops.extend(["set_vf_config", "return_vf", "bind_vfio", "remove_vf_record", "save_vf_record"]);
    let fds = recover(&mut net, &out.csn).unwrap();
    assert_eq!(fds.len(), 2);
    assert!(fds.iter().all(Option::is_some));
    assert_eq!(net.vf_devs[VF_PCI].driver, VFIO_DRIVER);
    assert_eq!(reopen_taps(&mut net, &out.csn).unwrap().len(), 2);
}

#[test]
fn a_vf_in_use_is_refused_with_its_code_and_nothing_is_left() {
    let (mut net, r) = tap_and_vf();
    let before = view(&net);
    net.fail_ops.insert("bind_vfio");
    let e = setup(&mut net, NS, r.clone(), &sriov()).unwrap_err();
    assert!(e.message.contains("pass VF net1 through"), "{}", e.message);
    net.fail_ops.clear();
    assert_eq!(view(&net), before);

    net.vf_devs.get_mut(VF_PCI).unwrap().driver = VFIO_DRIVER.into();
    let e = setup(&mut net, NS, r, &sriov()).unwrap_err();
    assert_eq!(e.code.as_str(), "ERR_SRIOV_VF_IN_USE", "{}", e.message);
    assert_eq!(view(&net), before);
    assert!(net.vf_records.is_empty());
}

#[test]
fn recover_gives_none_for_a_busy_tap_and_reopen_fails_busy_until_released() {
    let (mut net, r) = two_interfaces();
    let out = setup(&mut net, NS, r, &opts()).unwrap();
    net.held.insert("tap1".into());
    let fds = recover(&mut net, &out.csn).unwrap();
    assert_eq!(fds.iter().map(Option::is_some).collect::<Vec<_>>(), [true, false]);
    assert_eq!(reopen_taps(&mut net, &out.csn).unwrap_err().code, ErrorCode::Busy);
    net.held.clear();
    assert_eq!(reopen_taps(&mut net, &out.csn).unwrap().len(), 2);
}

#[test]
fn teardown_runs_every_step_and_reports_all_errors() {
    let (mut net, r) = two_interfaces();
    let before = view(&net);
    let out = setup(&mut net, NS, r, &opts()).unwrap();
    net.fail_ops.insert("remove_isolation");
    let e = teardown(&mut net, &out.csn).unwrap_err();
    assert!(e.message.starts_with("2 steps failed"), "{}", e.message);
    assert!(e.message.contains("remove the DHCP isolation of eth0") && e.message.contains("of eth1"), "{}", e.message);
    // Everything else was done.
    assert_eq!(view(&net), before);
}

#[test]
fn lo_is_brought_up_and_put_down_again_when_setup_fails() {
    use super::ops::NetOps;
    let (mut net, r) = bridge_pod(1500);
    let lo = net.index("lo");
    net.set_up(lo, false).unwrap();
    let out = setup(&mut net, NS, r.clone(), &opts()).unwrap();
    assert!(net.link("lo").up);
    drop(out);

    let (mut net, r) = bridge_pod(1500);
    net.set_up(lo, false).unwrap();
    net.fail_ops.insert("open_tap");
    let before = view(&net);
    setup(&mut net, NS, r, &opts()).unwrap_err();
    assert_eq!(view(&net), before);
    assert!(!net.link("lo").up);
}

#[test]
fn teardown_keeping_devices_restores_the_links_and_leaves_the_bridges_and_taps_down_and_empty() {
    let (mut net, r) = two_interfaces();
    let before = view(&net);
    let out = setup(&mut net, NS, r, &opts()).unwrap();
    drop(out.fds);
    // Nothing is deleted: a delete would fail the teardown.
    net.fail_ops.insert("delete_link");
    teardown_with(&mut net, &out.csn, &TeardownOptions { delete_devices: false }).unwrap();
    assert!(net.isolations.is_empty());
    let mut kept: Vec<(String, bool, Option<u32>)> = net
        .links
        .iter()
        .filter(|l| l.name.starts_with("br") || l.name.starts_with("tap"))
        .map(|l| (l.name.clone(), l.up, l.master))
        .collect();
    kept.sort();
    let down = |n: &str| (n.to_string(), false, None);
    assert_eq!(kept, [down("br0"), down("br1"), down("tap0"), down("tap1")]);
    // Without the bridges and taps, the netns is what CNI left (the bridges' address and routes are gone).
    let (links, addrs, routes) = view(&net);
    let links: Vec<String> = links.into_iter().filter(|s| !s.starts_with("br") && !s.starts_with("tap")).collect();
    assert_eq!((links, addrs, routes), before);
    // The default (deleting) teardown afterwards removes what was left.
    net.fail_ops.clear();
    teardown(&mut net, &out.csn).unwrap();
    assert_eq!(view(&net), before);
}

#[test]
fn teardown_options_default_to_deleting_the_devices() {
    assert!(TeardownOptions::default().delete_devices);
}
