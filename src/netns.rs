//! Entering a network namespace.
//!
//! Only the network namespace is entered (setns with CLONE_NEWNET): `ip netns
//! exec` also remounts /sys, which would hide the host's /sys/fs/bpf where
//! the pins live.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::sched::{setns, CloneFlags};

/// Where `ip netns add NAME` puts its namespaces.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// `/var/run/netns/NAME` for a name, or the path itself if it has a slash
/// (such as /proc/PID/ns/net).
pub fn path_of(name: &str) -> PathBuf {
    if name.contains('/') {
        PathBuf::from(name)
    } else {
        Path::new(NETNS_RUN_DIR).join(name)
    }
}

/// Moves the calling thread into the network namespace `name`.
pub fn enter(name: &str) -> Result<()> {
    let path = path_of(name);
    let f = File::open(&path).with_context(|| {
        format!("opening the network namespace {} (does it exist? `ip netns list` shows named ones)", path.display())
    })?;
    setns(&f, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering the network namespace {} (needs CAP_SYS_ADMIN)", path.display()))
}

/// The inode of the calling thread's network namespace: what keys its pins.
pub fn current_inode() -> Result<u64> {
    let meta = std::fs::metadata("/proc/thread-self/ns/net").context("reading /proc/thread-self/ns/net")?;
    Ok(meta.ino())
}

/// A path that opens the network namespace with inode `ino`, if anything
/// still holds it: a bind mount (`ip netns`, container runtimes), a process
/// in it, or a process holding it open.  None: the namespace is gone.
pub fn find(ino: u64) -> Option<PathBuf> {
    let is_it = |p: &Path| std::fs::metadata(p).map(|m| m.ino() == ino).unwrap_or(false);
    let named = std::fs::read_dir(NETNS_RUN_DIR).into_iter().flatten().flatten().map(|e| e.path());
    // nsfs bind mounts anywhere (/run/docker/netns, …): mountinfo field 5.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let nsfs = mounts
        .lines()
        .filter(|l| l.contains(" - nsfs "))
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .collect::<Vec<_>>();
    if let Some(p) = named.chain(nsfs).find(|p| is_it(p)) {
        return Some(p);
    }
    let pids = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())));
    let want = format!("net:[{ino}]");
    for pid in pids {
        let ns = pid.path().join("ns/net");
        if is_it(&ns) {
            return Some(ns);
        }
        for fd in std::fs::read_dir(pid.path().join("fd")).into_iter().flatten().flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()) {
                return Some(fd.path());
            }
        }
    }
    None
}

/// Runs `f` on a thread inside the named namespace; the caller's thread
/// stays where it is.  Sockets `f` creates belong to that namespace.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(name)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in namespace {name} panicked"))?
    })
}
