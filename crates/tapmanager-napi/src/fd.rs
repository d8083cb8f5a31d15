//! Unix sockets with fd passing for the TypeScript FDServer/FDClient: thin wrappers over `tapmanager_core::unix`.
//!
//! File descriptors cross to JavaScript as plain numbers that the JavaScript side then owns (close them with
//! [`close_fd`]). Fds passed in for sending stay owned by JavaScript.

use std::os::fd::{BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use napi::bindgen_prelude::{
    within_runtime_if_available, Buffer, BufferSlice, Either3, Function, JsValuesTupleIntoVec, Null, PromiseRaw,
};
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::Env;
use napi_derive::napi;
use tapmanager_core::unix::{self, BindOptions, PeerCred};

use crate::error::{invalid, spawn_future_promise, to_js, JsError};
use crate::inbox::{DoneArgs, Inbox, IncomingArgs, NextArgs, INBOX_SIZE};
use crate::uvwait::{self, LoopWaits};

/// Returns the version of the native addon (a smoke test of the binding).
#[napi]
pub fn native_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// Makes this thread's event-loop reactor now (see uvwait.rs; its epoll fd then exists from the start rather than
/// from the first wait on the loop). Only on Node (Bun and Deno lack libuv or stub it). False where it cannot.
#[napi]
pub fn prepare_event_loop(env: Env) -> bool {
    uvwait::prepare(env.raw())
}

/// `CMSG_SPACE(4 * nfds)`: the OobSize for `nfds` fds (0 for none).
#[napi]
pub fn cmsg_space(nfds: u32) -> u32 {
    unix::cmsg_space(nfds as usize) as u32
}

/// `close(2)` of an fd JavaScript owns; `what` names the caller in the error for a negative fd.
fn close_owned(fd: i32, what: &str) -> Result<(), tapmanager_core::Error> {
    if fd < 0 {
        return Err(tapmanager_core::Error::invalid(format!("{what}: bad fd {fd}")));
    }
    // SAFETY: plain close(2) of a number the caller says it owns; a bad fd only yields EBADF.
    if unsafe { libc::close(fd) } < 0 {
        let err = std::io::Error::last_os_error();
        return Err(tapmanager_core::Error::io(format!("close fd {fd}"), err));
    }
    Ok(())
}

/// Closes a file descriptor that JavaScript owns (`close(2)`).
#[napi]
pub fn close_fd(fd: i32) -> Result<(), JsError> {
    close_owned(fd, "closeFd").map_err(to_js)
}

/// Closes several fds JavaScript owns (e.g. all that one `getFDs` returned) in one call. Every fd is closed even
/// when another fails; then the first failure is thrown, saying how many of the fds failed.
#[napi]
pub fn close_fds(fds: Vec<i32>) -> Result<(), JsError> {
    let mut first = None;
    let mut failed = 0;
    for &fd in &fds {
        if let Err(e) = close_owned(fd, "closeFds") {
            failed += 1;
            first.get_or_insert(e);
        }
    }
    match first {
        None => Ok(()),
        Some(e) if failed == 1 => Err(to_js(e)),
        Some(e) => {
            let message = format!("{} ({failed} of {} fds failed)", e.message, fds.len());
            Err(to_js(tapmanager_core::Error::new(e.code, message)))
        }
    }
}

/// Duplicates fds (`fcntl(F_DUPFD_CLOEXEC)`); the new fds belong to the caller.
#[napi]
pub fn dup_fds(fds: Vec<i32>) -> Result<Vec<i32>, JsError> {
    Ok(to_js_fds(unix::dup_fds(&fds).map_err(to_js)?))
}

/// Options for `UnixListener.bind`.
#[napi(object)]
pub struct BindOpts {
    /// Permission bits of the socket file (default 0o600).
    pub mode: Option<u32>,
    /// Group of the socket file.
    pub gid: Option<u32>,
}

/// Peer credentials from `SO_PEERCRED`.
#[napi(object)]
pub struct PeerCredentials {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// What `recvWithFds` received: the data bytes (empty at EOF) and the fds, now owned by JavaScript.
#[napi(object)]
pub struct Received {
    pub data: Buffer,
    pub fds: Vec<i32>,
}

/// One frame of the FDServer protocol: the 77 header bytes, the payload (absent for a request frame that was
/// not read: bad magic or DataSize over the limit) and the fds of a response (owned by JavaScript).
#[napi(object)]
pub struct Frame {
    pub header: Buffer,
    pub data: Option<Buffer>,
    pub fds: Vec<i32>,
}

fn to_js_frame(f: unix::Frame) -> Frame {
    Frame { header: f.header.into(), data: f.data.map(Buffer::from), fds: to_js_fds(f.fds) }
}

fn deadline(timeout_ms: Option<u32>) -> Option<Duration> {
    timeout_ms.filter(|&t| t > 0).map(|t| Duration::from_millis(t as u64))
}

/// One FDServer request on a new connection: connect to `path`, write `request` (header and payload), read the
/// response frame as the Go client does (header, one recvmsg with DataSize/OobSize buffers), close. The returned
/// fds belong to the caller. `timeoutMs` (when > 0) bounds the whole exchange.
#[napi(ts_return_type = "Promise<Frame>")]
pub fn fd_request<'env>(
    env: &'env Env,
    path: String,
    request: Buffer,
    timeout_ms: Option<u32>,
) -> napi::Result<PromiseRaw<'env, Frame>> {
    let req: Vec<u8> = request.to_vec();
    let d = deadline(timeout_ms);
    // Connect and send on this thread (never blocking), so the server is already at work while the runtime
    // picks up the wait for the response.
    match unix::start_request(&path, &req) {
        Ok(Some((stream, written))) => {
            spawn_future_promise(env, async move { unix::finish_request(stream, &req, written, d).await }, to_js_frame)
        }
        Ok(None) => spawn_future_promise(env, async move { unix::request(&path, &req, d).await }, to_js_frame),
        Err(e) => spawn_future_promise(env, async move { Err(e) }, to_js_frame),
    }
}

/// A callback JavaScript gave for completions that carry frames, with an inbox (see inbox.rs).
type CallbackFn<A> = ThreadsafeFunction<A, (), A, napi::Status, false, true>;

/// See [`callback_parts`].
type CallbackParts<A> = (Arc<CallbackFn<A>>, Option<Rc<LoopWaits>>, Arc<Inbox>);

