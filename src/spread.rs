//! Spreading the segmentation detour's segments over CPUs
//! (`--detour-cpus`, docs/design.md "The segmentation detour").
//!
//! A segment reaches the detour's far end by veth, which queues it on a
//! CPU's backlog: without more, the sending CPU's.  That CPU then funnels
//! every segment and carries each on through the namespaces behind it, while
//! another CPU may sit idle.  Receive packet steering (RPS) on the far end
//! hands the segments to the CPUs of a mask instead, chosen per flow by the
//! packet's hash, so a flow keeps its order.  The mask is the far end's
//! `queues/rx-N/rps_cpus` in sysfs: there is no netlink attribute for it.
//!
//! /sys shows the network namespace it was mounted in, which need not be
//! the helper's.  So the mask is written through a sysfs of the helper's
//! namespace that is mounted nowhere (`detached_sysfs`).

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};

const ONLINE: &str = "/sys/devices/system/cpu/online";

/// The CPUs that funnel a detour's segments.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DetourCpus {
    /// Every online CPU (that the kernel lets RPS use: not isolated ones).
    #[default]
    All,
    /// The CPU that sent the packet, as without RPS.
    Sender,
    /// These, each online (checked when the option is read).
    List(Vec<u32>),
}

impl FromStr for DetourCpus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "all" => Ok(DetourCpus::All),
            "sender" => Ok(DetourCpus::Sender),
            list => {
                let want = parse_cpulist(list).map_err(|e| {
                    format!("{e}: give `all`, `sender`, or a list of CPUs such as 0-3,8 (as taskset -c takes)")
                })?;
                let online = online_cpus().map_err(|e| format!("{e:#}"))?;
                if let Some(c) = want.iter().find(|c| !online.contains(c)) {
                    return Err(format!(
                        "CPU {c} is not online (online: {}): give CPUs from that list, or `all`",
                        cpulist(&online)
                    ));
                }
                Ok(DetourCpus::List(want))
            }
        }
    }
}

impl fmt::Display for DetourCpus {
    /// As `--detour-cpus` and $DETOUR_CPUS spell it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DetourCpus::All => f.write_str("all"),
            DetourCpus::Sender => f.write_str("sender"),
            DetourCpus::List(l) => f.write_str(&cpulist(l)),
        }
    }
}

impl DetourCpus {
    /// The CPUs to steer to (empty: none, the sender keeps them).
    fn cpus(&self) -> Result<Vec<u32>> {
        match self {
            DetourCpus::All => online_cpus(),
            DetourCpus::Sender => Ok(Vec::new()),
            DetourCpus::List(l) => Ok(l.clone()),
        }
    }
}

/// "0-3,8" → [0, 1, 2, 3, 8], sorted, without repeats.
pub fn parse_cpulist(s: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let num = |n: &str| n.trim().parse::<u32>().map_err(|_| format!("`{n}` in `{s}` is not a CPU number"));
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if lo > hi || hi >= 8192 {
            return Err(format!("`{part}` in `{s}` is not a range of CPUs"));
        }
        out.extend(lo..=hi);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// [0, 1, 2, 3, 8] → "0-3,8".
pub fn cpulist(cpus: &[u32]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { cpus[i].to_string() } else { format!("{}-{}", cpus[i], cpus[j]) });
        i = j + 1;
    }
    parts.join(",")
}

fn online_cpus() -> Result<Vec<u32>> {
    let s = std::fs::read_to_string(ONLINE).with_context(|| format!("reading {ONLINE} (the online CPUs)"))?;
    parse_cpulist(s.trim()).map_err(|e| anyhow!("{ONLINE}: {e}"))
}

/// The mask as sysfs reads and writes CPU bitmaps: hex words of 32 CPUs,
/// the highest first, comma-separated.  [] → "0".
pub fn rps_mask(cpus: &[u32]) -> String {
    let Some(&max) = cpus.iter().max() else {
        return "0".into();
    };
    let mut words = vec![0u32; max as usize / 32 + 1];
    for &c in cpus {
        words[c as usize / 32] |= 1 << (c % 32);
    }
    words.iter().rev().map(|w| format!("{w:08x}")).collect::<Vec<_>>().join(",")
}

