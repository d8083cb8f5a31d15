//! The container side of a pod network (NETWORK.md): fixing the CNI result against the pod netns, then per
//! container link a MAC swap, a tap and a bridge with the DHCP server's address and DHCP isolation; teardown
//! that restores the netns to what CNI left; reopening taps after a restart.
//!
//! - [`ops`]: the [`NetOps`] trait, every operation the container side does to a netns.
//! - [`fix`]: Weave/Calico fixes of the result and the order of container links (pure logic).
//! - [`setup`]: setup (undone on failure), teardown (all steps, all errors) and recovery over any [`NetOps`].

mod cni_tmp;
#[cfg(test)]
mod fake;
pub mod fix;
pub mod ops;
pub mod setup;
#[cfg(test)]
mod tests;

/// The Go-compatible payload types used here.
pub mod types {
    pub use super::cni_tmp::*;
}

pub use fix::{CalicoOptions, NetSnapshot};
pub use ops::{Addr, Link, NetOps, Route};
pub use setup::{recover, reopen_taps, setup, teardown, SetupOptions, SetupOutput};
