//! Independent, specification-based packet code for the datapath tests.
//!
//! Everything here is written from /work/shared/NOTES.md §1 (the wire
//! format) and the RFCs (791, 793, 768, 1071, 1624), not from the BPF code:
//! these builders are the oracle the datapath is checked against.
//!
//! Frames are Ethernet II + IPv4 (+ options) + TCP/UDP + payload.  Byte
//! offsets below are relative to the start of the frame unless stated.

use std::fmt::Write as _;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The fixed fields of the TCP funnel header (NOTES §1).
pub const FUNNEL_TCP_SEQ: u32 = 0xCAFE_BABE;
pub const FUNNEL_TCP_ACK: u32 = 0xBABE_CAFE;
pub const FUNNEL_TCP_FLAGS: u8 = 0x02; // SYN only
pub const FUNNEL_TCP_WINDOW: u16 = 1024;

/// IPv4 flag bits in the 16-bit flags/fragment-offset word.
pub const IP_DF: u16 = 0x4000;
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFMASK: u16 = 0x1FFF;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub const ALL: [Proto; 2] = [Proto::Tcp, Proto::Udp];

    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            IPPROTO_TCP => Some(Proto::Tcp),
            IPPROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }

    /// The other protocol.
    pub fn other(self) -> Proto {
        match self {
            Proto::Tcp => Proto::Udp,
            Proto::Udp => Proto::Tcp,
        }
    }

    /// Rule-language name.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// Size of the funnel header of this protocol.
    pub fn funnel_header_len(self) -> usize {
        match self {
            Proto::Tcp => 20,
            Proto::Udp => 8,
        }
    }

    /// Offset of the checksum field inside the L4 header.
    pub fn csum_offset(self) -> usize {
        match self {
            Proto::Tcp => 16,
            Proto::Udp => 6,
        }
    }
}

// ---------------------------------------------------------------------------
// RFC 1071 Internet checksum
// ---------------------------------------------------------------------------

/// A running ones'-complement sum of a byte stream, which may be fed in
/// pieces of any length (odd pieces continue at the right byte lane).
#[derive(Clone, Copy, Debug, Default)]
pub struct Csum {
    sum: u64,
    odd: bool,
}

impl Csum {
    pub fn new() -> Csum {
        Csum::default()
    }

    pub fn add(&mut self, mut data: &[u8]) -> &mut Csum {
        if self.odd {
            if let Some((&b, rest)) = data.split_first() {
                self.sum += u64::from(b);
                self.odd = false;
                data = rest;
            }
        }
        let mut chunks = data.chunks_exact(2);
        for c in &mut chunks {
            self.sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [b] = chunks.remainder() {
            self.sum += u64::from(*b) << 8;
            self.odd = true;
        }
        self
    }

    pub fn add_u16(&mut self, v: u16) -> &mut Csum {
        self.add(&v.to_be_bytes())
    }

    /// The folded 16-bit ones'-complement sum.
    pub fn fold(&self) -> u16 {
        let mut s = self.sum;
        while s >> 16 != 0 {
            s = (s & 0xFFFF) + (s >> 16);
        }
        s as u16
    }

    /// The checksum: the complement of the folded sum.
    pub fn checksum(&self) -> u16 {
        !self.fold()
    }
}

/// RFC 1071 checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    Csum::new().add(data).checksum()
}

/// The sum of the TCP/UDP pseudo-header.
pub fn pseudo_header(saddr: [u8; 4], daddr: [u8; 4], proto: u8, l4_len: usize) -> Csum {
    let len = u16::try_from(l4_len).expect("L4 length fits 16 bits");
    let mut c = Csum::new();
    c.add(&saddr).add(&daddr).add(&[0, proto]).add_u16(len);
    c
}

