//! Waiting on the JavaScript thread's own libuv loop: a `uv_poll_t` on a socket, and the frame read right there
//! when it is readable. For a client, an FDServer response (`recvmsg` with the fds); for the server, a
//! connection's next request frame (`UnixConnection.readNextTo`). One thread wake-up per frame, where the
//! runtime path takes two or more (the tokio reactor and a worker, then the threadsafe function's `uv_async` to
//! the JavaScript thread).
//!
//! libuv is not part of Node-API: the `uv_*` functions are looked up at run time in the process (`dlsym`), so
//! the addon still loads where they are missing. Node exports them; Bun and Deno lack them or stub them, so
//! the JavaScript side only asks for this path on Node (the runtime path stays for the others).

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::ffi::{c_int, c_void, CStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use napi::bindgen_prelude::JsValuesTupleIntoVec;
use napi::sys;
use tapmanager_core::unix::{
    self, Accepted, Admission, AnsweredNow, FastGets, PeerCred, PeerSlot, RequestReader, ResponseReader, RestOfAnswer,
};
use tapmanager_core::{Error as CoreError, ErrorCode};

use crate::inbox::{DoneArgs, Inbox, IncomingArgs, NextArgs};

type PollCb = unsafe extern "C" fn(*mut c_void, c_int, c_int);
type TimerCb = unsafe extern "C" fn(*mut c_void);
type CloseCb = unsafe extern "C" fn(*mut c_void);
type PrepareCb = unsafe extern "C" fn(*mut c_void);

/// The libuv functions used, resolved once.
struct Uv {
    poll_init: unsafe extern "C" fn(*mut c_void, *mut c_void, c_int) -> c_int,
    poll_start: unsafe extern "C" fn(*mut c_void, c_int, PollCb) -> c_int,
    poll_stop: unsafe extern "C" fn(*mut c_void) -> c_int,
    timer_init: unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int,
    timer_start: unsafe extern "C" fn(*mut c_void, TimerCb, u64, u64) -> c_int,
    timer_stop: unsafe extern "C" fn(*mut c_void) -> c_int,
    close: unsafe extern "C" fn(*mut c_void, Option<CloseCb>),
    ref_: unsafe extern "C" fn(*mut c_void),
    unref: unsafe extern "C" fn(*mut c_void),
    prepare_init: unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int,
    prepare_start: unsafe extern "C" fn(*mut c_void, PrepareCb) -> c_int,
    prepare_stop: unsafe extern "C" fn(*mut c_void) -> c_int,
    backend_timeout: unsafe extern "C" fn(*const c_void) -> c_int,
    backend_fd: unsafe extern "C" fn(*const c_void) -> c_int,
}

/// `UV_READABLE` (uv.h, stable across libuv 1.x).
const UV_READABLE: c_int = 1;
/// What a wait asks its socket's registration for.
const EPOLLIN: u32 = libc::EPOLLIN as u32;
const EPOLLOUT: u32 = libc::EPOLLOUT as u32;
/// `UV_POLL`, `UV_PREPARE` and `UV_TIMER` of `uv_handle_type` (stable across libuv 1.x).
const UV_POLL: c_int = 8;
const UV_PREPARE: c_int = 9;
const UV_TIMER: c_int = 13;
/// Room for one handle; `uv_handle_size` must fit (at most about 160 bytes for these on 64-bit Linux).
const HANDLE_WORDS: usize = 64;

fn sym<T: Copy>(name: &CStr) -> Option<T> {
    // SAFETY: dlsym with RTLD_DEFAULT only looks a name up; the caller states the function's C signature.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    if p.is_null() {
        return None;
    }
    debug_assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: T is a function pointer type of the same size as p, with the signature uv.h declares for `name`.
    Some(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

fn uv() -> Option<&'static Uv> {
    static UV: OnceLock<Option<Uv>> = OnceLock::new();
    UV.get_or_init(|| {
        let handle_size: unsafe extern "C" fn(c_int) -> usize = sym(c"uv_handle_size")?;
        // SAFETY: uv_handle_size is a pure lookup of a handle type's size.
        let fits = unsafe { [UV_POLL, UV_PREPARE, UV_TIMER].iter().all(|&t| handle_size(t) <= HANDLE_WORDS * 8) };
        if !fits {
            return None;
        }
        Some(Uv {
            poll_init: sym(c"uv_poll_init")?,
            poll_start: sym(c"uv_poll_start")?,
            poll_stop: sym(c"uv_poll_stop")?,
            timer_init: sym(c"uv_timer_init")?,
            timer_start: sym(c"uv_timer_start")?,
            timer_stop: sym(c"uv_timer_stop")?,
            close: sym(c"uv_close")?,
            ref_: sym(c"uv_ref")?,
            unref: sym(c"uv_unref")?,
            prepare_init: sym(c"uv_prepare_init")?,
            prepare_start: sym(c"uv_prepare_start")?,
            prepare_stop: sym(c"uv_prepare_stop")?,
            backend_timeout: sym(c"uv_backend_timeout")?,
            backend_fd: sym(c"uv_backend_fd")?,
        })
    })
    .as_ref()
}

/// What every wait on the loop of one port or sink shares: the environment, its loop, the callback outcomes go
/// to and the async context it is called in. Lives on the JavaScript thread only.
pub struct LoopWaits {
    env: sys::napi_env,
    uv_loop: *mut c_void,
    on_done: sys::napi_ref,
    async_ctx: sys::napi_async_context,
    /// Where a client request's response frame is handed over (see inbox.rs); a port's only.
    inbox: Option<Arc<Inbox>>,
    /// The thread's reactor, where the waits' sockets are registered.
    reactor: Rc<Reactor>,
    /// A port's client socket made ahead of time (see [`LoopWaits::take_spare`]).
    spare: RefCell<Option<OwnedFd>>,
    /// A port's requests waiting here.
    requests: Cell<usize>,
}

impl LoopWaits {
    /// The loop path for `env` reporting to `on_done` (async resource `name`; a client port's frames through
    /// `inbox`), or `None` when libuv's functions or the loop are not available.
    pub fn new(
        env: sys::napi_env,
        on_done: sys::napi_value,
        name: &CStr,
        inbox: Option<Arc<Inbox>>,
    ) -> Option<Rc<LoopWaits>> {
        let uv_api = uv();
        uv_api?;
        let mut uv_loop: *mut sys::uv_loop_s = ptr::null_mut();
        // SAFETY: env is the calling environment (we are on its thread); the out pointers are valid.
        unsafe {
            if sys::napi_get_uv_event_loop(env, &mut uv_loop) != sys::Status::napi_ok || uv_loop.is_null() {
                return None;
            }
            let reactor = Reactor::of(env, uv_loop.cast())?;
            let mut on_done_ref = ptr::null_mut();
            if sys::napi_create_reference(env, on_done, 1, &mut on_done_ref) != sys::Status::napi_ok {
                return None;
            }
            let mut js_name = ptr::null_mut();
            let mut async_ctx = ptr::null_mut();
            if sys::napi_create_string_utf8(env, name.as_ptr(), name.count_bytes() as isize, &mut js_name)
                != sys::Status::napi_ok
                || sys::napi_async_init(env, ptr::null_mut(), js_name, &mut async_ctx) != sys::Status::napi_ok
            {
                sys::napi_delete_reference(env, on_done_ref);
                return None;
            }
            Some(Rc::new(LoopWaits {
                env,
                uv_loop: uv_loop.cast(),
                on_done: on_done_ref,
                async_ctx,
                inbox,
                reactor,
                spare: RefCell::new(None),
                requests: Cell::new(0),
            }))
        }
    }

    /// The client socket made ahead of time for the port's next request on a new connection, if any. One is
    /// made ([`make_spare`](Self::make_spare)) once a request is out, while the server works on it, so that a
    /// caller who sends its next request from the completion (the usual loop of requests) skips `socket()` on
    /// the way there; it is closed once a completion left no request waiting (no fd held while idle).
    pub fn take_spare(&self) -> Option<OwnedFd> {
        self.spare.take()
    }

    /// Makes the spare client socket when there is none (see [`take_spare`](Self::take_spare)).
    pub fn make_spare(&self) {
        if self.spare.borrow().is_none() {
            *self.spare.borrow_mut() = unix::client_socket().ok();
        }
    }

    /// Calls the callback with `args` from the loop (not from JavaScript): in its own handle scope and callback
    /// scope, so the Promise reactions it causes run right after. A throw becomes an uncaught exception, as from
    /// any event-loop callback.
    fn call<A: JsValuesTupleIntoVec>(&self, args: A) {
        let env = self.env;
        // SAFETY: on the JavaScript thread of env, outside any other napi call (a libuv callback); every napi
        // value lives in the handle scope opened here.
        unsafe {
            let mut scope = ptr::null_mut();
            if sys::napi_open_handle_scope(env, &mut scope) != sys::Status::napi_ok {
                return;
            }
            let mut func = ptr::null_mut();
            let mut global = ptr::null_mut();
            if let Ok(argv) = args.into_vec(env) {
                if sys::napi_get_reference_value(env, self.on_done, &mut func) == sys::Status::napi_ok
                    && sys::napi_get_global(env, &mut global) == sys::Status::napi_ok
                {
                    let mut result = ptr::null_mut();
                    let (argc, argv) = (argv.len(), argv.as_ptr());
                    let status = sys::napi_make_callback(env, self.async_ctx, global, func, argc, argv, &mut result);
                    if status == sys::Status::napi_pending_exception {
                        let mut err = ptr::null_mut();
                        if sys::napi_get_and_clear_last_exception(env, &mut err) == sys::Status::napi_ok {
                            sys::napi_fatal_exception(env, err);
                        }
                    }
                }
            }
            sys::napi_close_handle_scope(env, scope);
        }
    }
}

impl Drop for LoopWaits {
    fn drop(&mut self) {
        // SAFETY: dropped on the JavaScript thread (the port's finaliser or the last request's completion).
        unsafe {
            sys::napi_async_destroy(self.env, self.async_ctx);
            sys::napi_delete_reference(self.env, self.on_done);
        }
    }
}

/// The sockets the waits of one JavaScript thread wait on, in one epoll set of our own, which the loop watches
/// with a single `uv_poll_t`. A wait costs one `epoll_ctl` (one-shot registration; closing an own socket drops
/// it), where a `uv_poll_t` per wait cost five syscalls (libuv's fd check, `FIONBIO`, add and two deletes). The
/// poll handle keeps the loop alive only while registrations are armed; it is closed by the environment's
/// cleanup hook.
///
/// A client request may also ask for a short busy wait (`spin`): while it waits within its window, a prepare
/// handle, run just before the loop would block, polls the loop's epoll fd (no blocking) until anything is
/// ready there (the response above all) or the window ends. On a quiet machine the response of a get then
/// finds this thread awake: no sleep and no wake-up of an idle CPU (on a virtual machine, a halt and an
/// interrupt through the hypervisor, several times the server's own work). It costs at most the window in CPU
/// per request, nothing while the loop has other work ready, and delays nothing else the loop watches.
pub struct Reactor {
    /// The poll and prepare handles (closed at the environment's cleanup; the memory is then freed by the last
    /// close callback).
    handle: *mut ReactorHandle,
    uv_loop: *mut c_void,
    epfd: OwnedFd,
    /// Live waits that asked for a busy wait, and the end of the latest window among them.
    spinners: Cell<usize>,
    spin_until: Cell<Option<Instant>>,
    /// The end of a server's window after it answered (see [`Reactor::spin_after_answer`]).
    served_until: Cell<Option<Instant>>,
    /// Waits by slot; a token is `generation << 32 | slot`, so an event for a wait that is gone finds nothing.
    slots: RefCell<Vec<(u32, *mut Waiting)>>,
    free: RefCell<Vec<u32>>,
    /// Armed registrations (the poll handle is referenced while there are any).
    armed: Cell<usize>,
    closed: Cell<bool>,
}

/// The reactor's poll handle; `poll` must stay the first field (libuv hands its callback the handle's address).
#[repr(C)]
struct ReactorHandle {
    poll: [u64; HANDLE_WORDS],
    /// Runs the busy wait (started while there are spinners).
    prepare: [u64; HANDLE_WORDS],
    reactor: *const Reactor,
    open: Cell<u8>,
}

impl PrepareOwner for ReactorHandle {
    const PREPARE: usize = std::mem::offset_of!(ReactorHandle, prepare);
}

impl HandleOwner for ReactorHandle {
    fn open(&self) -> &Cell<u8> {
        &self.open
    }
}

thread_local! {
    /// This thread's reactor and the environment it belongs to.
    static REACTOR: RefCell<Option<(usize, Rc<Reactor>)>> = const { RefCell::new(None) };
}

/// Events fetched per `epoll_wait` of the reactor.
const REACTOR_BATCH: usize = 64;

impl Reactor {
    /// The reactor of `env` (made on first use), or `None` when it cannot be made or was closed.
    fn of(env: sys::napi_env, uv_loop: *mut c_void) -> Option<Rc<Reactor>> {
        let found = REACTOR.with(|r| r.borrow().as_ref().filter(|(e, _)| *e == env as usize).map(|(_, r)| r.clone()));
        if let Some(r) = found {
            return (!r.closed.get()).then_some(r);
        }
        let r = Reactor::make(env, uv_loop)?;
        REACTOR.with(|slot| *slot.borrow_mut() = Some((env as usize, r.clone())));
        Some(r)
    }

    fn make(env: sys::napi_env, uv_loop: *mut c_void) -> Option<Rc<Reactor>> {
        let uv = uv()?;
        // SAFETY: plain epoll_create1; the fd is owned from here on.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return None;
        }
        // SAFETY: epfd is a new fd nothing else owns.
        let epfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(epfd) };
        let raw = std::os::fd::AsRawFd::as_raw_fd(&epfd);
        let h = Box::into_raw(Box::new(ReactorHandle {
            poll: [0; HANDLE_WORDS],
            prepare: [0; HANDLE_WORDS],
            reactor: ptr::null(),
            open: Cell::new(0),
        }));
        // SAFETY: h is live and exclusively owned; its handles live inside it until their close callbacks ran.
        unsafe {
            let poll = h.cast::<c_void>();
            let prepare = ptr::addr_of_mut!((*h).prepare).cast::<c_void>();
            if (uv.poll_init)(uv_loop, poll, raw) != 0 {
                drop(Box::from_raw(h));
                return None;
            }
            (*h).open.set(1);
            if (uv.prepare_init)(uv_loop, prepare) != 0 {
                (uv.close)(poll, Some(poll_closed::<ReactorHandle>));
                return None;
            }
            (*h).open.set(2);
            (uv.unref)(prepare);
            if (uv.poll_start)(poll, UV_READABLE, on_reactor) != 0 {
                (uv.close)(poll, Some(poll_closed::<ReactorHandle>));
                (uv.close)(prepare, Some(prepare_closed::<ReactorHandle>));
                return None;
            }
            (uv.unref)(poll);
        }
        let r = Rc::new(Reactor {
            handle: h,
            uv_loop,
            epfd,
            spinners: Cell::new(0),
            spin_until: Cell::new(None),
            served_until: Cell::new(None),
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            armed: Cell::new(0),
            closed: Cell::new(false),
        });
        // SAFETY: h is live; the pointer stays valid while the thread-local holds the Rc (until the cleanup hook
        // closed the handle, after which the callback is never called).
        unsafe { (*h).reactor = Rc::as_ptr(&r) };
        // SAFETY: env is the calling environment; the hook runs on its thread at teardown.
        if unsafe { sys::napi_add_env_cleanup_hook(env, Some(reactor_cleanup), env.cast()) } != sys::Status::napi_ok {
            r.close();
        }
        Some(r)
    }

    /// Closes the poll handle once (pending waits then never complete: only at the environment's teardown).
    fn close(&self) {
        if self.closed.replace(true) {
            return;
        }
        let uv = uv().expect("libuv resolved before the reactor was made");
        // SAFETY: the handles are live and not closed yet (closed was false); the last close callback frees them.
        unsafe {
            let poll = self.handle.cast::<c_void>();
            let prepare = ptr::addr_of_mut!((*self.handle).prepare).cast::<c_void>();
            (uv.poll_stop)(poll);
            (uv.prepare_stop)(prepare);
            (uv.close)(poll, Some(poll_closed::<ReactorHandle>));
            (uv.close)(prepare, Some(prepare_closed::<ReactorHandle>));
        }
    }

    /// A wait asks for a busy wait until `until` (see the type's doc).
    fn spin_from(&self, until: Instant) {
        if self.closed.get() {
            return;
        }
        if self.spin_until.get().is_none_or(|u| u < until) {
            self.spin_until.set(Some(until));
        }
        self.spinners.set(self.spinners.get() + 1);
        self.prepare_on(true);
    }

    /// A wait that asked for a busy wait is over.
    fn spin_done(&self) {
        let n = self.spinners.get().saturating_sub(1);
        self.spinners.set(n);
        if n == 0 {
            self.spin_until.set(None);
            if self.served_until.get().is_none() {
                self.prepare_on(false);
            }
        }
    }

    /// A server on this loop answered a request and asks for a busy wait of `spin` for what comes next (the
    /// client's next request, on this connection or a new one): the same on the server's side as a client's
    /// window, with nothing pending to end it early, so it lasts its whole length unless something comes.
    pub fn spin_after_answer(&self, spin: Duration) {
        if spin.is_zero() || self.closed.get() {
            return;
        }
        let until = Instant::now() + spin;
        if self.served_until.get().is_none_or(|u| u < until) {
            self.served_until.set(Some(until));
        }
        self.prepare_on(true);
    }

    /// Starts or stops the prepare handle (starting a started one, or stopping a stopped one, does nothing).
    fn prepare_on(&self, on: bool) {
        if self.closed.get() {
            return;
        }
        let uv = uv().expect("libuv resolved before the reactor was made");
        // SAFETY: the handle is live and not closed (closed is false).
        unsafe {
            let prepare = ptr::addr_of_mut!((*self.handle).prepare).cast::<c_void>();
            if on {
                (uv.prepare_start)(prepare, on_prepare);
            } else {
                (uv.prepare_stop)(prepare);
            }
        }
    }

    /// Polls the loop's own epoll fd (which holds ours and every other handle's) without blocking until anything
    /// the loop watches is ready, the latest window ends, or a timer of the loop is due; not at all when the
    /// loop will not block anyway (other work is ready). So the busy wait delays nothing else.
    fn spin(&self) {
        let now = Instant::now();
        // a server's window that has passed ends; the prepare handle stops when no window is left
        if self.served_until.get().is_some_and(|u| u <= now) {
            self.served_until.set(None);
            if self.spinners.get() == 0 {
                self.prepare_on(false);
            }
        }
        // (a client window is only set while there are spinners: spin_done clears it with the last one)
        let Some(mut until) = self.spin_until.get().max(self.served_until.get()) else { return };
        let uv = uv().expect("libuv resolved before the reactor was made");
        // SAFETY: the loop is live (this runs in one of its callbacks).
        let timeout = unsafe { (uv.backend_timeout)(self.uv_loop) };
        if timeout == 0 {
            return;
        }
        if timeout > 0 {
            until = until.min(now + Duration::from_millis(timeout as u64));
        }
        if now >= until {
            return;
        }
        // SAFETY: as above.
        let fd = unsafe { (uv.backend_fd)(self.uv_loop) };
        if fd < 0 {
            return;
        }
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        loop {
            // SAFETY: poll on the loop's epoll fd, without waiting (readable when an event is there; nothing is
            // taken: the loop's own epoll_wait, right after, gets it).
            if unsafe { libc::poll(&mut pfd, 1, 0) } != 0 || Instant::now() >= until {
                return;
            }
            std::hint::spin_loop();
        }
    }

    fn ctl(&self, op: c_int, fd: c_int, events: u32, token: u64) -> std::io::Result<()> {
        let mut ev = libc::epoll_event { events: events | libc::EPOLLONESHOT as u32, u64: token };
        // SAFETY: epoll_ctl on our own epoll fd with a valid event.
        if unsafe { libc::epoll_ctl(std::os::fd::AsRawFd::as_raw_fd(&self.epfd), op, fd, &mut ev) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers wait `p`'s socket `fd` for `events` (one-shot); its token.
    fn add(&self, fd: c_int, events: u32, p: *mut Waiting) -> Result<u64, ()> {
        if self.closed.get() {
            return Err(());
        }
        let mut slots = self.slots.borrow_mut();
        let slot = match self.free.borrow_mut().pop() {
            Some(i) => i,
            None => {
                slots.push((0, ptr::null_mut()));
                (slots.len() - 1) as u32
            }
        };
        let generation = slots[slot as usize].0.wrapping_add(1);
        slots[slot as usize] = (generation, p);
        let token = (u64::from(generation) << 32) | u64::from(slot);
        let added = match self.ctl(libc::EPOLL_CTL_ADD, fd, events, token) {
            // still there from an earlier wait on this connection (disarmed once it fired)
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => self.ctl(libc::EPOLL_CTL_MOD, fd, events, token),
            r => r,
        };
        if added.is_err() {
            slots[slot as usize].1 = ptr::null_mut();
            self.free.borrow_mut().push(slot);
            return Err(());
        }
        self.armed_changed(1);
        Ok(token)
    }

    /// Arms a registration again (it fired) for `events`.
    fn rearm(&self, fd: c_int, events: u32, token: u64) -> Result<(), ()> {
        if self.closed.get() || self.ctl(libc::EPOLL_CTL_MOD, fd, events, token).is_err() {
            return Err(());
        }
        self.armed_changed(1);
        Ok(())
    }

    /// Forgets a wait: its slot is freed, and a registration still armed is deleted (an own socket's is dropped
    /// by its close anyway, a kept connection's may fire later otherwise).
    fn remove(&self, fd: c_int, token: u64, armed: bool) {
        let slot = (token & 0xffff_ffff) as usize;
        let mut slots = self.slots.borrow_mut();
        if slots.get(slot).is_some_and(|s| u64::from(s.0) == token >> 32) {
            slots[slot].1 = ptr::null_mut();
            self.free.borrow_mut().push(slot as u32);
        }
        if armed {
            let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0);
            self.armed_changed(-1);
        }
    }

    /// Counts armed registrations; the poll handle keeps the loop alive while there are any.
    fn armed_changed(&self, delta: isize) {
        let before = self.armed.get();
        let after = before.saturating_add_signed(delta);
        self.armed.set(after);
        if self.closed.get() {
            return;
        }
        let uv = uv().expect("libuv resolved before the reactor was made");
        // SAFETY: the handle is live and not closed (closed is false).
        unsafe {
            if before == 0 && after > 0 {
                (uv.ref_)(self.handle.cast());
            } else if before > 0 && after == 0 {
                (uv.unref)(self.handle.cast());
            }
        }
    }
}

