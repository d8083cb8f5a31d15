//! The server: one UDP socket per bridge, created inside the pod netns, served on tokio.
//!
//! Each socket is made on a thread made for it inside the pod netns ([`crate::netns::run_in_netns`]) and is
//! bound to `0.0.0.0:67` with `SO_BINDTODEVICE <bridge>` and `SO_BROADCAST`, so `start` returns only once
//! every bridge is listening (no sleep, no race). The sockets then belong to the pod netns for good and are
//! served from ordinary tokio tasks, one per bridge: nothing on the runtime ever enters a namespace.
//!
//! Replies go to `255.255.255.255:68` through the bridge (the client has no address yet); the kernel picks
//! the bridge's address (169.254.254.2) as the source. Each datagram is answered by [`super::respond`] under
//! `catch_unwind`, and each pod's server is its own set of tasks, so a fault in one pod's server never
//! touches another pod's (nor the rest of that server).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use super::lease::{BridgeBinding, DhcpConfig};
use super::packet::{respond, Outcome};
use super::{CLIENT_PORT, SERVER_PORT};
use crate::error::{Error, ErrorCode, Result};
use dhcproto::v4::MessageType;

/// Counters of one server (all bridges), for diagnostics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DhcpStats {
    /// OFFERs sent.
    pub offers: u64,
    /// ACKs sent.
    pub acks: u64,
    /// NAKs sent.
    pub naks: u64,
    /// Datagrams not answered (unknown MAC, garbage, other message types, ...).
    pub ignored: u64,
    /// Receive/send errors and handler faults (a panic caught while answering one datagram).
    pub errors: u64,
}

#[derive(Default)]
struct Counters {
    offers: AtomicU64,
    acks: AtomicU64,
    naks: AtomicU64,
    ignored: AtomicU64,
    errors: AtomicU64,
}

/// A running per-pod DHCP server. Dropping it aborts its tasks (the sockets close as they are dropped);
/// [`DhcpServer::stop`] also waits for that, so a new server can bind the same netns right after.
pub struct DhcpServer {
    ns_path: PathBuf,
    bridges: Vec<String>,
    counters: Arc<Counters>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for DhcpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DhcpServer").field("ns_path", &self.ns_path).field("bridges", &self.bridges).finish()
    }
}

/// Creates the server socket of one bridge in the current netns:
/// `socket(AF_INET, SOCK_DGRAM)`, `SO_BINDTODEVICE <bridge>`, `SO_BROADCAST`, `bind 0.0.0.0:67`. No
/// `SO_REUSEADDR`: with it a second server could bind the same port on the same bridge and steal requests
/// (UDP has no TIME_WAIT to work around).
fn bridge_socket(bridge: &str) -> Result<OwnedFd> {
    let fd = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)
        .map_err(|e| Error::errno("DHCP socket", e))?;
    setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(bridge)).map_err(|e| match e {
        nix::errno::Errno::ENODEV => Error::new(ErrorCode::NotFound, format!("DHCP: bridge {bridge:?} not found")),
        e => Error::errno(format!("DHCP: bind socket to bridge {bridge:?}"), e),
    })?;
    setsockopt(&fd, sockopt::Broadcast, &true).map_err(|e| Error::errno("DHCP: SO_BROADCAST", e))?;
    let addr = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, SERVER_PORT));
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).map_err(|e| match e {
        nix::errno::Errno::EADDRINUSE => Error::new(
            ErrorCode::Exists,
            format!("DHCP: port 67 on bridge {bridge:?} is in use (a server already runs in this netns?)"),
        ),
        e => Error::errno(format!("DHCP: bind 0.0.0.0:67 on {bridge:?}"), e),
    })?;
    Ok(fd)
}

impl DhcpServer {
    /// Starts serving `config` in the netns at `ns_path`. Resolves once every bridge's socket is bound.
    /// Must run inside a tokio runtime (multi-thread or current-thread); the blocking part (entering the
    /// netns on a thread made for it) runs on `spawn_blocking`.
    ///
    /// Errors: `ERR_INVALID` (bad config), `ERR_NOT_FOUND` (no such netns or bridge), `ERR_EXISTS` (port 67
    /// already bound on a bridge, e.g. a server is already running there).
    pub async fn start(ns_path: impl AsRef<Path>, config: DhcpConfig) -> Result<DhcpServer> {
        config.validate()?;
        let ns_path = ns_path.as_ref().to_path_buf();
        let names: Vec<String> = config.bindings.iter().map(|b| b.bridge.clone()).collect();
        let ns = ns_path.clone();
        let fds = tokio::task::spawn_blocking(move || {
            crate::netns::run_in_netns(&ns, move || names.iter().map(|b| bridge_socket(b)).collect::<Result<Vec<_>>>())
        })
        .await
        .map_err(|e| Error::new(ErrorCode::Io, format!("DHCP start task failed: {e}")))?
        .map_err(|e| e.context(format!("start DHCP server in {}", ns_path.display())))?;

        let counters = Arc::new(Counters::default());
        let mut sockets = Vec::with_capacity(fds.len());
        for fd in fds {
            let std_sock = std::net::UdpSocket::from(fd);
            sockets.push(UdpSocket::from_std(std_sock).map_err(|e| Error::io("DHCP: register socket", e))?);
        }
        let server_ip = config.server_ip;
        let bridges = config.bindings.iter().map(|b| b.bridge.clone()).collect();
        let tasks = config
            .bindings
            .into_iter()
            .zip(sockets)
            .map(|(binding, sock)| tokio::spawn(serve(sock, binding, server_ip, counters.clone())))
            .collect();
        Ok(DhcpServer { ns_path, bridges, counters, tasks })
    }

    /// Stops serving and closes every socket; resolves once they are closed.
    pub async fn stop(mut self) {
        self.abort_and_wait().await;
    }

    async fn abort_and_wait(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }

    /// The netns the server runs in.
    pub fn ns_path(&self) -> &Path {
        &self.ns_path
    }

    /// The bridges served, in config order.
    pub fn bridges(&self) -> &[String] {
        &self.bridges
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> DhcpStats {
        let c = &self.counters;
        DhcpStats {
            offers: c.offers.load(Ordering::Relaxed),
            acks: c.acks.load(Ordering::Relaxed),
            naks: c.naks.load(Ordering::Relaxed),
            ignored: c.ignored.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
        }
    }

    /// True while every bridge's task is still serving.
    pub fn is_running(&self) -> bool {
        !self.tasks.is_empty() && self.tasks.iter().all(|t| !t.is_finished())
    }
}

impl Drop for DhcpServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn serve(sock: UdpSocket, binding: BridgeBinding, server_ip: Ipv4Addr, counters: Arc<Counters>) {
    let mut buf = vec![0u8; 4096];
    let dest = SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT);
    loop {
        let n = match sock.recv_from(&mut buf).await {
            Ok((n, _)) => n,
            Err(_) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                // e.g. the bridge went away under us: don't spin
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| respond(&binding, server_ip, &buf[..n])));
        match outcome {
            Ok(Outcome::Reply { kind, bytes }) => {
                let counter = match kind {
                    MessageType::Offer => &counters.offers,
                    MessageType::Ack => &counters.acks,
                    _ => &counters.naks,
                };
                match sock.send_to(&bytes, dest).await {
                    Ok(_) => counter.fetch_add(1, Ordering::Relaxed),
                    Err(_) => counters.errors.fetch_add(1, Ordering::Relaxed),
                };
            }
            Ok(Outcome::Ignored(_)) => {
                counters.ignored.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
