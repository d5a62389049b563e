//! The MTU guard end to end: real namespaces, veths, sockets and traffic
//! (topology of tests/common/topology.rs, no NAT), with the client's and the
//! server's MTU at 1500 like the router's, so that a full-size packet does
//! not fit once funneled.
//!
//! - `over_mtu_drop_tells_the_sender_and_traffic_adapts` (the default):
//!   an oversized DF datagram is dropped and the sender gets an ICMP
//!   "fragmentation needed" for MTU 1480, checked field by field against
//!   RFC 792/1191; the sender's path MTU drops to 1480, and what it sends
//!   next is funneled and delivered.  A TCP stream of full-size segments
//!   adapts the same way in both directions and arrives intact.
//! - `over_mtu_pass_sends_unfunneled` (`OVER_MTU=pass`): the oversized
//!   datagram crosses the router unfunneled and reaches the server's
//!   socket; no ICMP; the sender's path MTU stays 1500.
//!
//! - `over_mtu_on_a_routers_egress` / `_ingress`: the router funnels what it
//!   forwards; the ICMP is routed back to the client (egress: through the
//!   router's receive path) or sent straight out (ingress: its MTU is the
//!   route's, from a FIB lookup).
//!
//! They check the per-rule `over_mtu` counter and the `over_mtu` pass
//! statistic in `sfunnel status --json`.  Root only.
//!
//! TCP here runs with `gso_max_segs 1` on the two ends: funneling GSO
//! packets is the TCP GSO issue's, and this test is about the MTU.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::capture::{l4_of, Capture, Frame};
use common::packet::{addr, be16, checksum, Proto, ETH_HLEN, ETH_P_IP, IP_DF};
use common::topology::{
    attachment, in_ns, ip_str, nsh, nstat, pattern, sa, sfunnel, Topo, TopoOpts, CLIENT_IP, SERVER_IP,
};
use serde_json::Value;

const UDP_PORT: u16 = 4739;
const TCP_PORT: u16 = 7000;

const CLIENT_EGRESS: &str = "\
udp dport 4739 actions funnel tcp sport 540 dport 80
tcp dport 7000 actions funnel tcp sport 541 dport 80";
const CLIENT_INGRESS: &str = "tcp sport 80 dport 541 actions unfunnel tcp";
const SERVER_INGRESS: &str = "\
tcp sport 540 dport 80 actions unfunnel udp
tcp sport 541 dport 80 actions unfunnel tcp";
const SERVER_EGRESS: &str = "tcp sport 7000 actions funnel tcp sport 80 dport 541";

/// The MTU everywhere, and the largest UDP payload that fits it unfunneled.
const MTU: usize = 1500;
const FULL_UDP: usize = MTU - 20 - 8;
/// What fits once a 20-byte TCP funnel header is added.
const FUNNEL_MTU: usize = MTU - 20;

const CSUM_COUNTERS: [&str; 4] = ["UdpInCsumErrors", "TcpInCsumErrors", "UdpInErrors", "IpInHdrErrors"];

/// The topology, MTU 1500 on the funneling ends, every rule loaded through
/// the container interface with `OVER_MTU=<over_mtu>` (None: the default).
fn topo(over_mtu: Option<&str>) -> Topo {
    let t = Topo::new(TopoOpts { nat: false, endpoints_offloads_off: false, router_offloads_off: true, ipv6: false });
    for (ns, dev) in [(&t.client, &t.c_if), (&t.server, &t.s_if)] {
        nsh(ns, &["ip", "link", "set", dev, "mtu", &MTU.to_string(), "gso_max_segs", "1"]);
    }
    for (ns, dev, dir, rules) in [
        (&t.client, &t.c_if, "egress", CLIENT_EGRESS),
        (&t.client, &t.c_if, "ingress", CLIENT_INGRESS),
        (&t.server, &t.s_if, "ingress", SERVER_INGRESS),
        (&t.server, &t.s_if, "egress", SERVER_EGRESS),
    ] {
        let mut env = vec![("SFUNNEL_RULESET", rules), ("IFACES", dev.as_str()), ("DIRECTION", dir), ("NETNS", ns)];
        if let Some(m) = over_mtu {
            env.push(("OVER_MTU", m));
        }
        sfunnel(&[], &env).expect_ok();
    }
    t
}