/// Makes the reactor of `env`'s thread now (its one fd then exists from the start, not from the first wait);
/// false where it cannot be made (no libuv). Only on Node (Bun and Deno stub libuv).
pub fn prepare(env: sys::napi_env) -> bool {
    let mut uv_loop: *mut sys::uv_loop_s = ptr::null_mut();
    // SAFETY: env is the calling environment (we are on its thread); the out pointer is valid.
    if unsafe { sys::napi_get_uv_event_loop(env, &mut uv_loop) } != sys::Status::napi_ok || uv_loop.is_null() {
        return false;
    }
    Reactor::of(env, uv_loop.cast()).is_some()
}

unsafe extern "C" fn reactor_cleanup(env: *mut c_void) {
    let r = REACTOR.with(|r| r.borrow_mut().take_if(|(e, _)| *e == env as usize));
    if let Some((_, r)) = r {
        r.close();
    }
}

unsafe extern "C" fn on_prepare(handle: *mut c_void) {
    // SAFETY: handle is the prepare handle of a live ReactorHandle whose reactor is alive (as in on_reactor).
    let r = unsafe { &*(*owner_of_prepare::<ReactorHandle>(handle)).reactor };
    r.spin();
}

unsafe extern "C" fn on_reactor(handle: *mut c_void, _status: c_int, _events: c_int) {
    // SAFETY: handle is the poll field (offset 0) of a live ReactorHandle whose reactor is alive (the
    // thread-local holds it until the handle is closed, after which this is never called).
    let r = unsafe { &*(*handle.cast::<ReactorHandle>()).reactor };
    let epfd = std::os::fd::AsRawFd::as_raw_fd(&r.epfd);
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; REACTOR_BATCH];
    loop {
        // SAFETY: epoll_wait on our own epoll fd into a buffer of REACTOR_BATCH events, without waiting.
        let n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), REACTOR_BATCH as c_int, 0) };
        if n <= 0 {
            return;
        }
        for ev in &events[..n as usize] {
            let token = ev.u64;
            let slot = (token & 0xffff_ffff) as usize;
            // looked up per event: an earlier one in this batch may have ended (and freed) this wait
            let p = r.slots.borrow().get(slot).filter(|s| u64::from(s.0) == token >> 32).map(|s| s.1);
            if let Some(p) = p.filter(|p| !p.is_null()) {
                r.armed_changed(-1);
                // SAFETY: a live wait (its slot still holds it: waits leave the reactor before they are freed).
                unsafe { on_ready(p) };
            }
        }
        if (n as usize) < REACTOR_BATCH {
            return;
        }
    }
}

