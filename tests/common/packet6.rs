//! Independent, specification-based IPv6 packet code for the datapath tests.
//!
//! Everything here is written from /work/shared/NOTES.md §1 as extended to
//! IPv6 (summarised below) and the RFCs (8200: IPv6, its extension headers
//! and the §8.1 pseudo-header; 768, 9293, 1071, 1624; 5095 and 8754 for
//! routing types 0 and 4), not from the BPF code: these builders are the
//! oracle the IPv6 datapath is checked against.  The protocol-independent
//! pieces (`Proto`, `Csum`, `L4`, `L4Csum`, field access, the funnel
//! header's fixed values) are reused from [`super::packet`].
//!
//! Frames are Ethernet II (0x86DD) + the 40-byte IPv6 header + extension
//! headers (optional) + TCP/UDP + payload + optional Ethernet trailer bytes
//! after the IP packet (payload_len delimits the packet).  Byte offsets are
//! relative to the start of the frame unless stated.
//!
//! The IPv6 wire format:
//! - **Funnel** `funnel P sport S dport D` on a packet whose IPv6 next
//!   header is directly TCP or UDP: a header of protocol P (the same bytes
//!   as the IPv4 funnel header) goes right after the 40-byte IPv6 header;
//!   next header = P, payload_len += header size; traffic class, flow label
//!   and hop limit unchanged.  Its checksum is complete and valid over the
//!   RFC 8200 §8.1 pseudo-header (real addresses), itself and the inner
//!   segment (a computed UDP 0 is sent as 0xFFFF).  The inner checksum is
//!   rewritten to be valid with saddr = daddr = `::`; an inner UDP 0 stays 0.
//! - **Unfunnel** `unfunnel P`: the header after the IPv6 header goes, next
//!   header = P, payload_len -= its size, the inner checksum becomes valid
//!   for the current addresses (UDP 0 stays 0).
//! - Packets with **any extension header** are neither funneled nor
//!   unfunneled: they pass unchanged.
//! - A **NAT** rewrites the outer addresses and outer ports and fixes only
//!   the outer L4 checksum, incrementally; IPv6 has no header checksum.

use std::fmt::Write as _;
use std::net::Ipv6Addr;

use super::packet::{
    be16, csum_update, l4_header_len, put16, put32, Csum, L4Csum, PacketSpec, Proto, ETH_HLEN, ETH_P_IPV6,
    FUNNEL_TCP_ACK, FUNNEL_TCP_FLAGS, FUNNEL_TCP_SEQ, FUNNEL_TCP_WINDOW, IPPROTO_TCP, IPPROTO_UDP, L4,
};

/// The fixed IPv6 header.
pub const IP6_HLEN: usize = 40;
/// Frame offset of the first header after the fixed IPv6 header.
pub const IP6_L4_OFF: usize = ETH_HLEN + IP6_HLEN;

/// Frame offsets of the IPv6 header fields.
pub const IP6_OFF_PAYLOAD_LEN: usize = ETH_HLEN + 4;
pub const IP6_OFF_NEXT_HEADER: usize = ETH_HLEN + 6;
pub const IP6_OFF_HOP_LIMIT: usize = ETH_HLEN + 7;
pub const IP6_OFF_SADDR: usize = ETH_HLEN + 8;
pub const IP6_OFF_DADDR: usize = ETH_HLEN + 24;

/// Next-header numbers of the IPv6 extension headers (RFC 8200 §4, the
/// IANA "IPv6 Extension Header Types" registry) and of the two
/// non-headers that end a chain.
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_ESP: u8 = 50;
pub const NEXTHDR_AH: u8 = 51;
pub const NEXTHDR_NONE: u8 = 59;
pub const NEXTHDR_DEST: u8 = 60;
pub const NEXTHDR_MOBILITY: u8 = 135;
pub const NEXTHDR_HIP: u8 = 139;
pub const NEXTHDR_SHIM6: u8 = 140;
pub const NEXTHDR_EXP1: u8 = 253;
pub const NEXTHDR_EXP2: u8 = 254;

/// Whether `nh` is an extension header that can be walked (ESP cannot: its
/// contents are encrypted, so it ends a walk like an upper layer).
pub fn is_ext_header(nh: u8) -> bool {
    matches!(
        nh,
        NEXTHDR_HOP
            | NEXTHDR_ROUTING
            | NEXTHDR_FRAGMENT
            | NEXTHDR_AH
            | NEXTHDR_DEST
            | NEXTHDR_MOBILITY
            | NEXTHDR_HIP
            | NEXTHDR_SHIM6
            | NEXTHDR_EXP1
            | NEXTHDR_EXP2
    )
}

/// An IPv6 address from its text form; panics on bad input (test literals).
pub fn a6(s: &str) -> [u8; 16] {
    s.parse::<Ipv6Addr>().unwrap_or_else(|e| panic!("bad IPv6 address {s:?}: {e}")).octets()
}

/// 16 bytes at `off` as an address.
pub fn addr6(b: &[u8], off: usize) -> [u8; 16] {
    b[off..off + 16].try_into().unwrap()
}

/// Text form of an address, for messages.
pub fn fmt6(a: [u8; 16]) -> String {
    Ipv6Addr::from(a).to_string()
}

// ---------------------------------------------------------------------------
// RFC 8200 §8.1 pseudo-header and L4 checksums
// ---------------------------------------------------------------------------

/// The sum of the IPv6 upper-layer pseudo-header (RFC 8200 §8.1): source,
/// destination, the 32-bit upper-layer packet length, three zero bytes and
/// the next header value `proto`.
pub fn pseudo_header6(saddr: [u8; 16], daddr: [u8; 16], proto: u8, l4_len: usize) -> Csum {
    let len = u32::try_from(l4_len).expect("L4 length fits 32 bits");
    let mut c = Csum::new();
    c.add(&saddr).add(&daddr).add(&len.to_be_bytes()).add(&[0, 0, 0, proto]);
    c
}

/// The checksum a TCP/UDP segment must carry for these pseudo-header
/// addresses (its current checksum field is ignored).  A UDP result of 0 is
/// sent as 0xFFFF (RFC 768, RFC 8200 §8.1).
pub fn l4_checksum_for6(saddr: [u8; 16], daddr: [u8; 16], proto: Proto, segment: &[u8]) -> u16 {
    let off = proto.csum_offset();
    let mut c = pseudo_header6(saddr, daddr, proto.number(), segment.len());
    c.add(&segment[..off]).add(&[0, 0]).add(&segment[off + 2..]);
    let v = c.checksum();
    if proto == Proto::Udp && v == 0 {
        0xFFFF
    } else {
        v
    }
}

/// Rewrites the checksum of the TCP/UDP segment `seg` to be valid for
/// (`saddr`, `daddr`), except that a UDP checksum of 0 stays 0 (the funnel
/// and unfunnel rule for the inner header).
fn rewrite_inner_csum(seg: &mut [u8], saddr: [u8; 16], daddr: [u8; 16], proto: Proto) {
    let off = proto.csum_offset();
    if proto == Proto::Udp && be16(seg, off) == 0 {
        return;
    }
    let c = l4_checksum_for6(saddr, daddr, proto, seg);
    put16(seg, off, c);
}

