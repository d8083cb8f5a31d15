//! The native get fast path: get responses a server answers on the connection's own task, and the bounded
//! queue that logs them for the application.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::frame::{frame_sizes, padded_key, Frame, FRAME_HEADER_LEN, FRAME_MAGIC};
use super::scm::{cmsg_space, dup_fds, MAX_FDS};
use super::socket::{PeerCred, UnixConnection};
use super::{wait_closed, with_deadline};
use crate::error::{Error, ErrorCode, Result};

/// One get response ready to send: the header (with the key as the request carries it), the payload (or the
/// dummy byte) and owned duplicates of the fds.
#[derive(Debug)]
struct FastGet {
    /// The key as registered (what the application's own log would show).
    key: Arc<str>,
    head: Vec<u8>,
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// One get answered by [`FastGets`], for the application's request log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastGetRecord {
    /// The key, as registered.
    pub key: Arc<str>,
    /// The peer's credentials (`None` when `SO_PEERCRED` failed).
    pub peer: Option<PeerCred>,
    /// From having the request frame to the response handed to the socket (or to the failure).
    pub duration: Duration,
    /// Why the response could not be sent (the peer went away, the write deadline passed); `None`: sent.
    pub error: Option<Arc<str>>,
}

/// What [`FastGets::take_log`] returns: the queued records, oldest first, and how many records were dropped
/// since the previous take because the queue was full (all of them newer than every record returned).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FastGetLog {
    /// The records, oldest first.
    pub records: Vec<FastGetRecord>,
    /// Records lost since the previous take (the queue was full).
    pub dropped: u64,
}

/// Called (on the runtime thread that answered a get) when the log queue goes from empty to not empty.
pub type FastLogWake = Arc<dyn Fn() + Send + Sync>;

/// The bounded log queue of [`FastGets`].
struct FastLogQueue {
    records: std::collections::VecDeque<FastGetRecord>,
    capacity: usize,
    /// Dropped since the last take.
    dropped: u64,
    /// Dropped in all.
    dropped_total: u64,
    wake: Option<FastLogWake>,
}

impl std::fmt::Debug for FastLogQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastLogQueue")
            .field("queued", &self.records.len())
            .field("capacity", &self.capacity)
            .field("dropped", &self.dropped)
            .field("dropped_total", &self.dropped_total)
            .field("wake", &self.wake.is_some())
            .finish()
    }
}

/// The peer's credentials for the fast path's log, asked for at most once per connection turn (`None` inside:
/// `SO_PEERCRED` failed).
#[derive(Debug, Default, Clone, Copy)]
pub struct PeerSlot(Option<Option<PeerCred>>);

impl PeerSlot {
    /// Credentials already known (e.g. from the accept).
    pub fn known(peer: Option<PeerCred>) -> PeerSlot {
        PeerSlot(Some(peer))
    }

    fn get(&mut self, conn: &UnixConnection) -> Option<PeerCred> {
        *self.0.get_or_insert_with(|| conn.peer_cred().ok())
    }
}

/// What [`FastGets::answer_now`] did with a request frame.
#[derive(Debug)]
pub enum AnsweredNow {
    /// Not a get the fast path answers: the application's.
    No,
    /// Answered: the whole response is in the socket (and logged).
    Done,
    /// Answered in part (the socket took only some of it): finish it with [`RestOfAnswer::finish`], on the runtime.
    Rest(RestOfAnswer),
}

/// The part of a fast-path response the socket did not take at once. Counts as in flight (for
/// [`FastGets::drained`]) until finished or dropped.
#[derive(Debug)]
pub struct RestOfAnswer {
    fast: Arc<FastGets>,
    entry: Arc<FastGet>,
    sent: super::frame::Sent,
    started: Option<Instant>,
    peer: PeerSlot,
}

impl RestOfAnswer {
    /// Writes the rest within the fast path's write deadline, then logs the request. Inside a tokio runtime.
    pub async fn finish(mut self, conn: &UnixConnection) -> Result<()> {
        let deadline = self.fast.write_deadline.lock().map(|d| *d).unwrap_or(None);
        let fds = if self.sent.data_started() {
            Vec::new()
        } else {
            let raw: Vec<RawFd> = self.entry.fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
            dup_fds(&raw)?
        };
        let sent = conn.respond_rest(&self.entry.head, &self.entry.body, fds, self.sent, deadline).await;
        self.fast.log_answer(&self.entry, self.started, &mut self.peer, conn, sent.as_ref().err());
        sent
    }
}

