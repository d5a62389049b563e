//! The segmentation detour's helper veth pair (bpf/detour.h).
//!
//! An attachment whose ruleset funnels owns one pair in its network
//! namespace, named after its direction (e or i) and the interface's index:
//!
//! ```text
//!   sf{e,i}g<ifindex>   GSO packets (and packets whose checksum is owed)
//!                       are redirected out of it; gso_max_segs 1 and no
//!                       transmit checksum offload, so the kernel segments
//!                       them and completes their checksums on the way out
//!   sf{e,i}s<ifindex>   its peer: the segments come in here, where the
//!                       detour program funnels them and sends them back
//!                       to the interface
//! ```
//!
//! `load` makes the pair (a rerun keeps the one it made before), `unload`
//! deletes it, and a load in the namespace deletes a pair whose interface
//! is gone ([`remove_orphans`]); a namespace takes its pairs with it when
//! it goes.  Both ends have no addresses, IPv6 off and the largest MTU, so
//! they carry nothing but detoured packets, of any size the interface
//! sends, and the alias [`ALIAS`], so that `ip link` says what they are.
//!
//! The pair is made and found through rtnetlink (src/netlink.rs), so the
//! static binary needs no `ip` command on the host.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context, Result};

use crate::attach::Direction;
use crate::log::event;

/// The names of the pair for the attachment on the interface with index
/// `ifindex` in direction `d`: (the end GSO packets go out of, the end
/// segments come in on).
pub fn names(ifindex: u32, d: Direction) -> (String, String) {
    let d = match d {
        Direction::Egress => 'e',
        Direction::Ingress => 'i',
    };
    (format!("sf{d}g{ifindex}"), format!("sf{d}s{ifindex}"))
}

/// Both ends' alias (`ip link` shows it), by which sfunnel knows its own
/// helpers (and leaves them out of "every interface").
pub const ALIAS: &str = "sfunnel segmentation detour";

/// The direction and the served interface's index that a helper's name
/// says, if `name` is named as [`names`] names helpers.
pub fn parse_name(name: &str) -> Option<(Direction, u32)> {
    let rest = name.strip_prefix("sf")?;
    let d = match rest.as_bytes().first()? {
        b'e' => Direction::Egress,
        b'i' => Direction::Ingress,
        _ => return None,
    };
    let num = rest[1..].strip_prefix('g').or_else(|| rest[1..].strip_prefix('s'))?;
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((d, num.parse().ok()?))
}

/// Whether the interface `l` is one of sfunnel's helpers: named as
/// helpers are, and a veth that carries [`ALIAS`] (or, made by an earlier
/// build, no alias at all).
pub fn is_helper(l: &Link) -> bool {
    parse_name(&l.name).is_some() && l.kind.as_deref() == Some("veth") && l.alias.as_deref().is_none_or(|a| a == ALIAS)
}

/// Deletes this namespace's helper pairs whose interface is gone (its
/// index names no interface that is not a helper).  Such a pair holds its
/// detour program, and through it the attachment's maps, for nothing.
/// Returns the pairs deleted.
pub fn remove_orphans() -> Result<Vec<String>> {
    let links = Netlink::open()?.links().context("listing the namespace's interfaces")?;
    let served: Vec<u32> = links.iter().filter(|l| !is_helper(l)).map(|l| l.index).collect();
    let mut removed = Vec::new();
    for l in links.iter().filter(|l| is_helper(l)) {
        let Some((d, dev)) = parse_name(&l.name) else { continue };
        if served.contains(&dev) {
            continue;
        }
        if remove(dev, d)? {
            let (o, i) = names(dev, d);
            event!("helper_orphan_removed", pair = format!("{o}/{i}"), why = "its interface is gone");
            removed.push(format!("{o}/{i}"));
        }
    }
    Ok(removed)
}

/// The pair's interface indexes: (out, in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair {
    pub out: u32,
    pub inn: u32,
}

use crate::netlink::{index_of, Link, Netlink};