/// What a port or sink is made of: the threadsafe function through which completions on the runtime reach
/// `callback`, the loop's waits (when `on_loop` asks for them and libuv is there) and the inbox frames are
/// handed over in. `name` names the async resource.
fn callback_parts<A: JsValuesTupleIntoVec + Send + 'static>(
    env: &Env,
    callback: Function<'_, A, ()>,
    on_loop: Option<bool>,
    name: &std::ffi::CStr,
) -> napi::Result<CallbackParts<A>> {
    let inbox = Inbox::new(INBOX_SIZE);
    let waits = if on_loop.unwrap_or(false) {
        uvwait::LoopWaits::new(env.raw(), napi::JsValue::raw(&callback), name, Some(inbox.clone()))
    } else {
        None
    };
    let tsfn = callback
        .build_threadsafe_function::<A>()
        .callee_handled::<false>()
        .weak::<true>()
        .build_callback(|ctx| Ok(ctx.value))?;
    Ok((Arc::new(tsfn), waits, inbox))
}

type DoneFn = CallbackFn<DoneArgs>;

/// Makes the threadsafe function `tsfn` keep the event loop alive (`on`) or not (napi's ref/unref). `tsfn` must
/// be alive for the call (its owner holds it); `what` names the caller in the error.
fn hold_threadsafe_function(
    env: &Env,
    tsfn: napi::sys::napi_threadsafe_function,
    on: bool,
    what: &str,
) -> napi::Result<()> {
    // SAFETY: called on the JavaScript thread (a #[napi] method) with its environment; the caller keeps `tsfn`
    // alive for the call.
    let status = unsafe {
        if on {
            napi::sys::napi_ref_threadsafe_function(env.raw(), tsfn)
        } else {
            napi::sys::napi_unref_threadsafe_function(env.raw(), tsfn)
        }
    };
    if status != napi::sys::Status::napi_ok {
        return Err(napi::Error::from_reason(format!("{what}: napi status {status}")));
    }
    Ok(())
}

/// Runs FDServer requests like `fdRequest`, but reports every completion through one long-lived callback
/// instead of a Promise per request (a Promise from native code costs a threadsafe function and an event-loop
/// handle per call), and hands each response frame over in the port's `inbox` with a few numbers instead of an
/// object (see inbox.rs): the callback gets `(id, dataLen, nfds, buffer?)` for a frame (header, payload and fds
/// in `buffer` when given, else at the start of `inbox`; read them before returning: the next frame overwrites
/// them; `dataLen` -2: no payload, bad magic), or `(id, -1, 0, undefined, code, message, notSent)` for an error.
/// A request on a new connection waits for its response on the JavaScript thread's own event loop when the
/// port was made with `waitOnLoop` and libuv is there (Node: one thread wake-up per request; see uvwait.rs),
/// else on the native runtime, whose completions keep the process alive only while `hold(true)` (call it while
/// such requests are pending).
#[napi]
pub struct FdRequestPort {
    done: Arc<DoneFn>,
    on_loop: Option<Rc<LoopWaits>>,
    inbox: Arc<Inbox>,
}

