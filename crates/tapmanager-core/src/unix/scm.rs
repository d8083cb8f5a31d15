//! `SCM_RIGHTS` messages: data plus fds in one `sendmsg`, and one `recvmsg` (`MSG_CMSG_CLOEXEC`) into buffers of
//! given sizes, on `nix`. Every received fd is wrapped in an [`OwnedFd`] as soon as it is parsed, so nothing
//! leaks on any error path (truncated control data, a second control message, a short read).

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use tokio::io::Interest;

use super::socket::UnixConnection;
use crate::error::{Error, ErrorCode, Result};

/// The most fds one message may carry (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// The error of a `recvmsg` whose control data did not fit in `control_len` bytes (the fds that came were closed).
pub(super) fn control_truncated(control_len: usize) -> Error {
    Error::new(
        ErrorCode::TooLarge,
        format!("recvmsg: control data truncated (buffer of {control_len} bytes too small); received fds closed"),
    )
}

/// `CMSG_SPACE(4 * nfds)`: the control buffer size a receiver needs for `nfds` fds (24 for 1 or 2 fds and
/// 32 for 3 or 4 on x86_64 and aarch64). Zero fds need no control buffer.
pub fn cmsg_space(nfds: usize) -> usize {
    if nfds == 0 {
        return 0;
    }
    // SAFETY: CMSG_SPACE is a pure arithmetic macro.
    unsafe { libc::CMSG_SPACE((nfds * mem::size_of::<RawFd>()) as u32) as usize }
}

impl UnixConnection {
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
            let stream = self.stream()?;
            stream.writable().await.map_err(|e| Error::io("wait writable", e))?;
            match stream.try_io(Interest::WRITABLE, || sendmsg_fds(self.as_raw_fd(), data, &raw)) {
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
            let stream = self.stream()?;
            stream.readable().await.map_err(|e| Error::io("wait readable", e))?;
            let res = stream
                .try_io(Interest::READABLE, || recvmsg_fds(self.as_raw_fd(), &mut data, &mut control, control_len));
            match res {
                Ok(r) => break r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("recvmsg", e)),
            }
        };
        if truncated {
            drop(fds);
            return Err(control_truncated(control_len));
        }
        data.truncate(n.min(data_len));
        if data_len == 0 && n > 0 {
            data.clear();
        }
        Ok((data, fds))
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

/// `sendmsg(fd, data, SCM_RIGHTS(fds), MSG_NOSIGNAL)`; returns the bytes sent. No fds: no control message.
pub(super) fn sendmsg_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let iov = [io::IoSlice::new(data)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(sock, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None).map_err(io::Error::from)
}

/// `recvmsg(fd, data, control[..control_len], MSG_CMSG_CLOEXEC)`; returns bytes read, owned fds, and whether
/// control data was truncated (`MSG_CTRUNC`). `control` must hold at least `control_len` bytes; it is `u64`s so
/// that the control messages are aligned.
pub(super) fn recvmsg_fds(
    sock: RawFd,
    data: &mut [u8],
    control: &mut [u64],
    control_len: usize,
) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    assert!(control_len <= mem::size_of_val(control), "control buffer of {control_len} bytes");
    // SAFETY: `control` is valid for reads and writes of `control_len` bytes (checked above), any byte value is a
    // valid u64 part, and `control` is not used otherwise while this view lives.
    let cbuf: &mut [u8] = unsafe { std::slice::from_raw_parts_mut(control.as_mut_ptr().cast::<u8>(), control_len) };
    let mut iov = [io::IoSliceMut::new(data)];
    let (n, truncated, fds) = {
        let ctrl = if control_len > 0 { Some(&mut *cbuf) } else { None };
        let msg = recvmsg::<()>(sock, &mut iov, ctrl, MsgFlags::MSG_CMSG_CLOEXEC).map_err(io::Error::from)?;
        let fds = msg.cmsgs().ok().map(|cmsgs| {
            cmsgs
                .flat_map(|c| match c {
                    ControlMessageOwned::ScmRights(fds) => fds,
                    _ => Vec::new(),
                })
                // SAFETY: the kernel installed these fds in this process for this message alone (nobody else owns
                // them), so owning them at once is sound and closes them on every later error path.
                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
                .collect::<Vec<_>>()
        });
        (msg.bytes, msg.flags.contains(MsgFlags::MSG_CTRUNC), fds)
    };
    // nix does not iterate a truncated control buffer; the fds that fit arrived all the same and must be closed.
    let fds = fds.unwrap_or_else(|| rights_in(cbuf));
    Ok((n, fds, truncated))
}