impl Drop for RestOfAnswer {
    fn drop(&mut self) {
        self.fast.leave();
    }
}

/// Get responses a server answers natively, without a round trip to its application code.
///
/// The application registers a key once it knows the key's fds and info ([`register`](Self::register) duplicates
/// the fds and owns the duplicates) and unregisters it before it releases the key. A connection task
/// ([`UnixConnection::serve_fast_gets`]) then answers a get request for that key itself, with exactly the bytes
/// the application would send: the 77-byte header (command `0x82`, DataSize = info length, OobSize =
/// `CMSG_SPACE(4 * nfds)`, the request's key echoed), then one `sendmsg` with the info (or one `0x00` byte when
/// the info is empty) and the fds. Only a request the application would answer the same way qualifies: good
/// magic, command get, DataSize 0, the key bytes exactly the registered key right-padded with spaces. Peers are
/// filtered before any of their requests reaches this table or the application
/// ([`PeerFilter`](super::PeerFilter), applied once by
/// [`UnixListener::incoming_served`](super::UnixListener::incoming_served)). Anything else goes to the application
/// as before. Responses are written within [`set_write_deadline`](Self::set_write_deadline).
///
/// A response in flight holds its own reference to the duplicates, so unregistering never closes fds under a
/// `sendmsg`: a get racing a release either gets the fds (still the source's open files) or, once unregistered,
/// goes to the application, which answers "bad fd key". After [`close`](Self::close) nothing is answered, and
/// [`drained`](Self::drained) resolves once the last response in flight is out and every duplicate is closed.
///
/// Logging ([`enable_log`](Self::enable_log)): the application cannot see these requests, so when it wants to log
/// every request it turns the log on, and each answered get then adds a [`FastGetRecord`] to a bounded queue,
/// after its response was handed to the socket (the get never waits for the log). The application collects them
/// with [`take_log`](Self::take_log) when woken; records over the capacity are counted, not kept. A record is
/// queued before its response stops counting as in flight, so after [`drained`](Self::drained) the queue holds
/// every answered get that was not taken yet. Without the log nothing is measured or queued.
#[derive(Debug, Default)]
pub struct FastGets {
    entries: std::sync::Mutex<std::collections::HashMap<Vec<u8>, Arc<FastGet>>>,
    write_deadline: std::sync::Mutex<Option<Duration>>,
    closed: std::sync::atomic::AtomicBool,
    close_notify: tokio::sync::Notify,
    inflight: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
    logging: std::sync::atomic::AtomicBool,
    log: std::sync::Mutex<Option<FastLogQueue>>,
}

impl FastGets {
    /// An empty table that lets every peer through.
    pub fn new() -> FastGets {
        FastGets::default()
    }

    /// Bounds each natively written response (`None`: unbounded): a peer that does not read cannot hold a
    /// connection task, nor [`drained`](Self::drained), longer than that.
    pub fn set_write_deadline(&self, deadline: Option<Duration>) {
        if let Ok(mut d) = self.write_deadline.lock() {
            *d = deadline;
        }
    }

