//! Namespaces, links/addresses/routes, taps and DHCP isolation for JavaScript: thin async wrappers of
//! `tapmanager_core::{netns, netlink, tap, isolation}`. Blocking work (a thread entering a netns, tun ioctls,
//! nf_tables batches) runs on tokio's blocking pool, which never enters a namespace itself: the core spawns
//! a dedicated thread for that. Errors carry the core's `err.code`.

use std::net::IpAddr;
use std::os::fd::{AsFd, IntoRawFd};
use std::path::{Path, PathBuf};

use napi::bindgen_prelude::PromiseRaw;
use napi::Env;
use napi_derive::napi;
use tapmanager_core::netlink::{self as nl, NetlinkHandle as CoreHandle};
use tapmanager_core::{isolation, netns, tap, Error as CoreError, ErrorCode, Result as CoreResult};

use crate::error::{blocking, future_promise, to_js, JsError};

fn dir_of(dir: Option<String>) -> PathBuf {
    PathBuf::from(dir.unwrap_or_else(|| netns::DEFAULT_NETNS_DIR.to_string()))
}

fn parse_ip(s: &str) -> CoreResult<IpAddr> {
    s.parse().map_err(|_| CoreError::invalid(format!("invalid IP address {s:?}")))
}

fn u8_of(v: u32, what: &str) -> CoreResult<u8> {
    u8::try_from(v).map_err(|_| CoreError::invalid(format!("{what} {v} is out of range (0-255)")))
}

/// An address and its prefix length from JavaScript (`address`, `prefixLen`).
fn address_of(address: &str, prefix_len: u32) -> CoreResult<(IpAddr, u8)> {
    Ok((parse_ip(address)?, u8_of(prefix_len, "prefixLen")?))
}

// ---------------------------------------------------------------- namespaces

/// Options of `createNetns`.
#[napi(object)]
pub struct CreateNetnsOptions {
    /// The directory of named namespaces; default `/var/run/netns` (what `ip netns` uses).
    pub dir: Option<String>,
    /// When the name is taken: `fail` (default) with `ERR_EXISTS`, like `ip netns add`; `reuse` returns the
    /// existing live namespace unchanged (a leftover plain file from a crash becomes a new namespace);
    /// `recreate` deletes it and creates a fresh, empty one.
    #[napi(ts_type = "'fail' | 'reuse' | 'recreate'")]
    pub if_exists: Option<String>,
    /// `false`: IPv6 off by default for the links created later in the namespace
    /// (`net.ipv6.conf.default.disable_ipv6=1` inside it, set before it is mounted): they make no link-local
    /// address, DAD, router solicitations or MLD reports. A CNI plugin that gives a link an IPv6 address turns
    /// IPv6 on for that link. Default `true` (the kernel's defaults, as `ip netns add`).
    pub ipv6: Option<bool>,
}

/// A named namespace returned by `createNetns`.
#[napi(object)]
pub struct NetnsInfo {
    /// The name.
    pub name: String,
    /// The namespace file (e.g. `/var/run/netns/pod1`): use it as `netns` elsewhere and as `CNI_NETNS`.
    pub path: String,
    /// False when `ifExists: 'reuse'` returned an existing namespace.
    pub created: bool,
}

/// Creates a named network namespace, natively (no `ip` process). Equivalent to `ip netns add <name>`.
#[napi(ts_return_type = "Promise<NetnsInfo>")]
pub fn create_netns<'env>(
    env: &'env Env,
    name: String,
    options: Option<CreateNetnsOptions>,
) -> napi::Result<PromiseRaw<'env, NetnsInfo>> {
    future_promise(env, async move {
        let (dir, mode, ipv6) = match options {
            Some(o) => (dir_of(o.dir), o.if_exists, o.ipv6.unwrap_or(true)),
            None => (dir_of(None), None, true),
        };
        let mode = match mode.as_deref() {
            None | Some("fail") => netns::IfExists::Fail,
            Some("reuse") => netns::IfExists::Reuse,
            Some("recreate") => netns::IfExists::Recreate,
            Some(other) => {
                return Err(CoreError::invalid(format!(
                    "ifExists must be 'fail', 'reuse' or 'recreate', not {other:?}"
                )))
            }
        };
        let n = name.clone();
        let settings = netns::NetnsSettings { if_exists: mode, ipv6 };
        let created = blocking(move || {
            let pool = netns_pool();
            netns::create_netns_from(&dir, &n, &settings, pool.as_deref())
        })
        .await?;
        Ok(NetnsInfo { name, path: created.path.to_string_lossy().into_owned(), created: created.created })
    })
}

