//! End-to-end system tests: the real binary, real network namespaces, veth
//! pairs, a forwarding router with and without iptables NAT, real sockets.
//! Root only (see `root`).  Helpers: tests/common/topology.rs (namespaces,
//! commands, the container env interface), tests/common/capture.rs
//! (AF_PACKET capture on the router), tests/common/packet.rs (the
//! spec-based packet oracle).
//!
//! ```text
//!   client ns                 router ns (ip_forward=1)                server ns
//!   10.201.1.2 ─ veth ─ 10.201.1.1 | svc 10.201.2.1 | 10.201.3.1 ─ veth ─ 10.201.3.2
//!   egress: funnel          ^ capture          capture ^               ingress: unfunnel
//!   ingress: unfunnel (replies)   NAT: DNAT svc → server,              egress: funnel (replies)
//!                                      MASQUERADE towards the server
//! ```
//! The router captures with AF_PACKET on both of its interfaces, so every
//! funneled frame is checked against the spec before and after the router
//! (and its NAT).
//!
//! Tests: the matrix (4 combinations × payloads 3/4/1001 × NAT or not ×
//! two offload settings), reruns under traffic, a bad ruleset on rerun,
//! racing loaders, incompatible pins, missing privileges, clsact mode;
//! source-port NAT (two clients behind one SNAT, a stale conntrack entry):
//! port-based unfunnel rules fail, `funneled` + `unfunnel auto` deliver.
//! tests/nat_checksum.rs adds a second hop that verifies checksums.
//!
//! Every load goes through the original container's environment interface
//! (no verb; SFUNNEL_RULESET, IFACES, DIRECTION, NETNS; CLEAN=1 to unload),
//! except where a test is about a flag (`--attach clsact`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::capture::{complete_inner_csum, l4_of, Capture, Frame};
use common::packet::{be16, check_funneled, diff, expected_funnel, expected_unfunnel, l4_header_len, Ip, Proto};
use common::topology::{
    attachment, echo_until_eof, env_load, env_unload, helper_pair, hook_prog_ids, ifindex, in_ns, ip_str, nsh, nstat,
    pattern, printed_prog_id, prog_name, rule_packets, run, sa, sfunnel, sfunnel_cmd, spawn, tcx_prog_ids, Topo,
    TopoOpts, CLIENT2_IP, CLIENT_IP, ROUTER_S_IP, SERVER_IP,
};

// ---------------------------------------------------------------------------
// Root
// ---------------------------------------------------------------------------

/// Whether this test may run: root, or a loud skip that *fails* unless
/// SFUNNEL_ALLOW_SKIP=1 (`common::require_root`).
#[must_use]
fn root(test: &str) -> bool {
    common::require_root(test)
}

// ---------------------------------------------------------------------------
// The four funnel combinations and their rules
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Combo {
    name: &'static str,
    /// The application's protocol and server port.
    inner: Proto,
    app_port: u16,
    /// The funnel header's protocol.
    outer: Proto,
    /// Funnel header ports, client → server (sport, dport).
    fwd: (u16, u16),
    /// Funnel header ports of the server's replies (TCP only).
    rev: Option<(u16, u16)>,
}

/// Each combination has its own funnel source port, so the server can tell
/// the inner protocol from the funnel header alone; all of them share the
/// "service" port (TCP/80 or UDP/81), like one Kubernetes Service.
const COMBOS: [Combo; 4] = [
    Combo { name: "udp-over-tcp", inner: Proto::Udp, app_port: 4739, outer: Proto::Tcp, fwd: (540, 80), rev: None },
    Combo { name: "udp-over-udp", inner: Proto::Udp, app_port: 4740, outer: Proto::Udp, fwd: (542, 81), rev: None },
    Combo {
        name: "tcp-over-tcp",
        inner: Proto::Tcp,
        app_port: 7000,
        outer: Proto::Tcp,
        fwd: (541, 80),
        rev: Some((80, 541)),
    },
    Combo {
        name: "tcp-over-udp",
        inner: Proto::Tcp,
        app_port: 7001,
        outer: Proto::Udp,
        fwd: (543, 81),
        rev: Some((81, 543)),
    },
];

/// Client egress: funnel each application flow into its funnel header.
const CLIENT_EGRESS: &str = "\
udp dport 4739 actions funnel tcp sport 540 dport 80
udp dport 4740 actions funnel udp sport 542 dport 81
tcp dport 7000 actions funnel tcp sport 541 dport 80
tcp dport 7001 actions funnel udp sport 543 dport 81";

/// Server ingress: the funnel header's ports say what is inside.  With NAT
/// the router keeps the source ports (MASQUERADE only changes a port when
/// the tuple is taken, and nothing else uses these).
const SERVER_INGRESS: &str = "\
tcp sport 540 dport 80 actions unfunnel udp
udp sport 542 dport 81 actions unfunnel udp
tcp sport 541 dport 80 actions unfunnel tcp
udp sport 543 dport 81 actions unfunnel tcp";

/// Server egress: TCP replies are funneled back with the *mirrored* funnel
/// ports.  This is what makes NAT work both ways: the router's conntrack
/// entry for the request is (client:541 → svc:80, reply server:80 →
/// router:541); a reply funneled as TCP 80 → 541 is that entry's reply
/// tuple, so the router un-DNATs it (source becomes svc:80) and un-SNATs it
/// (destination becomes client:541).  A plain reply (TCP 7000 → ephemeral)
/// would match no entry and never reach the client.
const SERVER_EGRESS: &str = "\
tcp sport 7000 actions funnel tcp sport 80 dport 541
tcp sport 7001 actions funnel udp sport 81 dport 543";

/// Client ingress: unfunnel the replies.  The client then sees the reply
/// come from the address it connected to (svc with NAT, the server
/// without), as its socket expects.
const CLIENT_INGRESS: &str = "\
tcp sport 80 dport 541 actions unfunnel tcp
udp sport 81 dport 543 actions unfunnel tcp";

fn load_ok(ns: &str, iface: &str, direction: &str, rules: &str) -> u32 {
    let out = env_load(ns, iface, direction, rules).expect_ok();
    printed_prog_id(&out.stdout, iface, direction)
        .unwrap_or_else(|| panic!("no program id in the load output: {}", out.stdout))
}

fn load_all(t: &Topo) {
    load_ok(&t.client, &t.c_if, "egress", CLIENT_EGRESS);
    load_ok(&t.client, &t.c_if, "ingress", CLIENT_INGRESS);
    load_ok(&t.server, &t.s_if, "ingress", SERVER_INGRESS);
    load_ok(&t.server, &t.s_if, "egress", SERVER_EGRESS);
}

// ---------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------

fn set_rcvbuf(fd: i32, bytes: i32) {
    // SAFETY: setsockopt on a valid descriptor with an int value.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
    }
}

