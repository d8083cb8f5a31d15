//! A `NETLINK_NETFILTER` socket (`netlink-sys`): send a batch and wait for its acks, or run a dump. The socket
//! belongs to the netns of the thread that opened it; dropping it closes it on a background thread.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};

use netlink_packet_core::NetlinkPayload;
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
use nix::sys::time::{TimeVal, TimeValLike};

use super::wire::{messages, Batch, NfMessage};
use crate::error::{Error, ErrorCode, Result};

/// A fresh block of sequence numbers for one request (a batch uses a few consecutive ones).
pub fn next_seq() -> u32 {
    static SEQ: AtomicU32 = AtomicU32::new(1);
    SEQ.fetch_add(64, Ordering::Relaxed)
}

/// The error for nf_tables' answer `errno` to the request described by `ctx`.
pub fn nft_error(ctx: &str, errno: i32) -> Error {
    let code = match errno {
        libc::EEXIST => ErrorCode::Exists,
        libc::ENOENT | libc::ENODEV => ErrorCode::NotFound,
        libc::EBUSY => ErrorCode::Busy,
        libc::EPERM | libc::EACCES => ErrorCode::Permission,
        libc::EINVAL | libc::EOPNOTSUPP => ErrorCode::Invalid,
        libc::ETIMEDOUT => ErrorCode::Timeout,
        _ => ErrorCode::Netlink,
    };
    Error::new(code, format!("{ctx}: {}", std::io::Error::from_raw_os_error(errno)))
}

/// A `NETLINK_NETFILTER` socket in the calling thread's netns. Dropping it hands the socket to [`close_later`].
pub struct NfSocket {
    sock: Option<Socket>,
}

impl Drop for NfSocket {
    fn drop(&mut self) {
        if let Some(sock) = self.sock.take() {
            close_later(sock);
        }
    }
}

/// Closes `sock` on a background thread. Closing a `NETLINK_NETFILTER` socket makes the kernel flush nf_tables'
/// pending destroy work (`nft_rcv_nl_event` -> `nf_tables_trans_destroy_flush_work`), which waits for an RCU
/// grace period: 10-40 ms on a busy machine, right after a table was deleted. The ruleset change is committed
/// before the ack we waited for, so nothing observable depends on that close: it only frees memory.
/// The closer thread first moves back to the process's own netns, so it never keeps a pod namespace alive.
fn close_later(sock: Socket) {
    static CLOSER: OnceLock<Mutex<Option<Sender<Socket>>>> = OnceLock::new();
    let closer = CLOSER.get_or_init(|| {
        let (tx, rx) = channel::<Socket>();
        let spawned = std::thread::Builder::new().name("tapmanager-nft-close".into()).spawn(move || {
            let _ = crate::netns::enter_process_netns();
            for sock in rx {
                drop(sock);
            }
        });
        Mutex::new(spawned.ok().map(|_| tx))
    });
    let sock = match closer.lock() {
        Ok(guard) => match guard.as_ref() {
            Some(tx) => match tx.send(sock) {
                Ok(()) => return,
                Err(e) => e.0,
            },
            None => sock,
        },
        Err(_) => sock,
    };
    drop(sock); // no closer thread: close here, paying the wait
}

impl NfSocket {
    /// Opens the socket (close-on-exec) with a 5 s bound on every wait for the kernel's answer.
    pub fn open() -> Result<NfSocket> {
        let sock = Socket::new(NETLINK_NETFILTER).map_err(|e| Error::io("socket(NETLINK_NETFILTER)", e))?;
        // The kernel answers at once; the bound only guards against a bug.
        let _ = setsockopt(&sock, ReceiveTimeout, &TimeVal::seconds(5));
        Ok(NfSocket { sock: Some(sock) })
    }

    fn sock(&self) -> Result<&Socket> {
        self.sock.as_ref().ok_or_else(|| Error::new(ErrorCode::Closed, "nf_tables socket closed"))
    }

    /// Sends `buf` to the kernel.
    pub fn send(&self, buf: &[u8]) -> Result<()> {
        self.sock()?.send_to(buf, &SocketAddr::new(0, 0), 0).map_err(|e| Error::io("send to nf_tables", e))?;
        Ok(())
    }

    /// Receives one datagram (possibly several netlink messages) into `buf`; returns its length.
    fn recv(&self, buf: &mut [u8]) -> Result<usize> {
        let mut window = buf;
        let cap = window.len();
        match self.sock()?.recv(&mut window, 0) {
            Ok(n) => Ok(n.min(cap)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                Err(Error::new(ErrorCode::Timeout, "no answer from nf_tables within 5 s"))
            }
            Err(e) => Err(Error::io("receive from nf_tables", e)),
        }
    }

    /// Sends a batch and waits for the ack of every message; returns the first error (errno, seq).
    pub fn transact(&self, batch: Batch) -> std::result::Result<(), (i32, u32)> {
        let (buf, mut pending) = batch.finish();
        self.send(&buf).map_err(|_| (libc::EIO, 0))?;
        let mut first_err: Option<(i32, u32)> = None;
        let mut rbuf = vec![0u8; 16384];
        while !pending.is_empty() {
            let n = self.recv(&mut rbuf).map_err(|_| (libc::ETIMEDOUT, 0))?;
            for m in messages(&rbuf[..n]).map_while(|m| m.ok()) {
                if let NetlinkPayload::Error(e) = m.payload {
                    let seq = m.header.sequence_number;
                    let errno = -e.raw_code();
                    pending.retain(|&s| s != seq);
                    if errno != 0 && first_err.is_none_or(|(_, s)| seq < s) {
                        first_err = Some((errno, seq));
                    }
                }
            }
            // After a failure the kernel aborts the batch and may not ack the rest.
            if first_err.is_some() {
                break;
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Sends a dump request and collects the answered messages until `NLMSG_DONE`. `Err(errno)` when the
    /// kernel refused the dump.
    pub fn dump(&self, request: &[u8]) -> Result<std::result::Result<Vec<NfMessage>, i32>> {
        self.send(request)?;
        let mut out = Vec::new();
        let mut rbuf = vec![0u8; 65536];
        loop {
            let n = self.recv(&mut rbuf)?;
            for m in messages(&rbuf[..n]) {
                let m = m.map_err(|e| Error::new(ErrorCode::Netlink, format!("bad nf_tables answer: {e}")))?;
                match m.payload {
                    NetlinkPayload::Done(_) => return Ok(Ok(out)),
                    NetlinkPayload::Error(e) if e.raw_code() != 0 => return Ok(Err(-e.raw_code())),
                    NetlinkPayload::Error(_) => return Ok(Ok(out)),
                    NetlinkPayload::InnerMessage(msg) => out.push(msg),
                    _ => {}
                }
            }
        }
    }
}
