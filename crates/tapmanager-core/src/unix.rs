//! Unix stream sockets on tokio with `SCM_RIGHTS` fd passing and peer credentials: the FDServer transport.
//!
//! [`UnixListener::bind`] removes a stale socket file only when nothing listens on it, then sets the file's
//! mode and group. [`UnixConnection`] reads exactly N bytes with a deadline, writes all, sends data plus fds
//! with one `sendmsg`, and receives data plus fds with one `recvmsg` (`MSG_CMSG_CLOEXEC`) into buffers of given
//! sizes. Every received fd is wrapped in an [`OwnedFd`] as soon as it is parsed, so nothing leaks on any
//! error path (truncated control data, a second control message, a short read).
//!
//! All operations take `&self`: readiness is awaited with `readable()`/`writable()` and the syscall runs in
//! `try_io`, so one connection can be shared (e.g. behind an `Arc`) and closed with [`UnixConnection::shutdown`]
//! while another task waits on it.

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::Interest;

use crate::error::{Error, ErrorCode, Result};

/// The most fds one message may carry (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// `CMSG_SPACE(4 * nfds)`: the control buffer size a receiver needs for `nfds` fds (24 for 1 or 2 fds and
/// 32 for 3 or 4 on x86_64 and aarch64). Zero fds need no control buffer.
pub fn cmsg_space(nfds: usize) -> usize {
    if nfds == 0 {
        return 0;
    }
    // SAFETY: CMSG_SPACE is a pure arithmetic macro.
    unsafe { libc::CMSG_SPACE((nfds * mem::size_of::<RawFd>()) as u32) as usize }
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
#[derive(Debug)]
pub struct UnixListener {
    inner: tokio::net::UnixListener,
    path: PathBuf,
    closed: std::sync::atomic::AtomicBool,
    close_notify: tokio::sync::Notify,
}

impl UnixListener {
    /// Binds `path`, like `socat UNIX-LISTEN:<path>` followed by `chmod <mode> <path>` and `chgrp <gid> <path>`.
    ///
    /// An existing file at `path` is removed only when it is a socket that nobody listens on (connecting to it
    /// is refused); a live socket, or a file that is not a socket, gives `ERR_EXISTS`. Must run inside a tokio
    /// runtime.
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
        let inner = tokio::net::UnixListener::bind(path).map_err(|e| Error::io(format!("bind {shown}"), e))?;
        let listener = UnixListener {
            inner,
            path: path.to_path_buf(),
            closed: std::sync::atomic::AtomicBool::new(false),
            close_notify: tokio::sync::Notify::new(),
        };
        // From here on a failure drops the listener; remove the file we created too.
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
        tokio::select! {
            r = self.inner.accept() => {
                let (stream, _) = r.map_err(|e| Error::io("accept", e))?;
                Ok(UnixConnection { inner: stream, slot: None })
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
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
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
                    if !admission.filter.allows(peer) {
                        admission.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
#[derive(Debug)]
pub struct UnixConnection {
    inner: tokio::net::UnixStream,
    /// The connection's place under the listener's caps (see [`Admission`]), given back on drop.
    slot: Option<ConnSlot>,
}

impl UnixConnection {
    /// Connects to the socket at `path`.
    pub async fn connect(path: impl AsRef<Path>) -> Result<UnixConnection> {
        let path = path.as_ref();
        let inner = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|e| Error::io(format!("connect {}", path.display()), e))?;
        Ok(UnixConnection { inner, slot: None })
    }

    /// Wraps an already connected std stream (e.g. one half of `UnixStream::pair()`). Must run inside a tokio runtime.
    pub fn from_std(stream: std::os::unix::net::UnixStream) -> Result<UnixConnection> {
        stream.set_nonblocking(true).map_err(|e| Error::io("set nonblocking", e))?;
        let inner = tokio::net::UnixStream::from_std(stream).map_err(|e| Error::io("register stream", e))?;
        Ok(UnixConnection { inner, slot: None })
    }

    /// The raw fd, for diagnostics.
    pub fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }

    /// The peer's credentials (`SO_PEERCRED`).
    pub fn peer_cred(&self) -> Result<PeerCred> {
        let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
        let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: cred and len are valid for writes of the sizes given; the fd is valid for the lifetime of self.
        let rc = unsafe {
            libc::getsockopt(
                self.inner.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc < 0 {
            return Err(Error::io("getsockopt SO_PEERCRED", io::Error::last_os_error()));
        }
        Ok(PeerCred { pid: cred.pid, uid: cred.uid, gid: cred.gid })
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

    async fn read_exact_inner(&self, n: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        let mut got = 0;
        while got < n {
            self.inner.readable().await.map_err(|e| Error::io("wait readable", e))?;
            match self.inner.try_read(&mut buf[got..]) {
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
            self.inner.writable().await.map_err(|e| Error::io("wait writable", e))?;
            match self.inner.try_write(&data[done..]) {
                Ok(k) => done += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(format!("write {} bytes", data.len()), e)),
            }
        }
        Ok(())
    }

    /// Sends `data` and, when `fds` is not empty, one `SCM_RIGHTS` control message with all of them, in one
    /// `sendmsg`. The fds stay owned by the caller (the kernel duplicates them into the receiver). `data` must not
    /// be empty when fds are sent (send a dummy byte). If the kernel takes only part of the data, the rest is
    /// written with plain writes (the fds travel with the first byte).
    pub async fn send_with_fds(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        if data.is_empty() && !fds.is_empty() {
            return Err(Error::invalid("sendmsg: fds need at least one data byte"));
        }
        if fds.len() > MAX_FDS {
            return Err(Error::invalid(format!("sendmsg: {} fds, at most {MAX_FDS}", fds.len())));
        }
        if data.is_empty() {
            return Ok(());
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let sent = loop {
            self.inner.writable().await.map_err(|e| Error::io("wait writable", e))?;
            match self.inner.try_io(Interest::WRITABLE, || sendmsg_fds(self.inner.as_raw_fd(), data, &raw)) {
                Ok(k) => break k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(format!("sendmsg {} bytes with {} fds", data.len(), fds.len()), e)),
            }
        };
        self.write_all(&data[sent..]).await
    }

    /// One `recvmsg` with a `data_len`-byte data buffer and a `control_len`-byte control buffer
    /// (`MSG_CMSG_CLOEXEC`). Returns the bytes received (possibly fewer than `data_len`; none means EOF) and the fds
    /// of every `SCM_RIGHTS` message, each already owned. Truncated control data (`MSG_CTRUNC`) is an
    /// `ERR_TOO_LARGE` error, and the fds that did arrive are closed before returning.
    pub async fn recv_with_fds(&self, data_len: usize, control_len: usize) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
        let mut data = vec![0u8; data_len.max(1)];
        let mut control = vec![0u64; control_len.div_ceil(8)];
        let (n, fds, truncated) = loop {
            self.inner.readable().await.map_err(|e| Error::io("wait readable", e))?;
            let res = self.inner.try_io(Interest::READABLE, || {
                recvmsg_fds(self.inner.as_raw_fd(), &mut data, &mut control, control_len)
            });
            match res {
                Ok(r) => break r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("recvmsg", e)),
            }
        };
        if truncated {
            drop(fds);
            return Err(Error::new(
                ErrorCode::TooLarge,
                format!(
                    "recvmsg: control data truncated (buffer of {control_len} bytes too small); received fds closed"
                ),
            ));
        }
        data.truncate(n.min(data_len));
        if data_len == 0 && n > 0 {
            data.clear();
        }
        Ok((data, fds))
    }

    /// Shuts the reading side down (`shutdown(SHUT_RD)`): a pending or later read sees EOF, writes still go out.
    pub fn shutdown_read(&self) -> Result<()> {
        self.shutdown_how(libc::SHUT_RD, "shutdown read")
    }

    /// Shuts both directions down (`shutdown(2)`), waking any pending read or write; the fd closes on drop.
    pub fn shutdown(&self) -> Result<()> {
        self.shutdown_how(libc::SHUT_RDWR, "shutdown")
    }

    /// `shutdown(2)` with `how`; a socket that is not connected (`ENOTCONN`) is fine.
    fn shutdown_how(&self, how: libc::c_int, what: &str) -> Result<()> {
        // SAFETY: the fd is valid for the lifetime of self; shutdown does not close it.
        let rc = unsafe { libc::shutdown(self.inner.as_raw_fd(), how) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ENOTCONN) {
                return Err(Error::io(what, err));
            }
        }
        Ok(())
    }
}

/// Resolves once `closed` is set. The waiter registers with `notify` before it checks the flag, so a close
/// (`closed.store(true)` then `notify.notify_waiters()`) in between is never missed.
async fn wait_closed(closed: &std::sync::atomic::AtomicBool, notify: &tokio::sync::Notify) {
    let notified = notify.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    if closed.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    notified.await;
}

/// Length of an FDServer protocol header (PROTOCOL.md): magic(4) command(1) DataSize(4) OobSize(4) key(64).
pub const FRAME_HEADER_LEN: usize = 77;
const FRAME_MAGIC: u32 = 0x4242_4242;

/// DataSize and OobSize of a header (big-endian at bytes 5..9 and 9..13).
fn frame_sizes(h: &[u8]) -> (usize, usize) {
    let data = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) as usize;
    let oob = u32::from_be_bytes([h[9], h[10], h[11], h[12]]) as usize;
    (data, oob)
}

/// One frame of the FDServer protocol as read off a connection: the 77 header bytes, the payload and any fds.
#[derive(Debug)]
pub struct Frame {
    /// The 77-byte header, as received.
    pub header: Vec<u8>,
    /// The payload: DataSize bytes; `None` for a request frame that was not read (bad magic, or DataSize over
    /// the limit).
    pub data: Option<Vec<u8>>,
    /// The fds that came with a response (owned).
    pub fds: Vec<OwnedFd>,
}

impl UnixConnection {
    /// Reads a request frame for a server: the header, then its DataSize payload bytes, all within `deadline`.
    /// The payload is left unread (`data: None`) when the magic is wrong or DataSize exceeds `max_data`, so a
    /// hostile size is never allocated. EOF before the header is `ERR_CLOSED`.
    pub async fn read_request_frame(&self, max_data: usize, deadline: Option<Duration>) -> Result<Frame> {
        let fut = async {
            let header = self.read_exact_inner(FRAME_HEADER_LEN).await?;
            let magic = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
            let (size, _) = frame_sizes(&header);
            if magic != FRAME_MAGIC || size > max_data {
                return Ok(Frame { header, data: None, fds: Vec::new() });
            }
            let data = if size > 0 { self.read_exact_inner(size).await? } else { Vec::new() };
            Ok(Frame { header, data: Some(data), fds: Vec::new() })
        };
        with_deadline(deadline, "read request", fut).await
    }

    /// Reads a response frame as Virtlet's Go client does: exactly 77 header bytes, then, when DataSize or OobSize
    /// is not zero, one `recvmsg` with a DataSize-byte buffer (1 byte for the dummy byte when DataSize is 0) and an
    /// OobSize-byte control buffer; payload bytes that did not fit in that message follow by plain reads. The
    /// dummy byte is dropped. A frame whose magic is wrong is returned as is, without reading further.
    pub async fn read_response_frame(&self, deadline: Option<Duration>) -> Result<Frame> {
        let fut = async {
            let header = self.read_exact_inner(FRAME_HEADER_LEN).await?;
            let magic = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
            if magic != FRAME_MAGIC {
                return Ok(Frame { header, data: None, fds: Vec::new() });
            }
            let (size, oob) = frame_sizes(&header);
            if size == 0 && oob == 0 {
                return Ok(Frame { header, data: Some(Vec::new()), fds: Vec::new() });
            }
            let (mut data, fds) = self.recv_with_fds(size.max(1), oob).await?;
            if data.is_empty() {
                return Err(Error::new(ErrorCode::Closed, "read response: connection closed before the payload"));
            }
            if size == 0 {
                data.clear(); // the dummy byte
            } else if data.len() < size {
                let rest = self.read_exact_inner(size - data.len()).await?;
                data.extend_from_slice(&rest);
            }
            Ok(Frame { header, data: Some(data), fds })
        };
        with_deadline(deadline, "read response", fut).await
    }
}

impl UnixConnection {
    /// A server's turn on a connection: writes the response `head`, sends `data` with `fds` in one `sendmsg`
    /// (nothing when both are empty), then reads the next request frame (see
    /// [`read_request_frame`](Self::read_request_frame)). The fds are owned (duplicates the caller made), so the
    /// caller may close its own copies at any time.
    pub async fn respond_then_read(
        &self,
        head: &[u8],
        data: &[u8],
        fds: Vec<OwnedFd>,
        max_data: usize,
        deadline: Option<Duration>,
    ) -> Result<Frame> {
        self.respond(head, data, fds, None).await?;
        self.read_request_frame(max_data, deadline).await
    }

    /// Writes a response: `head` with a plain write, then `data` with `fds` in one `sendmsg` (nothing when both
    /// are empty), all within `deadline` when given (`ERR_TIMEOUT`: a peer that does not read cannot hold the
    /// server). The fds are owned duplicates, closed once sent.
    pub async fn respond(&self, head: &[u8], data: &[u8], fds: Vec<OwnedFd>, deadline: Option<Duration>) -> Result<()> {
        let fut = async {
            self.write_all(head).await?;
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
            self.send_with_fds(data, &borrowed).await
        };
        with_deadline(deadline, "write response", fut).await
    }
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

/// Connection caps of a server: at most `total` connections at once, and at most `per_uid` of one peer uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open at once, all peers together.
    pub total: usize,
    /// Connections open at once from one peer uid (peers whose credentials cannot be read count as one uid).
    pub per_uid: usize,
}

impl ConnLimits {
    /// No caps.
    pub const UNLIMITED: ConnLimits = ConnLimits { total: usize::MAX, per_uid: usize::MAX };
}

/// Which peers a server serves: when either list is set, a peer whose uid or gid is listed; otherwise every peer.
/// One filter for every request, whoever answers it (the application or the native fast path).
#[derive(Debug, Default, Clone)]
pub struct PeerFilter {
    /// Allowed uids.
    pub uids: Option<Vec<u32>>,
    /// Allowed gids.
    pub gids: Option<Vec<u32>>,
}

impl PeerFilter {
    /// Whether `peer` may be served (`None`, credentials unknown, only when there is no filter).
    pub fn allows(&self, peer: Option<PeerCred>) -> bool {
        if self.uids.is_none() && self.gids.is_none() {
            return true;
        }
        match peer {
            Some(p) => {
                self.uids.as_ref().is_some_and(|u| u.contains(&p.uid))
                    || self.gids.as_ref().is_some_and(|g| g.contains(&p.gid))
            }
            None => false,
        }
    }
}

/// What a server refused or survived, counted since it started (see [`Admission::stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    /// Connections accepted and admitted.
    pub admitted: u64,
    /// Connections open now.
    pub open: u64,
    /// Connections closed at once because `total` were open.
    pub over_total: u64,
    /// Connections closed at once because their uid had `per_uid` open.
    pub over_uid: u64,
    /// Peers refused by the filter (one error response each, then closed).
    pub refused: u64,
    /// Failed `accept()` calls (survived).
    pub accept_errors: u64,
    /// The last `accept()` error's text.
    pub last_accept_error: Option<String>,
}

/// A server's admission control: connection caps, the peer filter and the counters of what it refused.
#[derive(Debug)]
pub struct Admission {
    limits: ConnLimits,
    filter: PeerFilter,
    /// Open connections: in all, and per uid (`u32::MAX + 1` stands for "credentials unknown").
    open: std::sync::Mutex<(usize, std::collections::HashMap<u64, usize>)>,
    admitted: std::sync::atomic::AtomicU64,
    over_total: std::sync::atomic::AtomicU64,
    over_uid: std::sync::atomic::AtomicU64,
    refused: std::sync::atomic::AtomicU64,
    accept_errors: std::sync::atomic::AtomicU64,
    last_accept_error: std::sync::Mutex<Option<String>>,
}

impl Admission {
    /// Admission with `limits` (each at least 1) and `filter`.
    pub fn new(limits: ConnLimits, filter: PeerFilter) -> Admission {
        Admission {
            limits: ConnLimits { total: limits.total.max(1), per_uid: limits.per_uid.max(1) },
            filter,
            open: std::sync::Mutex::default(),
            admitted: Default::default(),
            over_total: Default::default(),
            over_uid: Default::default(),
            refused: Default::default(),
            accept_errors: Default::default(),
            last_accept_error: Default::default(),
        }
    }

    /// The peer filter.
    pub fn filter(&self) -> &PeerFilter {
        &self.filter
    }

    /// Takes a place for a connection of `uid`, or counts the refusal and returns `None` (over a cap).
    pub fn admit(self: &Arc<Self>, uid: Option<u32>) -> Option<ConnSlot> {
        use std::sync::atomic::Ordering::Relaxed;
        let who = uid.map_or(u64::from(u32::MAX) + 1, u64::from);
        let Ok(mut open) = self.open.lock() else { return None };
        if open.0 >= self.limits.total {
            self.over_total.fetch_add(1, Relaxed);
            return None;
        }
        let n = open.1.entry(who).or_insert(0);
        if *n >= self.limits.per_uid {
            self.over_uid.fetch_add(1, Relaxed);
            return None;
        }
        *n += 1;
        open.0 += 1;
        self.admitted.fetch_add(1, Relaxed);
        Some(ConnSlot { admission: self.clone(), who })
    }

    fn release(&self, who: u64) {
        if let Ok(mut open) = self.open.lock() {
            open.0 = open.0.saturating_sub(1);
            if let Some(n) = open.1.get_mut(&who) {
                *n -= 1;
                if *n == 0 {
                    open.1.remove(&who);
                }
            }
        }
    }

    fn note_accept_error(&self, e: &Error) {
        self.accept_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut last) = self.last_accept_error.lock() {
            *last = Some(e.message.clone());
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> AdmissionStats {
        use std::sync::atomic::Ordering::Relaxed;
        AdmissionStats {
            admitted: self.admitted.load(Relaxed),
            open: self.open.lock().map(|o| o.0 as u64).unwrap_or(0),
            over_total: self.over_total.load(Relaxed),
            over_uid: self.over_uid.load(Relaxed),
            refused: self.refused.load(Relaxed),
            accept_errors: self.accept_errors.load(Relaxed),
            last_accept_error: self.last_accept_error.lock().ok().and_then(|l| l.clone()),
        }
    }
}

/// A connection's place under the caps of an [`Admission`]; given back when dropped (with its connection).
#[derive(Debug)]
pub struct ConnSlot {
    admission: Arc<Admission>,
    who: u64,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.admission.release(self.who);
    }
}

/// The error response for a peer the filter refuses (text as PROTOCOL.md's error frames: command 0xff, a key of
/// 64 NULs, DataSize = text length).
fn permission_denied_frame(peer: Option<PeerCred>) -> Vec<u8> {
    let who = match peer {
        Some(p) => format!("uid {} gid {}", p.uid, p.gid),
        None => "unknown peer".to_string(),
    };
    let text = format!("permission denied: peer {who} is not allowed");
    let mut f = Vec::with_capacity(FRAME_HEADER_LEN + text.len());
    f.extend_from_slice(&FRAME_MAGIC.to_be_bytes());
    f.push(0xff);
    f.extend_from_slice(&(text.len() as u32).to_be_bytes());
    f.extend_from_slice(&0u32.to_be_bytes());
    f.extend_from_slice(&[0u8; 64]);
    f.extend_from_slice(text.as_bytes());
    f
}

/// One get response ready to send: the header (with the key as the request carries it), the payload (or the
/// dummy byte) and owned duplicates of the fds.
#[derive(Debug)]
struct FastGet {
    /// The key as registered (what the application's own log would show).
    key: Arc<str>,
    head: Vec<u8>,
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// One get answered by [`FastGets`], for the application's request log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastGetRecord {
    /// The key, as registered.
    pub key: Arc<str>,
    /// The peer's credentials (`None` when `SO_PEERCRED` failed).
    pub peer: Option<PeerCred>,
    /// From having the request frame to the response handed to the socket (or to the failure).
    pub duration: Duration,
    /// Why the response could not be sent (the peer went away, the write deadline passed); `None`: sent.
    pub error: Option<Arc<str>>,
}

/// What [`FastGets::take_log`] returns: the queued records, oldest first, and how many records were dropped
/// since the previous take because the queue was full (all of them newer than every record returned).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FastGetLog {
    /// The records, oldest first.
    pub records: Vec<FastGetRecord>,
    /// Records lost since the previous take (the queue was full).
    pub dropped: u64,
}

