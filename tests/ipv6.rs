//! IPv6 end to end, in real namespaces: `ip6` rules funnel UDP and TCP
//! through a router that DNATs with ip6tables, as a Kubernetes Service
//! would, and the server unfunnels them.
//!
//! client ──veth── router (ip6tables DNAT + MASQUERADE, tx/tso/gso off
//! both ways) ──veth── server.  The two ends keep every offload at its
//! default, so bulk TCP leaves the client as GSO packets (through the
//! segmentation detour), and the router completes every checksum, which
//! the server then verifies.  The router forwards only TCP/80 and UDP/81
//! of the service address to the server, so whatever the server receives
//! crossed the router funneled.
//!
//! The rulesets are dual-stack: each starts with an IPv4 rule that is the
//! IPv6 rule's twin, and IPv4 datagrams go through the same namespaces, so
//! the counters show that a family's rules see only that family.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::topology::{
    attachment, echo_until_eof, env_load, in_ns, nsh, nstat, pattern, rule_packets, sa, spawn_in_ns, Topo, TopoOpts,
    SERVICE_IP,
};

/// Client egress.  Rule 0 is IPv4; the others are IPv6, one per funnel
/// combination, the first also matching the service's prefix.
const CLIENT_EGRESS: &str = "\
udp dport 4739 actions funnel tcp sport 540 dport 80
ip6 daddr fd00:201:2::/64 udp dport 4739 actions funnel tcp sport 540 dport 80
ip6 udp dport 4740 actions funnel udp sport 542 dport 81
ip6 tcp dport 7000 actions funnel tcp sport 541 dport 80
ip6 tcp dport 7001 actions funnel udp sport 543 dport 81";

/// Server ingress: the funnel header's ports say what is inside; the IPv6
/// rules also match the router's (masquerading) address.
const SERVER_INGRESS: &str = "\
tcp sport 540 dport 80 actions unfunnel udp
ip6 saddr fd00:201:3::1 tcp sport 540 dport 80 actions unfunnel udp
ip6 udp sport 542 dport 81 actions unfunnel udp
ip6 tcp sport 541 dport 80 actions unfunnel tcp
ip6 udp sport 543 dport 81 actions unfunnel tcp";

/// TCP replies go back funneled with the mirrored ports (the reply tuple
/// of the router's conntrack entry, as in tests/e2e.rs), and are
/// unfunneled by the client.
const SERVER_EGRESS: &str = "\
ip6 tcp sport 7000 actions funnel tcp sport 80 dport 541
ip6 tcp sport 7001 actions funnel udp sport 81 dport 543";
const CLIENT_INGRESS: &str = "\
ip6 tcp sport 80 dport 541 actions unfunnel tcp
ip6 udp sport 81 dport 543 actions unfunnel tcp";

/// Datagram sizes: funneled over TCP the largest is 40 + 8 + 1380 + 20 =
/// 1448 bytes, inside the ends' 1480-byte MTU.
const UDP_SIZES: [usize; 4] = [1, 64, 700, 1380];
const UDP_PER_SIZE: usize = 25;

/// Checksum and header error counters of both families; all must stay 0.
const ERROR_COUNTERS: [&str; 7] = [
    "Udp6InCsumErrors",
    "Udp6InErrors",
    "TcpInCsumErrors",
    "Ip6InHdrErrors",
    "Ip6InTruncatedPkts",
    "UdpInCsumErrors",
    "IpInHdrErrors",
];

fn bulk_bytes() -> usize {
    std::env::var("SFUNNEL_BULK_MIB").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(32) << 20
}

fn load(ns: &str, iface: &str, direction: &str, rules: &str) {
    env_load(ns, iface, direction, rules).expect_ok();
}

fn sa6(a: &str, port: u16) -> SocketAddr {
    SocketAddr::from((a.parse::<Ipv6Addr>().expect("an IPv6 address"), port))
}

/// Sends UDP_PER_SIZE datagrams of each size from the client to `dest`;
/// returns what the server socket got (data, source address).
/// Datagrams received, with where each came from.
type Received = Vec<(Vec<u8>, SocketAddr)>;