#[napi]
impl FdRequestPort {
    /// `onDone` is called on the JavaScript thread with each finished request. `waitOnLoop` asks for the event
    /// loop path (only on Node: Bun and Deno lack libuv or stub it); `waitsOnLoop` tells whether it is in use.
    #[napi(constructor)]
    pub fn new(
        env: Env,
        #[napi(
            ts_arg_type = "(id: number, dataLen: number, nfds: number, buffer?: Buffer, code?: string, message?: string, notSent?: boolean) => void"
        )]
        on_done: Function<'_, DoneArgs, ()>,
        wait_on_loop: Option<bool>,
    ) -> napi::Result<Self> {
        let (done, on_loop, inbox) = callback_parts(&env, on_done, wait_on_loop, c"tapmanager:FdRequest")?;
        Ok(FdRequestPort { done, on_loop, inbox })
    }

    /// The memory response frames are handed over in (see the type's doc); the same every time.
    #[napi(getter)]
    pub fn inbox<'env>(&self, env: &'env Env) -> napi::Result<BufferSlice<'env>> {
        self.inbox.to_js(env)
    }

    /// What the callback gets for request `id`'s outcome.
    fn outcome(&self, id: u32, result: tapmanager_core::Result<unix::Frame>, not_sent: Option<bool>) -> DoneArgs {
        DoneArgs { id, result, not_sent, inbox: self.inbox.clone() }
    }

    /// Whether requests on new connections wait on the JavaScript thread's event loop (see the constructor).
    #[napi(getter)]
    pub fn waits_on_loop(&self) -> bool {
        self.on_loop.is_some()
    }

    /// Whether the port keeps the event loop alive (`true` while requests are pending).
    #[napi]
    pub fn hold(&self, env: &Env, on: bool) -> napi::Result<()> {
        // The threadsafe function lives as long as self (it is only released when the port is dropped).
        hold_threadsafe_function(env, self.done.raw(), on, "FdRequestPort.hold")
    }

    /// One FDServer request on a new connection, exactly as `fdRequest` (connect and send happen before this
    /// returns, when they can without waiting); the outcome goes to `onDone` with `id`. Returns true when the
    /// request waits on the event loop (it keeps the process alive by itself), false when it went to the
    /// runtime (see `hold`). On the event loop, `spinUs` (at most 1000) asks for a busy wait of up to that long
    /// for the response before the loop sleeps (see uvwait.rs's `Reactor`).
    #[napi]
    pub fn request(
        &self,
        id: u32,
        path: String,
        request: Buffer,
        timeout_ms: Option<u32>,
        spin_us: Option<u32>,
    ) -> bool {
        let req: Vec<u8> = request.to_vec();
        let d = deadline(timeout_ms);
        let spare = self.on_loop.as_ref().and_then(|w| w.take_spare());
        let mut started = unix::start_request_on(spare, &path, &req);
        let req = match (&self.on_loop, started) {
            (Some(waits), Ok(Some((stream, written)))) => {
                let ms = d.map_or(0, |d| d.as_millis() as u64);
                let spin = spin_of(spin_us);
                match uvwait::wait(waits, id, uvwait::Sock::Own(OwnedFd::from(stream)), req, written, ms, spin) {
                    Ok(()) => {
                        // while the server works on this one: the socket of the caller's next request
                        waits.make_spare();
                        return true;
                    }
                    Err((uvwait::Sock::Own(sock), req)) => {
                        started = Ok(Some((std::os::unix::net::UnixStream::from(sock), written)));
                        req
                    }
                    Err((uvwait::Sock::Kept(_), _)) => unreachable!("an own socket comes back as it went"),
                }
            }
            (_, s) => {
                started = s;
                req
            }
        };
        let done = self.done.clone();
        let inbox = self.inbox.clone();
        napi::bindgen_prelude::spawn(async move {
            let result = match started {
                Ok(Some((stream, written))) => unix::finish_request(stream, &req, written, d).await,
                Ok(None) => unix::request(&path, &req, d).await,
                Err(e) => Err(e),
            };
            done.call(DoneArgs { id, result, not_sent: None, inbox }, ThreadsafeFunctionCallMode::NonBlocking);
        });
        false
    }

    /// One FDServer request on an open connection `conn` (kept open for further requests: the protocol allows
    /// several on one connection, in order): writes `request`, reads the response frame as `request` does. The
    /// caller sends one request at a time per connection. The outcome goes to `onDone` with `id`; `notSent` tells
    /// whether the request never got out (the server had closed the connection). `timeoutMs` (when > 0) bounds it.
    /// Returns true when it waits on the event loop (a port made with `waitOnLoop`), false when on the runtime
    /// (see `hold`). `spinUs` as for `request`.
    #[napi]
    pub fn request_on(
        &self,
        id: u32,
        conn: &UnixConnection,
        request: Buffer,
        timeout_ms: Option<u32>,
        spin_us: Option<u32>,
    ) -> bool {
        let req: Vec<u8> = request.to_vec();
        let d = deadline(timeout_ms);
        let c = conn.get_or_closed();
        // On the event loop (see `request`): the request is written now as far as the socket takes it, the rest
        // and the response wait on the loop. A write that fails at once goes the runtime way (same outcome).
        let (c, req) = match (&self.on_loop, c) {
            (Some(waits), Ok(kept)) => {
                let mut written = 0;
                // SAFETY: the connection lives while `kept` (an Arc of it) does.
                let fd = unsafe { BorrowedFd::borrow_raw(kept.as_raw_fd()) };
                match unix::continue_write(fd, &req, &mut written) {
                    Ok(_) => {
                        let ms = d.map_or(0, |d| d.as_millis() as u64);
                        let spin = spin_of(spin_us);
                        match uvwait::wait(waits, id, uvwait::Sock::Kept(kept), req, written, ms, spin) {
                            Ok(()) => return true,
                            Err((uvwait::Sock::Kept(kept), req)) if written == 0 => (Ok(kept), req),
                            Err(_) => {
                                let e = tapmanager_core::Error::new(
                                    tapmanager_core::ErrorCode::Io,
                                    "request: cannot wait on the event loop",
                                );
                                self.done.call(
                                    self.outcome(id, Err(e), Some(false)),
                                    ThreadsafeFunctionCallMode::NonBlocking,
                                );
                                return false;
                            }
                        }
                    }
                    // nothing went out: the runtime way gives the same outcome (notSent)
                    Err(_) if written == 0 => (Ok(kept), req),
                    Err(e) => {
                        // part of it went out: the stream is out of step, the request may have reached the server
                        self.done.call(self.outcome(id, Err(e), Some(false)), ThreadsafeFunctionCallMode::NonBlocking);
                        return false;
                    }
                }
            }
            (_, c) => (c, req),
        };
        let done = self.done.clone();
        let inbox = self.inbox.clone();
        napi::bindgen_prelude::spawn(async move {
            let mut not_sent = true;
            let exchange = async {
                let c = c?;
                c.write_all(&req).await?;
                not_sent = false;
                c.read_response_frame(None).await
            };
            let r = match d {
                Some(d) => tokio::time::timeout(d, exchange).await.unwrap_or_else(|_| {
                    Err(tapmanager_core::Error::new(
                        tapmanager_core::ErrorCode::Timeout,
                        format!("request: not done within {} ms", d.as_millis()),
                    ))
                }),
                None => exchange.await,
            };
            // A timeout may have hit while the request was on its way: only a failed write is certain.
            let not_sent = not_sent && !matches!(&r, Err(e) if e.code == tapmanager_core::ErrorCode::Timeout);
            let not_sent = Some(not_sent);
            done.call(DoneArgs { id, result: r, not_sent, inbox }, ThreadsafeFunctionCallMode::NonBlocking);
        });
        false
    }
}

/// A busy wait on the event loop (see uvwait.rs's `Reactor`), at most 1 ms.
fn spin_of(spin_us: Option<u32>) -> std::time::Duration {
    std::time::Duration::from_micros(u64::from(spin_us.unwrap_or(0).min(1000)))
}

type NextFn = CallbackFn<NextArgs>;

/// One long-lived callback that receives the frames `UnixConnection.readNextTo` reads, for a server's
/// connections. A read on the runtime does not keep the process alive unless `hold(true)` (call it while reads
/// are pending); one on the event loop does by itself.
///
/// The callback gets `(token, dataLen, buffer?)` for a frame: header and payload in `buffer` when given, else at
/// the start of the sink's `inbox` (read them before returning: the next frame overwrites them; `dataLen` -2: no
/// payload read), or `(token, -1, undefined, message)` when there is none (see inbox.rs).
#[napi]
pub struct FrameSink {
    done: Arc<NextFn>,
    on_loop: Option<Rc<LoopWaits>>,
    inbox: Arc<Inbox>,
}

#[napi]
impl FrameSink {
    /// `onFrame` is called on the JavaScript thread with each finished read. `readOnLoop` asks for reads on the
    /// JavaScript thread's own event loop (only on Node: Bun and Deno lack libuv or stub it); `readsOnLoop`
    /// tells whether it is in use.
    #[napi(constructor)]
    pub fn new(
        env: Env,
        #[napi(ts_arg_type = "(token: number, dataLen: number, buffer?: Buffer, error?: string) => void")]
        on_frame: Function<'_, NextArgs, ()>,
        read_on_loop: Option<bool>,
    ) -> napi::Result<Self> {
        let (done, on_loop, inbox) = callback_parts(&env, on_frame, read_on_loop, c"tapmanager:FrameSink")?;
        Ok(FrameSink { done, on_loop, inbox })
    }

    /// The memory frames are handed over in (see the type's doc); the same every time.
    #[napi(getter)]
    pub fn inbox<'env>(&self, env: &'env Env) -> napi::Result<BufferSlice<'env>> {
        self.inbox.to_js(env)
    }

    /// Whether reads wait on the JavaScript thread's event loop (see the constructor).
    #[napi(getter)]
    pub fn reads_on_loop(&self) -> bool {
        self.on_loop.is_some()
    }

    /// Whether the sink keeps the event loop alive (`true` while reads are pending).
    #[napi]
    pub fn hold(&self, env: &Env, on: bool) -> napi::Result<()> {
        // The threadsafe function lives as long as self.
        hold_threadsafe_function(env, self.done.raw(), on, "FrameSink.hold")
    }
}

