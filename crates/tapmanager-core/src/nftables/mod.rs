//! nf_tables over netlink (`NETLINK_NETFILTER`), without the `nft` binary: what [`crate::isolation`] needs.
//!
//! - [`wire`]: the encoding (constants, attributes, expressions, messages, batches), pure bytes on
//!   `netlink-packet-core`;
//! - [`socket`]: the `netlink-sys` socket that sends a batch and waits for its acks, or runs a dump, and closes
//!   itself on a background thread.

pub mod socket;
pub mod wire;

#[cfg(all(test, target_endian = "little"))]
mod golden;
