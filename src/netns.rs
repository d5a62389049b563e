//! Entering a network namespace.
//!
//! Only the network namespace is entered (setns with CLONE_NEWNET): `ip netns
//! exec` also remounts /sys, which would hide the host's /sys/fs/bpf where
//! the pins live.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

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
    move_into_link_name_space(f.as_fd(), Some(LinkNameSpaceType::Network))
        .map_err(std::io::Error::from)
        .with_context(|| format!("entering the network namespace {} (needs CAP_SYS_ADMIN)", path.display()))
}

/// The inode of the calling thread's network namespace: what keys its pins.
pub fn current_inode() -> Result<u64> {
    let meta = std::fs::metadata("/proc/thread-self/ns/net").context("reading /proc/thread-self/ns/net")?;
    Ok(meta.ino())
}

/// SO_NETNS_COOKIE of asm-generic/socket.h (x86_64 and arm64 alike).
const SO_NETNS_COOKIE: i32 = 71;

/// A network namespace as sfunnel keys what it keeps for it: by its
/// cookie, which the kernel never reuses, and its inode, by which it can
/// be found (inodes are reused once a namespace is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Id {
    pub cookie: u64,
    pub ino: u64,
}

/// The calling thread's network namespace.
pub fn current() -> Result<Id> {
    Ok(Id { cookie: current_cookie()?, ino: current_inode()? })
}

/// The cookie of the calling thread's network namespace: a socket made
/// here belongs to it (SO_NETNS_COOKIE, Linux 5.14).
pub fn current_cookie() -> Result<u64> {
    // A netlink socket: an AF_UNIX one's close can wait for the kernel's
    // unix socket garbage collector (src/netlink.rs).
    let fd = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)
        .context("opening a socket to read the namespace's cookie")?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 of `len` bytes that outlives the call.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("reading the network namespace's cookie (SO_NETNS_COOKIE needs Linux 5.14 or newer)");
    }
    Ok(cookie)
}

/// Whether `path` opens the namespace `id`: its inode first (cheap), then
/// its cookie, read from a thread inside it.
pub fn is(path: &Path, id: Id) -> bool {
    if !std::fs::metadata(path).is_ok_and(|m| m.ino() == id.ino) {
        return false;
    }
    let p = path.to_string_lossy().into_owned();
    run_in(&p, current_cookie).is_ok_and(|c| c == id.cookie)
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
