//! The client side: one FDServer request on a new connection, whole or started on the calling thread without
//! blocking and finished on the runtime, or finished without a runtime by a [`ResponseReader`] driven by
//! whatever waits for the socket (the JavaScript thread's event loop).

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use super::frame::{frame_sizes, Frame, FRAME_HEADER_LEN, FRAME_MAGIC};
use super::scm::recvmsg_fds;
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
                        return Err(Error::new(
                            ErrorCode::TooLarge,
                            format!("recvmsg: control data truncated (buffer of {oob} bytes too small); received fds closed"),
                        ));
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
fn read_some(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: buf is valid for writes of buf.len() bytes; fd is a socket the caller keeps open.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(None),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(e),
        }
    }
}

/// Writes more of `request` from byte `*written` on a non-blocking socket, as far as it takes: `Ok(true)` once
/// all of it is written, `Ok(false)` when it must wait until the socket is writable.
pub fn continue_write(sock: BorrowedFd<'_>, request: &[u8], written: &mut usize) -> Result<bool> {
    while *written < request.len() {
        // SAFETY: the slice is valid for reads of its length; MSG_NOSIGNAL: a closed peer is EPIPE, not SIGPIPE.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                request[*written..].as_ptr().cast(),
                request.len() - *written,
                libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            *written += n as usize;
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(false),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(Error::io(format!("write {} bytes", request.len()), e)),
        }
    }
    Ok(true)
}