/// Called (on the runtime thread that answered a get) when the log queue goes from empty to not empty.
pub type FastLogWake = Arc<dyn Fn() + Send + Sync>;

/// The bounded log queue of [`FastGets`].
struct FastLogQueue {
    records: std::collections::VecDeque<FastGetRecord>,
    capacity: usize,
    /// Dropped since the last take.
    dropped: u64,
    /// Dropped in all.
    dropped_total: u64,
    wake: Option<FastLogWake>,
}

impl std::fmt::Debug for FastLogQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastLogQueue")
            .field("queued", &self.records.len())
            .field("capacity", &self.capacity)
            .field("dropped", &self.dropped)
            .field("dropped_total", &self.dropped_total)
            .field("wake", &self.wake.is_some())
            .finish()
    }
}

/// The peer's credentials, asked for at most once per connection turn (`None` inside: `SO_PEERCRED` failed).
#[derive(Default)]
struct PeerSlot(Option<Option<PeerCred>>);

impl PeerSlot {
    fn get(&mut self, conn: &UnixConnection) -> Option<PeerCred> {
        *self.0.get_or_insert_with(|| conn.peer_cred().ok())
    }
}

/// Get responses a server answers natively, without a round trip to its application code.
///
/// The application registers a key once it knows the key's fds and info ([`register`](Self::register) duplicates
/// the fds and owns the duplicates) and unregisters it before it releases the key. A connection task
/// ([`UnixConnection::serve_fast_gets`]) then answers a get request for that key itself, with exactly the bytes
/// the application would send: the 77-byte header (command `0x82`, DataSize = info length, OobSize =
/// `CMSG_SPACE(4 * nfds)`, the request's key echoed), then one `sendmsg` with the info (or one `0x00` byte when
/// the info is empty) and the fds. Only a request the application would answer the same way qualifies: good
/// magic, command get, DataSize 0, the key bytes exactly the registered key right-padded with spaces. Peers are
/// filtered before any of their requests reaches this table or the application ([`PeerFilter`], applied once by
/// [`UnixListener::incoming_served`]). Anything else goes to the application as before. Responses are written
/// within [`set_write_deadline`](Self::set_write_deadline).
///
/// A response in flight holds its own reference to the duplicates, so unregistering never closes fds under a
/// `sendmsg`: a get racing a release either gets the fds (still the source's open files) or, once unregistered,
/// goes to the application, which answers "bad fd key". After [`close`](Self::close) nothing is answered, and
/// [`drained`](Self::drained) resolves once the last response in flight is out and every duplicate is closed.
///
/// Logging ([`enable_log`](Self::enable_log)): the application cannot see these requests, so when it wants to log
/// every request it turns the log on, and each answered get then adds a [`FastGetRecord`] to a bounded queue,
/// after its response was handed to the socket (the get never waits for the log). The application collects them
/// with [`take_log`](Self::take_log) when woken; records over the capacity are counted, not kept. A record is
/// queued before its response stops counting as in flight, so after [`drained`](Self::drained) the queue holds
/// every answered get that was not taken yet. Without the log nothing is measured or queued.
#[derive(Debug, Default)]
pub struct FastGets {
    entries: std::sync::Mutex<std::collections::HashMap<Vec<u8>, Arc<FastGet>>>,
    write_deadline: std::sync::Mutex<Option<Duration>>,
    closed: std::sync::atomic::AtomicBool,
    close_notify: tokio::sync::Notify,
    inflight: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
    logging: std::sync::atomic::AtomicBool,
    log: std::sync::Mutex<Option<FastLogQueue>>,
}

