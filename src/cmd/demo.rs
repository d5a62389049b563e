//! `sfunnel demo`: a self-contained run in throwaway namespaces.
//!
//! ```text
//!  sfdemo-N-client (10.203.0.1, fd00:203::1) ── veth ── sfdemo-N-server (10.203.0.2, fd00:203::2)
//!    egress: funnel UDP/4739 and TCP/8080             ingress: unfunnel
//!    into TCP/80, over IPv4 and IPv6                  back to UDP/4739, TCP/8080
//! ```
//! It sends UDP datagrams over both families and a TCP exchange from client
//! to server, counts what crossed the wire on the server's interface, shows
//! the per-rule counters, and removes every namespace and pin it made, also
//! on failure.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::Outcome;
use crate::attach::{AttachChoice, Direction};
use crate::loader::{self, LoadOptions, Target};
use crate::output::outln;
use crate::pins::Tree;
use crate::{caps, netns, ruleset};

const CLIENT_RULES: &str = "\
udp dport 4739 actions funnel tcp sport 540 dport 80
tcp dport 8080 actions funnel tcp sport 541 dport 80
ip6 udp dport 4739 actions funnel tcp sport 540 dport 80";
const SERVER_RULES: &str = "\
tcp sport 540 dport 80 actions unfunnel udp
tcp sport 541 dport 80 actions unfunnel tcp
ip6 tcp sport 540 dport 80 actions unfunnel udp";
const CLIENT_IP: &str = "10.203.0.1";
const SERVER_IP: &str = "10.203.0.2";
const CLIENT_IP6: &str = "fd00:203::1";
const SERVER_IP6: &str = "fd00:203::2";
const DATAGRAMS: usize = 5;
/// How long the demo waits for another sfunnel on the machine.
const LOCK_TIMEOUT: Duration = Duration::from_secs(30);
const TCP_CHUNKS: usize = 4;

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running `ip` (install iproute2)")?;
    ensure!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

/// The demo's namespaces; dropping it unloads and deletes everything.
struct Topology {
    client: String,
    server: String,
    loaded: Vec<(String, Target)>,
}