/// The process's pool of spare namespaces (`setNetnsPool`), if any.
fn netns_pool() -> Option<std::sync::Arc<netns::NetnsPool>> {
    NETNS_POOL.lock().ok().and_then(|p| p.clone())
}

static NETNS_POOL: std::sync::Mutex<Option<std::sync::Arc<netns::NetnsPool>>> = std::sync::Mutex::new(None);

/// Keeps `size` spare network namespaces made ahead of time (IPv6 setting `ipv6`, as `createNetns`'s option),
/// so that `createNetns` with the same setting only binds one onto its path: making a namespace waits behind
/// the kernel's cleanup of deleted ones, off the caller's path then. The spares are held by fds of this process
/// and mounted nowhere (nothing is left behind when it ends). `size` 0 stops the pool and closes its spares (a
/// pool made before is replaced either way). Call it from the process's own netns.
#[napi]
pub fn set_netns_pool(size: u32, ipv6: Option<bool>) -> Result<(), JsError> {
    let pool = if size == 0 {
        None
    } else {
        Some(std::sync::Arc::new(netns::NetnsPool::new(size as usize, ipv6.unwrap_or(true)).map_err(to_js)?))
    };
    let old = NETNS_POOL.lock().map(|mut p| std::mem::replace(&mut *p, pool)).unwrap_or(None);
    // the old pool's thread is joined here (at most one namespace being made) unless an add still holds it
    drop(old);
    Ok(())
}

/// The spare-namespace pool's state: its size, spares ready now, IPv6 setting, and why making one failed last.
#[napi(object)]
pub struct NetnsPoolStatus {
    pub size: u32,
    pub spare: u32,
    pub ipv6: bool,
    pub last_error: Option<String>,
}

/// The pool of `setNetnsPool`, or null when there is none.
#[napi]
pub fn netns_pool_status() -> Option<NetnsPoolStatus> {
    netns_pool().map(|p| NetnsPoolStatus {
        size: p.size() as u32,
        spare: p.spare() as u32,
        ipv6: p.ipv6(),
        last_error: p.last_error(),
    })
}

/// Deletes a named namespace (unmount and remove; a missing one is fine). Equivalent to `ip netns delete <name>`.
#[napi(ts_return_type = "Promise<void>")]
pub fn delete_netns<'env>(env: &'env Env, name: String, dir: Option<String>) -> napi::Result<PromiseRaw<'env, ()>> {
    future_promise(env, async move {
        let dir = dir_of(dir);
        blocking(move || netns::delete_netns(&dir, &name)).await
    })
}

/// Lists the live named namespaces, sorted. Equivalent to `ip netns list`.
#[napi(ts_return_type = "Promise<Array<string>>")]
pub fn list_netns<'env>(env: &'env Env, dir: Option<String>) -> napi::Result<PromiseRaw<'env, Vec<String>>> {
    future_promise(env, async move {
        let dir = dir_of(dir);
        blocking(move || netns::list_netns(&dir)).await
    })
}

/// The path of a named namespace (no check that it exists).
#[napi]
pub fn netns_path(name: String, dir: Option<String>) -> Result<String, JsError> {
    netns::validate_netns_name(&name).map_err(to_js)?;
    Ok(netns::netns_path(&dir_of(dir), &name).to_string_lossy().into_owned())
}

// ---------------------------------------------------------------- netlink

/// A link as `ip -d link show` describes it.
#[napi(object)]
pub struct Link {
    /// The interface index.
    pub index: u32,
    /// The name.
    pub name: String,
    /// `veth`, `bridge`, `tun` (taps), ...; absent for `lo` and physical NICs.
    pub kind: Option<String>,
    /// `aa:bb:cc:dd:ee:ff`, when the link has a 6-byte hardware address.
    pub mac: Option<String>,
    /// The MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// The raw `IFF_*` flags.
    pub flags: u32,
    /// The index of its bridge, if it is a bridge port.
    pub master: Option<u32>,
    /// The device group (0 = default).
    pub group: u32,
}

