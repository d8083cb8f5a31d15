//! tapmanager-core: the pure-Rust core of tapmanager.
//!
//! Each module is one concept:
//! - [`error`]: the error type shared by all modules, with stable string codes.
//! - [`durable`]: atomic, durable replacement and removal of a small file (state records, cache entries).
//! - [`unix`]: Unix stream sockets with `SCM_RIGHTS` fd passing and peer credentials (the FDServer transport).
//! - [`netns`]: named network namespaces (`ip netns` compatible) and running work inside one on a thread made for it.
//! - [`netlink`]: links, addresses and routes over rtnetlink, each named after the `ip` command it equals.
//! - [`tap`]: tap devices through `/dev/net/tun`.
//! - [`isolation`]: DHCP isolation of a CNI link on a pod bridge (the policy).
//! - [`nftables`]: nf_tables over netlink: the message encoding and the socket that [`isolation`] uses.
//! - [`types`]: the Go-compatible JSON payload types (CNI result, ContainerSideNetwork, interface descriptions).
//! - [`dhcp`]: the per-pod DHCP server.
//! - [`sriov`]: SR-IOV VFs: detection in sysfs, vfio-pci binding, what release restores.
//! - [`container`]: setup, teardown and recovery of the container side of a pod network.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod container;
pub mod dhcp;
pub mod durable;
pub mod error;
pub mod isolation;
pub mod netlink;
pub mod netns;
pub mod nftables;
pub mod sriov;
pub mod tap;
pub mod types;
pub mod unix;

pub use error::{Error, ErrorCode, Result};