/// The pair of the interface `ifindex`, if it exists whole: both names,
/// each the other's peer.  (Asked of rtnetlink: /sys shows the namespace
/// it was mounted in, which need not be ours.)
pub fn find(ifindex: u32, d: Direction) -> Option<Pair> {
    let (o, i) = names(ifindex, d);
    let (out, inn) = (index_of(&o)?, index_of(&i)?);
    let nl = Netlink::open().ok()?;
    (nl.link(out).ok()?.peer == Some(inn) && nl.link(inn).ok()?.peer == Some(out)).then_some(Pair { out, inn })
}

/// Makes the pair of `ifindex` afresh: whatever holds its names (an old
/// pair, half of one) goes first.
pub fn create(ifindex: u32, d: Direction) -> Result<Pair> {
    remove(ifindex, d)?;
    let (o, i) = names(ifindex, d);
    let nl = Netlink::open()?;
    nl.create_pair(&o, &i).with_context(|| {
        format!(
            "creating the helper veth pair {o}/{i} for the segmentation detour: sfunnel needs CAP_NET_ADMIN \
             in the target namespace and a kernel with veth (CONFIG_VETH)"
        )
    })?;
    let made = (|| -> Result<Pair> {
        for name in [&o, &i] {
            disable_ipv6(name)?;
        }
        let p = find(ifindex, d).with_context(|| format!("the new helper pair {o}/{i} is not there"))?;
        complete_checksums(p.out, &o)?;
        nl.set_alias(p.out, ALIAS)?;
        nl.set_alias(p.inn, ALIAS)?;
        nl.set_up(p.out)?;
        nl.set_up(p.inn)?;
        Ok(p)
    })();
    match made {
        Ok(p) => {
            event!("helper_created", pair = format!("{o}/{i}"), ifindexes = format!("{}/{}", p.out, p.inn));
            Ok(p)
        }
        Err(e) => {
            let _ = remove(ifindex, d);
            Err(e)
        }
    }
}

/// Deletes the pair of `ifindex` (either end takes the other with it).
/// A pair that is not there is not an error.
pub fn remove(ifindex: u32, d: Direction) -> Result<bool> {
    let (o, i) = names(ifindex, d);
    let mut removed = false;
    for name in [&o, &i] {
        if let Some(idx) = index_of(name) {
            match Netlink::open()?.delete(idx) {
                Ok(()) => removed = true,
                // Its peer was deleted a moment ago, and it with it.
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
                Err(e) => return Err(e).with_context(|| format!("deleting the helper interface {name}")),
            }
        }
    }
    if removed {
        event!("helper_removed", pair = format!("{o}/{i}"));
    }
    Ok(removed)
}

/// How segments come back from the detour on egress (`--detour-return`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DetourReturn {
    /// Straight into the veth peer's receive path where `peer_return`
    /// allows it, else out of the interface.
    #[default]
    Auto,
    /// Always out of the interface, through its transmit path.
    Transmit,
}

impl DetourReturn {
    /// The value as `--detour-return` and $DETOUR_RETURN spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            DetourReturn::Auto => "auto",
            DetourReturn::Transmit => "transmit",
        }
    }
}

/// Whether segments can go back from the detour straight into the receive
/// path of the peer of the interface `ifindex` (bpf/detour.h,
/// SFUNNEL_DETOUR_PEER) instead of out through its transmit path.  Only
/// for a veth whose peer is in another namespace (the kernel drops the
/// packet otherwise), with no queue on the transmit path that the
/// segments would miss.  (Checksums need nothing from that path: the
/// helper completed them.)  Anything that cannot be asked says no: the
/// transmit path always works.
pub fn peer_return(ifindex: u32) -> bool {
    let link = Netlink::open().and_then(|nl| Ok(nl.link(ifindex)?));
    matches!(link, Ok(l) if l.kind.as_deref() == Some("veth") && l.peer_netns && l.qdisc.as_deref() == Some("noqueue"))
}

/// Whether the interface offloads transmit checksums (`ethtool -k`
/// tx-checksumming; a veth's only one is tx-checksum-ip-generic).
pub fn tx_checksumming(ifindex: u32) -> bool {
    const ETHTOOL_GTXCSUM: u32 = 0x16;
    ethtool_value(ifindex, ETHTOOL_GTXCSUM, 0).is_ok_and(|v| v != 0)
}

