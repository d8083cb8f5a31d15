//! Network namespaces: named ones (`ip netns` compatible) and running work inside one on a thread made for it.
//!
//! Nothing here ever calls `setns` on a tokio worker or a libuv pool thread: [`run_in_netns`] spawns a fresh
//! OS thread, moves it into the namespace, runs the closure and lets the thread exit, so no thread is left
//! inside a pod namespace afterwards. Sockets created inside the closure (netlink, UDP) belong to that
//! namespace for good and can be used from any thread afterwards.
//!
//! Named namespaces follow iproute2's layout, so `ip netns list`, `ip netns exec` and CNI plugins see them:
//! the directory (default [`DEFAULT_NETNS_DIR`]) is a shared mount point, and each namespace is an empty file
//! in it on which a new namespace is bind-mounted (`/proc/self/fd/<n>` of an fd opened on
//! `/proc/thread-self/ns/net` by a thread that ran `unshare(CLONE_NEWNET)`; made on the spot or by a [`NetnsPool`]).
//! No `ip` process is ever spawned.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use crate::error::{Error, ErrorCode, Result};

/// The directory `ip netns` uses for named namespaces.
pub const DEFAULT_NETNS_DIR: &str = "/var/run/netns";

/// What [`create_netns`] does when a file of that name already exists in the directory (e.g. left by a crash).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IfExists {
    /// Fail with [`ErrorCode::Exists`] (what `ip netns add` does).
    #[default]
    Fail,
    /// Return the existing namespace unchanged when it is a live namespace mount; a plain leftover file (a
    /// crash between creating the file and mounting onto it) is turned into a new namespace.
    Reuse,
    /// Delete the existing namespace (unmount and unlink) and create a fresh, empty one.
    Recreate,
}

/// Settings of a namespace made by [`create_netns_with`], applied before it is mounted (so nothing ever sees
/// it without them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetnsSettings {
    /// What to do when the name is taken.
    pub if_exists: IfExists,
    /// `false`: IPv6 is off by default for every link created later in the namespace
    /// (`sysctl net.ipv6.conf.default.disable_ipv6=1` inside it; `lo`, made with the namespace, keeps `::1`).
    /// Such a link has no link-local address, so it does no DAD, router solicitations or MLD reports: on a
    /// node bridge with hundreds of pods each of those multicasts is flooded into every pod, by the kernel,
    /// while it holds the rtnl lock. A CNI plugin that gives a link an IPv6 address turns IPv6 on for that
    /// link (`net.ipv6.conf.<link>.disable_ipv6=0`, as the containernetworking plugins do). `true` (the
    /// default): the kernel's defaults, as `ip netns add`.
    pub ipv6: bool,
}

impl Default for NetnsSettings {
    fn default() -> Self {
        NetnsSettings { if_exists: IfExists::Fail, ipv6: true }
    }
}

/// Sets `net.ipv6.conf.<conf>.disable_ipv6` (`conf`: a link name, `default` or `all`) in the calling thread's
/// netns (`/proc/sys/net` shows the netns of the thread that opens it). Equivalent to
/// `sysctl -w net.ipv6.conf.<conf>.disable_ipv6=1|0`. A kernel without IPv6 (no such file) is not an error
/// when disabling.
pub fn set_ipv6_disabled_here(conf: &str, disabled: bool) -> Result<()> {
    validate_netns_name(conf).map_err(|_| Error::invalid(format!("invalid link name {conf:?}")))?;
    let path = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
    match std::fs::write(&path, if disabled { "1" } else { "0" }) {
        Ok(()) => Ok(()),
        Err(e) if disabled && e.kind() == io::ErrorKind::NotFound && !Path::new("/proc/sys/net/ipv6").exists() => {
            Ok(())
        }
        Err(e) => Err(Error::io(format!("write {path}"), e)),
    }
}

/// The outcome of [`create_netns`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetnsCreated {
    /// The namespace file, e.g. `/var/run/netns/pod1`: the path for [`run_in_netns`] and `CNI_NETNS`.
    pub path: PathBuf,
    /// False when [`IfExists::Reuse`] returned a namespace that existed already.
    pub created: bool,
}

