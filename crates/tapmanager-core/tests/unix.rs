//! Integration tests of `tapmanager_core::unix`: bind rules, socket file mode, fd passing (also of real file
//! content), truncated control data leaking nothing, peer credentials, deadlines and EOF.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use tapmanager_core::unix::{cmsg_space, BindOptions, UnixConnection, UnixListener};
use tapmanager_core::ErrorCode;

/// Tests of this file run one at a time, so the fd count of one is not disturbed by another.
/// Tests that count the process's open fds run one at a time, each on its own runtime built and dropped while it
/// holds the lock (a runtime has fds of its own: built by a test waiting for the lock, they would count).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial<F: std::future::Future>(f: F) -> F::Output {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn temp_file(content: &str) -> std::fs::File {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(content.as_bytes()).unwrap();
    f
}

fn read_all(fd: OwnedFd) -> String {
    let mut f = std::fs::File::from(fd);
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    s
}

async fn pair(dir: &tempfile::TempDir) -> (UnixListener, UnixConnection, UnixConnection) {
    let path = dir.path().join("s.sock");
    let l = UnixListener::bind(&path, BindOptions::default()).unwrap();
    let (c, s) = tokio::join!(UnixConnection::connect(&path), l.accept());
    (l, c.unwrap(), s.unwrap())
}

