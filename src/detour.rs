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
//! rtnetlink is spoken directly (a few fixed messages), so the static
//! binary needs no `ip` command on the host.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

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

/// Whether the interface `index` called `name` is one of sfunnel's
/// helpers: named as helpers are, and a veth that carries [`ALIAS`] (or,
/// made by an earlier build, no alias at all).
pub fn is_helper(name: &str, index: u32) -> bool {
    parse_name(name).is_some()
        && Netlink::open()
            .and_then(|nl| Ok(nl.link(index)?))
            .is_ok_and(|l| l.kind.as_deref() == Some("veth") && l.alias.as_deref().is_none_or(|a| a == ALIAS))
}

/// Deletes this namespace's helper pairs whose interface is gone (its
/// index names no interface that is not a helper).  Such a pair holds its
/// detour program, and through it the attachment's maps, for nothing.
/// Returns the pairs deleted.
pub fn remove_orphans() -> Result<Vec<String>> {
    let all = nix::net::if_::if_nameindex().context("listing the namespace's interfaces")?;
    let links: Vec<(String, u32)> = all.iter().map(|i| (i.name().to_string_lossy().into_owned(), i.index())).collect();
    let served: Vec<u32> = links.iter().filter(|(n, i)| !is_helper(n, *i)).map(|(_, i)| *i).collect();
    let mut removed = Vec::new();
    for (name, index) in &links {
        let Some((d, dev)) = parse_name(name) else { continue };
        if served.contains(&dev) || !is_helper(name, *index) {
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

fn index_of(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

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
/// value (`struct ethtool_value`); returns the value after the call.
fn ethtool_value(ifindex: u32, cmd: u32, data: u32) -> io::Result<u32> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut v = EthtoolValue { cmd, data };
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: ifr_name has IFNAMSIZ bytes, as if_indextoname requires.
    if unsafe { libc::if_indextoname(ifindex, ifr.ifr_name.as_mut_ptr()) }.is_null() {
        return Err(io::Error::last_os_error());
    }
    ifr.ifr_ifru.ifru_data = (&mut v as *mut EthtoolValue).cast();
    // SAFETY: plain socket(2); the fd is owned right after.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: SIOCETHTOOL with an ifreq whose data points at an ethtool
    // value that outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCETHTOOL, &mut ifr) } != 0 {
        return Err(io::Error::last_os_error());
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

// rtnetlink, just enough of it.
use libc::{
    IFLA_GSO_MAX_SEGS, IFLA_IFNAME, IFLA_INFO_DATA, IFLA_INFO_KIND, IFLA_LINKINFO, IFLA_LINK_NETNSID, IFLA_MTU,
    IFLA_QDISC,
};
/// linux/veth.h (not in the libc crate).
const VETH_INFO_PEER: u16 = 1;

/// What `Netlink::link` reports.
#[derive(Debug, Default)]
struct Link {
    /// IFLA_LINK: a veth's peer.
    peer: Option<u32>,
    /// IFLA_LINK_NETNSID is there: the peer is in another namespace.
    peer_netns: bool,
    /// IFLA_LINKINFO's IFLA_INFO_KIND: "veth", ...
    kind: Option<String>,
    /// IFLA_QDISC: the root qdisc's kind ("noqueue" when there is none).
    qdisc: Option<String>,
    /// IFLA_IFALIAS.
    alias: Option<String>,
}

/// A string attribute's value, without its NUL.
fn attr_str(val: &[u8]) -> String {
    String::from_utf8_lossy(val.split(|&b| b == 0).next().unwrap_or_default()).into_owned()
}

/// The (type, payload) of each attribute in `buf`.
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff; // without NLA_F_NESTED / NET_BYTEORDER
        if len < 4 || len > buf.len() {
            return None;
        }
        let val = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((ty, val))
    })
}
/// veth's largest MTU: segments of any size the interface sends fit.
const HELPER_MTU: u32 = 65535;
const IFINFOMSG_LEN: usize = 16;

struct Netlink {
    fd: OwnedFd,
    seq: std::cell::Cell<u32>,
}

/// Appends an attribute; `nest` writes its payload and returns nothing.
fn attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn nest(buf: &mut Vec<u8>, ty: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    f(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    buf[start + 2..start + 4].copy_from_slice(&ty.to_ne_bytes());
}

fn ifinfomsg(buf: &mut Vec<u8>, index: u32, flags: u32, change: u32) {
    let mut m = [0u8; IFINFOMSG_LEN];
    m[0] = libc::AF_UNSPEC as u8;
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m[8..12].copy_from_slice(&flags.to_ne_bytes());
    m[12..16].copy_from_slice(&change.to_ne_bytes());
    buf.extend_from_slice(&m);
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

impl Netlink {
    fn open() -> Result<Netlink> {
        // SAFETY: plain socket(2); the fd is owned right after.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("opening an rtnetlink socket");
        }
        // SAFETY: fd is a new, valid descriptor that nothing else owns.
        Ok(Netlink { fd: unsafe { OwnedFd::from_raw_fd(fd) }, seq: std::cell::Cell::new(1) })
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&self, ty: u16, flags: u16, body: &[u8]) -> io::Result<()> {
        self.exchange(ty, flags, body, |_, _| {})
    }

    /// What rtnetlink says of the interface `index`.
    fn link(&self, index: u32) -> io::Result<Link> {
        let mut b = Vec::new();
        ifinfomsg(&mut b, index, 0, 0);
        let mut link = Link::default();
        self.exchange(libc::RTM_GETLINK, 0, &b, |mty, msg| {
            if mty == libc::RTM_NEWLINK && msg.len() >= 16 + IFINFOMSG_LEN {
                for (ty, val) in attrs(&msg[16 + IFINFOMSG_LEN..]) {
                    match ty {
                        libc::IFLA_LINK if val.len() >= 4 => {
                            link.peer = Some(u32::from_ne_bytes(val[..4].try_into().unwrap()))
                        }
                        IFLA_LINK_NETNSID => link.peer_netns = true,
                        IFLA_QDISC => link.qdisc = Some(attr_str(val)),
                        libc::IFLA_IFALIAS => link.alias = Some(attr_str(val)),
                        IFLA_LINKINFO => {
                            link.kind = attrs(val).find(|&(t, _)| t == IFLA_INFO_KIND).map(|(_, v)| attr_str(v))
                        }
                        _ => {}
                    }
                }
            }
        })?;
        Ok(link)
    }

    /// Sends one request, hands every reply message to `each` (type,
    /// whole message) and returns at its acknowledgement.
    fn exchange(&self, ty: u16, flags: u16, body: &[u8], mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        let mut msg = Vec::with_capacity(16 + body.len());
        msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&ty.to_ne_bytes());
        msg.extend_from_slice(&(flags | (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: msg is a valid buffer of its length.
        if unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: buf is a valid, writable buffer of its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut off = 0usize;
            while off + 16 <= n as usize {
                let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
                let mty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
                let mseq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap());
                if len < 16 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "short netlink message"));
                }
                if mseq == seq {
                    if mty == libc::NLMSG_ERROR as u16 && off + 20 <= n as usize {
                        let err = i32::from_ne_bytes(buf[off + 16..off + 20].try_into().unwrap());
                        return if err == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(-err)) };
                    }
                    each(mty, &buf[off..(off + len).min(n as usize)]);
                }
                off += len.next_multiple_of(4);
            }
        }
    }

    /// Both ends down, with the largest MTU; `out` with gso_max_segs 1.
    fn create_pair(&self, out: &str, inn: &str) -> io::Result<()> {
        let mut b = Vec::new();
        ifinfomsg(&mut b, 0, 0, 0);
        attr(&mut b, IFLA_IFNAME, &cstr(out));
        attr(&mut b, IFLA_MTU, &HELPER_MTU.to_ne_bytes());
        attr(&mut b, IFLA_GSO_MAX_SEGS, &1u32.to_ne_bytes());
        nest(&mut b, IFLA_LINKINFO, |b| {
            attr(b, IFLA_INFO_KIND, b"veth");
            nest(b, IFLA_INFO_DATA, |b| {
                nest(b, VETH_INFO_PEER, |b| {
                    ifinfomsg(b, 0, 0, 0);
                    attr(b, IFLA_IFNAME, &cstr(inn));
                    attr(b, IFLA_MTU, &HELPER_MTU.to_ne_bytes());
                });
            });
        });
        self.request(libc::RTM_NEWLINK, (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16, &b)
    }

    fn set_up(&self, index: u32) -> Result<()> {
        let mut b = Vec::new();
        let up = libc::IFF_UP as u32;
        ifinfomsg(&mut b, index, up, up);
        self.request(libc::RTM_NEWLINK, 0, &b).with_context(|| format!("setting helper interface {index} up"))
    }

    fn set_alias(&self, index: u32, alias: &str) -> Result<()> {
        let mut b = Vec::new();
        ifinfomsg(&mut b, index, 0, 0);
        attr(&mut b, libc::IFLA_IFALIAS, alias.as_bytes());
        self.request(libc::RTM_NEWLINK, 0, &b).with_context(|| format!("naming helper interface {index}"))
    }

    fn delete(&self, index: u32) -> io::Result<()> {
        let mut b = Vec::new();
        ifinfomsg(&mut b, index, 0, 0);
        self.request(libc::RTM_DELLINK, 0, &b)
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