/// The checksum a TCP/UDP segment must carry for these pseudo-header
/// addresses (its current checksum field is ignored).  A UDP result of 0 is
/// sent as 0xFFFF (RFC 768).
pub fn l4_checksum_for(saddr: [u8; 4], daddr: [u8; 4], proto: Proto, segment: &[u8]) -> u16 {
    let off = proto.csum_offset();
    let mut c = pseudo_header(saddr, daddr, proto.number(), segment.len());
    c.add(&segment[..off]).add(&[0, 0]).add(&segment[off + 2..]);
    let v = c.checksum();
    if proto == Proto::Udp && v == 0 {
        0xFFFF
    } else {
        v
    }
}

/// RFC 1624 eqn. 3: a checksum updated for 16-bit words `old` → `new`
/// (both slices of equal, even length).
pub fn csum_update(hc: u16, old: &[u8], new: &[u8]) -> u16 {
    assert_eq!(old.len(), new.len());
    assert_eq!(old.len() % 2, 0);
    let mut s = u64::from(!hc);
    for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
        s += u64::from(!u16::from_be_bytes([o[0], o[1]]));
        s += u64::from(u16::from_be_bytes([n[0], n[1]]));
    }
    while s >> 16 != 0 {
        s = (s & 0xFFFF) + (s >> 16);
    }
    !(s as u16)
}

// ---------------------------------------------------------------------------
// Field access
// ---------------------------------------------------------------------------

pub fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

pub fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

pub fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

pub fn addr(b: &[u8], off: usize) -> [u8; 4] {
    [b[off], b[off + 1], b[off + 2], b[off + 3]]
}

/// The IPv4 layout of a frame the builders produced (or a funneled one).
/// Panics on anything that is not a well-formed IPv4 frame.
#[derive(Clone, Copy, Debug)]
pub struct Ip {
    /// IP header length in bytes (IHL * 4).
    pub hlen: usize,
    pub tot_len: usize,
    pub proto: u8,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

impl Ip {
    pub fn of(frame: &[u8]) -> Ip {
        assert!(frame.len() >= ETH_HLEN + 20, "frame too short for IPv4");
        assert_eq!(be16(frame, 12), ETH_P_IP, "not an IPv4 frame");
        let ip = &frame[ETH_HLEN..];
        assert_eq!(ip[0] >> 4, 4, "IP version");
        let hlen = usize::from(ip[0] & 0xF) * 4;
        assert!(hlen >= 20);
        let tot_len = usize::from(be16(ip, 2));
        assert!(ETH_HLEN + tot_len <= frame.len(), "truncated frame");
        Ip { hlen, tot_len, proto: ip[9], saddr: addr(ip, 12), daddr: addr(ip, 16) }
    }

    /// Frame offset of the L4 header.
    pub fn l4_off(&self) -> usize {
        ETH_HLEN + self.hlen
    }

    /// Frame offset just past the IP packet (start of any Ethernet padding).
    pub fn end(&self) -> usize {
        ETH_HLEN + self.tot_len
    }

    pub fn l4_len(&self) -> usize {
        self.tot_len - self.hlen
    }
}

/// Rewrites the IPv4 header checksum from scratch.
pub fn fix_ip_checksum(frame: &mut [u8]) {
    let hlen = usize::from(frame[ETH_HLEN] & 0xF) * 4;
    put16(frame, ETH_HLEN + 10, 0);
    let c = checksum(&frame[ETH_HLEN..ETH_HLEN + hlen]);
    put16(frame, ETH_HLEN + 10, c);
}

/// Length of a TCP/UDP header at the start of `seg`.
pub fn l4_header_len(proto: Proto, seg: &[u8]) -> usize {
    match proto {
        Proto::Tcp => usize::from(seg[12] >> 4) * 4,
        Proto::Udp => 8,
    }
}

// ---------------------------------------------------------------------------
// Builder
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp { sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, window: u16, urg: u16, options: Vec<u8> },
    Udp { sport: u16, dport: u16 },
}