#[test]
fn bind_sets_mode_replaces_stale_sockets_and_refuses_live_ones() {
    serial(async {
        common::require_prereqs(&[]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = UnixListener::bind(&path, BindOptions { mode: 0o660, gid: Some(0) }).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 0);
        // a live listener: ERR_EXISTS, and the file stays
        let e = UnixListener::bind(&path, BindOptions::default()).unwrap_err();
        assert_eq!(e.code, ErrorCode::Exists, "{e}");
        assert!(path.exists());
        // after the listener is gone the file is stale: replaced
        drop(l);
        assert!(path.exists());
        let l2 = UnixListener::bind(&path, BindOptions::default()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        l2.close();
        assert_eq!(l2.accept().await.unwrap_err().code, ErrorCode::Closed);
        l2.remove_file().unwrap();
        assert!(!path.exists());
        // a regular file in the way is never removed
        std::fs::write(&path, b"not a socket").unwrap();
        assert_eq!(UnixListener::bind(&path, BindOptions::default()).unwrap_err().code, ErrorCode::Exists);
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    })
}

#[test]
fn close_wakes_a_pending_accept() {
    serial(async {
        let dir = tempfile::tempdir().unwrap();
        let l = std::sync::Arc::new(UnixListener::bind(dir.path().join("s.sock"), BindOptions::default()).unwrap());
        let l2 = l.clone();
        let pending = tokio::spawn(async move { l2.accept().await.map(|_| ()) });
        tokio::task::yield_now().await;
        l.close();
        let r = tokio::time::timeout(Duration::from_secs(5), pending).await.expect("accept woke up").unwrap();
        assert_eq!(r.unwrap_err().code, ErrorCode::Closed);
    })
}

#[test]
fn fds_travel_with_data_and_their_files_are_readable() {
    serial(async {
        let dir = tempfile::tempdir().unwrap();
        let (_l, c, s) = pair(&dir).await;
        let files: Vec<_> = (0..4).map(|i| temp_file(&format!("file {i}"))).collect();
        for n in 1..=4 {
            let fds: Vec<_> = files[..n].iter().map(|f| f.as_fd()).collect();
            s.write_all(b"hdr").await.unwrap();
            s.send_with_fds(&[0], &fds).await.unwrap();
            assert_eq!(c.read_exact(3, None).await.unwrap(), b"hdr");
            let (data, got) = c.recv_with_fds(1, cmsg_space(n)).await.unwrap();
            assert_eq!(data, vec![0]);
            assert_eq!(got.len(), n);
            for (i, fd) in got.into_iter().enumerate() {
                // received fds are new descriptors, close-on-exec, for the same open files
                let flags = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
                assert_ne!(flags & libc::FD_CLOEXEC, 0);
                assert_ne!(fd.as_raw_fd(), files[i].as_raw_fd());
                assert_eq!(read_all(fd), format!("file {i}"));
            }
        }
        // data larger than one message with fds: the rest arrives by plain reads
        let big = vec![7u8; 300_000];
        let fd = [files[0].as_fd()];
        let (sent, received) = tokio::join!(s.send_with_fds(&big, &fd), async {
            let (first, fds) = c.recv_with_fds(big.len(), cmsg_space(1)).await.unwrap();
            let rest = c.read_exact(big.len() - first.len(), Some(Duration::from_secs(5))).await.unwrap();
            (first.len() + rest.len(), fds.len())
        });
        sent.unwrap();
        assert_eq!(received, (big.len(), 1));
    })
}

#[test]
fn truncated_control_data_is_an_error_and_leaks_nothing() {
    serial(async {
        let dir = tempfile::tempdir().unwrap();
        let (_l, c, s) = pair(&dir).await;
        let files: Vec<_> = (0..4).map(|i| temp_file(&format!("{i}"))).collect();
        let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        let before = fd_count();
        for _ in 0..50 {
            s.send_with_fds(&[0], &fds).await.unwrap();
            let e = c.recv_with_fds(1, cmsg_space(1)).await.unwrap_err();
            assert_eq!(e.code, ErrorCode::TooLarge, "{e}");
            // no control buffer at all
            s.send_with_fds(&[0], &fds).await.unwrap();
            assert_eq!(c.recv_with_fds(1, 0).await.unwrap_err().code, ErrorCode::TooLarge);
        }
        assert_eq!(fd_count(), before);
    })
}

#[test]
fn peer_credentials_deadlines_eof_and_bad_arguments() {
    serial(async {
        let dir = tempfile::tempdir().unwrap();
        let (_l, c, s) = pair(&dir).await;
        let cred = s.peer_cred().unwrap();
        assert_eq!(cred.pid as u32, std::process::id());
        assert_eq!(cred.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(cred.gid, nix::unistd::getegid().as_raw());

        c.write_all(b"abc").await.unwrap();
        let e = s.read_exact(10, Some(Duration::from_millis(100))).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Timeout, "{e}");

        let f = temp_file("x");
        assert_eq!(s.send_with_fds(&[], &[f.as_fd()]).await.unwrap_err().code, ErrorCode::Invalid);

        c.shutdown().unwrap();
        let e = s.read_exact(1, None).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Closed, "{e}");
        let (data, fds) = s.recv_with_fds(8, cmsg_space(1)).await.unwrap();
        assert!(data.is_empty() && fds.is_empty());
        // writing to a closed peer fails cleanly (no SIGPIPE)
        drop(c);
        let mut failed = false;
        for _ in 0..10 {
            if s.write_all(&[0u8; 65536]).await.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
        assert_eq!(
            UnixConnection::connect(dir.path().join("nothing.sock")).await.unwrap_err().code,
            ErrorCode::NotFound
        );
    })
}

fn frame(cmd: u8, data: u32, oob: u32, magic: u32) -> Vec<u8> {
    let mut h = magic.to_be_bytes().to_vec();
    h.push(cmd);
    h.extend_from_slice(&data.to_be_bytes());
    h.extend_from_slice(&oob.to_be_bytes());
    h.extend_from_slice(&[b' '; 64]);
    h
}

#[test]
fn protocol_frames_requests_limits_and_responses_with_fds() {
    serial(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = UnixListener::bind(&path, BindOptions::default()).unwrap();
        let f = temp_file("through the fd");
        let server = async {
            let c = l.accept().await.unwrap();
            // a request with payload, split over several writes by the client
            let r = c.read_request_frame(16, None).await.unwrap();
            assert_eq!(r.data.as_deref(), Some(&b"payload"[..]));
            // a response: header, then the dummy byte with one fd
            c.write_all(&frame(0x82, 0, cmsg_space(1) as u32, 0x4242_4242)).await.unwrap();
            c.send_with_fds(&[0], &[f.as_fd()]).await.unwrap();
            // DataSize over the limit: header only, payload left unread
            let r = c.read_request_frame(16, None).await.unwrap();
            assert!(r.data.is_none());
            assert_eq!(u32::from_be_bytes(r.header[5..9].try_into().unwrap()), 0xffff_ffff);
            // bad magic: header only
            let r = c.read_request_frame(16, None).await.unwrap();
            assert!(r.data.is_none());
            assert_eq!(&r.header[..4], b"AAAA");
        };
        let client = async {
            let c = UnixConnection::connect(&path).await.unwrap();
            let mut req = frame(2, 7, 0, 0x4242_4242);
            req.extend_from_slice(b"payload");
            c.write_all(&req[..40]).await.unwrap();
            tokio::task::yield_now().await;
            c.write_all(&req[40..]).await.unwrap();
            let resp = c.read_response_frame(Some(Duration::from_secs(5))).await.unwrap();
            assert_eq!(resp.data.as_deref(), Some(&[][..])); // the dummy byte is dropped
            assert_eq!(resp.fds.len(), 1);
            assert_eq!(read_all(resp.fds.into_iter().next().unwrap()), "through the fd");
            c.write_all(&frame(0, 0xffff_ffff, 0, 0x4242_4242)).await.unwrap();
            c.write_all(&frame(0, 1, 0, 0x4141_4141)).await.unwrap();
        };
        tokio::join!(server, client);

        // request(): a whole client exchange against a server that answers with payload, then one that hangs
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let server = async {
            let c = l.accept().await.unwrap();
            let r = c.read_request_frame(16, None).await.unwrap();
            assert_eq!(r.data.as_deref(), Some(&[][..]));
            c.write_all(&frame(0x81, 5, 0, 0x4242_4242)).await.unwrap();
            c.write_all(b"hello").await.unwrap();
            let hang = l.accept().await.unwrap();
            done_rx.await.unwrap(); // hold the connection open, unanswered, until the client has timed out
            drop(hang);
        };
        let client = async {
            let resp =
                tapmanager_core::unix::request(&path, &frame(1, 0, 0, 0x4242_4242), Some(Duration::from_secs(5)))
                    .await
                    .unwrap();
            assert_eq!(resp.header[4], 0x81);
            assert_eq!(resp.data.as_deref(), Some(&b"hello"[..]));
            let e =
                tapmanager_core::unix::request(&path, &frame(1, 0, 0, 0x4242_4242), Some(Duration::from_millis(50)))
                    .await
                    .unwrap_err();
            assert_eq!(e.code, ErrorCode::Timeout, "{e}");
            done_tx.send(()).unwrap();
        };
        tokio::join!(server, client);
    })
}