/// An address as `ip addr show` describes it.
#[napi(object)]
pub struct Address {
    /// The link's index.
    pub index: u32,
    /// The address.
    pub address: String,
    /// The prefix length.
    pub prefix_len: u32,
    /// 4 or 6.
    pub family: u32,
    /// `RT_SCOPE_*`: 0 global, 253 link, 254 host.
    pub scope: u32,
}

/// A route of the main table as `ip route show` describes it.
#[napi(object)]
pub struct Route {
    /// The destination; absent for a default route.
    pub dst: Option<String>,
    /// The destination prefix length (0 for a default route).
    pub dst_len: u32,
    /// The gateway.
    pub gateway: Option<String>,
    /// The output interface index.
    pub oif: Option<u32>,
    /// `RTPROT_*`: 2 kernel, 3 boot, 4 static, 16 dhcp.
    pub protocol: u32,
    /// `RT_SCOPE_*`: 0 global, 253 link, 254 host.
    pub scope: u32,
    /// The table id (254 = main).
    pub table: u32,
    /// The metric.
    pub priority: Option<u32>,
    /// The preferred source address.
    pub pref_src: Option<String>,
    /// 4 or 6.
    pub family: u32,
}

/// A route to add or delete: `dst` or `gateway` is required (the default route has only a gateway).
#[napi(object)]
pub struct RouteSpec {
    /// The destination network; absent: the default route.
    pub dst: Option<String>,
    /// The destination prefix length; default 32 (IPv4) / 128 (IPv6) when `dst` is set.
    pub dst_len: Option<u32>,
    /// The gateway.
    pub gateway: Option<String>,
    /// The output interface index.
    pub oif: Option<u32>,
    /// `RT_SCOPE_*`; default: link (253) without a gateway, global (0) with one.
    pub scope: Option<u32>,
    /// `RTPROT_*`; default boot (3), like `ip route add`.
    pub protocol: Option<u32>,
    /// The metric.
    pub priority: Option<u32>,
    /// The table; default main (254).
    pub table: Option<u32>,
}

fn link_js(l: nl::LinkInfo) -> Link {
    Link {
        index: l.index,
        name: l.name,
        kind: l.kind,
        mac: l.mac.map(|m| nl::format_mac(&m)),
        mtu: l.mtu,
        up: l.up,
        flags: l.flags,
        master: l.master,
        group: l.group,
    }
}

fn route_spec(s: RouteSpec) -> CoreResult<nl::RouteSpec> {
    let dst = s.dst.as_deref().map(parse_ip).transpose()?;
    let dst_len = match (s.dst_len, dst) {
        (Some(l), _) => u8_of(l, "dstLen")?,
        (None, Some(IpAddr::V4(_))) => 32,
        (None, Some(IpAddr::V6(_))) => 128,
        (None, None) => 0,
    };
    Ok(nl::RouteSpec {
        dst,
        dst_len,
        gateway: s.gateway.as_deref().map(parse_ip).transpose()?,
        oif: s.oif,
        scope: s.scope.map(|v| u8_of(v, "scope")).transpose()?,
        protocol: s.protocol.map(|v| u8_of(v, "protocol")).transpose()?,
        priority: s.priority,
        table: s.table,
    })
}

fn family(ip: &IpAddr) -> u32 {
    if ip.is_ipv4() {
        4
    } else {
        6
    }
}

/// A netlink connection to one network namespace; every method is named after the `ip` command it equals.
/// Links are addressed by index (`linkByName` finds one). Call `close()` when done.
#[napi]
pub struct NetlinkHandle {
    inner: Option<CoreHandle>,
}

impl NetlinkHandle {
    fn h(&self) -> CoreResult<CoreHandle> {
        self.inner.clone().ok_or_else(|| CoreError::new(ErrorCode::Closed, "the netlink handle is closed"))
    }
}

