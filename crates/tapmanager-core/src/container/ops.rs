//! The network operations the container side needs, behind a small trait ([`NetOps`]), so the logic of
//! setup, teardown and recovery is unit-tested with an in-memory fake and runs for real over netlink, taps
//! and the DHCP isolation rules (see [`super::real`]).
//!
//! All IPv4 only: tapmanager, like Virtlet, moves only IPv4 configuration to the VM.

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;

use ipnet::Ipv4Net;

use crate::error::Result;
use crate::netlink::{rtprot, rtscope, VfConfig};
use crate::sriov::{VfDevice, VfRecord};

/// Route protocol `kernel` (routes the kernel adds for an address's subnet; never stripped).
pub const RTPROT_KERNEL: u8 = rtprot::KERNEL;
/// Route protocol `boot` (the default of `ip route add` and of CNI plugins).
pub const RTPROT_BOOT: u8 = rtprot::BOOT;
/// Route scope `universe` (`global`).
pub const RT_SCOPE_UNIVERSE: u8 = rtscope::UNIVERSE;
/// Route scope `link`.
pub const RT_SCOPE_LINK: u8 = rtscope::LINK;
/// The main routing table.
pub const RT_TABLE_MAIN: u32 = 254;

/// A link as `ip link show` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The interface index.
    pub index: u32,
    /// The interface name.
    pub name: String,
    /// The hardware address (links without one, like `lo`, have all zeros).
    pub mac: [u8; 6],
    /// The MTU.
    pub mtu: u32,
    /// `IFLA_INFO_KIND` (`veth`, `bridge`, `tun`, ...); `None` for a physical device.
    pub kind: Option<String>,
    /// The index of the bridge this link is a port of.
    pub master: Option<u32>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
}

/// An IPv4 address on a link, as `ip -4 addr show` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    /// The link's index.
    pub link: u32,
    /// Address and prefix length.
    pub net: Ipv4Net,
    /// The broadcast address, when set.
    pub broadcast: Option<Ipv4Addr>,
}

/// An IPv4 route of the main table, as `ip -4 route show` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The destination (`0.0.0.0/0` for the default route).
    pub dst: Ipv4Net,
    /// The gateway (`via`).
    pub gateway: Option<Ipv4Addr>,
    /// The output link's index (`dev`).
    pub oif: Option<u32>,
    /// `proto` (see [`RTPROT_KERNEL`], [`RTPROT_BOOT`]).
    pub protocol: u8,
    /// `scope` (see [`RT_SCOPE_UNIVERSE`], [`RT_SCOPE_LINK`]).
    pub scope: u8,
    /// `metric`.
    pub priority: Option<u32>,
    /// `src`.
    pub prefsrc: Option<Ipv4Addr>,
    /// The route table.
    pub table: u32,
}

impl Route {
    /// A route as CNI plugins and `ip route add <dst> [via <gw>] dev <link>` make it.
    pub fn new(dst: Ipv4Net, gateway: Option<Ipv4Addr>, oif: u32) -> Route {
        Route {
            dst,
            gateway,
            oif: Some(oif),
            protocol: RTPROT_BOOT,
            scope: if gateway.is_some() { RT_SCOPE_UNIVERSE } else { RT_SCOPE_LINK },
            priority: None,
            prefsrc: None,
            table: RT_TABLE_MAIN,
        }
    }

    /// `true` for the default route.
    pub fn is_default(&self) -> bool {
        self.dst.prefix_len() == 0
    }
}

