//! Per-interface setup and teardown latency, ours (netlink + tun ioctls + nf_tables over netlink, no process)
//! against the same work done with `ip`/`nft` commands one by one. Root only; builds its own pod and node
//! namespaces and removes them. Run: `cargo bench -p tapmanager-core --bench setup`.
//!
//! One iteration = what the container side does for one CNI link `eth0` (a veth whose peer is in the node):
//! create `tap0` (MTU, up), create bridge `br0` (MTU, ageing 0), enslave `eth0` and `tap0`, bridge up, bridge
//! address 169.254.254.2/24, DHCP isolation of `eth0`, open the tap fd; then tear it all down: close the
//! fd, remove the isolation, delete the address, `eth0` nomaster, delete the bridge, delete the tap.
//!
//! The release-path cases (group `release_path`) do the same setup in a fresh pod netns per iteration (made,
//! with its veth, untimed) and end as a release does, where the netns is deleted right after the teardown:
//! - `full_teardown_fresh_netns`: the teardown above (bridge and tap deleted); the netns delete is untimed.
//! - `keep_devices`: the release-path teardown (`TeardownOptions { delete_devices: false }`): remove the
//!   isolation, `eth0` and `tap0` nomaster, bridge down, delete its address, tap down; the bridge and tap are
//!   left to the netns deletion (untimed), which the kernel finishes asynchronously.
//! - `keep_devices_plus_netns_delete`: the same with the netns delete (umount + unlink) timed too.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use tapmanager_core::netlink::NetlinkHandle;
use tapmanager_core::netns::{create_netns, delete_netns, open_netns, run_in_netns, IfExists, DEFAULT_NETNS_DIR};
use tapmanager_core::{isolation, tap};

const NFT: &str = "/usr/sbin/nft";

/// Our per-interface setup: `tap0` (MTU, up), `br0` (MTU, ageing 0), `eth0` and `tap0` enslaved, bridge up,
/// 169.254.254.2/24, DHCP isolation of `eth0`, the tap opened. Returns the bridge and tap indexes and the fds.
async fn setup_interface(
    nl: &NetlinkHandle,
    eth: u32,
    ns: &Path,
) -> tapmanager_core::Result<(u32, u32, Vec<std::os::fd::OwnedFd>)> {
    tap::create_tap(Some(ns), "tap0", &tap::TapCreateOptions { mtu: Some(1500), multi_queue: false, up: true })?;
    let br = nl.create_bridge("br0", Some(1500)).await?;
    let tapi = nl.link_by_name("tap0").await?.index;
    nl.set_master(eth, br).await?;
    nl.set_master(tapi, br).await?;
    nl.set_up(br).await?;
    nl.add_address(br, "169.254.254.2".parse().unwrap(), 24).await?;
    isolation::add_dhcp_isolation(Some(ns), "eth0")?;
    let fds = tap::open_tap(Some(ns), "tap0", &tap::TapOpenOptions::default())?;
    Ok((br, tapi, fds))
}

/// The device half of a full teardown (after the fds are closed and the isolation removed): bridge address
/// deleted, `eth0` nomaster, bridge and tap deleted in one kernel batch (one set of unregister grace periods).
async fn full_teardown(nl: &NetlinkHandle, eth: u32, br: u32, tapi: u32) -> tapmanager_core::Result<()> {
    nl.delete_address(br, "169.254.254.2".parse().unwrap(), 24).await?;
    nl.set_nomaster(eth).await?;
    nl.delete_links(&[br, tapi]).await
}

struct Env {
    pod: String,
    node: String,
    pod_path: PathBuf,
    node_path: PathBuf,
    rt: tokio::runtime::Runtime,
    nl: NetlinkHandle,
    eth: u32,
}