/// The 64 key bytes of `key` as a client sends them: UTF-8, right-padded with spaces.
fn padded_key(key: &str) -> Result<Vec<u8>> {
    let b = key.as_bytes();
    if b.is_empty() || b.len() > 64 {
        return Err(Error::invalid(format!("fd key of {} bytes: 1 to 64 fit", b.len())));
    }
    let mut k = b.to_vec();
    k.resize(64, b' ');
    Ok(k)
}

impl FastGets {
    /// An empty table that lets every peer through.
    pub fn new() -> FastGets {
        FastGets::default()
    }

    /// Bounds each natively written response (`None`: unbounded): a peer that does not read cannot hold a
    /// connection task, nor [`drained`](Self::drained), longer than that.
    pub fn set_write_deadline(&self, deadline: Option<Duration>) {
        if let Ok(mut d) = self.write_deadline.lock() {
            *d = deadline;
        }
    }

    /// Turns the log on (see the type's doc): at most `capacity` (at least 1) records wait to be taken, more are
    /// dropped and counted; `wake` is called, from the thread that answered the get, each time a record goes into
    /// an empty queue (take everything at each wake-up, and no record waits unseen). Calling it again replaces
    /// the capacity and `wake` and keeps the queue.
    pub fn enable_log(&self, capacity: usize, wake: FastLogWake) {
        if let Ok(mut g) = self.log.lock() {
            match g.as_mut() {
                Some(q) => {
                    q.capacity = capacity.max(1);
                    q.wake = Some(wake);
                }
                None => {
                    *g = Some(FastLogQueue {
                        records: std::collections::VecDeque::new(),
                        capacity: capacity.max(1),
                        dropped: 0,
                        dropped_total: 0,
                        wake: Some(wake),
                    })
                }
            }
            self.logging.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Forgets the wake-up callback (e.g. before the application goes away); records are still queued and taken.
    pub fn clear_log_wake(&self) {
        let old = self.log.lock().ok().and_then(|mut g| g.as_mut().and_then(|q| q.wake.take()));
        drop(old);
    }

    /// Takes every queued record and the count dropped since the previous take. Empty when the log is off.
    pub fn take_log(&self) -> FastGetLog {
        let Ok(mut g) = self.log.lock() else { return FastGetLog::default() };
        let Some(q) = g.as_mut() else { return FastGetLog::default() };
        let records = Vec::from(std::mem::take(&mut q.records));
        FastGetLog { records, dropped: std::mem::take(&mut q.dropped) }
    }

    /// How many records were dropped in all because the queue was full.
    pub fn log_dropped_total(&self) -> u64 {
        self.log.lock().ok().and_then(|g| g.as_ref().map(|q| q.dropped_total)).unwrap_or(0)
    }

    /// Queues `rec` (or counts it as dropped) and wakes the application when the queue was empty.
    fn push_log(&self, rec: FastGetRecord) {
        let wake = {
            let Ok(mut g) = self.log.lock() else { return };
            let Some(q) = g.as_mut() else { return };
            if q.records.len() >= q.capacity {
                q.dropped += 1;
                q.dropped_total += 1;
                return;
            }
            q.records.push_back(rec);
            if q.records.len() == 1 {
                q.wake.clone()
            } else {
                None
            }
        };
        if let Some(w) = wake {
            w();
        }
    }

    /// Registers (or replaces) the get response of `key` (1 to 64 bytes, as the server decoded it): `info` and
    /// duplicates of `fds` (at most [`MAX_FDS`]), which the table owns from now on. `ERR_CLOSED` after
    /// [`close`](Self::close).
    pub fn register(&self, key: &str, info: &[u8], fds: &[RawFd]) -> Result<()> {
        let k = padded_key(key)?;
        if fds.len() > MAX_FDS {
            return Err(Error::invalid(format!("{} fds, at most {MAX_FDS}", fds.len())));
        }
        let size = u32::try_from(info.len()).map_err(|_| Error::invalid("info too large"))?;
        let dups = dup_fds(fds)?;
        let mut head = Vec::with_capacity(FRAME_HEADER_LEN);
        head.extend_from_slice(&FRAME_MAGIC.to_be_bytes());
        head.push(0x82);
        head.extend_from_slice(&size.to_be_bytes());
        head.extend_from_slice(&(cmsg_space(fds.len()) as u32).to_be_bytes());
        head.extend_from_slice(&k);
        let body = if info.is_empty() && !fds.is_empty() { vec![0] } else { info.to_vec() };
        let entry = Arc::new(FastGet { key: Arc::from(key), head, body, fds: dups });
        let mut map = self.entries.lock().map_err(|_| Error::invalid("fast get table poisoned"))?;
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::new(ErrorCode::Closed, "fast get table is closed"));
        }
        map.insert(k, entry);
        Ok(())
    }