fn udp_flow(t: &Topo, server: &UdpSocket, dest: SocketAddr, seed: usize) -> (Vec<Vec<u8>>, Received) {
    let v6 = dest.is_ipv6();
    let client = in_ns(&t.client, move || {
        if v6 {
            UdpSocket::bind("[::]:0").expect("client UDP socket")
        } else {
            UdpSocket::bind("0.0.0.0:0").expect("client UDP socket")
        }
    });
    let mut sent = Vec::new();
    for (k, &n) in UDP_SIZES.iter().flat_map(|n| std::iter::repeat_n(n, UDP_PER_SIZE)).enumerate() {
        let mut d = pattern(seed * 1000 + k, n);
        d[0] = k as u8;
        client.send_to(&d, dest).expect("send");
        sent.push(d);
        // Paced: the point is exactness, not a full socket buffer.
        if k % 10 == 9 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < sent.len() && Instant::now() < deadline {
        if let Ok((n, from)) = server.recv_from(&mut buf) {
            got.push((buf[..n].to_vec(), from));
        }
    }
    (sent, got)
}

fn udp_server(ns: &str, addr: &'static str) -> UdpSocket {
    in_ns(ns, move || {
        let s = UdpSocket::bind(addr).expect("server UDP socket");
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        s
    })
}

/// `len` bytes from the client to the server's `port` and back (the server
/// echoes), written in `chunk`-byte writes while the echo is read.
/// Returns (bytes the server got intact, bytes the client got back intact).
fn tcp_echo(t: &Topo, port: u16, len: usize, chunk: usize, seed: usize) -> Result<(usize, usize), String> {
    tcp_echo_to(t, t.dest6(), port, len, chunk, seed)
}

/// [`tcp_echo`] to the address `to`.
fn tcp_echo_to(t: &Topo, to: &str, port: u16, len: usize, chunk: usize, seed: usize) -> Result<(usize, usize), String> {
    // The previous case's connection on this port can hold it a moment
    // longer in a slow guest (seen once under TCG: EADDRINUSE right after
    // a case that had ended): say who holds it, and try again.
    let mut tries = 0;
    let listener = loop {
        match in_ns(&t.server, move || TcpListener::bind(("::", port))) {
            Ok(l) => break l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 50 => {
                if tries == 0 {
                    let held = nsh(&t.server, &["ss", "-tanpe", &format!("sport = :{port}")]);
                    eprintln!("listen on [::]:{port}: {e}; held by:\n{}", held.stdout);
                }
                tries += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("listen on the server: {e}"),
        }
    };
    let data = pattern(seed, len);
    let want = data.clone();
    let server = spawn_in_ns(&t.server, move || -> Result<Vec<u8>, String> {
        let (mut s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        echo_until_eof(&mut s)
    });
    let dest = sa6(to, port);
    let mut s = in_ns(&t.client, move || TcpStream::connect_timeout(&dest, Duration::from_secs(5)))
        .map_err(|e| format!("connect {dest}: {e}"))?;
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || -> Result<(), String> {
        for c in data.chunks(chunk) {
            w.write_all(c).map_err(|e| format!("client write: {e}"))?;
        }
        w.shutdown(Shutdown::Write).map_err(|e| e.to_string())
    });
    let mut back = Vec::with_capacity(len);
    let r = s.read_to_end(&mut back);
    writer.join().map_err(|_| "writer panicked".to_string())??;
    r.map_err(|e| format!("client read after {} bytes: {e}", back.len()))?;
    let got = server.join().map_err(|_| "server thread panicked".to_string())??;
    let intact =
        |v: &[u8]| if v == want.as_slice() { v.len() } else { v.iter().zip(&want).take_while(|(a, b)| a == b).count() };
    Ok((intact(&got), intact(&back)))
}

#[test]
fn ipv6_udp_and_tcp_funneled_through_ip6tables_dnat_arrive_exactly() {
    if !common::require_root("ipv6_udp_and_tcp_funneled_through_ip6tables_dnat_arrive_exactly") {
        return;
    }
    let t = Topo::new(TopoOpts { nat: true, router_offloads_off: true, ipv6: true, ..Default::default() });
    load(&t.client, &t.c_if, "egress", CLIENT_EGRESS);
    load(&t.client, &t.c_if, "ingress", CLIENT_INGRESS);
    load(&t.server, &t.s_if, "ingress", SERVER_INGRESS);
    load(&t.server, &t.s_if, "egress", SERVER_EGRESS);
    let mut failures = Vec::new();

    // UDP over TCP and over UDP, to the service address.
    for (seed, port) in [(1, 4739u16), (2, 4740)] {
        let server = udp_server(&t.server, if port == 4739 { "[::]:4739" } else { "[::]:4740" });
        let (sent, got) = udp_flow(&t, &server, sa6(t.dest6(), port), seed);
        let data: Vec<&Vec<u8>> = got.iter().map(|(d, _)| d).collect();
        let exact = data.len() == sent.len() && data.iter().zip(&sent).all(|(a, b)| *a == b);
        let from: Vec<String> = got.iter().map(|(_, f)| f.ip().to_string()).collect();
        let wrong_from = from.iter().find(|f| *f != t.client_seen_by_server6());
        println!(
            "UDP/{port} over IPv6: sent {} datagrams ({:?} bytes), server got {} {}",
            sent.len(),
            UDP_SIZES,
            got.len(),
            if exact { "exact, in order" } else { "NOT exact" }
        );
        if !exact {
            failures.push(format!("UDP/{port}: {} of {} datagrams, exact: {exact}", got.len(), sent.len()));
        }
        if let Some(f) = wrong_from {
            failures.push(format!("UDP/{port}: a datagram came from {f}, not {}", t.client_seen_by_server6()));
        }
    }

    // The IPv4 twin of the first flow, through the same attachments.
    let server4 = udp_server(&t.server, "0.0.0.0:4739");
    let (sent4, got4) = udp_flow(&t, &server4, sa(SERVICE_IP, 4739), 3);
    let exact4 = got4.len() == sent4.len() && got4.iter().zip(&sent4).all(|((d, _), s)| d == s);
    println!("UDP/4739 over IPv4 beside it: sent {}, server got {} (exact: {exact4})", sent4.len(), got4.len());
    if !exact4 {
        failures.push(format!("UDP/4739 over IPv4: {} of {} datagrams, exact: {exact4}", got4.len(), sent4.len()));
    }

    // TCP over TCP and over UDP, funneled both ways: request/response in
    // small writes, then bulk (GSO packets through the detour).
    let bulk = bulk_bytes();
    for (port, name) in [(7000u16, "TCP over TCP"), (7001, "TCP over UDP")] {
        for (len, chunk, what) in [(64 * 1024, 1000, "1000-byte writes"), (bulk, 1 << 20, "bulk")] {
            match tcp_echo(&t, port, len, chunk, usize::from(port) + len) {
                Ok((to_server, back)) => {
                    println!("{name} over IPv6, {what}: {len} B sent, {to_server} B intact at the server, {back} B echoed back intact");
                    if (to_server, back) != (len, len) {
                        failures.push(format!("{name}, {what}: {to_server} and {back} of {len} bytes intact"));
                    }
                }
                Err(e) => failures.push(format!("{name}, {what}: {e}")),
            }
        }
    }

    // Every rule counted its own family only.
    let counts = |ns: &str, iface: &str, dir: &str| {
        rule_packets(&attachment(t.ino(ns), iface, dir).unwrap_or_else(|| panic!("no status for {iface} {dir}")))
    };
    let ce = counts(&t.client, &t.c_if, "egress");
    let si = counts(&t.server, &t.s_if, "ingress");
    let se = counts(&t.server, &t.s_if, "egress");
    let ci = counts(&t.client, &t.c_if, "ingress");
    println!("rule packets: client egress {ce:?}, server ingress {si:?}, server egress {se:?}, client ingress {ci:?}");
    let n = (UDP_SIZES.len() * UDP_PER_SIZE) as u64;
    if ce[..3] != [n, n, n] || si[..3] != [n, n, n] {
        failures.push(format!("UDP rule counters: client egress {ce:?}, server ingress {si:?}; want {n} each"));
    }
    // Funneled segment by segment: at least one count per MTU-sized piece
    // of the bulk transfer, and some in each reply direction.
    let segments = (bulk / 1500) as u64;
    if ce[3..].iter().chain(&si[3..]).any(|&p| p < segments) || se.iter().chain(&ci).any(|&p| p < 64) {
        failures.push(format!("TCP rule counters too low (want >= {segments} forward, >= 64 back)"));
    }

    // No checksum or header error anywhere, either family.
    for ns in [&t.server, &t.client] {
        let errs = nstat(ns, &ERROR_COUNTERS);
        println!("{ns}: {}", errs.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "));
        if errs.iter().any(|(_, v)| *v != 0) {
            failures.push(format!("{ns}: error counters {errs:?}"));
        }
    }
    t.teardown();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Rule 0 of `iface direction`: (packets, over_mtu).
fn rule0(t: &Topo, ns: &str, iface: &str, dir: &str) -> (u64, u64) {
    let a = attachment(t.ino(ns), iface, dir).unwrap_or_else(|| panic!("no status for {iface} {dir}"));
    (a["rules"][0]["packets"].as_u64().unwrap_or(0), a["rules"][0]["over_mtu"].as_u64().unwrap_or(0))
}

/// The path MTU `ns` has cached towards `to` (`ip -6 route get`: "… mtu N").
fn cached_pmtu6(ns: &str, to: &str) -> Option<usize> {
    let out = common::topology::nsh(ns, &["ip", "-6", "route", "get", to]).stdout;
    let mut words = out.split_whitespace();
    words.by_ref().find(|w| *w == "mtu")?;
    words.next()?.parse().ok()
}

/// The MTU guard over IPv6: with the ends at the router's 1500, a full-size
/// datagram does not fit once funneled.  It is dropped, and the sender gets
/// an ICMPv6 "packet too big" for 1480, which its kernel accepts (checksum,
/// quote) and caches as the path MTU; what it sends next fits and is
/// delivered.  A TCP stream of full-size segments adapts the same way.
#[test]
fn ipv6_over_mtu_sends_packet_too_big_and_traffic_adapts() {
    if !common::require_root("ipv6_over_mtu_sends_packet_too_big_and_traffic_adapts") {
        return;
    }
    let t = Topo::new(TopoOpts { router_offloads_off: true, ipv6: true, ..Default::default() });
    for (ns, dev) in [(&t.client, &t.c_if), (&t.server, &t.s_if)] {
        common::topology::nsh(ns, &["ip", "link", "set", dev, "mtu", "1500"]);
    }
    load(&t.client, &t.c_if, "egress", "ip6 udp dport 4739 actions funnel tcp sport 540 dport 80\nip6 tcp dport 7000 actions funnel tcp sport 541 dport 80");
    load(&t.client, &t.c_if, "ingress", "ip6 tcp sport 80 dport 541 actions unfunnel tcp");
    load(
        &t.server,
        &t.s_if,
        "ingress",
        "ip6 tcp sport 540 dport 80 actions unfunnel udp\nip6 tcp sport 541 dport 80 actions unfunnel tcp",
    );
    load(&t.server, &t.s_if, "egress", "ip6 tcp sport 7000 actions funnel tcp sport 80 dport 541");
    let mut failures = Vec::new();

    let server = udp_server(&t.server, "[::]:4739");
    let dest = sa6(common::topology::SERVER_IP6, 4739);
    let client = in_ns(&t.client, || {
        let s = UdpSocket::bind("[::]:0").expect("client UDP socket");
        // No local fragmentation: EMSGSIZE above the path MTU.
        common::set_int_opt(&s, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1).expect("IPV6_DONTFRAG");
        s
    });
    // 40 + 8 + 1452 = 1500: fits the link, not once funneled (+20).
    let full = pattern(7, 1452);
    client.send_to(&full, dest).expect("the first full-size send");
    let deadline = Instant::now() + Duration::from_secs(5);
    while cached_pmtu6(&t.client, common::topology::SERVER_IP6).is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let pmtu = cached_pmtu6(&t.client, common::topology::SERVER_IP6);
    let again = client.send_to(&full, dest).map_err(|e| e.raw_os_error());
    let fits = pattern(8, 1432);
    client.send_to(&fits, dest).expect("a send that fits");
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Ok((n, _)) = server.recv_from(&mut buf) {
            got.push(buf[..n].to_vec());
        }
    }
    let (packets, over) = rule0(&t, &t.client, &t.c_if, "egress");
    println!(
        "1452-byte datagram: client path MTU now {pmtu:?}, resend -> {again:?} (EMSGSIZE = {}); \
         server got {:?} bytes; rule (packets, over_mtu) = ({packets}, {over})",
        libc::EMSGSIZE,
        got.iter().map(Vec::len).collect::<Vec<_>>()
    );
    if pmtu != Some(1480) {
        failures.push(format!("path MTU {pmtu:?} after the packet too big, want 1480"));
    }
    if again != Err(Some(libc::EMSGSIZE)) {
        failures.push(format!("resending 1452 bytes: {again:?}, want EMSGSIZE"));
    }
    if got != [fits] || (packets, over) != (1, 1) {
        failures.push("the datagram that fits was not the only one funneled and delivered".into());
        // What is needed to tell where it went.
        let nonzero = |ns: &str| -> String {
            let out = common::topology::nsh(ns, &["nstat", "-az"]).stdout;
            out.lines().filter(|l| l.split_whitespace().nth(1).is_some_and(|v| v != "0")).collect::<Vec<_>>().join("; ")
        };
        eprintln!("status:\n{}", common::topology::sfunnel(&["status"], &[]).stdout);
        eprintln!("router counters: {}\nserver counters: {}", nonzero(&t.router), nonzero(&t.server));
        eprintln!("router neighbours: {}", common::topology::nsh(&t.router, &["ip", "-6", "neigh"]).stdout);
    }

    // TCP with full-size segments both ways, through the detour and the
    // guard, adapts and arrives intact.
    let len = 1 << 20;
    match tcp_echo_to(&t, common::topology::SERVER_IP6, 7000, len, 1 << 16, 9) {
        Ok(r) => {
            println!("TCP over TCP at MTU 1500: {len} B sent, ({}, {}) B intact at the server and back", r.0, r.1);
            if r != (len, len) {
                failures.push(format!("TCP: {r:?} of {len} bytes intact"));
            }
        }
        Err(e) => failures.push(format!("TCP: {e}")),
    }
    for ns in [&t.server, &t.client] {
        let errs = nstat(ns, &ERROR_COUNTERS);
        if errs.iter().any(|(_, v)| *v != 0) {
            failures.push(format!("{ns}: error counters {errs:?}"));
        }
    }
    t.teardown();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
