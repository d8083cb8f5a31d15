//! Helpers shared by the root integration tests: prerequisites and throwaway network namespaces.
#![allow(dead_code)]

use std::process::Command;

/// Panics unless running as root and every named tool exists: a missing prerequisite fails, never skips.
pub fn require_prereqs(tools: &[&str]) {
    assert!(nix::unistd::Uid::effective().is_root(), "prerequisite missing: these tests need root");
    for tool in tools {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(ok, "prerequisite missing: {tool} (run scripts/setup.sh)");
    }
}

/// A short unique name (at most 15 characters) with a prefix.
pub fn unique_name(prefix: &str) -> String {
    let n: u32 = rand::random();
    let mut s = format!("{prefix}{n:08x}");
    s.truncate(15);
    s
}

/// Runs a command, panicking with its stderr on failure; returns stdout.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A netns made with `ip netns add` for a test, removed on drop (with whatever still runs in it).
pub struct TestNetns {
    pub name: String,
}

impl TestNetns {
    pub fn new(prefix: &str) -> TestNetns {
        let name = unique_name(prefix);
        sh("ip", &["netns", "add", &name]);
        sh("ip", &["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        TestNetns { name }
    }
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }
    pub fn exec(&self, cmd: &str, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name, cmd];
        full.extend_from_slice(args);
        sh("ip", &full)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}
