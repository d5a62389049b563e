//! Funneled packets through a NAT that rewrites addresses and source
//! ports, then through a hop that verifies every checksum (root; real
//! namespaces, veths, iptables and sockets).
//!
//! ```text
//!   client ──── nat ───────────────────────── check ──────────────── server
//!   10.203.1.2  10.203.1.1 | 10.203.2.1 ─ 10.203.2.2 | 10.203.3.1   10.203.3.2
//!               svc 10.203.9.1 on lo          conntrack zone 7
//!               DNAT svc → server             verifies checksums
//!               SNAT to fixed source ports    INVALID dropped
//!               INVALID dropped
//! ```
//! (IPv6 the same, fd00:203:<subnet>::<host>, svc fd00:203:9::1.)
//!
//! This is where a funneled packet from an ordinary sender used to break:
//! a locally sent packet is CHECKSUM_PARTIAL, the NAT took the funnel
//! header for the header whose checksum the kernel still owes and updated
//! it wrongly, and the next hop that verified it dropped it.  Here the
//! NAT runs while packets are still CHECKSUM_PARTIAL (the client's and the
//! server's veths keep their default offloads), and the link between the
//! two routers completes every checksum, as a NIC between two nodes would
//! (`tx off` on both its ends), so that `check` (requests) and `nat`
//! (replies) verify what crossed it, and drop what fails.
//!
//! Each scenario sends, over IPv4 and IPv6: UDP over TCP, UDP over UDP
//! (datagrams of 3 to 1400 bytes), TCP over TCP and TCP over UDP (an echo
//! in 100-byte chunks, then 512 KiB each way in bulk, which takes the
//! segmentation detour as GSO packets).  Every byte must arrive, every
//! funneled frame that crossed the NAT must carry a valid outer checksum
//! (checked from a capture on `check`, by an independent checksum), and
//! no hop may count a checksum error (nstat at both ends, conntrack's
//! `invalid` on both routers).

mod common;

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::capture::{Capture, Frame};
use common::packet::{be16, Csum, Proto};
use common::topology::{
    conntrack_stat, echo_until_eof, env_load, in_ns, nsh, nstat, pattern, sh, unique_stems, Namespaces,
};

/// The four combinations: (name, inner protocol, application port, funnel
/// header protocol, funnel source port, funnel destination port).  Each
/// has its own service port, so the server can tell the inner protocol
/// from the destination port alone, which the NAT keeps.
const COMBOS: [(&str, Proto, u16, Proto, u16, u16); 4] = [
    ("udp-over-tcp", Proto::Udp, 4739, Proto::Tcp, 540, 80),
    ("udp-over-udp", Proto::Udp, 4740, Proto::Udp, 542, 81),
    ("tcp-over-tcp", Proto::Tcp, 7000, Proto::Tcp, 541, 82),
    ("tcp-over-udp", Proto::Tcp, 7001, Proto::Udp, 543, 83),
];

/// The NAT rewrites each funnel source port to this plus the port: every
/// packet crosses it with a new source port, as behind an SNAT where
/// clients collide.
const NAT_PORT_BASE: u16 = 20000;

const DATAGRAM_SIZES: [usize; 6] = [3, 4, 100, 1001, 1400, 700];
const BULK: usize = 512 << 10;

/// Every rule once for IPv4 and once, as its `ip6` twin, for IPv6.
fn both_families(rules: &[String]) -> String {
    rules.iter().flat_map(|r| [r.clone(), format!("ip6 {r}")]).collect::<Vec<_>>().join("\n")
}

fn name(p: Proto) -> &'static str {
    p.name()
}

/// Funnels each application flow (on the client's egress).
fn funnel_rules() -> String {
    both_families(
        &COMBOS
            .iter()
            .map(|(_, inner, app, outer, fs, fd)| {
                format!("{} dport {app} actions funnel {} sport {fs} dport {fd}", name(*inner), name(*outer))
            })
            .collect::<Vec<_>>(),
    )
}