// ---------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------

/// One extension header found in a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtSpan {
    /// Its next-header number (the type of *this* header).
    pub number: u8,
    /// Frame offset.
    pub off: usize,
    /// Length in bytes.
    pub len: usize,
}

/// The fields of a Fragment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frag6 {
    /// Fragment offset in 8-octet units (13 bits).
    pub offset: u16,
    /// The M flag.
    pub more: bool,
    pub id: u32,
}

/// The IPv6 layout of a frame.  Panics on anything that is not an IPv6
/// frame (ethertype, version) or whose payload_len or extension headers run
/// past the frame.  Jumbograms (payload_len 0 + Jumbo option) are not
/// supported.
#[derive(Clone, Debug)]
pub struct Ip6 {
    pub traffic_class: u8,
    /// 20 bits.
    pub flow_label: u32,
    pub payload_len: usize,
    /// The fixed header's next header.
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The extension headers walked, in order.  The walk stops at a
    /// non-extension header, at ESP, and after a Fragment header whose
    /// offset is not 0 (what follows is fragment data).
    pub exts: Vec<ExtSpan>,
    /// The next header value that ended the walk: `next_header` when there
    /// are no extension headers, else the last walked header's next header.
    pub upper: u8,
    /// The Fragment header's fields, if one was walked.
    pub frag: Option<Frag6>,
}

impl Ip6 {
    pub fn of(frame: &[u8]) -> Ip6 {
        assert!(frame.len() >= IP6_L4_OFF, "frame too short for IPv6");
        assert_eq!(be16(frame, 12), ETH_P_IPV6, "not an IPv6 frame");
        let ip = &frame[ETH_HLEN..];
        assert_eq!(ip[0] >> 4, 6, "IP version");
        let vtf = u32::from_be_bytes([ip[0], ip[1], ip[2], ip[3]]);
        let payload_len = usize::from(be16(ip, 4));
        let end = IP6_L4_OFF + payload_len;
        assert!(end <= frame.len(), "truncated frame: payload_len {payload_len}, frame {} bytes", frame.len());
        let next_header = ip[6];
        let mut exts = Vec::new();
        let mut frag = None;
        let mut nh = next_header;
        let mut off = IP6_L4_OFF;
        while is_ext_header(nh) {
            assert!(off + 2 <= end, "extension header {nh} at {off} runs past the packet");
            let len = match nh {
                NEXTHDR_FRAGMENT => 8,
                NEXTHDR_AH => (usize::from(frame[off + 1]) + 2) * 4,
                _ => (usize::from(frame[off + 1]) + 1) * 8,
            };
            assert!(off + len <= end, "extension header {nh} at {off} ({len} bytes) runs past the packet");
            exts.push(ExtSpan { number: nh, off, len });
            let this = nh;
            nh = frame[off];
            off += len;
            if this == NEXTHDR_FRAGMENT {
                let w = be16(frame, off - 6);
                let f = Frag6 {
                    offset: w >> 3,
                    more: w & 1 != 0,
                    id: u32::from_be_bytes(frame[off - 4..off].try_into().unwrap()),
                };
                frag = Some(f);
                if f.offset != 0 {
                    break;
                }
            }
        }
        Ip6 {
            traffic_class: (vtf >> 20) as u8,
            flow_label: vtf & 0xF_FFFF,
            payload_len,
            next_header,
            hop_limit: ip[7],
            saddr: addr6(ip, 8),
            daddr: addr6(ip, 24),
            exts,
            upper: nh,
            frag,
        }
    }

    pub fn has_ext(&self) -> bool {
        !self.exts.is_empty()
    }

    /// Total length of the extension headers walked.
    pub fn ext_len(&self) -> usize {
        self.exts.iter().map(|e| e.len).sum()
    }

    /// Frame offset of the upper-layer (L4) header: 54 with no extension
    /// headers.  For a non-first fragment it is the fragment data's offset.
    pub fn l4_off(&self) -> usize {
        IP6_L4_OFF + self.ext_len()
    }

    /// Frame offset just past the IP packet (start of any Ethernet trailer).
    pub fn end(&self) -> usize {
        IP6_L4_OFF + self.payload_len
    }

    /// Upper-layer length: payload_len less the extension headers.
    pub fn l4_len(&self) -> usize {
        self.payload_len - self.ext_len()
    }

    /// A first or later fragment (a Fragment header with offset ≠ 0 or M
    /// set); an "atomic fragment" (offset 0, M clear) is not one.
    pub fn is_fragment(&self) -> bool {
        self.frag.is_some_and(|f| f.offset != 0 || f.more)
    }
}

/// Whether the spec funnels/unfunnels this frame at all: the fixed header's
/// next header is directly TCP or UDP.  Every other frame (any extension
/// header, other protocols) passes unchanged.
pub fn funnelable6(frame: &[u8]) -> bool {
    matches!(Ip6::of(frame).next_header, IPPROTO_TCP | IPPROTO_UDP)
}

// ---------------------------------------------------------------------------
// Extension headers (RFC 8200 §4)
// ---------------------------------------------------------------------------

/// One extension header to build.  [`ExtHeader::serialize`] writes it with
/// the given next header; [`Packet6Spec::build`] chains them in list order
/// (the caller chooses the order; RFC 8200 §4.1's recommended order, and
/// Hop-by-Hop first, are not enforced, so that odd chains can be built).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExtHeader {
    /// Hop-by-Hop Options (0).  `options` are already-encoded option TLVs;
    /// Pad1/PadN padding to an 8-octet multiple is added (§4.2).
    HopByHop { options: Vec<u8> },
    /// Destination Options (60), built like Hop-by-Hop.
    DestOpts { options: Vec<u8> },
    /// Routing (43) with Segments Left 0, so the fixed header's daddr is
    /// already the final destination (no pseudo-header change).  Type 0
    /// (RFC 5095, deprecated) and any type other than 4: 4 reserved zero
    /// bytes then the addresses.  Type 4 (SRH, RFC 8754): Last Entry =
    /// n − 1, Flags 0, Tag 0, then the segment list (n ≥ 1; a real SRH with
    /// Segments Left 0 has daddr = Segment List[0], not enforced).
    Routing { rtype: u8, addresses: Vec<[u8; 16]> },
    /// Fragment (44), 8 bytes: offset in 8-octet units (13 bits), M flag,
    /// identification.  See [`Packet6Spec`] for what follows it.
    Fragment { offset: u16, more: bool, id: u32 },
    /// Any other header in the uniform format of §4.8 (Next Header, Hdr Ext
    /// Len in 8-octet units not counting the first 8, data), e.g. 253/254
    /// (experimental, RFC 3692/4727), 135, 139, 140.  `data` follows the
    /// first two bytes and is zero-padded to an 8-octet multiple.  Not for
    /// 44 or AH (51), whose lengths are counted differently.
    Other { number: u8, data: Vec<u8> },
}

/// An experimental option type (RFC 4727, 0x1E: action bits 00 = skip,
/// C bit 0) for filling Hop-by-Hop / Destination Options headers.
pub const OPT_EXPERIMENTAL: u8 = 0x1E;
/// The Router Alert option type (RFC 2711).
pub const OPT_ROUTER_ALERT: u8 = 0x05;