fn udp_socket(ns: &str, port: u16, df: bool) -> UdpSocket {
    in_ns(ns, move || {
        let s = UdpSocket::bind(sa([0; 4], port)).expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        if df {
            // Always DF, and EMSGSIZE once the path MTU is known smaller.
            common::set_int_opt(&s, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO)
                .expect("IP_MTU_DISCOVER");
        }
        s
    })
}

/// Datagram sizes received within `wait`.
fn received(s: &UdpSocket, wait: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 65536];
    let mut got = Vec::new();
    while Instant::now() < deadline {
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            got.push(buf[..n].to_vec());
        }
    }
    got
}

/// The path MTU the client's kernel has cached towards the server, if any
/// (`ip route get`: "cache expires …sec mtu N").
fn cached_pmtu(ns: &str, to: [u8; 4]) -> Option<usize> {
    let out = nsh(ns, &["ip", "route", "get", &ip_str(to)]).stdout;
    let mut words = out.split_whitespace();
    words.by_ref().find(|w| *w == "mtu")?;
    words.next()?.parse().ok()
}

/// Waits up to 5 s for `ns` to cache a path MTU towards `to` (an ICMP
/// arriving); the caller checks what is cached.
fn wait_for_pmtu(ns: &str, to: [u8; 4]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while cached_pmtu(ns, to).is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (packets, bytes, over_mtu) of rule `i` of one attachment.
fn rule(a: &Value, i: usize) -> (u64, u64, u64) {
    let r = &a["rules"][i];
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("rule {i} has no {k}: {a}"));
    (n("packets"), n("bytes"), n("over_mtu"))
}

fn passed(a: &Value, reason: &str) -> u64 {
    a["passed"][reason].as_u64().unwrap_or_else(|| panic!("no passed.{reason}: {a}"))
}

/// ICMP "fragmentation needed" frames received on the client, checked
/// against RFC 792/1191 (IPv4 header and ICMP checksums computed here),
/// quoting a UDP datagram of `quoted_len` IP bytes from `sport` to the
/// server.  Returns how many there were; panics on any that is wrong.
fn frag_needed_frames(frames: &[Frame], sport: u16, quoted_len: usize) -> usize {
    let mut n = 0;
    for f in frames.iter().filter(|f| !f.outgoing) {
        let d = &f.data;
        if d.len() < ETH_HLEN + 20 || be16(d, 12) != ETH_P_IP || d[ETH_HLEN + 9] != 1 {
            continue;
        }
        let ip = &d[ETH_HLEN..];
        let ihl = usize::from(ip[0] & 0xf) * 4;
        assert_eq!(ip[0], 0x45, "ICMP reply: IPv4 without options");
        assert_eq!(checksum(&ip[..20]), 0, "ICMP reply: IPv4 header checksum");
        assert_eq!(usize::from(be16(ip, 2)), ip.len(), "ICMP reply: total length is the frame's");
        assert_eq!((addr(ip, 12), addr(ip, 16)), (SERVER_IP, CLIENT_IP), "ICMP reply: from the server's address");
        let icmp = &ip[ihl..];
        assert_eq!(checksum(icmp), 0, "ICMP checksum over the message");
        assert_eq!((icmp[0], icmp[1]), (3, 4), "destination unreachable, fragmentation needed");
        assert_eq!(be16(icmp, 4), 0, "unused field");
        assert_eq!(usize::from(be16(icmp, 6)), FUNNEL_MTU, "next-hop MTU: the MTU less the funnel header");
        // The quote: the original IPv4 header and the first 8 bytes of UDP.
        let q = &icmp[8..];
        assert_eq!(q.len(), 20 + 8, "quote: IP header and 8 bytes");
        assert_eq!(q[0], 0x45);
        assert_eq!(checksum(&q[..20]), 0, "quote: the original header, intact");
        assert_eq!(usize::from(be16(q, 2)), quoted_len, "quote: the original total length");
        assert_ne!(be16(q, 6) & IP_DF, 0, "quote: DF was set");
        assert_eq!(q[9], 17, "quote: UDP");
        assert_eq!((addr(q, 12), addr(q, 16)), (CLIENT_IP, SERVER_IP));
        assert_eq!((be16(q, 20), be16(q, 22)), (sport, UDP_PORT), "quote: the original ports");
        assert_eq!(usize::from(be16(q, 24)), quoted_len - 20, "quote: the original UDP length");
        n += 1;
    }
    n
}

