//! The container side of a pod network (NETWORK.md): fixing the CNI result against the pod netns, then per
//! container link a MAC swap, a tap and a bridge with the DHCP server's address and DHCP isolation; teardown
//! that restores the netns to what CNI left; reopening taps after a restart.
//!
//! - [`ops`]: the [`NetOps`] trait, every operation the container side does to a netns.
//! - [`fix`]: Weave/Calico fixes of the result and the order of container links (pure logic).
//! - [`setup`]: setup (undone on failure), teardown (all steps, all errors) and recovery over any [`NetOps`].
//! - [`real`]: [`NetOps`] over netlink, taps and nftables in the calling thread's netns.
//!
//! The entry points below take a netns path and run on a thread made for that netns (blocking: call them
//! from `spawn_blocking` or a worker thread).

#[cfg(test)]
mod fake;
pub mod fix;
pub mod ops;
pub mod real;
pub mod setup;
#[cfg(test)]
mod tests;

pub use fix::{needs_dummy_gateway, CalicoOptions, NetSnapshot};
pub use ops::{Addr, Link, NetOps, Route, VfState};
pub use real::RealNet;
pub use setup::{recover, reopen_taps, setup, teardown, teardown_with, SetupOptions, SetupOutput, TeardownOptions};

use std::os::fd::OwnedFd;
use std::path::Path;

use crate::error::Result;
use crate::netns::run_in_netns;
use crate::types::{CniResult, ContainerSideNetwork};
use setup::snapshot;

/// Sets up the container side in the netns at `ns_path` for the CNI result `cni_result_json` (any spec
/// version). Returns the ContainerSideNetwork and one tap fd per interface. On failure the netns is left as
/// CNI left it.
pub fn setup_container_side(ns_path: &Path, cni_result_json: &[u8], opts: SetupOptions) -> Result<SetupOutput> {
    let result = CniResult::from_json(cni_result_json)?;
    let path = ns_path.to_path_buf();
    run_in_netns(ns_path, move || {
        let mut ops = RealNet::here(&path)?;
        setup(&mut ops, &path.to_string_lossy(), result, &opts)
    })
}

/// Tears down the container side described by `csn_json` in the netns at `ns_path` (every step runs; all
/// errors are reported together).
pub fn teardown_container_side(ns_path: &Path, csn_json: &[u8]) -> Result<()> {
    let csn = ContainerSideNetwork::from_json(csn_json)?;
    let path = ns_path.to_path_buf();
    run_in_netns(ns_path, move || teardown(&mut RealNet::here(&path)?, &csn))
}

/// [`teardown_container_side`] with options: `delete_devices: false` leaves the emptied bridges and taps (down)
/// for a netns that is deleted right after.
pub fn teardown_container_side_with(ns_path: &Path, csn_json: &[u8], opts: TeardownOptions) -> Result<()> {
    let csn = ContainerSideNetwork::from_json(csn_json)?;
    let path = ns_path.to_path_buf();
    run_in_netns(ns_path, move || teardown_with(&mut RealNet::here(&path)?, &csn, &opts))
}

/// Reopens the taps of `csn_json` after a restart; a tap held by a running VM gives `None`.
pub fn recover_container_side(ns_path: &Path, csn_json: &[u8]) -> Result<Vec<Option<OwnedFd>>> {
    let csn = ContainerSideNetwork::from_json(csn_json)?;
    let path = ns_path.to_path_buf();
    run_in_netns(ns_path, move || recover(&mut RealNet::here(&path)?, &csn))
}

/// Reopens every tap of `csn_json` (`ERR_BUSY` if one is still held).
pub fn reopen_container_taps(ns_path: &Path, csn_json: &[u8]) -> Result<Vec<OwnedFd>> {
    let csn = ContainerSideNetwork::from_json(csn_json)?;
    let path = ns_path.to_path_buf();
    run_in_netns(ns_path, move || reopen_taps(&mut RealNet::here(&path)?, &csn))
}

/// True when the netns at `ns_path` holds a Calico link with a default route via 169.254.1.1, so that setup
/// needs the dummy network's gateway (the caller then asks CNI for the dummy network first).
pub fn pod_needs_dummy_gateway(ns_path: &Path) -> Result<bool> {
    let path = ns_path.to_path_buf();
    run_in_netns(ns_path, move || Ok(needs_dummy_gateway(&snapshot(&mut RealNet::here(&path)?)?)))
}
