//! DHCP isolation proven by frame counts. In a pod netns: bridge br0 (169.254.254.2/24) with ports tap0 and
//! eth0, eth0 being a veth whose peer host0 lives in a "node" netns. A raw packet socket on host0 counts what
//! leaves the pod through the link. Frames are written to the tap fd (the VM's side). Root only.
mod common;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{require_prereqs, TestNetns};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tapmanager_core::isolation::{add_dhcp_isolation, list_dhcp_isolation, remove_dhcp_isolation};
use tapmanager_core::netlink::NetlinkHandle;
use tapmanager_core::netns::{open_netns, run_in_netns};
use tapmanager_core::tap::{create_tap, open_tap, TapCreateOptions, TapOpenOptions};
use tapmanager_core::ErrorCode;

const VM_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const MARKER_PORT: u16 = 5999;
const PROBE_PORT: u16 = 5998;
/// nftables' CLI by absolute path: under npm scripts, `nft` on PATH may be @vercel/nft from node_modules/.bin.
const NFT: &str = "/usr/sbin/nft";

fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in h.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A broadcast Ethernet/IPv4/UDP frame as a VM would send (0.0.0.0 -> 255.255.255.255).
fn udp_broadcast_frame(sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
    let udp_len = 8 + payload_len;
    let ip_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&VM_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255];
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    let csum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(14 + ip_len, 0x42);
    f
}

/// (sport, dport) of an IPv4/UDP frame.
fn udp_ports(frame: &[u8]) -> Option<(u16, u16)> {
    if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] || frame[14 + 9] != 17 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let u = &frame[14 + ihl..];
    Some((u16::from_be_bytes([u[0], u[1]]), u16::from_be_bytes([u[2], u[3]])))
}

/// A raw packet socket bound to `link` in the netns at `ns`: sees every frame the link receives.
fn packet_socket(ns: &str, link: &str) -> OwnedFd {
    let link = link.to_string();
    run_in_netns(&PathBuf::from(ns), move || {
        let idx = nix::net::if_::if_nametoindex(link.as_str()).unwrap();
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe {
            libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, i32::from(proto))
        };
        assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd was just created.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain old data; zero is a valid start.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = idx as i32;
        // SAFETY: sll is a valid sockaddr_ll for the call.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind packet socket: {}", std::io::Error::last_os_error());
        Ok(fd)
    })
    .unwrap()
}

/// Reads frames from `fd` until one matches `done` (returned last), with a 5 s bound. Returns all frames read.
fn read_until(fd: &OwnedFd, done: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the marker frame never arrived; frames so far: {}", frames.len());
        let mut pfd = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        if poll(&mut pfd, PollTimeout::try_from(left.as_millis() as u32).unwrap()).unwrap() == 0 {
            continue;
        }
        // read(2), not recv(2): `fd` may be a tap. Readable per poll, so this does not block.
        // SAFETY: buf is valid and writable for its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if n < 0 {
            continue;
        }
        let frame = buf[..n as usize].to_vec();
        let last = done(&frame);
        frames.push(frame);
        if last {
            return frames;
        }
    }
}

fn write_frame(fd: &OwnedFd, frame: &[u8]) {
    // SAFETY: frame is valid for its length; fd is an attached tap.
    let n = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr() as *const libc::c_void, frame.len()) };
    assert_eq!(n as usize, frame.len(), "write to tap: {}", std::io::Error::last_os_error());
}

/// Bridge ports start forwarding once the kernel's link watcher has seen their carrier come up, which
/// happens asynchronously: probe the VM -> node path until a probe frame arrives (bounded: 5 s).
fn wait_until_forwarding(tap: &OwnedFd, host: &OwnedFd) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        write_frame(tap, &udp_broadcast_frame(40000, PROBE_PORT, 10));
        let mut pfd = [PollFd::new(host.as_fd(), PollFlags::POLLIN)];
        if poll(&mut pfd, PollTimeout::from(20u8)).unwrap() > 0 {
            // SAFETY: buf is valid and writable for its length.
            let n = unsafe {
                libc::recv(host.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), libc::MSG_DONTWAIT)
            };
            if n > 0 && udp_ports(&buf[..n as usize]).is_some_and(|(_, d)| d == PROBE_PORT) {
                return;
            }
        }
    }
    panic!("the bridge never forwarded from tap0 to the node within 5 s");
}

