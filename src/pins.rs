//! sfunnel's directory in bpffs, its lock, and the pins in it: the only
//! code that names, makes, reads or removes a pin.
//!
//! ```text
//! /sys/fs/bpf/                          ($SFUNNEL_BPFFS; mounted with mode 0700 where sfunnel mounts it)
//!   sfunnel/                            root's alone (0700); flock on it: one loader at a time
//!     tcx/<netns cookie>/
//!       <ifindex>-<direction>           the TCX link that holds an attachment's program
//!       <ifindex>-<direction>-detour    the TCX link of its detour program, on its helper pair
//!     netns-<inode>/<iface>/<direction>/  the layout of earlier builds (programs, maps, links):
//!                                       replaced by a load of that target, removed once dead
//! ```
//!
//! An attachment lives on its hook: a clsact filter or a TCX link holds the
//! program, and the program holds its maps; nothing of either is pinned.
//! When the interface goes (with its pod's namespace, say), a clsact filter
//! goes with it and the kernel frees everything.  A pinned TCX link stays,
//! hooked on nothing: its interface index reads 0, which proves it dead.
//! Every load, unload and gc removes such pins ([`Tree::sweep`]), so a dead
//! pod's programs and maps are freed at the next sfunnel run on the node.
//! The netns cookie keys the tree: unlike a namespace's inode, the kernel
//! never gives it to another namespace.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::attach::Direction;
use crate::log::event;
use crate::objects::LinkInfo;
use crate::output::errln;

pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const TREE: &str = "sfunnel";
const TCX: &str = "tcx";

/// The bpffs mount point: $SFUNNEL_BPFFS or /sys/fs/bpf.
pub fn bpffs() -> PathBuf {
    std::env::var_os("SFUNNEL_BPFFS").map_or_else(|| PathBuf::from(DEFAULT_BPFFS), PathBuf::from)
}

/// sfunnel's directory in bpffs.
pub fn root() -> PathBuf {
    bpffs().join(TREE)
}

fn is_bpffs(p: &Path) -> bool {
    // f_type's width differs across architectures.
    #[allow(clippy::unnecessary_cast)]
    rustix::fs::statfs(p).is_ok_and(|s| s.f_type as i64 == BPF_FS_MAGIC)
}

/// Mounts bpffs at the mount point, root's alone (mode 0700), if nothing
/// is mounted there yet.  One already there is left as it is: other tools
/// share it.
pub fn ensure_bpffs() -> Result<()> {
    let mnt = bpffs();
    if is_bpffs(&mnt) {
        return Ok(());
    }
    fs::create_dir_all(&mnt).with_context(|| format!("creating {}", mnt.display()))?;
    rustix::mount::mount("bpf", &mnt, "bpf", rustix::mount::MountFlags::empty(), c"mode=0700")
        .map_err(io::Error::from)
        .with_context(|| {
            format!(
                "{} is not a BPF filesystem and mounting one there failed: mount it with \
                 `mount -t bpf -o mode=0700 bpf {0}` (in Kubernetes, mount the host's /sys/fs/bpf as a hostPath)",
                mnt.display()
            )
        })?;
    if !is_bpffs(&mnt) {
        bail!("{} is still not a BPF filesystem after mounting one", mnt.display());
    }
    Ok(())
}

/// An interface name as it may reach a command: what the kernel accepts
/// (1 to 15 bytes, no `/`, no whitespace or NUL, not `.` or `..`).
/// Pins are keyed by the interface's index, never its name; this is the
/// check at the door.
pub fn check_iface_name(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name == "."
        || name == ".."
        || name.contains(|c: char| c == '/' || c == '\0' || c.is_whitespace());
    if bad {
        bail!(
            "`{}` is not an interface name: 1 to 15 bytes, no `/` or whitespace, not `.` or `..` \
             (`ip link` lists the namespace's interfaces)",
            name.escape_debug()
        );
    }
    Ok(())
}

/// Which TCX link a pin holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LinkKey {
    pub netns_cookie: u64,
    pub ifindex: u32,
    pub direction: Direction,
    /// The detour program's link, on the helper pair (else the
    /// attachment's own).
    pub detour: bool,
}

impl LinkKey {
    fn file_name(&self) -> String {
        format!("{}-{}{}", self.ifindex, self.direction, if self.detour { "-detour" } else { "" })
    }

