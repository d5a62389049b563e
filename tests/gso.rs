//! Bulk TCP funneled over TCP and over UDP: GSO super-packets through the
//! segmentation detour (bpf/detour.h, src/detour.rs), in real namespaces.
//!
//! client ──veth── router (tx/tso/gso off both ways) ──veth── server.  The
//! client keeps every offload at its default and the full 1500-byte MTU,
//! so its TCP sends 64 KiB GSO packets whose full-size segments would not
//! fit once funneled; the router completes every checksum, which the server
//! then verifies.  Each flow must arrive byte for byte, with no checksum
//! error at the server, and the helper pair must come and go with the load.
//! Two more flows are funneled by the router, on its egress and on its
//! ingress: traffic a host forwards, not its own, arriving as GSO packets.
//! A second test sends UDP GSO (UDP_SEGMENT).
//!
//! SFUNNEL_BULK_MIB sets the size per flow (default 64 MiB);
//! `scripts/bench-throughput.sh` sends 1 GiB and measures the speed.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::topology::{env_load, env_unload, link_exists, nstat, sfunnel, spawn_in_ns, Topo, TopoOpts, SERVER_IP};

const CLIENT_RULES: &str = "tcp dport 5201 actions funnel tcp sport 540 dport 80; \
                            tcp dport 5202 actions funnel udp sport 541 dport 81; \
                            udp dport 5206 actions funnel udp sport 543 dport 83";
const SERVER_RULES: &str = "tcp sport 540 dport 80 actions unfunnel tcp; udp sport 541 dport 81 actions unfunnel tcp; \
                            tcp sport 542 dport 82 actions unfunnel tcp; tcp sport 544 dport 84 actions unfunnel tcp; \
                            udp sport 543 dport 83 actions unfunnel udp";
/// CLIENT_RULES' UDP rule (by index) and the port it funnels.
const CLIENT_UDP_RULE: usize = 2;
const CLIENT_UDP_PORT: u16 = 5206;
/// The router funnels what it forwards: GSO packets that came over the
/// client's veth whole (as GRO would merge them from a NIC), on the egress
/// they leave by, or on the ingress they arrive on.
const ROUTER_EGRESS_RULES: &str = "tcp dport 5203 actions funnel tcp sport 542 dport 82";
const ROUTER_INGRESS_RULES: &str = "tcp dport 5204 actions funnel tcp sport 544 dport 84";

/// Test data: byte `i` of a flow.  Not periodic within a segment.
fn byte_at(i: usize) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ (i >> 20) as u8
}

fn mib() -> usize {
    std::env::var("SFUNNEL_BULK_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}

/// Sends `len` bytes from the client to the server's `port`; returns how
/// many arrived and the offset of the first wrong byte, if any.
fn bulk(t: &Topo, port: u16, len: usize) -> (usize, Option<usize>) {
    let listener =
        common::topology::in_ns(&t.server, move || TcpListener::bind(("0.0.0.0", port)).expect("listen on the server"));
    let server = spawn_in_ns(&t.server, move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let (mut n, mut wrong) = (0usize, None);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let k = s.read(&mut buf).expect("read on the server");
            if k == 0 {
                break;
            }
            if wrong.is_none() {
                wrong = buf[..k].iter().enumerate().find(|(j, b)| **b != byte_at(n + j)).map(|(j, _)| n + j);
            }
            n += k;
        }
        (n, wrong)
    });
    let dest = SocketAddr::from((SERVER_IP, port));
    spawn_in_ns(&t.client, move || {
        let mut s = TcpStream::connect_timeout(&dest, Duration::from_secs(5)).expect("connect through the funnel");
        s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        let chunk = 1 << 20;
        let mut off = 0;
        while off < len {
            let n = chunk.min(len - off);
            let data: Vec<u8> = (off..off + n).map(byte_at).collect();
            s.write_all(&data).expect("write through the funnel");
            off += n;
        }
        s.shutdown(Shutdown::Write).unwrap();
    })
    .join()
    .expect("client thread");
    server.join().expect("server thread")
}

/// The topology with the router's offloads off and the full MTU at both
/// ends (it lowers them to 1480): segments must be cut to fit (detour.h),
/// not the MTU lowered.
fn full_mtu_topo() -> Topo {
    let t = Topo::new(TopoOpts { router_offloads_off: true, ..Default::default() });
    common::topology::nsh(&t.client, &["ip", "link", "set", &t.c_if, "mtu", "1500"]);
    common::topology::nsh(&t.server, &["ip", "link", "set", &t.s_if, "mtu", "1500"]);
    t
}

