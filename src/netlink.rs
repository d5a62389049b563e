//! rtnetlink, just enough of it: interfaces by name and index, and the
//! helper veth pairs of the segmentation detour (src/detour.rs).
//!
//! Spoken directly (a few fixed messages), so that the static binary needs
//! no `ip` command on the host.  Names and indexes are asked of rtnetlink,
//! never through glibc's if_nametoindex: that opens and closes an AF_UNIX
//! socket per call, and closing one waits for the kernel's unix socket
//! garbage collector, which took 0.6 s per close in a TCG guest.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result};
use libc::{
    IFLA_GSO_MAX_SEGS, IFLA_IFNAME, IFLA_INFO_DATA, IFLA_INFO_KIND, IFLA_LINKINFO, IFLA_LINK_NETNSID, IFLA_MTU,
    IFLA_QDISC,
};
/// linux/veth.h (not in the libc crate).
const VETH_INFO_PEER: u16 = 1;

/// What `Netlink::link` reports.
#[derive(Debug, Default)]
pub struct Link {
    /// ifi_index.
    pub index: u32,
    /// IFLA_IFNAME.
    pub name: String,
    /// IFLA_LINK: a veth's peer.
    pub peer: Option<u32>,
    /// IFLA_LINK_NETNSID is there: the peer is in another namespace.
    pub peer_netns: bool,
    /// IFLA_LINKINFO's IFLA_INFO_KIND: "veth", ...
    pub kind: Option<String>,
    /// IFLA_QDISC: the root qdisc's kind ("noqueue" when there is none).
    pub qdisc: Option<String>,
    /// IFLA_IFALIAS.
    pub alias: Option<String>,
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

pub struct Netlink {
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
    pub fn open() -> Result<Netlink> {
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
    pub fn link(&self, index: u32) -> io::Result<Link> {
        let mut b = Vec::new();
        ifinfomsg(&mut b, index, 0, 0);
        self.get_link(&b)
    }

    /// What rtnetlink says of the interface called `name` (ENODEV: none).
    pub fn link_by_name(&self, name: &str) -> io::Result<Link> {
        let mut b = Vec::new();
        ifinfomsg(&mut b, 0, 0, 0);
        attr(&mut b, IFLA_IFNAME, &cstr(name));
        self.get_link(&b)
    }

    fn get_link(&self, request: &[u8]) -> io::Result<Link> {
        let mut link = Link::default();
        self.exchange(libc::RTM_GETLINK, 0, request, |mty, msg| {
            if mty == libc::RTM_NEWLINK && msg.len() >= 16 + IFINFOMSG_LEN {
                link.index = u32::from_ne_bytes(msg[20..24].try_into().unwrap());
                for (ty, val) in attrs(&msg[16 + IFINFOMSG_LEN..]) {
                    match ty {
                        IFLA_IFNAME => link.name = attr_str(val),
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
    pub fn create_pair(&self, out: &str, inn: &str) -> io::Result<()> {
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

    pub fn set_up(&self, index: u32) -> Result<()> {
        let mut b = Vec::new();
        let up = libc::IFF_UP as u32;
        ifinfomsg(&mut b, index, up, up);
        self.request(libc::RTM_NEWLINK, 0, &b).with_context(|| format!("setting helper interface {index} up"))
    }

    pub fn set_alias(&self, index: u32, alias: &str) -> Result<()> {
        let mut b = Vec::new();
        ifinfomsg(&mut b, index, 0, 0);
        attr(&mut b, libc::IFLA_IFALIAS, alias.as_bytes());
        self.request(libc::RTM_NEWLINK, 0, &b).with_context(|| format!("naming helper interface {index}"))
    }

    pub fn delete(&self, index: u32) -> io::Result<()> {
        let mut b = Vec::new();
        ifinfomsg(&mut b, index, 0, 0);
        self.request(libc::RTM_DELLINK, 0, &b)
    }
}

/// The index of the interface called `name` in this namespace.
pub fn index_of(name: &str) -> Option<u32> {
    Netlink::open().ok()?.link_by_name(name).ok().map(|l| l.index)
}

/// The name of the interface with index `index` in this namespace.
pub fn name_of(index: u32) -> Option<String> {
    Netlink::open().ok()?.link(index).ok().map(|l| l.name)
}
