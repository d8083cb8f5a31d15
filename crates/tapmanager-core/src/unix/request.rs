//! The client side: one FDServer request on a new connection, whole or started on the calling thread without
//! blocking and finished on the runtime, or finished without a runtime by a [`ResponseReader`] driven by
//! whatever waits for the socket (the JavaScript thread's event loop).

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{connect, recv, send, socket, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};

use super::frame::{frame_sizes, Frame, FRAME_HEADER_LEN, FRAME_MAGIC};
use super::scm::{control_truncated, recvmsg_fds};
use super::socket::UnixConnection;
use super::with_deadline;
use crate::error::{Error, ErrorCode, Result};

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
    start_request_on(None, path, request)
}

/// A new unconnected client socket as [`start_request`] makes one (Unix stream, non-blocking, close-on-exec).
pub fn client_socket() -> io::Result<OwnedFd> {
    Ok(socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?)
}

/// [`start_request`] on `sock`, an unconnected socket from [`client_socket`] made ahead of time (taken whatever
/// happens), or on a new one when `None`.
pub fn start_request_on(
    sock: Option<OwnedFd>,
    path: impl AsRef<Path>,
    request: &[u8],
) -> Result<Option<(std::os::unix::net::UnixStream, usize)>> {
    let path = path.as_ref();
    let connect_err = |e: io::Error| Error::io(format!("connect {}", path.display()), e);
    // A path too long for sun_path or with a NUL byte is EINVAL, as before (nix says ENAMETOOLONG for the former).
    let addr = UnixAddr::new(path).map_err(|_| connect_err(io::Error::from_raw_os_error(libc::EINVAL)))?;
    let fd: OwnedFd = match sock {
        Some(fd) => fd,
        None => client_socket().map_err(connect_err)?,
    };
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(Errno::EAGAIN) | Err(Errno::EINPROGRESS) => return Ok(None),
        Err(e) => return Err(connect_err(e.into())),
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

/// Where a [`ResponseReader`] is in the response frame.
#[derive(Debug)]
enum Phase {
    /// Reading the 77 header bytes.
    Header,
    /// The one `recvmsg` for the payload and the fds is due.
    Message,
    /// Plain reads of the payload bytes that did not fit in that message.
    Rest,
}

/// Reads a response frame off a non-blocking socket as far as the socket has data, exactly as
/// [`UnixConnection::read_response_frame`] does (77 header bytes, then one `recvmsg` with a DataSize buffer and an
/// OobSize control buffer, then plain reads of what did not fit), but without a runtime: the caller waits for
/// the socket to be readable by any means (e.g. the JavaScript thread's own event loop) and calls
/// [`advance`](Self::advance) each time. Received fds are owned at once.
#[derive(Debug)]
pub struct ResponseReader {
    header: [u8; FRAME_HEADER_LEN],
    got: usize,
    phase: Phase,
    data: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Default for ResponseReader {
    fn default() -> Self {
        Self::new()
    }
}

impl ResponseReader {
    /// A reader at the start of a response frame.
    pub fn new() -> ResponseReader {
        ResponseReader {
            header: [0; FRAME_HEADER_LEN],
            got: 0,
            phase: Phase::Header,
            data: Vec::new(),
            fds: Vec::new(),
        }
    }

    /// Reads what `sock` (non-blocking) has: `Ok(Some(frame))` once the frame is complete, `Ok(None)` when it
    /// must wait for more. EOF in the middle is `ERR_CLOSED`, truncated control data `ERR_TOO_LARGE` (the fds
    /// that did arrive are closed), as with [`UnixConnection::read_response_frame`].
    pub fn advance(&mut self, sock: BorrowedFd<'_>) -> Result<Option<Frame>> {
        let fd = sock.as_raw_fd();
        loop {
            match self.phase {
                Phase::Header => {
                    let n = match read_some(fd, &mut self.header[self.got..]) {
                        Ok(Some(n)) => n,
                        Ok(None) => return Ok(None),
                        Err(e) => return Err(Error::io(format!("read {FRAME_HEADER_LEN} bytes"), e)),
                    };
                    if n == 0 {
                        return Err(Error::new(
                            ErrorCode::Closed,
                            format!("read {FRAME_HEADER_LEN} bytes: connection closed after {}", self.got),
                        ));
                    }
                    self.got += n;
                    if self.got < FRAME_HEADER_LEN {
                        continue;
                    }
                    let h = &self.header;
                    if u32::from_be_bytes([h[0], h[1], h[2], h[3]]) != FRAME_MAGIC {
                        return Ok(Some(Frame { header: h.to_vec(), data: None, fds: Vec::new() }));
                    }
                    let (size, oob) = frame_sizes(h);
                    if size == 0 && oob == 0 {
                        return Ok(Some(Frame { header: h.to_vec(), data: Some(Vec::new()), fds: Vec::new() }));
                    }
                    self.phase = Phase::Message;
                }
                Phase::Message => {
                    let (size, oob) = frame_sizes(&self.header);
                    let mut data = vec![0u8; size.max(1)];
                    let mut control = vec![0u64; oob.div_ceil(8)];
                    let (n, fds, truncated) = match recvmsg_fds(fd, &mut data, &mut control, oob) {
                        Ok(r) => r,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(Error::io("recvmsg", e)),
                    };
                    if truncated {
                        drop(fds);
                        return Err(control_truncated(oob));
                    }
                    if n == 0 {
                        return Err(Error::new(
                            ErrorCode::Closed,
                            "read response: connection closed before the payload",
                        ));
                    }
                    self.fds = fds;
                    if size == 0 {
                        data.clear(); // the dummy byte
                    } else {
                        data.truncate(n);
                    }
                    self.data = data;
                    if self.data.len() >= size {
                        return Ok(Some(self.take()));
                    }
                    self.got = self.data.len();
                    self.data.resize(size, 0);
                    self.phase = Phase::Rest;
                }
                Phase::Rest => {
                    let size = self.data.len();
                    let n = match read_some(fd, &mut self.data[self.got..]) {
                        Ok(Some(n)) => n,
                        Ok(None) => return Ok(None),
                        Err(e) => return Err(Error::io(format!("read {} bytes", size - self.got), e)),
                    };
                    if n == 0 {
                        return Err(Error::new(
                            ErrorCode::Closed,
                            format!("read response: connection closed after {} of {size} payload bytes", self.got),
                        ));
                    }
                    self.got += n;
                    if self.got == size {
                        return Ok(Some(self.take()));
                    }
                }
            }
        }
    }

    fn take(&mut self) -> Frame {
        Frame { header: self.header.to_vec(), data: Some(mem::take(&mut self.data)), fds: mem::take(&mut self.fds) }
    }
}

/// One non-blocking `read`: `Ok(None)` when nothing is there yet (EAGAIN), `Ok(Some(0))` at EOF; EINTR is retried.
pub(super) fn read_some(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match recv(fd, buf, MsgFlags::empty()) {
            Ok(n) => return Ok(Some(n)),
            Err(Errno::EAGAIN) => return Ok(None),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Writes more of `request` from byte `*written` on a non-blocking socket, as far as it takes: `Ok(true)` once
/// all of it is written, `Ok(false)` when it must wait until the socket is writable.
pub fn continue_write(sock: BorrowedFd<'_>, request: &[u8], written: &mut usize) -> Result<bool> {
    while *written < request.len() {
        // MSG_NOSIGNAL: a closed peer is EPIPE, not SIGPIPE.
        match send(sock.as_raw_fd(), &request[*written..], MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => *written += n,
            Err(Errno::EAGAIN) => return Ok(false),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::io(format!("write {} bytes", request.len()), e.into())),
        }
    }
    Ok(true)
}
