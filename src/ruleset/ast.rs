//! The typed ruleset.  `Display` prints the canonical form, and parsing the
//! canonical form gives back an equal value.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Ruleset {
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rule {
    #[serde(rename = "match")]
    pub matches: Match,
    pub action: Action,
    /// Where the rule starts in its source (1-based); not part of equality
    /// in spirit, but kept so later errors can point at the rule.
    #[serde(skip)]
    pub pos: SourcePos,
}

/// A rule's line and column.  Two rules compare equal whatever their
/// positions.
#[derive(Debug, Clone, Copy, Default)]
pub struct SourcePos {
    pub line: usize,
    pub col: usize,
}

impl PartialEq for SourcePos {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for SourcePos {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }

    /// The slot of this protocol in a shape set (see bpf/sfunnel.h).
    pub fn slot(self) -> u32 {
        match self {
            Proto::Tcp => 0,
            Proto::Udp => 1,
        }
    }

    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            _ => None,
        }
    }
}

/// The IP version a rule matches: `ip` (the default) or `ip6`.  A rule
/// never matches a packet of the other family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Ip,
    Ip6,
}

impl Family {
    /// `enum sfunnel_family` (bpf/sfunnel.h).
    pub fn number(self) -> u8 {
        match self {
            Family::Ip => 0,
            Family::Ip6 => 1,
        }
    }

    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::Ip,
            IpAddr::V6(_) => Family::Ip6,
        }
    }

    /// The address width in bits.
    pub fn bits(self) -> u8 {
        match self {
            Family::Ip => 32,
            Family::Ip6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
        })
    }
}

/// The shape-set slot of a family and protocol (SLOT_* in bpf/sfunnel.h).
pub fn slot(family: Family, proto: Proto) -> u32 {
    u32::from(family.number()) * 2 + proto.slot()
}

/// The conjunction of a rule's matches.  `None` is a wildcard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Match {
    pub family: Family,
    pub saddr: Option<AddrMatch>,
    pub daddr: Option<AddrMatch>,
    pub proto: Proto,
    pub sport: Option<PortMatch>,
    pub dport: Option<PortMatch>,
    /// `funneled`: the packet looks funneled (docs/rules.md, "Recognising funneled packets"): for TCP
    /// the funnel header's fixed fields, for UDP a plausible inner header.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub funneled: bool,
}

/// An IPv4 prefix; `addr` has no bits set past `len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Ipv4Net {
    pub addr: u32,
    pub len: u8,
}

impl Ipv4Net {
    /// The prefix `addr/len`, with host bits cleared.
    pub fn new(addr: u32, len: u8) -> Ipv4Net {
        assert!(len <= 32, "prefix length {len} > 32");
        Ipv4Net { addr: addr & Self::mask(len), len }
    }

    pub fn mask(len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        }
    }

    pub fn contains(&self, addr: u32) -> bool {
        addr & Self::mask(self.len) == self.addr
    }

    /// True when `other` lies inside this prefix (or is equal to it).
    pub fn covers(&self, other: &Ipv4Net) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }

    /// The last address of the prefix.
    pub fn last(&self) -> u32 {
        self.addr | !Self::mask(self.len)
    }
}

/// An IPv6 prefix; `addr` has no bits set past `len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Ipv6Net {
    pub addr: u128,
    pub len: u8,
}

impl Ipv6Net {
    /// The prefix `addr/len`, with host bits cleared.
    pub fn new(addr: u128, len: u8) -> Ipv6Net {
        assert!(len <= 128, "prefix length {len} > 128");
        Ipv6Net { addr: addr & mask128(len), len }
    }
}

/// The top `len` bits of 128.
fn mask128(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

/// A prefix of either family.  It serializes as its text ("10.0.0.0/8",
/// "2001:db8::/32"): JSON numbers cannot hold an IPv6 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpNet {
    V4(Ipv4Net),
    V6(Ipv6Net),
}

impl IpNet {
    pub fn family(&self) -> Family {
        match self {
            IpNet::V4(_) => Family::Ip,
            IpNet::V6(_) => Family::Ip6,
        }
    }

    pub fn prefix_len(&self) -> u8 {
        match self {
            IpNet::V4(n) => n.len,
            IpNet::V6(n) => n.len,
        }
    }

    /// The network address left-aligned in 128 bits, so that both families
    /// share prefix arithmetic (an IPv4 address takes the top 32 bits).
    pub fn bits(&self) -> u128 {
        match self {
            IpNet::V4(n) => u128::from(n.addr) << 96,
            IpNet::V6(n) => n.addr,
        }
    }

    /// The last address of the prefix, left-aligned like [`IpNet::bits`].
    pub fn last_bits(&self) -> u128 {
        let width = u32::from(self.family().bits());
        let host = !mask128(self.prefix_len()) & (u128::MAX << (128 - width));
        self.bits() | host
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self, addr) {
            (IpNet::V4(n), IpAddr::V4(a)) => n.contains(u32::from(a)),
            (IpNet::V6(n), IpAddr::V6(a)) => u128::from(a) & mask128(n.len) == n.addr,
            _ => false,
        }
    }
}

impl Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An address left-aligned in 128 bits, like [`IpNet::bits`].
pub fn addr_bits(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
        IpAddr::V6(a) => u128::from(a),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AddrMatch {
    pub negated: bool,
    pub net: IpNet,
}

impl AddrMatch {
    /// `addr` must be of the prefix's family (the rule's family is checked
    /// first).
    pub fn matches(&self, addr: IpAddr) -> bool {
        self.net.contains(addr) != self.negated
    }
}

/// A set of ports as sorted, disjoint, non-adjacent inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortSet {
    ranges: Vec<(u16, u16)>,
}

