//! Links, addresses and routes over rtnetlink, each operation documented with the `ip` command it equals.
//!
//! A [`NetlinkHandle`] talks to one network namespace: its socket is created on a thread inside that netns
//! (via [`crate::netns::run_in_netns`]) and then used from async code on tokio, so no tokio worker ever enters
//! a pod namespace. Links are addressed by index ([`NetlinkHandle::link_by_name`] finds one); MACs are 6 bytes
//! ([`parse_mac`], [`format_mac`]). Netlink errors map to codes: `EEXIST` -> `ERR_EXISTS`, `ENODEV`/`ENOENT`
//! -> `ERR_NOT_FOUND`, `EBUSY` -> `ERR_BUSY`, `EPERM` -> `ERR_PERMISSION`, `EINVAL`/`ERANGE` -> `ERR_INVALID`,
//! anything else -> `ERR_NETLINK`.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoVeth, LinkAttribute, LinkExtentMask, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage, LinkVfInfo,
    VfInfo, VfInfoMac, VfInfoVlan,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth};

use crate::error::{Error, ErrorCode, Result};
use crate::types::MacAddr;

/// A MAC address.
pub type Mac = [u8; 6];

/// Formats a MAC as `aa:bb:cc:dd:ee:ff` (lower case): [`MacAddr`]'s `Display`.
pub fn format_mac(mac: &Mac) -> String {
    MacAddr(*mac).to_string()
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`) as [`MacAddr`]'s `FromStr` does; `ERR_INVALID` otherwise.
pub fn parse_mac(s: &str) -> Result<Mac> {
    s.parse::<MacAddr>().map(|m| m.0)
}

/// Checks a link name: 1..=15 bytes, no `/`, no whitespace, not `.`/`..` (the kernel's `dev_valid_name`).
pub fn validate_link_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
    {
        return Err(Error::invalid(format!("invalid link name {name:?} (1-15 characters, no '/', ':' or spaces)")));
    }
    Ok(())
}

/// Route protocol numbers (`RTPROT_*`) seen in [`RouteInfo::protocol`].
pub mod rtprot {
    /// Route installed by the kernel (e.g. for an address's subnet).
    pub const KERNEL: u8 = 2;
    /// Route installed during boot (`ip route add` without `proto`).
    pub const BOOT: u8 = 3;
    /// Route installed by an administrator.
    pub const STATIC: u8 = 4;
    /// Route installed by a DHCP client.
    pub const DHCP: u8 = 16;
}

/// Route scope numbers (`RT_SCOPE_*`) seen in [`RouteInfo::scope`].
pub mod rtscope {
    /// Global (`scope global`).
    pub const UNIVERSE: u8 = 0;
    /// Link (`scope link`): a directly reachable destination.
    pub const LINK: u8 = 253;
    /// Host (`scope host`): a local address.
    pub const HOST: u8 = 254;
}

/// A link as `ip -d link show` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// The interface index.
    pub index: u32,
    /// The name, e.g. `eth0`.
    pub name: String,
    /// The kind from `IFLA_INFO_KIND` (`veth`, `bridge`, `tun`, `macvtap`, ...); `None` for `lo` and physical NICs.
    pub kind: Option<String>,
    /// The MAC address, when the link has a 6-byte hardware address.
    pub mac: Option<Mac>,
    /// The MTU.
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// The raw `IFF_*` flags.
    pub flags: u32,
    /// The index of the link's master (the bridge it is a port of), if any.
    pub master: Option<u32>,
    /// The device group (`ip link show group`; 0 = default).
    pub group: u32,
}

/// What a PF holds for one of its VFs: the `vf <n>` line of `ip link show <pf>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VfConfig {
    /// The MAC the PF gives the VF (all zeros: none set, the VF driver picks one).
    pub mac: Mac,
    /// The VLAN id (0 = none).
    pub vlan: u32,
    /// The VLAN priority.
    pub qos: u32,
}

/// An address as `ip addr show` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressInfo {
    /// The index of the link holding the address.
    pub index: u32,
    /// The address (`IFA_LOCAL` for IPv4, `IFA_ADDRESS` for IPv6).
    pub address: IpAddr,
    /// The prefix length.
    pub prefix_len: u8,
    /// The scope (`RT_SCOPE_*`, see [`rtscope`]).
    pub scope: u8,
}

