//! The Rust-only floor for `bench/fd.ts`: a minimal FDServer-protocol server and client written with
//! `tapmanager_core::unix` only (no Node), doing the same exchanges as the TypeScript benchmark: get round trips
//! (header, response header, one recvmsg with the fds) and add+release cycles, one connection per request (or,
//! with `keep`, each client's requests back to back on one connection).
//!
//! `fd_floor server <socket>` serves until killed; keys `g1`/`g4` hold 1/4 fds of /dev/null, add opens one fd.
//! `fd_floor client <socket> <get|addrel> <concurrency> <ops> <nfds> [keep]` prints one JSON line of figures.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tapmanager_core::unix::{cmsg_space, BindOptions, UnixConnection, UnixListener};

const HDR: usize = 77;

fn header(cmd: u8, data: u32, oob: u32, key: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(HDR);
    h.extend_from_slice(&0x4242_4242u32.to_be_bytes());
    h.push(cmd);
    h.extend_from_slice(&data.to_be_bytes());
    h.extend_from_slice(&oob.to_be_bytes());
    h.extend_from_slice(key);
    h
}

fn key_bytes(k: &str) -> Vec<u8> {
    let mut v = k.as_bytes().to_vec();
    v.resize(64, b' ');
    v
}

fn devnull() -> OwnedFd {
    std::fs::File::open("/dev/null").expect("open /dev/null").into()
}

async fn serve(path: String) {
    let l = UnixListener::bind(&path, BindOptions::default()).expect("bind");
    let fixed: Arc<HashMap<String, Vec<OwnedFd>>> = Arc::new(
        [("g1".to_string(), vec![devnull()]), ("g4".to_string(), (0..4).map(|_| devnull()).collect())]
            .into_iter()
            .collect(),
    );
    let added: Arc<Mutex<HashMap<String, OwnedFd>>> = Arc::default();
    loop {
        let Ok(c) = l.accept().await else { return };
        let fixed = fixed.clone();
        let added = added.clone();
        tokio::spawn(async move {
            while let Ok(h) = c.read_exact(HDR, Some(Duration::from_secs(10))).await {
                let cmd = h[4];
                let size = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) as usize;
                if size > 0 && c.read_exact(size, Some(Duration::from_secs(10))).await.is_err() {
                    return;
                }
                let key = String::from_utf8_lossy(&h[13..]).trim().to_string();
                let r = match cmd {
                    0 => {
                        added.lock().unwrap().insert(key, devnull());
                        c.write_all(&header(0x80, 0, 0, &h[13..])).await
                    }
                    1 => {
                        added.lock().unwrap().remove(&key);
                        c.write_all(&header(0x81, 0, 0, &h[13..])).await
                    }
                    _ => {
                        let fds: Vec<_> = fixed[&key].iter().map(|f| f.as_fd()).collect();
                        let r = c.write_all(&header(0x82, 0, cmsg_space(fds.len()) as u32, &h[13..])).await;
                        match r {
                            Ok(()) => c.send_with_fds(&[0], &fds).await,
                            e => e,
                        }
                    }
                };
                if r.is_err() {
                    return;
                }
            }
        });
    }
}

async fn request(path: &str, cmd: u8, key: &[u8], payload: &[u8]) {
    let c = UnixConnection::connect(path).await.expect("connect");
    request_on(&c, cmd, key, payload).await;
}

/// One request on an open connection, which stays open.
async fn request_on(c: &UnixConnection, cmd: u8, key: &[u8], payload: &[u8]) {
    let mut req = header(cmd, payload.len() as u32, 0, key);
    req.extend_from_slice(payload);
    c.write_all(&req).await.expect("write");
    let h = c.read_exact(HDR, None).await.expect("read header");
    assert_eq!(h[4], cmd | 0x80, "unexpected response");
    let size = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) as usize;
    let oob = u32::from_be_bytes([h[9], h[10], h[11], h[12]]) as usize;
    if size > 0 || oob > 0 {
        let (_data, fds) = c.recv_with_fds(size.max(1), oob).await.expect("recvmsg");
        drop(fds);
    }
}

async fn client(path: String, mode: String, conc: usize, ops: usize, nfds: usize, keep: bool) {
    let lat: Arc<Mutex<Vec<f64>>> = Arc::default();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..conc {
        let (path, mode, lat) = (path.clone(), mode.clone(), lat.clone());
        let n = ops / conc;
        tasks.push(tokio::spawn(async move {
            let get_key = key_bytes(&format!("g{nfds}"));
            let mut mine = Vec::with_capacity(n);
            // keep: this worker's requests go back to back on one connection.
            let conn = if keep { Some(UnixConnection::connect(&path).await.expect("connect")) } else { None };
            for i in 0..n {
                let t0 = Instant::now();
                let k = key_bytes(&format!("a{w}-{i}"));
                let steps: &[(u8, &[u8], &[u8])] =
                    if mode == "get" { &[(2, &get_key, &[])] } else { &[(0, &k, b"{}"), (1, &k, &[])] };
                for &(cmd, key, payload) in steps {
                    match &conn {
                        Some(c) => request_on(c, cmd, key, payload).await,
                        None => request(&path, cmd, key, payload).await,
                    }
                }
                mine.push(t0.elapsed().as_secs_f64() * 1e6);
            }
            lat.lock().unwrap().extend(mine);
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let secs = start.elapsed().as_secs_f64();
    let mut l = lat.lock().unwrap().clone();
    l.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| l[((l.len() as f64 * p) as usize).min(l.len() - 1)];
    println!("{{\"ops\":{},\"secs\":{secs},\"p50_us\":{},\"p99_us\":{}}}", l.len(), pct(0.5), pct(0.99));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    match args.get(1).map(String::as_str) {
        Some("server") => rt.block_on(serve(args[2].clone())),
        Some("client") => rt.block_on(client(
            args[2].clone(),
            args[3].clone(),
            args[4].parse().unwrap(),
            args[5].parse().unwrap(),
            args[6].parse().unwrap(),
            args.get(7).map(String::as_str) == Some("keep"),
        )),
        _ => eprintln!(
            "usage: fd_floor server <socket> | fd_floor client <socket> <get|addrel> <concurrency> <ops> <nfds> [keep]"
        ),
    }
}