/// The socket of a request waiting on the loop: its own (closed when done), or a kept-open connection (only
/// borrowed: the `Arc` keeps it open meanwhile).
pub enum Sock {
    Own(OwnedFd),
    Kept(Arc<unix::UnixConnection>),
}

impl Sock {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Sock::Own(fd) => fd.as_fd(),
            // SAFETY: the connection (and so its fd) lives as long as the Arc this borrow comes from.
            Sock::Kept(c) => unsafe { BorrowedFd::borrow_raw(c.as_raw_fd()) },
        }
    }
}

/// What a wait on the loop is for, and how far it got.
enum Work {
    /// A client request (reported through the port's inbox, see inbox.rs): the rest of `request` to write, then the response frame to read.
    Request {
        id: u32,
        /// On a kept-open connection: the outcome says whether the request never got out (`notSent`).
        kept: bool,
        write_failed: bool,
        request: Vec<u8>,
        written: usize,
        reader: ResponseReader,
    },
    /// A server connection's next request frame (reported through the sink's inbox, see inbox.rs). Gets the native fast path answers
    /// are answered here first (one that the socket cannot take at once goes to `handoff`, finished on the
    /// runtime, which then goes on as the runtime path does).
    NextRequest { token: u32, reader: RequestReader, fast: Option<(Arc<FastGets>, Handoff)>, peer: PeerSlot },
    /// A connection's first request frame on a listener served on the loop (see [`LoopListener`]); gets the fast
    /// path answers are answered here first, as above.
    FirstRequest { serving: Rc<Serving>, peer: Option<PeerCred>, reader: RequestReader },
    /// Finished: what it held is let go.
    Done,
}