/// A connection with its first request frame already read (see `UnixListener.startIncoming`).
#[napi(object, object_from_js = false)]
pub struct IncomingRequest {
    pub conn: UnixConnection,
    pub frame: Frame,
}

impl IncomingArgs {
    /// `conn` (of a listener whose fast path is `fast`) with its first request frame, handed over in `inbox`;
    /// `served_on`: the id of the listener served on the loop it came from and the peer, when it can be handed
    /// back there (see `UnixConnection.handBack`).
    pub(crate) fn of(
        conn: Arc<unix::UnixConnection>,
        fast: Arc<unix::FastGets>,
        frame: unix::Frame,
        inbox: Arc<Inbox>,
        served_on: Option<(u64, Option<PeerCred>)>,
    ) -> Self {
        IncomingArgs { conn: UnixConnection::wrap_fast(conn, fast, served_on), frame, inbox }
    }
}

type IncomingFn = ThreadsafeFunction<IncomingArgs, (), IncomingArgs, napi::Status, false, true>;

type Incoming = tokio::sync::mpsc::UnboundedReceiver<(unix::UnixConnection, unix::Frame)>;

type WakeFn = ThreadsafeFunction<(), (), (), napi::Status, false, true>;

/// One get the native fast path answered (see `UnixListener.enableFastLog`).
#[napi(object, object_from_js = false)]
pub struct FastGetEntry {
    /// The key, as registered.
    pub key: String,
    /// From having the request frame to the response handed to the socket, in ms.
    pub duration_ms: f64,
    /// The peer's credentials (absent when `SO_PEERCRED` failed).
    pub peer: Option<PeerCredentials>,
    /// Why the response could not be sent (peer gone, write deadline); absent when it was handed to the socket.
    pub error: Option<String>,
}

/// What `UnixListener.takeFastLog` returns: the queued entries, oldest first, and how many entries were dropped
/// since the previous take because the queue was full (all of them answered after every entry returned).
#[napi(object, object_from_js = false)]
pub struct FastGetLog {
    pub entries: Vec<FastGetEntry>,
    pub dropped: i64,
}

/// Options of `UnixListener.startIncoming`.
#[napi(object)]
pub struct IncomingOpts {
    /// The largest request payload read; bigger ones are left unread (`Frame.data` absent).
    pub max_data: u32,
    /// Bound on reading one request frame, including the wait for it (ms; absent or 0: none).
    pub read_timeout_ms: Option<u32>,
    /// Bound on writing one response (ms; absent or 0: none).
    pub write_timeout_ms: Option<u32>,
    /// When either is given, only peers whose uid is in `allowedUids` or gid in `allowedGids` are served; the
    /// others get one `permission denied` error response natively and are closed.
    pub allowed_uids: Option<Vec<u32>>,
    pub allowed_gids: Option<Vec<u32>>,
    /// Connections open at once (more are closed at once; absent: no cap).
    pub max_connections: Option<u32>,
    /// Connections open at once from one peer uid (absent: no cap).
    pub max_connections_per_uid: Option<u32>,
    /// Served on the loop: how long (µs, at most 1000; absent or 0: not at all) the loop busy-waits for the next
    /// request after answering one, when it has nothing else to do (see uvwait.rs's `Reactor`).
    pub spin_us: Option<u32>,
}

/// What the listener refused or survived so far (see `UnixListener.stats`).
#[napi(object, object_from_js = false)]
pub struct ListenerStats {
    /// Connections admitted.
    pub admitted: i64,
    /// Connections open now.
    pub open: i64,
    /// Closed at once: the total cap was reached.
    pub over_total: i64,
    /// Closed at once: the peer uid's cap was reached.
    pub over_uid: i64,
    /// Peers refused by the uid/gid filter.
    pub refused: i64,
    /// Failed accept() calls, survived.
    pub accept_errors: i64,
    /// The last accept() error.
    pub last_accept_error: Option<String>,
}

/// What `UnixConnection.respond` did: why the response could not be written (peer gone, write deadline; absent
/// when it was handed to the socket) and how long writing took.
#[napi(object, object_from_js = false)]
pub struct Written {
    pub write_error: Option<String>,
    pub write_ms: f64,
}