/// Checks a namespace name as iproute2 would accept it: non-empty, no `/`, not `.` or `..`, at most 255 bytes.
pub fn validate_netns_name(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') || name.len() > 255 {
        return Err(Error::invalid(format!("invalid netns name {name:?}")));
    }
    Ok(())
}

/// The path of the named namespace `name` under `dir` (no check that it exists).
pub fn netns_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// True when `path` is a mounted namespace file (its filesystem is nsfs, `NSFS_MAGIC`), i.e. a live named
/// namespace. Never follows a symlink: the path is opened `O_PATH|O_NOFOLLOW` and `fstatfs`ed, so a symlink (even
/// one pointing at a live namespace), a plain file left by a crash between creating the file and mounting onto
/// it, a directory or a missing path are all "no namespace".
pub fn is_netns_mount(path: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(_) => return false,
    };
    match nix::sys::statfs::fstatfs(&f) {
        // nsfs: the filesystem of a bound namespace file. A symlink opened O_PATH|O_NOFOLLOW is the link
        // itself, on the directory's filesystem, never nsfs.
        Ok(st) => st.filesystem_type() == nix::sys::statfs::NSFS_MAGIC,
        Err(_) => false,
    }
}

/// True when anything (a file, a symlink, even a dangling one) is at `path`, without following a symlink.
fn entry_exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Makes `dir` exist and be a shared mount point, as `ip netns add` does (bind it onto itself when it is not a
/// mount point yet, then `MS_SHARED|MS_REC`), so a namespace mounted in it propagates to other mount namespaces.
///
/// `MS_REC` makes the kernel walk every mount under `dir`, i.e. every live netns: a cost that grows with the
/// number of pods. It is needed once per dir (for mounts made before, by anyone); a mount made later under a
/// shared mount is shared from the start. So after the first time in this process only the dir's own mount
/// is (re)made shared, which also covers a dir that was unmounted and bound again meanwhile.
fn prepare_netns_dir(dir: &Path) -> Result<()> {
    static SHARED_REC: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let done_rec = SHARED_REC.lock().map(|v| v.iter().any(|d| d == dir)).unwrap_or(false);
    let flags = if done_rec { MsFlags::MS_SHARED } else { MsFlags::MS_SHARED | MsFlags::MS_REC };
    // Try to make it shared directly; EINVAL means it is not a mount point yet.
    let r = match mount(None::<&str>, dir, None::<&str>, flags, None::<&str>) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => {
            mount(Some(dir), dir, Some("none"), MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
                .map_err(|e| Error::errno(format!("bind {} onto itself", dir.display()), e))?;
            mount(None::<&str>, dir, None::<&str>, MsFlags::MS_SHARED | MsFlags::MS_REC, None::<&str>)
                .map_err(|e| Error::errno(format!("make {} a shared mount", dir.display()), e))
        }
        Err(e) => Err(Error::errno(format!("make {} a shared mount", dir.display()), e)),
    };
    if r.is_ok() && !done_rec {
        if let Ok(mut v) = SHARED_REC.lock() {
            v.push(dir.to_path_buf());
        }
    }
    r
}

/// Creates the named network namespace `name` under `dir`. Equivalent to `ip netns add <name>` (with
/// `ip`'s `NETNS_RUN_DIR` = `dir`), natively. `if_exists` says what happens when the name is taken; see
/// [`IfExists`]. On failure nothing is left behind (no file, no mount).
///
/// Blocks briefly (one short-lived thread); call it from a blocking context.
pub fn create_netns(dir: &Path, name: &str, if_exists: IfExists) -> Result<NetnsCreated> {
    create_netns_with(dir, name, &NetnsSettings { if_exists, ..NetnsSettings::default() })
}

/// [`create_netns`] with [`NetnsSettings`]: the settings are applied inside the new namespace before it is
/// mounted at its path.
pub fn create_netns_with(dir: &Path, name: &str, settings: &NetnsSettings) -> Result<NetnsCreated> {
    create_netns_from(dir, name, settings, None)
}

/// [`create_netns_with`], taking the namespace from `pool` when it has a spare one made with the same IPv6
/// setting: then only a bind mount is done here (no `unshare`, which waits behind the kernel's cleanup of
/// deleted namespaces). Otherwise, or with no pool, the namespace is made here as [`create_netns_with`] does.
pub fn create_netns_from(
    dir: &Path,
    name: &str,
    settings: &NetnsSettings,
    pool: Option<&NetnsPool>,
) -> Result<NetnsCreated> {
    let if_exists = settings.if_exists;
    let ipv6 = settings.ipv6;
    validate_netns_name(name)?;
    let path = netns_path(dir, name);
    prepare_netns_dir(dir)?;
    if entry_exists(&path) {
        match if_exists {
            IfExists::Fail => {
                return Err(Error::new(
                    ErrorCode::Exists,
                    format!("netns {name:?} exists already ({})", path.display()),
                ))
            }
            IfExists::Reuse if is_netns_mount(&path) => return Ok(NetnsCreated { path, created: false }),
            IfExists::Reuse | IfExists::Recreate => delete_netns(dir, name)?,
        }
    }
    // O_EXCL: two racing creators cannot both mount onto the same file.
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| Error::io(format!("create netns file {}", path.display()), e))?;
    // A spare from the pool when it has one with these settings, else one made now; bound onto the path either
    // way. (A spare whose bind fails, never seen, is replaced by one made now.)
    let spare = pool.filter(|p| p.ipv6() == ipv6).and_then(NetnsPool::take);
    let bound = match spare.map(|fd| bind_netns_fd(&fd, &path)) {
        Some(Ok(())) => Ok(()),
        _ => new_netns_fd(ipv6).and_then(|fd| bind_netns_fd(&fd, &path)),
    };
    if let Err(e) = bound {
        let _ = std::fs::remove_file(&path);
        return Err(e.context(format!("create netns {name:?}")));
    }
    Ok(NetnsCreated { path, created: true })
}