/// Takes a fast-path response the socket did not take at once (and everything after it on the connection) to
/// the runtime.
pub type Handoff = Box<dyn FnOnce(RestOfAnswer)>;

/// Where reading a connection's requests on the loop got (see [`step`]).
enum Step {
    /// Wait for more bytes; `answered`: gets were answered meanwhile (the read deadline starts again).
    Wait { answered: bool },
    /// A request frame for the application.
    Frame(unix::Frame),
    /// A fast-path response only partly written.
    Rest(RestOfAnswer),
    /// EOF, a read error, a failed write.
    Failed(CoreError),
}

/// Reads what `conn` has, answering the gets `fast` answers (when given) at once, until a frame for the
/// application, a response the socket cannot take at once, an error, or no more bytes.
fn step(
    reader: &mut RequestReader,
    conn: &unix::UnixConnection,
    fast: Option<&Arc<FastGets>>,
    peer: &mut PeerSlot,
) -> Step {
    // SAFETY: the connection (and so its fd) lives for the whole borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(conn.as_raw_fd()) };
    let mut answered = false;
    loop {
        let frame = match reader.advance(fd) {
            Ok(None) => return Step::Wait { answered },
            Ok(Some(frame)) => frame,
            Err(e) => return Step::Failed(e),
        };
        reader.reset();
        let Some(fast) = fast else { return Step::Frame(frame) };
        match fast.answer_now(conn, &frame, peer) {
            Ok(AnsweredNow::No) => return Step::Frame(frame),
            Ok(AnsweredNow::Done) => answered = true,
            Ok(AnsweredNow::Rest(rest)) => return Step::Rest(rest),
            Err(e) => return Step::Failed(e),
        }
    }
}

/// One wait on the loop: its socket is registered in the thread's [`Reactor`] (one-shot, re-armed when more is
/// needed), with a timer when it has a deadline. `timer` must stay where [`TimerOwner::TIMER`] says.
#[repr(C)]
struct Waiting {
    timer: [u64; HANDLE_WORDS],
    waits: Rc<LoopWaits>,
    sock: Option<Sock>,
    work: Work,
    timeout_ms: u64,
    /// Its registration in the reactor (see [`Reactor::add`]).
    token: u64,
    /// Whether that registration may still report an event (not yet fired since it was armed).
    armed: bool,
    /// The socket's fd (for the reactor; valid while `sock` is held).
    fd: c_int,
    /// Whether it asked the reactor for a busy wait (see [`Reactor`]).
    spins: bool,
    /// The timer, if any, plus one for the wait itself until it is done (freed when this drops to 0).
    open: Cell<u8>,
    done: bool,
}