impl Topology {
    fn create() -> Result<Topology> {
        let id = std::process::id();
        let t =
            Topology { client: format!("sfdemo-{id}-client"), server: format!("sfdemo-{id}-server"), loaded: vec![] };
        ip(&["netns", "add", &t.client])?;
        ip(&["netns", "add", &t.server])?;
        ip(&[
            "link", "add", "sfdemo-c", "netns", &t.client, "type", "veth", "peer", "name", "sfdemo-s", "netns",
            &t.server,
        ])?;
        for (ns, dev, addr, addr6) in
            [(&t.client, "sfdemo-c", CLIENT_IP, CLIENT_IP6), (&t.server, "sfdemo-s", SERVER_IP, SERVER_IP6)]
        {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            // No duplicate address detection: usable at once.
            ip(&["-n", ns, "-6", "addr", "add", &format!("{addr6}/64"), "dev", dev, "nodad"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        // Headroom for the 20-byte funnel header (docs/design.md: MTU guard).
        ip(&["-n", &t.client, "link", "set", "sfdemo-c", "mtu", "1480"])?;
        Ok(t)
    }

    fn load(&mut self, ns: &str, iface: &str, direction: Direction, rules: &str) -> Result<loader::LoadReport> {
        let (_, compiled) = ruleset::load(rules).map_err(|e| anyhow::anyhow!("{e}"))?;
        let opts = LoadOptions {
            attach: AttachChoice::Auto,
            attempts: 1,
            retry_delay: Duration::ZERO,
            over_mtu: Default::default(),
            detour_return: Default::default(),
            detour_cpus: Default::default(),
        };
        let (report, target) = netns::run_in(ns, || {
            let ifindex = crate::netlink::index_of(iface).with_context(|| format!("interface {iface} not found"))?;
            let t = Target { netns: netns::current()?, iface: iface.into(), ifindex, direction };
            let tree = Tree::open()?;
            let _lock = tree.lock(LOCK_TIMEOUT)?;
            let mut reports = loader::load_all(&tree, std::slice::from_ref(&t), &compiled, &opts)
                .map_err(|f| anyhow::anyhow!("{f}"))?;
            Ok((reports.remove(0), t))
        })?;
        self.loaded.push((ns.to_string(), target));
        Ok(report)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for (ns, t) in self.loaded.drain(..) {
            let _ = netns::run_in(&ns, || {
                let tree = Tree::open()?;
                let _lock = tree.lock(LOCK_TIMEOUT)?;
                loader::unload(&tree, &t)
            });
        }
        for ns in [&self.client, &self.server] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Lists (IP version, protocol, destination port) of the IPv4 and IPv6
/// frames to the server on an interface, from an ETH_P_ALL packet socket:
/// such taps see ingress frames before tc, so before unfunnel.
fn capture(ns: &str, iface: &str, stop: std::sync::mpsc::Receiver<()>) -> Result<Vec<(u8, u8, u16)>> {
    netns::run_in(ns, move || {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (libc::ETH_P_ALL as u16).to_be() as i32) };
        ensure!(fd >= 0, "opening a packet socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let ifindex = crate::netlink::index_of(iface).with_context(|| format!("interface {iface} not found"))?;
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: bind with a valid sockaddr_ll and its size.
        let rc = unsafe {
            libc::bind(sock.as_raw_fd(), (&sll as *const libc::sockaddr_ll).cast(), std::mem::size_of_val(&sll) as u32)
        };
        ensure!(rc == 0, "binding the packet socket: {}", std::io::Error::last_os_error());
        let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        // SAFETY: SO_RCVTIMEO with a valid timeval.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of_val(&tv) as u32,
            )
        };
        let server = SERVER_IP.parse::<std::net::Ipv4Addr>()?.octets();
        let server6 = SERVER_IP6.parse::<std::net::Ipv6Addr>()?.octets();
        let port_at = |buf: &[u8], at: usize| buf.get(at..at + 2).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
        let mut seen = Vec::new();
        let mut buf = [0u8; 2048];
        while stop.try_recv().is_err() {
            // SAFETY: recv into a buffer we own, with its length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 38 && buf[12..14] == [0x08, 0x00] && buf[30..34] == server {
                let ihl = usize::from(buf[14] & 0xf) * 4;
                seen.push((4, buf[23], port_at(&buf, 14 + ihl + 2)));
            } else if n >= 58 && buf[12..14] == [0x86, 0xdd] && buf[38..54] == server6 {
                // The L4 header right after the fixed header (no extension
                // headers here).
                seen.push((6, buf[20], port_at(&buf, 54 + 2)));
            }
        }
        Ok(seen)
    })
}

pub fn run() -> Result<Outcome> {
    caps::require_for_load()?;
    outln!(
        "sfunnel demo: client {CLIENT_IP} → server {SERVER_IP} (and {CLIENT_IP6} → {SERVER_IP6}), in throwaway namespaces\n"
    );
    let mut topo = Topology::create()?;
    let (client, server) = (topo.client.clone(), topo.server.clone());

    outln!("client egress rules:\n  {}", CLIENT_RULES.replace('\n', "\n  "));
    let r = topo.load(&client, "sfdemo-c", Direction::Egress, CLIENT_RULES)?;
    outln!("  → {} with {}, program {}\n", r.what, r.mode, r.prog_id);
    outln!("server ingress rules:\n  {}", SERVER_RULES.replace('\n', "\n  "));
    let r = topo.load(&server, "sfdemo-s", Direction::Ingress, SERVER_RULES)?;
    outln!("  → {} with {}, program {}\n", r.what, r.mode, r.prog_id);

    let (stop_tx, stop_rx) = std::sync::mpsc::channel();
    let server_ns = server.clone();
    let capture = std::thread::spawn(move || capture(&server_ns, "sfdemo-s", stop_rx));

    let udp_server = netns::run_in(&server, || Ok(UdpSocket::bind((SERVER_IP, 4739))?))?;
    udp_server.set_read_timeout(Some(Duration::from_secs(2)))?;
    let udp_server6 = netns::run_in(&server, || Ok(UdpSocket::bind((SERVER_IP6, 4739))?))?;
    udp_server6.set_read_timeout(Some(Duration::from_secs(2)))?;
    let tcp_server = netns::run_in(&server, || Ok(TcpListener::bind((SERVER_IP, 8080))?))?;
    let echo = std::thread::spawn(move || -> Result<usize> {
        let (mut s, _) = tcp_server.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut buf = [0u8; 4096];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
            s.write_all(&buf[..n])?;
        }
    });
    std::thread::sleep(Duration::from_millis(200));