/// Checksum policy of the built L4 header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Csum {
    /// The correct checksum for the packet's addresses.
    Valid,
    /// UDP only: 0, "no checksum".
    None,
    /// This exact value.
    Raw(u16),
}

/// Everything needed to build one test frame.
#[derive(Clone, Debug)]
pub struct PacketSpec {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub tos: u8,
    pub id: u16,
    /// Flags (DF/MF) and fragment offset word, host order.
    pub frag: u16,
    pub ttl: u8,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// IP options; a multiple of 4 bytes, at most 40.
    pub ip_options: Vec<u8>,
    pub l4: L4,
    pub payload: Vec<u8>,
    pub csum: L4Csum,
    /// Bytes appended after the IP packet (Ethernet padding).
    pub trailer: Vec<u8>,
}

impl PacketSpec {
    fn base(l4: L4, payload: &[u8]) -> PacketSpec {
        PacketSpec {
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            tos: 0,
            id: 0x1234,
            frag: IP_DF,
            ttl: 61,
            saddr: [10, 0, 0, 1],
            daddr: [192, 168, 1, 2],
            ip_options: Vec::new(),
            l4,
            payload: payload.to_vec(),
            csum: L4Csum::Valid,
            trailer: Vec::new(),
        }
    }

    /// A TCP segment (ACK|PSH) from 10.0.0.1 to 192.168.1.2.
    pub fn tcp(sport: u16, dport: u16, payload: &[u8]) -> PacketSpec {
        PacketSpec::base(
            L4::Tcp {
                sport,
                dport,
                seq: 0x0102_0304,
                ack: 0x0A0B_0C0D,
                flags: 0x18,
                window: 64240,
                urg: 0,
                options: Vec::new(),
            },
            payload,
        )
    }

    /// A UDP datagram from 10.0.0.1 to 192.168.1.2.
    pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> PacketSpec {
        PacketSpec::base(L4::Udp { sport, dport }, payload)
    }

    pub fn proto(&self) -> Proto {
        match self.l4 {
            L4::Tcp { .. } => Proto::Tcp,
            L4::Udp { .. } => Proto::Udp,
        }
    }

    pub fn with_options(mut self, opts: &[u8]) -> PacketSpec {
        self.ip_options = opts.to_vec();
        self
    }

    pub fn with_addrs(mut self, saddr: [u8; 4], daddr: [u8; 4]) -> PacketSpec {
        self.saddr = saddr;
        self.daddr = daddr;
        self
    }

    pub fn with_frag(mut self, frag: u16) -> PacketSpec {
        self.frag = frag;
        self
    }

    pub fn with_csum(mut self, csum: L4Csum) -> PacketSpec {
        self.csum = csum;
        self
    }

    pub fn with_trailer(mut self, t: &[u8]) -> PacketSpec {
        self.trailer = t.to_vec();
        self
    }

    /// The L4 segment (header + payload) with a correct checksum for the
    /// given pseudo-header addresses, or per `self.csum`.
    pub fn segment(&self) -> Vec<u8> {
        let mut seg = Vec::new();
        match &self.l4 {
            L4::Tcp { sport, dport, seq, ack, flags, window, urg, options } => {
                assert_eq!(options.len() % 4, 0, "TCP options are whole words");
                assert!(options.len() <= 40);
                seg.extend_from_slice(&sport.to_be_bytes());
                seg.extend_from_slice(&dport.to_be_bytes());
                seg.extend_from_slice(&seq.to_be_bytes());
                seg.extend_from_slice(&ack.to_be_bytes());
                seg.push((((20 + options.len()) / 4) as u8) << 4);
                seg.push(*flags);
                seg.extend_from_slice(&window.to_be_bytes());
                seg.extend_from_slice(&[0, 0]);
                seg.extend_from_slice(&urg.to_be_bytes());
                seg.extend_from_slice(options);
            }
            L4::Udp { sport, dport } => {
                let len = u16::try_from(8 + self.payload.len()).expect("UDP length");
                seg.extend_from_slice(&sport.to_be_bytes());
                seg.extend_from_slice(&dport.to_be_bytes());
                seg.extend_from_slice(&len.to_be_bytes());
                seg.extend_from_slice(&[0, 0]);
            }
        }
        seg.extend_from_slice(&self.payload);
        let proto = self.proto();
        let c = match self.csum {
            L4Csum::Valid => l4_checksum_for(self.saddr, self.daddr, proto, &seg),
            L4Csum::None => {
                assert_eq!(proto, Proto::Udp, "only UDP may omit its checksum");
                0
            }
            L4Csum::Raw(v) => v,
        };
        put16(&mut seg, proto.csum_offset(), c);
        seg
    }