/// Waits on the loop for the rest of a request started with `unix::start_request` on `sock` (`written` of
/// `request`'s bytes are out): writes the rest, reads the response frame, then calls `onDone` with `id`.
/// `timeout_ms` (when > 0) bounds it; for `spin` from now the loop busy-waits for it (see [`Reactor`]). On a
/// setup failure the request is handed back (`Err`) for the runtime path.
pub fn wait(
    waits: &Rc<LoopWaits>,
    id: u32,
    sock: Sock,
    request: Vec<u8>,
    written: usize,
    timeout_ms: u64,
    spin: Duration,
) -> Result<(), (Sock, Vec<u8>)> {
    let kept = matches!(sock, Sock::Kept(_));
    let events = if written < request.len() { EPOLLOUT } else { EPOLLIN };
    let work = Work::Request { id, kept, write_failed: false, request, written, reader: ResponseReader::new() };
    let started = start(waits, sock, work, events, timeout_ms);
    started
        .map(|p| {
            waits.requests.set(waits.requests.get() + 1);
            if !spin.is_zero() {
                waits.reactor.spin_from(Instant::now() + spin);
                // SAFETY: p was just started and is live (nothing ran since).
                unsafe { (*p).spins = true };
            }
        })
        .map_err(|b| {
            let (sock, work) = *b;
            match work {
                Work::Request { request, .. } => (sock, request),
                _ => unreachable!("a request comes back as it went"),
            }
        })
}

/// Waits on the loop for the next request frame of the server connection `conn` (payloads over `max_data` left
/// unread, as `read_request_frame`), then calls the sink's callback with `token` and the frame or why there is
/// none (EOF, error, `timeout_ms` when > 0). Gets `fast` answers are answered first, on the loop (see
/// [`Handoff`]). On a setup failure nothing was read and the connection is handed back (`Err`) for the runtime
/// path.
pub fn read_next(
    waits: &Rc<LoopWaits>,
    conn: Arc<unix::UnixConnection>,
    token: u32,
    max_data: usize,
    timeout_ms: u64,
    fast: Option<(Arc<FastGets>, Handoff)>,
) -> Result<(), Arc<unix::UnixConnection>> {
    let work = Work::NextRequest { token, reader: RequestReader::new(max_data), fast, peer: PeerSlot::default() };
    start(waits, Sock::Kept(conn), work, EPOLLIN, timeout_ms).map(drop).map_err(|b| match b.0 {
        Sock::Kept(c) => c,
        Sock::Own(_) => unreachable!("a kept connection comes back as it went"),
    })
}

/// Starts waiting for `events` on `sock` for `work`, with a timer when `timeout_ms` > 0. Hands both back when the
/// loop cannot take the wait (nothing happened yet).
fn start(
    waits: &Rc<LoopWaits>,
    sock: Sock,
    work: Work,
    events: u32,
    timeout_ms: u64,
) -> Result<*mut Waiting, Box<(Sock, Work)>> {
    let Some(uv) = uv() else { return Err(Box::new((sock, work))) };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock.fd());
    let w = Box::new(Waiting {
        timer: [0; HANDLE_WORDS],
        waits: waits.clone(),
        sock: Some(sock),
        work,
        timeout_ms,
        token: 0,
        armed: false,
        fd,
        spins: false,
        open: Cell::new(1),
        done: false,
    });
    let p = Box::into_raw(w);
    // SAFETY: p is a live, exclusively owned allocation; the timer lives inside it until its close callback ran
    // (`open` counts it); everything happens on the loop's thread.
    unsafe {
        match waits.reactor.add(fd, events, p) {
            Ok(token) => {
                (*p).token = token;
                (*p).armed = true;
            }
            Err(()) => {
                let w = *Box::from_raw(p);
                return Err(Box::new((w.sock.expect("socket"), w.work)));
            }
        }
        if timeout_ms > 0 {
            let timer = ptr::addr_of_mut!((*p).timer).cast::<c_void>();
            if (uv.timer_init)(waits.uv_loop, timer) == 0 {
                (*p).open.set(2);
                (uv.timer_start)(timer, on_timer, timeout_ms, 0);
            }
        }
    }
    Ok(p)
}

/// The reactor saw a wait's socket ready (its registration is disarmed now).
unsafe fn on_ready(p: *mut Waiting) {
    // SAFETY: p is a live wait (the reactor only reports registered ones, and a wait leaves the reactor before it
    // is freed); on the loop's thread.
    let w = unsafe { &mut *p };
    w.armed = false;
    if w.done {
        return;
    }
    let Some(sock) = w.sock.as_ref() else { return };
    let r = match &mut w.work {
        Work::Request { request, written, write_failed, reader, .. } => {
            if *written < request.len() {
                match unix::continue_write(sock.fd(), request, written) {
                    Ok(false) => {
                        // SAFETY: as above.
                        return unsafe { rearm(p, EPOLLOUT) };
                    }
                    Err(e) => {
                        *write_failed = true;
                        // SAFETY: as above.
                        return unsafe { finish(p, Err(e)) };
                    }
                    Ok(true) => {}
                }
            }
            match reader.advance(sock.fd()) {
                Ok(None) => {
                    // SAFETY: as above.
                    return unsafe { rearm(p, EPOLLIN) };
                }
                r => r,
            }
        }
        Work::NextRequest { reader, fast, peer, .. } => {
            let Sock::Kept(conn) = sock else { return };
            match step(reader, conn, fast.as_ref().map(|(f, _)| f), peer) {
                Step::Wait { answered } => {
                    // SAFETY: as above.
                    return unsafe { wait_more(p, answered) };
                }
                Step::Frame(frame) => Ok(Some(frame)),
                Step::Failed(e) => Err(e),
                Step::Rest(rest) => {
                    let (_, hand) = fast.take().expect("only a fast path leaves a rest");
                    // SAFETY: as above; nothing borrowed from the wait is used after this.
                    unsafe { close_handles(p) };
                    return hand(rest);
                }
            }
        }
        Work::FirstRequest { serving, peer, reader } => {
            let Sock::Kept(conn) = sock else { return };
            let serving = serving.clone();
            let mut slot = PeerSlot::known(*peer);
            match step(reader, conn, serving.fast_for(*peer), &mut slot) {
                Step::Wait { answered } => {
                    if answered {
                        serving.waits.reactor.spin_after_answer(serving.spin);
                    }
                    // SAFETY: as above.
                    return unsafe { wait_more(p, answered) };
                }
                Step::Frame(frame) => Ok(Some(frame)),
                Step::Failed(e) => Err(e),
                Step::Rest(rest) => {
                    let conn = conn.clone();
                    serving.state.pending.borrow_mut().remove(&(p as usize));
                    // SAFETY: as above; nothing borrowed from the wait is used after this.
                    unsafe { close_handles(p) };
                    return serving.finish_on_runtime(conn, rest);
                }
            }
        }
        Work::Done => return,
    };
    match r {
        Ok(None) => {}
        // SAFETY: as above.
        Ok(Some(frame)) => unsafe { finish(p, Ok(frame)) },
        // SAFETY: as above.
        Err(e) => unsafe { finish(p, Err(e)) },
    }
}