    let mut udp_got = [0; 2];
    for (k, (from_ip, to_ip, server)) in
        [(CLIENT_IP, SERVER_IP, &udp_server), (CLIENT_IP6, SERVER_IP6, &udp_server6)].into_iter().enumerate()
    {
        let udp_client = netns::run_in(&client, move || Ok(UdpSocket::bind((from_ip, 0))?))?;
        for i in 0..DATAGRAMS {
            let msg = format!("datagram {i} over UDP/4739 to {to_ip}");
            udp_client.send_to(msg.as_bytes(), (to_ip, 4739))?;
            let mut buf = [0u8; 256];
            if let Ok((n, from)) = server.recv_from(&mut buf) {
                if &buf[..n] == msg.as_bytes() && from.ip().to_string() == from_ip {
                    udp_got[k] += 1;
                }
            }
        }
    }

    let addr: SocketAddr = format!("{SERVER_IP}:8080").parse()?;
    let mut tcp = netns::run_in(&client, || Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(3))?))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut echoed = 0;
    for i in 0..TCP_CHUNKS {
        let chunk = vec![b'a' + i as u8; 1000];
        tcp.write_all(&chunk)?;
        let mut back = vec![0u8; chunk.len()];
        tcp.read_exact(&mut back)?;
        echoed += usize::from(back == chunk) * back.len();
    }
    drop(tcp);
    let served = echo.join().map_err(|_| anyhow::anyhow!("the echo server panicked"))??;

    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop_tx.send(()).ok();
    let frames = capture.join().map_err(|_| anyhow::anyhow!("the capture panicked"))??;
    let on_80 = |v: u8| frames.iter().filter(|f| **f == (v, 6, 80)).count();
    let bare = frames.iter().filter(|(_, _, d)| *d == 4739 || *d == 8080).count();

    outln!("traffic:");
    outln!("  UDP: {}/{DATAGRAMS} datagrams arrived intact at {SERVER_IP}:4739", udp_got[0]);
    outln!("  UDP over IPv6: {}/{DATAGRAMS} datagrams arrived intact at [{SERVER_IP6}]:4739", udp_got[1]);
    outln!("  TCP: {echoed}/{} bytes echoed back by {SERVER_IP}:8080 (server read {served})", TCP_CHUNKS * 1000);
    outln!(
        "  on the server's wire: {} IPv4 and {} IPv6 frames as TCP to port 80 (funneled), {bare} to 4739/8080 \
         (should be 0)\n",
        on_80(4),
        on_80(6)
    );
    outln!("per-rule counters (sfunnel status):");
    let ours = |a: &&super::status::Attachment| {
        a.netns.as_deref().is_some_and(|n| n.ends_with(&format!("/{client}")) || n.ends_with(&format!("/{server}")))
    };
    for a in super::status::collect()?.0.iter().filter(ours) {
        outln!("  {} {} ({}):", a.iface, a.direction, a.mode.map_or("?".into(), |m| m.to_string()));
        for r in &a.rules {
            outln!("    {:>3} packets {:>6} bytes  {}", r.counters.packets, r.counters.bytes, r.text);
        }
    }
    drop(topo);
    outln!("\nremoved the namespaces and every pin the demo made");
    if udp_got != [DATAGRAMS; 2] || echoed != TCP_CHUNKS * 1000 || on_80(4) == 0 || on_80(6) < DATAGRAMS || bare != 0 {
        bail!("the demo did not go as expected: see above");
    }
    outln!("demo OK: every flow crossed the wire as TCP/80 (one flow per IP family) and arrived as sent");
    Ok(Outcome::Ok)
}