#[napi]
impl NetlinkHandle {
    /// Opens a connection to the netns at `netns` (a namespace file such as `/var/run/netns/pod1`); without
    /// it, to the netns of this process. The socket is created on a short-lived thread inside that netns.
    #[napi(factory)]
    pub fn open(netns: Option<String>) -> Result<NetlinkHandle, JsError> {
        let path = netns.map(PathBuf::from);
        let inner =
            napi::bindgen_prelude::within_runtime_if_available(|| CoreHandle::open(path.as_deref())).map_err(to_js)?;
        Ok(NetlinkHandle { inner: Some(inner) })
    }

    /// Closes the connection; later calls fail with `ERR_CLOSED`.
    #[napi]
    pub fn close(&mut self) {
        self.inner = None;
    }

    /// Lists all links. `ip -d link show`.
    #[napi(ts_return_type = "Promise<Array<Link>>")]
    pub fn links<'env>(&self, env: &'env Env) -> napi::Result<PromiseRaw<'env, Vec<Link>>> {
        let h = self.h();
        future_promise(env, async move { Ok(h?.links().await?.into_iter().map(link_js).collect()) })
    }

    /// The link named `name`; `ERR_NOT_FOUND` when missing. `ip -d link show dev <name>`.
    #[napi(ts_return_type = "Promise<Link>")]
    pub fn link_by_name<'env>(&self, env: &'env Env, name: String) -> napi::Result<PromiseRaw<'env, Link>> {
        let h = self.h();
        future_promise(env, async move { Ok(link_js(h?.link_by_name(&name).await?)) })
    }

    /// The link with index `index`. `ip -d link show` filtered on the index.
    #[napi(ts_return_type = "Promise<Link>")]
    pub fn link_by_index<'env>(&self, env: &'env Env, index: u32) -> napi::Result<PromiseRaw<'env, Link>> {
        let h = self.h();
        future_promise(env, async move { Ok(link_js(h?.link_by_index(index).await?)) })
    }

    /// Creates a veth pair (both down), the peer directly in the netns at `peerNetns` when given; returns the
    /// index of `name`. `ip link add <name> type veth peer name <peer> [netns <ns>]`.
    #[napi(ts_return_type = "Promise<number>")]
    pub fn create_veth<'env>(
        &self,
        env: &'env Env,
        name: String,
        peer: String,
        peer_netns: Option<String>,
    ) -> napi::Result<PromiseRaw<'env, u32>> {
        let h = self.h();
        future_promise(env, async move {
            let h = h?;
            match peer_netns {
                Some(p) => {
                    let f = netns::open_netns(Path::new(&p))?;
                    h.create_veth(&name, &peer, Some(f.as_fd())).await
                }
                None => h.create_veth(&name, &peer, None).await,
            }
        })
    }

    /// Creates a bridge (down) with MAC ageing time 0 and an optional MTU; returns its index.
    /// `ip link add <name> [mtu <mtu>] type bridge ageing_time 0`.
    #[napi(ts_return_type = "Promise<number>")]
    pub fn create_bridge<'env>(
        &self,
        env: &'env Env,
        name: String,
        mtu: Option<u32>,
    ) -> napi::Result<PromiseRaw<'env, u32>> {
        let h = self.h();
        future_promise(env, async move { h?.create_bridge(&name, mtu).await })
    }

    /// `ip link set dev <link> up`.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn set_up<'env>(&self, env: &'env Env, index: u32) -> napi::Result<PromiseRaw<'env, ()>> {
        let h = self.h();
        future_promise(env, async move { h?.set_up(index).await })
    }

    /// `ip link set dev <link> down`.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn set_down<'env>(&self, env: &'env Env, index: u32) -> napi::Result<PromiseRaw<'env, ()>> {
        let h = self.h();
        future_promise(env, async move { h?.set_down(index).await })
    }

    /// `ip link set dev <link> address <mac>`.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn set_mac<'env>(&self, env: &'env Env, index: u32, mac: String) -> napi::Result<PromiseRaw<'env, ()>> {
        let h = self.h();
        future_promise(env, async move {
            let mac = nl::parse_mac(&mac)?;
            h?.set_mac(index, mac).await
        })
    }

    /// `ip link set dev <link> mtu <mtu>`.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn set_mtu<'env>(&self, env: &'env Env, index: u32, mtu: u32) -> napi::Result<PromiseRaw<'env, ()>> {
        let h = self.h();
        future_promise(env, async move { h?.set_mtu(index, mtu).await })
    }

    /// `ip link set dev <link> name <name>` (the link must be down).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn set_name<'env>(&self, env: &'env Env, index: u32, name: String) -> napi::Result<PromiseRaw<'env, ()>> {
        let h = self.h();
        future_promise(env, async move { h?.set_name(index, &name).await })
    }

    /// `ip link set dev <link> master <bridge>`.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn set_master<'env>(&self, env: &'env Env, index: u32, master: u32) -> napi::Result<PromiseRaw<'env, ()>> {
        let h = self.h();
        future_promise(env, async move { h?.set_master(index, master).await })
    }

    /// `ip link set dev <link> nomaster`.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn set_nomaster<'env>(&self, env: &'env Env, index: u32) -> napi::Result<PromiseRaw<'env, ()>> {
        let h = self.h();
        future_promise(env, async move { h?.set_nomaster(index).await })
    }

    /// Moves a link into the netns at `netns` (a namespace file). `ip link set dev <link> netns <ns>`.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn set_netns<'env>(&self, env: &'env Env, index: u32, netns: String) -> napi::Result<PromiseRaw<'env, ()>> {
        let h = self.h();
        future_promise(env, async move {
            let f = netns::open_netns(Path::new(&netns))?;
            h?.set_netns(index, f.as_fd()).await
        })
    }

    /// `ip link delete dev <link>` (works on taps too, even while a VM holds one).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn delete_link<'env>(&self, env: &'env Env, index: u32) -> napi::Result<PromiseRaw<'env, ()>> {
        let h = self.h();
        future_promise(env, async move { h?.delete_link(index).await })
    }

    /// Deletes several links in one kernel batch (one set of unregister waits instead of one per link); exactly
    /// these links or none. `ip link set dev <each> group <g>` + `ip link delete group <g>`.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn delete_links<'env>(&self, env: &'env Env, indices: Vec<u32>) -> napi::Result<PromiseRaw<'env, ()>> {
        let h = self.h();
        future_promise(env, async move { h?.delete_links(&indices).await })
    }

    /// Lists IPv4 and IPv6 addresses, of one link when `index` is given. `ip addr show [dev <link>]`.
    #[napi(ts_return_type = "Promise<Array<Address>>")]
    pub fn addresses<'env>(&self, env: &'env Env, index: Option<u32>) -> napi::Result<PromiseRaw<'env, Vec<Address>>> {
        let h = self.h();
        future_promise(env, async move {
            let list = h?.addresses(index).await?;
            Ok(list
                .into_iter()
                .map(|a| Address {
                    index: a.index,
                    family: family(&a.address),
                    address: a.address.to_string(),
                    prefix_len: u32::from(a.prefix_len),
                    scope: u32::from(a.scope),
                })
                .collect())
        })
    }

    /// `ip addr add <address>/<prefixLen> dev <link>`.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn add_address<'env>(
        &self,
        env: &'env Env,
        index: u32,
        address: String,
        prefix_len: u32,
    ) -> napi::Result<PromiseRaw<'env, ()>> {
        let h = self.h();
        future_promise(env, async move {
            let (ip, len) = address_of(&address, prefix_len)?;
            h?.add_address(index, ip, len).await
        })
    }

    /// `ip addr del <address>/<prefixLen> dev <link>`.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn delete_address<'env>(
        &self,
        env: &'env Env,
        index: u32,
        address: String,
        prefix_len: u32,
    ) -> napi::Result<PromiseRaw<'env, ()>> {
        let h = self.h();
        future_promise(env, async move {
            let (ip, len) = address_of(&address, prefix_len)?;
            h?.delete_address(index, ip, len).await
        })
    }

    /// The routes of the main table, IPv4 then IPv6. `ip route show` + `ip -6 route show`.
    #[napi(ts_return_type = "Promise<Array<Route>>")]
    pub fn routes<'env>(&self, env: &'env Env) -> napi::Result<PromiseRaw<'env, Vec<Route>>> {
        let h = self.h();
        future_promise(env, async move {
            let list = h?.routes().await?;
            Ok(list
                .into_iter()
                .map(|r| Route {
                    dst: r.dst.map(|d| d.to_string()),
                    dst_len: u32::from(r.dst_len),
                    gateway: r.gateway.map(|g| g.to_string()),
                    oif: r.oif,
                    protocol: u32::from(r.protocol),
                    scope: u32::from(r.scope),
                    table: r.table,
                    priority: r.priority,
                    pref_src: r.pref_src.map(|p| p.to_string()),
                    family: if r.ipv6 { 6 } else { 4 },
                })
                .collect())
        })
    }

    /// `ip route add <dst>/<len>|default [via <gw>] [dev <link>] [proto ..] [scope ..] [metric ..] [table ..]`.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn add_route<'env>(&self, env: &'env Env, route: RouteSpec) -> napi::Result<PromiseRaw<'env, ()>> {
        let h = self.h();
        future_promise(env, async move {
            let spec = route_spec(route)?;
            h?.add_route(&spec).await
        })
    }

    /// `ip route del <dst>/<len>|default [via <gw>] [dev <link>] [table ..]`.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn delete_route<'env>(&self, env: &'env Env, route: RouteSpec) -> napi::Result<PromiseRaw<'env, ()>> {
        let h = self.h();
        future_promise(env, async move {
            let spec = route_spec(route)?;
            h?.delete_route(&spec).await
        })
    }
}