    /// Forgets `key`: from now on its gets go to the application. Responses already being sent finish; the
    /// duplicates close after the last one.
    pub fn unregister(&self, key: &str) {
        let Ok(k) = padded_key(key) else { return };
        let removed = self.entries.lock().ok().and_then(|mut m| m.remove(&k));
        drop(removed);
    }

    /// Whether `key` is registered.
    pub fn contains(&self, key: &str) -> bool {
        let Ok(k) = padded_key(key) else { return false };
        self.entries.lock().map(|m| m.contains_key(&k)).unwrap_or(false)
    }

    /// Forgets every key and answers nothing from now on; reads waiting in
    /// [`UnixConnection::serve_fast_gets`] end with `ERR_CLOSED`.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        let all = self.entries.lock().map(|mut m| std::mem::take(&mut *m)).unwrap_or_default();
        drop(all);
        self.close_notify.notify_waiters();
        if self.inflight.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            self.idle.notify_waiters();
        }
    }

    async fn closed(&self) {
        wait_closed(&self.closed, &self.close_notify).await
    }

    /// Resolves when no response is being sent (after [`close`](Self::close): every duplicate is closed).
    pub async fn drained(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inflight.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Answers `frame` on `conn` if it qualifies (see the type's doc); returns whether it did. With the log on,
    /// queues a record once the response is out.
    async fn answer(&self, conn: &UnixConnection, frame: &Frame, peer: &mut PeerSlot) -> Result<bool> {
        let started = self.logging.load(std::sync::atomic::Ordering::Relaxed).then(Instant::now);
        let h = &frame.header;
        let qualifies = h.len() == FRAME_HEADER_LEN
            && u32::from_be_bytes([h[0], h[1], h[2], h[3]]) == FRAME_MAGIC
            && h[4] == 2
            && frame_sizes(h).0 == 0
            && frame.data.as_ref().is_some_and(|d| d.is_empty());
        if !qualifies {
            return Ok(false);
        }
        let guard = InFlight::enter(self);
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(false);
        }
        let entry = match self.entries.lock() {
            Ok(m) => m.get(&h[13..FRAME_HEADER_LEN]).cloned(),
            Err(_) => None,
        };
        let Some(entry) = entry else { return Ok(false) };
        let deadline = self.write_deadline.lock().map(|d| *d).unwrap_or(None);
        let sent = with_deadline(deadline, "write response", async {
            conn.write_all(&entry.head).await?;
            let borrowed: Vec<BorrowedFd<'_>> = entry.fds.iter().map(|f| f.as_fd()).collect();
            conn.send_with_fds(&entry.body, &borrowed).await
        })
        .await;
        // One record per answered request, whatever became of the response (a peer gone: an error record).
        if let Some(t) = started {
            let duration = t.elapsed();
            let error = sent.as_ref().err().map(|e| Arc::from(e.message.as_str()));
            self.push_log(FastGetRecord { key: entry.key.clone(), peer: peer.get(conn), duration, error });
        }
        drop(entry);
        drop(guard);
        sent.map(|()| true)
    }
}

