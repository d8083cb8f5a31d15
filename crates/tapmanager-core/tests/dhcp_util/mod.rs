//! Shared by the DHCP integration tests: a "pod" netns with bridge br0 at 169.254.254.2/24 and a veth whose
//! peer (the "VM" link `vm0`, carrying the VM's MAC) sits in a "client" netns; real clients and crafted packets.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::TestNetns;
use dhcproto::v4::{DhcpOption, Message, MessageType};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use tapmanager_core::dhcp::{DhcpConfig, DhcpServer};
use tapmanager_core::types::ContainerSideNetwork;

pub const VM_MAC: &str = "42:a4:a6:22:80:2e";
pub const VM_MAC_BYTES: [u8; 6] = [0x42, 0xa4, 0xa6, 0x22, 0x80, 0x2e];

pub const CLASSLESS_ROUTES: &str =
    r#"[{"dst":"0.0.0.0/0","gw":"10.1.90.1"},{"dst":"10.10.42.0/24","gw":"10.1.90.90"}]"#;
pub const DEFAULT_ROUTE: &str = r#"[{"dst":"0.0.0.0/0","gw":"10.1.90.1"}]"#;
pub const DNS_SEARCH: &str =
    r#"{"nameservers":["10.96.0.10","fd00::10","10.96.0.11"],"search":["default.svc.cluster.local","cluster.local"]}"#;

pub fn csn(ns_path: &str, routes: &str, dns: &str, mtu: u16) -> ContainerSideNetwork {
    let json = format!(
        r#"{{"Result":{{"interfaces":[{{"name":"eth0","mac":"{VM_MAC}","sandbox":"{ns_path}"}}],
        "ips":[{{"version":"4","address":"10.1.90.5/24","gateway":"10.1.90.1"}}],"routes":{routes},"dns":{dns}}},
        "NsPath":"{ns_path}","Interfaces":[{{"Type":0,"Name":"eth0","HardwareAddr":"QqSmIoAu","PCIAddress":"","MTU":{mtu},"VlanID":0}}]}}"#
    );
    ContainerSideNetwork::from_json(json.as_bytes()).unwrap()
}

/// The pod netns with br0 (169.254.254.2/24, up) and the client netns with `vm0` (the VM's MAC) wired to it.
pub struct Topology {
    pub pod: TestNetns,
    pub client: TestNetns,
}

impl Topology {
    pub fn new() -> Topology {
        let pod = TestNetns::new("tmdp");
        let client = TestNetns::new("tmdc");
        pod.exec("ip", &["link", "add", "br0", "type", "bridge"]);
        pod.exec("ip", &["addr", "add", "169.254.254.2/24", "dev", "br0"]);
        pod.exec("ip", &["link", "add", "vp0", "type", "veth", "peer", "name", "vm0", "netns", &client.name]);
        pod.exec("ip", &["link", "set", "vp0", "master", "br0", "up"]);
        pod.exec("ip", &["link", "set", "br0", "up"]);
        client.exec("ip", &["link", "set", "vm0", "address", VM_MAC, "up"]);
        Topology { pod, client }
    }

    pub fn start(&self, rt: &tokio::runtime::Runtime, csn: &ContainerSideNetwork) -> DhcpServer {
        rt.block_on(DhcpServer::start(self.pod.path(), DhcpConfig::from_csn(csn).unwrap())).unwrap()
    }

    /// Runs `dhcpcd -T` (test mode: prints the offer, configures nothing) in the client netns, with its state
    /// directories on private tmpfs; returns stdout. dhcpcd 9.4.1 may segfault after printing (exit 139).
    pub fn dhcpcd(&self, extra: &[&str]) -> String {
        self.dhcpcd_with_lease(extra, None).0
    }