/// A route as `ip route show` describes it (main table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    /// The destination; `None` for a default route.
    pub dst: Option<IpAddr>,
    /// The destination prefix length (0 for a default route).
    pub dst_len: u8,
    /// The gateway (`via`).
    pub gateway: Option<IpAddr>,
    /// The output interface index (`dev`).
    pub oif: Option<u32>,
    /// The protocol (`proto`, `RTPROT_*`, see [`rtprot`]).
    pub protocol: u8,
    /// The scope (`scope`, `RT_SCOPE_*`, see [`rtscope`]).
    pub scope: u8,
    /// The routing table id (254 = main).
    pub table: u32,
    /// The metric (`metric`), when set.
    pub priority: Option<u32>,
    /// The preferred source (`src`), when set.
    pub pref_src: Option<IpAddr>,
    /// True for IPv6 routes.
    pub ipv6: bool,
}

/// A route to add or delete. At least one of `dst` and `gateway` must be set (they fix the family).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSpec {
    /// The destination network; `None` is the default route.
    pub dst: Option<IpAddr>,
    /// The destination prefix length (ignored when `dst` is `None`).
    pub dst_len: u8,
    /// The gateway (`via`).
    pub gateway: Option<IpAddr>,
    /// The output interface index (`dev`).
    pub oif: Option<u32>,
    /// The scope; default: `link` without a gateway, `global` with one.
    pub scope: Option<u8>,
    /// The protocol; default `boot` (what `ip route add` uses).
    pub protocol: Option<u8>,
    /// The metric.
    pub priority: Option<u32>,
    /// The table; default main (254).
    pub table: Option<u32>,
}

/// Maps an rtnetlink error to the core error, with what was being done.
pub(crate) fn nl_error(context: impl std::fmt::Display, e: rtnetlink::Error) -> Error {
    match e {
        rtnetlink::Error::NetlinkError(msg) => {
            let io = msg.to_io();
            let code = match io.raw_os_error() {
                Some(libc::EEXIST) => ErrorCode::Exists,
                Some(libc::ENODEV) | Some(libc::ENOENT) | Some(libc::ESRCH) | Some(libc::EADDRNOTAVAIL) => {
                    ErrorCode::NotFound
                }
                Some(libc::EBUSY) => ErrorCode::Busy,
                Some(libc::EPERM) | Some(libc::EACCES) => ErrorCode::Permission,
                Some(libc::EINVAL) | Some(libc::ERANGE) | Some(libc::EOPNOTSUPP) => ErrorCode::Invalid,
                _ => ErrorCode::Netlink,
            };
            Error::new(code, format!("{context}: {io}"))
        }
        other => Error::new(ErrorCode::Netlink, format!("{context}: {other}")),
    }
}

/// A netlink (`NETLINK_ROUTE`) connection to one network namespace. Cheap to clone; the connection closes
/// when the last clone is dropped. Methods are async and must run on a tokio runtime.
#[derive(Clone)]
pub struct NetlinkHandle {
    handle: rtnetlink::Handle,
    netns: Option<PathBuf>,
    _conn: std::sync::Arc<ConnGuard>,
}

struct ConnGuard(tokio::task::JoinHandle<()>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::fmt::Debug for NetlinkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetlinkHandle").field("netns", &self.netns).finish()
    }
}