#[test]
fn bulk_tcp_over_tcp_and_udp_arrives_exactly_through_the_detour() {
    if !common::require_root("bulk_tcp_over_tcp_and_udp_arrives_exactly_through_the_detour") {
        return;
    }
    let t = full_mtu_topo();
    env_load(&t.client, &t.c_if, "egress", CLIENT_RULES).expect_ok();
    env_load(&t.server, &t.s_if, "ingress", SERVER_RULES).expect_ok();
    env_load(&t.router, &t.rs_if, "egress", ROUTER_EGRESS_RULES).expect_ok();
    env_load(&t.router, &t.rc_if, "ingress", ROUTER_INGRESS_RULES).expect_ok();
    let (ig, is) = common::topology::helper_pair(common::topology::ifindex(&t.router, &t.rc_if), "ingress");
    assert!(link_exists(&t.router, &ig) && link_exists(&t.router, &is), "an ingress load made its pair");

    let (gso_if, seg_if) = common::topology::helper_pair(common::topology::ifindex(&t.client, &t.c_if), "egress");
    assert!(link_exists(&t.client, &gso_if) && link_exists(&t.client, &seg_if), "load made the helper pair");
    // status names it; an ingress attachment has none.
    let a = common::topology::attachment(t.ino(&t.client), &t.c_if, "egress").expect("client attachment in status");
    assert_eq!((a["detour"]["out"].as_str(), a["detour"]["in"].as_str()), (Some(&*gso_if), Some(&*seg_if)), "{a}");
    let s = common::topology::attachment(t.ino(&t.server), &t.s_if, "ingress").expect("server attachment in status");
    assert!(s["detour"].is_null(), "{s}");
    // The way back: the client's veth and the router's have their peer in
    // another namespace and no queue, so straight into the peer (the
    // router's tx checksumming off changes nothing: the helper completed
    // the segments' checksums).  An ingress attachment's go back into its
    // receive path.
    assert_eq!(detour_back(&t, &t.client, &t.c_if, "egress"), "peer");
    assert_eq!(detour_back(&t, &t.router, &t.rs_if, "egress"), "peer");
    assert_eq!(detour_back(&t, &t.router, &t.rc_if, "ingress"), "receive");

    let len = mib() << 20;
    for (port, what) in [
        (5201u16, "TCP over TCP"),
        (5202, "TCP over UDP"),
        (5203, "TCP over TCP, funneled by the router on egress"),
        (5204, "TCP over TCP, funneled by the router on ingress"),
    ] {
        let (n, wrong) = bulk(&t, port, len);
        eprintln!("{what}: {n} of {len} bytes arrived, first wrong byte: {wrong:?}");
        assert_eq!((n, wrong), (len, None), "{what}: every byte, in order");
    }
    let errs = nstat(&t.server, &["TcpInCsumErrors", "UdpInCsumErrors", "IpInHdrErrors"]);
    eprintln!("server nstat: {errs:?}");
    assert!(errs.iter().all(|(_, v)| *v == 0), "no checksum errors at the server: {errs:?}");

    // Each funneled packet is a segment: at least len / MSS per flow (the
    // client's UDP rule carries nothing here).
    for (ns, dev, dir) in
        [(&t.client, &t.c_if, "egress"), (&t.router, &t.rs_if, "egress"), (&t.router, &t.rc_if, "ingress")]
    {
        let a = common::topology::attachment(t.ino(ns), dev, dir).expect("attachment in status");
        let pk = common::topology::rule_packets(&a);
        eprintln!("{dev} {dir} rule packets: {pk:?}");
        let tcp = if *ns == t.client { &pk[..CLIENT_UDP_RULE] } else { &pk[..] };
        assert!(!tcp.is_empty(), "{pk:?}");
        for p in tcp {
            assert!(*p as usize >= len / 1460, "funneled segment by segment: {pk:?}");
        }
    }

    // unload takes the pair away.
    env_unload(&t.client, &t.c_if, "egress").expect_ok();
    assert!(!link_exists(&t.client, &gso_if), "unload removed the helper pair");

    // An egress ruleset that funnels nothing makes no pair (and does not
    // load the detour's program); funnel rules added later make both for
    // the attachment, which is updated in place.
    env_load(&t.client, &t.c_if, "egress", "tcp dport 9 actions accept").expect_ok();
    assert!(!link_exists(&t.client, &gso_if), "no funnel rule, no helper pair");
    let grown = env_load(&t.client, &t.c_if, "egress", CLIENT_RULES).expect_ok();
    eprintln!("adding funnel rules: {}", grown.stdout.trim());
    assert!(grown.stdout.contains("updated in place"), "{}", grown.stdout);
    assert!(link_exists(&t.client, &gso_if), "the load made the pair");
    let (n, wrong) = bulk(&t, 5201, 1 << 20);
    assert_eq!((n, wrong), (1 << 20, None), "funneled through the new detour");

    // The next sfunnel in the namespace (here an unload of every
    // interface) removes the pair of an interface that went away.
    assert!(link_exists(&t.client, &gso_if));
    common::topology::nsh(&t.client, &["ip", "link", "del", &t.c_if]);
    assert!(link_exists(&t.client, &gso_if), "the pair outlives the interface until sfunnel runs there");
    let unload = sfunnel(&["unload", "--netns", &t.client, "-d", "both"], &[]).expect_ok();
    eprintln!("unload: {}", unload.stdout);
    assert!(!link_exists(&t.client, &gso_if) && !link_exists(&t.client, &seg_if), "the orphan pair is gone");
    t.teardown();
}