impl ExtHeader {
    /// An empty Hop-by-Hop header (one PadN of 4 bytes).
    pub fn hop_by_hop() -> ExtHeader {
        ExtHeader::HopByHop { options: Vec::new() }
    }

    /// A Hop-by-Hop header holding a Router Alert option (value 0, MLD).
    pub fn router_alert() -> ExtHeader {
        ExtHeader::HopByHop { options: vec![OPT_ROUTER_ALERT, 2, 0, 0] }
    }

    /// An empty Destination Options header.
    pub fn dest_opts() -> ExtHeader {
        ExtHeader::DestOpts { options: Vec::new() }
    }

    /// A Destination Options header holding one experimental option with
    /// `n` data bytes (n = 0..=10 exercises every padding length).
    pub fn dest_opts_with(n: usize) -> ExtHeader {
        let mut options = vec![OPT_EXPERIMENTAL, u8::try_from(n).expect("option length")];
        options.extend((0..n).map(|i| 0xA0 | (i as u8 & 0xF)));
        ExtHeader::DestOpts { options }
    }

    /// A type 0 Routing header, Segments Left 0, with one address.
    pub fn routing0(a: [u8; 16]) -> ExtHeader {
        ExtHeader::Routing { rtype: 0, addresses: vec![a] }
    }

    /// A Segment Routing Header (type 4), Segments Left 0, one segment.
    pub fn srh(a: [u8; 16]) -> ExtHeader {
        ExtHeader::Routing { rtype: 4, addresses: vec![a] }
    }

    pub fn fragment(offset: u16, more: bool, id: u32) -> ExtHeader {
        ExtHeader::Fragment { offset, more, id }
    }

    /// The option bytes of a Hop-by-Hop / Destination Options header (empty
    /// for the others).
    pub fn options_of(&self) -> Vec<u8> {
        match self {
            ExtHeader::HopByHop { options } | ExtHeader::DestOpts { options } => options.clone(),
            _ => Vec::new(),
        }
    }

    /// Its next-header number.
    pub fn number(&self) -> u8 {
        match self {
            ExtHeader::HopByHop { .. } => NEXTHDR_HOP,
            ExtHeader::DestOpts { .. } => NEXTHDR_DEST,
            ExtHeader::Routing { .. } => NEXTHDR_ROUTING,
            ExtHeader::Fragment { .. } => NEXTHDR_FRAGMENT,
            ExtHeader::Other { number, .. } => *number,
        }
    }

    /// The header's bytes, with Next Header = `next`.
    pub fn serialize(&self, next: u8) -> Vec<u8> {
        let mut h = vec![next, 0];
        match self {
            ExtHeader::HopByHop { options } | ExtHeader::DestOpts { options } => {
                h.extend_from_slice(options);
                // §4.2: Pad1 for one octet of padding, PadN (type 1, length
                // n − 2, n − 2 zero octets) for n ≥ 2.
                match (8 - h.len() % 8) % 8 {
                    0 => {}
                    1 => h.push(0),
                    n => {
                        h.extend_from_slice(&[1, (n - 2) as u8]);
                        h.resize(h.len() + n - 2, 0);
                    }
                }
            }
            ExtHeader::Routing { rtype, addresses } => {
                let n = addresses.len();
                h.extend_from_slice(&[*rtype, 0]); // type, Segments Left 0
                if *rtype == 4 {
                    assert!(n >= 1, "an SRH has at least one segment");
                    h.extend_from_slice(&[(n - 1) as u8, 0, 0, 0]); // Last Entry, Flags, Tag
                } else {
                    h.extend_from_slice(&[0; 4]); // reserved
                }
                for a in addresses {
                    h.extend_from_slice(a);
                }
            }
            ExtHeader::Fragment { offset, more, id } => {
                assert!(*offset < 1 << 13, "fragment offset is 13 bits");
                h.extend_from_slice(&((offset << 3) | u16::from(*more)).to_be_bytes());
                h.extend_from_slice(&id.to_be_bytes());
            }
            ExtHeader::Other { number, data } => {
                assert!(*number != NEXTHDR_FRAGMENT && *number != NEXTHDR_AH, "use Fragment; AH is not built");
                h.extend_from_slice(data);
                h.resize(h.len().div_ceil(8) * 8, 0);
            }
        }
        assert_eq!(h.len() % 8, 0);
        let units = h.len() / 8 - 1;
        if !matches!(self, ExtHeader::Fragment { .. }) {
            h[1] = u8::try_from(units).expect("extension header longer than 2048 bytes");
        }
        h
    }
}

// ---------------------------------------------------------------------------
// Builder
// ---------------------------------------------------------------------------

/// Everything needed to build one IPv6 test frame.
///
/// The L4 checksum (per `csum`) uses the pseudo-header of the fixed
/// header's saddr/daddr.  That is right for every chain built here: a
/// Routing header is always built with Segments Left 0, so daddr is the
/// final destination (RFC 8200 §8.1).
///
/// Fragments: a Fragment header with offset 0 (first fragment, or atomic)
/// is followed by the whole L4 segment, its checksum computed over the
/// bytes present (what the frame would carry if it were not fragmented).
/// A Fragment header with offset ≠ 0 must be the last extension header and
/// is followed by `payload` alone (no L4 header); its Next Header is still
/// the L4 protocol (RFC 8200 §4.5).
#[derive(Clone, Debug)]
pub struct Packet6Spec {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub traffic_class: u8,
    /// 20 bits.
    pub flow_label: u32,
    pub hop_limit: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub ext_headers: Vec<ExtHeader>,
    pub l4: L4,
    pub payload: Vec<u8>,
    pub csum: L4Csum,
    /// Bytes appended after the IP packet (Ethernet trailer).
    pub trailer: Vec<u8>,
}

/// Default addresses of the builder (ULA).
pub const DEFAULT_SADDR6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]; // fd00::1
pub const DEFAULT_DADDR6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]; // fd00:1::2

impl Packet6Spec {
    fn base(l4: L4, payload: &[u8]) -> Packet6Spec {
        Packet6Spec {
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            // Non-zero so that a datapath that clobbers them is caught.
            traffic_class: 0x28,
            flow_label: 0x1_2345,
            hop_limit: 61,
            saddr: DEFAULT_SADDR6,
            daddr: DEFAULT_DADDR6,
            ext_headers: Vec::new(),
            l4,
            payload: payload.to_vec(),
            csum: L4Csum::Valid,
            trailer: Vec::new(),
        }
    }

    /// A TCP segment (ACK|PSH, the same header fields as
    /// `PacketSpec::tcp`) from fd00::1 to fd00:1::2.
    pub fn tcp(sport: u16, dport: u16, payload: &[u8]) -> Packet6Spec {
        Packet6Spec::base(PacketSpec::tcp(sport, dport, payload).l4, payload)
    }

    /// A UDP datagram from fd00::1 to fd00:1::2.
    pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Packet6Spec {
        Packet6Spec::base(L4::Udp { sport, dport }, payload)
    }

    pub fn proto(&self) -> Proto {
        match self.l4 {
            L4::Tcp { .. } => Proto::Tcp,
            L4::Udp { .. } => Proto::Udp,
        }
    }