/// One TCP connection to the echo server: `chunks` writes of `size` bytes,
/// each echoed before the next.  Returns (sent, echoed, received by server).
fn tcp_echo(t: &Topo, chunks: usize, size: usize) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let listener = in_ns(&t.server, || TcpListener::bind(sa([0; 4], TCP_PORT)).expect("listen"));
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return got,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if s.write_all(&buf[..n]).is_err() {
                        return got;
                    }
                }
            }
        }
    });
    let data = pattern(7, chunks * size);
    let dest = sa(SERVER_IP, TCP_PORT);
    let mut s = in_ns(&t.client, move || TcpStream::connect_timeout(&dest, Duration::from_secs(5))).expect("connect");
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut echo = Vec::new();
    for chunk in data.chunks(size) {
        s.write_all(chunk).expect("client write");
        let mut back = vec![0u8; chunk.len()];
        match s.read_exact(&mut back) {
            Ok(()) => echo.extend_from_slice(&back),
            Err(e) => {
                eprintln!("client read after {} bytes: {e}", echo.len());
                break;
            }
        }
    }
    drop(s);
    let got = server.join().expect("server thread");
    (data, echo, got)
}

#[test]
fn over_mtu_drop_tells_the_sender_and_traffic_adapts() {
    if !common::require_root("over_mtu_drop_tells_the_sender_and_traffic_adapts") {
        return;
    }
    let t = topo(None);
    for ns in [&t.client, &t.server] {
        assert_eq!(cached_pmtu(ns, if *ns == t.client { SERVER_IP } else { CLIENT_IP }), None, "no path MTU cached");
    }

    // TCP first, full-size segments both ways: each end learns 1480 from
    // our ICMP, retransmits smaller, and the stream arrives intact.
    let (data, echo, at_server) = tcp_echo(&t, 40, 1448);
    let ino = t.ino(&t.client);
    let egress = attachment(ino, &t.c_if, "egress").expect("client egress in status");
    let server_egress = attachment(t.ino(&t.server), &t.s_if, "egress").expect("server egress in status");
    let (c, s) = (rule(&egress, 1), rule(&server_egress, 0));
    let errors = nstat(&t.server, &CSUM_COUNTERS);
    let client_errors = nstat(&t.client, &CSUM_COUNTERS);
    eprintln!(
        "TCP: {} B sent, server got {} B, client got {} B echoed; over_mtu client egress {}, server egress {}; \
         funneled packets {} / {}; server {errors:?}; client {client_errors:?}",
        data.len(),
        at_server.len(),
        echo.len(),
        c.2,
        s.2,
        c.0,
        s.0
    );
    assert!(at_server == data, "the server must receive the stream intact");
    assert!(echo == data, "the client must receive the echo intact");
    assert!(c.2 >= 1 && s.2 >= 1, "both ends must have met the guard (client {}, server {})", c.2, s.2);
    assert!(errors.iter().chain(&client_errors).all(|(_, v)| *v == 0), "checksum errors: {errors:?} {client_errors:?}");

    // UDP, from a clean slate: forget the path MTU TCP made the client learn.
    nsh(&t.client, &["ip", "route", "flush", "cache"]);
    let server = udp_socket(&t.server, UDP_PORT, false);
    let client = udp_socket(&t.client, 0, true);
    let sport = client.local_addr().unwrap().port();
    assert_eq!(cached_pmtu(&t.client, SERVER_IP), None, "no path MTU cached before");

    // A full-size datagram: funneled it would be 1520 bytes.
    let cap = Capture::start(&t.client, &t.c_if);
    let big = pattern(1, FULL_UDP);
    client.send_to(&big, sa(SERVER_IP, UDP_PORT)).expect("the first send goes out");
    wait_for_pmtu(&t.client, SERVER_IP);
    let frames = cap.stop().frames;
    let icmps = frag_needed_frames(&frames, sport, MTU);
    let pmtu = cached_pmtu(&t.client, SERVER_IP);
    // Now the sender knows: the same size fails locally, a fitting one goes.
    let again = client.send_to(&big, sa(SERVER_IP, UDP_PORT));
    let fits = pattern(2, FUNNEL_MTU - 20 - 8);
    client.send_to(&fits, sa(SERVER_IP, UDP_PORT)).expect("a datagram that fits");
    let got = received(&server, Duration::from_millis(500));

    let egress = attachment(ino, &t.c_if, "egress").expect("client egress in status");
    let udp_rule = rule(&egress, 0);
    eprintln!(
        "UDP: ICMP frag-needed received {icmps}, client path MTU {pmtu:?}, resend of {} B: {:?}, server got sizes {:?}, \
         rule 0 (packets, bytes, over_mtu) {udp_rule:?}, passed.over_mtu {}",
        big.len(),
        again.as_ref().map_err(|e| e.raw_os_error()),
        got.iter().map(Vec::len).collect::<Vec<_>>(),
        passed(&egress, "over_mtu")
    );
    assert_eq!(icmps, 1, "one ICMP fragmentation-needed for the one oversized datagram");
    assert_eq!(pmtu, Some(FUNNEL_MTU), "the client's kernel took the MTU from the ICMP");
    assert_eq!(again.map_err(|e| e.raw_os_error()), Err(Some(libc::EMSGSIZE)), "an oversized DF send now fails");
    assert_eq!(got, vec![fits.clone()], "the server gets the datagram that fits, and only it");
    assert_eq!(udp_rule, (1, (ETH_HLEN + 20 + 8 + fits.len()) as u64, 1), "one funneled, one over the MTU");
    assert_eq!(passed(&egress, "over_mtu"), 0, "drop mode passes nothing unfunneled");

    t.teardown();
}