/// Counts a response in flight for [`FastGets::drained`], also when its future is dropped half way.
struct InFlight<'a>(&'a FastGets);

impl<'a> InFlight<'a> {
    fn enter(f: &'a FastGets) -> InFlight<'a> {
        f.inflight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlight(f)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl UnixConnection {
    /// Answers `frame` and the request frames after it while `fast` can (see [`FastGets`]), reading each next
    /// frame like [`read_request_frame`](Self::read_request_frame); returns the first frame `fast` cannot answer.
    /// Ends with an error at EOF, a deadline, a failed write, or once `fast` is closed while waiting for a frame.
    pub async fn serve_fast_gets(
        &self,
        mut frame: Frame,
        fast: &FastGets,
        max_data: usize,
        deadline: Option<Duration>,
    ) -> Result<Frame> {
        let mut peer = PeerSlot::default();
        while fast.answer(self, &frame, &mut peer).await? {
            frame = tokio::select! {
                r = self.read_request_frame(max_data, deadline) => r?,
                _ = fast.closed() => return Err(Error::new(ErrorCode::Closed, "server is closed")),
            };
        }
        Ok(frame)
    }
}

/// Duplicates fds (`fcntl(F_DUPFD_CLOEXEC)`) into owned ones, e.g. to send them later while the original owner
/// is free to close its copies.
pub fn dup_fds(fds: &[RawFd]) -> Result<Vec<OwnedFd>> {
    fds.iter()
        .map(|&fd| {
            if fd < 0 {
                return Err(Error::invalid(format!("bad fd {fd}")));
            }
            // SAFETY: the fd is only borrowed for the duration of the fcntl; a closed fd yields EBADF.
            let b = unsafe { BorrowedFd::borrow_raw(fd) };
            b.try_clone_to_owned().map_err(|e| Error::io(format!("dup fd {fd}"), e))
        })
        .collect()
}

/// One client request of the FDServer protocol on a new connection: connect to `path`, write `request`
/// (header and payload), read the response frame, close. The whole exchange is bounded by `deadline`.
pub async fn request(path: impl AsRef<Path>, request: &[u8], deadline: Option<Duration>) -> Result<Frame> {
    let path = path.as_ref();
    let fut = async {
        let conn = UnixConnection::connect(path).await?;
        conn.write_all(request).await?;
        conn.read_response_frame(None).await
    };
    with_deadline(deadline, "request", fut).await
}

/// The first half of [`request`], done at once on the calling thread without blocking: a non-blocking
/// `connect` to `path` and as much of `request` as one non-blocking `write` takes. Returns the connected
/// (non-blocking) stream and the number of bytes written, or `None` when the connect would have to wait (the
/// listener's backlog is full; then use [`request`]). Finish with [`finish_request`]. Starting the exchange on the
/// caller's thread lets the server work while the runtime picks up the rest.
pub fn start_request(
    path: impl AsRef<Path>,
    request: &[u8],
) -> Result<Option<(std::os::unix::net::UnixStream, usize)>> {
    let path = path.as_ref();
    let connect_err = |e: io::Error| Error::io(format!("connect {}", path.display()), e);
    let bytes = path.as_os_str().as_encoded_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid empty value.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(connect_err(io::Error::from_raw_os_error(libc::EINVAL)));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    // SAFETY: plain socket(2); the result is checked and owned at once.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(connect_err(io::Error::last_os_error()));
    }
    // SAFETY: raw is a fresh socket that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = (mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_un of at least len bytes; fd is a valid socket.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => Ok(None),
            _ => Err(connect_err(e)),
        };
    }
    let stream = std::os::unix::net::UnixStream::from(fd);
    let written = match io::Write::write(&mut &stream, request) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => 0,
        Err(e) => return Err(Error::io(format!("write {} bytes", request.len()), e)),
    };
    Ok(Some((stream, written)))
}

