//! DHCP DISCOVER-to-OFFER latency (target < 1 ms), through a real socket: a client socket in a "client" netns
//! sends a DISCOVER over a veth into the pod's bridge br0, the server (on tokio) answers with a broadcast
//! OFFER, the client receives it. Also the handler alone (`respond`, no I/O) for reference.
//! Needs root; builds and removes its own namespaces (`ip netns`), never touches the root netns.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use dhcproto::v4::{DhcpOption, Message, MessageType};
use dhcproto::{Encodable, Encoder};
use tapmanager_core::dhcp::{respond, DhcpConfig, DhcpServer};
use tapmanager_core::types::ContainerSideNetwork;

const MAC: [u8; 6] = [0x42, 0xa4, 0xa6, 0x22, 0x80, 0x2e];

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().expect(args[0]);
    assert!(st.success(), "{args:?}");
}

struct Netns(String);
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn csn(ns: &str) -> ContainerSideNetwork {
    let json = format!(
        r#"{{"Result":{{"interfaces":[{{"name":"eth0","mac":"42:a4:a6:22:80:2e","sandbox":"{ns}"}}],
        "ips":[{{"version":"4","address":"10.1.90.5/24","gateway":"10.1.90.1"}}],
        "routes":[{{"dst":"0.0.0.0/0","gw":"10.1.90.1"}},{{"dst":"10.10.42.0/24","gw":"10.1.90.90"}}],
        "dns":{{"nameservers":["10.96.0.10"],"search":["default.svc.cluster.local","cluster.local"]}}}},
        "NsPath":"{ns}","Interfaces":[{{"Type":0,"Name":"eth0","HardwareAddr":"QqSmIoAu","PCIAddress":"","MTU":1500,"VlanID":0}}]}}"#
    );
    ContainerSideNetwork::from_json(json.as_bytes()).unwrap()
}

fn discover(xid: u32) -> Vec<u8> {
    let mut m = Message::default();
    m.set_chaddr(&MAC).set_xid(xid);
    m.opts_mut().insert(DhcpOption::MessageType(MessageType::Discover));
    let mut b = Vec::new();
    m.encode(&mut Encoder::new(&mut b)).unwrap();
    b
}

fn bench(c: &mut Criterion) {
    assert!(nix::unistd::Uid::effective().is_root(), "the DHCP bench needs root (it makes network namespaces)");
    let id: u32 = rand::random();
    let (pod, client) = (Netns(format!("tmbp{id:08x}")), Netns(format!("tmbc{id:08x}")));
    sh(&["ip", "netns", "add", &pod.0]);
    sh(&["ip", "netns", "add", &client.0]);
    let in_pod = |args: &[&str]| {
        let mut v = vec!["ip", "netns", "exec", &pod.0];
        v.extend_from_slice(args);
        sh(&v);
    };
    in_pod(&["ip", "link", "add", "br0", "type", "bridge"]);
    in_pod(&["ip", "addr", "add", "169.254.254.2/24", "dev", "br0"]);
    in_pod(&["ip", "link", "add", "vp0", "type", "veth", "peer", "name", "vm0", "netns", &client.0]);
    in_pod(&["ip", "link", "set", "vp0", "master", "br0", "up"]);
    in_pod(&["ip", "link", "set", "br0", "up"]);
    sh(&["ip", "netns", "exec", &client.0, "ip", "link", "set", "vm0", "address", "42:a4:a6:22:80:2e", "up"]);
    sh(&["ip", "netns", "exec", &client.0, "ip", "addr", "add", "169.254.254.50/24", "dev", "vm0"]);

    let pod_path = format!("/var/run/netns/{}", pod.0);
    let net = csn(&pod_path);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let server = rt.block_on(DhcpServer::start(&pod_path, DhcpConfig::from_csn(&net).unwrap())).unwrap();
    let sock = tapmanager_core::netns::run_in_netns(Path::new(&format!("/var/run/netns/{}", client.0)), || {
        use nix::sys::socket::{bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
        let fd = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).unwrap();
        setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from("vm0")).unwrap();
        setsockopt(&fd, sockopt::Broadcast, &true).unwrap();
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::new(0, 0, 0, 0, 68)).unwrap();
        Ok(UdpSocket::from(fd))
    })
    .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let dest = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);

    let mut g = c.benchmark_group("dhcp");
    let mut xid = 1u32;
    let mut buf = [0u8; 1500];
    g.bench_function("discover_to_offer_real_socket", |b| {
        b.iter(|| {
            xid = xid.wrapping_add(1);
            let pkt = discover(xid);
            sock.send_to(&pkt, dest).unwrap();
            loop {
                let (n, _) = sock.recv_from(&mut buf).expect("an OFFER within 2 s");
                if n >= 8 && u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) == xid {
                    break;
                }
            }
        })
    });
    let binding = DhcpConfig::from_csn(&net).unwrap().bindings.remove(0);
    let pkt = discover(7);
    g.bench_function("respond_only", |b| b.iter(|| respond(&binding, Ipv4Addr::new(169, 254, 254, 2), &pkt)));
    g.finish();

    let stats = server.stats();
    println!("server stats after the bench: {stats:?}");
    rt.block_on(server.stop());
}

criterion_group!(benches, bench);
criterion_main!(benches);