/// Binds the namespace held by `fd` onto the (existing, empty) file `path`, as `ip netns attach` binds a
/// process's; the mount keeps it alive after `fd` is closed.
fn bind_netns_fd(fd: &OwnedFd, path: &Path) -> Result<()> {
    mount(
        Some(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str()),
        path,
        Some("none"),
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| Error::errno(format!("bind the new netns onto {}", path.display()), e))
}

/// Makes a new namespace with the IPv6 setting `ipv6` (see [`NetnsSettings::ipv6`]), held by the returned fd
/// only (mounted nowhere: it vanishes when the fd is closed).
fn new_netns_fd(ipv6: bool) -> Result<OwnedFd> {
    std::thread::Builder::new()
        .name("tapmanager-netns-add".into())
        .spawn(move || -> Result<OwnedFd> {
            // This thread alone enters the new namespace and exits right after; the fd keeps the netns alive.
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| Error::errno("unshare(CLONE_NEWNET)", e))?;
            if !ipv6 {
                set_ipv6_disabled_here("default", true)?;
            }
            let f = File::open("/proc/thread-self/ns/net").map_err(|e| Error::io("open the new netns", e))?;
            Ok(f.into())
        })
        .map_err(|e| Error::io("spawn netns thread", e))?
        .join()
        .map_err(|_| Error::new(ErrorCode::Io, "the netns creation thread panicked"))?
}

/// Network namespaces made ahead of time, so that [`create_netns_from`] only binds one onto its path. Making a
/// namespace (`unshare(CLONE_NEWNET)`) waits behind the kernel's cleanup of namespaces deleted before it,
/// which on a busy node (pods going away) can take longer than the rest of a pod's add; here that wait happens
/// on the pool's own thread, off the add.
///
/// The spare namespaces are held by fds of this process and mounted nowhere: nothing is left behind when the
/// process ends, however it ends, and `ip netns list` never shows them. One thread (made by [`NetnsPool::new`],
/// in the calling thread's netns: call it from the process's own) keeps `size` of them; it is stopped and
/// joined, and the spares closed, when the pool is dropped.
pub struct NetnsPool {
    shared: Arc<PoolShared>,
    filler: Option<std::thread::JoinHandle<()>>,
}