impl PortSet {
    /// Normalises any list of inclusive ranges (each with start <= end).
    pub fn new(mut ranges: Vec<(u16, u16)>) -> PortSet {
        ranges.sort_unstable();
        let mut out: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            debug_assert!(lo <= hi);
            match out.last_mut() {
                Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => out.push((lo, hi)),
            }
        }
        PortSet { ranges: out }
    }

    pub fn ranges(&self) -> &[(u16, u16)] {
        &self.ranges
    }

    pub fn contains(&self, port: u16) -> bool {
        // Sorted and disjoint: find the last range starting at or before port.
        let i = self.ranges.partition_point(|&(lo, _)| lo <= port);
        i > 0 && self.ranges[i - 1].1 >= port
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortMatch {
    pub negated: bool,
    pub ports: PortSet,
}

impl PortMatch {
    pub fn matches(&self, port: u16) -> bool {
        self.ports.contains(port) != self.negated
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Action {
    /// Insert a `proto` header with these ports (host order).
    Funnel {
        proto: Proto,
        sport: u16,
        dport: u16,
    },
    /// Remove the funnel header; `proto` is the inner protocol.
    Unfunnel {
        proto: Proto,
    },
    /// `unfunnel auto`: remove the funnel header, telling the inner
    /// protocol from the packet; a packet that fits neither or both is
    /// passed unchanged.
    #[serde(rename = "unfunnel_auto")]
    UnfunnelAuto,
    Accept,
    Drop,
}

impl Match {
    /// True when a packet with these header fields satisfies every match.
    pub fn matches(&self, pkt: &PacketFields) -> bool {
        self.family == Family::of(pkt.saddr)
            && self.proto == pkt.proto
            && self.saddr.is_none_or(|m| m.matches(pkt.saddr))
            && self.daddr.is_none_or(|m| m.matches(pkt.daddr))
            && self.sport.as_ref().is_none_or(|m| m.matches(pkt.sport))
            && self.dport.as_ref().is_none_or(|m| m.matches(pkt.dport))
            && (!self.funneled || pkt.funneled)
    }
}

/// What a rule looks at in a packet: the outer IP addresses (both of one
/// family) and L4 ports, and whether the packet looks funneled (the
/// datapath's test, bpf/detect.h; docs/rules.md defines it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketFields {
    pub saddr: IpAddr,
    pub daddr: IpAddr,
    pub proto: Proto,
    pub sport: u16,
    pub dport: u16,
    pub funneled: bool,
}

impl Ruleset {
    /// True when some rule uses `funneled`: only then does the datapath
    /// test packets for it.
    pub fn uses_funneled(&self) -> bool {
        self.rules.iter().any(|r| r.matches.funneled)
    }

    /// The first rule that matches, by a plain top-to-bottom scan.  This is
    /// the definition of the semantics; the compiled form must agree with it.
    pub fn first_match(&self, pkt: &PacketFields) -> Option<usize> {
        self.rules.iter().position(|r| r.matches.matches(pkt))
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", Ipv4Addr::from(self.addr))?;
        if self.len != 32 {
            write!(f, "/{}", self.len)?;
        }
        Ok(())
    }
}

fn neg(negated: bool) -> &'static str {
    if negated {
        "!= "
    } else {
        ""
    }
}

impl fmt::Display for Ipv6Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", Ipv6Addr::from(self.addr))?;
        if self.len != 128 {
            write!(f, "/{}", self.len)?;
        }
        Ok(())
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpNet::V4(n) => n.fmt(f),
            IpNet::V6(n) => n.fmt(f),
        }
    }
}

impl fmt::Display for AddrMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", neg(self.negated), self.net)
    }
}

fn fmt_range(f: &mut fmt::Formatter<'_>, (lo, hi): (u16, u16)) -> fmt::Result {
    if lo == hi {
        write!(f, "{lo}")
    } else {
        write!(f, "{lo}-{hi}")
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ranges.as_slice() {
            [one] => fmt_range(f, *one),
            many => {
                f.write_str("{ ")?;
                for (i, r) in many.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    fmt_range(f, *r)?;
                }
                f.write_str(" }")
            }
        }
    }
}

impl fmt::Display for PortMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", neg(self.negated), self.ports)
    }
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // IPv4 is the default family: `ip` only introduces its addresses.
        if self.family == Family::Ip6 || self.saddr.is_some() || self.daddr.is_some() {
            write!(f, "{} ", self.family)?;
        }
        if let Some(m) = &self.saddr {
            write!(f, "saddr {m} ")?;
        }
        if let Some(m) = &self.daddr {
            write!(f, "daddr {m} ")?;
        }
        write!(f, "{}", self.proto)?;
        if let Some(m) = &self.sport {
            write!(f, " sport {m}")?;
        }
        if let Some(m) = &self.dport {
            write!(f, " dport {m}")?;
        }
        if self.funneled {
            f.write_str(" funneled")?;
        }
        Ok(())
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Funnel { proto, sport, dport } => {
                write!(f, "funnel {proto} sport {sport} dport {dport}")
            }
            Action::Unfunnel { proto } => write!(f, "unfunnel {proto}"),
            Action::UnfunnelAuto => f.write_str("unfunnel auto"),
            Action::Accept => f.write_str("accept"),
            Action::Drop => f.write_str("drop"),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} actions {}", self.matches, self.action)
    }
}

impl fmt::Display for Ruleset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.rules {
            writeln!(f, "{r}")?;
        }
        Ok(())
    }
}
