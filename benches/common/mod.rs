//! Rulesets shared by the benchmarks.
#![allow(dead_code)]

/// Rule number `i` of a decoy set: a mix of the shapes real rulesets use
/// (exact addresses, /24 prefixes, port sets, funnel and unfunnel), none of
/// which matches the benchmark packets (192.168.1.1 → 192.168.1.2).
pub fn decoy(i: u32) -> String {
    let (a, b, c) = ((i >> 16) & 255, (i >> 8) & 255, i & 255);
    match i % 4 {
        0 => {
            format!("ip daddr 10.{a}.{b}.{c} udp dport 4739 actions funnel tcp sport 540 dport 179")
        }
        1 => format!("ip saddr 172.{}.{b}.{c} tcp dport 443 actions accept", 16 + a % 16),
        2 => format!("ip daddr 10.{a}.{b}.{c} tcp sport 540 dport 179 actions unfunnel udp"),
        _ => format!("ip saddr 10.{a}.{b}.0/24 udp dport {{ {}, {} }} actions drop", 1 + i % 30000, 30001 + i % 30000),
    }
}

/// The IPv6 form of [`decoy`]: none matches 2001:db8::1 → 2001:db8::2.
pub fn decoy6(i: u32) -> String {
    let (a, b) = ((i >> 16) & 0xffff, i & 0xffff);
    match i % 4 {
        0 => format!("ip6 daddr fd00:{a:x}::{b:x} udp dport 4739 actions funnel tcp sport 540 dport 179"),
        1 => format!("ip6 saddr fd01:{a:x}:{b:x}::/48 tcp dport 443 actions accept"),
        2 => format!("ip6 daddr fd00:{a:x}::{b:x} tcp sport 540 dport 179 actions unfunnel udp"),
        _ => format!(
            "ip6 saddr fd02:{a:x}:{b:x}::/64 udp dport {{ {}, {} }} actions drop",
            1 + i % 30000,
            30001 + i % 30000
        ),
    }
}

/// `n` rules: `n - real.len()` decoys, then the real ones.
pub fn ruleset_with_decoys(n: usize, real: &[&str]) -> String {
    ruleset_with(n, real, decoy)
}

/// `n` rules: `n - real.len()` rules made by `decoy`, then the real ones.
pub fn ruleset_with(n: usize, real: &[&str], decoy: fn(u32) -> String) -> String {
    let mut text = String::with_capacity(n * 80);
    for i in 0..n.saturating_sub(real.len()) {
        text.push_str(&decoy(i as u32));
        text.push('\n');
    }
    for r in real {
        text.push_str(r);
        text.push('\n');
    }
    text
}

/// Median of `runs` timings of `f`, in seconds.
pub fn median_secs(runs: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let start = std::time::Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).expect("timings are finite"));
    t[t.len() / 2]
}

/// The Internet checksum of `data` (RFC 1071), seeded with `sum`.
fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Appends a TCP (ACK|PSH) or UDP header with `payload` zero bytes to `f`,
/// with its checksum over the pseudo-header whose addresses sum (16-bit
/// words) to `addr_sum`: the same for IPv4 and IPv6 below 64 KiB.
fn push_l4(f: &mut Vec<u8>, proto: u8, sport: u16, dport: u16, payload: usize, addr_sum: u32) {
    let l4 = f.len();
    let l4_len = if proto == 6 { 20 } else { 8 } + payload;
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    if proto == 6 {
        f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        f.extend_from_slice(&(l4_len as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
    }
    f.resize(l4 + l4_len, 0);
    let csum_at = l4 + if proto == 6 { 16 } else { 6 };
    let c = checksum(&f[l4..], addr_sum + u32::from(proto) + l4_len as u32);
    f[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
}

/// The sum of the 16-bit words of `b` (an even number of bytes).
fn words(b: &[u8]) -> u32 {
    b.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum()
}

/// An Ethernet + IPv4 + TCP/UDP frame 192.168.1.1 → 192.168.1.2 with
/// `payload` zero bytes and valid checksums, as a host would send it.
pub fn frame(proto: u8, sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let l4_len = if proto == 6 { 20 } else { 8 } + payload;
    let tot_len = 20 + l4_len;
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&[0x45, 0, (tot_len >> 8) as u8, tot_len as u8, 0, 1, 0x40, 0, 64, proto, 0, 0]);
    f.extend_from_slice(&[192, 168, 1, 1, 192, 168, 1, 2]);
    let ip_csum = checksum(&f[14..34], 0);
    f[24..26].copy_from_slice(&ip_csum.to_be_bytes());
    let addr_sum = words(&f[26..34]);
    push_l4(&mut f, proto, sport, dport, payload, addr_sum);
    f
}

/// An Ethernet + IPv6 + TCP/UDP frame 2001:db8::1 → 2001:db8::2 with
/// `payload` zero bytes and a valid checksum (RFC 8200 §8.1 pseudo-header).
pub fn frame6(proto: u8, sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let l4_len = if proto == 6 { 20 } else { 8 } + payload;
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&[0x86, 0xdd]);
    f.extend_from_slice(&[0x60, 0, 0, 0, (l4_len >> 8) as u8, l4_len as u8, proto, 64]);
    f.extend_from_slice(&[0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    let addr_sum = words(&f[22..54]);
    push_l4(&mut f, proto, sport, dport, payload, addr_sum);
    f
}