/// Arms a wait's registration again for `events`; a failure ends the wait.
unsafe fn rearm(p: *mut Waiting, events: u32) {
    // SAFETY: p is live (the caller's contract), on the loop's thread.
    let w = unsafe { &mut *p };
    if w.waits.reactor.rearm(w.fd, events, w.token).is_ok() {
        w.armed = true;
    } else {
        let e = CoreError::new(ErrorCode::Io, "cannot wait on the event loop");
        // SAFETY: as above.
        unsafe { finish(p, Err(e)) }
    }
}

/// Waits for more of a request frame; starts the read deadline again when requests were answered meanwhile
/// (`answered`).
unsafe fn wait_more(p: *mut Waiting, answered: bool) {
    // SAFETY: p is live (the caller's contract), on the loop's thread.
    let w = unsafe { &mut *p };
    if answered && w.open.get() == 2 {
        let uv = uv().expect("libuv resolved before the wait started");
        let timer = ptr::addr_of_mut!(w.timer).cast::<c_void>();
        // SAFETY: the timer is initialised and not closed (the wait is not done); starting it again restarts it.
        unsafe { (uv.timer_start)(timer, on_timer, w.timeout_ms, 0) };
    }
    // SAFETY: as above.
    unsafe { rearm(p, EPOLLIN) }
}

unsafe extern "C" fn on_timer(handle: *mut c_void) {
    // SAFETY: handle is the timer field of a live Waiting.
    let p = unsafe { owner_of_timer::<Waiting>(handle) };
    // SAFETY: as above.
    let (ms, what) = unsafe {
        let what = match (*p).work {
            Work::Request { .. } => "request",
            _ => "read request",
        };
        ((*p).timeout_ms, what)
    };
    let e = CoreError::new(ErrorCode::Timeout, format!("{what}: not done within {ms} ms"));
    // SAFETY: as above.
    unsafe { finish(p, Err(e)) }
}

/// A heap value (`Box::into_raw`) holding libuv handles, freed once `open` drops to 0 ([`Waiting`],
/// [`ListenerHandles`], [`ReactorHandle`]); a poll handle, when it has one, comes first.
trait HandleOwner: Sized {
    /// How many of its handles are open.
    fn open(&self) -> &Cell<u8>;
}

/// A [`HandleOwner`] holding a timer handle.
trait TimerOwner: HandleOwner {
    /// Where the timer handle is in the value.
    const TIMER: usize;
}

impl HandleOwner for Waiting {
    fn open(&self) -> &Cell<u8> {
        &self.open
    }
}

impl TimerOwner for Waiting {
    const TIMER: usize = std::mem::offset_of!(Waiting, timer);
}

impl HandleOwner for ListenerHandles {
    fn open(&self) -> &Cell<u8> {
        &self.open
    }
}

impl TimerOwner for ListenerHandles {
    const TIMER: usize = std::mem::offset_of!(ListenerHandles, timer);
}

/// A [`HandleOwner`] holding a prepare handle.
trait PrepareOwner: HandleOwner {
    /// Where the prepare handle is in the value.
    const PREPARE: usize;
}

/// The value that holds prepare handle `handle`.
///
/// # Safety
/// `handle` is the prepare handle of a live `T`.
unsafe fn owner_of_prepare<T: PrepareOwner>(handle: *mut c_void) -> *mut T {
    // SAFETY: the caller's contract: the prepare handle lies T::PREPARE bytes into the value.
    unsafe { handle.cast::<u8>().sub(T::PREPARE).cast::<T>() }
}

unsafe extern "C" fn prepare_closed<T: PrepareOwner>(handle: *mut c_void) {
    // SAFETY: handle is the prepare handle of a live T.
    unsafe { one_closed(owner_of_prepare::<T>(handle)) }
}

/// The value that holds timer handle `handle`.
///
/// # Safety
/// `handle` is the timer handle of a live `T`.
unsafe fn owner_of_timer<T: TimerOwner>(handle: *mut c_void) -> *mut T {
    // SAFETY: the caller's contract: the timer handle lies T::TIMER bytes into the value.
    unsafe { handle.cast::<u8>().sub(T::TIMER).cast::<T>() }
}

unsafe extern "C" fn poll_closed<T: HandleOwner>(handle: *mut c_void) {
    // SAFETY: handle is the poll handle (offset 0) of a live T.
    unsafe { one_closed(handle.cast::<T>()) }
}

unsafe extern "C" fn timer_closed<T: TimerOwner>(handle: *mut c_void) {
    // SAFETY: handle is the timer handle of a live T.
    unsafe { one_closed(owner_of_timer::<T>(handle)) }
}

/// One of a value's handles is closed; the last one frees the value.
unsafe fn one_closed<T: HandleOwner>(p: *mut T) {
    // SAFETY: p is live until the last close callback, which is this one when `open` drops to 0.
    unsafe {
        let open = (*p).open();
        let left = open.get() - 1;
        open.set(left);
        if left == 0 {
            drop(Box::from_raw(p));
        }
    }
}

/// Ends a wait once without reporting anything: leaves the reactor, closes the timer, lets the socket and the
/// work go (the memory is freed now or by the timer's close callback). False when that was done before. Nothing
/// of the wait may be used after this.
unsafe fn close_handles(p: *mut Waiting) -> bool {
    // SAFETY: p is live (the caller's contract); only this thread touches it.
    let w = unsafe { &mut *p };
    if w.done {
        return false;
    }
    w.done = true;
    w.waits.reactor.remove(w.fd, w.token, w.armed);
    w.armed = false;
    if std::mem::take(&mut w.spins) {
        w.waits.reactor.spin_done();
    }
    w.sock = None;
    w.work = Work::Done;
    if w.open.get() == 2 {
        let uv = uv().expect("libuv resolved before the wait started");
        let timer = ptr::addr_of_mut!(w.timer).cast::<c_void>();
        // SAFETY: the timer is initialised (open counts it) and not closed yet (done was false).
        unsafe {
            (uv.timer_stop)(timer);
            (uv.close)(timer, Some(timer_closed::<Waiting>));
        }
    }
    // SAFETY: the wait's own count; may free p (nothing uses it after this).
    unsafe { one_closed(p) };
    true
}

/// What a finished wait reports, taken out of it before it is freed.
enum Outcome {
    Request { waits: Rc<LoopWaits>, id: u32, not_sent: Option<bool> },
    NextRequest { waits: Rc<LoopWaits>, token: u32 },
    FirstRequest { serving: Rc<Serving>, peer: Option<PeerCred>, conn: Option<Arc<unix::UnixConnection>> },
    None,
}