/// How the receiving ends recognise funneled packets.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Match {
    /// By the funnel header's destination port (server) or both ports
    /// (client, whose ports no NAT rewrote on the way back).
    Ports,
    /// `funneled` + `unfunnel auto`: by what NATs keep, and the inner
    /// protocol from the packet, which needs a valid outer checksum.
    Funneled,
}

fn server_ingress(m: Match) -> String {
    both_families(
        &COMBOS
            .iter()
            .map(|(_, inner, _, outer, _, fd)| match m {
                Match::Ports => format!("{} dport {fd} actions unfunnel {}", name(*outer), name(*inner)),
                Match::Funneled => format!("{} dport {fd} funneled actions unfunnel auto", name(*outer)),
            })
            .collect::<Vec<_>>(),
    )
}

/// The server funnels its TCP replies back through the tuple the NAT's
/// entry expects: from the service port to the rewritten source port.
fn server_egress() -> String {
    both_families(
        &COMBOS
            .iter()
            .filter(|c| c.1 == Proto::Tcp)
            .map(|(_, _, app, outer, fs, fd)| {
                format!("tcp sport {app} actions funnel {} sport {fd} dport {}", name(*outer), NAT_PORT_BASE + fs)
            })
            .collect::<Vec<_>>(),
    )
}

/// The replies, unfunneled where the client's TCP flows start; the NAT
/// has put the client's own ports back by then.
fn client_ingress(m: Match) -> String {
    both_families(
        &COMBOS
            .iter()
            .filter(|c| c.1 == Proto::Tcp)
            .map(|(_, _, _, outer, fs, fd)| match m {
                Match::Ports => format!("{} sport {fd} dport {fs} actions unfunnel tcp", name(*outer)),
                Match::Funneled => format!("{} sport {fd} funneled actions unfunnel auto", name(*outer)),
            })
            .collect::<Vec<_>>(),
    )
}

/// The four namespaces and their links.
struct Lab {
    c: String,
    n: String,
    v: String,
    s: String,
    /// Interfaces: client's, nat's towards the client, nat's towards
    /// check, check's towards nat, check's towards the server, server's.
    c_if: String,
    nc_if: String,
    nv_if: String,
    vn_if: String,
    vs_if: String,
    s_if: String,
    _ns: Namespaces,
}

struct Family {
    v6: bool,
    svc: &'static str,
    /// nat's address towards check: the source the server sees.
    nat_out: &'static str,
}

const V4: Family = Family { v6: false, svc: "10.203.9.1", nat_out: "10.203.2.1" };
const V6: Family = Family { v6: true, svc: "fd00:203:9::1", nat_out: "fd00:203:2::1" };