// ---------------------------------------------------------------- taps

/// Options of `createTap`.
#[napi(object)]
pub struct CreateTapOptions {
    /// The netns (a namespace file) to create it in; default: this process's.
    pub netns: Option<String>,
    /// The MTU; default 1500.
    pub mtu: Option<u32>,
    /// Create it multi-queue (then it must be opened with `queues`).
    pub multi_queue: Option<bool>,
    /// Bring it up.
    pub up: Option<bool>,
}

/// Options of `openTap`.
#[napi(object)]
pub struct OpenTapOptions {
    /// The netns the tap lives in; default: this process's.
    pub netns: Option<String>,
    /// Ask for the virtio-net header (`IFF_VNET_HDR`).
    pub vnet_hdr: Option<bool>,
    /// Queues: 1 (default) for a single-queue tap, N > 1 for a multi-queue one (N fds).
    pub queues: Option<u32>,
}

/// What `tapFdInfo` tells about an open tap fd.
#[napi(object)]
pub struct TapFdInfo {
    /// The tap's name.
    pub name: String,
    /// Persistent (`IFF_PERSIST`).
    pub persistent: bool,
    /// Multi-queue.
    pub multi_queue: bool,
    /// With the virtio-net header.
    pub vnet_hdr: bool,
}

/// Creates a persistent tap through /dev/net/tun. `ip tuntap add dev <name> mode tap [multi_queue]`
/// (+ `ip link set dev <name> mtu <mtu> up`). `ERR_EXISTS` when the name is taken.
#[napi(ts_return_type = "Promise<void>")]
pub fn create_tap<'env>(
    env: &'env Env,
    name: String,
    options: Option<CreateTapOptions>,
) -> napi::Result<PromiseRaw<'env, ()>> {
    future_promise(env, async move {
        let o = options.unwrap_or(CreateTapOptions { netns: None, mtu: None, multi_queue: None, up: None });
        let opts = tap::TapCreateOptions {
            mtu: o.mtu,
            multi_queue: o.multi_queue.unwrap_or(false),
            up: o.up.unwrap_or(false),
        };
        let ns = o.netns.map(PathBuf::from);
        blocking(move || tap::create_tap(ns.as_deref(), &name, &opts)).await
    })
}

