//! The per-pod DHCP server: hands each VM the address the CNI plugins gave its pod link.
//!
//! One [`DhcpServer`] per pod netns serves the pod's bridges (`br<i>`, UDP port 67), configured from a
//! [`ContainerSideNetwork`] (the CNI result plus the interface descriptions). The rules are those of
//! `shared/NETWORK.md`:
//! - DISCOVER is answered with OFFER, REQUEST with ACK, only for the MACs of the network's interfaces, and only
//!   on the bridge that serves that interface; anything else is ignored. A REQUEST for an address that is not
//!   the one we hold gets a NAK. Replies are broadcast, from the bridge address, server identifier
//!   169.254.254.2 (option 54).
//! - Options: yiaddr, 1 subnet mask, 26 MTU (no MTU known: no answer), 51/58/59 lease times
//!   86400/43200/64800 s, 6 DNS (IPv4 only, default 8.8.8.8), 119 search list (RFC 3397), 97 (and 61, per
//!   RFC 6842) client identifiers echoed, routes as option 3 or option 121 (RFC 3442, default route last).
//!
//! Layout: [`lease`] computes what one interface is offered from a ContainerSideNetwork (pure logic),
//! [`packet`] parses requests and builds replies with `dhcproto` (pure logic, fuzzed), [`server`] owns the
//! sockets (created inside the pod netns, bound before `start` returns) and serves them on tokio.

pub mod lease;
pub mod packet;
pub mod server;

use std::net::Ipv4Addr;

pub use lease::{BridgeBinding, DhcpConfig, Lease};
pub use packet::{respond, Outcome};
pub use server::{DhcpServer, DhcpStats};

/// The server's address: the address every pod bridge gets (`169.254.254.2/24`), sent as option 54.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 254, 2);
/// Option 51, seconds.
pub const LEASE_TIME: u32 = 86400;
/// Option 58 (T1), seconds.
pub const RENEWAL_TIME: u32 = 43200;
/// Option 59 (T2), seconds.
pub const REBINDING_TIME: u32 = 64800;
/// Option 6 when the CNI result has no usable IPv4 name server.
pub const DEFAULT_DNS: Ipv4Addr = Ipv4Addr::new(8, 8, 8, 8);
/// The DHCP server port.
pub const SERVER_PORT: u16 = 67;
/// The DHCP client port.
pub const CLIENT_PORT: u16 = 68;

#[doc(inline)]
pub use crate::types::ContainerSideNetwork;
