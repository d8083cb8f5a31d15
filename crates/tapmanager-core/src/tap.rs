//! Tap devices through `/dev/net/tun` (netlink cannot create taps: `tun_validate()` refuses).
//!
//! A tap is created in the netns of the thread that opens `/dev/net/tun`, so every function takes the netns
//! (`Some(path)`: the work runs on a short-lived thread inside it via [`run_in_netns`]; `None`: the calling
//! thread's netns, for callers already on a netns thread). The ioctls follow what cloud-hypervisor's
//! `net_util` does: `TUNGETFEATURES`, `TUNSETIFF` with `IFF_TAP|IFF_NO_PI` (+ `IFF_VNET_HDR`,
//! `IFF_MULTI_QUEUE`), `TUNSETPERSIST`.
//!
//! A single-queue tap can be attached by one fd at a time: opening one that a VM holds fails with `ERR_BUSY`
//! (the kernel's `EBUSY`), which callers treat as "a VM is running", not as a failure.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, ErrorCode, Result};
use crate::netlink::validate_link_name;
use crate::netns::in_netns;

const TUN_PATH: &str = "/dev/net/tun";

// From linux/if_tun.h (_IOW('T', n, int) / _IOR('T', n, unsigned int)).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNGETFEATURES: libc::c_ulong = 0x8004_54cf;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_VNET_HDR: i16 = 0x4000;
const IFF_TUN_EXCL: i16 = -0x8000; // 0x8000 as the kernel's short
const IFF_PERSIST: i16 = 0x0800;

/// The most queues a multi-queue tap may have (the kernel's `MAX_TAP_QUEUES`).
pub const MAX_QUEUES: u32 = 256;

/// How to create a tap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TapCreateOptions {
    /// The MTU to set; `None` keeps the kernel's default (1500).
    pub mtu: Option<u32>,
    /// Create a multi-queue tap (`IFF_MULTI_QUEUE`): it must then always be opened with queues.
    pub multi_queue: bool,
    /// Bring it up after creating it (`ip link set dev <tap> up`).
    pub up: bool,
}

/// How to open a tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapOpenOptions {
    /// Ask for the virtio-net header on every frame (`IFF_VNET_HDR`).
    pub vnet_hdr: bool,
    /// The number of queues: 1 opens a single-queue tap; N > 1 opens a multi-queue tap N times (N fds).
    pub queues: u32,
}

impl Default for TapOpenOptions {
    fn default() -> Self {
        TapOpenOptions { vnet_hdr: false, queues: 1 }
    }
}

/// The `struct ifreq` layout: a 16-byte name and a 24-byte union (flags: the first `short`, MTU: first `int`).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut r = IfReq { name: [0; 16], data: [0; 24] };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }
    fn set_short(&mut self, v: i16) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }
    fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }
    fn set_int(&mut self, v: i32) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }
}

