//! The container side of a pod network (core `container` module): setup, teardown, recovery and reopening
//! taps in a pod netns. Each call runs on a blocking thread that enters the netns (never a tokio worker) and
//! returns a Promise; a failure rejects it with an `Error` whose `code` is the core's stable code.

use std::net::Ipv4Addr;
use std::os::fd::IntoRawFd;
use std::path::PathBuf;

use napi::bindgen_prelude::{External, PromiseRaw};
use napi::Env;
use napi_derive::napi;
use tapmanager_core::container::{self, CalicoOptions, SetupOptions, TeardownOptions};
use tapmanager_core::types::ContainerSideNetwork;
use tapmanager_core::{Error as CoreError, Result as CoreResult};

use crate::error::spawn_blocking_promise;

/// Options of `setupContainerSide`.
#[napi(object)]
#[derive(Debug, Clone, Default)]
pub struct SetupContainerSideOptions {
    /// The prefix length given to Calico's `/32` pod address (default 24).
    pub calico_subnet_size: Option<u32>,
    /// Whether SR-IOV VFs may be passed to the VM (default false: a VF is an `ERR_INVALID` error).
    pub enable_sriov: Option<bool>,
    /// The IPv4 address of the dummy network's Calico link: the VM's gateway for a Calico default route. Without
    /// it, a pod with such a route fails with `ERR_NEEDS_DUMMY_GATEWAY` before anything is changed.
    pub dummy_gateway: Option<String>,
}

/// What `setupContainerSide` resolves to.
#[napi(object, object_from_js = false)]
pub struct ContainerSideSetup {
    /// The ContainerSideNetwork, Go's JSON (what the add response carries and what recover needs).
    pub csn: String,
    /// The same ContainerSideNetwork as the core holds it, for `startDhcpServerParsed` (no JSON parsed again).
    #[napi(ts_type = "ExternalObject<'ContainerSideNetwork'>")]
    pub parsed: External<ContainerSideNetwork>,
    /// One tap fd per interface, in `Interfaces` order. The caller owns them and must close them.
    pub fds: Vec<i32>,
}

/// What `recoverContainerSide` resolves to.
#[napi(object)]
pub struct ContainerSideRecovery {
    /// One entry per interface: the reopened tap fd (owned by the caller), or `null` when a running VM holds
    /// the tap (fetch it later with `reopenTaps`).
    pub fds: Vec<Option<i32>>,
}

fn setup_options(o: Option<SetupContainerSideOptions>) -> CoreResult<SetupOptions> {
    let o = o.unwrap_or_default();
    let subnet_size = match o.calico_subnet_size {
        None => 24,
        Some(n) if (1..=32).contains(&n) => n as u8,
        Some(n) => return Err(CoreError::invalid(format!("calicoSubnetSize must be 1..=32, not {n}"))),
    };
    let dummy_gateway = match o.dummy_gateway.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<Ipv4Addr>()
                .map_err(|_| CoreError::invalid(format!("dummyGateway {s:?} is not an IPv4 address")))?,
        ),
    };
    Ok(SetupOptions {
        calico: CalicoOptions { subnet_size, dummy_gateway },
        enable_sriov: o.enable_sriov.unwrap_or(false),
    })
}

/// Sets up the container side in the pod netns at `nsPath` for a CNI result (any spec version): fixes the
/// result (Weave, Calico, `interfaces`), then per container link strips its IPv4 routes and addresses, swaps
/// its MAC, and bridges it (`br<i>`, 169.254.254.2/24, MAC learning off, DHCP isolation) with a new tap
/// `tap<i>`. Resolves to the ContainerSideNetwork JSON and the tap fds. On failure everything done is undone
/// (the netns is as CNI left it) and the Promise rejects (`ERR_INVALID`, `ERR_EXISTS`, `ERR_NOT_FOUND`, ...).
#[napi(ts_return_type = "Promise<ContainerSideSetup>")]
pub fn setup_container_side<'env>(
    env: &'env Env,
    ns_path: String,
    cni_result_json: String,
    opts: Option<SetupContainerSideOptions>,
) -> napi::Result<PromiseRaw<'env, ContainerSideSetup>> {
    spawn_blocking_promise(
        env,
        move || {
            let opts = setup_options(opts)?;
            container::setup_container_side(&PathBuf::from(ns_path), cni_result_json.as_bytes(), opts)
        },
        |out| ContainerSideSetup {
            csn: out.csn.to_json(),
            parsed: External::new(out.csn),
            fds: out.fds.into_iter().map(IntoRawFd::into_raw_fd).collect(),
        },
    )
}