struct PoolShared {
    state: Mutex<PoolState>,
    wake: Condvar,
    size: usize,
    ipv6: bool,
}

#[derive(Default)]
struct PoolState {
    spare: Vec<OwnedFd>,
    closed: bool,
    /// Why the last attempt to make one failed (the pool retries with a backoff up to 5 s).
    last_error: Option<String>,
}

impl NetnsPool {
    /// A pool keeping `size` (at least 1) spare namespaces with the IPv6 setting `ipv6`; it starts filling at once.
    pub fn new(size: usize, ipv6: bool) -> Result<NetnsPool> {
        let shared = Arc::new(PoolShared { state: Mutex::default(), wake: Condvar::new(), size: size.max(1), ipv6 });
        let s = shared.clone();
        let filler = std::thread::Builder::new()
            .name("tapmanager-netns-pool".into())
            .spawn(move || fill(&s))
            .map_err(|e| Error::io("spawn the netns pool thread", e))?;
        Ok(NetnsPool { shared, filler: Some(filler) })
    }

    /// The IPv6 setting of its namespaces.
    pub fn ipv6(&self) -> bool {
        self.shared.ipv6
    }

    /// How many spares it keeps.
    pub fn size(&self) -> usize {
        self.shared.size
    }

    /// How many spares it holds now.
    pub fn spare(&self) -> usize {
        self.shared.state.lock().map(|s| s.spare.len()).unwrap_or(0)
    }

    /// Why making a spare failed last (cleared by the next success).
    pub fn last_error(&self) -> Option<String> {
        self.shared.state.lock().ok().and_then(|s| s.last_error.clone())
    }

    /// A spare namespace, if one is ready (never waits); the pool makes another.
    pub fn take(&self) -> Option<OwnedFd> {
        let fd = self.shared.state.lock().ok()?.spare.pop();
        self.shared.wake.notify_one();
        fd
    }
}