impl Env {
    fn new() -> Env {
        assert!(nix::unistd::Uid::effective().is_root(), "this benchmark needs root");
        let dir = Path::new(DEFAULT_NETNS_DIR);
        let n: u32 = rand::random();
        let pod = format!("tmbpod{n:08x}");
        let node = format!("tmbnode{n:08x}");
        let pod_path = create_netns(dir, &pod, IfExists::Recreate).unwrap().path;
        let node_path = create_netns(dir, &node, IfExists::Recreate).unwrap().path;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let nl = rt.block_on(async { NetlinkHandle::open(Some(&pod_path)) }).unwrap();
        let node_fd = open_netns(&node_path).unwrap();
        let eth = rt
            .block_on(async {
                let eth = nl.create_veth("eth0", "host0", Some(node_fd.as_fd())).await?;
                nl.set_up(eth).await?;
                nl.set_up(1).await?;
                Ok::<_, tapmanager_core::Error>(eth)
            })
            .unwrap();
        Env { pod, node, pod_path, node_path, rt, nl, eth }
    }

    /// Our way: one iteration of setup + teardown.
    fn ours(&self) {
        self.ours_timed();
    }

    /// Our way, returning the time of the setup half and of the teardown half.
    fn ours_timed(&self) -> (Duration, Duration) {
        let (nl, eth, ns) = (&self.nl, self.eth, self.pod_path.as_path());
        self.rt
            .block_on(async {
                let t = Instant::now();
                let (br, tapi, fds) = setup_interface(nl, eth, ns).await?;
                let setup = t.elapsed();
                // teardown
                let t = Instant::now();
                drop(fds);
                isolation::remove_dhcp_isolation(Some(ns), "eth0")?;
                full_teardown(nl, eth, br, tapi).await?;
                Ok::<_, tapmanager_core::Error>((setup, t.elapsed()))
            })
            .unwrap()
    }

    /// Ours, with the three blocking steps (tap create, isolation, tap open) done on ONE netns thread, as a
    /// caller that batches its netns work would.
    fn ours_batched(&self) {
        let (nl, eth, ns) = (&self.nl, self.eth, self.pod_path.clone());
        self.rt
            .block_on(async {
                let br = nl.create_bridge("br0", Some(1500)).await?;
                nl.set_master(eth, br).await?;
                nl.set_up(br).await?;
                nl.add_address(br, "169.254.254.2".parse().unwrap(), 24).await?;
                let fds = run_in_netns(&ns, || {
                    tap::create_tap_here(
                        "tap0",
                        &tap::TapCreateOptions { mtu: Some(1500), multi_queue: false, up: true },
                    )?;
                    isolation::add_dhcp_isolation_here("eth0")?;
                    tap::open_tap_here("tap0", &tap::TapOpenOptions::default())
                })?;
                let tapi = nl.link_by_name("tap0").await?.index;
                nl.set_master(tapi, br).await?;
                drop(fds);
                run_in_netns(&ns, || isolation::remove_dhcp_isolation_here("eth0"))?;
                nl.delete_address(br, "169.254.254.2".parse().unwrap(), 24).await?;
                nl.set_nomaster(eth).await?;
                nl.delete_links(&[br, tapi]).await?;
                Ok::<_, tapmanager_core::Error>(())
            })
            .unwrap();
    }

    /// A fresh pod netns `<pod>r<k>` with `eth0` (up; peer `hr<k>` in the node netns), as CNI leaves one.
    fn fresh_pod(&self, k: u32) -> FreshPod {
        let name = format!("{}r{k}", self.pod);
        let path = create_netns(Path::new(DEFAULT_NETNS_DIR), &name, IfExists::Recreate).unwrap().path;
        let node_fd = open_netns(&self.node_path).unwrap();
        let (nl, eth) = self
            .rt
            .block_on(async {
                let nl = NetlinkHandle::open(Some(&path))?;
                let eth = nl.create_veth("eth0", &format!("hr{k}"), Some(node_fd.as_fd())).await?;
                nl.set_up(eth).await?;
                nl.set_up(1).await?;
                Ok::<_, tapmanager_core::Error>((nl, eth))
            })
            .unwrap();
        FreshPod { name, path, nl, eth }
    }