/// Turns transmit checksum offload off on the helper end GSO packets and
/// packets whose checksum is owed go out of (`ethtool -K DEV tx off`), so
/// that the kernel completes every checksum there, before the detour
/// program funnels the packet (bpf/csum_state.h).
pub fn complete_checksums(ifindex: u32, name: &str) -> Result<()> {
    const ETHTOOL_STXCSUM: u32 = 0x17;
    ethtool_value(ifindex, ETHTOOL_STXCSUM, 0)
        .with_context(|| format!("turning transmit checksum offload off on the helper interface {name}"))?;
    anyhow::ensure!(!tx_checksumming(ifindex), "the helper interface {name} kept transmit checksum offload on");
    Ok(())
}

/// One legacy ethtool ioctl on the interface `ifindex` that gets or sets a
/// value (`struct ethtool_value`); returns the value after the call.  The
/// socket is the rtnetlink one that looked the name up: any socket takes
/// device ioctls, and netlink ones close at once (src/netlink.rs).
fn ethtool_value(ifindex: u32, cmd: u32, data: u32) -> Result<u32> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut v = EthtoolValue { cmd, data };
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let nl = Netlink::open()?;
    let name = nl.link(ifindex)?.name;
    for (d, b) in ifr.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *d = b as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut v as *mut EthtoolValue).cast();
    // SAFETY: SIOCETHTOOL with an ifreq whose data points at an ethtool
    // value that outlives the call.
    if unsafe { libc::ioctl(nl.as_fd().as_raw_fd(), libc::SIOCETHTOOL, &mut ifr) } != 0 {
        return Err(io::Error::last_os_error().into());
    }
    Ok(v.data)
}

/// The way segments go back from the detour, as a detour record's flags
/// choose it (bpf/sfunnel.h); `status --json` and the log spell it in
/// lowercase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Back {
    /// Into the interface's receive path (an ingress attachment).
    Receive,
    /// Straight into its veth peer's receive path.
    Peer,
    /// Out of it, through its transmit path.
    Transmit,
}

impl Back {
    pub fn of(flags: u32) -> Back {
        use crate::datapath::consts::{SFUNNEL_DETOUR_INGRESS, SFUNNEL_DETOUR_PEER};
        if flags & SFUNNEL_DETOUR_INGRESS != 0 {
            Back::Receive
        } else if flags & SFUNNEL_DETOUR_PEER != 0 {
            Back::Peer
        } else {
            Back::Transmit
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Back::Receive => "receive",
            Back::Peer => "peer",
            Back::Transmit => "transmit",
        }
    }

    /// Where the segments go, as `status` words it.
    pub fn describe(self) -> &'static str {
        match self {
            Back::Receive => "into the interface's receive path",
            Back::Peer => "straight into the veth peer",
            Back::Transmit => "out of the interface",
        }
    }
}

/// No IPv6 on a helper end: no link-local address, so no neighbour or
/// multicast chatter.  Nothing to do where IPv6 is absent.
fn disable_ipv6(name: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    match std::fs::write(&path, "1") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("writing {path}")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn helper_names_parse_back() {
        use crate::attach::Direction::{Egress, Ingress};
        for (d, i) in [(Egress, 7u32), (Ingress, 4294967295)] {
            let (o, n) = super::names(i, d);
            assert_eq!((super::parse_name(&o), super::parse_name(&n)), (Some((d, i)), Some((d, i))));
        }
        for not in ["sfeg", "sfexg1", "sfeg1x", "sfxg1", "eth0", "sfes-1", "sfeg99999999999"] {
            assert_eq!(super::parse_name(not), None, "{not}");
        }
    }

    #[test]
    fn helper_names_fit_ifnamsiz_for_any_index() {
        use crate::attach::Direction::{Egress, Ingress};
        let names = [super::names(u32::MAX, Egress), super::names(u32::MAX, Ingress)];
        assert_eq!(
            names,
            [("sfeg4294967295".into(), "sfes4294967295".into()), ("sfig4294967295".into(), "sfis4294967295".into())]
        );
        assert!(names.iter().all(|(o, i)| o.len() < libc::IFNAMSIZ && i.len() < libc::IFNAMSIZ));
    }
}