    /// [`Topology::dhcpcd`], optionally with a saved lease (`/var/lib/dhcpcd/vm0.lease`, the raw DHCP message
    /// of an ACK) so that dhcpcd starts by re-requesting it (INIT-REBOOT); returns stdout and stderr.
    pub fn dhcpcd_with_lease(&self, extra: &[&str], lease: Option<&[u8]>) -> (String, String) {
        let dir = tempfile::tempdir().unwrap();
        let lease_path = dir.path().join("vm0.lease");
        let copy = match lease {
            Some(bytes) => {
                std::fs::write(&lease_path, bytes).unwrap();
                format!("cp {} /var/lib/dhcpcd/vm0.lease && ", lease_path.display())
            }
            None => String::new(),
        };
        let script = format!(
            "mount -t tmpfs none /var/lib/dhcpcd && {copy}mount -t tmpfs none /run && \
             exec timeout 30 dhcpcd -T -4 -1 -A -t 20 -f /dev/null \
             --option classless_static_routes --option interface_mtu --option domain_search \
             --option domain_name_servers {} vm0",
            extra.join(" ")
        );
        // dhcpcd leaves privilege-separation helpers that hold their stdio: write it to files, wait for the
        // main process, kill the helpers, then read what was printed.
        let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
        let status = Command::new("ip")
            .args(["netns", "exec", &self.client.name, "unshare", "-m", "sh", "-c", &script])
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .status()
            .unwrap();
        self.kill_client_leftovers();
        let out = std::fs::read_to_string(&out_path).unwrap();
        let err = std::fs::read_to_string(&err_path).unwrap();
        let code =
            status.code().unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0));
        assert!(code == 0 || code == 139, "dhcpcd exit {status:?}: {out}\n{err}");
        assert!(!out.is_empty(), "dhcpcd printed nothing (exit {status:?}): {err}");
        (out, err)
    }

    /// busybox udhcpc with a script that prints its environment; returns the printed lines.
    pub fn udhcpc(&self) -> String {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("print.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\n[ \"$1\" = bound ] || exit 0\nfor v in ip subnet router dns serverid lease mtu search domain staticroutes; do\n  eval \"echo $v=\\\"\\$$v\\\"\"\ndone\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.client.name,
                "timeout",
                "30",
                "busybox",
                "udhcpc",
                "-i",
                "vm0",
                "-f",
                "-n",
                "-q",
            ])
            .args(["-O", "staticroutes", "-O", "search", "-O", "mtu", "-s", script.to_str().unwrap()])
            .output()
            .unwrap();
        self.kill_client_leftovers();
        assert!(out.status.success(), "udhcpc: {:?} {}", out.status, String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn kill_client_leftovers(&self) {
        let pids = Command::new("ip").args(["netns", "pids", &self.client.name]).output().unwrap();
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }

    /// A UDP socket on port 68 bound to vm0 in the client netns, for crafted packets.
    pub fn raw_client(&self) -> UdpSocket {
        self.client.exec("ip", &["addr", "replace", "169.254.254.50/24", "dev", "vm0"]);
        tapmanager_core::netns::run_in_netns(Path::new(&self.client.path()), || {
            let s = socket2_like_bind("vm0");
            Ok(s)
        })
        .unwrap()
    }
}

/// Creates `0.0.0.0:68` bound to `dev` with broadcast on (in the calling thread's netns).
pub fn socket2_like_bind(dev: &str) -> UdpSocket {
    use nix::sys::socket::{bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).unwrap();
    setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(dev)).unwrap();
    setsockopt(&fd, sockopt::Broadcast, &true).unwrap();
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::new(0, 0, 0, 0, 68)).unwrap();
    UdpSocket::from(fd)
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

pub fn line<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

pub fn craft(kind: MessageType, mac: &[u8], xid: u32, opts: Vec<DhcpOption>) -> Vec<u8> {
    let mut m = Message::default();
    m.set_chaddr(mac).set_xid(xid);
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    for o in opts {
        m.opts_mut().insert(o);
    }
    let mut b = Vec::new();
    m.encode(&mut Encoder::new(&mut b)).unwrap();
    b
}

/// Sends `packet` to 255.255.255.255:67 and waits up to `wait` for a reply with `xid`.
pub fn exchange(sock: &UdpSocket, packet: &[u8], xid: u32, wait: Duration) -> Option<Message> {
    sock.send_to(packet, SocketAddrV4::new(Ipv4Addr::BROADCAST, 67)).unwrap();
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                if let Ok(m) = Message::decode(&mut Decoder::new(&buf[..n])) {
                    if m.xid() == xid {
                        assert_eq!(from.ip().to_string(), "169.254.254.2", "reply comes from the bridge address");
                        return Some(m);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return None
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// Polls `cond` until it holds or `limit` passes; returns whether it held.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