    fn parse(cookie: u64, name: &str) -> Option<LinkKey> {
        let (ifindex, rest) = name.split_once('-')?;
        let (dir, detour) = match rest.strip_suffix("-detour") {
            Some(d) => (d, true),
            None => (rest, false),
        };
        let direction = match dir {
            "ingress" => Direction::Ingress,
            "egress" => Direction::Egress,
            _ => return None,
        };
        Some(LinkKey { netns_cookie: cookie, ifindex: ifindex.parse().ok()?, direction, detour })
    }
}

/// What a pinned TCX link is now.
#[derive(Debug, Clone)]
pub enum LinkState {
    /// Hooked on its interface.
    Live(LinkInfo),
    /// Hooked on nothing: its interface is gone.  It still holds its
    /// program and maps, until its pin goes.
    Dead(LinkInfo),
    /// Not a link this build can read (pinned by something else?).
    Unreadable(String),
}

/// A pin directory of the earlier layout (`netns-<inode>/<iface>/<direction>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Legacy {
    pub netns_ino: u64,
    pub iface: String,
    pub direction: Direction,
}

/// Something [`Tree::dead`] found.
#[derive(Debug, Clone)]
pub enum Dead {
    Link(LinkKey),
    Legacy(Legacy),
}

/// What is known of an earlier layout's pins.
#[derive(Debug, Clone)]
pub enum LegacyState {
    /// Its TCX link is hooked on nothing: removable.
    Dead(String),
    /// Its program may still be on a hook: only a load or unload of that
    /// target (inside its namespace) can tell.
    Unproven,
}

/// sfunnel's directory, opened and checked.
pub struct Tree {
    path: PathBuf,
    dir: File,
}

/// Refuses what is not root's alone: a symlink, a directory of another
/// user, anything but a directory or a BPF object.
fn check_entry(path: &Path, meta: &fs::Metadata) -> Result<()> {
    if meta.file_type().is_symlink() {
        bail!(
            "{} is a symbolic link: sfunnel keeps its pins only where root alone can write, and follows no link \
             there; remove it (`rm {0}`) and run again",
            path.display()
        );
    }
    if meta.uid() != 0 {
        bail!(
            "{} belongs to uid {}, not root: someone else made it, and sfunnel will not trust or use it; \
             see what it holds, remove it (`rm -r {0}`) and run again",
            path.display(),
            meta.uid()
        );
    }
    Ok(())
}