    pub fn with_addrs(mut self, saddr: [u8; 16], daddr: [u8; 16]) -> Packet6Spec {
        self.saddr = saddr;
        self.daddr = daddr;
        self
    }

    /// Appends an extension header to the chain.
    pub fn with_ext(mut self, e: ExtHeader) -> Packet6Spec {
        self.ext_headers.push(e);
        self
    }

    pub fn with_csum(mut self, csum: L4Csum) -> Packet6Spec {
        self.csum = csum;
        self
    }

    pub fn with_trailer(mut self, t: &[u8]) -> Packet6Spec {
        self.trailer = t.to_vec();
        self
    }

    /// Traffic class, flow label (20 bits) and hop limit.
    pub fn with_flow(mut self, traffic_class: u8, flow_label: u32, hop_limit: u8) -> Packet6Spec {
        assert!(flow_label <= 0xF_FFFF, "flow label is 20 bits");
        self.traffic_class = traffic_class;
        self.flow_label = flow_label;
        self.hop_limit = hop_limit;
        self
    }

    /// The L4 segment (header + payload) with its checksum per `self.csum`
    /// (`Valid`: for the IPv6 pseudo-header of saddr/daddr).
    pub fn segment(&self) -> Vec<u8> {
        // The header layout is the IPv4 builder's (it is protocol-independent);
        // only the checksum differs.
        let mut v4 = PacketSpec::udp(0, 0, &self.payload).with_csum(L4Csum::Raw(0));
        v4.l4 = self.l4.clone();
        let mut seg = v4.segment();
        let proto = self.proto();
        let c = match self.csum {
            L4Csum::Valid => l4_checksum_for6(self.saddr, self.daddr, proto, &seg),
            L4Csum::None => {
                assert_eq!(proto, Proto::Udp, "only UDP may omit its checksum");
                0
            }
            L4Csum::Raw(v) => v,
        };
        put16(&mut seg, proto.csum_offset(), c);
        seg
    }

    /// The serialised extension-header chain, the last one's Next Header
    /// being the L4 protocol.
    pub fn ext_chain(&self) -> Vec<u8> {
        let upper = self.proto().number();
        let mut chain = Vec::new();
        for (i, e) in self.ext_headers.iter().enumerate() {
            let next = self.ext_headers.get(i + 1).map_or(upper, ExtHeader::number);
            chain.extend_from_slice(&e.serialize(next));
        }
        chain
    }

    /// Whether the chain has a Fragment header with offset ≠ 0 (then only
    /// the payload follows it).
    pub fn is_later_fragment(&self) -> bool {
        self.ext_headers.iter().any(|e| matches!(e, ExtHeader::Fragment { offset, .. } if *offset != 0))
    }