/// Options of `teardownContainerSide`.
#[napi(object)]
#[derive(Debug, Clone, Default)]
pub struct TeardownContainerSideOptions {
    /// Leave the emptied bridges and taps in the netns, down and without the bridge address, instead of
    /// deleting them (default false). Only for a netns that is deleted right after: its deletion destroys them
    /// asynchronously, saving ~20-45 ms per device. Everything CNI DEL needs is restored either way.
    pub keep_devices: Option<bool>,
}

/// Tears the container side of `csnJson` down in the pod netns at `nsPath`, restoring what CNI left (close the
/// tap fds first). Every step runs; when some fail, the Promise rejects with all their errors in the message.
/// With `keepDevices` the bridges and taps are left (down, empty) for the netns deletion that follows.
#[napi(ts_return_type = "Promise<void>")]
pub fn teardown_container_side<'env>(
    env: &'env Env,
    ns_path: String,
    csn_json: String,
    opts: Option<TeardownContainerSideOptions>,
) -> napi::Result<PromiseRaw<'env, ()>> {
    let keep = opts.and_then(|o| o.keep_devices).unwrap_or(false);
    let opts = TeardownOptions { delete_devices: !keep };
    spawn_blocking_promise(
        env,
        move || container::teardown_container_side_with(&PathBuf::from(ns_path), csn_json.as_bytes(), opts),
        |()| (),
    )
}

/// Reopens the taps of `csnJson` after a restart. A tap held by a running VM gives `null` (not an error).
#[napi(ts_return_type = "Promise<ContainerSideRecovery>")]
pub fn recover_container_side<'env>(
    env: &'env Env,
    ns_path: String,
    csn_json: String,
) -> napi::Result<PromiseRaw<'env, ContainerSideRecovery>> {
    spawn_blocking_promise(
        env,
        move || container::recover_container_side(&PathBuf::from(ns_path), csn_json.as_bytes()),
        |fds| ContainerSideRecovery { fds: fds.into_iter().map(|f| f.map(IntoRawFd::into_raw_fd)).collect() },
    )
}

/// Reopens every tap of `csnJson` (retrieveFDs). Rejects with `ERR_BUSY` while a tap is still held.
#[napi(ts_return_type = "Promise<number[]>")]
pub fn reopen_taps<'env>(
    env: &'env Env,
    ns_path: String,
    csn_json: String,
) -> napi::Result<PromiseRaw<'env, Vec<i32>>> {
    spawn_blocking_promise(
        env,
        move || container::reopen_container_taps(&PathBuf::from(ns_path), csn_json.as_bytes()),
        |fds| fds.into_iter().map(IntoRawFd::into_raw_fd).collect(),
    )
}

/// True when the pod netns at `nsPath` holds a Calico link with a default route via 169.254.1.1: setup then
/// needs `dummyGateway` (the IPv4 address of the dummy network's Calico link).
#[napi(ts_return_type = "Promise<boolean>")]
pub fn needs_dummy_gateway<'env>(env: &'env Env, ns_path: String) -> napi::Result<PromiseRaw<'env, bool>> {
    spawn_blocking_promise(env, move || container::pod_needs_dummy_gateway(&PathBuf::from(ns_path)), |b| b)
}