impl Lab {
    fn new(sender_offloads: bool) -> Lab {
        let (stem, ifs) = unique_stems();
        let mut ns = Namespaces::default();
        let l = Lab {
            c: format!("{stem}-c"),
            n: format!("{stem}-n"),
            v: format!("{stem}-v"),
            s: format!("{stem}-s"),
            c_if: format!("{ifs}c"),
            nc_if: format!("{ifs}nc"),
            nv_if: format!("{ifs}nv"),
            vn_if: format!("{ifs}vn"),
            vs_if: format!("{ifs}vs"),
            s_if: format!("{ifs}s"),
            _ns: Namespaces::default(),
        };
        for n in [&l.c, &l.n, &l.v, &l.s] {
            ns.add(n);
        }
        let l = Lab { _ns: ns, ..l };
        let link = |a: &str, ai: &str, b: &str, bi: &str| {
            sh(&["ip", "-n", a, "link", "add", ai, "type", "veth", "peer", "name", bi, "netns", b]);
        };
        link(&l.c, &l.c_if, &l.n, &l.nc_if);
        link(&l.n, &l.nv_if, &l.v, &l.vn_if);
        link(&l.v, &l.vs_if, &l.s, &l.s_if);
        let addr = |ns: &str, dev: &str, a4: &str, a6: &str| {
            sh(&["ip", "-n", ns, "addr", "add", a4, "dev", dev]);
            sh(&["ip", "-n", ns, "-6", "addr", "add", a6, "dev", dev, "nodad"]);
        };
        addr(&l.c, &l.c_if, "10.203.1.2/24", "fd00:203:1::2/64");
        addr(&l.n, &l.nc_if, "10.203.1.1/24", "fd00:203:1::1/64");
        addr(&l.n, &l.nv_if, "10.203.2.1/24", "fd00:203:2::1/64");
        addr(&l.n, "lo", "10.203.9.1/32", "fd00:203:9::1/128");
        addr(&l.v, &l.vn_if, "10.203.2.2/24", "fd00:203:2::2/64");
        addr(&l.v, &l.vs_if, "10.203.3.1/24", "fd00:203:3::1/64");
        addr(&l.s, &l.s_if, "10.203.3.2/24", "fd00:203:3::2/64");
        // Room for a funnel header where funneled packets start (NOTES §4).
        for (ns, dev, mtu) in [
            (&l.c, &l.c_if, "1480"),
            (&l.n, &l.nc_if, "1500"),
            (&l.n, &l.nv_if, "1500"),
            (&l.v, &l.vn_if, "1500"),
            (&l.v, &l.vs_if, "1500"),
            (&l.s, &l.s_if, "1480"),
        ] {
            sh(&["ip", "-n", ns, "link", "set", dev, "mtu", mtu, "up"]);
        }
        for (ns, via4, via6) in [
            (&l.c, "10.203.1.1", "fd00:203:1::1"),
            (&l.n, "10.203.2.2", "fd00:203:2::2"),
            (&l.s, "10.203.3.1", "fd00:203:3::1"),
        ] {
            sh(&["ip", "-n", ns, "route", "add", "default", "via", via4]);
            sh(&["ip", "-n", ns, "-6", "route", "add", "default", "via", via6]);
        }
        sh(&["ip", "-n", &l.v, "route", "add", "10.203.1.0/24", "via", "10.203.2.1"]);
        sh(&["ip", "-n", &l.v, "-6", "route", "add", "fd00:203:1::/64", "via", "fd00:203:2::1"]);
        for ns in [&l.n, &l.v] {
            nsh(ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]);
        }
        for ns in [&l.c, &l.s] {
            nsh(ns, &["sysctl", "-qw", "net.ipv4.tcp_autocorking=0"]);
        }
        // The link between the routers completes every checksum, as a NIC
        // between two nodes would.
        nsh(&l.n, &["ethtool", "-K", &l.nv_if, "tx", "off"]);
        nsh(&l.v, &["ethtool", "-K", &l.vn_if, "tx", "off"]);
        if !sender_offloads {
            nsh(&l.c, &["ethtool", "-K", &l.c_if, "tx", "off", "tso", "off", "gso", "off"]);
            nsh(&l.s, &["ethtool", "-K", &l.s_if, "tx", "off", "tso", "off", "gso", "off"]);
        }
        for (tables, fam) in [("iptables", &V4), ("ip6tables", &V6)] {
            // nat: the service, DNAT'ed to the server, and every funnel
            // tuple's source port rewritten.
            let server = if fam.v6 { "fd00:203:3::2" } else { "10.203.3.2" };
            for (_, _, _, outer, fs, fd) in COMBOS {
                let p = name(outer);
                let (fd, fs) = (fd.to_string(), fs.to_string());
                nsh(
                    &l.n,
                    &[
                        tables,
                        "-t",
                        "nat",
                        "-A",
                        "PREROUTING",
                        "-d",
                        fam.svc,
                        "-p",
                        p,
                        "--dport",
                        &fd,
                        "-j",
                        "DNAT",
                        "--to-destination",
                        server,
                    ],
                );
                let to = if fam.v6 {
                    format!("[{}]:{}", fam.nat_out, NAT_PORT_BASE + fs.parse::<u16>().unwrap())
                } else {
                    format!("{}:{}", fam.nat_out, NAT_PORT_BASE + fs.parse::<u16>().unwrap())
                };
                nsh(
                    &l.n,
                    &[
                        tables,
                        "-t",
                        "nat",
                        "-A",
                        "POSTROUTING",
                        "-o",
                        &l.nv_if,
                        "-p",
                        p,
                        "--sport",
                        &fs,
                        "-j",
                        "SNAT",
                        "--to-source",
                        &to,
                    ],
                );
            }
            // check: its own conntrack zone, as a node of its own.
            nsh(&l.v, &[tables, "-t", "raw", "-A", "PREROUTING", "-j", "CT", "--zone", "7"]);
            for ns in [&l.n, &l.v] {
                nsh(ns, &[tables, "-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"]);
            }
        }
        // Conntrack verifies checksums (the default, said here).
        for ns in [&l.n, &l.v] {
            nsh(ns, &["sysctl", "-qw", "net.netfilter.nf_conntrack_checksum=1"]);
        }
        l
    }

    fn load(&self, ns: &str, iface: &str, direction: &str, rules: &str) {
        env_load(ns, iface, direction, rules).expect_ok();
    }
}

