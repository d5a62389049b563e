//! rtnetlink, just enough of it: interfaces by name and index, and the
//! helper veth pairs of the segmentation detour (src/detour.rs).
//!
//! Messages are built and parsed by netlink-packet-route and sent over a
//! netlink-sys socket, synchronously, so that the static binary needs no
//! `ip` command on the host.  Every request asks for its acknowledgement
//! and waits for it; a refusal carries the kernel's own words (extended
//! ack) when it gives any.  Each datagram is read whole, however long.
//!
//! Names and indexes are asked of rtnetlink, never through glibc's
//! if_nametoindex: that opens and closes an AF_UNIX socket per call, and
//! closing one waits for the kernel's unix socket garbage collector, which
//! took 0.6 s per close in a TCG guest.

use std::cell::Cell;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use anyhow::{Context, Result};
use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK,
    NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};

use crate::output::errln;

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

impl Link {
    fn of(msg: LinkMessage) -> Link {
        let mut link = Link { index: msg.header.index, ..Link::default() };
        for a in msg.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name = n,
                LinkAttribute::Link(p) => link.peer = Some(p),
                LinkAttribute::LinkNetNsId(_) => link.peer_netns = true,
                LinkAttribute::Qdisc(q) => link.qdisc = Some(q),
                LinkAttribute::IfAlias(a) => link.alias = Some(a),
                LinkAttribute::LinkInfo(infos) => {
                    link.kind = infos.into_iter().find_map(|i| match i {
                        LinkInfo::Kind(k) => Some(k.to_string()),
                        _ => None,
                    })
                }
                _ => {}
            }
        }
        link
    }
}

/// A request that failed: the error number, and what the kernel said of
/// it (NLMSGERR_ATTR_MSG) if it said anything.
#[derive(Debug)]
pub struct Error {
    io: io::Error,
    said: Option<String>,
}

impl Error {
    /// The errno, as `io::Error::raw_os_error` gives it.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.io.raw_os_error()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.said {
            Some(s) => write!(f, "{} (the kernel says: {s})", self.io),
            None => write!(f, "{}", self.io),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(io: io::Error) -> Error {
        Error { io, said: None }
    }
}

/// A reply the crate could not parse.
fn invalid(e: impl fmt::Display) -> Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("an rtnetlink reply sfunnel cannot read: {e}")).into()
}

/// The NLMSGERR_ATTR_MSG of an NLMSG_ERROR whose header has `flags`;
/// `after_code` is what follows its error code: the request's header
/// (all of the request unless NLM_F_CAPPED), then the attributes.
fn extack_msg(flags: u16, after_code: &[u8]) -> Option<String> {
    const NLMSGERR_ATTR_MSG: u16 = 1; // linux/netlink.h
    if flags & NLM_F_ACK_TLVS == 0 || after_code.len() < 4 {
        return None;
    }
    let echoed =
        if flags & NLM_F_CAPPED != 0 { 16 } else { u32::from_ne_bytes(after_code[..4].try_into().ok()?) as usize };
    let tlvs = after_code.get(echoed.next_multiple_of(4)..)?;
    NlasIterator::new(tlvs).map_while(|a| a.ok()).find(|a| a.kind() == NLMSGERR_ATTR_MSG).map(|a| {
        let v = a.value();
        String::from_utf8_lossy(v.split(|&b| b == 0).next().unwrap_or_default()).into_owned()
    })
}

/// veth's largest MTU: segments of any size the interface sends fit.
const HELPER_MTU: u32 = 65535;

pub struct Netlink {
    sock: Socket,
    seq: Cell<u32>,
}

impl AsFd for Netlink {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// A link message that names the interface `index` and nothing else.
fn link_msg(index: u32) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m
}

impl Netlink {
    pub fn open() -> Result<Netlink> {
        let sock = Socket::new(NETLINK_ROUTE).context("opening an rtnetlink socket")?;
        // The kernel's words in errors, after the request's header alone.
        // Kernels before 4.12 know neither: errors then carry the errno.
        let _ = sock.set_ext_ack(true);
        let _ = sock.set_cap_ack(true);
        Ok(Netlink { sock, seq: Cell::new(1) })
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), Error> {
        self.exchange(msg, flags, |_| {})
    }

    /// What rtnetlink says of the interface `index`.
    pub fn link(&self, index: u32) -> Result<Link, Error> {
        self.get_link(link_msg(index))
    }

    /// What rtnetlink says of the interface called `name` (ENODEV: none).
    pub fn link_by_name(&self, name: &str) -> Result<Link, Error> {
        let mut m = link_msg(0);
        m.attributes.push(LinkAttribute::IfName(name.into()));
        self.get_link(m)
    }

    fn get_link(&self, request: LinkMessage) -> Result<Link, Error> {
        let mut link = Link::default();
        self.exchange(RouteNetlinkMessage::GetLink(request), 0, |m| {
            if let RouteNetlinkMessage::NewLink(m) = m {
                link = Link::of(m);
            }
        })?;
        Ok(link)
    }

    /// Every interface of the namespace, by index.
    pub fn links(&self) -> Result<Vec<Link>, Error> {
        let mut links = Vec::new();
        self.exchange(RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP, |m| {
            if let RouteNetlinkMessage::NewLink(m) = m {
                links.push(Link::of(m));
            }
        })?;
        Ok(links)
    }