/// Sets the CPUs that take the segments coming in on the helper end `name`
/// (index `ifindex`) of the calling thread's network namespace.  Returns
/// what was set, as `cpulist` words it ("" for the sender's CPU).
pub fn set(name: &str, ifindex: u32, cpus: &DetourCpus) -> Result<String> {
    let list = cpus.cpus()?;
    let mask = rps_mask(&list);
    let written = match detached_sysfs() {
        Ok(root) => write_queues(root.as_fd(), "", name, &mask),
        // No mounting here (a container's seccomp profile, say): /sys
        // will do if it shows this namespace, as a container's does.
        Err(_) if shows_us(name, ifindex) => write_queues(rustix::fs::CWD, "/sys/", name, &mask),
        Err(e) => Err(anyhow!(e).context("mounting a sysfs of the helper's namespace")),
    };
    written.map(|()| cpulist(&list)).map_err(|e| {
        let what = if list.is_empty() {
            format!("turning off the steering of the detour's segments (RPS mask 0 on {name})")
        } else {
            format!(
                "steering the detour's segments to CPUs {} (RPS mask {mask} on {name}): the kernel needs \
                 CONFIG_RPS, and sfunnel CAP_SYS_ADMIN to mount sysfs; `--detour-cpus sender` does without",
                cpulist(&list)
            )
        };
        e.context(what)
    })
}

/// A sysfs of the calling thread's network namespace, attached nowhere:
/// fsopen and fsmount (Linux 5.2) make a detached mount that only the
/// returned descriptor reaches, and that goes when it is closed.  So no
/// mount namespace sees it, and no mount point is needed (a chroot has
/// none to spare).
fn detached_sysfs() -> io::Result<OwnedFd> {
    use rustix::mount::{fsconfig_create, fsmount, fsopen, FsMountFlags, FsOpenFlags, MountAttrFlags};
    let fs = fsopen("sysfs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_create(&fs)?;
    Ok(fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())?)
}

/// Whether `/sys/class/net/<name>` is the interface `ifindex` of the
/// calling thread's namespace.
fn shows_us(name: &str, ifindex: u32) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .is_ok_and(|s| s.trim().parse::<u32>().ok() == Some(ifindex))
}

/// Writes `mask` to rps_cpus of every receive queue of `name`, under
/// `base` (a sysfs root: "" from the directory `dir`, or "/sys/").
fn write_queues(dir: BorrowedFd<'_>, base: &str, name: &str, mask: &str) -> Result<()> {
    use rustix::fs::{openat, Mode, OFlags};
    let mut n = 0;
    loop {
        let rel = format!("{base}class/net/{name}/queues/rx-{n}/rps_cpus");
        let mut f = match openat(dir, rel.as_str(), OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty()) {
            Ok(f) => File::from(f),
            Err(rustix::io::Errno::NOENT) => break,
            Err(e) => return Err(io::Error::from(e)).with_context(|| format!("opening {rel}")),
        };
        match f.write_all(mask.as_bytes()) {
            Ok(()) => n += 1,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => bail!(
                "{rel} refused mask {mask}: the kernel keeps RPS off isolated CPUs (isolcpus, nohz_full), so \
                 give housekeeping ones"
            ),
            Err(e) => return Err(e).with_context(|| format!("writing {rel}")),
        }
    }
    // No steering asked for, and none to be had (no CONFIG_RPS): done.
    if n == 0 && mask != "0" {
        bail!("{name} has no receive queue with rps_cpus");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_as_taskset_writes_them() {
        assert_eq!(parse_cpulist("0-3,8"), Ok(vec![0, 1, 2, 3, 8]));
        assert_eq!(parse_cpulist("5, 1-2,2"), Ok(vec![1, 2, 5]));
        assert!(parse_cpulist("3-1").is_err());
        assert!(parse_cpulist("x").is_err());
        assert!(parse_cpulist("").is_err());
        assert_eq!(cpulist(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
    }

    #[test]
    fn masks_are_32_cpu_words_highest_first() {
        assert_eq!(rps_mask(&[]), "0");
        assert_eq!(rps_mask(&[0, 1]), "00000003");
        assert_eq!(rps_mask(&[1, 33]), "00000002,00000002");
        assert_eq!(rps_mask(&[31, 64]), "00000001,00000000,80000000");
    }
}