impl Tree {
    /// Opens sfunnel's directory, making it (mode 0700) if it is missing.
    /// One that is a symbolic link, belongs to another user, or holds a
    /// symbolic link is refused; one of root's that others could read is
    /// made root's alone (0700), as earlier builds left it 0755.
    pub fn open() -> Result<Tree> {
        ensure_bpffs()?;
        let path = root();
        match fs::symlink_metadata(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => match rustix::fs::mkdir(&path, Mode::RWXU) {
                Ok(()) => event!("tree_created", path = path.display()),
                Err(Errno::EXIST) => {}
                Err(e) => return Err(io::Error::from(e)).with_context(|| format!("creating {}", path.display())),
            },
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        Self::open_at(path)?.context("sfunnel's directory vanished while it was being opened")
    }

    /// Opens sfunnel's directory if it exists, never making it (`status`).
    pub fn open_existing() -> Result<Option<Tree>> {
        Self::open_at(root())
    }

    fn open_at(path: PathBuf) -> Result<Option<Tree>> {
        let fd = match rustix::fs::open(&path, OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(Errno::LOOP | Errno::NOTDIR) => {
                let meta = fs::symlink_metadata(&path)?;
                check_entry(&path, &meta)?;
                bail!("{} is not a directory: remove it and run again", path.display());
            }
            Err(Errno::ACCESS) => bail!(
                "{} is root's alone: run sfunnel as root (or with CAP_DAC_OVERRIDE besides its other capabilities)",
                path.display()
            ),
            Err(e) => return Err(io::Error::from(e)).with_context(|| format!("opening {}", path.display())),
        };
        let dir = File::from(fd);
        let meta = dir.metadata()?;
        check_entry(&path, &meta)?;
        if meta.mode() & 0o077 != 0 {
            dir.set_permissions(fs::Permissions::from_mode(0o700))
                .with_context(|| format!("making {} root's alone (mode 0700)", path.display()))?;
            event!("tree_tightened", path = path.display(), was = format!("{:o}", meta.mode() & 0o777));
        }
        let tree = Tree { path, dir };
        tree.check_contents()?;
        Ok(Some(tree))
    }

    /// Every entry under the tree must be root's and no symbolic link.
    fn check_contents(&self) -> Result<()> {
        // It runs before the lock is taken: what another sfunnel removes
        // meanwhile (a dead link's pin, its directory) is skipped.
        let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
        let mut stack = vec![self.path.clone()];
        while let Some(d) = stack.pop() {
            let entries = match fs::read_dir(&d) {
                Err(e) if gone(&e) && d != self.path => continue,
                r => r.with_context(|| format!("reading {}", d.display()))?,
            };
            for e in entries {
                let e = e?;
                let meta = match e.metadata() {
                    Err(err) if gone(&err) => continue,
                    r => r?,
                };
                check_entry(&e.path(), &meta)
                    .with_context(|| format!("{} holds something sfunnel did not make", self.path.display()))?;
                if meta.is_dir() {
                    stack.push(e.path());
                }
            }
        }
        Ok(())
    }

    /// Takes the lock every sfunnel on the node shares, waiting up to
    /// `timeout` for it (saying so after a second).  Past that, the error
    /// names the processes that hold it.
    pub fn lock(&self, timeout: Duration) -> Result<Lock> {
        let fd = self.dir.try_clone().context("duplicating the tree's descriptor")?;
        let started = Instant::now();
        let mut said = false;
        loop {
            match rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {
                    if said {
                        errln!("sfunnel: got the lock after {:.1} s", started.elapsed().as_secs_f64());
                    }
                    return Ok(Lock { _file: fd });
                }
                Err(Errno::WOULDBLOCK) => {}
                Err(e) => return Err(io::Error::from(e)).with_context(|| format!("locking {}", self.path.display())),
            }
            if started.elapsed() >= timeout {
                bail!(
                    "gave up waiting for the lock on {} after {:.0} s: {}; if that is a stuck sfunnel, end it, \
                     or wait longer (--lock-timeout, $SFUNNEL_LOCK_TIMEOUT)",
                    self.path.display(),
                    timeout.as_secs_f64(),
                    self.holders()
                );
            }
            if !said && started.elapsed() >= Duration::from_secs(1) {
                errln!(
                    "sfunnel: waiting for the lock on {} ({}), for up to {:.0} s",
                    self.path.display(),
                    self.holders(),
                    timeout.as_secs_f64()
                );
                said = true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Who holds a flock on the tree, from /proc/locks (pids as this
    /// process's PID namespace sees them; 0 or -1 for one it cannot see).
    fn holders(&self) -> String {
        let ino = self.dir.metadata().map(|m| m.ino()).unwrap_or(0);
        let locks = fs::read_to_string("/proc/locks").unwrap_or_default();
        let pids: Vec<String> = locks
            .lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                // "1: FLOCK  ADVISORY  WRITE 1234 00:1e:5678 0 EOF" ("->" marks a waiter).
                let w: Vec<&str> = w.into_iter().filter(|x| *x != "->").collect();
                let (kind, pid, dev_ino) = (w.get(1)?, w.get(4)?, w.get(5)?);
                (*kind == "FLOCK" && dev_ino.rsplit(':').next()? == ino.to_string()).then(|| pid.to_string())
            })
            .collect();
        if pids.is_empty() {
            return "held by a process this one cannot see".into();
        }
        let who: Vec<String> = pids
            .iter()
            .map(|p| {
                let cmd = fs::read(format!("/proc/{p}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").trim().to_string())
                    .unwrap_or_default();
                if cmd.is_empty() {
                    format!("pid {p}")
                } else {
                    format!("pid {p} ({cmd})")
                }
            })
            .collect();
        format!("held by {}", who.join(", "))
    }

    fn netns_dir(&self, cookie: u64) -> PathBuf {
        self.path.join(TCX).join(cookie.to_string())
    }

    fn link_path(&self, key: &LinkKey) -> PathBuf {
        self.netns_dir(key.netns_cookie).join(key.file_name())
    }

    /// Pins the TCX link `link` under `key`.  A pin already there is an
    /// error: a link is replaced by updating it, never by pinning over it.
    pub fn pin_link(&self, key: &LinkKey, link: BorrowedFd<'_>) -> Result<()> {
        let dir = self.netns_dir(key.netns_cookie);
        for d in [self.path.join(TCX), dir] {
            match rustix::fs::mkdir(&d, Mode::RWXU) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(io::Error::from(e)).with_context(|| format!("creating {}", d.display())),
            }
        }
        let path = self.link_path(key);
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).context("a pin path with a NUL byte")?;
        // SAFETY: link is a valid fd; c is a NUL-terminated path.
        let rc = unsafe { libbpf_sys::bpf_obj_pin(link.as_raw_fd(), c.as_ptr()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(-rc)).with_context(|| format!("pinning {}", path.display()));
        }
        event!("pinned", pin = path.display());
        Ok(())
    }