fn sat(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A listening Unix stream socket.
#[napi]
pub struct UnixListener {
    inner: Mutex<Option<Arc<unix::UnixListener>>>,
    path: String,
    incoming: Arc<tokio::sync::Mutex<Option<Incoming>>>,
    fast: Arc<unix::FastGets>,
    admission: Mutex<Option<Arc<unix::Admission>>>,
    /// Serving on the JavaScript thread's event loop (`startIncomingOnLoop`).
    on_loop: std::cell::RefCell<Option<uvwait::LoopListener>>,
}

#[napi]
impl UnixListener {
    /// Binds `path` (a stale socket file nobody listens on is replaced; a live one gives `ERR_EXISTS`),
    /// then sets the file's mode (default 0o600) and group.
    #[napi(factory)]
    pub fn bind(path: String, opts: Option<BindOpts>) -> Result<UnixListener, JsError> {
        let mut o = BindOptions::default();
        if let Some(opts) = opts {
            if let Some(m) = opts.mode {
                o.mode = m;
            }
            o.gid = opts.gid;
        }
        let l = within_runtime_if_available(|| unix::UnixListener::bind(&path, o)).map_err(to_js)?;
        Ok(UnixListener {
            inner: Mutex::new(Some(Arc::new(l))),
            path,
            incoming: Arc::default(),
            fast: Arc::new(unix::FastGets::new()),
            admission: Mutex::new(None),
            on_loop: Default::default(),
        })
    }

    /// The socket path.
    #[napi(getter)]
    pub fn path(&self) -> String {
        self.path.clone()
    }

    fn get_or_closed(&self) -> tapmanager_core::Result<Arc<unix::UnixListener>> {
        let guard = self.inner.lock().map_err(|_| tapmanager_core::Error::invalid("listener lock poisoned"))?;
        guard
            .clone()
            .ok_or_else(|| tapmanager_core::Error::new(tapmanager_core::ErrorCode::Closed, "listener is closed"))
    }

    /// Accepts the next connection. Rejects with `ERR_CLOSED` once the listener is closed.
    #[napi(ts_return_type = "Promise<UnixConnection>")]
    pub fn accept<'env>(&self, env: &'env Env) -> napi::Result<PromiseRaw<'env, UnixConnection>> {
        let l = self.get_or_closed();
        spawn_future_promise(env, async move { l?.accept().await }, UnixConnection::wrap)
    }

    /// Starts accepting in the background, reading each connection's first request frame concurrently (each
    /// within `readTimeoutMs`; payloads over `maxData` are left unread). Collect them with `nextIncoming`.
    /// Accept errors (EMFILE, ...) are survived (counted, with a bounded backoff); connections over
    /// `maxConnections` or `maxConnectionsPerUid` are closed at once; peers outside `allowedUids`/`allowedGids`
    /// get one `permission denied` error response natively: all counted in `stats()`, none reaches JavaScript.
    /// Get requests for keys registered with `registerGet` are answered natively (within `writeTimeoutMs`), on this
    /// connection loop and on connections' later requests (see `UnixConnection.readNextTo`); every other
    /// request is delivered by `nextIncoming` (or `readNextTo`).
    #[napi]
    pub fn start_incoming(&self, opts: IncomingOpts) -> Result<(), JsError> {
        let l = self.get_or_closed().map_err(to_js)?;
        let mut slot = self.incoming.try_lock().map_err(|_| invalid("startIncoming: busy"))?;
        if slot.is_some() || self.on_loop.borrow().is_some() {
            return Err(invalid("startIncoming: already started"));
        }
        let (admission, cfg) = self.admission_for(opts)?;
        let fast = Some(self.fast.clone());
        let rx = within_runtime_if_available(|| l.incoming_served(cfg, admission, fast));
        *slot = Some(rx);
        Ok(())
    }

    /// Like `startIncoming`, but served on the JavaScript thread's own event loop (Node: Bun and Deno lack libuv
    /// or stub it): connections are accepted and their requests read there, with the same caps, filter,
    /// deadlines and native fast path, and no runtime thread in between. `onIncoming` is called with each
    /// connection and its first request frame the fast path does not answer (instead of `nextIncoming`), the
    /// frame handed over as `FrameSink`'s are: `(conn, dataLen, buffer?)`, in the returned inbox unless `buffer`
    /// is given. Returns null, having started nothing, where the loop is not available.
    #[napi]
    pub fn start_incoming_on_loop<'env>(
        &self,
        env: &'env Env,
        opts: IncomingOpts,
        #[napi(ts_arg_type = "(conn: UnixConnection, dataLen: number, buffer?: Buffer) => void")] on_incoming: Function<
            '_,
            IncomingArgs,
            (),
        >,
    ) -> Result<Option<BufferSlice<'env>>, JsError> {
        let l = self.get_or_closed().map_err(to_js)?;
        let slot = self.incoming.try_lock().map_err(|_| invalid("startIncomingOnLoop: busy"))?;
        if slot.is_some() || self.on_loop.borrow().is_some() {
            return Err(invalid("startIncomingOnLoop: already started"));
        }
        let inbox = Inbox::new(INBOX_SIZE);
        let raw = napi::JsValue::raw(&on_incoming);
        let Some(waits) = uvwait::LoopWaits::new(env.raw(), raw, c"tapmanager:Incoming", Some(inbox.clone())) else {
            return Ok(None);
        };
        let js_inbox = inbox.to_js(env).map_err(|e| invalid(format!("startIncomingOnLoop: {e}")))?;
        let tsfn: IncomingFn = on_incoming
            .build_threadsafe_function::<IncomingArgs>()
            .callee_handled::<false>()
            .weak::<true>()
            .build_callback(|ctx| Ok(ctx.value))
            .map_err(|e| invalid(format!("startIncomingOnLoop: {e}")))?;
        let fast = self.fast.clone();
        let from_runtime: uvwait::FromRuntime = {
            let fast = fast.clone();
            Arc::new(move |conn, frame| {
                let args = IncomingArgs::of(conn, fast.clone(), frame, inbox.clone(), None);
                tsfn.call(args, ThreadsafeFunctionCallMode::NonBlocking);
            })
        };
        let spin = spin_of(opts.spin_us);
        let (admission, cfg) = self.admission_for(opts)?;
        fast.set_write_deadline(cfg.write_deadline);
        let state = Default::default();
        let serving = uvwait::Serving { waits, listener: l, admission, fast, cfg, from_runtime, state, spin };
        match uvwait::LoopListener::start(serving) {
            Some(started) => {
                *self.on_loop.borrow_mut() = Some(started);
                Ok(Some(js_inbox))
            }
            None => Ok(None),
        }
    }

    /// The admission (caps, filter: kept for `stats()`) and the read/write bounds `opts` ask for.
    fn admission_for(&self, opts: IncomingOpts) -> Result<(Arc<unix::Admission>, unix::ServeConfig), JsError> {
        let cap = |n: Option<u32>| n.map_or(usize::MAX, |n| n as usize);
        let limits = unix::ConnLimits { total: cap(opts.max_connections), per_uid: cap(opts.max_connections_per_uid) };
        let filter = unix::PeerFilter { uids: opts.allowed_uids, gids: opts.allowed_gids };
        let admission = Arc::new(unix::Admission::new(limits, filter));
        *self.admission.lock().map_err(|_| invalid("listener lock poisoned"))? = Some(admission.clone());
        let cfg = unix::ServeConfig {
            max_data: opts.max_data as usize,
            read_deadline: deadline(opts.read_timeout_ms),
            write_deadline: deadline(opts.write_timeout_ms),
        };
        Ok((admission, cfg))
    }

    /// What the listener refused or survived since `startIncoming` (all zero before).
    #[napi]
    pub fn stats(&self) -> ListenerStats {
        let st = self.admission.lock().ok().and_then(|a| a.as_ref().map(|a| a.stats())).unwrap_or_default();
        ListenerStats {
            admitted: sat(st.admitted),
            open: sat(st.open),
            over_total: sat(st.over_total),
            over_uid: sat(st.over_uid),
            refused: sat(st.refused),
            accept_errors: sat(st.accept_errors),
            last_accept_error: st.last_accept_error,
        }
    }

    /// The connections that have their first request frame, at least one and at most `max` (waits for one).
    /// Rejects with `ERR_CLOSED` once the listener is closed.
    #[napi(ts_return_type = "Promise<Array<IncomingRequest>>")]
    pub fn next_incoming<'env>(
        &self,
        env: &'env Env,
        max: u32,
    ) -> napi::Result<PromiseRaw<'env, Vec<IncomingRequest>>> {
        let incoming = self.incoming.clone();
        let fast = self.fast.clone();
        spawn_future_promise(
            env,
            async move {
                let closed = || tapmanager_core::Error::new(tapmanager_core::ErrorCode::Closed, "listener is closed");
                let mut guard = incoming.lock().await;
                let rx = guard
                    .as_mut()
                    .ok_or_else(|| tapmanager_core::Error::invalid("nextIncoming: startIncoming was not called"))?;
                let first = rx.recv().await.ok_or_else(closed)?;
                let mut out = vec![first];
                while out.len() < max.max(1) as usize {
                    match rx.try_recv() {
                        Ok(x) => out.push(x),
                        Err(_) => break,
                    }
                }
                Ok(out)
            },
            move |v| {
                v.into_iter()
                    .map(|(c, f)| IncomingRequest {
                        conn: UnixConnection::wrap_fast(Arc::new(c), fast.clone(), None),
                        frame: to_js_frame(f),
                    })
                    .collect()
            },
        )
    }

    /// Registers the get response of `key` for the native fast path: `info` and duplicates of `fds` (taken now,
    /// owned natively; the caller keeps its own fds). Replaces an earlier registration. Only a request whose 64
    /// key bytes are exactly `key` padded with spaces is answered this way.
    #[napi]
    pub fn register_get(&self, key: String, info: Buffer, fds: Vec<i32>) -> Result<(), JsError> {
        self.fast.register(&key, &info, &fds).map_err(to_js)
    }

    /// Unregisters `key`: later gets go to JavaScript. Responses already being sent finish with their own
    /// duplicates, which close afterwards.
    #[napi]
    pub fn unregister_get(&self, key: String) {
        self.fast.unregister(&key);
    }

    /// Whether `key` is registered for the native fast path.
    #[napi]
    pub fn has_fast_get(&self, key: String) -> bool {
        self.fast.contains(&key)
    }

    /// Reports the gets the native fast path answers: after each response is handed to the socket (never before),
    /// an entry is queued natively, at most `capacity` of them (at least 1); entries beyond that are dropped and
    /// counted (`takeFastLog().dropped`, `fastLogDropped`). `onReady` is called on the JavaScript thread when the
    /// queue goes from empty to not empty: call `takeFastLog` then (it takes everything). The callback does not
    /// keep the process alive and is forgotten on `close` (entries can still be taken). Calling it again replaces
    /// the capacity and the callback.
    #[napi]
    pub fn enable_fast_log(
        &self,
        capacity: u32,
        #[napi(ts_arg_type = "() => void")] on_ready: Function<'_, (), ()>,
    ) -> napi::Result<()> {
        let wake: WakeFn =
            on_ready.build_threadsafe_function::<()>().callee_handled::<false>().weak::<true>().build()?;
        let wake = Arc::new(wake);
        self.fast.enable_log(
            capacity as usize,
            Arc::new(move || {
                // Non-blocking on an unbounded napi queue: only fails while the environment shuts down.
                wake.call((), ThreadsafeFunctionCallMode::NonBlocking);
            }),
        );
        Ok(())
    }

    /// Takes every queued fast-path entry (see `enableFastLog`) and the count dropped since the previous take.
    #[napi]
    pub fn take_fast_log(&self) -> FastGetLog {
        let log = self.fast.take_log();
        FastGetLog {
            entries: log
                .records
                .into_iter()
                .map(|r| FastGetEntry {
                    key: r.key.to_string(),
                    duration_ms: r.duration.as_secs_f64() * 1000.0,
                    peer: r.peer.map(|p| PeerCredentials { pid: p.pid, uid: p.uid, gid: p.gid }),
                    error: r.error.map(|e| e.to_string()),
                })
                .collect(),
            dropped: i64::try_from(log.dropped).unwrap_or(i64::MAX),
        }
    }

    /// How many fast-path entries were dropped in all because the queue was full.
    #[napi(getter)]
    pub fn fast_log_dropped(&self) -> i64 {
        i64::try_from(self.fast.log_dropped_total()).unwrap_or(i64::MAX)
    }

    /// Resolves once no natively answered response is being sent; after `close`, every registered duplicate
    /// is then closed.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn drain_fast<'env>(&self, env: &'env Env) -> napi::Result<PromiseRaw<'env, ()>> {
        let fast = self.fast.clone();
        spawn_future_promise(
            env,
            async move {
                fast.drained().await;
                Ok(())
            },
            |()| (),
        )
    }

    /// Closes the listener (a pending `accept` rejects; the native fast path forgets every key and answers
    /// nothing more, and forgets the `enableFastLog` callback) and, when `removeFile` is true, removes the socket
    /// file.
    #[napi]
    pub fn close(&self, remove_file: Option<bool>) -> Result<(), JsError> {
        if let Some(l) = self.on_loop.borrow_mut().take() {
            l.stop();
        }
        self.fast.close();
        self.fast.clear_log_wake();
        let taken = self.inner.lock().map_err(|_| invalid("listener lock poisoned"))?.take();
        if let Some(l) = taken {
            l.close();
            if remove_file.unwrap_or(false) {
                l.remove_file().map_err(to_js)?;
            }
        }
        Ok(())
    }
}

