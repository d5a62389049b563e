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

/// True when some process or a bind mount under /var/run/netns still holds
/// the namespace with this inode.
pub fn exists(ino: u64) -> bool {
    let held_by_name = std::fs::read_dir(NETNS_RUN_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.metadata().map(|m| m.ino() == ino).unwrap_or(false));
    held_by_name
        || std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| std::fs::metadata(e.path().join("ns/net")).map(|m| m.ino() == ino).unwrap_or(false))
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