fn count(frames: &[Vec<u8>], pred: impl Fn((u16, u16)) -> bool) -> usize {
    frames.iter().filter_map(|f| udp_ports(f)).filter(|p| pred(*p)).count()
}

/// Sends `n` DHCP-like requests and `n` other broadcasts from the VM side, then a marker; returns
/// (DHCP request frames, other frames) seen on the node side.
fn vm_burst(tap: &OwnedFd, host: &OwnedFd, n: usize) -> (usize, usize) {
    for _ in 0..n {
        write_frame(tap, &udp_broadcast_frame(68, 67, 300));
        write_frame(tap, &udp_broadcast_frame(40000, 5000, 100));
    }
    write_frame(tap, &udp_broadcast_frame(40000, MARKER_PORT, 10));
    let frames = read_until(host, |f| udp_ports(f).is_some_and(|(_, d)| d == MARKER_PORT));
    (count(&frames, |(_, d)| d == 67), count(&frames, |(_, d)| d == 5000))
}

/// Sends `n` replies from the bridge address with source port 67 and then a marker from port 6767, from a
/// socket inside the pod; returns (replies seen on the node side, replies seen by the VM on the tap).
fn server_burst(pod: &str, tap: &OwnedFd, host: &OwnedFd, n: usize) -> (usize, usize) {
    run_in_netns(&PathBuf::from(pod), move || {
        let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, 68);
        let s67 = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::new(169, 254, 254, 2), 67)).unwrap();
        let other = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::new(169, 254, 254, 2), 6767)).unwrap();
        for s in [&s67, &other] {
            s.set_broadcast(true).unwrap();
            nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::BindToDevice, &std::ffi::OsString::from("br0"))
                .unwrap();
        }
        for _ in 0..n {
            s67.send_to(&[0u8; 300], to).unwrap();
        }
        other.send_to(&[1u8; 10], to).unwrap();
        Ok(())
    })
    .unwrap();
    let node_frames = read_until(host, |f| udp_ports(f) == Some((6767, 68)));
    let vm_frames = read_until(tap, |f| udp_ports(f) == Some((6767, 68)));
    (count(&node_frames, |p| p == (67, 68)), count(&vm_frames, |p| p == (67, 68)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dhcp_requests_and_our_replies_never_leave_through_the_link() {
    require_prereqs(&["ip", NFT]);
    let pod = TestNetns::new("tmiso");
    let node = TestNetns::new("tmiso");
    let pod_path = PathBuf::from(pod.path());
    let nl = NetlinkHandle::open(Some(&pod_path)).unwrap();
    let node_fd = open_netns(&PathBuf::from(node.path())).unwrap();
    let br = nl.create_bridge("br0", None).await.unwrap();
    let eth = nl.create_veth("eth0", "host0", Some(node_fd.as_fd())).await.unwrap();
    create_tap(Some(&pod_path), "tap0", &TapCreateOptions { mtu: None, multi_queue: false, up: true }).unwrap();
    let tapi = nl.link_by_name("tap0").await.unwrap().index;
    for (port, _) in [(eth, "eth0"), (tapi, "tap0")] {
        nl.set_master(port, br).await.unwrap();
        nl.set_up(port).await.unwrap();
    }
    nl.set_up(br).await.unwrap();
    nl.add_address(br, "169.254.254.2".parse().unwrap(), 24).await.unwrap();
    node.exec("ip", &["link", "set", "host0", "up"]);
    let tap = open_tap(Some(&pod_path), "tap0", &TapOpenOptions::default()).unwrap().remove(0);
    let host = packet_socket(&node.path(), "host0");

    wait_until_forwarding(&tap, &host);
    // Without isolation both directions leak (the check is sensitive).
    assert_eq!(vm_burst(&tap, &host, 3), (3, 3));
    assert_eq!(server_burst(&pod.path(), &tap, &host, 3), (3, 3));

    add_dhcp_isolation(Some(&pod_path), "eth0").unwrap();
    assert_eq!(list_dhcp_isolation(Some(&pod_path)).unwrap(), vec!["eth0".to_string()]);
    // nft parses what we installed and shows Virtlet's two rules.
    let listed = pod.exec(NFT, &["list", "table", "bridge", "tapmanager-dhcp-eth0"]);
    assert!(listed.contains("hook forward") && listed.contains("oifname \"eth0\" udp dport 67 counter"), "{listed}");
    assert!(listed.contains("hook output") && listed.contains("oifname \"eth0\" udp sport 67 counter"), "{listed}");

    // Isolated: no DHCP request and no reply of ours reaches the node; other traffic passes; the VM still
    // gets the replies.
    assert_eq!(vm_burst(&tap, &host, 5), (0, 5));
    assert_eq!(server_burst(&pod.path(), &tap, &host, 4), (0, 4));
    let listed = pod.exec(NFT, &["list", "table", "bridge", "tapmanager-dhcp-eth0"]);
    assert!(listed.contains("counter packets 5 ") && listed.contains("counter packets 4 "), "{listed}");

    // Adding twice is refused and changes nothing.
    assert_eq!(add_dhcp_isolation(Some(&pod_path), "eth0").unwrap_err().code, ErrorCode::Exists);

    // Removal is exact: another link's isolation stays.
    add_dhcp_isolation(Some(&pod_path), "eth1").unwrap();
    remove_dhcp_isolation(Some(&pod_path), "eth0").unwrap();
    assert_eq!(list_dhcp_isolation(Some(&pod_path)).unwrap(), vec!["eth1".to_string()]);
    let ruleset = pod.exec(NFT, &["list", "ruleset"]);
    assert!(!ruleset.contains("\"eth0\"") && ruleset.contains("oifname \"eth1\""), "{ruleset}");
    assert_eq!(vm_burst(&tap, &host, 2), (2, 2));
    assert_eq!(server_burst(&pod.path(), &tap, &host, 2), (2, 2));

    remove_dhcp_isolation(Some(&pod_path), "eth1").unwrap();
    remove_dhcp_isolation(Some(&pod_path), "eth1").unwrap(); // idempotent
    assert!(list_dhcp_isolation(Some(&pod_path)).unwrap().is_empty());
    assert_eq!(pod.exec(NFT, &["list", "ruleset"]).trim(), "");
    // Nothing was installed in the node netns.
    assert_eq!(node.exec(NFT, &["list", "ruleset"]).trim(), "");
    assert_eq!(add_dhcp_isolation(Some(&pod_path), "bad/name").unwrap_err().code, ErrorCode::Invalid);

    // No thread of this process is left inside the pod netns (sockets are closed by a thread that lives in
    // the process's own netns).
    // The pod's inode comes from the mount point (no thread of ours enters it for the check). A thread that
    // ran a netns job can still be exiting just after its join (the kernel drops its namespaces after it wakes
    // the joiner), so a thread seen inside gets a bounded moment to finish exiting; one that stays is a leak.
    let pod_ns = format!("net:[{}]", std::fs::metadata(&pod_path).unwrap().ino());
    let inside = || -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| {
                let t = t.ok()?.path();
                let ns = std::fs::read_link(t.join("ns/net")).ok()?;
                (ns.to_string_lossy() == pod_ns).then(|| t.display().to_string())
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut left = inside();
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        left = inside();
    }
    assert!(left.is_empty(), "threads still inside the pod netns after 5 s: {left:?}");
}