/// Loads (or reruns) CLIENT_RULES on the client's egress through the
/// container interface, with one more variable.
fn load_client(t: &Topo, var: (&str, &str)) -> common::topology::Out {
    let env =
        [("SFUNNEL_RULESET", CLIENT_RULES), ("IFACES", &*t.c_if), ("DIRECTION", "egress"), ("NETNS", &*t.client), var];
    sfunnel(&[], &env)
}

/// How the attachment's detour sends segments back, as status says.
fn detour_back(t: &Topo, ns: &str, dev: &str, dir: &str) -> String {
    let a = common::topology::attachment(t.ino(ns), dev, dir).expect("attachment in status");
    a["detour"]["back"].as_str().unwrap_or_else(|| panic!("no detour in {a}")).to_string()
}

/// Packets the router's FORWARD chain dropped for carrying the client's mark.
fn marked_drops(t: &Topo) -> u64 {
    let out = common::topology::nsh(&t.router, &["iptables", "-L", "FORWARD", "-v", "-x", "-n"]);
    let line = out.stdout.lines().find(|l| l.contains("mark match 0x4000")).expect("the router's mark rule");
    line.split_whitespace().next().and_then(|n| n.parse().ok()).expect("its packet count")
}

/// Segments back from the detour go straight into the veth peer's receive
/// path where the interface allows it (bpf/detour.h, SFUNNEL_DETOUR_PEER),
/// and must arrive there as veth would deliver them: without anything of
/// the client's namespace.  The client marks its funneled flow and the
/// router drops marked packets, so a mark that crossed would lose every
/// segment.  What the segments would miss of the interface's transmit path
/// (a qdisc) turns the peer path off at the next load, and its going turns
/// it on again; so do `DETOUR_RETURN=transmit` and `auto`.  Transmit
/// checksumming off does not: the helper has completed the segments'
/// checksums already.
#[test]
fn detour_way_back_follows_the_interface_and_leaves_the_clients_mark_behind() {
    if !common::require_root("detour_way_back_follows_the_interface_and_leaves_the_clients_mark_behind") {
        return;
    }
    let t = full_mtu_topo();
    common::topology::nsh(
        &t.client,
        &[
            "iptables",
            "-t",
            "mangle",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            "5201",
            "-j",
            "MARK",
            "--set-mark",
            "0x4000",
        ],
    );
    common::topology::nsh(&t.router, &["iptables", "-A", "FORWARD", "-m", "mark", "--mark", "0x4000", "-j", "DROP"]);
    env_load(&t.client, &t.c_if, "egress", CLIENT_RULES).expect_ok();
    env_load(&t.server, &t.s_if, "ingress", SERVER_RULES).expect_ok();

    let len = 8 << 20;
    let c = t.c_if.as_str();
    // (step, what changes on the client first, DETOUR_RETURN, the way back)
    let steps: [(&str, &[&str], &str, &str); 7] = [
        ("as made", &[], "auto", "peer"),
        ("with a pfifo qdisc", &["tc", "qdisc", "add", "dev", c, "root", "pfifo"], "auto", "transmit"),
        ("without the qdisc", &["tc", "qdisc", "del", "dev", c, "root"], "auto", "peer"),
        ("with tx checksumming off", &["ethtool", "-K", c, "tx", "off"], "auto", "peer"),
        ("with it on again", &["ethtool", "-K", c, "tx", "on"], "auto", "peer"),
        ("with DETOUR_RETURN=transmit", &[], "transmit", "transmit"),
        ("with DETOUR_RETURN=auto", &[], "auto", "peer"),
    ];
    for (step, change, choice, back) in steps {
        if !change.is_empty() {
            common::topology::nsh(&t.client, change);
        }
        // A rerun updates in place, and sets the way back afresh.
        let rerun = load_client(&t, ("DETOUR_RETURN", choice)).expect_ok();
        assert!(rerun.stdout.contains("updated in place"), "{}", rerun.stdout);
        assert_eq!(detour_back(&t, &t.client, &t.c_if, "egress"), back, "{step}");
        let (n, wrong) = bulk(&t, 5201, len);
        eprintln!("{step}, back by {back}: {n} of {len} bytes, first wrong byte {wrong:?}");
        assert_eq!((n, wrong), (len, None), "every byte, in order, back by {back}");
        // Counters start afresh with each ruleset a load installs.
        let a = common::topology::attachment(t.ino(&t.client), &t.c_if, "egress").expect("client attachment");
        let pk = common::topology::rule_packets(&a);
        eprintln!("client rule packets {pk:?}, router drops of marked packets {}", marked_drops(&t));
        assert!(pk[0] as usize >= len / 1460, "funneled segment by segment, back by {back}: {pk:?}");
    }
    assert_eq!(marked_drops(&t), 0, "no segment reached the router with the client's mark");
    t.teardown();
}