    /// One release-path iteration in the fresh pod netns `k`: setup, the teardown of `mode`, the netns delete.
    /// Returns the timed part (see the module doc).
    fn release_path(&self, k: u32, mode: ReleaseMode) -> Duration {
        let pod = self.fresh_pod(k);
        let (nl, eth, ns) = (&pod.nl, pod.eth, pod.path.as_path());
        let mut timed = self
            .rt
            .block_on(async {
                let t = Instant::now();
                let (br, tapi, fds) = setup_interface(nl, eth, ns).await?;
                drop(fds);
                isolation::remove_dhcp_isolation(Some(ns), "eth0")?;
                if mode == ReleaseMode::FullTeardown {
                    full_teardown(nl, eth, br, tapi).await?;
                } else {
                    // What teardown_with(.., TeardownOptions { delete_devices: false }) does to the devices.
                    nl.set_nomaster(eth).await?;
                    nl.set_nomaster(tapi).await?;
                    nl.set_down(br).await?;
                    nl.delete_address(br, "169.254.254.2".parse().unwrap(), 24).await?;
                    nl.set_down(tapi).await?;
                }
                Ok::<_, tapmanager_core::Error>(t.elapsed())
            })
            .unwrap();
        // The handle's socket would keep the netns alive: close it (its task ends on the next poll).
        drop(pod.nl);
        self.rt.block_on(tokio::task::yield_now());
        let t = Instant::now();
        delete_netns(Path::new(DEFAULT_NETNS_DIR), &pod.name).unwrap();
        if mode == ReleaseMode::KeepDevicesAndDeleteNetns {
            timed += t.elapsed();
        }
        timed
    }

    fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.pod.as_str()];
        full.extend_from_slice(args);
        run("ip", &full, None);
    }

    fn nft(&self, script: &str) {
        run("ip", &["netns", "exec", &self.pod, NFT, "-f", "-"], Some(script));
    }

    /// The same work with `ip`/`nft` commands one by one (`ip -n`, the cheapest form; nft through `ip netns
    /// exec`). Opening the tap has no command: it is done with our ioctl, like a VM runtime would.
    fn ip_commands(&self) {
        self.ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"]);
        self.ip(&["link", "set", "tap0", "mtu", "1500", "up"]);
        self.ip(&["link", "add", "br0", "mtu", "1500", "type", "bridge", "ageing_time", "0"]);
        self.ip(&["link", "set", "eth0", "master", "br0"]);
        self.ip(&["link", "set", "tap0", "master", "br0"]);
        self.ip(&["link", "set", "br0", "up"]);
        self.ip(&["addr", "add", "169.254.254.2/24", "dev", "br0"]);
        self.nft(
            "table bridge tapmanager-dhcp-eth0 {\n chain forward { type filter hook forward priority filter; oifname \"eth0\" udp dport 67 counter drop; }\n chain output { type filter hook output priority filter; oifname \"eth0\" udp sport 67 counter drop; }\n}\n",
        );
        let fds = tap::open_tap(Some(&self.pod_path), "tap0", &tap::TapOpenOptions::default()).unwrap();
        drop(fds);
        self.nft("delete table bridge tapmanager-dhcp-eth0\n");
        self.ip(&["addr", "del", "169.254.254.2/24", "dev", "br0"]);
        self.ip(&["link", "set", "eth0", "nomaster"]);
        self.ip(&["link", "del", "br0"]);
        self.ip(&["tuntap", "del", "dev", "tap0", "mode", "tap"]);
    }
}

/// A pod netns made for one release-path iteration.
struct FreshPod {
    name: String,
    path: PathBuf,
    nl: NetlinkHandle,
    eth: u32,
}

/// How a release-path iteration ends (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReleaseMode {
    FullTeardown,
    KeepDevices,
    KeepDevicesAndDeleteNetns,
}

impl Drop for Env {
    fn drop(&mut self) {
        let dir = Path::new(DEFAULT_NETNS_DIR);
        let _ = delete_netns(dir, &self.pod);
        let _ = delete_netns(dir, &self.node);
    }
}

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) {
    use std::io::Write;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// One way of doing the per-interface work.
type Case = dyn Fn(&Env);

/// Median and 90th percentile; `None` when the case did not run (a criterion filter skipped it).
fn median_and_p90(v: &mut [Duration]) -> Option<(Duration, Duration)> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    Some((v[v.len() / 2], v[(v.len() * 9) / 10]))
}

