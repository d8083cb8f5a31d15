//! The per-pod DHCP server, exposed to JavaScript: `startDhcpServer(nsPath, csnJson, opts?)` resolves to a
//! running `DhcpServer` (listening on every bridge) with `stop()`.

use std::net::Ipv4Addr;
use std::sync::Mutex;

use napi::bindgen_prelude::{External, PromiseRaw};
use napi::Env;
use napi_derive::napi;
use tapmanager_core::dhcp::{DhcpConfig, DhcpServer as CoreServer, DhcpStats};
use tapmanager_core::types::ContainerSideNetwork;
use tapmanager_core::Error as CoreError;

use crate::error::future_promise;

/// Which bridge serves which interface (an index into the ContainerSideNetwork's `Interfaces`).
#[napi(object)]
pub struct DhcpBridgeMapping {
    /// The bridge's name in the pod netns, e.g. `br0`.
    pub bridge: String,
    /// Index into `Interfaces` of the ContainerSideNetwork.
    pub interface: u32,
}

/// Options of `startDhcpServer`.
#[napi(object)]
pub struct DhcpServerOptions {
    /// Explicit bridge mapping; default: tap interface `i` is served on `br<i>`.
    pub bridges: Option<Vec<DhcpBridgeMapping>>,
    /// Server identifier (option 54); default `169.254.254.2`, the address of every pod bridge.
    pub server_ip: Option<String>,
}

/// Counters of a DHCP server.
#[napi(object)]
pub struct DhcpServerStats {
    /// OFFERs sent.
    pub offers: i64,
    /// ACKs sent.
    pub acks: i64,
    /// NAKs sent.
    pub naks: i64,
    /// Datagrams not answered (unknown MAC, garbage, other message types).
    pub ignored: i64,
    /// Socket errors and handler faults.
    pub errors: i64,
}

impl From<DhcpStats> for DhcpServerStats {
    fn from(s: DhcpStats) -> Self {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        DhcpServerStats {
            offers: n(s.offers),
            acks: n(s.acks),
            naks: n(s.naks),
            ignored: n(s.ignored),
            errors: n(s.errors),
        }
    }
}

struct State {
    server: Option<CoreServer>,
    last_stats: DhcpStats,
}

/// A running per-pod DHCP server. Call `stop()` when done (garbage collection also stops it).
#[napi]
pub struct DhcpServer {
    ns_path: String,
    bridges: Vec<String>,
    state: Mutex<State>,
}

#[napi]
impl DhcpServer {
    /// The pod netns path.
    #[napi(getter)]
    pub fn ns_path(&self) -> String {
        self.ns_path.clone()
    }

    /// The bridges served.
    #[napi(getter)]
    pub fn bridges(&self) -> Vec<String> {
        self.bridges.clone()
    }

    /// True until `stop()` is called (and while every bridge is served).
    #[napi(getter)]
    pub fn running(&self) -> bool {
        self.state.lock().map(|s| s.server.as_ref().is_some_and(|s| s.is_running())).unwrap_or(false)
    }

    /// The counters (frozen at their last values after `stop()`).
    #[napi]
    pub fn stats(&self) -> DhcpServerStats {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.server.as_ref().map(|srv| srv.stats()).unwrap_or(s.last_stats).into()
    }

    /// Stops serving; resolves once every socket is closed (a new server can start in the same netns at
    /// once). Idempotent.
    #[napi]
    pub async fn stop(&self) -> napi::Result<()> {
        let server = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let server = s.server.take();
            if let Some(srv) = &server {
                s.last_stats = srv.stats();
            }
            server
        };
        if let Some(server) = server {
            server.stop().await;
        }
        Ok(())
    }
}

/// Starts the DHCP server of a pod: `nsPath` is the pod netns (e.g. `/var/run/netns/<podId>`), `csnJson` the
/// ContainerSideNetwork in Go's JSON (the add response of TapFDSource). Resolves once every bridge is listening.
/// Rejections carry `err.code`: `ERR_INVALID` (bad JSON, nothing to serve, bad options), `ERR_NOT_FOUND` (no
/// such netns or bridge), `ERR_EXISTS` (a server already listens on a bridge of this netns).
#[napi(ts_return_type = "Promise<DhcpServer>")]
pub fn start_dhcp_server<'env>(
    env: &'env Env,
    ns_path: String,
    csn_json: String,
    opts: Option<DhcpServerOptions>,
) -> napi::Result<PromiseRaw<'env, DhcpServer>> {
    let config = ContainerSideNetwork::from_json(csn_json.as_bytes()).and_then(|csn| config_from(&csn, opts));
    start_with(env, ns_path, config)
}

/// `startDhcpServer` for the ContainerSideNetwork `setupContainerSide` answered as `parsed` (no JSON parsed again).
#[napi(ts_return_type = "Promise<DhcpServer>")]
pub fn start_dhcp_server_parsed<'env>(
    env: &'env Env,
    ns_path: String,
    #[napi(ts_arg_type = "ExternalObject<'ContainerSideNetwork'>")] csn: &External<ContainerSideNetwork>,
    opts: Option<DhcpServerOptions>,
) -> napi::Result<PromiseRaw<'env, DhcpServer>> {
    start_with(env, ns_path, config_from(csn, opts))
}

fn start_with<'env>(
    env: &'env Env,
    ns_path: String,
    config: tapmanager_core::Result<DhcpConfig>,
) -> napi::Result<PromiseRaw<'env, DhcpServer>> {
    let fut = async move {
        let server = CoreServer::start(&ns_path, config?).await?;
        Ok::<_, CoreError>(DhcpServer {
            ns_path,
            bridges: server.bridges().to_vec(),
            state: Mutex::new(State { server: Some(server), last_stats: DhcpStats::default() }),
        })
    };
    future_promise(env, fut)
}

fn config_from(csn: &ContainerSideNetwork, opts: Option<DhcpServerOptions>) -> tapmanager_core::Result<DhcpConfig> {
    let opts = opts.unwrap_or(DhcpServerOptions { bridges: None, server_ip: None });
    let mut config = match opts.bridges {
        Some(map) => {
            let map: Vec<(String, usize)> = map.into_iter().map(|m| (m.bridge, m.interface as usize)).collect();
            DhcpConfig::from_csn_with_bridges(csn, &map)?
        }
        None => DhcpConfig::from_csn(csn)?,
    };
    if let Some(ip) = opts.server_ip {
        config.server_ip = ip
            .parse::<Ipv4Addr>()
            .map_err(|_| CoreError::invalid(format!("serverIp {ip:?} is not an IPv4 address")))?;
    }
    Ok(config)
}