#[test]
fn over_mtu_pass_sends_unfunneled() {
    if !common::require_root("over_mtu_pass_sends_unfunneled") {
        return;
    }
    let t = topo(Some("pass"));
    let server = udp_socket(&t.server, UDP_PORT, false);
    let client = udp_socket(&t.client, 0, true);

    let cap = Capture::start(&t.router, &t.rs_if);
    let big = pattern(3, FULL_UDP);
    let small = pattern(4, 100);
    client.send_to(&big, sa(SERVER_IP, UDP_PORT)).expect("send");
    client.send_to(&small, sa(SERVER_IP, UDP_PORT)).expect("send");
    let got = received(&server, Duration::from_millis(500));
    let frames = cap.stop().frames;
    let on_wire: Vec<(Proto, u16, u16, usize)> = frames
        .iter()
        .filter(|f| f.outgoing)
        .filter_map(|f| l4_of(&f.data).map(|(p, s, d)| (p, s, d, f.data.len() - ETH_HLEN)))
        .collect();
    let pmtu = cached_pmtu(&t.client, SERVER_IP);
    let egress = attachment(t.ino(&t.client), &t.c_if, "egress").expect("client egress in status");
    let udp_rule = rule(&egress, 0);
    let sport = client.local_addr().unwrap().port();
    eprintln!(
        "pass: on the router's server side {on_wire:?}; server got sizes {:?}; client path MTU {pmtu:?}; rule 0 \
         (packets, bytes, over_mtu) {udp_rule:?}; passed.over_mtu {}",
        got.iter().map(Vec::len).collect::<Vec<_>>(),
        passed(&egress, "over_mtu")
    );
    assert_eq!(
        on_wire,
        vec![(Proto::Udp, sport, UDP_PORT, MTU), (Proto::Tcp, 540, 80, 20 + 20 + 8 + small.len())],
        "the oversized datagram crosses unfunneled, the small one funneled"
    );
    assert_eq!(got, vec![big.clone(), small.clone()], "the server gets both");
    assert_eq!(pmtu, None, "no ICMP: the client's path MTU is unchanged");
    assert_eq!(udp_rule, (1, (ETH_HLEN + 20 + 8 + small.len()) as u64, 1));
    assert_eq!(passed(&egress, "over_mtu"), 1);
    let text = sfunnel(&["status"], &[]).expect_ok().stdout;
    assert!(text.contains("(1 over the MTU)"), "status shows the count beside the rule:\n{text}");
    t.teardown();
}