/// A connected Unix stream socket.
#[napi]
pub struct UnixConnection {
    inner: Mutex<Option<Arc<unix::UnixConnection>>>,
    /// The native fast path of the listener this connection came from.
    fast: Option<Arc<unix::FastGets>>,
    /// For a connection of a listener served on the loop: that listener's id and the peer (see `handBack`).
    served_on: Option<(u64, Option<PeerCred>)>,
}

impl UnixConnection {
    fn wrap(c: unix::UnixConnection) -> UnixConnection {
        UnixConnection { inner: Mutex::new(Some(Arc::new(c))), fast: None, served_on: None }
    }

    /// A connection a listener accepted, served with its fast path `fast` (`served_on`: see the field).
    fn wrap_fast(
        c: Arc<unix::UnixConnection>,
        fast: Arc<unix::FastGets>,
        served_on: Option<(u64, Option<PeerCred>)>,
    ) -> UnixConnection {
        UnixConnection { inner: Mutex::new(Some(c)), fast: Some(fast), served_on }
    }

    fn get_or_closed(&self) -> tapmanager_core::Result<Arc<unix::UnixConnection>> {
        let guard = self.inner.lock().map_err(|_| tapmanager_core::Error::invalid("connection lock poisoned"))?;
        guard
            .clone()
            .ok_or_else(|| tapmanager_core::Error::new(tapmanager_core::ErrorCode::Closed, "connection is closed"))
    }