/// Binds with retries on EADDRINUSE for up to 20 seconds: a socket this
/// test closed a moment ago can still be referenced for a while by a child
/// process another test thread is forking (the descriptor is close-on-exec,
/// but a fork holds it until the exec, which takes seconds in an emulated
/// guest).
fn bind_retry<T>(what: &str, mut bind: impl FnMut() -> std::io::Result<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match bind() {
            Ok(s) => return s,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// A UDP socket bound in `ns` to `port` (0: any), with a short read
/// timeout and a large receive buffer.
fn udp_socket(ns: &str, port: u16) -> UdpSocket {
    let what = format!("binding UDP port {port} in {ns}");
    in_ns(ns, move || {
        let s = bind_retry(&what, || UdpSocket::bind(sa([0; 4], port)));
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        set_rcvbuf(s.as_raw_fd(), 16 << 20);
        s
    })
}

/// Receives until `n` datagrams arrived or `timeout` passed.
fn udp_recv(s: &UdpSocket, n: usize, timeout: Duration) -> Vec<(Vec<u8>, SocketAddr)> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    while got.len() < n && Instant::now() < deadline {
        if let Ok((len, from)) = s.recv_from(&mut buf) {
            got.push((buf[..len].to_vec(), from));
        }
    }
    got
}

// ---------------------------------------------------------------------------
// Checking captured frames against the specification
// ---------------------------------------------------------------------------

/// What the application sent, to check inner payloads against.
enum Sent<'a> {
    Datagrams(&'a [Vec<u8>]),
    /// One TCP byte stream each way (the response echoes the request).
    Stream(&'a [u8]),
}

#[derive(Default, Debug)]
struct FrameCheck {
    /// Funneled frames client → router, and (replies) router → client.
    fwd: usize,
    rev: usize,
    /// Funneled frames that matched the spec byte for byte.
    spec_ok: usize,
    /// Frames still CHECKSUM_PARTIAL on the wire, completed by the check
    /// as the device would (inner checksum).
    partial: usize,
    /// Frames of the flow that crossed the router *unfunneled*.
    escaped: usize,
    /// Inner payloads found equal to what the application sent.
    payload_ok: usize,
    /// TCP checksum fields that hold 0xffff where the oracle computed
    /// 0x0000 (the same ones'-complement value).
    tcp_neg_zero: usize,
    /// Frames past the router's NAT whose only difference from the spec is
    /// a wrong outer L4 checksum (a NAT that took the funnel header's
    /// checksum for one still owed: see bpf/csum_state.h).
    nat_outer_csum_bad: usize,
    nat_sample: Option<String>,
    problems: Vec<String>,
}

impl FrameCheck {
    fn problem(&mut self, p: String) {
        if self.problems.len() < 6 {
            self.problems.push(p);
        }
    }
}

/// A capture point on the router and what the flow looks like there.
struct Point {
    name: &'static str,
    /// Client → server frames are the ones the router sends here
    /// (server-facing side) rather than receives (client-facing side).
    fwd_outgoing: bool,
    /// (source, destination) of client → server frames here.
    fwd_addrs: ([u8; 4], [u8; 4]),
    /// The direction whose frames here have been through the router's
    /// NAT, if the router does NAT.
    post_nat_dir: Option<usize>,
}

impl Point {
    /// The router's client-facing interface: before the router's NAT for
    /// requests, after it for replies.
    fn client_side(t: &Topo) -> Point {
        Point {
            name: "router client side",
            fwd_outgoing: false,
            fwd_addrs: (CLIENT_IP, t.dest()),
            post_nat_dir: t.opts.nat.then_some(1),
        }
    }

    /// The router's server-facing interface: after its NAT for requests,
    /// before it for replies.
    fn server_side(t: &Topo) -> Point {
        Point {
            name: "router server side",
            fwd_outgoing: true,
            fwd_addrs: (t.client_seen_by_server(), SERVER_IP),
            post_nat_dir: t.opts.nat.then_some(0),
        }
    }
}

/// Checks every frame of `combo` captured at one point on the router:
/// - the flow never crosses unfunneled;
/// - a funneled frame, unfunneled per spec (NOTES §1, `expected_unfunnel`),
///   carries exactly what the application sent;
/// - funneling that inner packet again per spec (`expected_funnel`, every
///   checksum computed from scratch) gives the captured frame byte for
///   byte; and `check_funneled` confirms the outer checksum is valid for
///   the real addresses and the inner one for zero addresses.
///
fn check_frames(frames: &[Frame], combo: &Combo, sent: &Sent<'_>, point: &Point) -> FrameCheck {
    let mut r = FrameCheck::default();
    let mut isn: [Option<u32>; 2] = [None, None];
    for f in frames {
        if f.truncated {
            r.problem("a truncated capture".into());
            continue;
        }
        let Some((proto, sp, dp)) = l4_of(&f.data) else { continue };
        let ports = (sp, dp);
        // 0: client → server, 1: server → client.
        let dir = usize::from(f.outgoing != point.fwd_outgoing);
        let funneled = if dir == 0 {
            proto == combo.outer && ports == combo.fwd
        } else {
            proto == combo.outer && Some(ports) == combo.rev
        };
        if !funneled {
            if proto == combo.inner && (dp == combo.app_port || sp == combo.app_port) {
                r.escaped += 1;
                r.problem(format!("unfunneled {} {sp} -> {dp} crossed the router (dir {dir})", proto.name()));
            }
            continue;
        }
        if dir == 0 {
            r.fwd += 1;
        } else {
            r.rev += 1;
        }
        let ip = Ip::of(&f.data);
        let want = if dir == 0 { point.fwd_addrs } else { (point.fwd_addrs.1, point.fwd_addrs.0) };
        if (ip.saddr, ip.daddr) != want {
            r.problem(format!("addresses {:?} -> {:?}, want {:?}", ip.saddr, ip.daddr, want));
        }
        let g = if f.csum_not_ready {
            r.partial += 1;
            complete_inner_csum(&f.data, combo.inner)
        } else {
            f.data.clone()
        };
        let inner = expected_unfunnel(&g, combo.inner);
        let iip = Ip::of(&inner);
        let seg = &inner[iip.l4_off()..iip.end()];
        let payload = &seg[l4_header_len(combo.inner, seg)..];
        match sent {
            Sent::Datagrams(d) => {
                if d.iter().any(|x| x.as_slice() == payload) {
                    r.payload_ok += 1;
                } else {
                    r.problem(format!("inner UDP payload of {} bytes is none of those sent", payload.len()));
                }
            }
            Sent::Stream(data) => {
                let seq = u32::from_be_bytes(seg[4..8].try_into().unwrap());
                if seg[13] & 0x02 != 0 {
                    isn[dir] = Some(seq);
                }
                if !payload.is_empty() {
                    match isn[dir] {
                        Some(i) => {
                            let off = seq.wrapping_sub(i).wrapping_sub(1) as usize;
                            if data.get(off..off + payload.len()) == Some(payload) {
                                r.payload_ok += 1;
                            } else {
                                r.problem(format!(
                                    "inner TCP payload at stream offset {off} differs from what was sent"
                                ));
                            }
                        }
                        None => r.problem("inner TCP payload before the SYN was seen".into()),
                    }
                } else {
                    r.payload_ok += 1;
                }
            }
        }
        let (s, d) = if dir == 0 { combo.fwd } else { combo.rev.unwrap() };
        let mut again = expected_funnel(&inner, combo.outer, s, d);
        // TCP has two checksum zeros: 0x0000 and 0xffff are the same value
        // in ones' complement and both verify.  The spec oracle writes
        // 0x0000; the kernel's skb_checksum_help writes 0xffff
        // (CSUM_MANGLED_0) for every protocol when it completes a
        // CHECKSUM_PARTIAL checksum.  Accept either for TCP fields only (a
        // UDP 0 would mean "no checksum").
        let outer_csum = ip.l4_off() + combo.outer.csum_offset();
        let inner_csum = ip.l4_off() + combo.outer.funnel_header_len() + combo.inner.csum_offset();
        for (off, p) in [(outer_csum, combo.outer), (inner_csum, combo.inner)] {
            let (a, b) = (be16(&again, off), be16(&g, off));
            if p == Proto::Tcp && a != b && (a == 0 || a == 0xFFFF) && (b == 0 || b == 0xFFFF) {
                again[off..off + 2].copy_from_slice(&b.to_be_bytes());
                r.tcp_neg_zero += 1;
            }
        }
        let csum_ok = check_funneled(&g, combo.inner);
        if again == g && csum_ok.is_ok() {
            r.spec_ok += 1;
            continue;
        }
        // The one known deviation: after the router's NAT, only the outer
        // L4 checksum is wrong (see `matrix_endpoint_offloads_on_nat`).
        let only_outer_csum = again.len() == g.len()
            && again.iter().zip(&g).enumerate().all(|(i, (a, b))| a == b || i == outer_csum || i == outer_csum + 1);
        if point.post_nat_dir == Some(dir) && only_outer_csum {
            r.nat_outer_csum_bad += 1;
            if r.nat_sample.is_none() {
                r.nat_sample = Some(format!(
                    "{}, dir {dir}: outer {} checksum {:#06x}, spec {:#06x} ({})",
                    point.name,
                    combo.outer.name(),
                    be16(&g, outer_csum),
                    be16(&again, outer_csum),
                    csum_ok.err().unwrap_or_default()
                ));
            }
            continue;
        }
        if again != g {
            r.problem(format!(
                "dir {dir} frame differs from the spec{}:\n{}",
                if f.csum_not_ready { " (CHECKSUM_PARTIAL, inner completed)" } else { "" },
                diff(&again, &g)
            ));
        }
        if let Err(e) = csum_ok {
            r.problem(format!("dir {dir} checksums: {e}"));
        }
    }
    r
}

// ---------------------------------------------------------------------------
// Requirement 1: the matrix
// ---------------------------------------------------------------------------

const PAYLOADS: [usize; 3] = [3, 4, 1001];
const DATAGRAMS: usize = 5;
/// Bytes each way in a TCP case: about 3 KiB, in chunks of the case's
/// payload size.
const TCP_BYTES: usize = 3072;

struct CaseResult {
    combo: &'static str,
    payload: usize,
    app: String,
    /// At the router's client side and server side.
    points: Vec<(&'static str, FrameCheck)>,
    errors: Vec<String>,
}

impl CaseResult {
    fn ok(&self) -> bool {
        self.errors.is_empty()
            && self
                .points
                .iter()
                .all(|(_, f)| f.problems.is_empty() && f.escaped == 0 && f.fwd > 0 && f.spec_ok == f.fwd + f.rev)
    }
}

/// Captures on both router interfaces at once.
struct Captures {
    client_side: Capture,
    server_side: Capture,
}

impl Captures {
    fn start(t: &Topo) -> Captures {
        Captures { client_side: Capture::start(&t.router, &t.rc_if), server_side: Capture::start(&t.router, &t.rs_if) }
    }

    /// Stops both and checks every frame at each point; capture drops go
    /// to `errors`.
    fn check(
        self,
        t: &Topo,
        combo: &Combo,
        sent: &Sent<'_>,
        errors: &mut Vec<String>,
    ) -> Vec<(&'static str, FrameCheck)> {
        let mut out = Vec::new();
        for (cap, point) in [(self.client_side, Point::client_side(t)), (self.server_side, Point::server_side(t))] {
            let r = cap.stop();
            if r.drops > 0 {
                errors.push(format!("{}: capture dropped {} frames", point.name, r.drops));
            }
            out.push((point.name, check_frames(&r.frames, combo, sent, &point)));
        }
        out
    }
}

fn udp_case(t: &Topo, combo: &Combo, payload: usize, case: usize) -> CaseResult {
    let server = udp_socket(&t.server, combo.app_port);
    let client = udp_socket(&t.client, 0);
    let dest = t.dest();
    let sent: Vec<Vec<u8>> = (0..DATAGRAMS)
        .map(|k| {
            let mut d = pattern(case * 16 + k, payload);
            d[0] = k as u8;
            d
        })
        .collect();
    let caps = Captures::start(t);
    for d in &sent {
        client.send_to(d, sa(dest, combo.app_port)).expect("send");
    }
    let got = udp_recv(&server, DATAGRAMS, Duration::from_secs(3));
    let mut errors = Vec::new();
    let points = caps.check(t, combo, &Sent::Datagrams(&sent), &mut errors);
    let got_data: Vec<Vec<u8>> = got.iter().map(|(d, _)| d.clone()).collect();
    if got_data != sent {
        errors.push(format!(
            "server received {} datagrams (lengths {:?}), sent {} of {payload} bytes; equal: {}",
            got.len(),
            got_data.iter().map(Vec::len).collect::<Vec<_>>(),
            sent.len(),
            got_data == sent
        ));
    }
    let want_from = t.client_seen_by_server();
    if let Some((_, from)) = got.iter().find(|(_, f)| f.ip() != Ipv4Addr::from(want_from)) {
        errors.push(format!("a datagram came from {from}, expected {}", ip_str(want_from)));
    }
    for (name, fc) in &points {
        if fc.fwd != DATAGRAMS {
            errors.push(format!("{name}: {} funneled frames, sent {DATAGRAMS} datagrams", fc.fwd));
        }
    }
    CaseResult {
        combo: combo.name,
        payload,
        app: format!("{}/{} datagrams exact", got_data.iter().zip(&sent).filter(|(a, b)| a == b).count(), DATAGRAMS),
        points,
        errors,
    }
}

/// The server side of a TCP case: accept one connection, echo every read
/// at once, return what was read, until EOF.
fn tcp_echo_server(l: TcpListener) -> Result<Vec<u8>, String> {
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = loop {
        match l.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    echo_until_eof(&mut s)
}

/// A TCP request/response of TCP_BYTES each way: the client writes chunks
/// of `payload` bytes with TCP_NODELAY and waits for each chunk's echo, so
/// that every segment is one non-GSO skb (NOTES §4).
fn tcp_case(t: &Topo, combo: &Combo, payload: usize, case: usize) -> CaseResult {
    let listener = in_ns(&t.server, {
        let port = combo.app_port;
        let what = format!("listening on TCP port {port} in {}", t.server);
        move || bind_retry(&what, || TcpListener::bind(sa([0; 4], port)))
    });
    let total = TCP_BYTES.div_ceil(payload) * payload;
    let data = pattern(case, total);
    let server = std::thread::spawn(move || tcp_echo_server(listener));
    let caps = Captures::start(t);
    let dest = sa(t.dest(), combo.app_port);
    let client = (|| -> Result<Vec<u8>, String> {
        let mut s = in_ns(&t.client, move || TcpStream::connect_timeout(&dest, Duration::from_secs(3)))
            .map_err(|e| format!("connect {dest}: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        let mut echo = Vec::with_capacity(total);
        for chunk in data.chunks(payload) {
            s.write_all(chunk).map_err(|e| format!("client write: {e}"))?;
            let mut back = vec![0u8; chunk.len()];
            s.read_exact(&mut back).map_err(|e| format!("client read after {} bytes: {e}", echo.len()))?;
            echo.extend_from_slice(&back);
        }
        s.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        echo.extend_from_slice(&rest);
        Ok(echo)
    })();
    let server = server.join().unwrap_or_else(|_| Err("server thread panicked".into()));
    let mut errors = Vec::new();
    let points = caps.check(t, combo, &Sent::Stream(&data), &mut errors);
    let (req, resp) = (server.as_ref().map_or(0, Vec::len), client.as_ref().map_or(0, Vec::len));
    match &server {
        Ok(g) if *g == data => {}
        Ok(g) => errors.push(format!("server received {} bytes, not the {total} sent", g.len())),
        Err(e) => errors.push(e.clone()),
    }
    match &client {
        Ok(g) if *g == data => {}
        Ok(g) => errors.push(format!("client received {} bytes back, not {total}", g.len())),
        Err(e) => errors.push(e.clone()),
    }
    let chunks = total / payload;
    for (name, fc) in &points {
        if fc.fwd < chunks || fc.rev < chunks {
            errors.push(format!("{name}: only {} / {} funneled frames each way for {chunks} chunks", fc.fwd, fc.rev));
        }
    }
    CaseResult {
        combo: combo.name,
        payload,
        app: format!("req {req}/{total} B, resp {resp}/{total} B, {chunks} chunks"),
        points,
        errors,
    }
}

const CSUM_COUNTERS: [&str; 4] = ["UdpInCsumErrors", "TcpInCsumErrors", "UdpInErrors", "IpInHdrErrors"];

fn run_matrix(label: &str, opts: TopoOpts) {
    let t0 = Instant::now();
    let t = Topo::new(opts);
    load_all(&t);
    let mut results = Vec::new();
    let mut case = 0;
    for combo in &COMBOS {
        for &p in &PAYLOADS {
            case += 1;
            results.push(match combo.inner {
                Proto::Udp => udp_case(&t, combo, p, case),
                Proto::Tcp => tcp_case(&t, combo, p, case),
            });
        }
    }
    let server = nstat(&t.server, &CSUM_COUNTERS);
    let client = nstat(&t.client, &CSUM_COUNTERS);
    let invalid = if opts.nat { common::topology::conntrack_stat(&t.router, "invalid") } else { None };
    // The router's NAT entries for the funnel flows (state, timeout).
    let conntrack = if opts.nat {
        in_ns(&t.router, || std::fs::read_to_string("/proc/thread-self/net/nf_conntrack").unwrap_or_default())
    } else {
        String::new()
    };
    // Per-rule counters (status --json) against the funneled frames the
    // router saw: the rules of each ruleset are in COMBOS order (TCP
    // combinations only for the reply rulesets).  Point 0 is the client
    // side, 1 the server side.
    let seen = |point: usize, rev: bool, tcp_only: bool| -> Vec<u64> {
        COMBOS
            .iter()
            .filter(|c| !tcp_only || c.inner == Proto::Tcp)
            .map(|c| {
                results
                    .iter()
                    .filter(|r| r.combo == c.name)
                    .map(|r| {
                        let f = &r.points[point].1;
                        (if rev { f.rev } else { f.fwd }) as u64
                    })
                    .sum()
            })
            .collect()
    };
    let counters: Vec<(String, Vec<u64>, Vec<u64>)> = [
        ("client egress", &t.client, &t.c_if, "egress", seen(0, false, false)),
        ("client ingress", &t.client, &t.c_if, "ingress", seen(0, true, true)),
        ("server ingress", &t.server, &t.s_if, "ingress", seen(1, false, false)),
        ("server egress", &t.server, &t.s_if, "egress", seen(1, true, true)),
    ]
    .into_iter()
    .map(|(what, ns, i, d, want)| {
        let a = attachment(t.ino(ns), i, d).expect("attachment in status");
        (what.to_string(), rule_packets(&a), want)
    })
    .collect();

    let mut report = String::new();
    report.push_str(&format!("\n=== matrix: {label} ===\n"));
    report.push_str(&format!(
        "{:<13} {:>4}  {:<6} {:<44} | {:^35} | {:^35}\n",
        "", "", "", "", "router, client side", "router, server side"
    ));
    report.push_str(&format!(
        "{:<13} {:>4}  {:<6} {:<44} | {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} | {:>5} {:>5} {:>5} {:>5} {:>5} {:>5}\n",
        "combination",
        "size",
        "result",
        "application data",
        "fwd",
        "rev",
        "spec=",
        "part",
        "esc",
        "natcs",
        "fwd",
        "rev",
        "spec=",
        "part",
        "esc",
        "natcs"
    ));
    for r in &results {
        let mut cols = String::new();
        for (_, f) in &r.points {
            cols.push_str(&format!(
                " | {:>5} {:>5} {:>5} {:>5} {:>5} {:>5}",
                f.fwd, f.rev, f.spec_ok, f.partial, f.escaped, f.nat_outer_csum_bad
            ));
        }
        report.push_str(&format!(
            "{:<13} {:>4}  {:<6} {:<44}{cols}\n",
            r.combo,
            r.payload,
            if r.ok() { "ok" } else { "FAIL" },
            r.app
        ));
        for e in &r.errors {
            report.push_str(&format!("    ! {e}\n"));
        }
        for (name, f) in &r.points {
            for e in &f.problems {
                report.push_str(&format!("    ! {name}: {e}\n"));
            }
        }
    }
    report.push_str("(fwd/rev: funneled frames captured, client→server / server→client; spec=: of those, equal byte\n");
    report.push_str(" for byte to the spec-built frame, with valid outer and inner checksums; part: frames still\n");
    report.push_str(" CHECKSUM_PARTIAL there, whose pending inner checksum the check completed first, as the device\n");
    report.push_str(" would; esc: frames of the flow that crossed unfunneled; natcs: frames past the router's NAT\n");
    report.push_str(" whose only deviation from the spec is a wrong outer L4 checksum.  Every inner payload is also\n");
    report.push_str(" checked equal to what was sent.)\n");
    let neg0: usize = results.iter().flat_map(|r| r.points.iter().map(|(_, f)| f.tcp_neg_zero)).sum();
    let natcs: usize = results.iter().flat_map(|r| r.points.iter().map(|(_, f)| f.nat_outer_csum_bad)).sum();
    report.push_str(&format!(
        "TCP checksum fields holding 0xffff where the oracle computed 0x0000 (same value): {neg0}\n"
    ));
    report.push_str(&format!("frames past NAT with only a wrong outer checksum: {natcs}\n"));
    if let Some(s) = results.iter().flat_map(|r| r.points.iter().filter_map(|(_, f)| f.nat_sample.clone())).next() {
        report.push_str(&format!("  e.g. {s}\n"));
    }
    report.push_str(&format!("server nstat: {}\n", fmt_counters(&server)));
    report.push_str(&format!("client nstat: {}\n", fmt_counters(&client)));
    if let Some(i) = invalid {
        report.push_str(&format!("router conntrack invalid: {i}; entries:\n"));
        for l in conntrack.lines() {
            report.push_str(&format!("  {}\n", l.split_whitespace().skip(2).collect::<Vec<_>>().join(" ")));
        }
    }
    for (what, c, want) in &counters {
        report.push_str(&format!("rule packet counters, {what}: {c:?} (funneled frames captured: {want:?})\n"));
    }
    report.push_str(&format!("time: {:.1?}\n", t0.elapsed()));
    eprintln!("{report}");

    let failed: Vec<String> =
        results.iter().filter(|r| !r.ok()).map(|r| format!("{} payload {}", r.combo, r.payload)).collect();
    let csum_bad: Vec<&(String, u64)> =
        server.iter().filter(|(n, v)| (n == "UdpInCsumErrors" || n == "TcpInCsumErrors") && *v != 0).collect();
    let counters_bad: Vec<&(String, Vec<u64>, Vec<u64>)> = counters.iter().filter(|(_, c, w)| c != w).collect();
    t.teardown();
    assert!(failed.is_empty(), "{label}: failing cases: {failed:?} (see the table above)");
    assert!(csum_bad.is_empty(), "{label}: server checksum errors: {csum_bad:?}");
    assert!(counters_bad.is_empty(), "{label}: rule counters differ from the frames captured: {counters_bad:?}");
}

fn fmt_counters(c: &[(String, u64)]) -> String {
    c.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>().join(" ")
}

/// Run 1 without NAT: offloads off at the funneling ends (client and
/// server veths: tx, tso, gso), so every checksum leaves them complete.
#[test]
fn matrix_endpoint_offloads_off_no_nat() {
    if !root("matrix_endpoint_offloads_off_no_nat") {
        return;
    }
    run_matrix(
        "endpoints tx/tso/gso off, router forwards, no NAT",
        TopoOpts { nat: false, endpoints_offloads_off: true, router_offloads_off: false, ipv6: false },
    );
}

/// Run 1 with NAT on the router (DNAT to the server, MASQUERADE).
#[test]
fn matrix_endpoint_offloads_off_nat() {
    if !root("matrix_endpoint_offloads_off_nat") {
        return;
    }
    run_matrix(
        "endpoints tx/tso/gso off, router DNAT+MASQUERADE",
        TopoOpts { nat: true, endpoints_offloads_off: true, router_offloads_off: false, ipv6: false },
    );
}

/// Run 2 without NAT: default offloads at the ends (locally generated
/// packets stay CHECKSUM_PARTIAL across the veth), the router's veths at
/// tx/tso/gso off, so the router completes every checksum before the
/// receiver verifies it.
#[test]
fn matrix_endpoint_offloads_on_no_nat() {
    if !root("matrix_endpoint_offloads_on_no_nat") {
        return;
    }
    run_matrix(
        "endpoints default offloads, router veths tx/tso/gso off, no NAT",
        TopoOpts { nat: false, endpoints_offloads_off: false, router_offloads_off: true, ipv6: false },
    );
}

/// Run 2 with NAT on the router: the NAT sees funneled packets that are
/// still CHECKSUM_PARTIAL where they are funneled in place, so funneled
/// packets must leave their sender with complete checksums
/// (bpf/csum_state.h), or the NAT leaves a wrong outer checksum.
#[test]
fn matrix_endpoint_offloads_on_nat() {
    if !root("matrix_endpoint_offloads_on_nat") {
        return;
    }
    run_matrix(
        "endpoints default offloads, router veths tx/tso/gso off, router DNAT+MASQUERADE",
        TopoOpts { nat: true, endpoints_offloads_off: false, router_offloads_off: true, ipv6: false },
    );
}

// ---------------------------------------------------------------------------
// Shared by the loader tests: UDP/4739 funneled over TCP 540 → 80 (ruleset
// A) or over UDP 542 → 81 (ruleset B), no NAT.
// ---------------------------------------------------------------------------

const RULES_A: &str = "udp dport 4739 actions funnel tcp sport 540 dport 80";
/// Different in shape too: three rules, the funnel one last.
const RULES_B: &str = "\
tcp dport 9 actions drop
udp dport 4740 actions accept
udp dport 4739 actions funnel udp sport 542 dport 81";
/// The server unfunnels either.
const SERVER_AB: &str = "\
tcp sport 540 dport 80 actions unfunnel udp
udp sport 542 dport 81 actions unfunnel udp";

const UDP_OVER_TCP: Combo = COMBOS[0];
const UDP_OVER_UDP_B: Combo = COMBOS[1];

/// The no-NAT topology with the router completing checksums, and the
/// server's unfunnel rules loaded.
fn simple_topo() -> Topo {
    let t = Topo::new(TopoOpts { nat: false, endpoints_offloads_off: false, router_offloads_off: true, ipv6: false });
    load_ok(&t.server, &t.s_if, "ingress", SERVER_AB);
    t
}

/// (sent, received, checks at the two capture points) of `udp_exchange`.
type Exchange = (Vec<Vec<u8>>, Vec<Vec<u8>>, Vec<(&'static str, FrameCheck)>);

/// Sends `n` distinct datagrams of 100 bytes (tagged with `tag`) from the
/// client to the server's UDP/4739, captures on both router interfaces,
/// and returns (sent, received, checks at the two points).
fn udp_exchange(t: &Topo, n: usize, tag: u8, combo: &Combo) -> Exchange {
    let server = udp_socket(&t.server, 4739);
    let client = udp_socket(&t.client, 0);
    let sent: Vec<Vec<u8>> = (0..n)
        .map(|k| {
            let mut d = pattern(usize::from(tag) * 1000 + k, 100);
            d[0] = tag;
            d[1] = k as u8;
            d
        })
        .collect();
    let caps = Captures::start(t);
    for d in &sent {
        client.send_to(d, sa(t.dest(), 4739)).expect("send");
    }
    let got: Vec<Vec<u8>> = udp_recv(&server, n, Duration::from_secs(3)).into_iter().map(|(d, _)| d).collect();
    let mut errors = Vec::new();
    let points = caps.check(t, combo, &Sent::Datagrams(&sent), &mut errors);
    assert!(errors.is_empty(), "capture: {errors:?}");
    (sent, got, points)
}

/// `udp_exchange` that must deliver everything, funneled per spec at both
/// points with `combo`'s header.
fn udp_exchange_ok(t: &Topo, n: usize, tag: u8, combo: &Combo) {
    let (sent, got, points) = udp_exchange(t, n, tag, combo);
    assert_eq!(got, sent, "the server must receive exactly what was sent");
    for (name, f) in &points {
        assert!(
            f.fwd == n && f.spec_ok == n && f.escaped == 0 && f.problems.is_empty(),
            "{name}: {n} datagrams sent, {} funneled with {}, {} per spec, {} unfunneled: {:?}",
            f.fwd,
            combo.name,
            f.spec_ok,
            f.escaped,
            f.problems
        );
    }
}

// ---------------------------------------------------------------------------
// Requirement 2: rerun under traffic
// ---------------------------------------------------------------------------

/// 50 reruns alternating rulesets A and B on the client's egress while a
/// UDP sender streams (one datagram per 200 µs, sequence-numbered): the
/// program stays the same, every datagram on the wire is funneled by A or
/// B (none unfunneled), and the server receives every sequence number once.
#[test]
fn rerun_under_traffic_swaps_rulesets_without_loss() {
    if !root("rerun_under_traffic_swaps_rulesets_without_loss") {
        return;
    }
    const SWAPS: usize = 50;
    let t = simple_topo();
    let prog0 = load_ok(&t.client, &t.c_if, "egress", RULES_A);
    let server = udp_socket(&t.server, 4739);
    let client = udp_socket(&t.client, 0);
    let dest = sa(SERVER_IP, 4739);
    // Warm up (ARP) with a datagram outside the sequence space.
    client.send_to(&u32::MAX.to_be_bytes(), dest).unwrap();
    assert_eq!(udp_recv(&server, 1, Duration::from_secs(3)).len(), 1, "warm-up datagram");

    let cap = Capture::start(&t.router, &t.rc_if);
    let stop_tx = Arc::new(AtomicBool::new(false));
    let stop_rx = Arc::new(AtomicBool::new(false));
    let receiver = {
        let stop = stop_rx.clone();
        std::thread::spawn(move || {
            let mut seqs = Vec::new();
            let mut buf = [0u8; 2048];
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match server.recv_from(&mut buf) {
                    Ok((n, _)) if n >= 4 => seqs.push(u32::from_be_bytes(buf[..4].try_into().unwrap())),
                    Ok(_) => {}
                    Err(_) if stop.load(Ordering::SeqCst) || Instant::now() > deadline => break,
                    Err(_) => {}
                }
            }
            seqs
        })
    };
    let sender = {
        let stop = stop_tx.clone();
        std::thread::spawn(move || {
            let period = Duration::from_micros(200);
            let start = Instant::now();
            let mut seq: u32 = 0;
            let mut payload = pattern(7, 64);
            while !stop.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(60) {
                payload[..4].copy_from_slice(&seq.to_be_bytes());
                client.send_to(&payload, dest).expect("send");
                seq += 1;
                let next = start + period * seq;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
            }
            (seq, start.elapsed())
        })
    };

    std::thread::sleep(Duration::from_millis(50));
    let mut loads = Vec::new();
    let t_swaps = Instant::now();
    for i in 0..SWAPS {
        let rules = if i % 2 == 0 { RULES_B } else { RULES_A };
        loads.push(env_load(&t.client, &t.c_if, "egress", rules));
    }
    let swap_time = t_swaps.elapsed();
    std::thread::sleep(Duration::from_millis(50));
    stop_tx.store(true, Ordering::SeqCst);
    let (sent, send_time) = sender.join().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stop_rx.store(true, Ordering::SeqCst);
    let received = receiver.join().unwrap();
    let frames = cap.stop();

    // The reruns.
    let failed_loads: Vec<String> = loads.iter().filter(|o| !o.ok()).map(|o| o.stderr.clone()).collect();
    let ids: BTreeSet<Option<u32>> = loads.iter().map(|o| printed_prog_id(&o.stdout, &t.c_if, "egress")).collect();
    let in_place = loads.iter().filter(|o| o.stdout.contains("updated in place")).count();
    let status = attachment(t.ino(&t.client), &t.c_if, "egress").expect("status entry");

    // The wire: every client → server datagram of the flow, by ruleset.
    let (mut by_a, mut by_b, mut unfunneled, mut spec_bad) = (0usize, 0usize, 0usize, 0usize);
    let mut wire: BTreeMap<u32, char> = BTreeMap::new();
    let mut wire_dups = 0usize;
    let mut first_problem = None;
    for f in frames.frames.iter().filter(|f| !f.outgoing) {
        let Some((proto, sp, dp)) = l4_of(&f.data) else { continue };
        let which = match (proto, sp, dp) {
            (Proto::Tcp, 540, 80) => 'A',
            (Proto::Udp, 542, 81) => 'B',
            (Proto::Udp, _, 4739) => {
                unfunneled += 1;
                continue;
            }
            _ => continue,
        };
        let g = if f.csum_not_ready { complete_inner_csum(&f.data, Proto::Udp) } else { f.data.clone() };
        let inner = expected_unfunnel(&g, Proto::Udp);
        let (s, d) = if which == 'A' { (540, 80) } else { (542, 81) };
        let outer = if which == 'A' { Proto::Tcp } else { Proto::Udp };
        if expected_funnel(&inner, outer, s, d) != g || check_funneled(&g, Proto::Udp).is_err() {
            spec_bad += 1;
            first_problem.get_or_insert_with(|| diff(&expected_funnel(&inner, outer, s, d), &g));
        }
        let iip = Ip::of(&inner);
        let seq = u32::from_be_bytes(inner[iip.l4_off() + 8..iip.l4_off() + 12].try_into().unwrap());
        if which == 'A' {
            by_a += 1;
        } else {
            by_b += 1;
        }
        if wire.insert(seq, which).is_some() {
            wire_dups += 1;
        }
    }
    let switches = wire.values().collect::<Vec<_>>().windows(2).filter(|w| w[0] != w[1]).count();
    let mut got = received.clone();
    got.sort_unstable();
    let distinct: BTreeSet<u32> = received.iter().copied().collect();
    let dups = received.len() - distinct.len();
    let missing: Vec<u32> = (0..sent).filter(|s| !distinct.contains(s)).collect();
    let not_on_wire = (0..sent).filter(|s| !wire.contains_key(s)).count();

    eprintln!(
        "\n=== rerun under traffic ===\n\
         reruns: {SWAPS} in {swap_time:.2?} ({:.1} ms each), exit 0: {}, \"updated in place\": {in_place}\n\
         program ids printed: {ids:?}; first load: {prog0}; status now: prog_id {} with {} rules\n\
         sender: {sent} datagrams in {send_time:.2?} ({:.0} µs apart)\n\
         router (client side): funneled by A (TCP 540→80) {by_a}, by B (UDP 542→81) {by_b}, unfunneled {unfunneled}, \
         not per spec {spec_bad}; ruleset switches seen in sequence order {switches}; duplicates {wire_dups}; \
         sequence numbers not seen {not_on_wire}; capture drops {}\n\
         server: received {} ({} distinct), duplicates {dups}, lost {}{}",
        swap_time.as_secs_f64() * 1000.0 / SWAPS as f64,
        SWAPS - failed_loads.len(),
        status["prog_id"],
        status["rules"].as_array().map_or(0, Vec::len),
        send_time.as_micros() as f64 / f64::from(sent.max(1)),
        frames.drops,
        received.len(),
        distinct.len(),
        missing.len(),
        if missing.is_empty() { String::new() } else { format!(" (first: {:?})", &missing[..missing.len().min(10)]) },
    );
    t.teardown();

    assert!(failed_loads.is_empty(), "reruns failed: {failed_loads:?}");
    assert_eq!(ids, BTreeSet::from([Some(prog0)]), "every rerun must report the same program");
    assert_eq!(in_place, SWAPS, "every rerun must update in place");
    assert_eq!(status["prog_id"].as_u64(), Some(u64::from(prog0)), "status: same program");
    assert_eq!(status["rules"].as_array().map(Vec::len), Some(1), "ruleset A (1 rule) is the last one loaded");
    assert_eq!(unfunneled, 0, "no datagram may cross the router unfunneled");
    assert_eq!(
        spec_bad,
        0,
        "every funneled datagram per spec; first difference:\n{}",
        first_problem.unwrap_or_default()
    );
    assert!(by_a > 0 && by_b > 0, "both rulesets must have carried traffic");
    assert!(sent > 1000, "the stream must have run during the reruns ({sent} datagrams)");
    assert_eq!(dups, 0, "no duplicates at the server");
    assert!(missing.is_empty(), "{} of {sent} sequence numbers lost", missing.len());
    assert_eq!(frames.drops, 0, "the capture itself must not drop");
    assert_eq!(not_on_wire, 0, "every sequence number seen on the router");
}

// ---------------------------------------------------------------------------
// Requirement 3: a bad ruleset on rerun changes nothing
// ---------------------------------------------------------------------------

/// Reruns with broken rulesets exit with status 2, print line:col, and
/// leave the running ruleset alone: same program, same rules, counters
/// not reset and still moving, traffic still funneled.
#[test]
fn bad_ruleset_on_rerun_changes_nothing() {
    if !root("bad_ruleset_on_rerun_changes_nothing") {
        return;
    }
    let t = simple_topo();
    let prog = load_ok(&t.client, &t.c_if, "egress", RULES_A);
    let ino = t.ino(&t.client);
    let counters = || rule_packets(&attachment(ino, &t.c_if, "egress").expect("status entry"));

    udp_exchange_ok(&t, 20, 1, &UDP_OVER_TCP);
    let before = counters();

    let typo = "udp dport 4739 actions funel tcp sport 540 dport 80";
    let line2 =
        "udp dport 4739 actions funnel tcp sport 540 dport 80\nudp dport 4740 actions funnel tcp sport 540 dprot 80";
    let col2 = line2.lines().nth(1).unwrap().find("dprot").unwrap() + 1;
    let bad1 = env_load(&t.client, &t.c_if, "egress", typo);
    let bad2 = env_load(&t.client, &t.c_if, "egress", line2);
    let after_bad = counters();
    let a = attachment(ino, &t.c_if, "egress").unwrap();

    udp_exchange_ok(&t, 20, 2, &UDP_OVER_TCP);
    let after = counters();
    let server = rule_packets(&attachment(t.ino(&t.server), &t.s_if, "ingress").unwrap());

    eprintln!(
        "\n=== bad ruleset on rerun ===\n\
         typo on line 1: exit {}; stderr:\n{}\n\
         typo on line 2: exit {}; stderr:\n{}\n\
         program {prog} → status prog_id {} ({} rule)\n\
         client egress counters: after 20 datagrams {before:?}, after the bad reruns {after_bad:?}, \
         after 20 more {after:?}; server ingress counters {server:?}",
        bad1.code,
        bad1.stderr.trim_end(),
        bad2.code,
        bad2.stderr.trim_end(),
        a["prog_id"],
        a["rules"].as_array().map_or(0, Vec::len),
    );
    t.teardown();

    assert_eq!(bad1.code, 2, "a typo must exit with status 2");
    assert!(bad1.stderr.contains("1:24"), "line:col of the typo (1:24) in: {}", bad1.stderr);
    assert!(bad1.stderr.contains("funel"), "the offending word in: {}", bad1.stderr);
    assert_eq!(bad2.code, 2);
    assert!(bad2.stderr.contains(&format!("2:{col2}")), "line:col 2:{col2} in: {}", bad2.stderr);
    for b in [&bad1, &bad2] {
        assert!(!b.stdout.contains("updated") && !b.stdout.contains("attached"), "nothing loaded: {}", b.stdout);
    }
    assert_eq!(a["prog_id"].as_u64(), Some(u64::from(prog)), "same program");
    assert_eq!(before, vec![20], "20 datagrams counted by the rule");
    assert_eq!(after_bad, before, "a refused ruleset must not reset the counters");
    assert_eq!(after, vec![40], "the old rule keeps counting");
    assert_eq!(server, vec![40, 0], "the server unfunneled all 40 as TCP 540→80");
}

// ---------------------------------------------------------------------------
// Requirement 4
// ---------------------------------------------------------------------------

/// (a) Two loaders with different rulesets started at once on the same
/// target, ten times: both succeed, the result is one ruleset whole (its
/// rule count, and traffic funneled its way), and exactly one program is
/// on the hook.
#[test]
fn racing_loaders_leave_one_whole_ruleset() {
    if !root("racing_loaders_leave_one_whole_ruleset") {
        return;
    }
    const ROUNDS: usize = 10;
    let t = simple_topo();
    let ino = t.ino(&t.client);
    let mut tally = BTreeMap::new();
    let mut prog_ids = BTreeSet::new();
    let mut lines = Vec::new();
    let mut failures = Vec::new();
    for round in 0..ROUNDS {
        let env = |rules: &'static str| {
            sfunnel_cmd(
                &[],
                &[("SFUNNEL_RULESET", rules), ("IFACES", &t.c_if), ("DIRECTION", "egress"), ("NETNS", &t.client)],
            )
        };
        let (mut c1, mut c2) = (env(RULES_A), env(RULES_B));
        let (p1, p2) = (spawn(&mut c1), spawn(&mut c2));
        let (o1, o2) = (p1.wait(Duration::from_secs(30)), p2.wait(Duration::from_secs(30)));
        if !o1.ok() || !o2.ok() {
            failures.push(format!("round {round}: exit {} / {}: {} {}", o1.code, o2.code, o1.stderr, o2.stderr));
            continue;
        }
        let a = attachment(ino, &t.c_if, "egress").expect("status entry");
        let n = a["rules"].as_array().map_or(0, Vec::len);
        let id = a["prog_id"].as_u64().unwrap_or(0) as u32;
        prog_ids.insert(id);
        let hook = hook_prog_ids(&t.client, &t.c_if, true);
        let (winner, combo) = match n {
            1 => ("A", UDP_OVER_TCP),
            3 => ("B", UDP_OVER_UDP_B),
            _ => {
                failures.push(format!("round {round}: {n} rules: neither ruleset whole"));
                continue;
            }
        };
        *tally.entry(winner).or_insert(0) += 1;
        let printed = [&o1, &o2].map(|o| printed_prog_id(&o.stdout, &t.c_if, "egress"));
        lines.push(format!(
            "round {round}: A \"{}\", B \"{}\" → {winner} ({n} rules), program {id}, hook {hook:?}",
            o1.stdout.trim(),
            o2.stdout.trim()
        ));
        if hook != vec![id] {
            failures.push(format!("round {round}: the egress hook holds {hook:?}, want exactly [{id}]"));
        }
        if printed != [Some(id), Some(id)] {
            failures.push(format!("round {round}: loaders reported programs {printed:?}, status {id}"));
        }
        if prog_name(id).as_deref() != Some("sfunnel") {
            failures.push(format!("round {round}: program {id} is {:?}", prog_name(id)));
        }
        // The winner's rules carry the traffic, whole.
        let (sent, got, points) = udp_exchange(&t, 3, round as u8, &combo);
        let f = &points[0].1;
        if got != sent || f.fwd != 3 || f.spec_ok != 3 || f.escaped != 0 {
            failures.push(format!(
                "round {round}: after {winner} won: {} of 3 delivered, {} funneled as {}, {} per spec, {} unfunneled",
                got.len(),
                f.fwd,
                combo.name,
                f.spec_ok,
                f.escaped
            ));
        }
    }
    let clsact = nsh(&t.client, &["tc", "filter", "show", "dev", &t.c_if, "egress"]).stdout;
    let on_tcx = !tcx_prog_ids(&t.client, &t.c_if, true).is_empty();
    eprintln!(
        "\n=== racing loaders ===\n{}\nwinners: {tally:?}; program ids over all rounds: {prog_ids:?}; \
         clsact egress filters: {:?}",
        lines.join("\n"),
        clsact.trim()
    );
    t.teardown();
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(prog_ids.len(), 1, "one program throughout: {prog_ids:?}");
    if on_tcx {
        assert!(clsact.trim().is_empty(), "with TCX, no tc filter as well: {clsact}");
    }
}

/// (b) An attachment of another layout (sf_meta's abi_version set to 0,
/// as a build of another layout would have left it) is detected on rerun
/// and replaced: new program, exactly one on the hook, the old one gone,
/// traffic funneled.
#[test]
fn incompatible_pins_are_replaced() {
    if !root("incompatible_pins_are_replaced") {
        return;
    }
    let t = simple_topo();
    let p1 = load_ok(&t.client, &t.c_if, "egress", RULES_A);
    udp_exchange_ok(&t, 5, 1, &UDP_OVER_TCP);
    let abi_before = attachment(t.ino(&t.client), &t.c_if, "egress").map(|a| a["problem"].is_null());
    common::topology::set_layout(&t.client, &t.c_if, "egress", 0);
    let abi_after = attachment(t.ino(&t.client), &t.c_if, "egress").map(|a| a["problem"].clone());
    // The segmentation detour's hook (RULES_A funnels on egress).
    let (_, seg_if) = helper_pair(ifindex(&t.client, &t.c_if), "egress");
    let detour_before = hook_prog_ids(&t.client, &seg_if, false);

    let out = env_load(&t.client, &t.c_if, "egress", RULES_A);
    let p2 = printed_prog_id(&out.stdout, &t.c_if, "egress");
    let hook = hook_prog_ids(&t.client, &t.c_if, true);
    let deadline = Instant::now() + Duration::from_secs(5);
    while prog_name(p1).is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let old_alive = prog_name(p1).is_some();
    let detour_after = hook_prog_ids(&t.client, &seg_if, false);
    let detour_name = detour_after.first().and_then(|id| prog_name(*id));
    eprintln!("detour hook on {seg_if}: {detour_before:?} → {detour_after:?} ({detour_name:?})");
    let a = attachment(t.ino(&t.client), &t.c_if, "egress").expect("status entry");
    eprintln!(
        "\n=== incompatible pins ===\nstatus readable before: {abi_before:?}; after the layout was set to 0: {abi_after:?}\n\
         rerun: exit {}; stdout: {}stderr: {}\nprogram {p1} → {p2:?}; hook {hook:?}; old program still loaded: \
         {old_alive}; status: prog_id {} error {}",
        out.code, out.stdout, out.stderr, a["prog_id"], a["problem"]
    );
    let traffic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| udp_exchange_ok(&t, 5, 2, &UDP_OVER_TCP)));
    t.teardown();
    assert_eq!(abi_before, Some(true), "status reads this layout's attachment without a problem");
    assert!(
        abi_after.as_ref().and_then(|e| e.as_str()).is_some_and(|e| e.contains("layout 0")),
        "status says the layout: {abi_after:?}"
    );
    assert!(out.ok(), "the rerun must succeed");
    assert!(
        out.stdout.contains("replaced") && out.stdout.contains("layout 0"),
        "the rerun must say it replaced another layout's attachment: {}",
        out.stdout
    );
    let p2 = p2.expect("new program id");
    assert_ne!(p2, p1, "a new program");
    assert_eq!(hook, vec![p2], "exactly the new program on the hook");
    assert!(!old_alive, "the old program must be gone");
    assert_eq!(detour_before.len(), 1, "one detour program before: {detour_before:?}");
    assert_eq!(detour_after.len(), 1, "one detour program after, the old one unhooked: {detour_after:?}");
    assert_ne!(detour_after, detour_before, "the new load's detour program replaced the old one");
    assert_eq!(detour_name.as_deref(), Some("sfunnel_detour"));
    assert_eq!(a["prog_id"].as_u64(), Some(u64::from(p2)));
    assert!(a["problem"].is_null(), "status reads the new pins: {}", a["problem"]);
    if let Err(e) = traffic {
        std::panic::resume_unwind(e);
    }
}

/// (c) Without privileges, load fails before touching anything and names
/// CAP_BPF and CAP_NET_ADMIN; `check` needs none.
#[test]
fn unprivileged_load_names_missing_capabilities() {
    if !root("unprivileged_load_names_missing_capabilities") {
        return;
    }
    let (t, iface) = Topo::single();
    let ns = t.client.clone();
    // The binary under setpriv: uid/gid 65534, no groups, no capabilities
    // (none inheritable, an empty bounding set), with the same clean
    // container environment as every other run.
    let nobody = |args: &[&str], env: &[(&str, &str)]| {
        let plain = sfunnel_cmd(args, env);
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
            .arg(plain.get_program())
            .args(args);
        for (k, v) in plain.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        run(&mut c, Duration::from_secs(20))
    };
    let verb = nobody(&["load", RULES_A, "-i", &iface, "-d", "egress", "--netns", &ns], &[]);
    let env = nobody(&[], &[("SFUNNEL_RULESET", RULES_A), ("IFACES", &iface), ("DIRECTION", "egress"), ("NETNS", &ns)]);
    let check = nobody(&["check", RULES_A], &[]);
    let pins = t.pin_dir(&ns);
    let hook = hook_prog_ids(&ns, &iface, true);
    eprintln!(
        "\n=== unprivileged (uid 65534, no capabilities) ===\nload: exit {}, stderr: {}container env: exit {}, \
         stderr: {}check: exit {}\npins made: {}; hook: {hook:?}",
        verb.code,
        verb.stderr,
        env.code,
        env.stderr,
        check.code,
        pins.exists()
    );
    let pins_exist = pins.exists();
    t.teardown();
    for o in [&verb, &env] {
        assert!(o.code != 0, "an unprivileged load must fail");
        assert!(
            o.stderr.contains("CAP_BPF") && o.stderr.contains("CAP_NET_ADMIN"),
            "names the capabilities: {}",
            o.stderr
        );
    }
    assert_eq!(check.code, 0, "check needs no privileges: {}", check.stderr);
    assert!(!pins_exist && hook.is_empty(), "nothing may have been changed");
}

/// (d) `--attach clsact` carries UDP-over-TCP like TCX, and unload removes
/// only our filter: the clsact qdisc and foreign filters (before and after
/// ours in priority, one of them a bpf filter too) stay.
///
/// This kernel has no cls_matchall or act_gact (no modules), so the
/// foreign filters are a match-all u32 without actions (passes) and classic
/// BPF cls_bpf filters (`ret -1`: match and pass; `ret 0`: no match).
#[test]
fn clsact_mode_carries_traffic_and_unload_leaves_others_alone() {
    if !root("clsact_mode_carries_traffic_and_unload_leaves_others_alone") {
        return;
    }
    let t = Topo::new(TopoOpts { nat: false, endpoints_offloads_off: false, router_offloads_off: true, ipv6: false });
    let (c, ci) = (t.client.clone(), t.c_if.clone());
    let (s, si) = (t.server.clone(), t.s_if.clone());
    // Foreign filters first: ingress prio 1 on the client, egress prio
    // 65000 (after ours at 0xc05f = 49247) on the client, ingress prio
    // 65000 on the server.
    nsh(&c, &["tc", "qdisc", "add", "dev", &ci, "clsact"]);
    nsh(
        &c,
        &["tc", "filter", "add", "dev", &ci, "ingress", "prio", "1", "u32", "match", "u32", "0", "0", "classid", "1:1"],
    );
    nsh(
        &c,
        &[
            "tc",
            "filter",
            "add",
            "dev",
            &ci,
            "egress",
            "prio",
            "65000",
            "bpf",
            "bytecode",
            "1,6 0 0 4294967295,",
            "classid",
            "1:2",
        ],
    );
    nsh(&s, &["tc", "qdisc", "add", "dev", &si, "clsact"]);
    nsh(&s, &["tc", "filter", "add", "dev", &si, "ingress", "prio", "65000", "bpf", "bytecode", "1,6 0 0 0,"]);
    let load = |ns: &str, i: &str, d: &str, rules: &str| {
        sfunnel(&["load", rules, "-i", i, "-d", d, "--netns", ns, "--attach", "clsact"], &[]).expect_ok()
    };
    let lc = load(&c, &ci, "egress", RULES_A);
    let ls = load(&s, &si, "ingress", SERVER_AB);
    let filters = |ns: &str, i: &str, d: &str| nsh(ns, &["tc", "filter", "show", "dev", i, d]).stdout;
    let c_egress_loaded = filters(&c, &ci, "egress");
    let mode = attachment(t.ino(&c), &ci, "egress").map(|a| a["mode"].clone());
    let tcx = tcx_prog_ids(&c, &ci, true);
    let funneled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| udp_exchange_ok(&t, 5, 1, &UDP_OVER_TCP)));

    let unload_c = env_unload(&c, &ci, "egress").expect_ok();
    let unload_s = env_unload(&s, &si, "ingress").expect_ok();
    let after = [
        ("client qdisc", nsh(&c, &["tc", "qdisc", "show", "dev", &ci]).stdout),
        ("client ingress", filters(&c, &ci, "ingress")),
        ("client egress", filters(&c, &ci, "egress")),
        ("server qdisc", nsh(&s, &["tc", "qdisc", "show", "dev", &si]).stdout),
        ("server ingress", filters(&s, &si, "ingress")),
    ];
    // Without sfunnel the datagrams cross plainly and are still delivered
    // (the server's foreign filter passes them).
    let (sent, got, points) = udp_exchange(&t, 5, 2, &UDP_OVER_TCP);
    // clsact pins nothing; and no program of ours may be left either.
    let pins_left = t.pin_dir(&c).exists()
        || t.pin_dir(&s).exists()
        || attachment(t.ino(&c), &ci, "egress").is_some()
        || attachment(t.ino(&s), &si, "ingress").is_some();
    eprintln!(
        "\n=== clsact ===\nload: {}{}status mode: {mode:?}; TCX hook: {tcx:?}\nclient egress filters while loaded:\n{}\
         unload: {}{}after unload:\n{}\nplain traffic after unload: {}/{} delivered, {} unfunneled on the router",
        lc.stdout,
        ls.stdout,
        c_egress_loaded,
        unload_c.stdout,
        unload_s.stdout,
        after
            .iter()
            .map(|(k, v)| format!("  {k}: {}", v.trim().replace('\n', "\n    ")))
            .collect::<Vec<_>>()
            .join("\n"),
        got.len(),
        sent.len(),
        points[0].1.escaped
    );
    t.teardown();
    if let Err(e) = funneled {
        std::panic::resume_unwind(e);
    }
    assert!(lc.stdout.contains("clsact") && ls.stdout.contains("clsact"), "loaded with clsact");
    assert_eq!(mode, Some(serde_json::json!("clsact")));
    assert!(tcx.is_empty(), "nothing on TCX: {tcx:?}");
    assert!(
        c_egress_loaded.contains("pref 49247") && c_egress_loaded.contains("direct-action"),
        "our direct-action filter at 0xc05f: {c_egress_loaded}"
    );
    assert!(c_egress_loaded.contains("pref 65000"), "and the foreign one: {c_egress_loaded}");
    let get = |k: &str| after.iter().find(|(n, _)| *n == k).unwrap().1.clone();
    assert!(get("client qdisc").contains("clsact"), "the client's clsact qdisc stays");
    assert!(get("server qdisc").contains("clsact"), "the server's clsact qdisc stays");
    assert!(get("client ingress").contains("pref 1 u32"), "the client's prio 1 u32 filter stays");
    assert!(get("client egress").contains("pref 65000 bpf"), "the client's prio 65000 bpf filter stays");
    assert!(get("server ingress").contains("pref 65000 bpf"), "the server's foreign filter stays");
    for k in ["client egress", "server ingress"] {
        assert!(
            !get(k).contains("pref 49247") && !get(k).contains("direct-action"),
            "our filter is gone from {k}: {}",
            get(k)
        );
    }
    assert!(!pins_left, "our pins are gone");
    assert_eq!(got, sent, "plain traffic still flows after unload");
    assert_eq!(points[0].1.escaped, 5, "and it is no longer funneled");
}

// ---------------------------------------------------------------------------
// Source-port NAT: two clients behind one SNAT, and a stale conntrack entry
// ---------------------------------------------------------------------------
//
// Unfunnel rules that name the funnel header's source port miss as soon as
// a NAT rewrites it.  Every client uses the same funnel source ports, so
// two clients behind one masquerading router collide, and the router
// rewrites the second client's.  `funneled` + `unfunnel auto` do not look
// at that port.

/// Server ingress by what NATs keep: the TCP funnel header's fixed fields,
/// or a UDP header followed by a plausible inner header; the inner protocol
/// from the packet.
const SERVER_INGRESS_FUNNELED: &str = "\
tcp dport 80 funneled actions unfunnel auto
udp dport 81 funneled actions unfunnel auto";

/// Client ingress (replies) the same way.
const CLIENT_INGRESS_FUNNELED: &str = "\
tcp sport 80 funneled actions unfunnel auto
udp sport 81 funneled actions unfunnel auto";

/// Client egress: the four combinations, plus a UDP probe through each
/// funnel tuple that carries TCP (541 and 543), sent first so that the
/// router's NAT mapping of those tuples is known before any TCP reply has
/// to be funneled back (see `reply_rules`).
const CLIENT_EGRESS_PROBES: &str = "\
udp dport 4741 actions funnel tcp sport 541 dport 80
udp dport 4742 actions funnel udp sport 543 dport 81";

/// (application port, funnel tuple protocol and source port) of the probes.
const PROBES: [(u16, &str, u16); 2] = [(4741, "tcp", 541), (4742, "udp", 543)];

/// Local TCP ports of each client's TCP flows (tcp-over-tcp, tcp-over-udp):
/// fixed, so that the server's reply rules can tell the clients apart.
const TCP_LOCAL_PORTS: [[u16; 2]; 2] = [[47001, 47003], [47002, 47004]];

/// The router's NAT: for (protocol, original source address and port)
/// toward the service, the source port the server sees.
fn nat_source_ports(router: &str) -> BTreeMap<(String, [u8; 4], u16), u16> {
    let text = in_ns(router, || std::fs::read_to_string("/proc/thread-self/net/nf_conntrack").unwrap_or_default());
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let Some(proto) = w.get(2) else { continue };
        let field = |k: &str, nth: usize| w.iter().filter_map(|x| x.strip_prefix(k)).nth(nth).map(str::to_string);
        let (Some(src), Some(sport), Some(reply_dport)) = (field("src=", 0), field("sport=", 0), field("dport=", 1))
        else {
            continue;
        };
        let (Ok(src), Ok(sport), Ok(nat)) = (src.parse::<Ipv4Addr>(), sport.parse(), reply_dport.parse()) else {
            continue;
        };
        out.insert((proto.to_string(), src.octets(), sport), nat);
    }
    out
}

/// Server egress: each client's TCP replies funneled back with the
/// mirrored funnel ports *as the router mapped them* (found with the
/// probes), so that the router's conntrack takes them back to that client.
fn reply_rules(nat: &BTreeMap<(String, [u8; 4], u16), u16>, clients: &[[u8; 4]]) -> String {
    let mut rules = Vec::new();
    for (ci, c) in clients.iter().enumerate() {
        for (k, (_, outer, fsport)) in PROBES.iter().enumerate() {
            let mapped = nat.get(&(outer.to_string(), *c, *fsport)).copied().unwrap_or_else(|| {
                panic!("no NAT entry for {} {}:{fsport} (the probe did not cross the router)", outer, ip_str(*c))
            });
            let (app, dport) = if *outer == "tcp" { (7000, 80) } else { (7001, 81) };
            rules.push(format!(
                "tcp sport {app} dport {} actions funnel {outer} sport {dport} dport {mapped}",
                TCP_LOCAL_PORTS[ci][k]
            ));
        }
    }
    rules.join("\n")
}

/// Sends `n` datagrams from `client_ns` to the service's UDP `port` and
/// returns how many arrived at the server intact (payloads compared byte
/// for byte).
fn udp_flow(t: &Topo, client_ns: &str, port: u16, n: usize, seed: usize) -> usize {
    let server = udp_socket(&t.server, port);
    let client = udp_socket(client_ns, 0);
    let sent: Vec<Vec<u8>> = (0..n).map(|k| pattern(seed * 64 + k, 200 + k)).collect();
    for d in &sent {
        client.send_to(d, sa(t.dest(), port)).expect("send");
    }
    let got = udp_recv(&server, n, Duration::from_secs(2));
    sent.iter().filter(|d| got.iter().any(|(g, _)| g == *d)).count()
}

/// A TCP connection from `client_ns`, local port `local`, to the service's
/// TCP `port`, echoing 2,000 bytes in chunks of 100 (TCP_NODELAY, one chunk
/// in flight: non-GSO segments, NOTES §4).  Ok(bytes) when both directions
/// carried exactly what was sent.
fn tcp_flow(t: &Topo, client_ns: &str, local: u16, port: u16, seed: usize) -> Result<usize, String> {
    use std::os::fd::FromRawFd as _;
    let listener = in_ns(&t.server, move || bind_retry("listen", || TcpListener::bind(sa([0; 4], port))));
    let server = std::thread::spawn(move || tcp_echo_server(listener));
    let data = pattern(seed, 2000);
    let dest = t.dest();
    let client = (|| -> Result<Vec<u8>, String> {
        let fd = in_ns(client_ns, move || -> Result<i32, String> {
            // SAFETY: plain socket calls on a descriptor this closure owns;
            // the sockaddr_in structs live across the calls that read them.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                if fd < 0 {
                    return Err("socket".into());
                }
                let one: i32 = 1;
                libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, (&one as *const i32).cast(), 4);
                let tv = libc::timeval { tv_sec: 3, tv_usec: 0 };
                let tvp = (&tv as *const libc::timeval).cast();
                let tvl = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
                libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, tvp, tvl);
                let sin = |a: [u8; 4], p: u16| libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: p.to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a) },
                    sin_zero: [0; 8],
                };
                let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                let local_sa = sin([0; 4], local);
                if libc::bind(fd, (&local_sa as *const libc::sockaddr_in).cast(), len) != 0 {
                    libc::close(fd);
                    return Err(format!("bind to local port {local}: {}", std::io::Error::last_os_error()));
                }
                let dst = sin(dest, port);
                if libc::connect(fd, (&dst as *const libc::sockaddr_in).cast(), len) != 0 {
                    let e = std::io::Error::last_os_error();
                    libc::close(fd);
                    // SO_SNDTIMEO ran out: connect reports EINPROGRESS.
                    if e.raw_os_error() == Some(libc::EINPROGRESS) {
                        return Err(format!("connect from local port {local}: no answer within 3 s"));
                    }
                    return Err(format!("connect from local port {local}: {e}"));
                }
                Ok(fd)
            }
        })?;
        // SAFETY: fd is a connected TCP socket that nothing else owns.
        let mut s = unsafe { TcpStream::from_raw_fd(fd) };
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
        let mut echo = Vec::new();
        for chunk in data.chunks(100) {
            s.write_all(chunk).map_err(|e| format!("client write: {e}"))?;
            let mut back = vec![0u8; chunk.len()];
            s.read_exact(&mut back).map_err(|e| format!("client read after {} bytes: {e}", echo.len()))?;
            echo.extend_from_slice(&back);
        }
        s.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
        let _ = s.read_to_end(&mut echo);
        Ok(echo)
    })();
    let server = server.join().unwrap_or_else(|_| Err("server thread panicked".into()));
    match (client, server) {
        (Ok(c), Ok(s)) if c == data && s == data => Ok(data.len()),
        (Ok(c), Ok(s)) => Err(format!("echo {} B, server got {} B, of {} B sent", c.len(), s.len(), data.len())),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

/// What one round of flows did: per client, per flow, delivered or why not.
struct NatRound {
    /// (client, flow, outcome)
    flows: Vec<(usize, &'static str, Result<String, String>)>,
}

impl NatRound {
    fn ok(&self, client: usize) -> usize {
        self.flows.iter().filter(|(c, _, r)| *c == client && r.is_ok()).count()
    }
    fn of(&self, client: usize) -> usize {
        self.flows.iter().filter(|(c, _, _)| *c == client).count()
    }
}

/// Every flow of both clients, client 1 first: the two UDP combinations
/// (5 datagrams each), then the two TCP combinations.
fn nat_round(t: &Topo, clients: &[String], seed: usize) -> NatRound {
    let mut flows = Vec::new();
    for (ci, ns) in clients.iter().enumerate() {
        for (name, port) in [("udp-over-tcp", 4739u16), ("udp-over-udp", 4740)] {
            let n = udp_flow(t, ns, port, DATAGRAMS, seed + ci * 8 + port as usize);
            let r = if n == DATAGRAMS {
                Ok(format!("{n}/{DATAGRAMS} datagrams"))
            } else {
                Err(format!("{n}/{DATAGRAMS} datagrams"))
            };
            flows.push((ci, name, r));
        }
    }
    for (ci, ns) in clients.iter().enumerate() {
        for (k, (name, port)) in [("tcp-over-tcp", 7000u16), ("tcp-over-udp", 7001)].into_iter().enumerate() {
            let r = tcp_flow(t, ns, TCP_LOCAL_PORTS[ci][k], port, seed + ci * 8 + k).map(|b| format!("{b} B echoed"));
            flows.push((ci, name, r));
        }
    }
    NatRound { flows }
}

/// Sends one probe datagram from each client through each TCP-carrying
/// funnel tuple, client 1 first, and returns the router's NAT mapping.
fn probe_nat(t: &Topo, clients: &[String]) -> BTreeMap<(String, [u8; 4], u16), u16> {
    // Sockets that take the probes at the server (nothing answers them).
    let _sinks: Vec<UdpSocket> = PROBES.iter().map(|(app, _, _)| udp_socket(&t.server, *app)).collect();
    for ns in clients {
        for (app, _, _) in PROBES {
            udp_socket(ns, 0).send_to(b"probe", sa(t.dest(), app)).expect("probe");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    nat_source_ports(&t.router)
}

fn passed_stat(t: &Topo, ns: &str, iface: &str, dir: &str, name: &str) -> u64 {
    attachment(t.ino(ns), iface, dir).and_then(|a| a["passed"][name].as_u64()).unwrap_or(0)
}

/// Two clients behind one router that masquerades both to one address,
/// both funneling with the same funnel source ports: the router must
/// rewrite the second client's.  Round 1, port-based unfunnel rules: the
/// second client's flows all fail (the failure mode this test documents).
/// Round 2, the same traffic under `funneled` + `unfunnel auto`: every flow
/// of both clients arrives intact, with no checksum error at the server.
#[test]
fn snat_two_clients_port_rules_fail_funneled_delivers() {
    if !root("snat_two_clients_port_rules_fail_funneled_delivers") {
        return;
    }
    let mut t =
        Topo::new(TopoOpts { nat: true, endpoints_offloads_off: false, router_offloads_off: true, ipv6: false });
    t.add_second_client();
    let clients = vec![t.client.clone(), t.client2.clone()];
    let egress = format!("{CLIENT_EGRESS}\n{CLIENT_EGRESS_PROBES}");
    for (ns, i) in [(&t.client, &t.c_if), (&t.client2, &t.d_if)] {
        load_ok(ns, i, "egress", &egress);
        load_ok(ns, i, "ingress", CLIENT_INGRESS_FUNNELED);
    }
    // Probes (under the `funneled` rules, which unfunnel them as UDP: the
    // port-based ones would take a UDP probe through 541 for TCP) learn
    // the NAT mapping; then the round runs under its own server rules.
    let client_ips = [CLIENT_IP, CLIENT2_IP];
    let prepare = |server_ingress: &str| {
        load_ok(&t.server, &t.s_if, "ingress", SERVER_INGRESS_FUNNELED);
        let nat = probe_nat(&t, &clients);
        load_ok(&t.server, &t.s_if, "egress", &reply_rules(&nat, &client_ips));
        load_ok(&t.server, &t.s_if, "ingress", server_ingress);
    };
    let mut report = String::from("\n=== two clients behind one SNAT ===\n");

    prepare(SERVER_INGRESS);
    let before = nstat(&t.server, &CSUM_COUNTERS);
    let r1 = nat_round(&t, &clients, 100);
    let miss1 = passed_stat(&t, &t.server, &t.s_if, "ingress", "no_rule_matched");
    let after1 = nstat(&t.server, &CSUM_COUNTERS);

    prepare(SERVER_INGRESS_FUNNELED);
    let r2 = nat_round(&t, &clients, 200);
    let nat = nat_source_ports(&t.router);
    report.push_str(
        "router NAT of the funnel tuples after round 2 (proto client:funnel sport -> sport the server sees):\n",
    );
    for ((p, c, s), m) in &nat {
        if (540..=543).contains(s) {
            report.push_str(&format!("  {p} {}:{s} -> {m}\n", ip_str(*c)));
        }
    }
    let rewritten = nat.iter().filter(|((_, c, s), m)| *c == CLIENT2_IP && (540..=543).contains(s) && s != *m).count();
    let miss2 = passed_stat(&t, &t.server, &t.s_if, "ingress", "no_rule_matched") - miss1;
    let undecided = passed_stat(&t, &t.server, &t.s_if, "ingress", "unfunnel_auto_undecided");
    let after2 = nstat(&t.server, &CSUM_COUNTERS);
    let unfunneled: u64 =
        attachment(t.ino(&t.server), &t.s_if, "ingress").map(|a| rule_packets(&a).iter().sum()).unwrap_or(0);

    for (label, r) in [("round 1, port-based unfunnel rules", &r1), ("round 2, funneled + unfunnel auto", &r2)] {
        report.push_str(&format!(
            "{label}: client 1 {}/{} flows intact, client 2 {}/{}\n",
            r.ok(0),
            r.of(0),
            r.ok(1),
            r.of(1)
        ));
        for (c, name, res) in &r.flows {
            report.push_str(&format!(
                "  client {} {name:<13} {}\n",
                c + 1,
                match res {
                    Ok(s) => format!("ok: {s}"),
                    Err(e) => format!("FAILED: {e}"),
                }
            ));
        }
    }
    report.push_str(&format!(
        "server ingress no_rule_matched: {miss1} in round 1, {miss2} in round 2; unfunnel_auto_undecided {undecided}; \
         packets unfunneled by the round-2 rules {unfunneled}\n"
    ));
    report.push_str(&format!(
        "server nstat: before {}; after round 1 {}; after round 2 {}\n",
        fmt_counters(&before),
        fmt_counters(&after1),
        fmt_counters(&after2)
    ));
    eprintln!("{report}");
    let csum_errors = |c: &[(String, u64)]| -> u64 {
        c.iter().filter(|(n, _)| n == "UdpInCsumErrors" || n == "TcpInCsumErrors").map(|(_, v)| v).sum()
    };
    t.teardown();

    assert_eq!(rewritten, 4, "the router did not rewrite the second client's four funnel source ports");
    // Round 1: the documented failure.  Client 1 kept its ports and works;
    // every flow of client 2 fails, and its funneled packets miss the rules.
    assert_eq!(r1.ok(0), 4, "round 1: client 1 (ports kept) should work");
    assert_eq!(r1.ok(1), 0, "round 1: port-based rules should fail client 2 (ports rewritten)");
    assert!(miss1 > 0, "round 1: client 2's funneled packets should miss the port-based rules");
    // Round 2: everything arrives, nothing is undecided, no checksum error.
    assert_eq!((r2.ok(0), r2.ok(1)), (4, 4), "round 2: every flow of both clients intact");
    assert_eq!((undecided, miss2), (0, 0), "round 2: packets left undecided or missed");
    assert_eq!(csum_errors(&after2), csum_errors(&before), "server checksum errors");
}

/// The issue's measured case: the router DNATs the service, and a
/// conntrack entry left over from an earlier flow (here inserted with
/// `conntrack -I`: router:540 → server:80) takes the tuple the client's
/// funnel flow would be masqueraded to, so the router rewrites the funnel
/// source port 540.  Port-based unfunnel misses (the server's TCP stack
/// gets a bare "SYN with payload" and answers RST); `funneled` delivers.
#[test]
fn stale_conntrack_rewrites_funnel_port_funneled_delivers() {
    if !root("stale_conntrack_rewrites_funnel_port_funneled_delivers") {
        return;
    }
    let t = Topo::new(TopoOpts { nat: true, endpoints_offloads_off: false, router_offloads_off: true, ipv6: false });
    let (r, s) = (ip_str(ROUTER_S_IP), ip_str(SERVER_IP));
    nsh(
        &t.router,
        &[
            "conntrack",
            "-I",
            "-p",
            "tcp",
            "-s",
            &r,
            "-d",
            &s,
            "--sport",
            "540",
            "--dport",
            "80",
            "-r",
            &s,
            "-q",
            &r,
            "--reply-port-src",
            "80",
            "--reply-port-dst",
            "540",
            "--state",
            "ESTABLISHED",
            "-u",
            "ASSURED,SEEN_REPLY",
            "-t",
            "600",
        ],
    );
    load_ok(&t.client, &t.c_if, "egress", CLIENT_EGRESS);
    load_ok(&t.server, &t.s_if, "ingress", SERVER_INGRESS);
    let rst_before = nstat(&t.server, &["TcpOutRsts"]);
    let n1 = udp_flow(&t, &t.client, 4739, DATAGRAMS, 300);
    let miss1 = passed_stat(&t, &t.server, &t.s_if, "ingress", "no_rule_matched");
    let rst_after = nstat(&t.server, &["TcpOutRsts"]);

    load_ok(&t.server, &t.s_if, "ingress", SERVER_INGRESS_FUNNELED);
    let n2 = udp_flow(&t, &t.client, 4739, DATAGRAMS, 301);
    // Read now: in round 1 the server's RSTs ended the router's entry.
    let mapped = nat_source_ports(&t.router).get(&("tcp".to_string(), CLIENT_IP, 540)).copied();
    let miss2 = passed_stat(&t, &t.server, &t.s_if, "ingress", "no_rule_matched") - miss1;
    let csum = nstat(&t.server, &CSUM_COUNTERS);
    let unfunneled: u64 =
        attachment(t.ino(&t.server), &t.s_if, "ingress").map(|a| rule_packets(&a).iter().sum()).unwrap_or(0);
    eprintln!(
        "\n=== stale conntrack entry ===\nrouter maps the funnel flow {}:540 -> svc:80 to source port {mapped:?}\n\
         port-based rules: {n1}/{DATAGRAMS} datagrams delivered, server no_rule_matched {miss1}, server TCP RSTs sent \
         {} -> {}\nfunneled + unfunnel auto: {n2}/{DATAGRAMS} delivered, {unfunneled} packets unfunneled, \
         {miss2} missed; server nstat {}",
        ip_str(CLIENT_IP),
        rst_before[0].1,
        rst_after[0].1,
        fmt_counters(&csum)
    );
    t.teardown();
    assert!(mapped.is_some_and(|m| m != 540), "the stale entry should force a new source port, got {mapped:?}");
    assert_eq!(n1, 0, "port-based rules should miss every rewritten datagram");
    assert!(miss1 >= DATAGRAMS as u64, "the misses should be counted");
    assert!(rst_after[0].1 > rst_before[0].1, "the server should answer the bare SYNs with RST");
    assert_eq!(n2, DATAGRAMS, "funneled + unfunnel auto delivers every datagram");
    assert_eq!((unfunneled, miss2), (DATAGRAMS as u64, 0));
    assert!(
        csum.iter().all(|(n, v)| !(n == "UdpInCsumErrors" || n == "TcpInCsumErrors") || *v == 0),
        "checksum errors"
    );
}