#[test]
fn incoming_requests_respond_then_read_and_shutdown_read() {
    serial(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = std::sync::Arc::new(UnixListener::bind(&path, BindOptions::default()).unwrap());
        let mut incoming = l.incoming_requests(64, Some(Duration::from_secs(5)));
        // a slow client that never sends a whole frame does not hold up a later one
        let slow = UnixConnection::connect(&path).await.unwrap();
        slow.write_all(&frame(2, 0, 0, 0x4242_4242)[..10]).await.unwrap();
        let fast = UnixConnection::connect(&path).await.unwrap();
        fast.write_all(&frame(2, 0, 0, 0x4242_4242)).await.unwrap();
        let (conn, first) = incoming.recv().await.unwrap();
        assert_eq!(first.header[4], 2);
        // respond with a duplicate of a file's fd, closing the original at once: the duplicate is what travels
        let f = temp_file("dup");
        let dups = tapmanager_core::unix::dup_fds(&[f.as_raw_fd()]).unwrap();
        drop(f);
        assert_eq!(tapmanager_core::unix::dup_fds(&[-1]).unwrap_err().code, ErrorCode::Invalid);
        let resp_head = frame(0x82, 0, cmsg_space(1) as u32, 0x4242_4242);
        let (next, resp) = tokio::join!(conn.respond_then_read(&resp_head, &[0], dups, 64, None), async {
            let r = fast.read_response_frame(Some(Duration::from_secs(5))).await.unwrap();
            fast.write_all(&frame(1, 0, 0, 0x4242_4242)).await.unwrap();
            r
        });
        assert_eq!(read_all(resp.fds.into_iter().next().unwrap()), "dup");
        assert_eq!(next.unwrap().header[4], 1);
        // shutdown_read: a pending read ends with ERR_CLOSED while a write still goes out
        let c2 = std::sync::Arc::new(conn);
        let reader = {
            let c2 = c2.clone();
            tokio::spawn(async move { c2.read_request_frame(64, None).await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        c2.shutdown_read().unwrap();
        assert_eq!(reader.await.unwrap().unwrap_err().code, ErrorCode::Closed);
        c2.write_all(b"still writable").await.unwrap();
        assert_eq!(fast.read_exact(14, Some(Duration::from_secs(5))).await.unwrap(), b"still writable");
        // closing the listener ends the stream
        l.close();
        drop(slow);
        assert!(tokio::time::timeout(Duration::from_secs(5), incoming.recv()).await.unwrap().is_none());
    })
}

/// A non-blocking socket pair: (the client's end, the server's end).
fn nb_pair() -> (std::os::unix::net::UnixStream, std::os::unix::net::UnixStream) {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    (a, b)
}

/// Sends `data` with `fds` in one sendmsg from a blocking std socket.
fn send_fds(s: &std::os::unix::net::UnixStream, data: &[u8], fds: &[std::os::fd::RawFd]) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [std::io::IoSlice::new(data)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(s.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).unwrap();
}

#[test]
fn response_reader_reads_a_frame_arriving_in_pieces_with_fds_and_payload_rest() {
    use tapmanager_core::unix::ResponseReader;
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let before = fd_count();
    let (client, mut server) = nb_pair();
    let mut r = ResponseReader::new();
    assert!(r.advance(client.as_fd()).unwrap().is_none(), "nothing sent yet: wait");
    let head = frame(0x82, 5, cmsg_space(2) as u32, 0x4242_4242);
    // the header in two writes, each followed by a step that must wait for more
    server.write_all(&head[..30]).unwrap();
    assert!(r.advance(client.as_fd()).unwrap().is_none());
    server.write_all(&head[30..]).unwrap();
    assert!(r.advance(client.as_fd()).unwrap().is_none(), "header complete, payload not there yet");
    // the first 2 payload bytes with 2 fds in one message, the other 3 later by a plain write
    let (f1, f2) = (temp_file("one"), temp_file("two"));
    send_fds(&server, b"in", &[f1.as_raw_fd(), f2.as_raw_fd()]);
    assert!(r.advance(client.as_fd()).unwrap().is_none(), "payload incomplete");
    server.write_all(b"fo!").unwrap();
    let f = r.advance(client.as_fd()).unwrap().expect("complete");
    assert_eq!(f.header, head);
    assert_eq!(f.data.as_deref(), Some(&b"info!"[..]));
    let mut fds = f.fds.into_iter();
    assert_eq!(read_all(fds.next().unwrap()), "one");
    assert_eq!(read_all(fds.next().unwrap()), "two");
    assert!(fds.next().is_none());

    // a frame with fds and DataSize 0: the dummy byte is dropped
    let mut r = ResponseReader::new();
    server.write_all(&frame(0x82, 0, cmsg_space(1) as u32, 0x4242_4242)).unwrap();
    send_fds(&server, &[0], &[f1.as_raw_fd()]);
    let f = r.advance(client.as_fd()).unwrap().expect("complete");
    assert_eq!(f.data.as_deref(), Some(&b""[..]));
    assert_eq!(read_all(f.fds.into_iter().next().unwrap()), "one");

    // an empty response is complete with its header; bad magic is returned as is without reading on
    let mut r = ResponseReader::new();
    server.write_all(&frame(0x83, 0, 0, 0x4242_4242)).unwrap();
    let f = r.advance(client.as_fd()).unwrap().expect("complete");
    assert_eq!((f.data.as_deref(), f.fds.len()), (Some(&b""[..]), 0));
    let mut r = ResponseReader::new();
    server.write_all(&frame(0x83, 9, 0, 0x1111_1111)).unwrap();
    let f = r.advance(client.as_fd()).unwrap().expect("complete");
    assert!(f.data.is_none());
    drop((f1, f2));
    drop((client, server));
    assert_eq!(fd_count(), before, "no fd leaked");
}

#[test]
fn response_reader_eof_and_truncated_control_data_are_errors_and_leak_nothing() {
    use tapmanager_core::unix::ResponseReader;
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let before = fd_count();
    // EOF in the header
    let (client, mut server) = nb_pair();
    server.write_all(&frame(0x82, 1, 0, 0x4242_4242)[..10]).unwrap();
    drop(server);
    let e = ResponseReader::new().advance(client.as_fd()).unwrap_err();
    assert_eq!(e.code, ErrorCode::Closed);
    assert!(e.message.contains("connection closed after 10"), "{}", e.message);
    drop(client);
    // EOF before the payload, and in the payload rest
    let (client, mut server) = nb_pair();
    server.write_all(&frame(0x82, 4, 0, 0x4242_4242)).unwrap();
    drop(server);
    assert_eq!(ResponseReader::new().advance(client.as_fd()).unwrap_err().code, ErrorCode::Closed);
    drop(client);
    let (client, mut server) = nb_pair();
    server.write_all(&frame(0x82, 4, 0, 0x4242_4242)).unwrap();
    server.write_all(b"ab").unwrap();
    drop(server);
    assert_eq!(ResponseReader::new().advance(client.as_fd()).unwrap_err().code, ErrorCode::Closed);
    drop(client);
    // 4 fds sent where OobSize announces room for 1: truncated, and the fd that arrived is closed
    let (client, mut server) = nb_pair();
    let files: Vec<_> = (0..4).map(|i| temp_file(&i.to_string())).collect();
    server.write_all(&frame(0x82, 1, cmsg_space(1) as u32, 0x4242_4242)).unwrap();
    send_fds(&server, b"x", &files.iter().map(|f| f.as_raw_fd()).collect::<Vec<_>>());
    let e = ResponseReader::new().advance(client.as_fd()).unwrap_err();
    assert_eq!(e.code, ErrorCode::TooLarge);
    drop((files, client, server));
    assert_eq!(fd_count(), before, "no fd leaked");
}

#[test]
fn try_respond_writes_at_once_or_hands_the_rest_to_respond_rest_with_the_fds() {
    serial(async {
        let dir = tempfile::tempdir().unwrap();
        let (_l, client, server) = pair(&dir).await;
        let f = temp_file("sent-now");
        // the usual case: all of it at once, fds with the data
        let head = frame(0x82, 1, cmsg_space(1) as u32, 0x4242_4242);
        let (done, _) = server.try_respond(&head, b"i", &[f.as_fd()]).unwrap();
        assert!(done);
        let got = client.read_response_frame(Some(Duration::from_secs(10))).await.unwrap();
        assert_eq!((got.header, got.data.as_deref()), (head.clone(), Some(&b"i"[..])));
        assert_eq!(read_all(got.fds.into_iter().next().unwrap()), "sent-now");
        // a peer that does not read: fill the socket buffer with one big response, then the next one cannot go out
        // now; respond_rest sends it, fds included, once the peer reads
        let big = vec![7u8; 4 << 20];
        let (done, sent) = server.try_respond(&frame(0x80, big.len() as u32, 0, 0x4242_4242), &big, &[]).unwrap();
        assert!(!done, "4 MiB does not fit in a socket buffer");
        let g = temp_file("sent-later");
        let (done, sent2) = server.try_respond(&head, b"j", &[g.as_fd()]).unwrap();
        assert!(!done);
        let dup = g.as_fd().try_clone_to_owned().unwrap();
        drop(g); // respond_rest holds its own duplicate
        let writer = async {
            server
                .respond_rest(&frame(0x80, big.len() as u32, 0, 0x4242_4242), &big, Vec::new(), sent, None)
                .await
                .unwrap();
            server.respond_rest(&head, b"j", vec![dup], sent2, Some(Duration::from_secs(30))).await.unwrap();
        };
        let reader = async {
            let first = client.read_response_frame(Some(Duration::from_secs(30))).await.unwrap();
            assert_eq!(first.data.map(|d| d.len()), Some(big.len()));
            let second = client.read_response_frame(Some(Duration::from_secs(30))).await.unwrap();
            assert_eq!(second.data.as_deref(), Some(&b"j"[..]));
            assert_eq!(read_all(second.fds.into_iter().next().unwrap()), "sent-later");
        };
        tokio::join!(writer, reader);
        // bad arguments are refused before anything is written
        assert_eq!(server.try_respond(&head, b"", &[f.as_fd()]).unwrap_err().code, ErrorCode::Invalid);
    })
}

#[test]
fn request_reader_reads_frames_in_pieces_and_leaves_oversize_or_bad_payloads_unread() {
    use tapmanager_core::unix::RequestReader;
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (server, mut client) = nb_pair();
    let mut r = RequestReader::new(16);
    assert!(r.advance(server.as_fd()).unwrap().is_none(), "nothing sent yet: wait");
    // the header in two writes and the payload in two more, each followed by a step that must wait for more
    let head = frame(0, 5, 0, 0x4242_4242);
    client.write_all(&head[..40]).unwrap();
    assert!(r.advance(server.as_fd()).unwrap().is_none());
    client.write_all(&head[40..]).unwrap();
    assert!(r.advance(server.as_fd()).unwrap().is_none(), "header complete, payload not there yet");
    client.write_all(b"ab").unwrap();
    assert!(r.advance(server.as_fd()).unwrap().is_none(), "payload incomplete");
    client.write_all(b"cde").unwrap();
    let f = r.advance(server.as_fd()).unwrap().expect("complete");
    assert_eq!((f.header, f.data.as_deref()), (head, Some(&b"abcde"[..])));

    // Two frames back to back: a fresh reader takes exactly one frame each time, the stream stays in step
    // (a payload that looks like a header is payload).
    let get = frame(2, 0, 0, 0x4242_4242);
    let mut both = frame(1, 77, 0, 0x4242_4242);
    both.extend_from_slice(&get);
    both.extend_from_slice(&get);
    client.write_all(&both).unwrap();
    let f = RequestReader::new(1024).advance(server.as_fd()).unwrap().expect("first");
    assert_eq!((f.header[4], f.data.as_deref()), (1, Some(&get[..])));
    let f = RequestReader::new(1024).advance(server.as_fd()).unwrap().expect("second");
    assert_eq!((f.header, f.data.as_deref()), (get.clone(), Some(&b""[..])));

    // DataSize over the limit, and a bad magic: returned with the header only; the payload stays unread
    client.write_all(&frame(0, 17, 0, 0x4242_4242)).unwrap();
    client.write_all(b"not read").unwrap();
    let f = RequestReader::new(16).advance(server.as_fd()).unwrap().expect("oversize");
    assert!(f.data.is_none());
    let mut rest = [0u8; 8];
    (&server).read_exact(&mut rest).unwrap();
    assert_eq!(&rest, b"not read");
    client.write_all(&frame(2, 3, 0, 0x1111_1111)).unwrap();
    let f = RequestReader::new(16).advance(server.as_fd()).unwrap().expect("bad magic");
    assert_eq!((f.header[0], f.data.is_none()), (0x11, true));

    // EOF: before anything, in the header, in the payload
    drop(client);
    let e = RequestReader::new(16).advance(server.as_fd()).unwrap_err();
    assert_eq!(e.code, ErrorCode::Closed);
    let (server, mut client) = nb_pair();
    client.write_all(&get[..10]).unwrap();
    drop(client);
    let e = RequestReader::new(16).advance(server.as_fd()).unwrap_err();
    assert_eq!(e.code, ErrorCode::Closed);
    assert!(e.message.contains("read 77 bytes: connection closed after 10"), "{}", e.message);
    let (server, mut client) = nb_pair();
    client.write_all(&frame(0, 4, 0, 0x4242_4242)).unwrap();
    client.write_all(b"ab").unwrap();
    drop(client);
    let e = RequestReader::new(16).advance(server.as_fd()).unwrap_err();
    assert!(e.message.contains("read 4 bytes: connection closed after 2"), "{}", e.message);
}
