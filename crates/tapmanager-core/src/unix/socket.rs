//! The socket: [`UnixListener`] (bind, accept, and the server's accept loop with admission control) and
//! [`UnixConnection`] (connect, exact reads, whole writes, peer credentials, shutdown).
//!
//! All connection operations take `&self`: readiness is awaited with `readable()`/`writable()` and the syscall
//! runs in `try_io`, so one connection can be shared (e.g. behind an `Arc`) and closed with
//! [`UnixConnection::shutdown`] while another task waits on it.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt, Shutdown};

use super::admission::{Admission, ConnLimits, ConnSlot, PeerFilter};
use super::fast_gets::FastGets;
use super::frame::{permission_denied_frame, Frame};
use super::wait_closed;
use crate::error::{Error, ErrorCode, Result};

/// A socket registered with the tokio reactor only when an operation first waits on it: the std socket `S`
/// until then, the tokio one `T` after (a socket served entirely without the runtime never costs the reactor a
/// registration, nor its thread a wake-up).
#[derive(Debug)]
struct Lazily<S, T> {
    /// The socket's fd, valid while the owner lives (owned by `unregistered` or `registered`).
    fd: RawFd,
    unregistered: std::sync::Mutex<Option<S>>,
    registered: std::sync::OnceLock<T>,
}

impl<S: AsRawFd, T> Lazily<S, T> {
    fn new(socket: S) -> Self {
        Lazily {
            fd: socket.as_raw_fd(),
            unregistered: std::sync::Mutex::new(Some(socket)),
            registered: Default::default(),
        }
    }

    /// The registered socket (registering it now with `register` if it is not yet; inside a tokio runtime);
    /// `gone` is the error when it is neither (closed).
    fn get(&self, register: impl FnOnce(S) -> io::Result<T>, gone: &str) -> Result<&T> {
        if let Some(t) = self.registered.get() {
            return Ok(t);
        }
        let mut unregistered = self.unregistered.lock().map_err(|_| Error::invalid("socket lock poisoned"))?;
        if let Some(s) = unregistered.take() {
            let t = register(s).map_err(|e| Error::io("register with the reactor", e))?;
            let _ = self.registered.set(t);
        }
        self.registered.get().ok_or_else(|| Error::new(ErrorCode::Closed, gone.to_string()))
    }
}

/// The credentials of the peer process, from `SO_PEERCRED` (taken when the connection was made).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// The peer's process id.
    pub pid: i32,
    /// The peer's effective user id.
    pub uid: u32,
    /// The peer's effective group id.
    pub gid: u32,
}

/// Options for [`UnixListener::bind`].
#[derive(Debug, Clone, Copy)]
pub struct BindOptions {
    /// The socket file's permission bits (default `0o600`).
    pub mode: u32,
    /// The socket file's group, if it should change (`chown :gid`).
    pub gid: Option<u32>,
}

impl Default for BindOptions {
    fn default() -> Self {
        BindOptions { mode: 0o600, gid: None }
    }
}

/// A listening Unix stream socket bound to a path.
///
/// It is registered with the tokio reactor only when [`accept`](Self::accept) first waits on it: a listener
/// served without the runtime ([`try_accept_admitted`](Self::try_accept_admitted) on the JavaScript thread's
/// event loop) never wakes a runtime thread per incoming connection.
#[derive(Debug)]
pub struct UnixListener {
    socket: Lazily<std::os::unix::net::UnixListener, tokio::net::UnixListener>,
    path: PathBuf,
    closed: std::sync::atomic::AtomicBool,
    close_notify: tokio::sync::Notify,
}