/// Opens an existing tap (`IFF_TAP | IFF_NO_PI`) and returns its fds, one per queue. The caller owns them
/// (close with `fs.closeSync`, or hand them to a VM). `ERR_BUSY` when a VM holds a single-queue tap,
/// `ERR_NOT_FOUND` when there is no such link, `ERR_INVALID` when it is not a tap or the queue mode differs.
#[napi(ts_return_type = "Promise<Array<number>>")]
pub fn open_tap<'env>(
    env: &'env Env,
    name: String,
    options: Option<OpenTapOptions>,
) -> napi::Result<PromiseRaw<'env, Vec<i32>>> {
    future_promise(env, async move {
        let o = options.unwrap_or(OpenTapOptions { netns: None, vnet_hdr: None, queues: None });
        let opts = tap::TapOpenOptions { vnet_hdr: o.vnet_hdr.unwrap_or(false), queues: o.queues.unwrap_or(1) };
        let ns = o.netns.map(PathBuf::from);
        let fds = blocking(move || tap::open_tap(ns.as_deref(), &name, &opts)).await?;
        Ok(fds.into_iter().map(IntoRawFd::into_raw_fd).collect())
    })
}

/// Deletes a persistent tap (a missing one is fine). `ip tuntap del dev <name> mode tap`. `ERR_BUSY` while
/// a VM holds it (`NetlinkHandle.deleteLink` removes it even then).
#[napi(ts_return_type = "Promise<void>")]
pub fn delete_tap<'env>(env: &'env Env, name: String, netns: Option<String>) -> napi::Result<PromiseRaw<'env, ()>> {
    future_promise(env, async move {
        let ns = netns.map(PathBuf::from);
        blocking(move || tap::delete_tap(ns.as_deref(), &name)).await
    })
}