fn bench(c: &mut Criterion) {
    let env = Env::new();
    // Every iteration's own time, for the medians printed at the end.
    let samples: [Mutex<Vec<Duration>>; 3] = Default::default();
    let mut g = c.benchmark_group("per_interface_setup_teardown");
    g.sample_size(30).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    let cases: [(&str, &Case); 3] =
        [("tapmanager", &Env::ours), ("tapmanager_batched", &Env::ours_batched), ("ip_commands", &Env::ip_commands)];
    for (i, (name, f)) in cases.iter().enumerate() {
        g.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    f(&env);
                    let d = t.elapsed();
                    samples[i].lock().unwrap().push(d);
                    total += d;
                }
                total
            })
        });
    }
    // The setup half alone (the teardown still runs each iteration, untimed).
    let halves: Mutex<Vec<(Duration, Duration)>> = Mutex::default();
    g.bench_function("tapmanager_setup_only", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (setup, teardown) = env.ours_timed();
                halves.lock().unwrap().push((setup, teardown));
                total += setup;
            }
            total
        })
    });
    g.finish();
    println!("\nper-interface setup + teardown (every iteration, warm-up included):");
    for (i, (name, _)) in cases.iter().enumerate() {
        let mut v = samples[i].lock().unwrap().clone();
        let n = v.len();
        if let Some((med, p90)) = median_and_p90(&mut v) {
            println!("  {name:<20} median {:>8.3} ms   p90 {:>8.3} ms   ({n} iterations)", ms(med), ms(p90));
        }
    }
    let halves = halves.lock().unwrap().clone();
    let (mut setup, mut teardown): (Vec<Duration>, Vec<Duration>) = halves.into_iter().unzip();
    let n = setup.len();
    if let (Some((sm, sp)), Some((tm, tp))) = (median_and_p90(&mut setup), median_and_p90(&mut teardown)) {
        println!("  tapmanager setup     median {:>8.3} ms   p90 {:>8.3} ms   ({n} iterations)", ms(sm), ms(sp));
        println!("  tapmanager teardown  median {:>8.3} ms   p90 {:>8.3} ms   (same iterations)", ms(tm), ms(tp));
    }
    breakdown(c, &env);
    release_path(c, &env);
}