/// The second half of [`request`] after [`start_request`]: writes the rest of `request` (from byte `written`),
/// reads the response frame, closes. Bounded by `deadline`. Must run inside a tokio runtime.
pub async fn finish_request(
    stream: std::os::unix::net::UnixStream,
    request: &[u8],
    written: usize,
    deadline: Option<Duration>,
) -> Result<Frame> {
    let fut = async {
        let conn = UnixConnection::from_std(stream)?;
        conn.write_all(&request[written..]).await?;
        conn.read_response_frame(None).await
    };
    with_deadline(deadline, "request", fut).await
}

async fn with_deadline<T>(
    deadline: Option<Duration>,
    what: &str,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match deadline {
        Some(d) => match tokio::time::timeout(d, fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(ErrorCode::Timeout, format!("{what}: not done within {} ms", d.as_millis()))),
        },
        None => fut.await,
    }
}

/// `sendmsg(fd, data, SCM_RIGHTS(fds), MSG_NOSIGNAL)`; returns the bytes sent.
fn sendmsg_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    let space = cmsg_space(fds.len());
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain old data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points to `space` zeroed, 8-aligned bytes, enough for one header plus the fds
        // (CMSG_SPACE), so CMSG_FIRSTHDR is non-null and CMSG_DATA has room for fds.len() ints.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of_val(fds) as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg) as *mut RawFd, fds.len());
        }
    }
    // SAFETY: msg points to valid iov and control buffers that outlive the call.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `recvmsg(fd, data, control, MSG_CMSG_CLOEXEC)`; returns bytes read, owned fds, and whether control data was