    /// Turns the log on (see the type's doc): at most `capacity` (at least 1) records wait to be taken, more are
    /// dropped and counted; `wake` is called, from the thread that answered the get, each time a record goes into
    /// an empty queue (take everything at each wake-up, and no record waits unseen). Calling it again replaces
    /// the capacity and `wake` and keeps the queue.
    pub fn enable_log(&self, capacity: usize, wake: FastLogWake) {
        if let Ok(mut g) = self.log.lock() {
            match g.as_mut() {
                Some(q) => {
                    q.capacity = capacity.max(1);
                    q.wake = Some(wake);
                }
                None => {
                    *g = Some(FastLogQueue {
                        records: std::collections::VecDeque::new(),
                        capacity: capacity.max(1),
                        dropped: 0,
                        dropped_total: 0,
                        wake: Some(wake),
                    })
                }
            }
            self.logging.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Forgets the wake-up callback (e.g. before the application goes away); records are still queued and taken.
    pub fn clear_log_wake(&self) {
        let old = self.log.lock().ok().and_then(|mut g| g.as_mut().and_then(|q| q.wake.take()));
        drop(old);
    }

    /// Takes every queued record and the count dropped since the previous take. Empty when the log is off.
    pub fn take_log(&self) -> FastGetLog {
        let Ok(mut g) = self.log.lock() else { return FastGetLog::default() };
        let Some(q) = g.as_mut() else { return FastGetLog::default() };
        let records = Vec::from(std::mem::take(&mut q.records));
        FastGetLog { records, dropped: std::mem::take(&mut q.dropped) }
    }

    /// How many records were dropped in all because the queue was full.
    pub fn log_dropped_total(&self) -> u64 {
        self.log.lock().ok().and_then(|g| g.as_ref().map(|q| q.dropped_total)).unwrap_or(0)
    }

    /// Queues `rec` (or counts it as dropped) and wakes the application when the queue was empty.
    fn push_log(&self, rec: FastGetRecord) {
        let wake = {
            let Ok(mut g) = self.log.lock() else { return };
            let Some(q) = g.as_mut() else { return };
            if q.records.len() >= q.capacity {
                q.dropped += 1;
                q.dropped_total += 1;
                return;
            }
            q.records.push_back(rec);
            if q.records.len() == 1 {
                q.wake.clone()
            } else {
                None
            }
        };
        if let Some(w) = wake {
            w();
        }
    }

    /// Registers (or replaces) the get response of `key` (1 to 64 bytes, as the server decoded it): `info` and
    /// duplicates of `fds` (at most [`MAX_FDS`]), which the table owns from now on. `ERR_CLOSED` after
    /// [`close`](Self::close).
    pub fn register(&self, key: &str, info: &[u8], fds: &[RawFd]) -> Result<()> {
        let k = padded_key(key)?;
        if fds.len() > MAX_FDS {
            return Err(Error::invalid(format!("{} fds, at most {MAX_FDS}", fds.len())));
        }
        let size = u32::try_from(info.len()).map_err(|_| Error::invalid("info too large"))?;
        let dups = dup_fds(fds)?;
        let mut head = Vec::with_capacity(FRAME_HEADER_LEN);
        head.extend_from_slice(&FRAME_MAGIC.to_be_bytes());
        head.push(0x82);
        head.extend_from_slice(&size.to_be_bytes());
        head.extend_from_slice(&(cmsg_space(fds.len()) as u32).to_be_bytes());
        head.extend_from_slice(&k);
        let body = if info.is_empty() && !fds.is_empty() { vec![0] } else { info.to_vec() };
        let entry = Arc::new(FastGet { key: Arc::from(key), head, body, fds: dups });
        let mut map = self.entries.lock().map_err(|_| Error::invalid("fast get table poisoned"))?;
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::new(ErrorCode::Closed, "fast get table is closed"));
        }
        map.insert(k, entry);
        Ok(())
    }

    /// Forgets `key`: from now on its gets go to the application. Responses already being sent finish; the
    /// duplicates close after the last one.
    pub fn unregister(&self, key: &str) {
        let Ok(k) = padded_key(key) else { return };
        let removed = self.entries.lock().ok().and_then(|mut m| m.remove(&k));
        drop(removed);
    }

    /// Whether `key` is registered.
    pub fn contains(&self, key: &str) -> bool {
        let Ok(k) = padded_key(key) else { return false };
        self.entries.lock().map(|m| m.contains_key(&k)).unwrap_or(false)
    }

