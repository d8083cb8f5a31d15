//! Unix stream sockets on tokio with `SCM_RIGHTS` fd passing and peer credentials: the FDServer transport.
//!
//! One file per idea:
//! - the socket: the listener (bind, accept, the server's accept loop) and the connection (`socket.rs`);
//! - admission control: connection caps, the peer filter and their counters (`admission.rs`);
//! - `SCM_RIGHTS` messages: `sendmsg`/`recvmsg` with fds on `nix`, fd duplication (`scm.rs`);
//! - the 77-byte frame: reading request and response frames, writing responses (`frame.rs`);
//! - the native get fast path and its log queue (`fast_gets.rs`);
//! - the client request (`request.rs`).
//!
//! [`UnixListener::bind`] removes a stale socket file only when nothing listens on it, then sets the file's
//! mode and group. [`UnixConnection`] reads exactly N bytes with a deadline, writes all, sends data plus fds
//! with one `sendmsg`, and receives data plus fds with one `recvmsg` (`MSG_CMSG_CLOEXEC`) into buffers of given
//! sizes. Every received fd is wrapped in an [`OwnedFd`](std::os::fd::OwnedFd) as soon as it is parsed, so
//! nothing leaks on any error path.

use std::time::Duration;

use crate::error::{Error, ErrorCode, Result};

mod admission;
mod fast_gets;
mod frame;
mod request;
mod scm;
mod socket;

pub use admission::{Admission, AdmissionStats, ConnLimits, ConnSlot, PeerFilter};
pub use fast_gets::{AnsweredNow, FastGetLog, FastGetRecord, FastGets, FastLogWake, PeerSlot, RestOfAnswer};
pub use frame::{permission_denied_frame, Frame, RequestReader, Sent, FRAME_HEADER_LEN};
pub use request::{
    client_socket, continue_write, finish_request, request, start_request, start_request_on, ResponseReader,
};
pub use scm::{cmsg_space, dup_fds, MAX_FDS};
pub use socket::{accept_backoff, Accepted, BindOptions, PeerCred, ServeConfig, UnixConnection, UnixListener};

/// Runs `fut` within `deadline` (`None`: unbounded); past it, `ERR_TIMEOUT` naming `what`.
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
