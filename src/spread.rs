//! Spreading the segmentation detour's segments over CPUs
//! (`--detour-cpus`, README "Funneling GSO packets").
//!
//! A segment reaches the detour's far end by veth, which queues it on a
//! CPU's backlog: without more, the sending CPU's.  That CPU then funnels
//! every segment and carries each on through the namespaces behind it, while
//! another CPU may sit idle.  Receive packet steering (RPS) on the far end
//! hands the segments to the CPUs of a mask instead, chosen per flow by the
//! packet's hash, so a flow keeps its order.  The mask is the far end's
//! `queues/rx-N/rps_cpus` in sysfs: there is no netlink attribute for it.
//!
//! /sys shows the network namespace it was mounted in.  For a helper in
//! another one, a thread of our own with a private mount namespace mounts a
//! sysfs of the helper's namespace over /sys, writes the mask and ends; the
//! mount goes with it and nothing else sees it.

use std::fmt;
use std::fs::File;
use std::path::Path;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use nix::mount::{mount, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

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
    let ns = File::open("/proc/thread-self/ns/net").context("opening /proc/thread-self/ns/net")?;
    // Ok(written) once sysfs is mounted; Err(why not) before.
    let via_mount = std::thread::scope(|s| {
        s.spawn(|| -> Result<Result<()>> {
            setns(&ns, CloneFlags::CLONE_NEWNET).context("entering the helper's network namespace")?;
            // This thread's own mount namespace: the sysfs below stays in it.
            unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_FS).context("unsharing the mount namespace")?;
            mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
                .context("making the mounts private")?;
            mount(
                Some("sysfs"),
                "/sys",
                Some("sysfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                None::<&str>,
            )
            .context("mounting a sysfs of the helper's namespace")?;
            Ok(write_queues(Path::new("/sys"), name, &mask))
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow!("the thread that mounts sysfs panicked")))
    });
    match via_mount {
        Ok(written) => written,
        // No mounting here (a container's profile, say): /sys will do if it
        // shows this namespace, as a container's does.
        Err(_) if shows_us(name, ifindex) => write_queues(Path::new("/sys"), name, &mask),
        Err(e) => Err(e),
    }
    .map(|()| cpulist(&list))
    .map_err(|e| {
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

/// Whether `/sys/class/net/<name>` is the interface `ifindex` of the
/// calling thread's namespace.
fn shows_us(name: &str, ifindex: u32) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .is_ok_and(|s| s.trim().parse::<u32>().ok() == Some(ifindex))
}

fn write_queues(sys: &Path, name: &str, mask: &str) -> Result<()> {
    let queues = sys.join("class/net").join(name).join("queues");
    let mut n = 0;
    for q in std::fs::read_dir(&queues).with_context(|| format!("listing {}", queues.display()))? {
        let q = q?;
        if !q.file_name().to_string_lossy().starts_with("rx-") {
            continue;
        }
        let f = q.path().join("rps_cpus");
        if !f.exists() {
            continue;
        }
        match std::fs::write(&f, mask) {
            Ok(()) => n += 1,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                bail!(
                    "{} refused mask {mask}: the kernel keeps RPS off isolated CPUs (isolcpus, nohz_full), \
                     so give housekeeping ones",
                    f.display()
                )
            }
            Err(e) => return Err(e).with_context(|| format!("writing {}", f.display())),
        }
    }
    // No steering asked for, and none to be had: done.
    if n == 0 && mask != "0" {
        bail!("{} has no receive queue with rps_cpus", queues.display());
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