/// Ends a wait once and reports the outcome to JavaScript (a first request: hands the connection on, or drops
/// it when no whole frame came). The wait is let go before JavaScript runs: a connection's last other holder is
/// gone then, so closing it there needs no shutdown. A client request's own socket is the exception: it is
/// closed after the callback (see below).
unsafe fn finish(p: *mut Waiting, r: tapmanager_core::Result<unix::Frame>) {
    // SAFETY: the caller's contract (p live, on the loop's thread).
    let w = unsafe { &mut *p };
    if w.done {
        return;
    }
    let sock = w.sock.take();
    let outcome = match &w.work {
        Work::Request { id, kept, write_failed, .. } => {
            let not_sent = if *kept { Some(*write_failed) } else { None };
            Outcome::Request { waits: w.waits.clone(), id: *id, not_sent }
        }
        Work::NextRequest { token, .. } => Outcome::NextRequest { waits: w.waits.clone(), token: *token },
        Work::FirstRequest { serving, peer, .. } => {
            serving.state.pending.borrow_mut().remove(&(p as usize));
            let conn = match sock {
                Some(Sock::Kept(ref c)) => Some(c.clone()),
                _ => None,
            };
            Outcome::FirstRequest { serving: serving.clone(), peer: *peer, conn }
        }
        Work::Done => Outcome::None,
    };
    // SAFETY: as above; p is not used after this (it may be freed). The reactor forgets the socket before an
    // own socket closes (below).
    unsafe { close_handles(p) };
    let sock = if matches!(outcome, Outcome::Request { .. }) {
        sock
    } else {
        drop(sock);
        None
    };
    match outcome {
        Outcome::Request { waits, id, not_sent } => {
            waits.requests.set(waits.requests.get().saturating_sub(1));
            let inbox = waits.inbox.clone().expect("a client port's waits have an inbox");
            waits.call(DoneArgs { id, result: r, not_sent, inbox });
            // A request's own socket closes only now: the caller's next request (often made in the reactions
            // the call ran) is already out, and the server's wake-up for this close is off its way.
            drop(sock);
            if waits.requests.get() == 0 {
                drop(waits.take_spare());
            }
        }
        Outcome::NextRequest { waits, token } => {
            let inbox = waits.inbox.clone().expect("a sink's waits have an inbox");
            waits.call(NextArgs { token, result: r, inbox })
        }
        Outcome::FirstRequest { serving, peer, conn } => {
            if let (Ok(frame), Some(conn)) = (r, conn) {
                serving.first_frame(conn, peer, frame);
            }
        }
        Outcome::None => {}
    }
}

/// What a listener served on the loop and its connections' first-request waits share: `listener` with
/// `admission` and `fast` (as `incoming_served`), connections handed to `waits`' callback, or through
/// `from_runtime` after the runtime finished a fast-path response. Lives on the JavaScript thread only.
pub struct Serving {
    /// Calls `onIncoming` from the loop.
    pub waits: Rc<LoopWaits>,
    pub listener: Arc<unix::UnixListener>,
    pub admission: Arc<Admission>,
    pub fast: Arc<FastGets>,
    pub cfg: unix::ServeConfig,
    pub from_runtime: FromRuntime,
    pub state: ServingState,
    /// The busy wait after an answer (see [`Reactor::spin_after_answer`]; zero: none).
    pub spin: Duration,
}

/// What a [`Serving`] keeps track of (start with `ServingState::default()`).
#[derive(Default)]
pub struct ServingState {
    /// First-request waits in progress (their `Waiting`s), abandoned when the listener closes.
    pending: RefCell<HashSet<usize>>,
    closed: Cell<bool>,
    backoff: Cell<Option<std::time::Duration>>,
    /// Its id among the listeners served on this thread (see [`hand_back`]); set when it starts.
    id: Cell<u64>,
}

thread_local! {
    /// The listeners served on this thread's loop, by id (see [`hand_back`]).
    static SERVED: RefCell<Vec<(u64, Weak<Serving>)>> = const { RefCell::new(Vec::new()) };
}

/// Ids of served listeners (unique in the process, so one from another thread finds nothing here).
static NEXT_SERVING_ID: AtomicU64 = AtomicU64::new(1);

/// Gives a connection of the listener served on this thread with id `id` (see [`Serving::id`]) back to it after
/// the application answered a request: its next request frame is waited for on the loop as a first one is
/// (gets the fast path answers answered there, any other frame handed to `onIncoming`; EOF, a read error and
/// the read deadline end it natively; the listener's close abandons it). Nothing is read now (so `onIncoming`
/// is never called from inside the caller). Hands the connection back (`Err`) when that listener is not served
/// here any more.
pub fn hand_back(
    id: u64,
    conn: Arc<unix::UnixConnection>,
    peer: Option<PeerCred>,
) -> Result<(), Arc<unix::UnixConnection>> {
    let serving = SERVED.with(|s| s.borrow().iter().find(|(i, _)| *i == id).and_then(|(_, w)| w.upgrade()));
    match serving {
        Some(s) if !s.state.closed.get() => {
            s.waits.reactor.spin_after_answer(s.spin);
            s.wait_first(conn, peer, RequestReader::new(s.cfg.max_data))
        }
        _ => Err(conn),
    }
}

/// How a connection reaches `onIncoming` from the runtime (a threadsafe function call).
pub type FromRuntime = Arc<dyn Fn(Arc<unix::UnixConnection>, unix::Frame) + Send + Sync>;

impl Serving {
    /// A connection's first request frame for the application (the fast path had its turn in [`step`]), as
    /// `UnixListener::incoming_served` treats it: a peer outside the filter gets one `permission denied` response
    /// and is closed; anything else goes to `onIncoming` now.
    fn first_frame(self: Rc<Self>, conn: Arc<unix::UnixConnection>, peer: Option<PeerCred>, frame: unix::Frame) {
        if !self.admission.filter().allows(peer) {
            self.admission.note_refused();
            if frame.data.is_some() {
                let refusal = unix::permission_denied_frame(peer);
                if let Ok((false, sent)) = conn.try_respond(&refusal, &[], &[]) {
                    let wd = self.cfg.write_deadline;
                    napi::bindgen_prelude::spawn(async move {
                        let _ = conn.respond_rest(&refusal, &[], Vec::new(), sent, wd).await;
                    });
                }
            }
            return;
        }
        let inbox = self.waits.inbox.clone().expect("a listener's waits have an inbox");
        let served_on = Some((self.state.id.get(), peer));
        self.waits.call(IncomingArgs::of(conn, self.fast.clone(), frame, inbox, served_on));
    }

    /// The fast path for a peer: none for one outside the filter (its first frame is refused, nothing answered).
    fn fast_for(&self, peer: Option<PeerCred>) -> Option<&Arc<FastGets>> {
        self.admission.filter().allows(peer).then_some(&self.fast)
    }

    /// A fast-path response the socket could not take at once: finished on the runtime, which answers the gets
    /// after it and hands the connection on at its first other request.
    fn finish_on_runtime(&self, conn: Arc<unix::UnixConnection>, rest: RestOfAnswer) {
        let (fast, cfg, deliver) = (self.fast.clone(), self.cfg.clone(), self.from_runtime.clone());
        napi::bindgen_prelude::spawn(async move {
            if let Ok(f) = conn.finish_fast_gets(rest, &fast, cfg.max_data, cfg.read_deadline).await {
                deliver(conn, f);
            }
        });
    }

    /// Reads the first request frame of an admitted connection: at once as far as it is there (a client sends
    /// its request right after connecting, so it usually is: then no handle is made at all), the rest on the loop.
    fn read_first(self: &Rc<Self>, conn: unix::UnixConnection, peer: Option<PeerCred>) {
        let conn = Arc::new(conn);
        let mut reader = RequestReader::new(self.cfg.max_data);
        match step(&mut reader, &conn, self.fast_for(peer), &mut PeerSlot::known(peer)) {
            Step::Wait { .. } => {}
            Step::Frame(frame) => return self.clone().first_frame(conn, peer, frame),
            Step::Rest(rest) => return self.finish_on_runtime(conn, rest),
            Step::Failed(_) => return, // gone before a whole frame, or a failed write: dropped, as on the runtime
        }
        // The wait cannot fail to start but when the loop is gone: then the connection is dropped.
        let _ = self.wait_first(conn, peer, reader);
    }

