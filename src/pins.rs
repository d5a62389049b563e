//! The pin layout under bpffs, and the lock that serialises loaders.
//!
//! ```text
//! /sys/fs/bpf/sfunnel/                     ($SFUNNEL_BPFFS overrides /sys/fs/bpf)
//!                                          (flock on this directory: one loader at a time)
//!   netns-<inode>/<interface>/<ingress|egress>/
//!     prog                                 the program
//!     link                                 the TCX link (TCX mode only)
//!     active params ports addr_maps rule_maps counter_maps text_maps stats meta detour
//!     detour_prog detour_link              the segmentation detour (egress with a funnel rule)
//! ```
//! Every pod on a node shares the host's bpffs, so the network namespace's
//! inode keys the tree; interface and direction keep attachments apart.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::attach::Direction;

pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The bpffs mount point: $SFUNNEL_BPFFS or /sys/fs/bpf.
pub fn bpffs() -> PathBuf {
    std::env::var_os("SFUNNEL_BPFFS").map_or_else(|| PathBuf::from(DEFAULT_BPFFS), PathBuf::from)
}

/// sfunnel's directory in bpffs.
pub fn root() -> PathBuf {
    bpffs().join("sfunnel")
}

fn is_bpffs(p: &Path) -> bool {
    // f_type's width differs across architectures.
    #[allow(clippy::unnecessary_cast)]
    nix::sys::statfs::statfs(p).map(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC).unwrap_or(false)
}

/// Mounts bpffs at the mount point if nothing is mounted there yet.
pub fn ensure_bpffs() -> Result<()> {
    let mnt = bpffs();
    if is_bpffs(&mnt) {
        return Ok(());
    }
    fs::create_dir_all(&mnt).with_context(|| format!("creating {}", mnt.display()))?;
    nix::mount::mount(Some("bpf"), &mnt, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>).with_context(
        || {
            format!(
                "{} is not a BPF filesystem and mounting one there failed: mount it with \
                 `mount -t bpf bpf {0}` (in Kubernetes, mount the host's /sys/fs/bpf as a hostPath)",
                mnt.display()
            )
        },
    )?;
    if !is_bpffs(&mnt) {
        bail!("{} is still not a BPF filesystem after mounting one", mnt.display());
    }
    Ok(())
}

/// One attachment: a network namespace, an interface, a direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub netns_ino: u64,
    pub iface: String,
    pub direction: Direction,
}

impl Target {
    pub fn dir(&self) -> PathBuf {
        root().join(format!("netns-{}", self.netns_ino)).join(&self.iface).join(self.direction.as_str())
    }

    /// Every target with pins, found by walking the tree.
    pub fn all() -> Vec<Target> {
        let mut out = Vec::new();
        for ns in fs::read_dir(root()).into_iter().flatten().flatten() {
            let name = ns.file_name().to_string_lossy().into_owned();
            let Some(ino) = name.strip_prefix("netns-").and_then(|i| i.parse().ok()) else { continue };
            for ifc in fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                for dir in [Direction::Ingress, Direction::Egress] {
                    if ifc.path().join(dir.as_str()).is_dir() {
                        out.push(Target {
                            netns_ino: ino,
                            iface: ifc.file_name().to_string_lossy().into_owned(),
                            direction: dir,
                        });
                    }
                }
            }
        }
        out.sort_by(|a, b| (a.netns_ino, &a.iface, a.direction).cmp(&(b.netns_ino, &b.iface, b.direction)));
        out
    }

    /// Removes the target's pins and then any directories left empty.
    pub fn remove_pins(&self) -> Result<()> {
        let dir = self.dir();
        if dir.exists() {
            for e in fs::read_dir(&dir)? {
                let p = e?.path();
                fs::remove_file(&p).with_context(|| format!("removing the pin {}", p.display()))?;
            }
            fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        // Parents go when empty; a sibling's pins keep them.
        for p in [dir.parent(), dir.parent().and_then(Path::parent)].into_iter().flatten() {
            let _ = fs::remove_dir(p);
        }
        Ok(())
    }
}

/// An exclusive lock over sfunnel's whole pin tree, released on drop.
pub struct Lock {
    _file: File,
}

impl Lock {
    pub fn acquire() -> Result<Lock> {
        let dir = root();
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // bpffs holds only BPF objects, so the lock is the directory itself.
        let file = File::open(&dir).with_context(|| format!("opening {} to lock it", dir.display()))?;
        // SAFETY: flock on a valid, owned descriptor; blocks until granted.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("locking sfunnel's pin directory");
        }
        Ok(Lock { _file: file })
    }
}