    /// The whole frame.
    pub fn build(&self) -> Vec<u8> {
        assert_eq!(self.ip_options.len() % 4, 0, "IP options are whole words");
        assert!(self.ip_options.len() <= 40);
        let seg = self.segment();
        let hlen = 20 + self.ip_options.len();
        let tot_len = u16::try_from(hlen + seg.len()).expect("IP total length");
        let mut f = Vec::with_capacity(ETH_HLEN + usize::from(tot_len) + self.trailer.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&ETH_P_IP.to_be_bytes());
        f.push(0x40 | (hlen / 4) as u8);
        f.push(self.tos);
        f.extend_from_slice(&tot_len.to_be_bytes());
        f.extend_from_slice(&self.id.to_be_bytes());
        f.extend_from_slice(&self.frag.to_be_bytes());
        f.push(self.ttl);
        f.push(self.proto().number());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&self.saddr);
        f.extend_from_slice(&self.daddr);
        f.extend_from_slice(&self.ip_options);
        fix_ip_checksum(&mut f);
        f.extend_from_slice(&seg);
        f.extend_from_slice(&self.trailer);
        f
    }
}

/// IP options of `len` bytes (a multiple of 4, ≤ 40): a Record Route
/// option when there is room, NOP-padded and EOL-terminated, else NOPs.
pub fn ip_options(len: usize) -> Vec<u8> {
    assert!(len % 4 == 0 && len <= 40);
    if len == 0 {
        return Vec::new();
    }
    if len < 8 {
        return vec![1; len]; // NOPs
    }
    // RR: type 7, length, pointer 4 (empty), then room for addresses.
    let rr_len = 3 + ((len - 4) / 4) * 4; // 3 + k*4 ≤ len - 1
    let mut o = vec![7, rr_len as u8, 4];
    o.resize(rr_len, 0);
    o.push(0); // EOL
    o.resize(len, 0);
    o
}

// ---------------------------------------------------------------------------
// Spec oracles: funnel, unfunnel, NAT
// ---------------------------------------------------------------------------

/// The frame `frame` becomes when funneled over `proto` with funnel header
/// ports `sport`/`dport` (NOTES §1).  `frame` must be a well-formed,
/// non-fragmented IPv4 TCP/UDP frame whose inner checksum is valid; bytes
/// after the IP packet (Ethernet padding) stay at the end.
pub fn expected_funnel(frame: &[u8], proto: Proto, sport: u16, dport: u16) -> Vec<u8> {
    let ip = Ip::of(frame);
    let inner_proto = Proto::from_number(ip.proto).expect("inner TCP or UDP");
    let mut inner = frame[ip.l4_off()..ip.end()].to_vec();

    // Inner checksum: valid with saddr = daddr = 0.0.0.0; UDP 0 stays 0.
    let off = inner_proto.csum_offset();
    if !(inner_proto == Proto::Udp && be16(&inner, off) == 0) {
        let c = l4_checksum_for([0; 4], [0; 4], inner_proto, &inner);
        put16(&mut inner, off, c);
    }

    // The funnel header.
    let hlen = proto.funnel_header_len();
    let new_l4_len = hlen + inner.len();
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
            // checksum at 16 (below), urg_ptr 0
        }
        Proto::Udp => {
            put16(&mut hdr, 4, u16::try_from(new_l4_len).expect("UDP length"));
        }
    }
    let mut seg = hdr;
    seg.extend_from_slice(&inner);
    let c = l4_checksum_for(ip.saddr, ip.daddr, proto, &seg);
    put16(&mut seg, proto.csum_offset(), c);

    let mut out = frame[..ip.l4_off()].to_vec();
    out[ETH_HLEN + 9] = proto.number();
    let tot_len = u16::try_from(ip.tot_len + hlen).expect("funneled packet fits tot_len");
    put16(&mut out, ETH_HLEN + 2, tot_len);
    fix_ip_checksum(&mut out);
    out.extend_from_slice(&seg);
    out.extend_from_slice(&frame[ip.end()..]);
    out
}