/// The fds of every `SCM_RIGHTS` message in a control buffer that was zero before `recvmsg` filled it, owned at
/// once. For a truncated buffer (`MSG_CTRUNC`), which nix refuses to iterate: the kernel still installs the fds
/// that fit and counts them in the header's `cmsg_len`; a header that does not fit ends the walk.
fn rights_in(control: &[u8]) -> Vec<OwnedFd> {
    let hdr = mem::size_of::<libc::cmsghdr>();
    let word = mem::size_of::<usize>();
    let mut fds = Vec::new();
    let mut at = 0;
    while at + hdr <= control.len() {
        // SAFETY: cmsghdr is plain old data and the `hdr` bytes from `at` are in bounds; read_unaligned needs no
        // alignment.
        let h: libc::cmsghdr = unsafe { std::ptr::read_unaligned(control[at..].as_ptr().cast()) };
        let len = h.cmsg_len as usize;
        if len < hdr || at + len > control.len() {
            break;
        }
        if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
            for b in control[at + hdr..at + len].chunks_exact(mem::size_of::<RawFd>()) {
                let fd = RawFd::from_ne_bytes([b[0], b[1], b[2], b[3]]);
                // SAFETY: as in recvmsg_fds: the kernel installed this fd for this message alone.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        at += len.div_ceil(word) * word;
    }
    fds
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

    /// Whether `a` and `b` are the same open file (same device and inode).
    fn same_file(a: &OwnedFd, b: &std::fs::File) -> bool {
        use std::os::unix::fs::MetadataExt;
        let a = std::fs::File::from(a.try_clone().unwrap()).metadata().unwrap();
        let b = b.metadata().unwrap();
        (a.dev(), a.ino()) == (b.dev(), b.ino())
    }

    #[test]
    fn recvmsg_owns_every_fd_also_of_truncated_control_data() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        let raw = [file.as_raw_fd(); 3];
        // Room for all three: no truncation, nix's iterator.
        assert_eq!(sendmsg_fds(a.as_raw_fd(), b"x", &raw).unwrap(), 1);
        let mut data = [0u8; 1];
        let mut control = vec![0u64; cmsg_space(3).div_ceil(8)];
        let (n, fds, truncated) = recvmsg_fds(b.as_raw_fd(), &mut data, &mut control, cmsg_space(3)).unwrap();
        assert_eq!((n, fds.len(), truncated), (1, 3, false));
        assert!(fds.iter().all(|f| same_file(f, &file)));
        // Room for two (CMSG_SPACE(4) = 24 = 16 + 2 * 4): truncated, and the two that arrived are still owned.
        sendmsg_fds(a.as_raw_fd(), b"y", &raw).unwrap();
        let mut control = vec![0u64; cmsg_space(1).div_ceil(8)];
        let (n, fds, truncated) = recvmsg_fds(b.as_raw_fd(), &mut data, &mut control, cmsg_space(1)).unwrap();
        assert_eq!((n, fds.len(), truncated), (1, 2, true));
        assert!(fds.iter().all(|f| same_file(f, &file)));
        // No room at all: truncated, nothing installed.
        sendmsg_fds(a.as_raw_fd(), b"z", &raw).unwrap();
        let (n, fds, truncated) = recvmsg_fds(b.as_raw_fd(), &mut data, &mut [], 0).unwrap();
        assert_eq!((n, fds.len(), truncated), (1, 0, true));
    }

    #[test]
    fn rights_in_stops_at_a_header_that_does_not_fit() {
        assert!(rights_in(&[]).is_empty());
        assert!(rights_in(&[0u8; 24]).is_empty(), "a zero header ends the walk");
    }
}