/// The release-path cases (module doc), each iteration in a fresh pod netns. Run after the others: the
/// deleted netns are destroyed by the kernel in the background, which the cases above should not share.
fn release_path(c: &mut Criterion, env: &Env) {
    let cases: [(&str, ReleaseMode); 3] = [
        ("full_teardown_fresh_netns", ReleaseMode::FullTeardown),
        ("keep_devices", ReleaseMode::KeepDevices),
        ("keep_devices_plus_netns_delete", ReleaseMode::KeepDevicesAndDeleteNetns),
    ];
    let samples: [Mutex<Vec<Duration>>; 3] = Default::default();
    let next = std::sync::atomic::AtomicU32::new(0);
    let mut g = c.benchmark_group("release_path");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for (i, (name, mode)) in cases.iter().enumerate() {
        g.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let d = env.release_path(k, *mode);
                    samples[i].lock().unwrap().push(d);
                    total += d;
                }
                total
            })
        });
    }
    g.finish();
    println!(
        "\nper-interface setup + release-path teardown, fresh pod netns each (every iteration, warm-up included):"
    );
    let labels = [
        "setup + full teardown (devices deleted one by one; netns delete untimed)",
        "setup + release-path teardown (devices left to the netns deletion, untimed)",
        "setup + release-path teardown + netns delete (umount + unlink; kernel cleanup async)",
    ];
    for (i, label) in labels.iter().enumerate() {
        let mut v = samples[i].lock().unwrap().clone();
        let n = v.len();
        if let Some((med, p90)) = median_and_p90(&mut v) {
            println!("  {label}\n      median {:>8.3} ms   p90 {:>8.3} ms   ({n} iterations)", ms(med), ms(p90));
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

const STEPS: [&str; 14] = [
    "create tap",
    "create bridge",
    "get tap index",
    "enslave eth0",
    "enslave tap0",
    "bridge up",
    "add address",
    "add isolation",
    "open tap",
    "close tap fd",
    "remove isolation",
    "delete address",
    "eth0 nomaster",
    "delete br+tap",
];

/// Where the time of one of our iterations goes: the criterion case `breakdown/steps` runs whole iterations
/// and records each step's time; the medians per step are printed after it (nothing when a filter skips it).
fn breakdown(c: &mut Criterion, env: &Env) {
    let times: Mutex<Vec<Vec<Duration>>> = Mutex::new(vec![Vec::new(); STEPS.len()]);
    let mut g = c.benchmark_group("breakdown");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    g.bench_function("steps", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let laps = breakdown_once(env);
                total += laps.iter().sum::<Duration>();
                let mut times = times.lock().unwrap();
                for (k, d) in laps.into_iter().enumerate() {
                    times[k].push(d);
                }
            }
            total
        })
    });
    g.finish();
    let mut times = times.into_inner().unwrap();
    let n = times[0].len();
    if n == 0 {
        return;
    }
    println!("\nbreakdown of one tapmanager iteration (median per step over {n} iterations, warm-up included):");
    let mut setup = Duration::ZERO;
    let mut teardown = Duration::ZERO;
    for (k, (name, v)) in STEPS.iter().zip(times.iter_mut()).enumerate() {
        v.sort();
        let med = v[v.len() / 2];
        if k < 9 {
            setup += med;
        } else {
            teardown += med;
        }
        println!("  {name:<18} {:>9.1} us", med.as_secs_f64() * 1e6);
    }
    println!("  sum of medians: setup {:.3} ms, teardown {:.3} ms", ms(setup), ms(teardown));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("  load average while measuring: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
}

/// One iteration of setup + teardown, timing each of [`STEPS`].
fn breakdown_once(env: &Env) -> Vec<Duration> {
    let (nl, eth, ns) = (&env.nl, env.eth, env.pod_path.as_path());
    let mut laps = Vec::with_capacity(STEPS.len());
    env.rt
        .block_on(async {
            let mut t = Instant::now();
            let mut lap = |laps: &mut Vec<Duration>| {
                laps.push(t.elapsed());
                t = Instant::now();
            };
            tap::create_tap(
                Some(ns),
                "tap0",
                &tap::TapCreateOptions { mtu: Some(1500), multi_queue: false, up: true },
            )?;
            lap(&mut laps);
            let br = nl.create_bridge("br0", Some(1500)).await?;
            lap(&mut laps);
            let tapi = nl.link_by_name("tap0").await?.index;
            lap(&mut laps);
            nl.set_master(eth, br).await?;
            lap(&mut laps);
            nl.set_master(tapi, br).await?;
            lap(&mut laps);
            nl.set_up(br).await?;
            lap(&mut laps);
            nl.add_address(br, "169.254.254.2".parse().unwrap(), 24).await?;
            lap(&mut laps);
            isolation::add_dhcp_isolation(Some(ns), "eth0")?;
            lap(&mut laps);
            let fds = tap::open_tap(Some(ns), "tap0", &tap::TapOpenOptions::default())?;
            lap(&mut laps);
            drop(fds);
            lap(&mut laps);
            isolation::remove_dhcp_isolation(Some(ns), "eth0")?;
            lap(&mut laps);
            nl.delete_address(br, "169.254.254.2".parse().unwrap(), 24).await?;
            lap(&mut laps);
            nl.set_nomaster(eth).await?;
            lap(&mut laps);
            nl.delete_links(&[br, tapi]).await?;
            lap(&mut laps);
            Ok::<_, tapmanager_core::Error>(())
        })
        .unwrap();
    laps
}

criterion_group!(benches, bench);
criterion_main!(benches);