/// A UDP socket in `ns`, bound to `port` (0: any) of the family.
fn udp_socket(ns: &str, fam: &Family, port: u16) -> UdpSocket {
    let any: IpAddr = if fam.v6 { "::".parse().unwrap() } else { "0.0.0.0".parse().unwrap() };
    in_ns(ns, move || {
        let s = UdpSocket::bind(SocketAddr::new(any, port)).expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        s
    })
}

fn svc(fam: &Family, port: u16) -> SocketAddr {
    SocketAddr::new(fam.svc.parse().unwrap(), port)
}

/// Datagrams of every size in DATAGRAM_SIZES to the service's `app` port:
/// how many arrived byte for byte.
fn udp_flow(l: &Lab, fam: &Family, app: u16, seed: usize) -> Result<String, String> {
    let server = udp_socket(&l.s, fam, app);
    let client = udp_socket(&l.c, fam, 0);
    let sent: Vec<Vec<u8>> = DATAGRAM_SIZES.iter().enumerate().map(|(k, n)| pattern(seed * 16 + k, *n)).collect();
    for d in &sent {
        client.send_to(d, svc(fam, app)).map_err(|e| format!("send: {e}"))?;
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    while got.len() < sent.len() && Instant::now() < deadline {
        if let Ok(n) = server.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
    }
    let exact = sent.iter().filter(|d| got.contains(d)).count();
    let bytes: usize = sent.iter().map(Vec::len).sum();
    if exact == sent.len() {
        Ok(format!("{exact}/{} datagrams ({bytes} B) exact", sent.len()))
    } else {
        Err(format!("{exact}/{} datagrams exact, {} received", sent.len(), got.len()))
    }
}

/// A TCP connection to the service's `app` port, echoed by the server:
/// 2,000 bytes in 100-byte chunks (one in flight: small segments), then
/// BULK bytes written at once (GSO packets) and read back concurrently.
fn tcp_flow(l: &Lab, fam: &Family, app: u16, seed: usize) -> Result<String, String> {
    let any: IpAddr = if fam.v6 { "::".parse().unwrap() } else { "0.0.0.0".parse().unwrap() };
    let listener = in_ns(&l.s, move || TcpListener::bind(SocketAddr::new(any, app))).map_err(|e| e.to_string())?;
    let server = std::thread::spawn(move || -> Result<usize, String> {
        // A connection that never comes must not hang the test.
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(8);
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        s.set_nonblocking(false).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
        echo_until_eof(&mut s).map(|v| v.len())
    });
    let to = svc(fam, app);
    let client = in_ns(&l.c, move || TcpStream::connect_timeout(&to, Duration::from_secs(5)));
    let result = (|| -> Result<String, String> {
        let mut s = client.map_err(|e| format!("connect: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
        let small = pattern(seed, 2000);
        for chunk in small.chunks(100) {
            s.write_all(chunk).map_err(|e| format!("write: {e}"))?;
            let mut back = vec![0u8; chunk.len()];
            s.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
            if back != chunk {
                return Err("an echoed chunk differs".into());
            }
        }
        let bulk = pattern(seed + 1, BULK);
        let mut w = s.try_clone().map_err(|e| e.to_string())?;
        let data = bulk.clone();
        let writer = std::thread::spawn(move || {
            let r = w.write_all(&data);
            let _ = w.shutdown(std::net::Shutdown::Write);
            r
        });
        let mut back = Vec::new();
        let read = s.read_to_end(&mut back);
        writer.join().map_err(|_| "writer panicked")?.map_err(|e| format!("bulk write: {e}"))?;
        read.map_err(|e| format!("bulk read after {} B: {e}", back.len()))?;
        if back != bulk {
            return Err(format!("bulk: {} B back of {BULK}, not identical", back.len()));
        }
        Ok(format!("{} B echoed exactly", small.len() + BULK))
    })();
    let server = server.join().unwrap_or_else(|_| Err("server panicked".into()));
    match (result, server) {
        (Ok(r), Ok(n)) if n == 2000 + BULK => Ok(r),
        (Ok(_), Ok(n)) => Err(format!("the server read {n} B")),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

/// Whether a frame's outer L4 header is a funnel header (by its ports
/// after the NAT) and, if so, whether its checksum is valid: summed here
/// from the frame, independently of the code under test.
fn funnel_csum_ok(f: &Frame) -> Option<bool> {
    let d = &f.data;
    let ethertype = be16(d, 12);
    let (proto, l4, pseudo) = match ethertype {
        0x0800 if d.len() >= 34 => {
            let hl = usize::from(d[14] & 0xf) * 4;
            let tot = usize::from(be16(d, 16));
            let l4 = 14 + hl..14 + tot;
            let mut c = Csum::new();
            c.add(&d[26..34]).add(&[0, d[23]]).add_u16(u16::try_from(l4.len()).ok()?);
            (d[23], l4, c)
        }
        0x86dd if d.len() >= 54 => {
            let len = usize::from(be16(d, 18));
            let mut c = Csum::new();
            c.add(&d[22..54]).add_u16(u16::try_from(len).ok()?).add(&[0, d[20]]);
            (d[20], 54..54 + len, c)
        }
        _ => return None,
    };
    if (proto != 6 && proto != 17) || l4.end > d.len() || l4.len() < 8 {
        return None;
    }
    let seg = &d[l4];
    let (sport, dport) = (be16(seg, 0), be16(seg, 2));
    let funnel = COMBOS.iter().any(|c| {
        c.3.number() == proto
            && ((sport == NAT_PORT_BASE + c.4 && dport == c.5) || (sport == c.5 && dport == NAT_PORT_BASE + c.4))
    });
    if !funnel {
        return None;
    }
    let mut c = pseudo;
    c.add(seg);
    Some(c.fold() == 0xffff)
}

const CSUM_ERRORS: [&str; 4] = ["TcpInCsumErrors", "UdpInCsumErrors", "Udp6InCsumErrors", "Ip6InHdrErrors"];

fn sum(c: &[(String, u64)]) -> u64 {
    c.iter().map(|(_, v)| v).sum()
}

/// One scenario: its rules loaded, every flow of both families run.
/// Returns the report and the problems found.
fn scenario(l: &Lab, label: &str, m: Match) -> (String, Vec<String>) {
    let mut report = format!("--- {label} ---\n");
    let mut problems = Vec::new();
    // Funnel on the client's egress; the replies are unfunneled on its
    // ingress.
    let (fns, fif, fdir_in, fdir_out) = (&l.c, &l.c_if, "egress", "ingress");
    l.load(fns, fif, fdir_in, &funnel_rules());
    l.load(fns, fif, fdir_out, &client_ingress(m));
    l.load(&l.s, &l.s_if, "ingress", &server_ingress(m));
    l.load(&l.s, &l.s_if, "egress", &server_egress());

    let before = [nstat(&l.c, &CSUM_ERRORS), nstat(&l.s, &CSUM_ERRORS)];
    let capture = Capture::start(&l.v, &l.vn_if);
    for (fam, fname) in [(&V4, "IPv4"), (&V6, "IPv6")] {
        for (k, (combo, inner, app, ..)) in COMBOS.iter().enumerate() {
            let r = match inner {
                Proto::Udp => udp_flow(l, fam, *app, k),
                Proto::Tcp => tcp_flow(l, fam, *app, k),
            };
            report.push_str(&format!("  {fname} {combo:<13} {}\n", r.as_ref().unwrap_or_else(|e| e)));
            if let Err(e) = r {
                problems.push(format!("{label}: {fname} {combo}: {e}"));
            }
        }
    }
    // The funnel ran where this scenario put it.
    let ino = std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(format!("{}/{fns}", common::topology::NETNS_DIR)).expect("the namespace"),
    );
    let funneled: u64 = common::topology::attachment(ino, fif, fdir_in)
        .map(|a| common::topology::rule_packets(&a).iter().sum())
        .unwrap_or(0);
    report.push_str(&format!("  funneled at {fif} {fdir_in}: {funneled} packets\n"));
    if funneled == 0 {
        problems.push(format!("{label}: nothing was funneled at {fif} {fdir_in}"));
    }
    let frames = capture.stop().frames;
    let checked: Vec<bool> = frames.iter().filter_map(funnel_csum_ok).collect();
    let bad = checked.iter().filter(|ok| !**ok).count();
    report.push_str(&format!(
        "  funneled frames between the routers: {}, outer checksum invalid in {bad}\n",
        checked.len()
    ));
    if checked.is_empty() || bad > 0 {
        problems.push(format!("{label}: {bad} of {} funneled frames past the NAT with a bad checksum", checked.len()));
    }
    let after = [nstat(&l.c, &CSUM_ERRORS), nstat(&l.s, &CSUM_ERRORS)];
    for (i, who) in ["client", "server"].iter().enumerate() {
        let d = sum(&after[i]) - sum(&before[i]);
        report.push_str(&format!("  {who} checksum errors: +{d} ({:?})\n", after[i]));
        if d != 0 {
            problems.push(format!("{label}: {d} checksum errors at the {who}"));
        }
    }
    for (who, ns) in [("nat", &l.n), ("check", &l.v)] {
        let inv = conntrack_stat(ns, "invalid").unwrap_or(u64::MAX);
        report.push_str(&format!("  {who} conntrack invalid: {inv}\n"));
        if inv != 0 {
            problems.push(format!("{label}: {who} counted {inv} invalid packets"));
        }
    }
    (report, problems)
}

fn run(sender_offloads: bool, cases: &[(&str, Match)]) {
    let l = Lab::new(sender_offloads);
    let mut report = String::new();
    let mut problems = Vec::new();
    for (label, m) in cases {
        let (r, p) = scenario(&l, label, *m);
        report.push_str(&r);
        problems.extend(p);
    }
    eprintln!("\n=== funneled through NAT and a checking hop ===\n{report}");
    drop(l);
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Default offloads at the ends: the NAT sees CHECKSUM_PARTIAL packets.
#[test]
fn funneled_through_nat_with_sender_offloads_on() {
    if !common::require_root("funneled_through_nat_with_sender_offloads_on") {
        return;
    }
    run(
        true,
        &[
            ("offloads on, funnel at the client, port rules", Match::Ports),
            ("offloads on, funnel at the client, funneled + auto", Match::Funneled),
        ],
    );
}

/// Offloads off at the ends: every checksum is complete when sent.
#[test]
fn funneled_through_nat_with_sender_offloads_off() {
    if !common::require_root("funneled_through_nat_with_sender_offloads_off") {
        return;
    }
    run(
        false,
        &[
            ("offloads off, funnel at the client, port rules", Match::Ports),
            ("offloads off, funnel at the client, funneled + auto", Match::Funneled),
        ],
    );
}

/// Packets through the helper's far end (rx), as the kernel counts them.
fn helper_rx(ns: &str, dev: &str) -> u64 {
    let out = nsh(ns, &["ip", "-s", "-j", "link", "show", "dev", dev]).stdout;
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j is JSON");
    v[0]["stats64"]["rx"]["packets"].as_u64().expect("rx packets")
}

/// (major, minor) of the running kernel.
fn kernel_version() -> (u32, u32) {
    let r = rustix::system::uname().release().to_string_lossy().into_owned();
    let mut it = r.split(|c: char| !c.is_ascii_digit()).filter_map(|x| x.parse().ok());
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Which UDP datagrams take the detour to be funneled: those whose
/// checksum the kernel owes (sent with the veth's default offloads), on
/// every kernel; those with a complete checksum (offloads off) only where
/// the datapath cannot tell the two apart (before Linux 6.2, no
/// bpf_cast_to_kern_ctx), and the load's log says which.  Either way every
/// datagram arrives.
#[test]
fn owed_checksums_take_the_detour_and_only_they_where_the_kernel_tells() {
    use common::topology::{helper_pair, ifindex, sfunnel, Topo, TopoOpts};
    if !common::require_root("owed_checksums_take_the_detour_and_only_they_where_the_kernel_tells") {
        return;
    }
    let t = Topo::new(TopoOpts { router_offloads_off: true, ..Default::default() });
    let load = |ns: &str, iface: &str, dir: &str, rules: &str| {
        sfunnel(
            &[],
            &[("SFUNNEL_RULESET", rules), ("IFACES", iface), ("DIRECTION", dir), ("NETNS", ns), ("DEBUG", "1")],
        )
        .expect_ok()
    };
    let log = load(&t.client, &t.c_if, "egress", "udp dport 4739 actions funnel udp sport 542 dport 81").stderr;
    load(&t.server, &t.s_if, "ingress", "udp sport 542 dport 81 actions unfunnel udp");
    let line = log.lines().find(|l| l.contains("event=checksum_state")).unwrap_or_else(|| panic!("{log}"));
    let known = line.contains("known=true");
    let version = kernel_version();
    let (_, seg_if) = helper_pair(ifindex(&t.client, &t.c_if), "egress");

    let server = in_ns(&t.server, || UdpSocket::bind("0.0.0.0:4739").expect("bind"));
    server.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let client = in_ns(&t.client, || UdpSocket::bind("0.0.0.0:0").expect("bind"));
    let to: SocketAddr = "10.201.3.2:4739".parse().unwrap();
    let round = |what: &str| -> (u64, usize) {
        let before = helper_rx(&t.client, &seg_if);
        for k in 0..20 {
            client.send_to(&pattern(k, 300), to).expect("send");
        }
        let mut got = 0;
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(3);
        while got < 20 && Instant::now() < deadline {
            if server.recv(&mut buf).is_ok() {
                got += 1;
            }
        }
        let through = helper_rx(&t.client, &seg_if) - before;
        eprintln!("{what}: {through} of 20 datagrams through the detour, {got} arrived");
        (through, got)
    };
    let owed = round("default offloads (checksum owed)");
    nsh(&t.client, &["ethtool", "-K", &t.c_if, "tx", "off"]);
    let complete = round("tx checksumming off (checksum complete)");
    eprintln!("kernel {version:?}: {line}");
    drop(t);
    assert_eq!(known, version >= (6, 2), "the datapath reads ip_summed exactly on 6.2 and later");
    assert_eq!(owed, (20, 20), "owed checksums: through the detour, and delivered");
    assert_eq!(complete, (if known { 0 } else { 20 }, 20), "complete checksums: in place where the kernel tells");
}