impl NetlinkHandle {
    /// Opens a connection to the netns at `netns` (`None`: the netns of the calling thread). The socket is
    /// created on a short-lived thread inside that netns. Must be called inside a tokio runtime (the
    /// connection task is spawned on it); blocks only for that thread (well under a millisecond).
    pub fn open(netns: Option<&Path>) -> Result<NetlinkHandle> {
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::new(ErrorCode::Io, "NetlinkHandle::open needs a tokio runtime"))?;
        let make = {
            let rt = rt.clone();
            move || -> Result<_> {
                // The socket is registered with the runtime's reactor, which needs the runtime entered.
                let _enter = rt.enter();
                let (conn, handle, _) =
                    rtnetlink::new_connection().map_err(|e| Error::io("open a NETLINK_ROUTE socket", e))?;
                Ok((conn, handle))
            }
        };
        let (conn, handle) = match netns {
            Some(p) => crate::netns::run_in_netns(p, make)?,
            None => make()?,
        };
        let task = rt.spawn(conn);
        Ok(NetlinkHandle { handle, netns: netns.map(Path::to_path_buf), _conn: std::sync::Arc::new(ConnGuard(task)) })
    }

    /// The netns this handle talks to (`None`: the opener's).
    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_deref()
    }

    // ---- links ----

    /// Lists all links. Equivalent to `ip -d link show`.
    pub async fn links(&self) -> Result<Vec<LinkInfo>> {
        let mut out = Vec::new();
        let mut stream = self.handle.link().get().execute();
        while let Some(msg) = stream.try_next().await.map_err(|e| nl_error("list links", e))? {
            out.push(link_info(&msg));
        }
        Ok(out)
    }

    /// Gets the link named `name`; `ERR_NOT_FOUND` when there is none. Equivalent to `ip -d link show dev <name>`.
    pub async fn link_by_name(&self, name: &str) -> Result<LinkInfo> {
        validate_link_name(name)?;
        let mut stream = self.handle.link().get().match_name(name.to_string()).execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(link_info(&msg)),
            Ok(None) => Err(Error::new(ErrorCode::NotFound, format!("link {name:?} not found"))),
            Err(e) => Err(nl_error(format!("get link {name:?}"), e)),
        }
    }

    /// Gets the link with index `index`. Equivalent to `ip -d link show` filtered on the index.
    pub async fn link_by_index(&self, index: u32) -> Result<LinkInfo> {
        let mut stream = self.handle.link().get().match_index(index).execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(link_info(&msg)),
            Ok(None) => Err(Error::new(ErrorCode::NotFound, format!("link #{index} not found"))),
            Err(e) => Err(nl_error(format!("get link #{index}"), e)),
        }
    }

    /// Creates a veth pair `name` <-> `peer` (both down); the peer is created directly in the netns given by `peer_netns`
    /// (an open netns file) when set. Returns the index of `name`. Equivalent to
    /// `ip link add <name> type veth peer name <peer> [netns <fd>]`.
    pub async fn create_veth(&self, name: &str, peer: &str, peer_netns: Option<BorrowedFd<'_>>) -> Result<u32> {
        validate_link_name(name)?;
        validate_link_name(peer)?;
        let mut builder = LinkVeth::new(name, peer);
        if let Some(fd) = peer_netns {
            let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
                .name(peer.to_string())
                .append_extra_attribute(LinkAttribute::NetNsFd(fd.as_raw_fd()))
                .build();
            builder = builder.set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)));
        }
        let ctx = format!("create veth {name:?} peer {peer:?}");
        self.handle.link().add(builder.build()).execute().await.map_err(|e| nl_error(&ctx, e))?;
        Ok(self.link_by_name(name).await.map_err(|e| e.context(&ctx))?.index)
    }

    /// Creates a bridge (down) with MAC learning off (ageing time 0, Virtlet #506) and, when given, an MTU.
    /// Returns its index. Equivalent to `ip link add <name> [mtu <mtu>] type bridge ageing_time 0`.
    pub async fn create_bridge(&self, name: &str, mtu: Option<u32>) -> Result<u32> {
        validate_link_name(name)?;
        // `LinkBridge::new` would bring it up; like `ip link add` it is created down.
        let mut builder = LinkMessageBuilder::<LinkBridge>::new(name).ageing_time(0);
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        let ctx = format!("create bridge {name:?}");
        self.handle.link().add(builder.build()).execute().await.map_err(|e| nl_error(&ctx, e))?;
        Ok(self.link_by_name(name).await.map_err(|e| e.context(&ctx))?.index)
    }

    async fn set(&self, msg: LinkMessage, ctx: String) -> Result<()> {
        self.handle.link().set(msg).execute().await.map_err(|e| nl_error(ctx, e))
    }

    /// Brings a link up. Equivalent to `ip link set dev <link> up`.
    pub async fn set_up(&self, index: u32) -> Result<()> {
        self.set(LinkUnspec::new_with_index(index).up().build(), format!("set link #{index} up")).await
    }

    /// Brings a link down. Equivalent to `ip link set dev <link> down`.
    pub async fn set_down(&self, index: u32) -> Result<()> {
        self.set(LinkUnspec::new_with_index(index).down().build(), format!("set link #{index} down")).await
    }

    /// Sets a link's MAC. Equivalent to `ip link set dev <link> address <mac>`.
    pub async fn set_mac(&self, index: u32, mac: Mac) -> Result<()> {
        let ctx = format!("set link #{index} address {}", format_mac(&mac));
        self.set(LinkUnspec::new_with_index(index).address(mac.to_vec()).build(), ctx).await
    }

    /// Sets a link's MTU. Equivalent to `ip link set dev <link> mtu <mtu>`.
    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        self.set(LinkUnspec::new_with_index(index).mtu(mtu).build(), format!("set link #{index} mtu {mtu}")).await
    }

    /// Renames a link (it must be down). Equivalent to `ip link set dev <link> name <name>`.
    pub async fn set_name(&self, index: u32, name: &str) -> Result<()> {
        validate_link_name(name)?;
        let ctx = format!("rename link #{index} to {name:?}");
        self.set(LinkUnspec::new_with_index(index).name(name.to_string()).build(), ctx).await
    }

    /// Makes a link a port of `master` (a bridge). Equivalent to `ip link set dev <link> master <bridge>`.
    pub async fn set_master(&self, index: u32, master: u32) -> Result<()> {
        let ctx = format!("set link #{index} master #{master}");
        self.set(LinkUnspec::new_with_index(index).controller(master).build(), ctx).await
    }

    /// Takes a link out of its bridge. Equivalent to `ip link set dev <link> nomaster`.
    pub async fn set_nomaster(&self, index: u32) -> Result<()> {
        self.set(LinkUnspec::new_with_index(index).nocontroller().build(), format!("set link #{index} nomaster")).await
    }

    /// Moves a link into the netns given by an open netns file. Equivalent to `ip link set dev <link> netns <ns>`.
    pub async fn set_netns(&self, index: u32, netns: BorrowedFd<'_>) -> Result<()> {
        let ctx = format!("move link #{index} to another netns");
        self.set(LinkUnspec::new_with_index(index).setns_by_fd(netns.as_raw_fd()).build(), ctx).await
    }

    /// Deletes a link (for a veth, both ends). Equivalent to `ip link delete dev <link>`.
    pub async fn delete_link(&self, index: u32) -> Result<()> {
        self.handle.link().del(index).execute().await.map_err(|e| nl_error(format!("delete link #{index}"), e))
    }

    /// Deletes several links in one kernel batch: the kernel then waits once, not once per link, for the
    /// grace periods that unregistering a device needs (under load each wait takes tens of milliseconds).
    /// Equivalent to `ip link set dev <link> group <g>` for each, then `ip link delete group <g>`, with a fresh
    /// group id; before deleting, the group is checked to hold exactly these links (else they are restored to
    /// group 0 and deleted one by one). `ERR_NOT_FOUND` when one does not exist (nothing is deleted then).
    pub async fn delete_links(&self, indices: &[u32]) -> Result<()> {
        match indices {
            [] => return Ok(()),
            [one] => return self.delete_link(*one).await,
            _ => {}
        }
        let group = next_group();
        let mut grouped = Vec::new();
        let mut failed = None;
        for &i in indices {
            let msg = LinkUnspec::new_with_index(i).link_group(group).build();
            match self.set(msg, format!("delete links: set link #{i} group {group}")).await {
                Ok(()) => grouped.push(i),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let exact = failed.is_none() && {
            let mut members: Vec<u32> =
                self.links().await?.into_iter().filter(|l| l.group == group).map(|l| l.index).collect();
            let mut wanted = indices.to_vec();
            members.sort_unstable();
            wanted.sort_unstable();
            wanted.dedup();
            members == wanted
        };
        if !exact {
            for &i in &grouped {
                let _ = self.set(LinkUnspec::new_with_index(i).link_group(0).build(), String::new()).await;
            }
            if let Some(e) = failed {
                return Err(e);
            }
            for &i in indices {
                self.delete_link(i).await?;
            }
            return Ok(());
        }
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::Group(group));
        let ctx = format!("delete links {indices:?} (group {group})");
        self.handle.link().del_with_message(msg).execute().await.map_err(|e| nl_error(ctx, e))
    }

    /// Sets a link's alias (`IFLA_IFALIAS`; an empty alias removes it). Equivalent to `ip link set dev <link> alias <a>`.
    pub async fn set_alias(&self, index: u32, alias: &str) -> Result<()> {
        let msg =
            LinkUnspec::new_with_index(index).append_extra_attribute(LinkAttribute::IfAlias(alias.to_string())).build();
        self.set(msg, format!("set link #{index} alias {alias:?}")).await
    }

    /// A link's alias (`IFLA_IFALIAS`, empty when none). As shown by `ip -d link show dev <link>`.
    pub async fn link_alias(&self, index: u32) -> Result<String> {
        let mut stream = self.handle.link().get().match_index(index).execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(msg
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::IfAlias(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default()),
            Ok(None) => Err(Error::new(ErrorCode::NotFound, format!("link #{index} not found"))),
            Err(e) => Err(nl_error(format!("get link #{index}"), e)),
        }
    }

    // ---- SR-IOV virtual functions, through their PF ----

    /// The MAC and VLAN the PF `pf` holds for its VF number `vf` (`IFLA_VFINFO_LIST`, asked for with
    /// `RTEXT_FILTER_VF`). As shown by the `vf <n> link/ether <mac>, vlan <v>, qos <q>` line of `ip link show <pf>`.
    pub async fn vf_config(&self, pf: u32, vf: u32) -> Result<VfConfig> {
        let ctx = format!("read VF {vf} of link #{pf}");
        let mut stream = self
            .handle
            .link()
            .get()
            .match_index(pf)
            .set_filter_mask(AddressFamily::Unspec, vec![LinkExtentMask::Vf])
            .execute();
        let msg = match stream.try_next().await {
            Ok(Some(msg)) => msg,
            Ok(None) => return Err(Error::new(ErrorCode::NotFound, format!("{ctx}: link not found"))),
            Err(e) => return Err(nl_error(ctx, e)),
        };
        let vfs = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::VfInfoList(l) => Some(l),
            _ => None,
        });
        for info in vfs.into_iter().flatten() {
            let mut mac = None;
            let mut vlan = (0, 0);
            for i in &info.0 {
                match i {
                    VfInfo::Mac(m) if m.vf_id == vf => {
                        let mut a = [0u8; 6];
                        a.copy_from_slice(&m.mac[..6]);
                        mac = Some(a);
                    }
                    VfInfo::Vlan(v) if v.vf_id == vf => vlan = (v.vlan_id, v.qos),
                    _ => {}
                }
            }
            if let Some(mac) = mac {
                return Ok(VfConfig { mac, vlan: vlan.0, qos: vlan.1 });
            }
        }
        Err(Error::new(ErrorCode::NotFound, format!("{ctx}: the PF reports no such VF")))
    }

    /// Sets the MAC and VLAN of VF number `vf` through its PF `pf` (`IFLA_VF_MAC`, `IFLA_VF_VLAN` in
    /// `IFLA_VFINFO_LIST`). Equivalent to `ip link set dev <pf> vf <vf> mac <mac> vlan <vlan> qos <qos>`.
    pub async fn set_vf_config(&self, pf: u32, vf: u32, config: &VfConfig) -> Result<()> {
        let ctx = format!(
            "set VF {vf} of link #{pf} mac {} vlan {} qos {}",
            format_mac(&config.mac),
            config.vlan,
            config.qos
        );
        let info = LinkVfInfo(vec![
            VfInfo::Mac(VfInfoMac::new(vf, &config.mac)),
            VfInfo::Vlan(VfInfoVlan::new(vf, config.vlan, config.qos)),
        ]);
        let msg = LinkUnspec::new_with_index(pf).append_extra_attribute(LinkAttribute::VfInfoList(vec![info])).build();
        self.set(msg, ctx).await
    }

    // ---- addresses ----

    /// Lists addresses (IPv4 and IPv6), of one link when `index` is set. Equivalent to `ip addr show [dev <link>]`.
    pub async fn addresses(&self, index: Option<u32>) -> Result<Vec<AddressInfo>> {
        let mut req = self.handle.address().get();
        if let Some(i) = index {
            req = req.set_link_index_filter(i);
        }
        let mut stream = req.execute();
        let mut out = Vec::new();
        while let Some(msg) = stream.try_next().await.map_err(|e| nl_error("list addresses", e))? {
            if let Some(a) = address_info(&msg) {
                if index.is_none_or(|i| i == a.index) {
                    out.push(a);
                }
            }
        }
        Ok(out)
    }

    /// Adds an address. Equivalent to `ip addr add <addr>/<prefix_len> dev <link>` (IPv4 gets the broadcast
    /// address `ip` would give it with `brd +`).
    pub async fn add_address(&self, index: u32, address: IpAddr, prefix_len: u8) -> Result<()> {
        check_prefix(address, prefix_len)?;
        let ctx = format!("add address {address}/{prefix_len} to link #{index}");
        self.handle.address().add(index, address, prefix_len).execute().await.map_err(|e| nl_error(ctx, e))
    }

    /// Deletes an address. Equivalent to `ip addr del <addr>/<prefix_len> dev <link>`.
    pub async fn delete_address(&self, index: u32, address: IpAddr, prefix_len: u8) -> Result<()> {
        check_prefix(address, prefix_len)?;
        let mut msg = AddressMessage::default();
        msg.header.family = family_of(address);
        msg.header.prefix_len = prefix_len;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(address));
        if address.is_ipv6() {
            msg.attributes.clear();
            msg.attributes.push(AddressAttribute::Address(address));
        }
        let ctx = format!("delete address {address}/{prefix_len} from link #{index}");
        self.handle.address().del(msg).execute().await.map_err(|e| nl_error(ctx, e))
    }

    // ---- routes ----

    /// Lists the routes of the main table, IPv4 then IPv6. Equivalent to `ip route show` plus `ip -6 route show`.
    pub async fn routes(&self) -> Result<Vec<RouteInfo>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            let mut stream = self.handle.route().get(msg).execute();
            while let Some(m) = stream.try_next().await.map_err(|e| nl_error("list routes", e))? {
                let r = route_info(&m);
                if r.table == u32::from(RouteHeader::RT_TABLE_MAIN) && m.header.kind == RouteType::Unicast {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    /// Adds a route. Equivalent to `ip route add <dst>/<len>|default [via <gw>] [dev <link>] [proto ..] [scope ..]
    /// [metric ..] [table ..]`.
    pub async fn add_route(&self, spec: &RouteSpec) -> Result<()> {
        let msg = route_message(spec)?;
        let ctx = format!("add route {}", describe_route(spec));
        self.handle.route().add(msg).execute().await.map_err(|e| nl_error(ctx, e))
    }

    /// Deletes a route. Equivalent to `ip route del <dst>/<len>|default [via <gw>] [dev <link>] [table ..]`.
    pub async fn delete_route(&self, spec: &RouteSpec) -> Result<()> {
        let mut msg = route_message(spec)?;
        // Deleting matches on what is given: leave protocol and scope unset unless asked.
        msg.header.protocol = spec.protocol.map(RouteProtocol::from).unwrap_or(RouteProtocol::Unspec);
        msg.header.scope = spec.scope.map(RouteScope::from).unwrap_or(RouteScope::NoWhere);
        let ctx = format!("delete route {}", describe_route(spec));
        self.handle.route().del(msg).execute().await.map_err(|e| nl_error(ctx, e))
    }
}

/// A device group id for [`NetlinkHandle::delete_links`]: random high base, then counting (never 0).
fn next_group() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let _ = NEXT.compare_exchange(0, rand::random::<u32>() | 0x8000_0000, Ordering::Relaxed, Ordering::Relaxed);
    NEXT.fetch_add(1, Ordering::Relaxed) | 0x8000_0000
}