    fn get(&self) -> Result<Arc<unix::UnixConnection>, JsError> {
        self.get_or_closed().map_err(to_js)
    }
}

fn to_js_fds(fds: Vec<OwnedFd>) -> Vec<i32> {
    fds.into_iter().map(|f| f.into_raw_fd()).collect()
}

#[napi]
impl UnixConnection {
    /// Connects to the socket at `path`.
    #[napi(ts_return_type = "Promise<UnixConnection>")]
    pub fn connect<'env>(env: &'env Env, path: String) -> napi::Result<PromiseRaw<'env, UnixConnection>> {
        spawn_future_promise(env, async move { unix::UnixConnection::connect(&path).await }, UnixConnection::wrap)
    }

    /// The peer's credentials (`SO_PEERCRED`).
    #[napi]
    pub fn peer_cred(&self) -> Result<PeerCredentials, JsError> {
        let c = self.get()?.peer_cred().map_err(to_js)?;
        Ok(PeerCredentials { pid: c.pid, uid: c.uid, gid: c.gid })
    }

    /// Reads exactly `n` bytes (`ERR_CLOSED` on EOF, `ERR_TIMEOUT` after `timeoutMs` when given and > 0).
    #[napi(ts_return_type = "Promise<Buffer>")]
    pub fn read_exact<'env>(
        &self,
        env: &'env Env,
        n: u32,
        timeout_ms: Option<u32>,
    ) -> napi::Result<PromiseRaw<'env, Buffer>> {
        let c = self.get_or_closed();
        let d = deadline(timeout_ms);
        spawn_future_promise(env, async move { c?.read_exact(n as usize, d).await }, Buffer::from)
    }

    /// Reads a request frame: the header and its payload, within `timeoutMs` (when > 0). `data` is absent when
    /// the magic is wrong or DataSize exceeds `maxData` (the payload is then left unread).
    #[napi(ts_return_type = "Promise<Frame>")]
    pub fn read_request_frame<'env>(
        &self,
        env: &'env Env,
        max_data: u32,
        timeout_ms: Option<u32>,
    ) -> napi::Result<PromiseRaw<'env, Frame>> {
        let c = self.get_or_closed();
        let d = deadline(timeout_ms);
        spawn_future_promise(env, async move { c?.read_request_frame(max_data as usize, d).await }, to_js_frame)
    }

    /// Reads a response frame as the Go client does (see `fdRequest`), within `timeoutMs` (when > 0).
    #[napi(ts_return_type = "Promise<Frame>")]
    pub fn read_response_frame<'env>(
        &self,
        env: &'env Env,
        timeout_ms: Option<u32>,
    ) -> napi::Result<PromiseRaw<'env, Frame>> {
        let c = self.get_or_closed();
        let d = deadline(timeout_ms);
        spawn_future_promise(env, async move { c?.read_response_frame(d).await }, to_js_frame)
    }

    /// Writes a response: `head` with a plain write, then `data` with the `fds` in one `sendmsg` (nothing when
    /// both are empty; data must not be empty when fds are sent), within `writeTimeoutMs` (when > 0). Tries at
    /// once without waiting: when the socket takes it all (the usual case) the outcome is returned directly,
    /// else a Promise of it (the rest is written on the runtime). Either way the fds are sent or duplicated
    /// before this returns, so the caller may close its copies at once. Never throws or rejects for a failed
    /// write (`writeError` says why), so the caller can log what really happened. A response written at once
    /// with no error gives null (no object to make: the usual case).
    #[napi(ts_return_type = "null | Written | Promise<Written>")]
    pub fn respond<'env>(
        &self,
        env: &'env Env,
        head: Buffer,
        data: Buffer,
        fds: Vec<i32>,
        write_timeout_ms: Option<u32>,
    ) -> napi::Result<Either3<Null, Written, PromiseRaw<'env, Written>>> {
        let started = std::time::Instant::now();
        let ms = move || started.elapsed().as_secs_f64() * 1000.0;
        let failed =
            |e: tapmanager_core::Error| Ok(Either3::B(Written { write_error: Some(e.message), write_ms: ms() }));
        let c = match self.get_or_closed() {
            Ok(c) => c,
            Err(e) => return failed(e),
        };
        if let Some(&bad) = fds.iter().find(|&&f| f < 0) {
            return failed(tapmanager_core::Error::invalid(format!("bad fd {bad}")));
        }
        // SAFETY: the fds are owned by JavaScript, open for the duration of this call; only borrowed for it.
        let borrowed: Vec<BorrowedFd<'_>> =
            fds.iter().map(|&f| unsafe { BorrowedFd::borrow_raw(f as RawFd) }).collect();
        let sent = match c.try_respond(&head, &data, &borrowed) {
            Ok((true, _)) => return Ok(Either3::A(Null)),
            Ok((false, sent)) => sent,
            Err(e) => return failed(e),
        };
        let dups = match unix::dup_fds(&fds) {
            Ok(d) => d,
            Err(e) => return failed(e),
        };
        let head: Vec<u8> = head.to_vec();
        let data: Vec<u8> = data.to_vec();
        let wd = deadline(write_timeout_ms);
        spawn_future_promise(
            env,
            async move {
                let written = c.respond_rest(&head, &data, dups, sent, wd).await;
                Ok((written.err().map(|e| e.message), started.elapsed().as_secs_f64() * 1000.0))
            },
            |(write_error, write_ms): (Option<String>, f64)| Written { write_error, write_ms },
        )
        .map(Either3::C)
    }

    /// Reads the next request frame like `readRequestFrame` (within `timeoutMs` when > 0); on a connection from
    /// `nextIncoming`, the requests the listener's native fast path can answer are answered natively first, and
    /// the frame delivered is the first one it cannot. Hands the outcome to `sink`'s callback with `token` (no
    /// Promise per call: a Promise from native code costs a threadsafe function; the sink's is made once):
    /// `frame`, or `error` when the read failed or the connection ended. With a sink that reads on the event loop
    /// the frame is read there (one wake-up of the JavaScript thread, no runtime thread), gets the fast path
    /// answers are answered there too, and only a response the socket cannot take at once is finished on the
    /// runtime (which then goes on as the runtime path does).
    #[napi]
    pub fn read_next_to(&self, sink: &FrameSink, token: u32, max_data: u32, timeout_ms: Option<u32>) {
        let mut c = self.get_or_closed();
        let d = deadline(timeout_ms);
        let fast = self.fast.clone();
        let done = sink.done.clone();
        let inbox = sink.inbox.clone();
        let serve = move |c: Arc<unix::UnixConnection>, frame: unix::Frame| async move {
            match fast {
                Some(fast) => c.serve_fast_gets(frame, &fast, max_data as usize, d).await,
                None => Ok(frame),
            }
        };
        if let (Some(waits), Ok(conn)) = (&sink.on_loop, &c) {
            let handoff = self.fast.clone().map(|fast| {
                let (conn, done, f, inbox) = (conn.clone(), done.clone(), fast.clone(), inbox.clone());
                let hand: uvwait::Handoff = Box::new(move |rest| {
                    napi::bindgen_prelude::spawn(async move {
                        let result = conn.finish_fast_gets(rest, &f, max_data as usize, d).await;
                        done.call(NextArgs { token, result, inbox }, ThreadsafeFunctionCallMode::NonBlocking);
                    });
                });
                (fast, hand)
            });
            let ms = d.map_or(0, |d| d.as_millis() as u64);
            match uvwait::read_next(waits, conn.clone(), token, max_data as usize, ms, handoff) {
                Ok(()) => return,
                Err(conn) => c = Ok(conn),
            }
        }
        napi::bindgen_prelude::spawn(async move {
            let result = async {
                let c = c?;
                let frame = c.read_request_frame(max_data as usize, d).await?;
                serve(c, frame).await
            }
            .await;
            done.call(NextArgs { token, result, inbox }, ThreadsafeFunctionCallMode::NonBlocking);
        });
    }

    /// Writes all of `data`.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn write<'env>(&self, env: &'env Env, data: Buffer) -> napi::Result<PromiseRaw<'env, ()>> {
        let c = self.get_or_closed();
        let data: Vec<u8> = data.to_vec();
        spawn_future_promise(env, async move { c?.write_all(&data).await }, |()| ())
    }

    /// Writes `head` with a plain write, then sends `data` with the `fds` in one `sendmsg` (skipped when both are
    /// empty; data must not be empty when fds are sent), within `timeoutMs` when > 0 (`ERR_TIMEOUT`). The fds
    /// stay owned by the caller, who must keep them open until the Promise settles.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn write_then_send<'env>(
        &self,
        env: &'env Env,
        head: Buffer,
        data: Buffer,
        fds: Vec<i32>,
        timeout_ms: Option<u32>,
    ) -> napi::Result<PromiseRaw<'env, ()>> {
        let c = self.get_or_closed();
        let head: Vec<u8> = head.to_vec();
        let data: Vec<u8> = data.to_vec();
        let d = deadline(timeout_ms);
        spawn_future_promise(
            env,
            async move {
                let c = c?;
                if fds.iter().any(|&f| f < 0) {
                    return Err(tapmanager_core::Error::invalid("sendmsg: negative fd"));
                }
                let fut = async {
                    c.write_all(&head).await?;
                    // SAFETY: the fds are owned by JavaScript, which keeps them open until this Promise settles;
                    // they are only borrowed for the sendmsg call.
                    let borrowed: Vec<BorrowedFd<'_>> =
                        fds.iter().map(|&f| unsafe { BorrowedFd::borrow_raw(f as RawFd) }).collect();
                    c.send_with_fds(&data, &borrowed).await
                };
                match d {
                    Some(d) => tokio::time::timeout(d, fut).await.unwrap_or_else(|_| {
                        Err(tapmanager_core::Error::new(
                            tapmanager_core::ErrorCode::Timeout,
                            format!("write response: not done within {} ms", d.as_millis()),
                        ))
                    }),
                    None => fut.await,
                }
            },
            |()| (),
        )
    }

    /// One `recvmsg` with a `dataLen`-byte data buffer and a `controlLen`-byte control buffer
    /// (`MSG_CMSG_CLOEXEC`). The returned fds belong to the caller.
    #[napi(ts_return_type = "Promise<Received>")]
    pub fn recv_with_fds<'env>(
        &self,
        env: &'env Env,
        data_len: u32,
        control_len: u32,
    ) -> napi::Result<PromiseRaw<'env, Received>> {
        let c = self.get_or_closed();
        spawn_future_promise(
            env,
            async move { c?.recv_with_fds(data_len as usize, control_len as usize).await },
            |(data, fds)| Received { data: data.into(), fds: to_js_fds(fds) },
        )
    }

    /// Stops reading: a pending or later read sees EOF (`ERR_CLOSED`), while writes in progress still complete.
    #[napi]
    pub fn close_read(&self) -> Result<(), JsError> {
        self.get()?.shutdown_read().map_err(to_js)
    }

    /// Shuts the connection down (pending operations fail) and releases it.
    #[napi]
    pub fn close(&self) -> Result<(), JsError> {
        let taken = self.inner.lock().map_err(|_| invalid("connection lock poisoned"))?.take();
        if let Some(c) = taken {
            // Nothing else holds it (no read or write in progress): dropping it closes the socket, which is all a
            // shutdown would do. Otherwise the shutdown ends what is in progress.
            if Arc::strong_count(&c) > 1 {
                c.shutdown().map_err(to_js)?;
            }
        }
        Ok(())
    }

    /// Gives a connection that `startIncomingOnLoop`'s `onIncoming` handed over back to its listener, once the
    /// application wrote its response: the listener then waits for its next request on the loop as for a new
    /// connection's first one (gets the fast path answers answered there, any other request handed to
    /// `onIncoming` again with a new object; EOF, a read error and the read deadline close it natively; closing
    /// the listener ends it). This object is closed from then on. Returns false, changing nothing, for any other
    /// connection, once the listener stopped, or while a read or write is still in progress on it.
    #[napi]
    pub fn hand_back(&self) -> Result<bool, JsError> {
        let Some((id, peer)) = self.served_on else { return Ok(false) };
        let mut guard = self.inner.lock().map_err(|_| invalid("connection lock poisoned"))?;
        let Some(c) = guard.take() else { return Ok(false) };
        if Arc::strong_count(&c) > 1 {
            *guard = Some(c);
            return Ok(false);
        }
        match uvwait::hand_back(id, c, peer) {
            Ok(()) => Ok(true),
            Err(c) => {
                *guard = Some(c);
                Ok(false)
            }
        }
    }
}