    /// The TCX link pinned under `key`, if any.
    pub fn open_link(&self, key: &LinkKey) -> Result<Option<OwnedFd>> {
        open_pinned(&self.link_path(key))
    }

    /// Removes the pin under `key` (not there: nothing to do).  The link
    /// goes, and detaches, once nothing else holds it.
    pub fn unpin_link(&self, key: &LinkKey) -> Result<()> {
        let path = self.link_path(key);
        match fs::remove_file(&path) {
            Ok(()) => event!("unpinned", pin = path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing the pin {}", path.display())),
        }
        // The namespace's directory goes when its last pin does.
        let _ = fs::remove_dir(self.netns_dir(key.netns_cookie));
        Ok(())
    }

    /// Every pinned TCX link, with what it is now.
    pub fn links(&self) -> Vec<(LinkKey, LinkState)> {
        let mut out = Vec::new();
        for ns in fs::read_dir(self.path.join(TCX)).into_iter().flatten().flatten() {
            let Some(cookie) = ns.file_name().to_str().and_then(|c| c.parse().ok()) else { continue };
            for e in fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                let Some(key) = e.file_name().to_str().and_then(|n| LinkKey::parse(cookie, n)) else { continue };
                let state = match open_pinned(&e.path()) {
                    Ok(Some(fd)) => match crate::objects::link_info(fd.as_fd()) {
                        Ok(i) if i.ifindex == 0 => LinkState::Dead(i),
                        Ok(i) => LinkState::Live(i),
                        Err(e) => LinkState::Unreadable(format!("{e:#}")),
                    },
                    Ok(None) => continue,
                    Err(e) => LinkState::Unreadable(format!("{e:#}")),
                };
                out.push((key, state));
            }
        }
        out.sort_by_key(|(k, _)| *k);
        out
    }

    /// What is provably dead, from the kernel's objects alone: TCX links
    /// hooked on nothing, with the detour link of the same attachment (its
    /// program holds the same maps); a detour link whose attachment's own
    /// was never pinned (a load that ended halfway); and earlier-layout
    /// pins whose TCX link is hooked on nothing; each with why.  Needs no namespace: from a
    /// pod it finds the same.
    pub fn dead(&self) -> Vec<(Dead, String)> {
        let mut out = Vec::new();
        let links = self.links();
        let dead_main: Vec<LinkKey> =
            links.iter().filter(|(k, s)| !k.detour && matches!(s, LinkState::Dead(_))).map(|(k, _)| *k).collect();
        for (key, state) in &links {
            let why = match state {
                LinkState::Dead(_) if key.detour => "its helper interface is gone",
                LinkState::Dead(_) => "its interface is gone",
                _ if key.detour && dead_main.contains(&LinkKey { detour: false, ..*key }) => {
                    "its attachment's interface is gone"
                }
                // A load pins the detour's link first and its program's
                // last, under the lock: one without the other is what a
                // load that ended halfway left.
                _ if key.detour && !links.iter().any(|(k, _)| *k == LinkKey { detour: false, ..*key }) => {
                    "a load that ended halfway hooked it, and never its attachment's program"
                }
                _ => continue,
            };
            out.push((Dead::Link(*key), why.to_string()));
        }
        for l in self.legacy() {
            if let LegacyState::Dead(why) = self.legacy_state(&l) {
                out.push((Dead::Legacy(l), why));
            }
        }
        out
    }