/// UDP GSO (a sender with UDP_SEGMENT): one send becomes one GSO packet of
/// several datagrams, which funnel could not grow whole.  Through the
/// detour each datagram is funneled on its own and arrives as sent.
#[test]
fn udp_gso_datagrams_are_funneled_one_by_one() {
    if !common::require_root("udp_gso_datagrams_are_funneled_one_by_one") {
        return;
    }
    const SEG: usize = 1000;
    const PER_SEND: usize = 8;
    const SENDS: usize = 4;
    let t = Topo::new(TopoOpts { router_offloads_off: true, ..Default::default() });
    env_load(&t.client, &t.c_if, "egress", "udp dport 4739 actions funnel tcp sport 540 dport 80").expect_ok();
    env_load(&t.server, &t.s_if, "ingress", "tcp sport 540 dport 80 actions unfunnel udp").expect_ok();

    let server = common::topology::in_ns(&t.server, || {
        let s = std::net::UdpSocket::bind(("0.0.0.0", 4739)).expect("bind on the server");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s
    });
    let dest = SocketAddr::from((SERVER_IP, 4739));
    common::topology::in_ns(&t.client, move || {
        let s = std::net::UdpSocket::bind(("0.0.0.0", 0)).expect("bind on the client");
        common::set_int_opt(&s, libc::SOL_UDP, libc::UDP_SEGMENT, SEG as i32).expect("UDP_SEGMENT");
        for k in 0..SENDS {
            let buf: Vec<u8> = (0..SEG * PER_SEND).map(|i| byte_at(k * SEG * PER_SEND + i)).collect();
            s.send_to(&buf, dest).expect("a UDP GSO send");
        }
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < SENDS * PER_SEND {
        match server.recv(&mut buf) {
            Ok(n) => got.push(buf[..n].to_vec()),
            Err(_) => break,
        }
    }
    // Then anything extra (a duplicate) that is still on its way.
    server.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    while let Ok(n) = server.recv(&mut buf) {
        got.push(buf[..n].to_vec());
    }
    let expected: Vec<Vec<u8>> =
        (0..SENDS * PER_SEND).map(|d| (0..SEG).map(|i| byte_at(d * SEG + i)).collect()).collect();
    let a = common::topology::attachment(t.ino(&t.client), &t.c_if, "egress").expect("client attachment in status");
    let pk = common::topology::rule_packets(&a);
    eprintln!("received {} datagrams of {:?} bytes; client rule packets {pk:?}", got.len(), got.first().map(Vec::len));
    assert_eq!(got, expected, "every datagram, whole and in order");
    // Counted per datagram by the detour; without it the funnel of the
    // whole GSO packet fails, and the datagrams pass unfunneled as errors.
    assert_eq!(pk, vec![(SENDS * PER_SEND) as u64], "each datagram funneled on its own");
    assert_eq!(a["passed"]["error"].as_u64(), Some(0), "{a}");
    let errs = nstat(&t.server, &["TcpInCsumErrors", "UdpInCsumErrors"]);
    assert!(errs.iter().all(|(_, v)| *v == 0), "{errs:?}");
    t.teardown();
}

/// The CPUs a helper end steers its segments to: its rps_cpus, read through
/// `ip netns exec` (which mounts a sysfs of the namespace), as CPU numbers.
fn rps_cpus(ns: &str, dev: &str) -> Vec<u32> {
    let path = format!("/sys/class/net/{dev}/queues/rx-0/rps_cpus");
    let out = common::topology::run(
        std::process::Command::new("ip").args(["netns", "exec", ns, "cat", &path]),
        Duration::from_secs(10),
    )
    .expect_ok();
    // Hex words of 32 CPUs, the highest first.
    let words: Vec<u32> = out.stdout.trim().split(',').map(|w| u32::from_str_radix(w, 16).expect("hex")).collect();
    let mut cpus = Vec::new();
    for (i, w) in words.iter().rev().enumerate() {
        cpus.extend((0..32).filter(|b| w >> b & 1 == 1).map(|b| i as u32 * 32 + b));
    }
    cpus
}

/// /sys/devices/system/cpu/online as CPU numbers.
fn online_cpus() -> Vec<u32> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/online").expect("the online CPUs");
    let mut cpus = Vec::new();
    for part in s.trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        cpus.extend(a.parse::<u32>().unwrap()..=b.parse::<u32>().unwrap());
    }
    cpus
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: u32) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity
    // take it by pointer for the duration of the call.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0, "pin to CPU {cpu}");
    }
}

