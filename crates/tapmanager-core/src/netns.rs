//! Network namespaces: running work inside one on a thread made for it.
//!
//! Nothing here ever calls `setns` on a tokio worker or a libuv pool thread: [`run_in_netns`] spawns a fresh
//! OS thread, moves it into the namespace, runs the closure and lets the thread exit, so no thread is left
//! inside a pod namespace afterwards. Sockets created inside the closure (netlink, UDP) belong to that
//! namespace for good and can be used from any thread afterwards.

use std::fs::File;
use std::path::Path;

use nix::sched::{setns, CloneFlags};

use crate::error::{Error, ErrorCode, Result};

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