/// truncated.
fn recvmsg_fds(
    sock: RawFd,
    data: &mut [u8],
    control: &mut [u64],
    control_len: usize,
) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    // SAFETY: msghdr is plain old data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if control_len > 0 {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control_len as _;
    }
    // SAFETY: msg points to valid, writable iov and control buffers of the lengths given, which outlive the call.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    if control_len > 0 && msg.msg_controllen > 0 {
        // SAFETY: the kernel filled msg_controllen bytes of the control buffer with well-formed cmsg headers;
        // CMSG_FIRSTHDR/CMSG_NXTHDR stay within msg_controllen. Each SCM_RIGHTS payload holds
        // (cmsg_len - CMSG_LEN(0)) / 4 fds that were installed in this process and are owned by nobody else,
        // so wrapping them in OwnedFd at once is sound and closes them on every later error path.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    let count = payload / mem::size_of::<RawFd>();
                    let base = libc::CMSG_DATA(cmsg) as *const RawFd;
                    for i in 0..count {
                        let fd = std::ptr::read_unaligned(base.add(i));
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
    }
    let truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;
    Ok((n as usize, fds, truncated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmsg_space_matches_the_protocol() {
        assert_eq!(cmsg_space(0), 0);
        assert_eq!(cmsg_space(1), 24);
        assert_eq!(cmsg_space(2), 24);
        assert_eq!(cmsg_space(3), 32);
        assert_eq!(cmsg_space(4), 32);
    }

    fn record(key: &str) -> FastGetRecord {
        FastGetRecord { key: Arc::from(key), peer: None, duration: Duration::from_micros(1), error: None }
    }

    fn counting_wake() -> (FastLogWake, Arc<std::sync::atomic::AtomicUsize>) {
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let m = n.clone();
        (Arc::new(move || _ = m.fetch_add(1, std::sync::atomic::Ordering::SeqCst)), n)
    }

    #[test]
    fn fast_log_off_queues_nothing() {
        let f = FastGets::new();
        f.push_log(record("a"));
        assert_eq!(f.take_log(), FastGetLog::default());
        assert_eq!(f.log_dropped_total(), 0);
    }

    #[test]
    fn fast_log_wakes_on_empty_to_not_empty_and_counts_drops() {
        let f = FastGets::new();
        let (wake, woken) = counting_wake();
        f.enable_log(2, wake);
        f.push_log(record("a"));
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 1);
        f.push_log(record("b"));
        f.push_log(record("c"));
        f.push_log(record("d"));
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 1, "no wake-up while the queue is not empty");
        let got = f.take_log();
        assert_eq!(got.records.iter().map(|r| &*r.key).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(got.dropped, 2);
        assert_eq!(f.log_dropped_total(), 2);
        // The drop count is reported once; an empty queue wakes again on the next record.
        assert_eq!(f.take_log(), FastGetLog::default());
        f.push_log(record("e"));
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(f.take_log().records, vec![record("e")]);
        assert_eq!(f.log_dropped_total(), 2);
        // Without a wake-up callback records still queue.
        f.clear_log_wake();
        f.push_log(record("f"));
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(f.take_log().records, vec![record("f")]);
    }

    #[test]
    fn admission_caps_total_and_per_uid_and_gives_places_back() {
        let a = Arc::new(Admission::new(ConnLimits { total: 3, per_uid: 2 }, PeerFilter::default()));
        let s1 = a.admit(Some(1)).unwrap();
        let _s2 = a.admit(Some(1)).unwrap();
        assert!(a.admit(Some(1)).is_none(), "per-uid cap");
        let _s3 = a.admit(Some(2)).unwrap();
        assert!(a.admit(Some(3)).is_none(), "total cap");
        let st = a.stats();
        assert_eq!((st.admitted, st.open, st.over_uid, st.over_total), (3, 3, 1, 1));
        drop(s1);
        assert_eq!(a.stats().open, 2);
        assert!(a.admit(Some(1)).is_some(), "a place given back is free again");
    }

    #[test]
    fn peer_filter_is_one_rule_for_uids_and_gids() {
        let p = |uid, gid| Some(PeerCred { pid: 1, uid, gid });
        assert!(PeerFilter::default().allows(None));
        let f = PeerFilter { uids: Some(vec![0]), gids: Some(vec![107]) };
        assert!(f.allows(p(0, 5)) && f.allows(p(9, 107)));
        assert!(!f.allows(p(1, 1)) && !f.allows(None));
    }

    /// A get frame for `key` as a client sends it.
    fn get_frame(key: &str) -> Frame {
        let mut header = Vec::with_capacity(FRAME_HEADER_LEN);
        header.extend_from_slice(&FRAME_MAGIC.to_be_bytes());
        header.push(2);
        header.extend_from_slice(&[0; 8]);
        header.extend_from_slice(&padded_key(key).unwrap());
        Frame { header, data: Some(Vec::new()), fds: Vec::new() }
    }

    #[test]
    fn answered_gets_are_logged_after_the_response_with_key_and_peer() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            let server = UnixConnection::from_std(a).unwrap();
            let client = UnixConnection::from_std(b).unwrap();
            let fast = FastGets::new();
            let file = tempfile::tempfile().unwrap();
            fast.register("k", b"info", &[file.as_raw_fd()]).unwrap();
            let (wake, woken) = counting_wake();
            fast.enable_log(16, wake);
            // Two registered gets are answered and logged; the unknown key is handed back, unlogged.
            client.write_all(&get_frame("k").header).await.unwrap();
            client.write_all(&get_frame("other").header).await.unwrap();
            let back = server.serve_fast_gets(get_frame("k"), &fast, 1024, Some(Duration::from_secs(5))).await.unwrap();
            assert_eq!(&back.header[13..], &padded_key("other").unwrap()[..]);
            for _ in 0..2 {
                let r = client.read_response_frame(Some(Duration::from_secs(5))).await.unwrap();
                assert_eq!(r.header[4], 0x82);
                assert_eq!(r.data.as_deref(), Some(&b"info"[..]));
                assert_eq!(r.fds.len(), 1);
            }
            assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 1);
            let log = fast.take_log();
            assert_eq!(log.dropped, 0);
            assert_eq!(log.records.len(), 2);
            // SAFETY: getuid/getgid/getpid cannot fail.
            let (uid, gid, pid) = unsafe { (libc::getuid(), libc::getgid(), libc::getpid()) };
            for r in &log.records {
                assert_eq!(&*r.key, "k");
                assert_eq!(r.peer, Some(PeerCred { pid, uid, gid }));
            }
        });
    }
}