/// `--detour-cpus` ($DETOUR_CPUS): the helper end's receive packet
/// steering hands the segments to the CPUs given, which then funnel them
/// (the rule's per-CPU counters say where), while the sender goes on
/// sending.  By default every online CPU; `sender` turns steering off; a
/// CPU that is not online is refused before anything changes.
#[test]
fn detour_segments_are_funneled_on_the_cpus_given() {
    if !common::require_root("detour_segments_are_funneled_on_the_cpus_given") {
        return;
    }
    let t = full_mtu_topo();
    env_load(&t.server, &t.s_if, "ingress", SERVER_RULES).expect_ok();
    let load = |cpus: &str| load_client(&t, ("DETOUR_CPUS", cpus));
    let (_, seg_if) = common::topology::helper_pair(common::topology::ifindex(&t.client, &t.c_if), "egress");
    let online = online_cpus();

    load("all").expect_ok();
    assert_eq!(rps_cpus(&t.client, &seg_if), online, "all: every online CPU");
    load("sender").expect_ok();
    assert_eq!(rps_cpus(&t.client, &seg_if), Vec::<u32>::new(), "sender: no steering");

    // Refused, and nothing changes: not the steering, not the ruleset.
    let bad = (online.last().unwrap() + 1).to_string();
    let refused = load(&bad);
    eprintln!("DETOUR_CPUS={bad}: {}", refused.stderr.trim());
    assert!(!refused.ok() && refused.stderr.contains("is not online"), "{}", refused.stderr);
    assert_eq!(rps_cpus(&t.client, &seg_if), Vec::<u32>::new(), "a refused load left the steering alone");
    let a = common::topology::attachment(t.ino(&t.client), &t.c_if, "egress").expect("client attachment");
    assert_eq!(a["rules"].as_array().map(Vec::len), Some(3), "{a}");

    if online.len() < 2 {
        eprintln!(
            "\n************************************************************************\n\
             NOT RUN: detour_segments_are_funneled_on_the_cpus_given: which CPU funnels\n\
             needs two online CPUs, and this machine has {online:?}.\n\
             ************************************************************************"
        );
        t.teardown();
        return;
    }
    // The sender on one CPU, the segments steered to the other: every
    // segment is funneled there, whichever CPU sent it.
    let len = 8 << 20;
    for (sender, steer) in [(online[0], online[1]), (online[1], online[0])] {
        load(&steer.to_string()).expect_ok();
        assert_eq!(rps_cpus(&t.client, &seg_if), vec![steer]);
        let (n, wrong) = {
            let t = &t;
            std::thread::scope(|s| {
                s.spawn(move || {
                    pin_to(sender);
                    bulk(t, 5201, len)
                })
                .join()
                .unwrap()
            })
        };
        assert_eq!((n, wrong), (len, None), "every byte, in order, steered to CPU {steer}");
        let a = common::topology::attachment(t.ino(&t.client), &t.c_if, "egress").expect("client attachment");
        // CPU number → segments it funneled, for the CPUs that funneled any.
        let per_cpu: Vec<(u32, u64)> = a["rules"][0]["packets_per_cpu"]
            .as_object()
            .expect("packets_per_cpu")
            .iter()
            .map(|(cpu, n)| (cpu.parse().unwrap(), n.as_u64().unwrap()))
            .collect();
        eprintln!("sent from CPU {sender}, steered to CPU {steer}: segments funneled per CPU {per_cpu:?}");
        assert_eq!(a["rules"][0]["packets"].as_u64(), Some(per_cpu.iter().map(|(_, n)| n).sum()), "{a}");
        assert!(per_cpu.iter().all(|(cpu, _)| *cpu == steer), "all on CPU {steer}: {per_cpu:?}");
        let on_steer = per_cpu.first().map_or(0, |(_, n)| *n);
        assert!(on_steer as usize >= len / 1460, "funneled segment by segment: {per_cpu:?}");

        // Datagrams are not steered: those the client sends with its
        // default offloads owe their checksum and take the detour
        // (docs/design.md, "Checksums through NAT"), and each is funneled on the
        // CPU that sent it, as plain UDP over a veth is handled, so that
        // an unpaced sender cannot outrun the CPU it hands them to.
        let count = 1000;
        let got = udp_burst(&t, sender, count);
        let a = common::topology::attachment(t.ino(&t.client), &t.c_if, "egress").expect("client attachment");
        let per_cpu = per_cpu_packets(&a["rules"][CLIENT_UDP_RULE]);
        eprintln!("{count} datagrams sent from CPU {sender}, steering to CPU {steer}: funneled per CPU {per_cpu:?}, {got} arrived");
        assert_eq!(per_cpu, vec![(sender, count as u64)], "every datagram funneled on the CPU that sent it");
        assert_eq!(got, count, "every datagram arrived");
    }
    t.teardown();
}