/// The pool's thread: keeps `size` spares until the pool is dropped.
fn fill(s: &PoolShared) {
    let mut backoff = Duration::from_millis(100);
    loop {
        {
            let Ok(mut st) = s.state.lock() else { return };
            while !st.closed && st.spare.len() >= s.size {
                st = match s.wake.wait(st) {
                    Ok(g) => g,
                    Err(_) => return,
                };
            }
            if st.closed {
                return;
            }
        }
        match new_netns_fd(s.ipv6) {
            Ok(fd) => {
                backoff = Duration::from_millis(100);
                let Ok(mut st) = s.state.lock() else { return };
                st.last_error = None;
                if st.closed {
                    return;
                }
                st.spare.push(fd);
            }
            Err(e) => {
                // e.g. no CAP_SYS_ADMIN: adds make their own namespace (and fail as they would without a pool)
                let Ok(mut st) = s.state.lock() else { return };
                st.last_error = Some(e.to_string());
                let (g, _) = match s.wake.wait_timeout_while(st, backoff, |st| !st.closed) {
                    Ok(r) => r,
                    Err(_) => return,
                };
                if g.closed {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

impl Drop for NetnsPool {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.closed = true;
            st.spare.clear();
        }
        self.shared.wake.notify_all();
        if let Some(t) = self.filler.take() {
            let _ = t.join();
        }
    }
}

/// Deletes the named namespace `name` under `dir`: lazily unmounts it (`MNT_DETACH`) and removes the file.
/// Equivalent to `ip netns delete <name>`. Idempotent: a missing namespace is not an error. The namespace
/// itself lives on while a process or an open fd still holds it.
///
/// Never follows a symlink (`UMOUNT_NOFOLLOW`): a symlink planted at the path is removed, and whatever it points
/// at (another namespace, a mount elsewhere) is left alone. A plain file (nothing mounted) is just removed.
pub fn delete_netns(dir: &Path, name: &str) -> Result<()> {
    validate_netns_name(name)?;
    let path = netns_path(dir, name);
    match umount2(&path, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(Error::errno(format!("unmount netns {}", path.display()), e)),
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove netns file {}", path.display()), e)),
    }
}

/// Lists the names of the live namespaces under `dir` (files that are namespace mounts), sorted. Equivalent
/// to `ip netns list` without the ids. A missing directory is an empty list.
pub fn list_netns(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("read {}", dir.display()), e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
        if let Some(name) = entry.file_name().to_str() {
            if is_netns_mount(&entry.path()) {
                names.push(name.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Runs `f` on a new thread whose network namespace is the one at `ns_path` (e.g. `/var/run/netns/pod1`)
/// and returns its result. Equivalent to `ip netns exec <ns> ...` for a closure. Blocks until `f` returns:
/// call it from a blocking context (`tokio::task::spawn_blocking`, an `AsyncTask`), not from async code.
pub fn run_in_netns<T, F>(ns_path: &Path, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let ns = File::open(ns_path).map_err(|e| Error::io(format!("open netns {}", ns_path.display()), e))?;
    let handle = std::thread::Builder::new()
        .name("tapmanager-netns".into())
        .spawn(move || -> Result<T> {
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| Error::errno("setns", e))?;
            drop(ns);
            f()
        })
        .map_err(|e| Error::io("spawn netns thread", e))?;
    handle.join().map_err(|_| Error::new(ErrorCode::Io, "the thread running in the netns panicked"))?
}

/// [`run_in_netns`] when `netns` is `Some(path)`; `f` on the calling thread (in its netns) when `None`, for
/// callers already on a netns thread. The one switch behind every `*_here` function's netns-taking form.
pub fn in_netns<T, F>(netns: Option<&Path>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    match netns {
        Some(p) => run_in_netns(p, f),
        None => f(),
    }
}

/// Moves the calling thread into the process's own netns (`/proc/self/ns/net`: the main thread's). For a
/// long-lived helper thread spawned from a netns thread, so it never keeps a pod namespace alive. Call it
/// only on a thread made for it.
pub fn enter_process_netns() -> Result<()> {
    let ns = open_netns(Path::new("/proc/self/ns/net"))?;
    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| Error::errno("setns to the process's netns", e))
}

/// Like [`run_in_netns`], but the thread also gets a private mount namespace in which `/sys` is a fresh sysfs
/// of the target netns, so `/sys/class/net` lists the pod's links (needed for SR-IOV detection). The recipe of
/// `ip netns exec`: `setns(net)`, `unshare(CLONE_NEWNS)`, `mount / MS_SLAVE|MS_REC`, `umount2 /sys MNT_DETACH`,
/// `mount sysfs /sys`. The caller's mounts are never touched; the private mount namespace dies with the thread.
pub fn run_in_netns_with_sysfs<T, F>(ns_path: &Path, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    run_in_netns(ns_path, move || {
        // unshare(CLONE_NEWNS) from a thread needs CLONE_FS unshared too: the thread shares its fs info
        // (root, cwd) with the process otherwise, and the kernel refuses.
        unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_FS).map_err(|e| Error::errno("unshare(CLONE_NEWNS)", e))?;
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_SLAVE | MsFlags::MS_REC, None::<&str>)
            .map_err(|e| Error::errno("make / a slave mount", e))?;
        match umount2("/sys", MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
            Err(e) => return Err(Error::errno("unmount /sys", e)),
        }
        mount(Some("sysfs"), "/sys", Some("sysfs"), MsFlags::empty(), None::<&str>)
            .map_err(|e| Error::errno("mount sysfs on /sys", e))?;
        f()
    })
}

/// Opens the namespace file at `ns_path` (to pass its fd to netlink, e.g. `ip link set ... netns <fd>`).
pub fn open_netns(ns_path: &Path) -> Result<File> {
    File::open(ns_path).map_err(|e| Error::io(format!("open netns {}", ns_path.display()), e))
}
