//! The client side: one FDServer request on a new connection, whole or started on the calling thread without
//! blocking and finished on the runtime.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use super::frame::Frame;
use super::socket::UnixConnection;
use super::with_deadline;
use crate::error::{Error, Result};

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