impl UnixListener {
    /// Binds `path`, like `socat UNIX-LISTEN:<path>` followed by `chmod <mode> <path>` and `chgrp <gid> <path>`.
    ///
    /// An existing file at `path` is removed only when it is a socket that nobody listens on (connecting to it
    /// is refused); a live socket, or a file that is not a socket, gives `ERR_EXISTS`.
    pub fn bind(path: impl AsRef<Path>, opts: BindOptions) -> Result<UnixListener> {
        let path = path.as_ref();
        let shown = path.display();
        match std::fs::symlink_metadata(path) {
            Ok(meta) => {
                if !meta.file_type().is_socket() {
                    return Err(Error::new(
                        ErrorCode::Exists,
                        format!("bind {shown}: a file that is not a socket is in the way"),
                    ));
                }
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => {
                        return Err(Error::new(
                            ErrorCode::Exists,
                            format!("bind {shown}: another server is listening on it"),
                        ));
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                        std::fs::remove_file(path).map_err(|e| Error::io(format!("remove stale socket {shown}"), e))?;
                    }
                    Err(e) => return Err(Error::io(format!("probe existing socket {shown}"), e)),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("stat {shown}"), e)),
        }
        let std = std::os::unix::net::UnixListener::bind(path).map_err(|e| Error::io(format!("bind {shown}"), e))?;
        // From here on a failure drops the listener; remove the file we created too.
        if let Err(e) = std.set_nonblocking(true) {
            let _ = std::fs::remove_file(path);
            return Err(Error::io(format!("set nonblocking {shown}"), e));
        }
        let listener = UnixListener {
            socket: Lazily::new(std),
            path: path.to_path_buf(),
            closed: std::sync::atomic::AtomicBool::new(false),
            close_notify: tokio::sync::Notify::new(),
        };
        let setup = || -> Result<()> {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(opts.mode & 0o7777))
                .map_err(|e| Error::io(format!("chmod {:o} {shown}", opts.mode), e))?;
            if let Some(gid) = opts.gid {
                std::os::unix::fs::chown(path, None, Some(gid))
                    .map_err(|e| Error::io(format!("chgrp {gid} {shown}"), e))?;
            }
            Ok(())
        };
        if let Err(e) = setup() {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(listener)
    }

    /// The path the listener is bound to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts the next connection; `ERR_CLOSED` once [`close`](Self::close) was called (also for an accept
    /// already waiting).
    pub async fn accept(&self) -> Result<UnixConnection> {
        let notified = self.close_notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::new(ErrorCode::Closed, "accept: listener is closed"));
        }
        let inner = self.socket.get(tokio::net::UnixListener::from_std, "accept: listener is closed")?;
        tokio::select! {
            r = inner.accept() => {
                let (stream, _) = r.map_err(|e| Error::io("accept", e))?;
                Ok(UnixConnection::registered(stream))
            }
            _ = &mut notified => Err(Error::new(ErrorCode::Closed, "accept: listener is closed")),
        }
    }

    /// Resolves once [`close`](Self::close) has been called.
    pub async fn closed(&self) {
        wait_closed(&self.closed, &self.close_notify).await
    }

    /// Stops accepting: pending and later [`accept`](Self::accept) calls fail with `ERR_CLOSED`. The fd itself
    /// closes when the listener is dropped.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.close_notify.notify_waiters();
    }

    /// Starts a task that accepts connections and reads the first request frame of each one concurrently (each
    /// read bounded by `deadline`, so a slow client holds up nobody), delivering connections with their first
    /// frame as the frames complete. Connections that close or time out before a whole frame are dropped. The
    /// stream ends when the listener is [`close`](Self::close)d. This saves a server one round trip per connection.
    pub fn incoming_requests(
        self: &Arc<Self>,
        max_data: usize,
        deadline: Option<Duration>,
    ) -> tokio::sync::mpsc::UnboundedReceiver<(UnixConnection, Frame)> {
        self.incoming_slow_requests(max_data, deadline, None)
    }

    /// Like [`incoming_requests`](Self::incoming_requests), but when `fast` is given, the get requests it can
    /// answer (see [`FastGets`]) are answered here, on the connection's own task, and only the first request it
    /// cannot answer is delivered (connections that end before such a request are never delivered).
    pub fn incoming_slow_requests(
        self: &Arc<Self>,
        max_data: usize,
        deadline: Option<Duration>,
        fast: Option<Arc<FastGets>>,
    ) -> tokio::sync::mpsc::UnboundedReceiver<(UnixConnection, Frame)> {
        let cfg = ServeConfig { max_data, read_deadline: deadline, ..ServeConfig::default() };
        self.incoming_served(cfg, Arc::new(Admission::new(ConnLimits::UNLIMITED, PeerFilter::default())), fast)
    }

    /// The server's accept loop (what [`incoming_slow_requests`](Self::incoming_slow_requests) does), with
    /// admission control by `admission`:
    /// - an `accept()` error (`EMFILE`, `ENFILE`, `ENOBUFS`, ...) never ends the loop: it is counted, and the loop
    ///   backs off (10 ms doubling up to 1 s, reset by the next success) and goes on;
    /// - a connection over the total cap or its uid's cap is closed at once (counted), before anything is read;
    /// - a peer the filter refuses gets, after its first request frame, one error response
    ///   (`permission denied: peer uid U gid G is not allowed`, written within `cfg.write_deadline`) and is closed
    ///   (counted): it never reaches the application nor the fast path.
    ///
    /// The stream ends only when the listener is [`close`](UnixListener::close)d.
    pub fn incoming_served(
        self: &Arc<Self>,
        cfg: ServeConfig,
        admission: Arc<Admission>,
        fast: Option<Arc<FastGets>>,
    ) -> tokio::sync::mpsc::UnboundedReceiver<(UnixConnection, Frame)> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let listener = self.clone();
        if let Some(f) = &fast {
            f.set_write_deadline(cfg.write_deadline);
        }
        tokio::spawn(async move {
            let mut backoff = ACCEPT_BACKOFF_MIN;
            loop {
                let mut conn = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) if e.code == ErrorCode::Closed => break,
                    Err(e) => {
                        admission.note_accept_error(&e);
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = listener.closed() => break,
                        }
                        backoff = accept_backoff(Some(backoff));
                        continue;
                    }
                };
                backoff = ACCEPT_BACKOFF_MIN;
                let peer = conn.peer_cred().ok();
                match admission.admit(peer.map(|p| p.uid)) {
                    Some(slot) => conn.slot = Some(slot),
                    None => continue, // dropped: closed at once, counted by admit
                }
                let tx = tx.clone();
                let listener = listener.clone();
                let fast = fast.clone();
                let admission = admission.clone();
                let cfg = cfg.clone();
                tokio::spawn(async move {
                    // Closing the listener also abandons first frames still being read.
                    let first = tokio::select! {
                        r = conn.read_request_frame(cfg.max_data, cfg.read_deadline) => r,
                        _ = listener.closed() => return,
                    };
                    let Ok(frame) = first else { return };
                    if !admission.filter().allows(peer) {
                        admission.note_refused();
                        if frame.data.is_some() {
                            let _ =
                                conn.respond(&permission_denied_frame(peer), &[], Vec::new(), cfg.write_deadline).await;
                        }
                        return;
                    }
                    let frame = match &fast {
                        Some(fast) => match conn.serve_fast_gets(frame, fast, cfg.max_data, cfg.read_deadline).await {
                            Ok(f) => f,
                            Err(_) => return,
                        },
                        None => frame,
                    };
                    let _ = tx.send((conn, frame));
                });
            }
        });
        rx
    }

    /// The listening socket's fd, for a caller that waits for connections by its own means (see
    /// [`try_accept_admitted`](Self::try_accept_admitted)). Valid while the listener lives.
    pub fn as_raw_fd(&self) -> RawFd {
        self.socket.fd
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// One step of [`incoming_served`](Self::incoming_served)'s accept loop for a caller that runs its own (the
    /// JavaScript thread's event loop): accepts a connection that is already waiting, without blocking, and
    /// admits it under `admission`'s caps. An `accept()` failure is counted there and returned: the caller backs
    /// off ([`accept_backoff`]) before trying again. The connection is registered with the tokio reactor only
    /// when an operation first waits on it (see [`UnixConnection`]).
    pub fn try_accept_admitted(&self, admission: &Arc<Admission>) -> Result<Accepted> {
        if self.is_closed() {
            return Err(Error::new(ErrorCode::Closed, "accept: listener is closed"));
        }
        let flags = nix::sys::socket::SockFlag::SOCK_NONBLOCK | nix::sys::socket::SockFlag::SOCK_CLOEXEC;
        let fd = loop {
            match nix::sys::socket::accept4(self.as_raw_fd(), flags) {
                // SAFETY: accept4 returned a new fd that nothing else owns.
                Ok(fd) => break unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) },
                Err(nix::errno::Errno::EAGAIN) => return Ok(Accepted::None),
                Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::ECONNABORTED) => continue,
                Err(e) => {
                    let e = Error::io("accept", e.into());
                    admission.note_accept_error(&e);
                    return Err(e);
                }
            }
        };
        let mut conn = UnixConnection::unregistered(std::os::unix::net::UnixStream::from(fd));
        let peer = conn.peer_cred().ok();
        match admission.admit(peer.map(|p| p.uid)) {
            Some(slot) => conn.slot = Some(slot),
            None => return Ok(Accepted::Dropped), // closed at once, counted by admit
        }
        Ok(Accepted::Conn(conn, peer))
    }

    /// Removes the socket file (`rm <path>`); a file that is already gone is fine.
    pub fn remove_file(&self) -> Result<()> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("remove socket {}", self.path.display()), e)),
        }
    }
}