    /// Forgets every key and answers nothing from now on; reads waiting in
    /// [`UnixConnection::serve_fast_gets`] end with `ERR_CLOSED`.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        let all = self.entries.lock().map(|mut m| std::mem::take(&mut *m)).unwrap_or_default();
        drop(all);
        self.close_notify.notify_waiters();
        if self.inflight.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            self.idle.notify_waiters();
        }
    }

    async fn closed(&self) {
        wait_closed(&self.closed, &self.close_notify).await
    }

    /// Resolves when no response is being sent (after [`close`](Self::close): every duplicate is closed).
    pub async fn drained(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inflight.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Answers `frame` on `conn` now, without waiting, if it is a get the fast path answers (see the type's doc):
    /// as much of the response as the socket takes at once (all of it, usually), the rest left to
    /// [`RestOfAnswer::finish`]. For a caller that reads frames off its own loop; `peer` is asked for only when the
    /// log is on. A failed write is an error (logged; the connection is done).
    pub fn answer_now(
        self: &Arc<Self>,
        conn: &UnixConnection,
        frame: &Frame,
        peer: &mut PeerSlot,
    ) -> Result<AnsweredNow> {
        if !is_plain_get(frame) {
            return Ok(AnsweredNow::No);
        }
        let started = self.logging.load(std::sync::atomic::Ordering::Relaxed).then(Instant::now);
        let _guard = InFlight::enter(self);
        let Some(entry) = self.registered(frame) else { return Ok(AnsweredNow::No) };
        let borrowed: Vec<BorrowedFd<'_>> = entry.fds.iter().map(|f| f.as_fd()).collect();
        match conn.try_respond(&entry.head, &entry.body, &borrowed) {
            Ok((true, _)) => {
                self.log_answer(&entry, started, peer, conn, None);
                Ok(AnsweredNow::Done)
            }
            Ok((false, sent)) => {
                self.enter();
                drop(borrowed);
                Ok(AnsweredNow::Rest(RestOfAnswer { fast: self.clone(), entry, sent, started, peer: *peer }))
            }
            Err(e) => {
                self.log_answer(&entry, started, peer, conn, Some(&e));
                Err(e)
            }
        }
    }

    /// The response registered for `frame`'s key, unless the fast path is closed. Call it in flight (see
    /// [`drained`](Self::drained)).
    fn registered(&self, frame: &Frame) -> Option<Arc<FastGet>> {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        self.entries.lock().ok()?.get(&frame.header[13..FRAME_HEADER_LEN]).cloned()
    }

    /// Queues the log record of an answered get when the log is on (`started` is set); only then is the peer
    /// asked for.
    fn log_answer(
        &self,
        entry: &FastGet,
        started: Option<Instant>,
        peer: &mut PeerSlot,
        conn: &UnixConnection,
        error: Option<&Error>,
    ) {
        if let Some(t) = started {
            let error = error.map(|e| Arc::from(e.message.as_str()));
            self.push_log(FastGetRecord { key: entry.key.clone(), peer: peer.get(conn), duration: t.elapsed(), error });
        }
    }

    /// A response in flight begins (see [`drained`](Self::drained)).
    fn enter(&self) {
        self.inflight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// A response in flight ends (see [`drained`](Self::drained)).
    fn leave(&self) {
        if self.inflight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Answers `frame` on `conn` if it qualifies (see the type's doc); returns whether it did. With the log on,
    /// queues a record once the response is out.
    async fn answer(&self, conn: &UnixConnection, frame: &Frame, peer: &mut PeerSlot) -> Result<bool> {
        let started = self.logging.load(std::sync::atomic::Ordering::Relaxed).then(Instant::now);
        if !is_plain_get(frame) {
            return Ok(false);
        }
        let guard = InFlight::enter(self);
        let Some(entry) = self.registered(frame) else { return Ok(false) };
        let deadline = self.write_deadline.lock().map(|d| *d).unwrap_or(None);
        let sent = with_deadline(deadline, "write response", async {
            conn.write_all(&entry.head).await?;
            let borrowed: Vec<BorrowedFd<'_>> = entry.fds.iter().map(|f| f.as_fd()).collect();
            conn.send_with_fds(&entry.body, &borrowed).await
        })
        .await;
        // One record per answered request, whatever became of the response (a peer gone: an error record).
        self.log_answer(&entry, started, peer, conn, sent.as_ref().err());
        drop(entry);
        drop(guard);
        sent.map(|()| true)
    }
}

/// A get request as the fast path answers them: the protocol's magic, command 2, no payload.
fn is_plain_get(frame: &Frame) -> bool {
    let h = &frame.header;
    h.len() == FRAME_HEADER_LEN
        && u32::from_be_bytes([h[0], h[1], h[2], h[3]]) == FRAME_MAGIC
        && h[4] == 2
        && frame_sizes(h).0 == 0
        && frame.data.as_ref().is_some_and(|d| d.is_empty())
}

/// Counts a response in flight for [`FastGets::drained`], also when its future is dropped half way.
struct InFlight<'a>(&'a FastGets);

impl<'a> InFlight<'a> {
    fn enter(f: &'a FastGets) -> InFlight<'a> {
        f.enter();
        InFlight(f)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl UnixConnection {
    /// Answers `frame` and the request frames after it while `fast` can (see [`FastGets`]), reading each next
    /// frame like [`read_request_frame`](Self::read_request_frame); returns the first frame `fast` cannot answer.
    /// Ends with an error at EOF, a deadline, a failed write, or once `fast` is closed while waiting for a frame.
    pub async fn serve_fast_gets(
        &self,
        frame: Frame,
        fast: &FastGets,
        max_data: usize,
        deadline: Option<Duration>,
    ) -> Result<Frame> {
        let mut peer = PeerSlot::default();
        self.serve_fast_gets_with(frame, fast, max_data, deadline, &mut peer).await
    }

    /// [`serve_fast_gets`](Self::serve_fast_gets) after [`FastGets::answer_now`] left `rest` of a response: finishes
    /// it, then answers the gets after it the same way.
    pub async fn finish_fast_gets(
        &self,
        rest: RestOfAnswer,
        fast: &FastGets,
        max_data: usize,
        deadline: Option<Duration>,
    ) -> Result<Frame> {
        let mut peer = rest.peer;
        rest.finish(self).await?;
        let frame = self.next_frame_unless_closed(fast, max_data, deadline).await?;
        self.serve_fast_gets_with(frame, fast, max_data, deadline, &mut peer).await
    }

    async fn serve_fast_gets_with(
        &self,
        mut frame: Frame,
        fast: &FastGets,
        max_data: usize,
        deadline: Option<Duration>,
        peer: &mut PeerSlot,
    ) -> Result<Frame> {
        while fast.answer(self, &frame, peer).await? {
            frame = self.next_frame_unless_closed(fast, max_data, deadline).await?;
        }
        Ok(frame)
    }

    /// The next request frame (as [`read_request_frame`](Self::read_request_frame)), or `ERR_CLOSED` once `fast`
    /// is closed while waiting for it.
    async fn next_frame_unless_closed(
        &self,
        fast: &FastGets,
        max_data: usize,
        deadline: Option<Duration>,
    ) -> Result<Frame> {
        tokio::select! {
            r = self.read_request_frame(max_data, deadline) => r,
            _ = fast.closed() => Err(Error::new(ErrorCode::Closed, "server is closed")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    fn record(key: &str) -> FastGetRecord {
        FastGetRecord { key: Arc::from(key), peer: None, duration: Duration::from_micros(1), error: None }
    }

    fn counting_wake() -> (FastLogWake, Arc<std::sync::atomic::AtomicUsize>) {
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let m = n.clone();
        (Arc::new(move || _ = m.fetch_add(1, std::sync::atomic::Ordering::SeqCst)), n)
    }

    #[test]
    fn fast_log_off_queues_nothing() {
        let f = FastGets::new();
        f.push_log(record("a"));
        assert_eq!(f.take_log(), FastGetLog::default());
        assert_eq!(f.log_dropped_total(), 0);
    }

    #[test]
    fn fast_log_wakes_on_empty_to_not_empty_and_counts_drops() {
        let f = FastGets::new();
        let (wake, woken) = counting_wake();
        f.enable_log(2, wake);
        f.push_log(record("a"));
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 1);
        f.push_log(record("b"));
        f.push_log(record("c"));
        f.push_log(record("d"));
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 1, "no wake-up while the queue is not empty");
        let got = f.take_log();
        assert_eq!(got.records.iter().map(|r| &*r.key).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(got.dropped, 2);
        assert_eq!(f.log_dropped_total(), 2);
        // The drop count is reported once; an empty queue wakes again on the next record.
        assert_eq!(f.take_log(), FastGetLog::default());
        f.push_log(record("e"));
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(f.take_log().records, vec![record("e")]);
        assert_eq!(f.log_dropped_total(), 2);
        // Without a wake-up callback records still queue.
        f.clear_log_wake();
        f.push_log(record("f"));
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(f.take_log().records, vec![record("f")]);
    }

    /// A get frame for `key` as a client sends it.
    fn get_frame(key: &str) -> Frame {
        let mut header = Vec::with_capacity(FRAME_HEADER_LEN);
        header.extend_from_slice(&FRAME_MAGIC.to_be_bytes());
        header.push(2);
        header.extend_from_slice(&[0; 8]);
        header.extend_from_slice(&padded_key(key).unwrap());
        Frame { header, data: Some(Vec::new()), fds: Vec::new() }
    }

    #[test]
    fn answered_gets_are_logged_after_the_response_with_key_and_peer() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            let server = UnixConnection::from_std(a).unwrap();
            let client = UnixConnection::from_std(b).unwrap();
            let fast = FastGets::new();
            let file = tempfile::tempfile().unwrap();
            fast.register("k", b"info", &[file.as_raw_fd()]).unwrap();
            let (wake, woken) = counting_wake();
            fast.enable_log(16, wake);
            // Two registered gets are answered and logged; the unknown key is handed back, unlogged.
            client.write_all(&get_frame("k").header).await.unwrap();
            client.write_all(&get_frame("other").header).await.unwrap();
            let back = server.serve_fast_gets(get_frame("k"), &fast, 1024, Some(Duration::from_secs(5))).await.unwrap();
            assert_eq!(&back.header[13..], &padded_key("other").unwrap()[..]);
            for _ in 0..2 {
                let r = client.read_response_frame(Some(Duration::from_secs(5))).await.unwrap();
                assert_eq!(r.header[4], 0x82);
                assert_eq!(r.data.as_deref(), Some(&b"info"[..]));
                assert_eq!(r.fds.len(), 1);
            }
            assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 1);
            let log = fast.take_log();
            assert_eq!(log.dropped, 0);
            assert_eq!(log.records.len(), 2);
            // SAFETY: getuid/getgid/getpid cannot fail.
            let (uid, gid, pid) = unsafe { (libc::getuid(), libc::getgid(), libc::getpid()) };
            for r in &log.records {
                assert_eq!(&*r.key, "k");
                assert_eq!(r.peer, Some(PeerCred { pid, uid, gid }));
            }
        });
    }

    #[test]
    fn answer_now_answers_at_once_leaves_a_rest_to_finish_and_lets_other_frames_through() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let server = UnixConnection::from_std(a).unwrap();
        b.set_nonblocking(false).unwrap();
        let fast = Arc::new(FastGets::new());
        let file = tempfile::tempfile().unwrap();
        fast.register("k", b"info", &[file.as_raw_fd()]).unwrap();
        // 1 MiB of info: more than a socket takes at once
        let big = vec![b'x'; 1 << 20];
        fast.register("big", &big, &[file.as_raw_fd()]).unwrap();
        let (wake, _) = counting_wake();
        fast.enable_log(16, wake);
        let mut peer = PeerSlot::default();

        // not fast: an unknown key, another command; nothing written, nothing logged
        assert!(matches!(fast.answer_now(&server, &get_frame("other"), &mut peer).unwrap(), AnsweredNow::No));
        let mut add = get_frame("k");
        add.header[4] = 0;
        assert!(matches!(fast.answer_now(&server, &add, &mut peer).unwrap(), AnsweredNow::No));
        assert_eq!(fast.take_log(), FastGetLog::default());

        // a registered get: the whole response at once, logged
        assert!(matches!(fast.answer_now(&server, &get_frame("k"), &mut peer).unwrap(), AnsweredNow::Done));
        rt.block_on(async {
            let client = UnixConnection::from_std(b.try_clone().unwrap()).unwrap();
            let r = client.read_response_frame(Some(Duration::from_secs(5))).await.unwrap();
            assert_eq!((r.header[4], r.data.as_deref(), r.fds.len()), (0x82, Some(&b"info"[..]), 1));
        });
        assert_eq!(fast.take_log().records.iter().map(|r| &*r.key).collect::<Vec<_>>(), ["k"]);

        // a response bigger than the socket takes: part now, the rest finished on the runtime while the client
        // reads; in flight (drained waits) until then; logged once, after the rest
        let AnsweredNow::Rest(rest) = fast.answer_now(&server, &get_frame("big"), &mut peer).unwrap() else {
            panic!("a 1 MiB response cannot go out at once")
        };
        assert_eq!(fast.inflight.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(fast.take_log().records.is_empty());
        rt.block_on(async {
            let client = UnixConnection::from_std(b.try_clone().unwrap()).unwrap();
            let (done, r) =
                tokio::join!(rest.finish(&server), client.read_response_frame(Some(Duration::from_secs(10))));
            done.unwrap();
            let r = r.unwrap();
            assert_eq!((r.header[4], r.data.as_ref().map(Vec::len), r.fds.len()), (0x82, Some(1 << 20), 1));
        });
        assert_eq!(fast.inflight.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(fast.take_log().records.iter().map(|r| &*r.key).collect::<Vec<_>>(), ["big"]);

        // once closed nothing is answered
        fast.close();
        assert!(matches!(fast.answer_now(&server, &get_frame("k"), &mut peer).unwrap(), AnsweredNow::No));
    }
}