/// The frame `frame` (a funneled packet) becomes when unfunneled with inner
/// protocol `inner_proto` (NOTES §1): the header after the IPv4 header goes,
/// the inner checksum becomes valid for the current addresses (UDP 0 stays 0).
pub fn expected_unfunnel(frame: &[u8], inner_proto: Proto) -> Vec<u8> {
    let ip = Ip::of(frame);
    let outer = Proto::from_number(ip.proto).expect("outer TCP or UDP");
    let hlen = l4_header_len(outer, &frame[ip.l4_off()..]);
    let mut inner = frame[ip.l4_off() + hlen..ip.end()].to_vec();
    let off = inner_proto.csum_offset();
    if !(inner_proto == Proto::Udp && be16(&inner, off) == 0) {
        let c = l4_checksum_for(ip.saddr, ip.daddr, inner_proto, &inner);
        put16(&mut inner, off, c);
    }
    let mut out = frame[..ip.l4_off()].to_vec();
    out[ETH_HLEN + 9] = inner_proto.number();
    put16(&mut out, ETH_HLEN + 2, (ip.tot_len - hlen) as u16);
    fix_ip_checksum(&mut out);
    out.extend_from_slice(&inner);
    out.extend_from_slice(&frame[ip.end()..]);
    out
}

/// What a NAT does to a funneled packet: new addresses and new outer
/// ports, with only the IP checksum and the outer L4 checksum fixed, and
/// those incrementally (RFC 1624).  The inner segment is not touched.
pub fn nat_rewrite(frame: &[u8], saddr: [u8; 4], daddr: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let ip = Ip::of(frame);
    let outer = Proto::from_number(ip.proto).expect("outer TCP or UDP");
    let mut f = frame.to_vec();
    let old_addrs: Vec<u8> = [ip.saddr, ip.daddr].concat();
    let new_addrs: Vec<u8> = [saddr, daddr].concat();

    let ipc = be16(&f, ETH_HLEN + 10);
    put16(&mut f, ETH_HLEN + 10, csum_update(ipc, &old_addrs, &new_addrs));
    f[ETH_HLEN + 12..ETH_HLEN + 16].copy_from_slice(&saddr);
    f[ETH_HLEN + 16..ETH_HLEN + 20].copy_from_slice(&daddr);

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

/// The IPv4 header checksum of `frame` is valid.
pub fn check_ip(frame: &[u8]) -> Result<(), String> {
    let ip = Ip::of(frame);
    let s = Csum::new().add(&frame[ETH_HLEN..ETH_HLEN + ip.hlen]).fold();
    if s != 0xFFFF {
        return Err(format!("IP header checksum invalid (sum {s:#06x})"));
    }
    Ok(())
}

/// The L4 segment `seg` of protocol `proto` has a valid checksum for the
/// pseudo-header (`saddr`, `daddr`).  A UDP checksum of 0 ("none") passes.
pub fn check_l4(seg: &[u8], saddr: [u8; 4], daddr: [u8; 4], proto: Proto) -> Result<(), String> {
    if proto == Proto::Udp {
        if seg.len() < 8 {
            return Err("UDP segment shorter than its header".into());
        }
        if usize::from(be16(seg, 4)) != seg.len() {
            return Err(format!("UDP length {} != segment length {}", be16(seg, 4), seg.len()));
        }
        if be16(seg, 6) == 0 {
            return Ok(());
        }
    }
    let s = pseudo_header(saddr, daddr, proto.number(), seg.len()).add(seg).fold();
    if s != 0xFFFF {
        return Err(format!(
            "{} checksum {:#06x} invalid for {:?} -> {:?} (sum {s:#06x})",
            proto.name(),
            be16(seg, proto.csum_offset()),
            saddr,
            daddr
        ));
    }
    Ok(())
}

/// A plain (not funneled) packet: IP and L4 checksums valid.
pub fn check_plain(frame: &[u8]) -> Result<(), String> {
    check_ip(frame)?;
    let ip = Ip::of(frame);
    let p = Proto::from_number(ip.proto).ok_or("not TCP/UDP")?;
    check_l4(&frame[ip.l4_off()..ip.end()], ip.saddr, ip.daddr, p).map_err(|e| format!("L4: {e}"))
}

/// A funneled packet: IP valid, outer L4 valid for the real addresses,
/// inner L4 valid for zero addresses.
pub fn check_funneled(frame: &[u8], inner: Proto) -> Result<(), String> {
    check_ip(frame)?;
    let ip = Ip::of(frame);
    let outer = Proto::from_number(ip.proto).ok_or("outer not TCP/UDP")?;
    let seg = &frame[ip.l4_off()..ip.end()];
    check_l4(seg, ip.saddr, ip.daddr, outer).map_err(|e| format!("outer: {e}"))?;
    let h = l4_header_len(outer, seg);
    check_l4(&seg[h..], [0; 4], [0; 4], inner).map_err(|e| format!("inner: {e}"))
}

// ---------------------------------------------------------------------------
// Diagnostics
// ---------------------------------------------------------------------------

/// A readable comparison of two frames: lengths, then every run of
/// differing bytes with its offset, then short hex dumps.
pub fn diff(expected: &[u8], got: &[u8]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "  expected {} bytes, got {} bytes", expected.len(), got.len());
    let n = expected.len().max(got.len());
    let mut runs = 0;
    let mut i = 0;
    while i < n {
        if expected.get(i) == got.get(i) {
            i += 1;
            continue;
        }
        let start = i;
        while i < n && expected.get(i) != got.get(i) && i - start < 16 {
            i += 1;
        }
        let show = |b: &[u8], r: std::ops::Range<usize>| {
            r.map(|k| b.get(k).map_or("--".to_string(), |x| format!("{x:02x}"))).collect::<Vec<_>>().join(" ")
        };
        runs += 1;
        if runs <= 24 {
            let _ = writeln!(
                s,
                "  offset {start:5} (0x{start:04x}) {}: expected [{}] got [{}]",
                region(expected, start),
                show(expected, start..i),
                show(got, start..i)
            );
        }
    }
    if runs > 24 {
        let _ = writeln!(s, "  ... {} more differing runs", runs - 24);
    }
    let _ = writeln!(s, "  expected: {}", hex(&expected[..expected.len().min(96)]));
    let _ = writeln!(s, "  got:      {}", hex(&got[..got.len().min(96)]));
    s
}

