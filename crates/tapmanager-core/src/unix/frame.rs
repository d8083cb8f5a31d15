//! The 77-byte frame of the FDServer protocol (PROTOCOL.md): reading request and response frames off a
//! connection, writing responses, and the bytes of error frames and keys.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::MsgFlags;

use super::request::read_some;
use super::scm::{sendmsg_fds, MAX_FDS};

use super::socket::{PeerCred, UnixConnection};
use super::with_deadline;
use crate::error::{Error, ErrorCode, Result};

/// Length of an FDServer protocol header (PROTOCOL.md): magic(4) command(1) DataSize(4) OobSize(4) key(64).
pub const FRAME_HEADER_LEN: usize = 77;
pub(super) const FRAME_MAGIC: u32 = 0x4242_4242;

/// DataSize and OobSize of a header (big-endian at bytes 5..9 and 9..13).
pub(super) fn frame_sizes(h: &[u8]) -> (usize, usize) {
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

/// Reads a request frame off a non-blocking socket as far as the socket has data, exactly as
/// [`UnixConnection::read_request_frame`] does (77 header bytes, then DataSize payload bytes; the payload left
/// unread when the magic is wrong or DataSize exceeds `max_data`), but without a runtime: the caller waits for
/// the socket to be readable by any means (the JavaScript thread's own event loop) and calls
/// [`advance`](Self::advance) each time. The server-side twin of [`ResponseReader`](super::ResponseReader); the
/// deadline is the caller's.
#[derive(Debug)]
pub struct RequestReader {
    header: [u8; FRAME_HEADER_LEN],
    /// Bytes of the header (while `data` is `None`) or of the payload read so far.
    got: usize,
    data: Option<Vec<u8>>,
    max_data: usize,
}

impl RequestReader {
    /// A reader at the start of a request frame whose payload may be up to `max_data` bytes.
    pub fn new(max_data: usize) -> RequestReader {
        RequestReader { header: [0; FRAME_HEADER_LEN], got: 0, data: None, max_data }
    }

    /// Starts over at a new request frame (after one was returned), with the same limit.
    pub fn reset(&mut self) {
        *self = RequestReader::new(self.max_data);
    }

    /// Reads what `sock` (non-blocking) has: `Ok(Some(frame))` once the frame is complete, `Ok(None)` when it
    /// must wait for more. EOF before or inside the frame is `ERR_CLOSED`, as with `read_request_frame`.
    pub fn advance(&mut self, sock: BorrowedFd<'_>) -> Result<Option<Frame>> {
        let fd = sock.as_raw_fd();
        loop {
            let (buf, want) = match self.data.as_mut() {
                None => (&mut self.header[..], FRAME_HEADER_LEN),
                Some(d) => {
                    let n = d.len();
                    (&mut d[..], n)
                }
            };
            let n = match read_some(fd, &mut buf[self.got..]) {
                Ok(Some(n)) => n,
                Ok(None) => return Ok(None),
                Err(e) => return Err(Error::io(format!("read {want} bytes"), e)),
            };
            if n == 0 {
                return Err(Error::new(
                    ErrorCode::Closed,
                    format!("read {want} bytes: connection closed after {}", self.got),
                ));
            }
            self.got += n;
            if self.got < want {
                continue;
            }
            if let Some(data) = self.data.take() {
                return Ok(Some(Frame { header: self.header.to_vec(), data: Some(data), fds: Vec::new() }));
            }
            let h = &self.header;
            let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
            let (size, _) = frame_sizes(h);
            if magic != FRAME_MAGIC || size > self.max_data {
                return Ok(Some(Frame { header: h.to_vec(), data: None, fds: Vec::new() }));
            }
            if size == 0 {
                return Ok(Some(Frame { header: h.to_vec(), data: Some(Vec::new()), fds: Vec::new() }));
            }
            self.data = Some(vec![0; size]);
            self.got = 0;
        }
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

/// How much of a response [`UnixConnection::try_respond`] got out: bytes of the head, bytes of the data (the fds
/// went with the first data byte).
#[derive(Debug, Clone, Copy, Default)]
pub struct Sent {
    head: usize,
    data: usize,
}

impl Sent {
    /// Whether data bytes (and with the first of them the fds) went out.
    pub fn data_started(&self) -> bool {
        self.data > 0
    }
}

/// The fd-less case of [`UnixConnection::try_respond`]: `head` and `data` go out together (one `sendmsg` of two
/// buffers: one syscall, one wake-up of the peer, the same bytes on the stream), as far as the socket takes them.
/// A response with fds cannot: its fds must come with the first data byte, after the header was read (a plain
/// read of bytes that carry fds would drop them).
fn try_write_both(sock: RawFd, head: &[u8], data: &[u8]) -> Result<(bool, Sent)> {
    let total = head.len() + data.len();
    let mut done = 0;
    while done < total {
        let r = if done < head.len() {
            let iov = [io::IoSlice::new(&head[done..]), io::IoSlice::new(data)];
            let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
            match nix::sys::socket::sendmsg::<()>(sock, &iov, &[], flags, None) {
                Ok(n) => Ok(Some(n)),
                Err(Errno::EAGAIN) => Ok(None),
                Err(Errno::EINTR) => continue,
                Err(e) => Err(io::Error::from(e)),
            }
        } else {
            send_now(sock, &data[done - head.len()..])
        };
        match r {
            Ok(Some(n)) => done += n,
            Ok(None) => break,
            Err(e) => return Err(Error::io(format!("write {total} bytes"), e)),
        }
    }
    let sent = Sent { head: done.min(head.len()), data: done.saturating_sub(head.len()) };
    Ok((done == total, sent))
}

/// One non-blocking `send` (`MSG_NOSIGNAL`): `Ok(None)` when the socket takes nothing now (EAGAIN); EINTR retried.
fn send_now(sock: RawFd, buf: &[u8]) -> io::Result<Option<usize>> {
    loop {
        match nix::sys::socket::send(sock, buf, MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT) {
            Ok(n) => return Ok(Some(n)),
            Err(Errno::EAGAIN) => return Ok(None),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

impl UnixConnection {
    /// Writes a response now, without waiting, as far as the socket takes it: `head` with a plain write, then
    /// `data` with `fds` in one `sendmsg` (nothing when both are empty), as [`respond`](Self::respond) does; without
    /// fds, `head` and `data` in one `sendmsg` (the same bytes, one wake-up of the peer).
    /// Returns true when all of it went out (the usual case: a response is far smaller than the socket buffer),
    /// else false and the progress, to finish with [`respond_rest`](Self::respond_rest). The fds are only
    /// borrowed: once `data` started going out, the kernel holds its own references. No other write may be in
    /// progress on the connection.
    pub fn try_respond(&self, head: &[u8], data: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(bool, Sent)> {
        if data.is_empty() && !fds.is_empty() {
            return Err(Error::invalid("sendmsg: fds need at least one data byte"));
        }
        if fds.len() > MAX_FDS {
            return Err(Error::invalid(format!("sendmsg: {} fds, at most {MAX_FDS}", fds.len())));
        }
        let sock = self.as_raw_fd();
        if fds.is_empty() {
            return try_write_both(sock, head, data);
        }
        let mut sent = Sent::default();
        while sent.head < head.len() {
            match send_now(sock, &head[sent.head..]) {
                Ok(Some(n)) => sent.head += n,
                Ok(None) => return Ok((false, sent)),
                Err(e) => return Err(Error::io(format!("write {} bytes", head.len()), e)),
            }
        }
        if data.is_empty() {
            return Ok((true, sent));
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        loop {
            match sendmsg_fds(sock, data, &raw) {
                Ok(n) => {
                    sent.data = n;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((false, sent)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(format!("sendmsg {} bytes with {} fds", data.len(), fds.len()), e)),
            }
        }
        while sent.data < data.len() {
            match send_now(sock, &data[sent.data..]) {
                Ok(Some(n)) => sent.data += n,
                Ok(None) => return Ok((false, sent)),
                Err(e) => return Err(Error::io(format!("write {} bytes", data.len()), e)),
            }
        }
        Ok((true, sent))
    }

    /// Finishes a response [`try_respond`](Self::try_respond) could not get out whole, from `sent` on, within
    /// `deadline` when given (`ERR_TIMEOUT`). `fds` are owned duplicates of the ones given to `try_respond`
    /// (only sent when no data byte went out yet), closed once sent.
    pub async fn respond_rest(
        &self,
        head: &[u8],
        data: &[u8],
        fds: Vec<OwnedFd>,
        sent: Sent,
        deadline: Option<Duration>,
    ) -> Result<()> {
        let fut = async {
            self.write_all(&head[sent.head..]).await?;
            if sent.data == 0 {
                let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
                self.send_with_fds(data, &borrowed).await
            } else {
                self.write_all(&data[sent.data..]).await
            }
        };
        with_deadline(deadline, "write response", fut).await
    }
}

/// The error response for a peer the filter refuses (text as PROTOCOL.md's error frames: command 0xff, a key of
/// 64 NULs, DataSize = text length).
pub fn permission_denied_frame(peer: Option<PeerCred>) -> Vec<u8> {
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

/// The 64 key bytes of `key` as a client sends them: UTF-8, right-padded with spaces.
pub(super) fn padded_key(key: &str) -> Result<Vec<u8>> {
    let b = key.as_bytes();
    if b.is_empty() || b.len() > 64 {
        return Err(Error::invalid(format!("fd key of {} bytes: 1 to 64 fit", b.len())));
    }
    let mut k = b.to_vec();
    k.resize(64, b' ');
    Ok(k)
}