    /// Waits on the loop for the rest of `conn`'s next request frame (`reader` holds what came so far), within
    /// the read deadline, then goes on as [`read_first`](Self::read_first). Hands the connection back (`Err`)
    /// when the loop cannot take the wait.
    fn wait_first(
        self: &Rc<Self>,
        conn: Arc<unix::UnixConnection>,
        peer: Option<PeerCred>,
        reader: RequestReader,
    ) -> Result<(), Arc<unix::UnixConnection>> {
        let work = Work::FirstRequest { serving: self.clone(), peer, reader };
        let ms = self.cfg.read_deadline.map_or(0, |d| d.as_millis() as u64);
        match start(&self.waits, Sock::Kept(conn), work, EPOLLIN, ms) {
            Ok(p) => {
                // SAFETY: p is live until its close callbacks run (not before this returns); on the loop's thread.
                if unsafe { !(*p).done } {
                    self.state.pending.borrow_mut().insert(p as usize);
                }
                Ok(())
            }
            Err(b) => match b.0 {
                Sock::Kept(c) => Err(c),
                Sock::Own(_) => unreachable!("a kept connection comes back as it went"),
            },
        }
    }
}

/// A listener served on the JavaScript thread's event loop: a `uv_poll_t` on the listening socket accepts
/// (non-blocking, admitted as by `incoming_served`), and each connection's first request frame is read on the
/// loop too. `accept()` failures back off on a `uv_timer_t` (10 ms doubling to 1 s, as on the runtime). Stops
/// when [`stop`](Self::stop)ped or dropped.
pub struct LoopListener(*mut ListenerHandles);

/// The listener's handles. `poll` must stay the first field (see [`Waiting`]).
#[repr(C)]
struct ListenerHandles {
    poll: [u64; HANDLE_WORDS],
    timer: [u64; HANDLE_WORDS],
    serving: Rc<Serving>,
    /// Handles still open (freed when the last one's close callback ran).
    open: Cell<u8>,
}

/// Connections accepted per wake-up at most (the rest on the next turn of the loop, which sees the socket
/// readable again).
const ACCEPT_BATCH: usize = 64;

impl LoopListener {
    /// Serves `serving` on the loop, or `None` when the loop cannot (libuv missing; nothing started).
    pub fn start(serving: Serving) -> Option<LoopListener> {
        let uv = uv()?;
        let fd = serving.listener.as_raw_fd();
        let uv_loop = serving.waits.uv_loop;
        let serving = Rc::new(serving);
        let id = NEXT_SERVING_ID.fetch_add(1, Ordering::Relaxed);
        serving.state.id.set(id);
        let weak = Rc::downgrade(&serving);
        let h = Box::into_raw(Box::new(ListenerHandles {
            poll: [0; HANDLE_WORDS],
            timer: [0; HANDLE_WORDS],
            serving,
            open: Cell::new(0),
        }));
        // SAFETY: h is live and exclusively owned; its handles live inside it until their close callbacks ran.
        unsafe {
            let poll = ptr::addr_of_mut!((*h).poll).cast::<c_void>();
            let timer = ptr::addr_of_mut!((*h).timer).cast::<c_void>();
            if (uv.poll_init)(uv_loop, poll, fd) != 0 {
                drop(Box::from_raw(h));
                return None;
            }
            if (uv.timer_init)(uv_loop, timer) != 0 {
                (*h).open.set(1);
                (uv.close)(poll, Some(poll_closed::<ListenerHandles>));
                return None;
            }
            (*h).open.set(2);
            if (uv.poll_start)(poll, UV_READABLE, on_listener) != 0 {
                LoopListener(h).stop();
                return None;
            }
        }
        SERVED.with(|s| s.borrow_mut().push((id, weak)));
        Some(LoopListener(h))
    }

    /// Stops accepting and abandons the first-request waits in progress (their connections close). Once; on
    /// the loop's thread.
    pub fn stop(&self) {
        let uv = uv().expect("libuv resolved before the listener started");
        // SAFETY: self.0 stays live until its handles' close callbacks ran, which start here, at most once.
        unsafe {
            let h = &*self.0;
            if h.serving.state.closed.replace(true) {
                return;
            }
            let poll = ptr::addr_of_mut!((*self.0).poll).cast::<c_void>();
            let timer = ptr::addr_of_mut!((*self.0).timer).cast::<c_void>();
            (uv.poll_stop)(poll);
            (uv.timer_stop)(timer);
            (uv.close)(poll, Some(poll_closed::<ListenerHandles>));
            (uv.close)(timer, Some(timer_closed::<ListenerHandles>));
            let id = h.serving.state.id.get();
            SERVED.with(|s| s.borrow_mut().retain(|(i, _)| *i != id));
            let pending: Vec<usize> = h.serving.state.pending.borrow_mut().drain().collect();
            for p in pending {
                close_handles(p as *mut Waiting);
            }
        }
    }
}

impl Drop for LoopListener {
    fn drop(&mut self) {
        self.stop();
    }
}

unsafe extern "C" fn on_listener(handle: *mut c_void, status: c_int, _events: c_int) {
    // SAFETY: handle is the poll field (offset 0) of a live ListenerHandles.
    let s = unsafe { (*handle.cast::<ListenerHandles>()).serving.clone() };
    if s.state.closed.get() {
        return;
    }
    let mut failed = status < 0;
    for _ in 0..ACCEPT_BATCH {
        if failed {
            break;
        }
        match s.listener.try_accept_admitted(&s.admission) {
            Ok(Accepted::None) => {
                // what came was served (gets the fast path answered) or handed on: the next is likely near
                return s.waits.reactor.spin_after_answer(s.spin);
            }
            Ok(Accepted::Dropped) => s.state.backoff.set(None),
            Ok(Accepted::Conn(conn, peer)) => {
                s.state.backoff.set(None);
                s.read_first(conn, peer);
            }
            Err(e) if e.code == ErrorCode::Closed => return,
            Err(_) => failed = true,
        }
    }
    if failed {
        // accept() failed (EMFILE, ...), counted: wait before the next try, as the runtime's accept loop does
        let uv = uv().expect("libuv resolved before the listener started");
        let wait = unix::accept_backoff(s.state.backoff.get());
        s.state.backoff.set(Some(wait));
        // SAFETY: the handles are live and not closed (closed was false).
        unsafe {
            (uv.poll_stop)(handle);
            let timer = handle.cast::<u8>().add(ListenerHandles::TIMER).cast::<c_void>();
            (uv.timer_start)(timer, on_backoff_done, wait.as_millis() as u64, 0);
        }
    }
}

unsafe extern "C" fn on_backoff_done(handle: *mut c_void) {
    // SAFETY: handle is the timer field of a live ListenerHandles, whose poll handle is at offset 0.
    unsafe {
        let h = owner_of_timer::<ListenerHandles>(handle);
        let handles = &*h;
        if handles.serving.state.closed.get() {
            return;
        }
        let uv = uv().expect("libuv resolved before the listener started");
        (uv.poll_start)(h.cast(), UV_READABLE, on_listener);
    }
}