fn ioctl_ptr<T>(fd: RawFd, req: libc::c_ulong, arg: *mut T) -> std::io::Result<()> {
    // SAFETY: `fd` is an open descriptor owned by the caller and `arg` points to a live, properly sized
    // struct (an `IfReq` or a `u32`) for the duration of the call, as the ioctl expects.
    let rc = unsafe { libc::ioctl(fd, req, arg) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_int(fd: RawFd, req: libc::c_ulong, arg: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: the ioctls used here (`TUNSETPERSIST`) take their argument by value; `fd` is open.
    let rc = unsafe { libc::ioctl(fd, req, arg) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn open_tun() -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(TUN_PATH)
        .map_err(|e| Error::io(format!("open {TUN_PATH}"), e))
}

/// `TUNGETFEATURES`: the `IFF_*` flags the kernel's tun driver supports.
fn features(tun: &File) -> Result<i32> {
    let mut f: u32 = 0;
    ioctl_ptr(tun.as_raw_fd(), TUNGETFEATURES, &mut f).map_err(|e| Error::io("TUNGETFEATURES", e))?;
    Ok(f as i32)
}

fn set_iff(tun: &File, name: &str, flags: i16) -> std::io::Result<()> {
    let mut req = IfReq::new(name);
    req.set_short(flags);
    ioctl_ptr(tun.as_raw_fd(), TUNSETIFF, &mut req)
}

/// A datagram socket in the current netns for the `SIOC*IF*` ioctls.
fn ctl_socket() -> Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked and wrapped in an OwnedFd at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Error::io("socket(AF_INET)", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn if_index_here(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(|e| Error::errno(format!("tap {name:?}"), e))
}

/// Creates a persistent tap `name` in the calling thread's netns. Equivalent to
/// `ip tuntap add dev <name> mode tap [multi_queue]` then `ip link set dev <name> [mtu <mtu>] [up]`.
/// `ERR_EXISTS` when a link of that name exists. Nothing is left behind on failure.
pub fn create_tap_here(name: &str, opts: &TapCreateOptions) -> Result<()> {
    validate_link_name(name)?;
    let tun = open_tun()?;
    let ctx = || format!("create tap {name:?}");
    let mut flags = IFF_TAP | IFF_NO_PI | IFF_TUN_EXCL;
    if opts.multi_queue {
        if features(&tun)? & i32::from(IFF_MULTI_QUEUE) == 0 {
            return Err(Error::invalid("this kernel's tun driver has no multi-queue support"));
        }
        flags |= IFF_MULTI_QUEUE;
    }
    set_iff(&tun, name, flags).map_err(|e| {
        // IFF_TUN_EXCL answers EBUSY for a name in use.
        if e.raw_os_error() == Some(libc::EBUSY) {
            Error::new(ErrorCode::Exists, format!("{}: a link of that name exists", ctx()))
        } else {
            Error::io(ctx(), e)
        }
    })?;
    ioctl_int(tun.as_raw_fd(), TUNSETPERSIST, 1).map_err(|e| Error::io(format!("{}: TUNSETPERSIST", ctx()), e))?;
    let configured = configure_here(name, opts);
    if let Err(e) = configured {
        // Undo: a non-persistent tap disappears when its last fd closes.
        let _ = ioctl_int(tun.as_raw_fd(), TUNSETPERSIST, 0);
        return Err(e.context(ctx()));
    }
    Ok(())
}

fn configure_here(name: &str, opts: &TapCreateOptions) -> Result<()> {
    if opts.mtu.is_none() && !opts.up {
        return Ok(());
    }
    let sock = ctl_socket()?;
    if let Some(mtu) = opts.mtu {
        let mut req = IfReq::new(name);
        req.set_int(mtu as i32);
        ioctl_ptr(sock.as_raw_fd(), libc::SIOCSIFMTU, &mut req).map_err(|e| Error::io(format!("set mtu {mtu}"), e))?;
    }
    if opts.up {
        let mut req = IfReq::new(name);
        ioctl_ptr(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req).map_err(|e| Error::io("get flags", e))?;
        let f = req.short() | libc::IFF_UP as i16;
        req.set_short(f);
        ioctl_ptr(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req).map_err(|e| Error::io("set up", e))?;
    }
    Ok(())
}

/// Opens the existing tap `name` in the calling thread's netns and returns its fd(s): one for a single-queue
/// open, `opts.queues` for a multi-queue one (the tap must have been created multi-queue). What a VM gets as
/// `-netdev tap,fd=N`. `ERR_NOT_FOUND` when no such link exists, `ERR_INVALID` when it is not a tap or the
/// queue mode does not match, `ERR_BUSY` when a single-queue tap is already held (by a VM).
pub fn open_tap_here(name: &str, opts: &TapOpenOptions) -> Result<Vec<OwnedFd>> {
    validate_link_name(name)?;
    if opts.queues == 0 || opts.queues > MAX_QUEUES {
        return Err(Error::invalid(format!("queues must be 1..={MAX_QUEUES}, not {}", opts.queues)));
    }
    // TUNSETIFF would create a missing tap: check that it exists first.
    if_index_here(name)?;
    let mut flags = IFF_TAP | IFF_NO_PI;
    if opts.vnet_hdr {
        flags |= IFF_VNET_HDR;
    }
    if opts.queues > 1 {
        flags |= IFF_MULTI_QUEUE;
    }
    let mut fds = Vec::with_capacity(opts.queues as usize);
    for q in 0..opts.queues {
        let tun = open_tun()?;
        set_iff(&tun, name, flags).map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => {
                Error::new(ErrorCode::Busy, format!("open tap {name:?}: held by another process (a VM)"))
            }
            Some(libc::EINVAL) => Error::invalid(format!(
                "open tap {name:?}: not a tap, or its queue mode differs ({} requested)",
                if opts.queues > 1 { "multi-queue" } else { "single-queue" }
            )),
            _ => Error::io(format!("open tap {name:?} queue {q}"), e),
        })?;
        // Make the fd blocking again: the VM decides; O_NONBLOCK only kept the opens from hanging.
        // SAFETY: fcntl on an fd we own; flags are read and written back without O_NONBLOCK.
        unsafe {
            let fl = libc::fcntl(tun.as_raw_fd(), libc::F_GETFL);
            if fl >= 0 {
                libc::fcntl(tun.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
            }
        }
        fds.push(OwnedFd::from(tun));
    }
    Ok(fds)
}

/// Deletes the persistent tap `name` in the calling thread's netns by attaching to it and clearing
/// `TUNSETPERSIST`. Equivalent to `ip tuntap del dev <name> mode tap`. Idempotent (a missing tap is fine);
/// `ERR_BUSY` when a VM holds a single-queue tap (`NetlinkHandle::delete_link` removes it even then).
pub fn delete_tap_here(name: &str) -> Result<()> {
    validate_link_name(name)?;
    match if_index_here(name) {
        Err(e) if e.code == ErrorCode::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    let tun = open_tun()?;
    let ctx = format!("delete tap {name:?}");
    let attached = set_iff(&tun, name, IFF_TAP | IFF_NO_PI)
        .or_else(|e| match e.raw_os_error() {
            Some(libc::EINVAL) => set_iff(&tun, name, IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE),
            _ => Err(e),
        })
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => Error::new(ErrorCode::Busy, format!("{ctx}: held by another process (a VM)")),
            Some(libc::EINVAL) => Error::invalid(format!("{ctx}: not a tap")),
            _ => Error::io(&ctx, e),
        });
    attached?;
    ioctl_int(tun.as_raw_fd(), TUNSETPERSIST, 0).map_err(|e| Error::io(format!("{ctx}: TUNSETPERSIST 0"), e))
}

/// The flags of an open tap fd (`TUNGETIFF`): its name and whether it is persistent / multi-queue / has a
/// vnet header. Useful to check what an fd is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapFdInfo {
    /// The tap's name.
    pub name: String,
    /// `IFF_PERSIST`.
    pub persistent: bool,
    /// `IFF_MULTI_QUEUE`.
    pub multi_queue: bool,
    /// `IFF_VNET_HDR`.
    pub vnet_hdr: bool,
}

/// Describes an open tap fd (`TUNGETIFF`). `ERR_INVALID`/`ERR_CLOSED` when the fd is not an attached tap.
pub fn tap_fd_info(fd: RawFd) -> Result<TapFdInfo> {
    let mut req = IfReq::new("");
    ioctl_ptr(fd, TUNGETIFF, &mut req).map_err(|e| Error::io("TUNGETIFF", e))?;
    let end = req.name.iter().position(|&b| b == 0).unwrap_or(16);
    let flags = req.short();
    Ok(TapFdInfo {
        name: String::from_utf8_lossy(&req.name[..end]).into_owned(),
        persistent: flags & IFF_PERSIST != 0,
        multi_queue: flags & IFF_MULTI_QUEUE != 0,
        vnet_hdr: flags & IFF_VNET_HDR != 0,
    })
}

/// [`create_tap_here`] inside the netns at `netns` (`None`: the calling thread's). Blocking.
pub fn create_tap(netns: Option<&Path>, name: &str, opts: &TapCreateOptions) -> Result<()> {
    let (name, opts) = (name.to_string(), opts.clone());
    in_netns(netns, move || create_tap_here(&name, &opts))
}

/// [`open_tap_here`] inside the netns at `netns` (`None`: the calling thread's). Blocking.
pub fn open_tap(netns: Option<&Path>, name: &str, opts: &TapOpenOptions) -> Result<Vec<OwnedFd>> {
    let (name, opts) = (name.to_string(), opts.clone());
    in_netns(netns, move || open_tap_here(&name, &opts))
}

/// [`delete_tap_here`] inside the netns at `netns` (`None`: the calling thread's). Blocking.
pub fn delete_tap(netns: Option<&Path>, name: &str) -> Result<()> {
    let name = name.to_string();
    in_netns(netns, move || delete_tap_here(&name))
}

/// Discards the frames queued on an open tap fd (up to `max_frames`) without blocking, and returns how many.
///
/// While no VM reads a tap, the kernel queues what the pod's bridge floods to it (broadcast, unknown unicast), up
/// to the tap's txqlen (1000 by default), and drops what comes next. A VM handed that fd late would first read
/// the stale backlog, and the replies to its own first requests (the DHCP OFFER) would be among the frames
/// dropped meanwhile. Draining right before the fd is handed out gives it an empty queue.
///
/// The fd's file status flags are shared by every duplicate: `O_NONBLOCK` is set for the drain and the
/// previous flags are put back afterwards, so call it only while no one else reads the fd (before handing it
/// out). `ERR_INVALID` when `fd` is not open.
pub fn drain_tap_fd(fd: RawFd, max_frames: usize) -> Result<u32> {
    // SAFETY: F_GETFL on a caller-given fd number; an invalid fd gives EBADF, which is checked.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(Error::io("fcntl(F_GETFL) on the tap fd", std::io::Error::last_os_error()));
    }
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: F_SETFL with the fd's own flags plus O_NONBLOCK.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(Error::io("fcntl(F_SETFL) on the tap fd", std::io::Error::last_os_error()));
        }
    }
    let mut buf = vec![0u8; 65_536 + 64];
    let mut drained = 0u32;
    let mut failure = None;
    while (drained as usize) < max_frames {
        // SAFETY: reads into a buffer we own, of the length given.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            drained += 1;
            continue;
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => {}
                Some(libc::EINTR) => continue,
                // EIO: the tap is down or detached; nothing to drain then.
                Some(libc::EIO) => {}
                _ => failure = Some(e),
            }
        }
        break;
    }
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: puts back the flags read above.
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags) };
    }
    match failure {
        Some(e) => Err(Error::io("read the tap fd", e)),
        None => Ok(drained),
    }
}