/// Which header a frame offset falls in, as far as can be told.
fn region(frame: &[u8], off: usize) -> &'static str {
    if off < ETH_HLEN {
        return "eth";
    }
    if frame.len() < ETH_HLEN + 20 || be16(frame, 12) != ETH_P_IP {
        return "l3";
    }
    let hlen = usize::from(frame[ETH_HLEN] & 0xF) * 4;
    match off - ETH_HLEN {
        10 | 11 => "ip csum",
        2 | 3 => "ip tot_len",
        9 => "ip proto",
        x if x < 20 => "ip",
        x if x < hlen => "ip options",
        x => match (frame[ETH_HLEN + 9], x - hlen) {
            (IPPROTO_TCP, 16 | 17) => "l4 csum (tcp)",
            (IPPROTO_UDP, 6 | 7) => "l4 csum (udp)",
            (_, y) if y < 8 => "l4 header",
            _ => "l4",
        },
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join("")
}

// ---------------------------------------------------------------------------
// The `funneled` match and `unfunnel auto`, by their definitions (docs/rules.md,
// "Recognising funneled packets")
// ---------------------------------------------------------------------------

/// Which inner protocols fit the bytes after the outer L4 header of a
/// well-formed frame: (UDP, TCP).  The definition, literally: the outer
/// header is a TCP header of 20 bytes or a UDP header with a checksum, the
/// outer checksum is valid, and
/// - UDP: the inner length field equals the remaining length and the inner
///   checksum is 0 or valid with zero addresses;
/// - TCP: at least 20 bytes remain, the data offset is ≥ 5 and fits, and the
///   inner checksum is valid with zero addresses.
///
/// The payload is summed here; the datapath derives the same answer from
/// the outer checksum (valid, by the second condition) without reading it.
pub fn inner_fits(frame: &[u8]) -> (bool, bool) {
    let ip = Ip::of(frame);
    let Some(outer) = Proto::from_number(ip.proto) else { return (false, false) };
    let seg = &frame[ip.l4_off()..ip.end()];
    let min = if outer == Proto::Tcp { 20 } else { 8 };
    if seg.len() < min || l4_header_len(outer, seg) != min {
        return (false, false);
    }
    if outer == Proto::Udp && be16(seg, 6) == 0 {
        return (false, false);
    }
    if check_l4(seg, ip.saddr, ip.daddr, outer).is_err() {
        return (false, false);
    }
    let inner = &seg[min..];
    let n = inner.len();
    if n < 8 {
        return (false, false);
    }
    let udp = usize::from(be16(inner, 4)) == n && check_l4(inner, [0; 4], [0; 4], Proto::Udp).is_ok();
    let tcp = n >= 20 && {
        let doff = usize::from(inner[12] >> 4) * 4;
        doff >= 20 && doff <= n && check_l4(inner, [0; 4], [0; 4], Proto::Tcp).is_ok()
    };
    (udp, tcp)
}