    /// Where a dead thing is pinned, for messages.
    pub fn describe(&self, d: &Dead) -> String {
        match d {
            Dead::Link(k) => self.link_path(k).display().to_string(),
            Dead::Legacy(l) => self.legacy_dir(l).display().to_string(),
        }
    }

    /// Removes one thing [`Tree::dead`] found.
    pub fn remove(&self, d: &Dead) -> Result<()> {
        match d {
            Dead::Link(k) => self.unpin_link(k),
            Dead::Legacy(l) => self.remove_legacy(l),
        }
    }

    /// Removes everything [`Tree::dead`] finds; returns what, and why.
    /// Problems are reported and passed over: this only frees memory.
    pub fn sweep(&self) -> Vec<(String, String)> {
        let mut removed = Vec::new();
        for (d, why) in self.dead() {
            let what = self.describe(&d);
            match self.remove(&d) {
                Ok(()) => {
                    event!("swept", pin = what, why = why);
                    removed.push((what, why));
                }
                Err(e) => errln!("warning: removing {what} ({why}): {e:#}"),
            }
        }
        removed
    }

    fn legacy_dir(&self, l: &Legacy) -> PathBuf {
        self.path.join(format!("netns-{}", l.netns_ino)).join(&l.iface).join(l.direction.as_str())
    }

    /// Every pin directory of the earlier layout.
    pub fn legacy(&self) -> Vec<Legacy> {
        let mut out = Vec::new();
        for ns in fs::read_dir(&self.path).into_iter().flatten().flatten() {
            let name = ns.file_name().to_string_lossy().into_owned();
            let Some(ino) = name.strip_prefix("netns-").and_then(|i| i.parse().ok()) else { continue };
            for ifc in fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                for direction in [Direction::Ingress, Direction::Egress] {
                    if ifc.path().join(direction.as_str()).is_dir() {
                        let iface = ifc.file_name().to_string_lossy().into_owned();
                        out.push(Legacy { netns_ino: ino, iface, direction });
                    }
                }
            }
        }
        out
    }

    pub fn legacy_state(&self, l: &Legacy) -> LegacyState {
        let dir = self.legacy_dir(l);
        match open_pinned(&dir.join("link")) {
            Ok(Some(fd)) => match crate::objects::link_info(fd.as_fd()) {
                Ok(i) if i.ifindex == 0 => LegacyState::Dead("its TCX link is hooked on nothing".into()),
                _ => LegacyState::Unproven,
            },
            _ => LegacyState::Unproven,
        }
    }

    /// The TCX links an earlier layout pinned for `l`: (its own, its detour's).
    pub fn legacy_links(&self, l: &Legacy) -> (Option<OwnedFd>, Option<OwnedFd>) {
        let dir = self.legacy_dir(l);
        (open_pinned(&dir.join("link")).ok().flatten(), open_pinned(&dir.join("detour_link")).ok().flatten())
    }

    /// Removes an earlier layout's pins of `l`, and its directories once
    /// empty.  Its TCX links detach when their pins go (unless held).
    pub fn remove_legacy(&self, l: &Legacy) -> Result<()> {
        let dir = self.legacy_dir(l);
        for e in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = e?.path();
            fs::remove_file(&p).with_context(|| format!("removing the pin {}", p.display()))?;
        }
        fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
        for p in [dir.parent(), dir.parent().and_then(Path::parent)].into_iter().flatten() {
            let _ = fs::remove_dir(p);
        }
        event!("unpinned", pins = dir.display(), layout = "earlier");
        Ok(())
    }
}

/// A pinned BPF object; None if nothing is pinned there.  Paths under the
/// tree hold no symbolic link ([`Tree::open`] checked), so none is
/// followed.
fn open_pinned(path: &Path) -> Result<Option<OwnedFd>> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => bail!("{} is a symbolic link; sfunnel follows none", path.display()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).context("a pin path with a NUL byte")?;
    // SAFETY: c is a NUL-terminated path.
    let fd = unsafe { libbpf_sys::bpf_obj_get(c.as_ptr()) };
    if fd == -libc::ENOENT {
        return Ok(None);
    }
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(-fd)).with_context(|| format!("opening the pin {}", path.display()));
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The lock over sfunnel's tree, released when dropped.
pub struct Lock {
    _file: File,
}