/// What setup, teardown and recovery do to a network namespace. Every method acts on the netns the
/// implementation was opened in; each mutating method equals one `ip` (or `ebtables`) command.
pub trait NetOps {
    /// `ip link show`.
    fn links(&mut self) -> Result<Vec<Link>>;
    /// `ip -4 addr show`.
    fn addrs(&mut self) -> Result<Vec<Addr>>;
    /// `ip -4 route show table main`.
    fn routes(&mut self) -> Result<Vec<Route>>;
    /// `ip addr add <net> [brd <broadcast>] dev <link>`.
    fn add_addr(&mut self, addr: &Addr) -> Result<()>;
    /// `ip addr del <net> dev <link>`.
    fn del_addr(&mut self, addr: &Addr) -> Result<()>;
    /// `ip route add <dst> [via <gw>] dev <link> proto <p> scope <s> [metric <m>] [src <src>]`.
    fn add_route(&mut self, route: &Route) -> Result<()>;
    /// `ip route del <dst> [via <gw>] dev <link> proto <p> scope <s> [metric <m>]`.
    fn del_route(&mut self, route: &Route) -> Result<()>;
    /// `ip link set dev <link> up|down`.
    fn set_up(&mut self, link: u32, up: bool) -> Result<()>;
    /// `ip link set dev <link> address <mac>`.
    fn set_mac(&mut self, link: u32, mac: [u8; 6]) -> Result<()>;
    /// `ip link set dev <link> master <bridge>` (`Some`) or `nomaster` (`None`).
    fn set_master(&mut self, link: u32, master: Option<u32>) -> Result<()>;
    /// `ip tuntap add dev <name> mode tap` + `ip link set dev <name> mtu <mtu>` +
    /// `sysctl -w net.ipv6.conf.<name>.disable_ipv6=1`; returns the new index. The VM does its own IPv6 through
    /// the tap: the tap itself needs none (no link-local address, no DAD, router solicitations or MLD).
    fn create_tap(&mut self, name: &str, mtu: u32) -> Result<u32>;
    /// `ip link add <name> mtu <mtu> type bridge ageing_time 0` + `sysctl -w net.ipv6.conf.<name>.disable_ipv6=1`
    /// (the bridge's only address is the DHCP server's IPv4 one); returns the new index.
    fn create_bridge(&mut self, name: &str, mtu: u32) -> Result<u32>;
    /// `ip link del dev <link>`.
    fn delete_link(&mut self, link: u32) -> Result<()>;
    /// Adds the DHCP isolation of `link` (a port of `bridge`): no DHCP leaves through it.
    fn add_isolation(&mut self, link: &str, bridge: &str) -> Result<()>;
    /// Removes what [`NetOps::add_isolation`] added.
    fn remove_isolation(&mut self, link: &str, bridge: &str) -> Result<()>;
    /// Opens the tap `name` (`IFF_TAP | IFF_NO_PI`): the VM's end. `ERR_BUSY` when someone holds it.
    fn open_tap(&mut self, name: &str) -> Result<OwnedFd>;
    /// Whether `link` is an SR-IOV virtual function (`/sys/class/net/<name>/device/physfn` exists).
    fn is_sriov_vf(&mut self, link: &Link) -> Result<bool>;

    // ---- SR-IOV VFs (see crate::sriov) ----

    /// The PCI address of the VF `link` (`readlink /sys/class/net/<name>/device`).
    fn vf_pci(&mut self, link: &Link) -> Result<String>;
    /// The VF at `pci` (PF, index, IOMMU group, driver) and what its PF holds for it (`ip link show <pf>`).
    /// `ERR_SRIOV_PF_NOT_FOUND` / `ERR_SRIOV_NO_IOMMU_GROUP` when those are missing.
    fn vf_info(&mut self, pci: &str) -> Result<VfState>;
    /// A link's alias (`ip -d link show dev <link>`, the `alias` line).
    fn link_alias(&mut self, link: u32) -> Result<String>;
    /// `ip link set <pf> vf <n> mac <mac> vlan <vlan> qos <qos>` for the VF at `pci`.
    fn set_vf_config(&mut self, pci: &str, config: &VfConfig) -> Result<()>;
    /// Binds the VF at `pci` to vfio-pci (its netdev disappears) and waits for `/dev/vfio/<group>`.
    /// `ERR_SRIOV_NO_VFIO` without the driver, `ERR_SRIOV_VF_IN_USE` when the VF is taken.
    fn bind_vfio(&mut self, pci: &str) -> Result<()>;
    /// Gives the VF at `pci` back to its host driver and its netdev back to this netns as `name` with alias
    /// `alias` (empty: none), MAC `mac` and up when `up` (`ip link set dev <new> netns <pod> name <name> alias
    /// <alias> address <mac> up`). Nothing to do for a VF whose netdev is here already.
    fn return_vf(&mut self, pci: &str, name: &str, alias: &str, mac: [u8; 6], up: bool) -> Result<()>;
    /// Saves what release restores for a VF (before setup changes it).
    fn save_vf_record(&mut self, record: &VfRecord) -> Result<()>;
    /// The saved record of the VF at `pci`, if any.
    fn load_vf_record(&mut self, pci: &str) -> Result<Option<VfRecord>>;
    /// Removes the record of the VF at `pci` (none is fine).
    fn remove_vf_record(&mut self, pci: &str) -> Result<()>;
}

/// A VF and what its PF holds for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfState {
    /// The VF as sysfs describes it.
    pub device: VfDevice,
    /// The PF's name (in the netns where it was found).
    pub pf_name: String,
    /// The MAC and VLAN the PF holds for the VF.
    pub config: VfConfig,
}