fn family_of(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn check_prefix(ip: IpAddr, len: u8) -> Result<()> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(Error::invalid(format!("prefix length {len} is out of range for {ip}")));
    }
    Ok(())
}

fn describe_route(spec: &RouteSpec) -> String {
    let mut s = match spec.dst {
        Some(d) => format!("{d}/{}", spec.dst_len),
        None => "default".to_string(),
    };
    if let Some(g) = spec.gateway {
        s.push_str(&format!(" via {g}"));
    }
    if let Some(o) = spec.oif {
        s.push_str(&format!(" dev #{o}"));
    }
    s
}

fn route_message(spec: &RouteSpec) -> Result<RouteMessage> {
    let family_ip = spec.dst.or(spec.gateway).ok_or_else(|| {
        Error::invalid("a route needs a destination or a gateway (the default route needs a gateway)")
    })?;
    if let (Some(d), Some(g)) = (spec.dst, spec.gateway) {
        if d.is_ipv4() != g.is_ipv4() {
            return Err(Error::invalid(format!("route destination {d} and gateway {g} are of different families")));
        }
    }
    let mut msg = RouteMessage::default();
    msg.header.address_family = family_of(family_ip);
    msg.header.kind = RouteType::Unicast;
    msg.header.protocol = RouteProtocol::from(spec.protocol.unwrap_or(rtprot::BOOT));
    let default_scope = if spec.gateway.is_some() { rtscope::UNIVERSE } else { rtscope::LINK };
    msg.header.scope = RouteScope::from(spec.scope.unwrap_or(default_scope));
    let table = spec.table.unwrap_or(u32::from(RouteHeader::RT_TABLE_MAIN));
    if table < 256 {
        msg.header.table = table as u8;
    } else {
        msg.header.table = 252; // RT_TABLE_COMPAT: the real id is in the attribute
    }
    msg.attributes.push(RouteAttribute::Table(table));
    if let Some(d) = spec.dst {
        check_prefix(d, spec.dst_len)?;
        msg.header.destination_prefix_length = spec.dst_len;
        msg.attributes.push(RouteAttribute::Destination(RouteAddress::from(d)));
    }
    if let Some(g) = spec.gateway {
        msg.attributes.push(RouteAttribute::Gateway(RouteAddress::from(g)));
    }
    if let Some(o) = spec.oif {
        msg.attributes.push(RouteAttribute::Oif(o));
    }
    if let Some(p) = spec.priority {
        msg.attributes.push(RouteAttribute::Priority(p));
    }
    Ok(msg)
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn route_info(m: &RouteMessage) -> RouteInfo {
    let mut r = RouteInfo {
        dst: None,
        dst_len: m.header.destination_prefix_length,
        gateway: None,
        oif: None,
        protocol: u8::from(m.header.protocol),
        scope: u8::from(m.header.scope),
        table: u32::from(m.header.table),
        priority: None,
        pref_src: None,
        ipv6: m.header.address_family == AddressFamily::Inet6,
    };
    for attr in &m.attributes {
        match attr {
            RouteAttribute::Destination(a) => r.dst = route_addr(a),
            RouteAttribute::Gateway(a) => r.gateway = route_addr(a),
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            RouteAttribute::Table(t) => r.table = *t,
            RouteAttribute::Priority(p) => r.priority = Some(*p),
            RouteAttribute::PrefSource(a) => r.pref_src = route_addr(a),
            _ => {}
        }
    }
    r
}

fn address_info(m: &AddressMessage) -> Option<AddressInfo> {
    let mut local = None;
    let mut addr = None;
    for attr in &m.attributes {
        match attr {
            AddressAttribute::Local(a) => local = Some(*a),
            AddressAttribute::Address(a) => addr = Some(*a),
            _ => {}
        }
    }
    Some(AddressInfo {
        index: m.header.index,
        address: local.or(addr)?,
        prefix_len: m.header.prefix_len,
        scope: u8::from(m.header.scope),
    })
}

fn link_info(m: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: m.header.index,
        name: String::new(),
        kind: None,
        mac: None,
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        flags: m.header.flags.bits(),
        master: None,
        group: 0,
    };
    for attr in &m.attributes {
        match attr {
            LinkAttribute::IfName(n) => info.name = n.clone(),
            LinkAttribute::Group(g) => info.group = *g,
            LinkAttribute::Mtu(n) => info.mtu = *n,
            LinkAttribute::Controller(i) => info.master = Some(*i),
            LinkAttribute::Address(a) if a.len() == 6 => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(a);
                info.mac = Some(mac);
            }
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let NlLinkInfo::Kind(k) = i {
                        info.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_round_trip_and_reject_garbage() {
        let mac = parse_mac("02:AB:cd:00:11:ff").unwrap();
        assert_eq!(format_mac(&mac), "02:ab:cd:00:11:ff");
        for bad in ["", "02:ab", "02:ab:cd:00:11:ff:00", "0g:ab:cd:00:11:ff", "002:ab:cd:00:11:f"] {
            assert_eq!(parse_mac(bad).unwrap_err().code, ErrorCode::Invalid, "{bad}");
        }
    }

    #[test]
    fn link_names_follow_the_kernel_rules() {
        assert!(validate_link_name("tap0").is_ok());
        assert!(validate_link_name("abcdefghijklmno").is_ok());
        for bad in ["", "abcdefghijklmnop", "a/b", "a b", ".", ".."] {
            assert_eq!(validate_link_name(bad).unwrap_err().code, ErrorCode::Invalid, "{bad}");
        }
    }

    #[test]
    fn route_specs_need_a_family() {
        assert_eq!(route_message(&RouteSpec::default()).unwrap_err().code, ErrorCode::Invalid);
        let mixed = RouteSpec {
            dst: Some("10.0.0.0".parse().unwrap()),
            dst_len: 8,
            gateway: Some("fe80::1".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(route_message(&mixed).unwrap_err().code, ErrorCode::Invalid);
        let bad_len = RouteSpec { dst: Some("10.0.0.0".parse().unwrap()), dst_len: 33, ..Default::default() };
        assert_eq!(route_message(&bad_len).unwrap_err().code, ErrorCode::Invalid);
    }
}
