//! Shared helpers of the datapath integration tests: the privilege check,
//! loading the program with a ruleset, and random packet generation.  The
//! packet oracles live in `packet`, the PRNG in `rng`.

#![allow(dead_code)]

pub mod capture;
pub mod packet;
pub mod packet6;
pub mod rng;
pub mod table;
pub mod topology;

use anyhow::{Context, Result};
use sfunnel::datapath::{Loaded, RulesetMaps, Settings};

use packet::{ip_options, L4Csum, PacketSpec, Proto, L4};
use rng::Rng;

/// Whether this test may run.  The datapath tests load BPF programs, which
/// needs root (CAP_BPF + CAP_NET_ADMIN).  Without root this prints a loud
/// message and *fails*, unless SFUNNEL_ALLOW_SKIP=1, in which case it
/// returns false and the caller returns early: a skip is never silent.
#[must_use]
pub fn require_root(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    let allow = std::env::var("SFUNNEL_ALLOW_SKIP").is_ok_and(|v| v == "1");
    // Written to the stderr handle, not with eprintln!, so that the test
    // harness's output capture cannot hide it when the test "passes".
    let mut msg = String::new();
    msg.push_str("\n************************************************************************\n");
    // The suite is the test binary's name without cargo's hash.
    let exe = std::env::args().next().unwrap_or_default();
    let file = std::path::Path::new(&exe).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let suite = file.rsplit_once('-').map_or(file.as_str(), |(name, _)| name).to_string();
    msg.push_str(&format!("SKIPPED: needs root: test `{suite}::{test}`\n"));
    msg.push_str("         loads BPF programs (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN), and the\n");
    msg.push_str("         system tests build namespaces, veths and iptables NAT.\n");
    msg.push_str(&format!("         Run `cargo test --test {suite}` as root.\n"));
    if !allow {
        msg.push_str("         Failing: set SFUNNEL_ALLOW_SKIP=1 to skip instead.\n");
    }
    msg.push_str("************************************************************************\n");
    {
        use std::io::Write as _;
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(msg.as_bytes());
        let _ = err.flush();
    }
    assert!(allow, "SKIPPED: needs root (set SFUNNEL_ALLOW_SKIP=1 to allow skipping)");
    false
}

/// A loaded program instance and its maps.
pub struct Prog {
    pub loaded: Loaded,
    pub maps: RulesetMaps,
}

impl Prog {
    pub fn load() -> Result<Prog> {
        let loaded = Loaded::load().context("loading the datapath")?;
        let maps = loaded.maps()?;
        Ok(Prog { loaded, maps })
    }

    /// Loads the program and installs `rules`.
    pub fn with_rules(rules: &str) -> Result<Prog> {
        let p = Prog::load()?;
        p.install(rules)?;
        Ok(p)
    }

    /// Parses, compiles and installs `rules` (counters restart at zero).
    pub fn install(&self, rules: &str) -> Result<()> {
        let (_, compiled) =
            sfunnel::ruleset::load(rules).map_err(|e| anyhow::anyhow!("ruleset {rules:?} refused: {e}"))?;
        self.maps.install(&compiled, Settings { egress: true, ..Default::default() })
    }

    /// One PROG_TEST_RUN with repeat = 1 (the program mutates its input
    /// skb, so a repeat would run it on its own output).
    pub fn run(&self, frame: &[u8]) -> Result<(i32, Vec<u8>)> {
        let r = self.loaded.test_run(frame, 1)?;
        Ok((r.verdict, r.data))
    }
}

/// `name` from the environment as a number, else `default`: the knobs of
/// the random tests.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `n` bytes of test payload.
pub fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 3) as u8).collect()
}

/// Which ruleset a robustness input runs under.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Funnel,
    Unfunnel,
}

pub const TC_ACT_UNSPEC: i32 = -1;
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;

/// A random, valid IPv4 packet of protocol `proto`: random addresses,
/// ports, IP options (0–40 bytes in 4-byte steps), TCP options, header
/// fields and a payload of 0–1500 bytes, with correct checksums.  About one
/// UDP datagram in eight carries checksum 0 ("none").
pub fn random_packet(rng: &mut Rng, proto: Proto) -> PacketSpec {
    let payload_len = if rng.one_in(8) { rng.below(8) } else { rng.range(0, 1500) };
    let payload = rng.bytes(payload_len);
    let (sport, dport) = (rng.u16(), rng.u16());
    let mut p = match proto {
        Proto::Tcp => PacketSpec::tcp(sport, dport, &payload),
        Proto::Udp => PacketSpec::udp(sport, dport, &payload),
    };
    randomize_tcp(rng, &mut p.l4);
    p.src_mac = rng.bytes(6).try_into().unwrap();
    p.dst_mac = rng.bytes(6).try_into().unwrap();
    p.saddr = rng.addr();
    p.daddr = rng.addr();
    p.tos = rng.u8();
    p.id = rng.u16();
    p.ttl = rng.u8().max(1);
    p.frag = if rng.bool() { packet::IP_DF } else { 0 };
    let opt_len = if rng.bool() { 0 } else { 4 * rng.range(1, 10) };
    p.ip_options = if rng.bool() { ip_options(opt_len) } else { rng.bytes(opt_len) };
    if proto == Proto::Udp && rng.one_in(8) {
        p.csum = L4Csum::None;
    }
    p
}

/// Random TCP header fields and options (0–40 bytes), if `l4` is TCP.
pub fn randomize_tcp(rng: &mut Rng, l4: &mut L4) {
    if let L4::Tcp { seq, ack, flags, window, urg, options, .. } = l4 {
        *seq = rng.u32();
        *ack = rng.u32();
        *flags = rng.u8();
        *window = rng.u16();
        *urg = if rng.one_in(4) { rng.u16() } else { 0 };
        let olen = 4 * rng.below(11);
        *options = tcp_options(rng, olen);
    }
}

/// TCP options of `len` bytes (a multiple of 4): MSS, SACK-permitted,
/// timestamps and NOPs as room allows, else random bytes.
pub fn tcp_options(rng: &mut Rng, len: usize) -> Vec<u8> {
    if rng.one_in(4) {
        return rng.bytes(len);
    }
    let mut o = Vec::with_capacity(len);
    while o.len() < len {
        let room = len - o.len();
        match rng.below(4) {
            0 if room >= 4 => o.extend_from_slice(&[2, 4, rng.u8(), rng.u8()]),
            1 if room >= 12 => {
                o.extend_from_slice(&[1, 1, 8, 10]);
                o.extend_from_slice(&rng.bytes(8));
            }
            2 if room >= 4 => o.extend_from_slice(&[1, 1, 4, 2]),
            _ => o.push(1),
        }
    }
    o
}

/// setsockopt with an int value, on a socket of any kind; the OS error
/// where the kernel refuses it.
pub fn set_int_opt(s: &impl std::os::fd::AsRawFd, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: setsockopt on a valid descriptor, with an int value of its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