    /// Sends one request, hands every reply message to `each` and returns
    /// at its acknowledgement (or, for a dump, at its end).
    fn exchange(
        &self,
        msg: RouteNetlinkMessage,
        flags: u16,
        mut each: impl FnMut(RouteNetlinkMessage),
    ) -> Result<(), Error> {
        let seq = self.seq.get();
        self.seq.set(seq.wrapping_add(1));
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        req.finalize();
        let mut buf = vec![0; req.buffer_len()];
        req.serialize(&mut buf);
        self.sock.send(&buf, 0)?;
        loop {
            let (buf, _) = self.sock.recv_from_full()?;
            let mut rest = &buf[..];
            while !rest.is_empty() {
                // The header first: a stray reply to another request is
                // skipped unread.
                let h = NetlinkBuffer::new_checked(rest).map_err(invalid)?;
                let (this, mseq) = (&rest[..h.length() as usize], h.sequence_number());
                rest = rest.get(this.len().next_multiple_of(4)..).unwrap_or_default();
                if mseq != seq {
                    continue;
                }
                let m = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(this) {
                    Ok(m) => m,
                    // One interface the crate cannot parse (an attribute of a
                    // newer kernel, a name that is not UTF-8) must not hide
                    // the others of a dump.
                    Err(e) if flags & NLM_F_DUMP != 0 && !matches!(h.message_type(), NLMSG_ERROR | NLMSG_DONE) => {
                        errln!("warning: skipped an rtnetlink message sfunnel cannot read: {e}");
                        continue;
                    }
                    Err(e) => return Err(invalid(e)),
                };
                match m.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(()),
                            Some(_) => Err(Error { io: e.to_io(), said: extack_msg(m.header.flags, &e.header) }),
                        }
                    }
                    NetlinkPayload::Done(d) if d.code != 0 => {
                        return Err(io::Error::from_raw_os_error(-d.code).into());
                    }
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::InnerMessage(m) => each(m),
                    _ => {}
                }
            }
        }
    }

    /// Both ends down, with the largest MTU; `out` with gso_max_segs 1.
    pub fn create_pair(&self, out: &str, inn: &str) -> Result<(), Error> {
        let mut peer = LinkMessage::default();
        peer.attributes = vec![LinkAttribute::IfName(inn.into()), LinkAttribute::Mtu(HELPER_MTU)];
        let mut m = LinkMessage::default();
        m.attributes = vec![
            LinkAttribute::IfName(out.into()),
            LinkAttribute::Mtu(HELPER_MTU),
            LinkAttribute::GsoMaxSegs(1),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
            ]),
        ];
        self.request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
    }

    pub fn set_up(&self, index: u32) -> Result<()> {
        let mut m = link_msg(index);
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::NewLink(m), 0).with_context(|| format!("setting helper interface {index} up"))
    }

    pub fn set_alias(&self, index: u32, alias: &str) -> Result<()> {
        let mut m = link_msg(index);
        m.attributes.push(LinkAttribute::IfAlias(alias.into()));
        self.request(RouteNetlinkMessage::NewLink(m), 0).with_context(|| format!("naming helper interface {index}"))
    }

    pub fn delete(&self, index: u32) -> Result<(), Error> {
        self.request(RouteNetlinkMessage::DelLink(link_msg(index)), 0)
    }
}

/// The index of the interface called `name` in this namespace: None when
/// there is none (ENODEV); any other failure is an error, not "missing".
pub fn lookup(name: &str) -> Result<Option<u32>> {
    match Netlink::open()?.link_by_name(name) {
        Ok(l) => Ok(Some(l.index)),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("asking rtnetlink for the interface {name}")),
    }
}

/// The index of the interface called `name` in this namespace, where a
/// failure to ask may count as "none" (best-effort lookups).
pub fn index_of(name: &str) -> Option<u32> {
    Netlink::open().ok()?.link_by_name(name).ok().map(|l| l.index)
}

/// The name of the interface with index `index` in this namespace.
pub fn name_of(index: u32) -> Option<String> {
    Netlink::open().ok()?.link(index).ok().map(|l| l.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An NLMSG_ERROR's payload after its code: the request's header, then
    /// NLMSGERR_ATTR_MSG.
    fn after_code(echoed: &[u8], msg: &[u8]) -> Vec<u8> {
        let mut b = echoed.to_vec();
        b.resize(b.len().next_multiple_of(4), 0);
        b.extend_from_slice(&((4 + msg.len()) as u16).to_ne_bytes());
        b.extend_from_slice(&1u16.to_ne_bytes());
        b.extend_from_slice(msg);
        b.resize(b.len().next_multiple_of(4), 0);
        b
    }

    #[test]
    fn extack_text_is_read_after_a_capped_or_whole_request() {
        let capped = after_code(&[0; 16], b"Unknown device type\0");
        assert_eq!(extack_msg(NLM_F_ACK_TLVS | NLM_F_CAPPED, &capped).as_deref(), Some("Unknown device type"));
        let mut whole_req = 22u32.to_ne_bytes().to_vec();
        whole_req.resize(22, 7);
        let whole = after_code(&whole_req, b"Link already exists\0");
        assert_eq!(extack_msg(NLM_F_ACK_TLVS, &whole).as_deref(), Some("Link already exists"));
        assert_eq!(extack_msg(NLM_F_CAPPED, &capped), None, "no NLM_F_ACK_TLVS: no text");
        assert_eq!(extack_msg(NLM_F_ACK_TLVS | NLM_F_CAPPED, &[0; 16]), None);
    }

    #[test]
    fn an_error_shows_the_kernels_words() {
        let e = Error { io: io::Error::from_raw_os_error(95), said: Some("Unknown device type".into()) };
        assert_eq!(e.raw_os_error(), Some(95));
        assert!(e.to_string().ends_with("(the kernel says: Unknown device type)"), "{e}");
    }
}