/// A router that funnels what it forwards, on its server-side egress or its
/// client-side ingress: the client's oversized DF datagram is dropped there
/// and the client gets the ICMP (routed back from egress, sent straight out
/// from ingress), learns 1480, and what fits is delivered.  With
/// `router_offloads_off`, the reply leaves through an interface without
/// transmit checksum offload, which completes any checksum its buffer
/// still owes: the client's datagram arrives owing one (its veth keeps
/// its offloads), so the reply must be made from a buffer whose checksum
/// was completed first (bpf/mtu.h), or the client would find it corrupt.
fn funneling_router_replies(direction: &str, router_offloads_off: bool) {
    let t = Topo::new(TopoOpts { router_offloads_off, ..Default::default() });
    for (ns, dev) in [(&t.client, &t.c_if), (&t.server, &t.s_if)] {
        nsh(ns, &["ip", "link", "set", dev, "mtu", &MTU.to_string()]);
    }
    let dev = if direction == "egress" { &t.rs_if } else { &t.rc_if };
    let funnel = "udp dport 4739 actions funnel tcp sport 540 dport 80";
    for (ns, dev, dir, rules) in
        [(&t.router, dev, direction, funnel), (&t.server, &t.s_if, "ingress", "tcp dport 80 actions unfunnel udp")]
    {
        sfunnel(&[], &[("SFUNNEL_RULESET", rules), ("IFACES", dev), ("DIRECTION", dir), ("NETNS", ns)]).expect_ok();
    }
    let server = udp_socket(&t.server, UDP_PORT, false);
    let client = udp_socket(&t.client, 0, true);
    let sport = client.local_addr().unwrap().port();

    let cap = Capture::start(&t.client, &t.c_if);
    client.send_to(&pattern(5, FULL_UDP), sa(SERVER_IP, UDP_PORT)).expect("send");
    wait_for_pmtu(&t.client, SERVER_IP);
    let icmps = frag_needed_frames(&cap.stop().frames, sport, MTU);
    let pmtu = cached_pmtu(&t.client, SERVER_IP);
    let fits = pattern(6, FUNNEL_MTU - 20 - 8);
    client.send_to(&fits, sa(SERVER_IP, UDP_PORT)).expect("a datagram that fits");
    let got = received(&server, Duration::from_millis(500));
    let a = attachment(t.ino(&t.router), dev, direction).expect("router attachment in status");
    let r = rule(&a, 0);
    eprintln!(
        "router {direction} (router tx offload {}): ICMP frag-needed at the client {icmps}, client path MTU {pmtu:?}, server got sizes {:?}, \
         rule (packets, bytes, over_mtu) {r:?}",
        if router_offloads_off { "off" } else { "on" },
        got.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert_eq!(icmps, 1, "one ICMP fragmentation-needed reached the client");
    assert_eq!(pmtu, Some(FUNNEL_MTU));
    assert_eq!(got, vec![fits.clone()]);
    assert_eq!((r.0, r.2), (1, 1), "one funneled, one over the MTU");
    t.teardown();
}

#[test]
fn over_mtu_on_a_routers_egress() {
    if !common::require_root("over_mtu_on_a_routers_egress") {
        return;
    }
    funneling_router_replies("egress", false);
    funneling_router_replies("egress", true);
}

#[test]
fn over_mtu_on_a_routers_ingress() {
    if !common::require_root("over_mtu_on_a_routers_ingress") {
        return;
    }
    funneling_router_replies("ingress", false);
    funneling_router_replies("ingress", true);
}