/// A rule's `packets_per_cpu` from status: (CPU, packets) for the CPUs
/// that counted any.
fn per_cpu_packets(rule: &serde_json::Value) -> Vec<(u32, u64)> {
    let per_cpu = rule["packets_per_cpu"].as_object().unwrap_or_else(|| panic!("packets_per_cpu in {rule}"));
    per_cpu.iter().map(|(cpu, n)| (cpu.parse().unwrap(), n.as_u64().unwrap())).collect()
}

/// Sends `count` datagrams of 1000 bytes, unpaced, from the client (on
/// `cpu`) to CLIENT_UDP_PORT on the server; returns how many the server
/// received.  The server's buffer holds them all, so a datagram missing
/// was lost on the way.
fn udp_burst(t: &Topo, cpu: u32, count: usize) -> usize {
    let server = common::topology::in_ns(&t.server, || {
        let s = std::net::UdpSocket::bind(("0.0.0.0", CLIENT_UDP_PORT)).expect("bind on the server");
        common::set_int_opt(&s, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 16 << 20).expect("SO_RCVBUFFORCE");
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        s
    });
    spawn_in_ns(&t.client, move || {
        pin_to(cpu);
        let s = std::net::UdpSocket::bind(("0.0.0.0", 0)).expect("bind on the client");
        let buf = [0x5au8; 1000];
        for _ in 0..count {
            s.send_to(&buf, SocketAddr::from((SERVER_IP, CLIENT_UDP_PORT))).expect("send a datagram");
        }
    })
    .join()
    .expect("client thread");
    let mut buf = [0u8; 2048];
    let mut got = 0;
    while let Ok(n) = server.recv(&mut buf) {
        assert_eq!(n, 1000, "a whole datagram");
        got += 1;
    }
    got
}