    /// The whole frame.
    pub fn build(&self) -> Vec<u8> {
        assert!(self.flow_label <= 0xF_FFFF, "flow label is 20 bits");
        if let Some(i) =
            self.ext_headers.iter().position(|e| matches!(e, ExtHeader::Fragment { offset, .. } if *offset != 0))
        {
            assert_eq!(i + 1, self.ext_headers.len(), "a non-first Fragment header must be the last extension header");
        }
        let chain = self.ext_chain();
        let body = if self.is_later_fragment() { self.payload.clone() } else { self.segment() };
        let payload_len = u16::try_from(chain.len() + body.len()).expect("IPv6 payload length (no jumbograms)");
        let first = self.ext_headers.first().map_or(self.proto().number(), ExtHeader::number);
        let vtf = (6u32 << 28) | (u32::from(self.traffic_class) << 20) | self.flow_label;
        let mut f = Vec::with_capacity(IP6_L4_OFF + usize::from(payload_len) + self.trailer.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
        f.extend_from_slice(&vtf.to_be_bytes());
        f.extend_from_slice(&payload_len.to_be_bytes());
        f.push(first);
        f.push(self.hop_limit);
        f.extend_from_slice(&self.saddr);
        f.extend_from_slice(&self.daddr);
        f.extend_from_slice(&chain);
        f.extend_from_slice(&body);
        f.extend_from_slice(&self.trailer);
        f
    }
}

// ---------------------------------------------------------------------------
// Spec oracles: funnel, unfunnel, NAT
// ---------------------------------------------------------------------------

/// The funnel header of protocol `proto` for an inner segment of
/// `inner_len` bytes, with its checksum field 0 (NOTES §1; the same bytes
/// for IPv4 and IPv6).
pub fn funnel_header(proto: Proto, sport: u16, dport: u16, inner_len: usize) -> Vec<u8> {
    let hlen = proto.funnel_header_len();
    let mut hdr = vec![0u8; hlen];
    put16(&mut hdr, 0, sport);
    put16(&mut hdr, 2, dport);
    match proto {
        Proto::Tcp => {
            put32(&mut hdr, 4, FUNNEL_TCP_SEQ);
            put32(&mut hdr, 8, FUNNEL_TCP_ACK);
            hdr[12] = 5 << 4;
            hdr[13] = FUNNEL_TCP_FLAGS;
            put16(&mut hdr, 14, FUNNEL_TCP_WINDOW);
            // checksum at 16, urg_ptr 0
        }
        Proto::Udp => put16(&mut hdr, 4, u16::try_from(hlen + inner_len).expect("UDP length")),
    }
    hdr
}

/// The frame `frame` becomes when funneled over `proto` with funnel header
/// ports `sport`/`dport`.  `frame` must be an IPv6 frame whose next header
/// is directly TCP or UDP (panics otherwise: a frame with extension headers
/// passes unchanged, see [`funnelable6`]).  Bytes after the IP packet stay
/// at the end.
pub fn expected_funnel6(frame: &[u8], proto: Proto, sport: u16, dport: u16) -> Vec<u8> {
    let ip = Ip6::of(frame);
    let inner_proto = Proto::from_number(ip.next_header)
        .unwrap_or_else(|| panic!("next header {} is not TCP/UDP: not funneled (passes unchanged)", ip.next_header));
    let mut inner = frame[ip.l4_off()..ip.end()].to_vec();
    rewrite_inner_csum(&mut inner, [0; 16], [0; 16], inner_proto);

    let mut seg = funnel_header(proto, sport, dport, inner.len());
    seg.extend_from_slice(&inner);
    let c = l4_checksum_for6(ip.saddr, ip.daddr, proto, &seg);
    put16(&mut seg, proto.csum_offset(), c);

    let mut out = frame[..ip.l4_off()].to_vec();
    out[IP6_OFF_NEXT_HEADER] = proto.number();
    let plen = u16::try_from(ip.payload_len + proto.funnel_header_len()).expect("funneled packet fits payload_len");
    put16(&mut out, IP6_OFF_PAYLOAD_LEN, plen);
    out.extend_from_slice(&seg);
    out.extend_from_slice(&frame[ip.end()..]);
    out
}

/// The frame `frame` (a funneled packet) becomes when unfunneled with inner
/// protocol `inner_proto`: the TCP (data offset × 4 bytes) or UDP (8 bytes)
/// header after the IPv6 header goes, next header = `inner_proto`, and the
/// inner checksum becomes valid for the current addresses (UDP 0 stays 0).
/// Panics when the next header is not directly TCP/UDP.
pub fn expected_unfunnel6(frame: &[u8], inner_proto: Proto) -> Vec<u8> {
    let ip = Ip6::of(frame);
    let outer = Proto::from_number(ip.next_header)
        .unwrap_or_else(|| panic!("next header {} is not TCP/UDP: not unfunneled (passes unchanged)", ip.next_header));
    let hlen = l4_header_len(outer, &frame[ip.l4_off()..]);
    let mut inner = frame[ip.l4_off() + hlen..ip.end()].to_vec();
    rewrite_inner_csum(&mut inner, ip.saddr, ip.daddr, inner_proto);
    let mut out = frame[..ip.l4_off()].to_vec();
    out[IP6_OFF_NEXT_HEADER] = inner_proto.number();
    put16(&mut out, IP6_OFF_PAYLOAD_LEN, (ip.payload_len - hlen) as u16);
    out.extend_from_slice(&inner);
    out.extend_from_slice(&frame[ip.end()..]);
    out
}

/// What an ip6tables NAT does to a funneled packet: new addresses and new
/// outer ports, with only the outer L4 checksum fixed, incrementally
/// (RFC 1624 eqn. 3; a UDP result of 0 is sent as 0xFFFF, a UDP checksum
/// of 0 is left alone).  No IP checksum exists; the inner segment is not
/// touched.  Panics when the next header is not directly TCP/UDP.
pub fn nat_rewrite6(frame: &[u8], saddr: [u8; 16], daddr: [u8; 16], sport: u16, dport: u16) -> Vec<u8> {
    let ip = Ip6::of(frame);
    let outer = Proto::from_number(ip.next_header).expect("outer TCP or UDP directly after the IPv6 header");
    let mut f = frame.to_vec();
    let old_addrs: Vec<u8> = [ip.saddr, ip.daddr].concat();
    let new_addrs: Vec<u8> = [saddr, daddr].concat();
    f[IP6_OFF_SADDR..IP6_OFF_SADDR + 16].copy_from_slice(&saddr);
    f[IP6_OFF_DADDR..IP6_OFF_DADDR + 16].copy_from_slice(&daddr);

    let l4 = ip.l4_off();
    let old_ports = f[l4..l4 + 4].to_vec();
    let mut new_ports = sport.to_be_bytes().to_vec();
    new_ports.extend_from_slice(&dport.to_be_bytes());
    let coff = l4 + outer.csum_offset();
    let c = be16(&f, coff);
    if !(outer == Proto::Udp && c == 0) {
        let old: Vec<u8> = [old_addrs.as_slice(), &old_ports].concat();
        let new: Vec<u8> = [new_addrs.as_slice(), &new_ports].concat();
        let mut c2 = csum_update(c, &old, &new);
        if outer == Proto::Udp && c2 == 0 {
            c2 = 0xFFFF;
        }
        put16(&mut f, coff, c2);
    }
    f[l4..l4 + 4].copy_from_slice(&new_ports);
    f
}

// ---------------------------------------------------------------------------
// Validators
// ---------------------------------------------------------------------------

fn check_l4_6_impl(seg: &[u8], saddr: [u8; 16], daddr: [u8; 16], proto: Proto, allow_zero: bool) -> Result<(), String> {
    match proto {
        Proto::Udp => {
            if seg.len() < 8 {
                return Err("UDP segment shorter than its header".into());
            }
            if usize::from(be16(seg, 4)) != seg.len() {
                return Err(format!("UDP length {} != segment length {}", be16(seg, 4), seg.len()));
            }
            if be16(seg, 6) == 0 {
                return if allow_zero {
                    Ok(())
                } else {
                    Err("UDP checksum 0, which is invalid over IPv6 (RFC 8200 §8.1)".into())
                };
            }
        }
        Proto::Tcp => {
            if seg.len() < 20 {
                return Err("TCP segment shorter than 20 bytes".into());
            }
            let doff = l4_header_len(Proto::Tcp, seg);
            if doff < 20 || doff > seg.len() {
                return Err(format!("TCP data offset {doff} bytes does not fit a {}-byte segment", seg.len()));
            }
        }
    }
    let s = pseudo_header6(saddr, daddr, proto.number(), seg.len()).add(seg).fold();
    if s != 0xFFFF {
        return Err(format!(
            "{} checksum {:#06x} invalid for {} -> {} (sum {s:#06x})",
            proto.name(),
            be16(seg, proto.csum_offset()),
            fmt6(saddr),
            fmt6(daddr)
        ));
    }
    Ok(())
}

/// The L4 segment `seg` of protocol `proto` has a valid checksum for the
/// IPv6 pseudo-header (`saddr`, `daddr`); a UDP segment's length field
/// equals the segment length.  Strict: a UDP checksum of 0 is an error
/// (IPv6 has no "no checksum").  See [`check_l4_6_zero_ok`].
pub fn check_l4_6(seg: &[u8], saddr: [u8; 16], daddr: [u8; 16], proto: Proto) -> Result<(), String> {
    check_l4_6_impl(seg, saddr, daddr, proto, false)
}

/// As [`check_l4_6`], but a UDP checksum of 0 passes: for inner headers,
/// whose 0 the funnel and unfunnel carry through unchanged.
pub fn check_l4_6_zero_ok(seg: &[u8], saddr: [u8; 16], daddr: [u8; 16], proto: Proto) -> Result<(), String> {
    check_l4_6_impl(seg, saddr, daddr, proto, true)
}

/// A plain (not funneled) packet, extension headers allowed: the chain is
/// well-formed ([`check_ext_chain6`]) and, unless it is a fragment, the L4
/// checksum is valid (strict: UDP 0 fails).
pub fn check_plain6(frame: &[u8]) -> Result<(), String> {
    check_ext_chain6(frame)?;
    let ip = Ip6::of(frame);
    if ip.is_fragment() {
        return Ok(());
    }
    let p = Proto::from_number(ip.upper).ok_or("not TCP/UDP")?;
    check_l4_6(&frame[ip.l4_off()..ip.end()], ip.saddr, ip.daddr, p).map_err(|e| format!("L4: {e}"))
}

/// A funneled packet: the outer L4 directly after the IPv6 header and
/// valid for the real addresses (strict), the inner L4 valid for `::`
/// addresses (UDP 0 allowed, as the funnel keeps it).
pub fn check_funneled6(frame: &[u8], inner: Proto) -> Result<(), String> {
    let ip = Ip6::of(frame);
    let outer = Proto::from_number(ip.next_header).ok_or("outer not TCP/UDP")?;
    let seg = &frame[ip.l4_off()..ip.end()];
    check_l4_6(seg, ip.saddr, ip.daddr, outer).map_err(|e| format!("outer: {e}"))?;
    let h = l4_header_len(outer, seg);
    check_l4_6_zero_ok(&seg[h..], [0; 16], [0; 16], inner).map_err(|e| format!("inner: {e}"))
}

/// Walks the extension-header chain of `frame` without panicking and
/// checks it against RFC 8200: every header inside payload_len, lengths in
/// 8-octet units, Hop-by-Hop only first, option areas made of whole TLVs
/// (Pad1, PadN with zero contents, others within bounds), the Fragment
/// header's reserved bits zero, and the chain ending in TCP/UDP (or
/// fragment data).  Returns the upper-layer protocol number.
pub fn check_ext_chain6(frame: &[u8]) -> Result<u8, String> {
    if frame.len() < IP6_L4_OFF || be16(frame, 12) != ETH_P_IPV6 || frame[ETH_HLEN] >> 4 != 6 {
        return Err("not an IPv6 frame".into());
    }
    let end = IP6_L4_OFF + usize::from(be16(frame, IP6_OFF_PAYLOAD_LEN));
    if end > frame.len() {
        return Err(format!("payload_len runs {} bytes past the frame", end - frame.len()));
    }
    let mut nh = frame[IP6_OFF_NEXT_HEADER];
    let mut off = IP6_L4_OFF;
    let mut first = true;
    loop {
        match nh {
            IPPROTO_TCP | IPPROTO_UDP => break,
            NEXTHDR_HOP | NEXTHDR_DEST | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_EXP1 | NEXTHDR_EXP2 => {}
            x => return Err(format!("next header {x} at {off}: neither TCP/UDP nor a header built here")),
        }
        if nh == NEXTHDR_HOP && !first {
            return Err(format!("Hop-by-Hop header at {off} is not the first"));
        }
        if off + 8 > end {
            return Err(format!("header {nh} at {off} runs past payload_len"));
        }
        let len = if nh == NEXTHDR_FRAGMENT { 8 } else { (usize::from(frame[off + 1]) + 1) * 8 };
        if off + len > end {
            return Err(format!("header {nh} at {off} ({len} bytes) runs past payload_len"));
        }
        let h = &frame[off..off + len];
        match nh {
            NEXTHDR_HOP | NEXTHDR_DEST => {
                let mut i = 2;
                while i < h.len() {
                    match h[i] {
                        0 => i += 1,
                        t => {
                            if i + 2 > h.len() || i + 2 + usize::from(h[i + 1]) > h.len() {
                                return Err(format!("option {t} at {} overruns header {nh} at {off}", off + i));
                            }
                            let n = usize::from(h[i + 1]);
                            if t == 1 && h[i + 2..i + 2 + n].iter().any(|&b| b != 0) {
                                return Err(format!("PadN at {} has non-zero contents", off + i));
                            }
                            i += 2 + n;
                        }
                    }
                }
                if i != h.len() {
                    return Err(format!("options of header {nh} at {off} overrun it"));
                }
            }
            NEXTHDR_FRAGMENT if h[1] != 0 || h[3] & 0x6 != 0 => {
                return Err(format!("Fragment header at {off} has reserved bits set"));
            }
            _ => {}
        }
        let next = h[0];
        off += len;
        first = false;
        if nh == NEXTHDR_FRAGMENT && be16(h, 2) >> 3 != 0 {
            // Fragment data follows; its protocol is the fragmentable
            // part's first header.
            nh = next;
            if !matches!(nh, IPPROTO_TCP | IPPROTO_UDP) {
                return Err(format!("non-first fragment of protocol {nh}"));
            }
            return Ok(nh);
        }
        nh = next;
    }
    let min = if nh == IPPROTO_TCP { 20 } else { 8 };
    if off + min > end {
        return Err(format!("L4 header at {off} runs past payload_len"));
    }
    Ok(nh)
}

// ---------------------------------------------------------------------------
// Diagnostics
// ---------------------------------------------------------------------------

/// A one-line summary of an IPv6 frame, for messages.
pub fn describe6(frame: &[u8]) -> String {
    let ip = Ip6::of(frame);
    let mut s = format!(
        "IPv6 {} -> {} tc {:#04x} fl {:#07x} hl {} plen {} nh {}",
        fmt6(ip.saddr),
        fmt6(ip.daddr),
        ip.traffic_class,
        ip.flow_label,
        ip.hop_limit,
        ip.payload_len,
        ip.next_header
    );
    for e in &ip.exts {
        let _ = write!(s, " [ext {} {}B]", e.number, e.len);
    }
    let _ = write!(s, " upper {} ({} bytes", ip.upper, ip.l4_len());
    if ip.end() < frame.len() {
        let _ = write!(s, ", trailer {}", frame.len() - ip.end());
    }
    s.push(')');
    s
}

// ---------------------------------------------------------------------------
// Self-check of the oracle
// ---------------------------------------------------------------------------

fn unhex(s: &str) -> Vec<u8> {
    assert_eq!(s.len() % 2, 0);
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn ensure(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

fn ensure_eq_bytes(what: &str, expected: &[u8], got: &[u8]) -> Result<(), String> {
    ensure(expected == got, || format!("{what}:\n{}", super::packet::diff(expected, got)))
}

/// Checks the oracle itself; call it from a test (`self_check().unwrap()`).  See the
/// comments of each part.
pub fn self_check() -> Result<(), String> {
    self_check_vectors()?;
    self_check_layout()?;
    self_check_round_trip()?;
    self_check_nat()?;
    self_check_ext()?;
    Ok(())
}

/// (a) Vectors from an independent implementation: scapy 2.5.0 (Debian's
/// python3-scapy), e.g.
/// `IPv6(raw(IPv6(src=..., dst=...)/UDP(sport=1234, dport=4739)/b"hello sfunnel"))[UDP].chksum`.
/// The funneled frames were built in scapy too: the inner segment's
/// checksum by building it under `IPv6(src="::", dst="::")`, then that
/// segment as `Raw` under `Ether()/IPv6(...)/TCP(sport=540, dport=179,
/// seq=0xCAFEBABE, ack=0xBABECAFE, flags="S", window=1024)` (or `UDP(...)`),
/// letting scapy fill in lengths and the outer checksum.  The extension
/// headers are scapy's `raw(IPv6ExtHdrHopByHop(nh=17))` etc.
fn self_check_vectors() -> Result<(), String> {
    // UDP 1234 -> 4739, 2001:db8::1 -> 2001:db8:1::2, "hello sfunnel": 0x85cc.
    let (s, d) = (a6("2001:db8::1"), a6("2001:db8:1::2"));
    let u = Packet6Spec::udp(1234, 4739, b"hello sfunnel").with_addrs(s, d);
    ensure_eq_bytes("UDP vector", &unhex("04d21283001585cc68656c6c6f207366756e6e656c"), &u.segment())?;
    let seg = u.segment();
    ensure(l4_checksum_for6(s, d, Proto::Udp, &seg) == 0x85cc, || "UDP vector checksum".into())?;
    check_l4_6(&seg, s, d, Proto::Udp)?;

    // TCP 40000 -> 443 (PA, seq 0x01020304, ack 0x0a0b0c0d, window 64240),
    // fd00::1 -> fd00:1::2, "odd payload!!" (odd length): 0x50da.
    let t = Packet6Spec::tcp(40000, 443, b"odd payload!!");
    let tv = unhex("9c4001bb010203040a0b0c0d5018faf050da00006f6464207061796c6f61642121");
    ensure_eq_bytes("TCP vector", &tv, &t.segment())?;
    check_l4_6(&tv, DEFAULT_SADDR6, DEFAULT_DADDR6, Proto::Tcp)?;

    // Funnel UDP 5000 -> 4739 "ipfix!" over TCP 540 -> 179 (tc 0x28, flow
    // 0x12345, hop limit 61, fd00::1 -> fd00:1::2): inner checksum with
    // zero addresses 0x91cc, outer 0xa3a4.
    let orig = unhex(
        "02000000000202000000000186dd62812345000e113dfd000000000000000000000000000001\
         fd00000100000000000000000000000213881283000e97c6697066697821",
    );
    let funneled = unhex(
        "02000000000202000000000186dd628123450022063dfd000000000000000000000000000001\
         fd000001000000000000000000000002021c00b3cafebabebabecafe50020400a3a4000013881283000e91cc697066697821",
    );
    ensure_eq_bytes("vector 3 build", &orig, &Packet6Spec::udp(5000, 4739, b"ipfix!").build())?;
    ensure_eq_bytes("vector 3 funnel", &funneled, &expected_funnel6(&orig, Proto::Tcp, 540, 179))?;
    ensure_eq_bytes("vector 3 unfunnel", &orig, &expected_unfunnel6(&funneled, Proto::Udp))?;

    // Funnel TCP 40000 -> 443 (A, seq 1, ack 2, window 512) "abc" over UDP
    // 4500 -> 4501 (tc 0, flow 0, hop limit 64, 2001:db8::1 ->
    // 2001:db8:1::2): inner with zero addresses 0x4b71, outer 0x812e.
    let orig = unhex(
        "02000000000202000000000186dd600000000017064020010db800000000000000000000000120010db8000100000000\
         0000000000029c4001bb000000010000000250100200effa0000616263",
    );
    let funneled = unhex(
        "02000000000202000000000186dd60000000001f114020010db800000000000000000000000120010db8000100000000000000000002\
         11941195001f812e9c4001bb0000000100000002501002004b710000616263",
    );
    let mut spec = Packet6Spec::tcp(40000, 443, b"abc").with_addrs(s, d).with_flow(0, 0, 64);
    if let L4::Tcp { seq, ack, flags, window, .. } = &mut spec.l4 {
        (*seq, *ack, *flags, *window) = (1, 2, 0x10, 512);
    }
    ensure_eq_bytes("vector 4 build", &orig, &spec.build())?;
    ensure_eq_bytes("vector 4 funnel", &funneled, &expected_funnel6(&orig, Proto::Udp, 4500, 4501))?;
    ensure_eq_bytes("vector 4 unfunnel", &orig, &expected_unfunnel6(&funneled, Proto::Tcp))?;

    // Extension headers, next header given.
    let ext: [(ExtHeader, u8, &str); 6] = [
        (ExtHeader::hop_by_hop(), 17, "1100010400000000"),
        (ExtHeader::dest_opts(), 6, "0600010400000000"),
        (ExtHeader::routing0(a6("2001:db8::99")), 17, "110200000000000020010db8000000000000000000000099"),
        (ExtHeader::srh(a6("fd00:1::2")), 17, "1102040000000000fd000001000000000000000000000002"),
        (ExtHeader::fragment(185, true, 0xdead_beef), 17, "110005c9deadbeef"),
        (ExtHeader::router_alert(), 6, "0600050200000100"),
    ];
    for (e, nh, hex) in ext {
        ensure_eq_bytes(&format!("{e:?}"), &unhex(hex), &e.serialize(nh))?;
    }
    Ok(())
}

/// (b) build → Ip6::of gives back the header fields and lengths.
fn self_check_layout() -> Result<(), String> {
    for proto in Proto::ALL {
        for n in [0usize, 1, 2, 7, 100, 1001] {
            for trailer in [&[][..], &[0xEE; 6][..]] {
                let payload: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
                let spec = match proto {
                    Proto::Tcp => Packet6Spec::tcp(1000, 2000, &payload),
                    Proto::Udp => Packet6Spec::udp(1000, 2000, &payload),
                }
                .with_flow(0xB8, 0xF_EDCB, 3)
                .with_trailer(trailer);
                let f = spec.build();
                let ip = Ip6::of(&f);
                let seglen = proto.funnel_header_len() + n; // plain header size = funnel header size
                let ok = ip.traffic_class == 0xB8
                    && ip.flow_label == 0xF_EDCB
                    && ip.hop_limit == 3
                    && ip.saddr == DEFAULT_SADDR6
                    && ip.daddr == DEFAULT_DADDR6
                    && ip.next_header == proto.number()
                    && ip.upper == proto.number()
                    && !ip.has_ext()
                    && ip.payload_len == seglen
                    && ip.l4_off() == 54
                    && ip.l4_len() == seglen
                    && ip.end() == 54 + seglen
                    && f.len() == ip.end() + trailer.len()
                    && f[ip.end()..] == *trailer
                    && f[ip.l4_off()..ip.end()] == spec.segment()[..];
                ensure(ok, || format!("layout {proto:?} {n}: {}", describe6(&f)))?;
                check_plain6(&f)?;
                ensure(funnelable6(&f), || "plain frame not funnelable".into())?;
            }
        }
    }
    // A computed UDP checksum of 0 goes out as 0xFFFF: choose the last
    // payload word so that the sum is 0xFFFF.
    let mut spec = Packet6Spec::udp(1, 2, &[0, 0]);
    let c = spec.clone().with_csum(L4Csum::Raw(0)).segment();
    let w = !pseudo_header6(spec.saddr, spec.daddr, IPPROTO_UDP, c.len()).add(&c).fold();
    spec.payload = w.to_be_bytes().to_vec();
    let seg = spec.segment();
    ensure(be16(&seg, 6) == 0xFFFF, || format!("UDP 0 not sent as 0xFFFF: {:#06x}", be16(&seg, 6)))?;
    check_l4_6(&seg, spec.saddr, spec.daddr, Proto::Udp)?;
    // Strictness of the validators.
    let z = Packet6Spec::udp(1, 2, b"x").with_csum(L4Csum::None).segment();
    ensure(check_l4_6(&z, DEFAULT_SADDR6, DEFAULT_DADDR6, Proto::Udp).is_err(), || "UDP 0 passed strict".into())?;
    check_l4_6_zero_ok(&z, DEFAULT_SADDR6, DEFAULT_DADDR6, Proto::Udp)?;
    let bad = Packet6Spec::tcp(1, 2, b"x").with_csum(L4Csum::Raw(0x1234)).segment();
    ensure(check_l4_6(&bad, DEFAULT_SADDR6, DEFAULT_DADDR6, Proto::Tcp).is_err(), || "bad TCP csum passed".into())?;
    Ok(())
}

fn spec_of(proto: Proto, n: usize, zero: bool, trailer: &[u8]) -> Packet6Spec {
    let payload: Vec<u8> = (0..n).map(|i| (i * 13 + 5) as u8).collect();
    let s = match proto {
        Proto::Tcp => Packet6Spec::tcp(40000 + n as u16, 443, &payload),
        Proto::Udp => Packet6Spec::udp(5000, 4739, &payload),
    };
    let s = if zero { s.with_csum(L4Csum::None) } else { s };
    s.with_trailer(trailer)
}

/// (c) funnel then unfunnel gives back the original frame, for all four
/// protocol pairs, odd and even lengths, trailers, and inner UDP 0.
fn self_check_round_trip() -> Result<(), String> {
    for inner in Proto::ALL {
        for outer in Proto::ALL {
            for zero in [false, true] {
                if zero && inner == Proto::Tcp {
                    continue;
                }
                for n in [0usize, 1, 6, 99, 1400] {
                    for trailer in [&[][..], &[0u8; 5][..]] {
                        let what = format!("{inner:?} over {outer:?} zero={zero} n={n} trailer={}", trailer.len());
                        let f = spec_of(inner, n, zero, trailer).build();
                        let fun = expected_funnel6(&f, outer, 540, 179);
                        check_funneled6(&fun, inner).map_err(|e| format!("{what}: {e}"))?;
                        let (a, b) = (Ip6::of(&f), Ip6::of(&fun));
                        let hl = outer.funnel_header_len();
                        let ok = b.payload_len == a.payload_len + hl
                            && b.next_header == outer.number()
                            && fun[14..18] == f[14..18]
                            && b.hop_limit == a.hop_limit
                            && (b.saddr, b.daddr) == (a.saddr, a.daddr)
                            && fun[54 + hl..][..inner.csum_offset()] == f[54..][..inner.csum_offset()]
                            && fun[b.end()..] == f[a.end()..]
                            && (!zero || be16(&fun, 54 + hl + 6) == 0);
                        ensure(ok, || format!("{what}: funneled frame fields: {}", describe6(&fun)))?;
                        ensure_eq_bytes(&what, &f, &expected_unfunnel6(&fun, inner))?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// (d) A NAT keeps the outer checksum valid for the new addresses, leaves
/// the inner segment alone, and after unfunnel the inner checksum is valid
/// for the new addresses: the result is the original built with them.
fn self_check_nat() -> Result<(), String> {
    let (ns, nd) = (a6("2001:db8:ffff::7"), a6("fd00:9::9:abcd"));
    for inner in Proto::ALL {
        for outer in Proto::ALL {
            for zero in [false, true] {
                if zero && inner == Proto::Tcp {
                    continue;
                }
                for n in [0usize, 3, 200] {
                    let what = format!("NAT {inner:?} over {outer:?} zero={zero} n={n}");
                    let spec = spec_of(inner, n, zero, &[]);
                    let fun = expected_funnel6(&spec.build(), outer, 540, 179);
                    let nat = nat_rewrite6(&fun, ns, nd, 33000, 8179);
                    let ip = Ip6::of(&nat);
                    let seg = &nat[ip.l4_off()..ip.end()];
                    check_l4_6(seg, ns, nd, outer).map_err(|e| format!("{what}: outer: {e}"))?;
                    let ok = (ip.saddr, ip.daddr) == (ns, nd)
                        && be16(seg, 0) == 33000
                        && be16(seg, 2) == 8179
                        && nat[54 + outer.funnel_header_len()..] == fun[54 + outer.funnel_header_len()..];
                    ensure(ok, || format!("{what}: {}", describe6(&nat)))?;
                    let un = expected_unfunnel6(&nat, inner);
                    let ip = Ip6::of(&un);
                    check_l4_6_zero_ok(&un[ip.l4_off()..ip.end()], ns, nd, inner)
                        .map_err(|e| format!("{what}: inner after unfunnel: {e}"))?;
                    ensure_eq_bytes(&what, &spec.clone().with_addrs(ns, nd).build(), &un)?;
                }
            }
        }
    }
    Ok(())
}

/// (e) Extension-header chains: every built frame's chain walks (both
/// [`check_ext_chain6`] and [`Ip6::of`]) to the L4 protocol, the lengths
/// add up, and the L4 checksum is valid where there is an L4 header.
fn self_check_ext() -> Result<(), String> {
    let x = a6("2001:db8::99");
    let mut chains: Vec<Vec<ExtHeader>> = vec![
        vec![ExtHeader::hop_by_hop()],
        vec![ExtHeader::router_alert()],
        vec![ExtHeader::dest_opts()],
        vec![ExtHeader::routing0(x)],
        vec![ExtHeader::Routing { rtype: 0, addresses: vec![x, DEFAULT_DADDR6] }],
        vec![ExtHeader::srh(DEFAULT_DADDR6)],
        vec![ExtHeader::fragment(0, true, 7)],
        vec![ExtHeader::fragment(0, false, 8)],
        vec![ExtHeader::fragment(185, false, 9)],
        vec![ExtHeader::fragment(1, true, 10)],
        vec![ExtHeader::Other { number: NEXTHDR_EXP1, data: vec![0x55; 11] }],
        vec![
            ExtHeader::hop_by_hop(),
            ExtHeader::dest_opts_with(3),
            ExtHeader::routing0(x),
            ExtHeader::fragment(0, true, 11),
            ExtHeader::dest_opts_with(9),
        ],
        vec![ExtHeader::router_alert(), ExtHeader::srh(DEFAULT_DADDR6), ExtHeader::fragment(42, true, 12)],
    ];
    for n in 0..=10 {
        chains.push(vec![ExtHeader::dest_opts_with(n)]);
        chains.push(vec![ExtHeader::HopByHop { options: ExtHeader::dest_opts_with(n).options_of() }]);
    }
    for chain in &chains {
        for proto in Proto::ALL {
            let mut spec = spec_of(proto, 33, false, &[1, 2, 3]);
            for e in chain {
                spec = spec.with_ext(e.clone());
            }
            let f = spec.build();
            let what = format!("{proto:?} {chain:?}: {}", describe6(&f));
            let upper = check_ext_chain6(&f).map_err(|e| format!("{what}: {e}"))?;
            let ip = Ip6::of(&f);
            let ext_total: usize = chain.iter().map(|e| e.serialize(0).len()).sum();
            let later = spec.is_later_fragment();
            let body_len = if later { spec.payload.len() } else { spec.segment().len() };
            let fragmented =
                chain.iter().any(|e| matches!(e, ExtHeader::Fragment { offset, more, .. } if *offset != 0 || *more));
            let ok = upper == proto.number()
                && ip.upper == proto.number()
                && ip.next_header == chain[0].number()
                && ip.exts.len() == chain.len()
                && ip.exts.iter().zip(chain).all(|(s, e)| s.number == e.number() && s.len % 8 == 0)
                && ip.ext_len() == ext_total
                && ip.payload_len == ext_total + body_len
                && ip.l4_len() == body_len
                && f.len() == ip.end() + 3
                && !funnelable6(&f)
                && ip.is_fragment() == fragmented;
            ensure(ok, || format!("{what}: chain layout"))?;
            if later {
                ensure(f[ip.l4_off()..ip.end()] == spec.payload[..], || format!("{what}: fragment data"))?;
            } else {
                check_l4_6(&f[ip.l4_off()..ip.end()], ip.saddr, ip.daddr, proto).map_err(|e| format!("{what}: {e}"))?;
            }
            if !ip.is_fragment() {
                check_plain6(&f).map_err(|e| format!("{what}: {e}"))?;
            }
        }
    }
    Ok(())
}