/// A connected Unix stream socket.
///
/// A connection made from a std stream ([`from_std`](Self::from_std), the accept of
/// [`UnixListener::try_accept_admitted`]) is registered with the tokio reactor only when an operation first waits
/// on it: one served entirely without the runtime (on the JavaScript thread's event loop) never costs the
/// reactor a registration, nor its thread a wake-up.
#[derive(Debug)]
pub struct UnixConnection {
    socket: Lazily<std::os::unix::net::UnixStream, tokio::net::UnixStream>,
    /// The connection's place under the listener's caps (see [`Admission`]), given back on drop.
    pub(super) slot: Option<ConnSlot>,
}

impl UnixConnection {
    /// Connects to the socket at `path`.
    pub async fn connect(path: impl AsRef<Path>) -> Result<UnixConnection> {
        let path = path.as_ref();
        let inner = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|e| Error::io(format!("connect {}", path.display()), e))?;
        Ok(UnixConnection::registered(inner))
    }

    fn registered(stream: tokio::net::UnixStream) -> UnixConnection {
        let fd = stream.as_raw_fd();
        let socket =
            Lazily { fd, unregistered: std::sync::Mutex::new(None), registered: std::sync::OnceLock::from(stream) };
        UnixConnection { socket, slot: None }
    }

    /// Wraps an already connected std stream (e.g. one half of `UnixStream::pair()`), made non-blocking. It is
    /// registered with the tokio reactor when an operation first waits on it (which must then run inside a
    /// tokio runtime).
    pub fn from_std(stream: std::os::unix::net::UnixStream) -> Result<UnixConnection> {
        stream.set_nonblocking(true).map_err(|e| Error::io("set nonblocking", e))?;
        Ok(UnixConnection::unregistered(stream))
    }

    /// Wraps a std stream that is already non-blocking (accepted with `SOCK_NONBLOCK`), unregistered.
    fn unregistered(stream: std::os::unix::net::UnixStream) -> UnixConnection {
        UnixConnection { socket: Lazily::new(stream), slot: None }
    }

    /// The socket registered with the reactor (registering it now if it is not yet). Inside a tokio runtime.
    pub(super) fn stream(&self) -> Result<&tokio::net::UnixStream> {
        self.socket.get(tokio::net::UnixStream::from_std, "connection is closed")
    }

    /// The raw fd (valid while the connection lives), for reads and writes that never wait.
    pub fn as_raw_fd(&self) -> RawFd {
        self.socket.fd
    }

    /// The peer's credentials (`SO_PEERCRED`).
    pub fn peer_cred(&self) -> Result<PeerCred> {
        // SAFETY: the fd is open while self lives.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.socket.fd) };
        let cred = getsockopt(&fd, sockopt::PeerCredentials)
            .map_err(|e| Error::io("getsockopt SO_PEERCRED", io::Error::from(e)))?;
        Ok(PeerCred { pid: cred.pid(), uid: cred.uid(), gid: cred.gid() })
    }

    /// Reads exactly `n` bytes. EOF before the first byte or in the middle gives `ERR_CLOSED` (the message says
    /// how many bytes had arrived); passing `deadline` bounds the whole read (`ERR_TIMEOUT`).
    pub async fn read_exact(&self, n: usize, deadline: Option<Duration>) -> Result<Vec<u8>> {
        match deadline {
            Some(d) => match tokio::time::timeout(d, self.read_exact_inner(n)).await {
                Ok(r) => r,
                Err(_) => {
                    Err(Error::new(ErrorCode::Timeout, format!("read {n} bytes: no data within {} ms", d.as_millis())))
                }
            },
            None => self.read_exact_inner(n).await,
        }
    }

    pub(super) async fn read_exact_inner(&self, n: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        let mut got = 0;
        while got < n {
            let stream = self.stream()?;
            stream.readable().await.map_err(|e| Error::io("wait readable", e))?;
            match stream.try_read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(Error::new(
                        ErrorCode::Closed,
                        format!("read {n} bytes: connection closed after {got}"),
                    ));
                }
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(format!("read {n} bytes"), e)),
            }
        }
        Ok(buf)
    }

    /// Writes all of `data`.
    pub async fn write_all(&self, data: &[u8]) -> Result<()> {
        let mut done = 0;
        while done < data.len() {
            let stream = self.stream()?;
            stream.writable().await.map_err(|e| Error::io("wait writable", e))?;
            match stream.try_write(&data[done..]) {
                Ok(k) => done += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(format!("write {} bytes", data.len()), e)),
            }
        }
        Ok(())
    }

    /// Shuts the reading side down (`shutdown(SHUT_RD)`): a pending or later read sees EOF, writes still go out.
    pub fn shutdown_read(&self) -> Result<()> {
        self.shutdown_how(Shutdown::Read, "shutdown read")
    }

    /// Shuts both directions down (`shutdown(2)`), waking any pending read or write; the fd closes on drop.
    pub fn shutdown(&self) -> Result<()> {
        self.shutdown_how(Shutdown::Both, "shutdown")
    }

    /// `shutdown(2)` with `how`; a socket that is not connected (`ENOTCONN`) is fine.
    fn shutdown_how(&self, how: Shutdown, what: &str) -> Result<()> {
        match nix::sys::socket::shutdown(self.socket.fd, how) {
            Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
            Err(e) => Err(Error::io(what, io::Error::from(e))),
        }
    }
}

/// What [`UnixListener::try_accept_admitted`] found.
#[derive(Debug)]
pub enum Accepted {
    /// No connection is waiting.
    None,
    /// A connection under the caps, with its peer's credentials (absent when `SO_PEERCRED` failed).
    Conn(UnixConnection, Option<PeerCred>),
    /// A connection over a cap: closed at once, counted.
    Dropped,
}

/// The wait before the next `accept()` after a failure: 10 ms after the first (`prev` absent), doubling up to
/// 1 s; a success resets it.
pub fn accept_backoff(prev: Option<Duration>) -> Duration {
    prev.map_or(ACCEPT_BACKOFF_MIN, |b| (b * 2).min(ACCEPT_BACKOFF_MAX))
}

/// First backoff after a failed `accept()`.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest backoff after repeated `accept()` failures.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How a server reads and writes its connections (see [`UnixListener::incoming_served`]).
#[derive(Debug, Clone, Default)]
pub struct ServeConfig {
    /// The largest request payload read (bigger ones are left unread, `Frame::data` is `None`).
    pub max_data: usize,
    /// Bound on reading one request frame (including the wait for it).
    pub read_deadline: Option<Duration>,
    /// Bound on writing one response.
    pub write_deadline: Option<Duration>,
}