/// Describes an open tap fd (`TUNGETIFF`).
#[napi]
pub fn tap_fd_info(fd: i32) -> Result<TapFdInfo, JsError> {
    let i = tap::tap_fd_info(fd).map_err(to_js)?;
    Ok(TapFdInfo { name: i.name, persistent: i.persistent, multi_queue: i.multi_queue, vnet_hdr: i.vnet_hdr })
}

// ---------------------------------------------------------------- DHCP isolation

/// Keeps DHCP requests from the VM and our DHCP replies from leaving through `link` (a bridge port in the pod
/// netns), with nftables rules sent over netlink (no process). `ERR_EXISTS` when already isolated.
/// `nft add table bridge tapmanager-dhcp-<link>` + forward/output chains dropping UDP dport/sport 67 out of it.
#[napi(ts_return_type = "Promise<void>")]
pub fn add_dhcp_isolation<'env>(
    env: &'env Env,
    netns: Option<String>,
    link: String,
) -> napi::Result<PromiseRaw<'env, ()>> {
    future_promise(env, async move {
        let ns = netns.map(PathBuf::from);
        blocking(move || isolation::add_dhcp_isolation(ns.as_deref(), &link)).await
    })
}

/// Removes exactly `link`'s isolation (a missing one is fine). `nft delete table bridge tapmanager-dhcp-<link>`.
#[napi(ts_return_type = "Promise<void>")]
pub fn remove_dhcp_isolation<'env>(
    env: &'env Env,
    netns: Option<String>,
    link: String,
) -> napi::Result<PromiseRaw<'env, ()>> {
    future_promise(env, async move {
        let ns = netns.map(PathBuf::from);
        blocking(move || isolation::remove_dhcp_isolation(ns.as_deref(), &link)).await
    })
}

/// The links isolated in a netns, sorted.
#[napi(ts_return_type = "Promise<Array<string>>")]
pub fn list_dhcp_isolation<'env>(env: &'env Env, netns: Option<String>) -> napi::Result<PromiseRaw<'env, Vec<String>>> {
    future_promise(env, async move {
        let ns = netns.map(PathBuf::from);
        blocking(move || isolation::list_dhcp_isolation(ns.as_deref())).await
    })
}

// ---------------------------------------------------------------- hardening helpers

/// True when `path` is a live namespace mount (nsfs), checked with `fstatfs` on an `O_PATH|O_NOFOLLOW` open:
/// a symlink, a plain file (a crash between creating the file and mounting), a dir or a missing path is false.
#[napi]
pub fn is_netns_mount(path: String) -> bool {
    netns::is_netns_mount(Path::new(&path))
}

/// Discards the frames queued on a tap fd (at most `maxFrames`, default 65536) without blocking; returns how
/// many. Call it right before handing the fd to a VM, while no one else reads it (see the core's `drain_tap_fd`).
#[napi]
pub fn drain_tap_fd(fd: i32, max_frames: Option<u32>) -> Result<u32, JsError> {
    tap::drain_tap_fd(fd, max_frames.unwrap_or(65_536) as usize).map_err(to_js)
}