/// The `funneled` match: a TCP packet whose header carries the funnel
/// header's fixed fields (seq, ack, data offset 5, flags SYN only, window),
/// or a UDP packet with a plausible inner header ([`inner_fits`]).
pub fn looks_funneled(frame: &[u8]) -> bool {
    let ip = Ip::of(frame);
    let seg = &frame[ip.l4_off()..ip.end()];
    match Proto::from_number(ip.proto) {
        Some(Proto::Tcp) => {
            seg.len() >= 20
                && u32::from_be_bytes([seg[4], seg[5], seg[6], seg[7]]) == FUNNEL_TCP_SEQ
                && u32::from_be_bytes([seg[8], seg[9], seg[10], seg[11]]) == FUNNEL_TCP_ACK
                && seg[12] == 5 << 4
                && seg[13] == FUNNEL_TCP_FLAGS
                && be16(seg, 14) == FUNNEL_TCP_WINDOW
        }
        Some(Proto::Udp) => inner_fits(frame) != (false, false),
        None => false,
    }
}

/// What `unfunnel auto` decides: the one protocol that fits, else None.
pub fn auto_inner(frame: &[u8]) -> Option<Proto> {
    match inner_fits(frame) {
        (true, false) => Some(Proto::Udp),
        (false, true) => Some(Proto::Tcp),
        _ => None,
    }
}
