//! IPv6 datapath integration tests: real packets through BPF_PROG_TEST_RUN.
//!
//! The expected bytes come from the independent, specification-based IPv6
//! builders of `common::packet6` (RFC 8200 and NOTES §1 extended to IPv6),
//! never from the BPF code.  The structure is that of `tests/datapath.rs`.
//!
//! - `oracle6_self_check`: the IPv6 oracle's own checks against scapy
//!   vectors, layouts and round trips (no privileges needed).
//! - `table_driven_cases6`: one ruleset + one frame + the expected verdict,
//!   bytes, rule counter and skip statistic per case: the four funnel and
//!   four unfunnel combinations, checksum corner cases (inner UDP 0, computed
//!   UDP 0 sent as 0xFFFF, TCP 0), TCP options, Ethernet trailers, every
//!   extension header kind (passed, SFUNNEL_STAT_IPV6_EXT), fragments
//!   (SFUNNEL_STAT_FRAGMENT), truncated and inconsistent headers
//!   (SFUNNEL_STAT_MALFORMED), other next headers (SFUNNEL_STAT_NOT_IP_TCP_UDP),
//!   the separation of IPv4 and IPv6 rules, address prefixes and their
//!   negation, accept, drop, `funneled` and `unfunnel auto`.
//! - `property_random_packets6`: ≥ 10,000 random valid IPv6 packets through
//!   funnel, unfunnel, and NAT + unfunnel, checked byte for byte and for
//!   checksums, under dual-stack rulesets whose IPv4 twin rule never moves.
//! - `robustness_prefixes6`: every prefix of a few dozen valid IPv6 frames
//!   (plain, funneled, with extension headers) under wildcard `ip6` funnel
//!   and unfunnel rulesets.
//! - `robustness_random_frames6`: 100,000 valid frames with random
//!   mutations (lengths, next header, version, L4 and inner header fields,
//!   end, any header byte) under the same rulesets, each checked against
//!   what the specification says of it (`classify6`).
//!
//! Funneling past payload_len 65535 (SFUNNEL_STAT_TOO_BIG) cannot be tested
//! here: PROG_TEST_RUN refuses skb frames larger than about a page, and such
//! a frame needs 65,5xx bytes.  `table_driven_cases6` tries one anyway and
//! says what the kernel did.
//!
//! The tests need root; see `common::require_root`.  Run with
//! `cargo test --test datapath6`.  `SFUNNEL_TEST_SEED` changes the seed of
//! the random tests, `SFUNNEL_PROP_CASES` and `SFUNNEL_RANDOM_INPUTS` their
//! sizes, and `SFUNNEL_MAX_FAILURES` how many robustness failures are
//! printed.

mod common;

use std::time::Instant;

use common::packet::{
    be16, check_funneled, check_plain, diff, expected_funnel, expected_unfunnel, hex, l4_header_len, put16, L4Csum,
    PacketSpec, Proto, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, L4,
};
use common::packet6::{
    a6, check_funneled6, check_l4_6_zero_ok, check_plain6, describe6, expected_funnel6, expected_unfunnel6,
    funnelable6, is_ext_header, nat_rewrite6, pseudo_header6, ExtHeader, Ip6, Packet6Spec, IP6_L4_OFF,
    IP6_OFF_NEXT_HEADER, IP6_OFF_PAYLOAD_LEN, NEXTHDR_AH, NEXTHDR_ESP, NEXTHDR_EXP1, NEXTHDR_EXP2, NEXTHDR_HIP,
    NEXTHDR_MOBILITY, NEXTHDR_NONE, NEXTHDR_SHIM6,
};
use common::rng::Rng;
use common::table::{pass_case, run_all, Case};
use common::{env_usize, payload, randomize_tcp, require_root, Mode, Prog, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC};
use sfunnel::datapath::consts::{
    SFUNNEL_STAT_FRAGMENT, SFUNNEL_STAT_IPV6_EXT, SFUNNEL_STAT_MALFORMED, SFUNNEL_STAT_MISS,
    SFUNNEL_STAT_NOT_IP_TCP_UDP, SFUNNEL_STAT_OVER_MTU, SFUNNEL_STAT_TOO_BIG, SFUNNEL_STAT_UNDECIDED,
};

/// Seed of the random tests unless SFUNNEL_TEST_SEED says otherwise.
const DEFAULT_SEED: u64 = 0x5F0E_1206_4DA7_A9A7;

// ===========================================================================
// Oracle self-check (no BPF)
// ===========================================================================

#[test]
fn oracle6_self_check() {
    common::packet6::self_check().unwrap();
}

// ===========================================================================
// Helpers
// ===========================================================================

/// A one-line summary of an IPv6 frame if it is whole enough to describe
/// (no extension headers walked), else its length: for failure messages.
fn describe(frame: &[u8]) -> String {
    let whole = frame.len() >= IP6_L4_OFF
        && be16(frame, 12) == ETH_P_IPV6
        && frame[ETH_HLEN] >> 4 == 6
        && IP6_L4_OFF + usize::from(be16(frame, IP6_OFF_PAYLOAD_LEN)) <= frame.len()
        && !is_ext_header(frame[IP6_OFF_NEXT_HEADER]);
    if whole {
        describe6(frame)
    } else {
        format!("{} bytes (not a whole IPv6 packet)", frame.len())
    }
}

fn diff6(expected: &[u8], got: &[u8]) -> String {
    format!("{}  expected: {}\n  got:      {}", diff(expected, got), describe(expected), describe(got))
}

/// A plain frame is valid (`check_plain6`), except that an L4 UDP checksum
/// of 0 passes: what the funnel and unfunnel carry through for an inner
/// datagram sent without one.
fn check_plain6_zero_ok(frame: &[u8]) -> Result<(), String> {
    let ip = Ip6::of(frame);
    if ip.upper == Proto::Udp.number() && !ip.is_fragment() && be16(frame, ip.l4_off() + 6) == 0 {
        return check_l4_6_zero_ok(&frame[ip.l4_off()..ip.end()], ip.saddr, ip.daddr, Proto::Udp);
    }
    check_plain6(frame)
}

/// The Ethernet + fixed IPv6 header of the builder's default packet, with
/// next header `next_header`, followed by `body` (payload_len = its length).
/// For frames the builder does not make (ESP, AH, ICMPv6, ...), which only
/// ever pass unchanged.
fn raw6(next_header: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Packet6Spec::udp(1, 2, &[]).build()[..IP6_L4_OFF].to_vec();
    f[IP6_OFF_NEXT_HEADER] = next_header;
    put16(&mut f, IP6_OFF_PAYLOAD_LEN, u16::try_from(body.len()).unwrap());
    f.extend_from_slice(body);
    f
}

/// `frame` with the extension header `e` inserted right after the fixed
/// IPv6 header (for funneled frames, which the builder does not make).  No
/// checksum changes: the pseudo-header does not cover extension headers,
/// and a Routing header is built with Segments Left 0.
fn with_first_ext(frame: &[u8], e: &ExtHeader) -> Vec<u8> {
    let h = e.serialize(frame[IP6_OFF_NEXT_HEADER]);
    let mut out = frame[..IP6_L4_OFF].to_vec();
    out[IP6_OFF_NEXT_HEADER] = e.number();
    let plen = usize::from(be16(frame, IP6_OFF_PAYLOAD_LEN)) + h.len();
    put16(&mut out, IP6_OFF_PAYLOAD_LEN, u16::try_from(plen).unwrap());
    out.extend_from_slice(&h);
    out.extend_from_slice(&frame[IP6_L4_OFF..]);
    out
}

/// Makes payload_len, the outer UDP length and the outer L4 checksum of a
/// hand-edited frame (no extension headers, no trailer) match its bytes.
fn fix_outer6(g: &mut [u8]) {
    let plen = g.len() - IP6_L4_OFF;
    put16(g, IP6_OFF_PAYLOAD_LEN, u16::try_from(plen).unwrap());
    let ip = Ip6::of(g);
    let outer = Proto::from_number(ip.next_header).unwrap();
    let l4 = ip.l4_off();
    if outer == Proto::Udp {
        put16(g, l4 + 4, u16::try_from(plen).unwrap());
    }
    let c = common::packet6::l4_checksum_for6(ip.saddr, ip.daddr, outer, &g[l4..]);
    put16(g, l4 + outer.csum_offset(), c);
    check_plain6(g).unwrap();
}

// ===========================================================================
// 1. Table-driven PROG_TEST_RUN cases
// ===========================================================================

const UDP_OVER_TCP: &str = "ip6 udp dport 4739 actions funnel tcp dport 179 sport 540";
const UDP_OVER_UDP: &str = "ip6 udp dport 4739 actions funnel udp sport 5000 dport 6000";
const TCP_OVER_TCP: &str = "ip6 tcp dport 443 actions funnel tcp sport 540 dport 179";
const TCP_OVER_UDP: &str = "ip6 tcp dport 443 actions funnel udp sport 5000 dport 6000";
const UNFUNNEL_TCP_UDP: &str = "ip6 tcp dport 179 sport 540 actions unfunnel udp";
const UNFUNNEL_UDP_UDP: &str = "ip6 udp sport 5000 dport 6000 actions unfunnel udp";
const UNFUNNEL_TCP_TCP: &str = "ip6 tcp dport 179 sport 540 actions unfunnel tcp";
const UNFUNNEL_UDP_TCP: &str = "ip6 udp sport 5000 dport 6000 actions unfunnel tcp";

/// (inner, outer, funnel rule, unfunnel rule, funnel sport, funnel dport)
const COMBOS: [(Proto, Proto, &str, &str, u16, u16); 4] = [
    (Proto::Udp, Proto::Tcp, UDP_OVER_TCP, UNFUNNEL_TCP_UDP, 540, 179),
    (Proto::Udp, Proto::Udp, UDP_OVER_UDP, UNFUNNEL_UDP_UDP, 5000, 6000),
    (Proto::Tcp, Proto::Tcp, TCP_OVER_TCP, UNFUNNEL_TCP_TCP, 540, 179),
    (Proto::Tcp, Proto::Udp, TCP_OVER_UDP, UNFUNNEL_UDP_TCP, 5000, 6000),
];

/// The combo's funnel rule for `inner`: `(rule, outer, sport, dport)`.
fn funnel_rule_for(inner: Proto) -> (&'static str, Proto, u16, u16) {
    match inner {
        Proto::Udp => (UDP_OVER_TCP, Proto::Tcp, 540, 179),
        Proto::Tcp => (TCP_OVER_UDP, Proto::Udp, 5000, 6000),
    }
}

/// An IPv6 packet of `inner` protocol that the combos' funnel rules match.
fn inner_packet(inner: Proto, payload: &[u8]) -> Packet6Spec {
    match inner {
        Proto::Udp => Packet6Spec::udp(5555, 4739, payload),
        Proto::Tcp => Packet6Spec::tcp(50000, 443, payload),
    }
}

fn funnel_case(name: String, rules: &str, input: Vec<u8>, outer: Proto, sport: u16, dport: u16) -> Case {
    let output = expected_funnel6(&input, outer, sport, dport);
    let inner = Proto::from_number(input[IP6_OFF_NEXT_HEADER]).unwrap();
    check_funneled6(&output, inner).unwrap_or_else(|e| panic!("oracle for {name}: {e}"));
    Case { name, rules: rules.into(), input, verdict: TC_ACT_OK, output, rule: Some(0), stat: None, refusal_ok: false }
}

fn unfunnel_case(name: String, rules: &str, input: Vec<u8>, inner: Proto) -> Case {
    let output = expected_unfunnel6(&input, inner);
    check_plain6_zero_ok(&output).unwrap_or_else(|e| panic!("oracle for {name}: {e}"));
    Case { name, rules: rules.into(), input, verdict: TC_ACT_OK, output, rule: Some(0), stat: None, refusal_ok: false }
}

/// A frame too short for the fixed IPv6 header: PROG_TEST_RUN may refuse
/// it; if it runs, the frame passes unchanged as malformed.
fn short_case(name: impl Into<String>, rules: &str, input: Vec<u8>) -> Case {
    assert!(input.len() >= ETH_HLEN && input.len() < IP6_L4_OFF);
    Case { refusal_ok: true, ..pass_case(name, rules, input, SFUNNEL_STAT_MALFORMED) }
}

/// accept (TC_ACT_OK) or drop (TC_ACT_SHOT) by rule `rule`: unchanged bytes.
fn verdict_case(name: impl Into<String>, rules: &str, input: Vec<u8>, verdict: i32, rule: usize) -> Case {
    let output = input.clone();
    Case {
        name: name.into(),
        rules: rules.into(),
        input,
        verdict,
        output,
        rule: Some(rule),
        stat: None,
        refusal_ok: false,
    }
}

/// `spec` with its last two payload bytes chosen so that its L4 checksum
/// computed for the pseudo-header of (`saddr`, `daddr`) is 0 (for UDP: sent
/// as 0xFFFF).  The spec's own checksum stays valid for its own addresses.
fn with_zero_computed_csum(mut spec: Packet6Spec, saddr: [u8; 16], daddr: [u8; 16]) -> Packet6Spec {
    let n = spec.payload.len();
    assert!(n >= 2 && n % 2 == 0, "the last payload word must be aligned");
    spec.payload[n - 2..].fill(0);
    spec.csum = L4Csum::Raw(0);
    let seg = spec.segment();
    // Sum with the checksum field 0 and the last word 0; want it ≡ 0xFFFF.
    let s = pseudo_header6(saddr, daddr, spec.proto().number(), seg.len()).add(&seg).fold();
    let w = 0xFFFF - s;
    spec.payload[n - 2..].copy_from_slice(&w.to_be_bytes());
    spec.csum = L4Csum::Valid;
    spec
}

/// The funnel header source port that makes the header's computed checksum
/// 0 (for UDP: sent as 0xFFFF); None if that port would be 0.  The
/// checksum is linear in sport.
fn sport_for_zero_funnel_csum(frame: &[u8], outer: Proto, dport: u16) -> Option<u16> {
    let f = expected_funnel6(frame, outer, 0, dport);
    let c0 = be16(&f, IP6_L4_OFF + outer.csum_offset());
    // With sport 0 the folded sum is S = ~c0 (a UDP 0xFFFF is a computed 0:
    // S = 0xFFFF); we need S + sport ≡ 0xFFFF.
    let s = if outer == Proto::Udp && c0 == 0xFFFF { 0xFFFF } else { !c0 };
    let sport = 0xFFFF - s;
    (sport != 0).then_some(sport)
}

fn build_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    combo_cases(&mut cases);
    checksum_cases(&mut cases);
    trailer_cases(&mut cases);
    ext_header_cases(&mut cases);
    fragment_cases(&mut cases);
    malformed_cases(&mut cases);
    other_next_header_cases(&mut cases);
    family_cases(&mut cases);
    address_cases(&mut cases);
    verdict_cases(&mut cases);
    funneled_cases(&mut cases);
    cases
}

/// The four funnel and four unfunnel combinations × payload sizes, header
/// fields, addresses, TCP options.
fn combo_cases(cases: &mut Vec<Case>) {
    for (inner, outer, frule, urule, sport, dport) in COMBOS {
        let (i, o) = (inner.name(), outer.name());
        let mut push_pair = |what: String, p: Vec<u8>| {
            let fc = funnel_case(format!("funnel {what}"), frule, p.clone(), outer, sport, dport);
            let uc = unfunnel_case(format!("unfunnel {what}"), urule, fc.output.clone(), inner);
            assert_eq!(uc.output, p, "oracle: unfunnel(funnel(p)) == p ({what})");
            cases.push(fc);
            cases.push(uc);
        };
        for n in [0usize, 1, 3, 4, 1001] {
            push_pair(format!("{i} over {o}, payload {n}"), inner_packet(inner, &payload(n)).build());
        }
        // Traffic class, flow label and hop limit survive, extremes included.
        for (tc, fl, hl) in [(0xFF, 0xF_FFFF, 1), (0, 0, 255), (0xB8, 0x8_0001, 0)] {
            let p = inner_packet(inner, &payload(10)).with_flow(tc, fl, hl).build();
            push_pair(format!("{i} over {o}, traffic class {tc:#04x}, flow label {fl:#07x}, hop limit {hl}"), p);
        }
        // Addresses whose words carry into the sums in different ways.
        for (s, d) in [
            ("2001:db8::1", "2001:db8:1::2"),
            ("::", "::"),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"),
            ("::ffff:10.0.0.1", "fe80::1"),
        ] {
            let p = inner_packet(inner, &payload(33)).with_addrs(a6(s), a6(d)).build();
            push_pair(format!("{i} over {o}, {s} -> {d}"), p);
        }
        // Inner TCP options: carried as inner bytes.
        if inner == Proto::Tcp {
            for opts in [vec![2, 4, 5, 0xb4], vec![2, 4, 5, 0xa0, 4, 2, 8, 10, 1, 2, 3, 4, 0, 0, 0, 0, 1, 3, 3, 7], {
                let mut o = vec![1u8; 40];
                o[36..].copy_from_slice(&[2, 4, 0x05, 0x8c]);
                o
            }] {
                for n in [0usize, 21] {
                    let mut spec = inner_packet(inner, &payload(n));
                    if let L4::Tcp { options, .. } = &mut spec.l4 {
                        options.clone_from(&opts);
                    }
                    push_pair(format!("{i} over {o}, {} bytes of TCP options, payload {n}", opts.len()), spec.build());
                }
            }
        }
    }
    // The outer TCP header is removed whole, options included (data
    // offset 8), as the IPv4 unfunnel does.
    let p = inner_packet(Proto::Udp, &payload(30)).build();
    let f = expected_funnel6(&p, Proto::Tcp, 540, 179);
    let mut g = f[..IP6_L4_OFF + 20].to_vec();
    g[IP6_L4_OFF + 12] = 8 << 4;
    g.extend_from_slice(&[1; 12]); // NOP options
    g.extend_from_slice(&f[IP6_L4_OFF + 20..]);
    fix_outer6(&mut g);
    let uc = unfunnel_case(
        "unfunnel udp over tcp whose outer TCP header has 12 bytes of options".into(),
        UNFUNNEL_TCP_UDP,
        g,
        Proto::Udp,
    );
    assert_eq!(uc.output, p);
    cases.push(uc);
}

/// Inner UDP 0, computed UDP 0 sent as 0xFFFF, computed TCP 0 sent as 0.
fn checksum_cases(cases: &mut Vec<Case>) {
    // -- Inner UDP checksum 0 stays 0 through funnel and unfunnel.
    for (inner, outer, frule, urule, sport, dport) in COMBOS.into_iter().filter(|c| c.0 == Proto::Udp) {
        for n in [0usize, 5, 1001] {
            let p = inner_packet(inner, &payload(n)).with_csum(L4Csum::None).build();
            let what = format!("udp (checksum 0) over {}, payload {n}", outer.name());
            let fc = funnel_case(format!("funnel {what}"), frule, p.clone(), outer, sport, dport);
            assert_eq!(be16(&fc.output, IP6_L4_OFF + outer.funnel_header_len() + 6), 0, "oracle: inner 0 stays 0");
            let uc = unfunnel_case(format!("unfunnel {what}"), urule, fc.output.clone(), inner);
            assert_eq!(uc.output, p);
            cases.push(fc);
            cases.push(uc);
        }
    }

    // -- The funnel header's computed checksum is 0: UDP sends 0xFFFF, TCP 0.
    for (inner, outer, _, _, _, dport) in COMBOS {
        let (i, o) = (inner.name(), outer.name());
        let p = (0..64)
            .map(|k| inner_packet(inner, &payload(20 + k)).build())
            .find(|p| sport_for_zero_funnel_csum(p, outer, dport).is_some())
            .unwrap();
        let sport = sport_for_zero_funnel_csum(&p, outer, dport).unwrap();
        let rules = match inner {
            Proto::Udp => format!("ip6 udp dport 4739 actions funnel {o} sport {sport} dport {dport}"),
            Proto::Tcp => format!("ip6 tcp dport 443 actions funnel {o} sport {sport} dport {dport}"),
        };
        let want = if outer == Proto::Udp { 0xFFFF } else { 0 };
        let fc = funnel_case(
            format!("funnel {i} over {o}, funnel header checksum computes to 0 → {want:#06x}"),
            &rules,
            p.clone(),
            outer,
            sport,
            dport,
        );
        assert_eq!(be16(&fc.output, IP6_L4_OFF + outer.csum_offset()), want, "oracle: outer checksum");
        let urules = format!("ip6 {o} sport {sport} dport {dport} actions unfunnel {i}");
        let uc = unfunnel_case(
            format!("unfunnel {i} over {o} whose funnel header checksum is {want:#06x}"),
            &urules,
            fc.output.clone(),
            inner,
        );
        assert_eq!(uc.output, p);
        cases.push(fc);
        cases.push(uc);
    }

    // -- The inner checksum computed with zero addresses is 0: UDP 0xFFFF,
    //    TCP 0.
    for (inner, outer, frule, _, sport, dport) in COMBOS {
        let spec = with_zero_computed_csum(inner_packet(inner, &payload(16)), [0; 16], [0; 16]);
        let p = spec.build();
        let want = if inner == Proto::Udp { 0xFFFF } else { 0 };
        let fc = funnel_case(
            format!(
                "funnel {} over {}, inner zero-address checksum computes to 0 → {want:#06x}",
                inner.name(),
                outer.name()
            ),
            frule,
            p,
            outer,
            sport,
            dport,
        );
        assert_eq!(be16(&fc.output, IP6_L4_OFF + outer.funnel_header_len() + inner.csum_offset()), want);
        cases.push(fc);
    }

    // -- Unfunnel: the inner checksum for the real addresses computes to 0.
    for (inner, outer, _, urule, sport, dport) in COMBOS {
        let base = inner_packet(inner, &payload(16));
        let (s, d) = (base.saddr, base.daddr);
        let p = with_zero_computed_csum(base, s, d).build();
        let want = if inner == Proto::Udp { 0xFFFF } else { 0 };
        assert_eq!(be16(&p, IP6_L4_OFF + inner.csum_offset()), want);
        let f = expected_funnel6(&p, outer, sport, dport);
        let uc = unfunnel_case(
            format!(
                "unfunnel {} over {}, inner checksum for the real addresses computes to 0 → {want:#06x}",
                inner.name(),
                outer.name()
            ),
            urule,
            f,
            inner,
        );
        assert_eq!(uc.output, p);
        cases.push(uc);
    }
}

/// Bytes after payload_len (Ethernet trailer) stay at the end, uncounted.
fn trailer_cases(cases: &mut Vec<Case>) {
    for (inner, outer, frule, urule, sport, dport) in COMBOS {
        for (n, t) in [(0usize, vec![0u8; 6]), (3, vec![0xEE; 5]), (100, vec![0; 1])] {
            let p = inner_packet(inner, &payload(n)).with_trailer(&t).build();
            let what =
                format!("{} over {}, payload {n}, {}-byte Ethernet trailer", inner.name(), outer.name(), t.len());
            let fc = funnel_case(format!("funnel {what}"), frule, p.clone(), outer, sport, dport);
            let uc = unfunnel_case(format!("unfunnel {what}"), urule, fc.output.clone(), inner);
            assert_eq!(uc.output, p);
            cases.push(fc);
            cases.push(uc);
        }
    }
    // An inner UDP 0 with a trailer: the payload sum must stop at payload_len.
    let p = inner_packet(Proto::Udp, &payload(7)).with_csum(L4Csum::None).with_trailer(&[0xAB; 9]).build();
    cases.push(funnel_case(
        "funnel udp (checksum 0) over udp, 9-byte trailer of 0xab".into(),
        UDP_OVER_UDP,
        p,
        Proto::Udp,
        5000,
        6000,
    ));
}

/// Every extension header kind as the first next header: passed unchanged.
fn ext_header_cases(cases: &mut Vec<Case>) {
    let x = a6("2001:db8::99");
    let mut exts: Vec<(String, Vec<ExtHeader>)> = vec![
        ("hop-by-hop (empty)".into(), vec![ExtHeader::hop_by_hop()]),
        ("hop-by-hop (router alert)".into(), vec![ExtHeader::router_alert()]),
        ("routing type 0".into(), vec![ExtHeader::routing0(x)]),
        ("routing type 0, two addresses".into(), vec![ExtHeader::Routing { rtype: 0, addresses: vec![x, x] }]),
        ("routing type 4 (SRH)".into(), vec![ExtHeader::srh(common::packet6::DEFAULT_DADDR6)]),
        ("destination options (empty)".into(), vec![ExtHeader::dest_opts()]),
        ("destination options (5-byte option)".into(), vec![ExtHeader::dest_opts_with(5)]),
        (
            "hop-by-hop, destination options, routing, fragment".into(),
            vec![
                ExtHeader::hop_by_hop(),
                ExtHeader::dest_opts_with(3),
                ExtHeader::routing0(x),
                ExtHeader::fragment(0, true, 7),
            ],
        ),
        ("hop-by-hop then a later fragment".into(), vec![ExtHeader::hop_by_hop(), ExtHeader::fragment(185, false, 8)]),
    ];
    for (number, what) in [
        (NEXTHDR_MOBILITY, "mobility (135)"),
        (NEXTHDR_HIP, "HIP (139)"),
        (NEXTHDR_SHIM6, "shim6 (140)"),
        (NEXTHDR_EXP1, "experimental 253"),
        (NEXTHDR_EXP2, "experimental 254"),
    ] {
        exts.push((what.into(), vec![ExtHeader::Other { number, data: vec![0x55; 11] }]));
    }
    for (what, chain) in &exts {
        for inner in Proto::ALL {
            let mut spec = inner_packet(inner, &payload(40));
            for e in chain {
                spec = spec.with_ext(e.clone());
            }
            let p = spec.build();
            assert!(!funnelable6(&p));
            let (frule, ..) = funnel_rule_for(inner);
            let i = inner.name();
            cases.push(pass_case(
                format!("{i} behind {what} under a funnel rule"),
                frule,
                p.clone(),
                SFUNNEL_STAT_IPV6_EXT,
            ));
            cases.push(pass_case(
                format!("{i} behind {what} under a wildcard drop rule"),
                &format!("ip6 {i} actions drop"),
                p,
                SFUNNEL_STAT_IPV6_EXT,
            ));
        }
    }
    // ESP (50) and AH (51), built by hand (the builder does not make them).
    let udp = inner_packet(Proto::Udp, &payload(40));
    let mut esp = vec![0, 0, 0x10, 0, 0, 0, 0, 1]; // SPI 0x1000, sequence 1
    esp.extend_from_slice(&payload(48)); // "ciphertext", padding, ICV
    let mut ah = vec![17, 4, 0, 0, 0, 0, 0x10, 1, 0, 0, 0, 1]; // next UDP, 6 words, SPI, seq
    ah.extend_from_slice(&[0xA5; 12]); // ICV
    ah.extend_from_slice(&udp.segment());
    for (what, f) in [("ESP (50)", raw6(NEXTHDR_ESP, &esp)), ("AH (51) + UDP", raw6(NEXTHDR_AH, &ah))] {
        cases.push(pass_case(format!("{what} under a funnel rule"), UDP_OVER_TCP, f.clone(), SFUNNEL_STAT_IPV6_EXT));
        cases.push(pass_case(
            format!("{what} under a wildcard drop rule"),
            "ip6 udp actions drop",
            f,
            SFUNNEL_STAT_IPV6_EXT,
        ));
    }
    // A hop-by-hop Jumbo Payload option (RFC 2675) with payload_len 0.
    let mut j = with_first_ext(&udp.build(), &ExtHeader::HopByHop { options: vec![0xC2, 4, 0, 0, 0, 56] });
    put16(&mut j, IP6_OFF_PAYLOAD_LEN, 0);
    cases.push(pass_case(
        "jumbogram (hop-by-hop Jumbo Payload, payload_len 0)",
        UDP_OVER_TCP,
        j,
        SFUNNEL_STAT_IPV6_EXT,
    ));

    // Funneled packets behind an extension header under unfunnel rules.
    for (inner, outer, _, urule, sport, dport) in COMBOS {
        let f = expected_funnel6(&inner_packet(inner, &payload(40)).build(), outer, sport, dport);
        for (what, e) in [
            ("hop-by-hop", ExtHeader::hop_by_hop()),
            ("routing type 4 (SRH)", ExtHeader::srh(common::packet6::DEFAULT_DADDR6)),
            ("destination options", ExtHeader::dest_opts_with(2)),
            ("experimental 253", ExtHeader::Other { number: NEXTHDR_EXP1, data: vec![1, 2, 3] }),
        ] {
            cases.push(pass_case(
                format!("funneled {} over {} behind {what} under an unfunnel rule", inner.name(), outer.name()),
                urule,
                with_first_ext(&f, &e),
                SFUNNEL_STAT_IPV6_EXT,
            ));
        }
    }
}

/// A Fragment header first: never funneled or unfunneled.
fn fragment_cases(cases: &mut Vec<Case>) {
    for (what, offset, more) in [
        ("first fragment (offset 0, M)", 0, true),
        ("later fragment (offset 185)", 185, false),
        ("middle fragment (offset 1, M)", 1, true),
        ("atomic fragment (offset 0, no M)", 0, false),
    ] {
        for inner in Proto::ALL {
            let p = inner_packet(inner, &payload(40)).with_ext(ExtHeader::fragment(offset, more, 0xdead_beef)).build();
            let (frule, ..) = funnel_rule_for(inner);
            let i = inner.name();
            cases.push(pass_case(format!("{i} {what} under a funnel rule"), frule, p.clone(), SFUNNEL_STAT_FRAGMENT));
            cases.push(pass_case(
                format!("{i} {what} under a wildcard drop rule"),
                &format!("ip6 {i} actions drop"),
                p,
                SFUNNEL_STAT_FRAGMENT,
            ));
        }
        for (inner, outer, _, urule, sport, dport) in COMBOS {
            let f = expected_funnel6(&inner_packet(inner, &payload(40)).build(), outer, sport, dport);
            cases.push(pass_case(
                format!("{what} of a funneled {} over {} under an unfunnel rule", inner.name(), outer.name()),
                urule,
                with_first_ext(&f, &ExtHeader::fragment(offset, more, 42)),
                SFUNNEL_STAT_FRAGMENT,
            ));
        }
    }
}

/// Truncated and inconsistent headers: passed unchanged as malformed.
fn malformed_cases(cases: &mut Vec<Case>) {
    let udp = inner_packet(Proto::Udp, &payload(40)).build();
    let tcp_spec = {
        let mut s = inner_packet(Proto::Tcp, &payload(40));
        if let L4::Tcp { options, .. } = &mut s.l4 {
            *options = vec![2, 4, 5, 0xb4, 1, 1, 4, 2];
        }
        s
    };
    let tcp = tcp_spec.build();

    // -- Cut inside the fixed IPv6 header: test_run may refuse the frame.
    for cut in [ETH_HLEN, ETH_HLEN + 4, ETH_HLEN + 20, IP6_L4_OFF - 1] {
        cases.push(short_case(
            format!("truncated: {cut}-byte frame, inside the IPv6 header"),
            UDP_OVER_TCP,
            udp[..cut].to_vec(),
        ));
    }
    // -- payload_len beyond the frame.
    for (what, f, rules) in [
        ("udp, last payload byte missing", udp[..udp.len() - 1].to_vec(), UDP_OVER_TCP),
        ("udp, last 10 payload bytes missing", udp[..udp.len() - 10].to_vec(), UDP_OVER_TCP),
        ("udp, no L4 header at all", udp[..IP6_L4_OFF].to_vec(), UDP_OVER_TCP),
        ("udp, inside the UDP header", udp[..IP6_L4_OFF + 4].to_vec(), UDP_OVER_TCP),
        ("udp, UDP header only", udp[..IP6_L4_OFF + 8].to_vec(), UDP_OVER_TCP),
        ("tcp, inside the TCP header", tcp[..IP6_L4_OFF + 14].to_vec(), TCP_OVER_TCP),
        ("tcp, inside the TCP options", tcp[..IP6_L4_OFF + 24].to_vec(), TCP_OVER_TCP),
        ("tcp, last payload byte missing", tcp[..tcp.len() - 1].to_vec(), TCP_OVER_TCP),
    ] {
        cases.push(pass_case(format!("truncated: {what}"), rules, f, SFUNNEL_STAT_MALFORMED));
    }
    // -- payload_len beyond a whole frame (one more than the bytes).
    let mut g = udp.clone();
    put16(&mut g, IP6_OFF_PAYLOAD_LEN, be16(&udp, IP6_OFF_PAYLOAD_LEN) + 1);
    cases.push(pass_case(
        "truncated: payload_len one more than the frame holds",
        UDP_OVER_TCP,
        g,
        SFUNNEL_STAT_MALFORMED,
    ));
    // -- Funneled packets cut short, under unfunnel rules.
    for (inner, outer, _, urule, sport, dport) in COMBOS {
        let f = expected_funnel6(&inner_packet(inner, &payload(40)).build(), outer, sport, dport);
        let (i, o) = (inner.name(), outer.name());
        cases.push(pass_case(
            format!("truncated: funneled {i} over {o}, last byte missing"),
            urule,
            f[..f.len() - 1].to_vec(),
            SFUNNEL_STAT_MALFORMED,
        ));
        cases.push(pass_case(
            format!("truncated: funneled {i} over {o}, cut inside the funnel header"),
            urule,
            f[..IP6_L4_OFF + 6].to_vec(),
            SFUNNEL_STAT_MALFORMED,
        ));
    }
    cases.extend(truncated_inner_cases());

    // -- payload_len 0 without a Jumbo option.
    let mut g = udp.clone();
    put16(&mut g, IP6_OFF_PAYLOAD_LEN, 0);
    cases.push(pass_case(
        "malformed: payload_len 0 (jumbogram without hop-by-hop)",
        UDP_OVER_TCP,
        g,
        SFUNNEL_STAT_MALFORMED,
    ));
    let mut g = tcp.clone();
    put16(&mut g, IP6_OFF_PAYLOAD_LEN, 0);
    cases.push(pass_case("malformed: tcp, payload_len 0", TCP_OVER_TCP, g, SFUNNEL_STAT_MALFORMED));
    // -- Version ≠ 6 under the IPv6 ethertype.
    for v in [0u8, 4, 7, 15] {
        let mut g = udp.clone();
        g[ETH_HLEN] = (v << 4) | (g[ETH_HLEN] & 0xF);
        cases.push(pass_case(format!("malformed: version {v} under 0x86dd"), UDP_OVER_TCP, g, SFUNNEL_STAT_MALFORMED));
    }
    // -- IPv4 bytes under the IPv6 ethertype.
    let mut v4 = PacketSpec::udp(5555, 4739, &payload(40)).build();
    v4[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    cases.push(pass_case("malformed: an IPv4 packet under 0x86dd", UDP_OVER_TCP, v4, SFUNNEL_STAT_MALFORMED));
    // -- IPv6 bytes under the IPv4 ethertype (an IPv4 rule that would match
    //    the ports; the version is not 4).
    let mut v6 = udp.clone();
    v6[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    cases.push(pass_case(
        "malformed: an IPv6 packet under 0x0800",
        "udp dport 4739 actions funnel tcp sport 1 dport 2",
        v6,
        SFUNNEL_STAT_MALFORMED,
    ));
    // -- UDP length ≠ payload_len.
    let ulen = be16(&udp, IP6_L4_OFF + 4);
    for bad in [ulen + 1, ulen - 1, 0, 8, 0xFFFF] {
        let mut g = udp.clone();
        put16(&mut g, IP6_L4_OFF + 4, bad);
        cases.push(pass_case(
            format!("malformed: UDP length {bad}, payload_len {ulen}"),
            UDP_OVER_TCP,
            g,
            SFUNNEL_STAT_MALFORMED,
        ));
    }
    // payload_len shorter than the datagram the UDP length gives (the rest
    // would be trailer).
    let mut g = udp.clone();
    put16(&mut g, IP6_OFF_PAYLOAD_LEN, ulen - 4);
    cases.push(pass_case("malformed: payload_len 4 less than the UDP length", UDP_OVER_TCP, g, SFUNNEL_STAT_MALFORMED));
    // -- TCP data offset < 5, or beyond payload_len.
    for doff in [0u8, 1, 4] {
        let mut g = tcp.clone();
        g[IP6_L4_OFF + 12] = (doff << 4) | (g[IP6_L4_OFF + 12] & 0xF);
        cases.push(pass_case(format!("malformed: TCP data offset {doff}"), TCP_OVER_TCP, g, SFUNNEL_STAT_MALFORMED));
    }
    let bare = inner_packet(Proto::Tcp, &[]).build(); // 20-byte segment
    for doff in [6u8, 15] {
        let mut g = bare.clone();
        g[IP6_L4_OFF + 12] = doff << 4;
        cases.push(pass_case(
            format!("malformed: TCP data offset {doff} in a 20-byte segment"),
            TCP_OVER_TCP,
            g,
            SFUNNEL_STAT_MALFORMED,
        ));
    }
    // payload_len shorter than a UDP header whose length field agrees with
    // it, the frame going on (the header's last bytes are trailer): the L4
    // header is cut by payload_len.
    // (The parser once checked only UDP length == payload_len, and funneled
    // these, rewriting bytes of the trailer.)
    for short in [1u16, 4, 6, 7] {
        let mut g = udp.clone();
        put16(&mut g, IP6_OFF_PAYLOAD_LEN, short);
        put16(&mut g, IP6_L4_OFF + 4, short);
        cases.push(pass_case(
            format!("malformed: payload_len {short} = UDP length {short}, the frame going on"),
            UDP_OVER_TCP,
            g,
            SFUNNEL_STAT_MALFORMED,
        ));
    }
    let mut g = tcp.clone();
    put16(&mut g, IP6_OFF_PAYLOAD_LEN, 10); // less than the TCP header
    cases.push(pass_case(
        "malformed: payload_len 10 under a 28-byte TCP header",
        TCP_OVER_TCP,
        g,
        SFUNNEL_STAT_MALFORMED,
    ));
    // The outer (funnel) header of an unfunnel candidate, inconsistent.
    let f = expected_funnel6(&udp, Proto::Tcp, 540, 179);
    let mut g = f.clone();
    g[IP6_L4_OFF + 12] = 4 << 4 | 2;
    cases.push(pass_case("malformed: funneled, outer TCP data offset 4", UNFUNNEL_TCP_UDP, g, SFUNNEL_STAT_MALFORMED));
    let f = expected_funnel6(&udp, Proto::Udp, 5000, 6000);
    let mut g = f.clone();
    put16(&mut g, IP6_L4_OFF + 4, be16(&f, IP6_L4_OFF + 4) - 1);
    cases.push(pass_case(
        "malformed: funneled, outer UDP length one short",
        UNFUNNEL_UDP_UDP,
        g,
        SFUNNEL_STAT_MALFORMED,
    ));
}

/// Unfunnel candidates whose inner header does not fit in payload_len: an
/// outer header followed by only `k` bytes of an inner header, sometimes
/// with a trailer after the IP packet (which must not be taken for the
/// rest of the inner header).
fn truncated_inner_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (inner, outer, _, urule, sport, dport) in COMBOS {
        let p = inner_packet(inner, &[]).build();
        let f = expected_funnel6(&p, outer, sport, dport);
        let inner_start = IP6_L4_OFF + outer.funnel_header_len();
        for (k, pad) in [(0, 0), (4, 0), (inner.csum_offset() + 1, 0), (inner.funnel_header_len() - 1, 0), (4, 30)] {
            let mut g = f[..inner_start + k].to_vec();
            fix_outer6(&mut g);
            g.extend(std::iter::repeat_n(0xEE, pad));
            cases.push(pass_case(
                format!(
                    "truncated: unfunnel {} over {}, only {k} bytes of inner header{}",
                    inner.name(),
                    outer.name(),
                    if pad > 0 { format!(", then {pad} bytes of trailer") } else { String::new() }
                ),
                urule,
                g,
                SFUNNEL_STAT_MALFORMED,
            ));
        }
    }
    cases
}

/// Next headers that are neither TCP/UDP nor an extension header.
fn other_next_header_cases(cases: &mut Vec<Case>) {
    let rules = "ip6 udp actions funnel tcp sport 1 dport 2\nip6 tcp actions drop";
    // ICMPv6 echo request with a valid checksum.
    let mut icmp = vec![128, 0, 0, 0, 0x12, 0x34, 0, 1];
    icmp.extend_from_slice(&payload(24));
    let s = common::packet6::DEFAULT_SADDR6;
    let d = common::packet6::DEFAULT_DADDR6;
    let c = pseudo_header6(s, d, 58, icmp.len()).add(&icmp).checksum();
    put16(&mut icmp, 2, c);
    cases.push(pass_case("ICMPv6 echo request (58)", rules, raw6(58, &icmp), SFUNNEL_STAT_NOT_IP_TCP_UDP));
    cases.push(pass_case(
        "no next header (59), payload_len 0",
        rules,
        raw6(NEXTHDR_NONE, &[]),
        SFUNNEL_STAT_NOT_IP_TCP_UDP,
    ));
    cases.push(pass_case(
        "no next header (59), 8 bytes",
        rules,
        raw6(NEXTHDR_NONE, &payload(8)),
        SFUNNEL_STAT_NOT_IP_TCP_UDP,
    ));
    for (nh, what) in [(47u8, "GRE (47)"), (132, "SCTP (132)"), (4, "IPv4 in IPv6 (4)"), (41, "IPv6 in IPv6 (41)")] {
        cases.push(pass_case(what, rules, raw6(nh, &payload(40)), SFUNNEL_STAT_NOT_IP_TCP_UDP));
    }
}

/// IPv4 rules never match IPv6 packets and `ip6` rules never match IPv4
/// packets; in mixed rulesets first match wins within the family.
fn family_cases(cases: &mut Vec<Case>) {
    let udp6 = inner_packet(Proto::Udp, &payload(30)).build();
    let tcp6 = inner_packet(Proto::Tcp, &payload(30)).build();
    let udp4 = PacketSpec::udp(5555, 4739, &payload(30)).build();
    let tcp4 = PacketSpec::tcp(50000, 443, &payload(30)).build();

    for (rules, what) in [
        ("udp dport 4739 actions funnel tcp sport 1 dport 2", "IPv4 funnel rule"),
        ("udp actions drop", "IPv4 wildcard drop rule"),
        ("ip udp actions accept", "`ip` wildcard accept rule"),
        ("ip daddr 0.0.0.0/0 udp actions drop", "IPv4 rule with daddr 0.0.0.0/0"),
        ("ip saddr != 10.0.0.0/8 udp actions drop", "IPv4 rule with a negated saddr"),
    ] {
        cases.push(pass_case(format!("family: IPv6 UDP under an {what}"), rules, udp6.clone(), SFUNNEL_STAT_MISS));
    }
    cases.push(pass_case(
        "family: IPv6 TCP under an IPv4 tcp rule",
        "tcp actions accept",
        tcp6.clone(),
        SFUNNEL_STAT_MISS,
    ));
    cases.push(pass_case(
        "family: funneled IPv6 under an IPv4 unfunnel rule",
        "tcp dport 179 sport 540 actions unfunnel udp",
        expected_funnel6(&udp6, Proto::Tcp, 540, 179),
        SFUNNEL_STAT_MISS,
    ));
    for (rules, what) in [
        (UDP_OVER_TCP, "ip6 funnel rule"),
        ("ip6 udp actions drop", "ip6 wildcard drop rule"),
        ("ip6 saddr ::/0 udp actions drop", "ip6 rule with saddr ::/0"),
        ("ip6 daddr != fd00::/8 udp actions drop", "ip6 rule with a negated daddr"),
        ("ip6 daddr ::ffff:10.0.0.2 udp actions drop", "ip6 rule with the IPv4-mapped daddr"),
        ("daddr ::ffff:10.0.0.2 udp actions drop", "IPv6-address rule (no `ip6`)"),
    ] {
        cases.push(pass_case(format!("family: IPv4 UDP under an {what}"), rules, udp4.clone(), SFUNNEL_STAT_MISS));
    }
    cases.push(pass_case(
        "family: IPv4 TCP under an ip6 tcp rule",
        "ip6 tcp actions accept",
        tcp4.clone(),
        SFUNNEL_STAT_MISS,
    ));
    cases.push(pass_case(
        "family: funneled IPv4 under an ip6 unfunnel rule",
        UNFUNNEL_TCP_UDP,
        expected_funnel(&udp4, Proto::Tcp, 540, 179),
        SFUNNEL_STAT_MISS,
    ));
    // An IPv6 address in a rule without `ip6` makes it IPv6.
    let mapped = inner_packet(Proto::Udp, &payload(30)).with_addrs(a6("2001:db8::1"), a6("::ffff:10.0.0.2")).build();
    for rules in ["daddr ::ffff:10.0.0.2 udp actions drop", "ip6 daddr ::ffff:10.0.0.2 udp actions drop"] {
        cases.push(verdict_case(
            format!("family: `{rules}` drops IPv6 to ::ffff:10.0.0.2"),
            rules,
            mapped.clone(),
            TC_ACT_SHOT,
            0,
        ));
    }

    // Mixed rulesets: the IPv4 twin first, the IPv6 rule second, and the
    // other way round.
    let v4_first =
        "udp dport 4739 actions funnel tcp sport 540 dport 179\nip6 udp dport 4739 actions funnel tcp sport 540 dport 179";
    let v6_first =
        "ip6 udp dport 4739 actions funnel tcp sport 540 dport 179\nudp dport 4739 actions funnel tcp sport 540 dport 179";
    let mut c = funnel_case(
        "mixed, v4 rule first: the IPv6 packet takes rule 1".into(),
        v4_first,
        udp6.clone(),
        Proto::Tcp,
        540,
        179,
    );
    c.rule = Some(1);
    cases.push(c);
    let mut c = funnel_case(
        "mixed, v6 rule first: the IPv6 packet takes rule 0".into(),
        v6_first,
        udp6.clone(),
        Proto::Tcp,
        540,
        179,
    );
    c.rule = Some(0);
    cases.push(c);
    for (rules, rule) in [(v4_first, 0), (v6_first, 1)] {
        let output = expected_funnel(&udp4, Proto::Tcp, 540, 179);
        check_funneled(&output, Proto::Udp).unwrap();
        cases.push(Case {
            name: format!("mixed: the IPv4 packet takes rule {rule}"),
            rules: rules.into(),
            input: udp4.clone(),
            verdict: TC_ACT_OK,
            output,
            rule: Some(rule),
            stat: None,
            refusal_ok: false,
        });
    }
    // Unfunnel in a mixed ruleset.
    let mixed_un = "tcp sport 540 dport 179 actions unfunnel udp\nip6 tcp sport 540 dport 179 actions unfunnel udp";
    let mut c = unfunnel_case(
        "mixed unfunnel: the funneled IPv6 packet takes rule 1".into(),
        mixed_un,
        expected_funnel6(&udp6, Proto::Tcp, 540, 179),
        Proto::Udp,
    );
    c.rule = Some(1);
    cases.push(c);
    let f4 = expected_funnel(&udp4, Proto::Tcp, 540, 179);
    let out4 = expected_unfunnel(&f4, Proto::Udp);
    check_plain(&out4).unwrap();
    cases.push(Case {
        name: "mixed unfunnel: the funneled IPv4 packet takes rule 0".into(),
        rules: mixed_un.into(),
        input: f4,
        verdict: TC_ACT_OK,
        output: out4,
        rule: Some(0),
        stat: None,
        refusal_ok: false,
    });
    // Different actions per family on the same ports.
    let both =
        "udp dport 4739 actions drop\nip6 udp dport 4739 actions accept\nip6 tcp actions drop\ntcp actions accept";
    cases.push(verdict_case("mixed actions: IPv4 UDP dropped by rule 0", both, udp4, TC_ACT_SHOT, 0));
    cases.push(verdict_case("mixed actions: IPv6 UDP accepted by rule 1", both, udp6, TC_ACT_OK, 1));
    cases.push(verdict_case("mixed actions: IPv6 TCP dropped by rule 2", both, tcp6, TC_ACT_SHOT, 2));
    cases.push(verdict_case("mixed actions: IPv4 TCP accepted by rule 3", both, tcp4, TC_ACT_OK, 3));
}

/// Address prefixes: match, no match, negation, /128, /0, nesting.
fn address_cases(cases: &mut Vec<Case>) {
    let udp_from = |s: &str| inner_packet(Proto::Udp, &payload(20)).with_addrs(a6(s), a6("fd00:1::2")).build();
    let udp_to = |d: &str| inner_packet(Proto::Udp, &payload(20)).with_addrs(a6("fd00::1"), a6(d)).build();

    let r = "ip6 saddr 2001:db8::/32 udp dport 4739 actions funnel tcp sport 540 dport 179";
    for s in ["2001:db8::1", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", "2001:db8:5::7"] {
        cases.push(funnel_case(format!("saddr 2001:db8::/32: {s} funneled"), r, udp_from(s), Proto::Tcp, 540, 179));
    }
    for s in ["2001:db9::1", "2001:db7:ffff::1", "fd00::1", "::", "2001:0:db8::1"] {
        cases.push(pass_case(format!("saddr 2001:db8::/32: {s} misses"), r, udp_from(s), SFUNNEL_STAT_MISS));
    }
    // The same prefix on daddr, with the packet's saddr in it: no match.
    let r = "ip6 daddr 2001:db8::/32 udp actions drop";
    cases.push(pass_case("daddr 2001:db8::/32: saddr in it, daddr not", r, udp_from("2001:db8::1"), SFUNNEL_STAT_MISS));
    cases.push(verdict_case("daddr 2001:db8::/32: daddr 2001:db8::2", r, udp_to("2001:db8::2"), TC_ACT_SHOT, 0));

    // Negation.
    let r = "ip6 daddr != fd00::/8 udp actions drop";
    for d in ["2001:db8::2", "fc00::1", "fe00::1", "::1", "ff02::1"] {
        cases.push(verdict_case(format!("daddr != fd00::/8: {d} dropped"), r, udp_to(d), TC_ACT_SHOT, 0));
    }
    for d in ["fd00:1::2", "fd12:3456::1", "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"] {
        cases.push(pass_case(format!("daddr != fd00::/8: {d} misses"), r, udp_to(d), SFUNNEL_STAT_MISS));
    }
    // /128 exact, written with and without the length.
    for r in ["ip6 daddr 2001:db8::1/128 udp actions accept", "ip6 daddr 2001:db8::1 udp actions accept"] {
        cases.push(verdict_case(format!("`{r}`: 2001:db8::1 accepted"), r, udp_to("2001:db8::1"), TC_ACT_OK, 0));
        for d in ["2001:db8::", "2001:db8::2", "2001:db8::1:1", "2001:db8:0:0:1::1", "3001:db8::1"] {
            cases.push(pass_case(format!("`{r}`: {d} misses"), r, udp_to(d), SFUNNEL_STAT_MISS));
        }
    }
    // /128 at both ends of the address space.
    let r =
        "ip6 saddr ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128 udp actions drop\nip6 saddr ::/128 udp actions accept";
    cases.push(verdict_case(
        "saddr all-ones /128",
        r,
        udp_from("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
        TC_ACT_SHOT,
        0,
    ));
    cases.push(verdict_case("saddr :: /128", r, udp_from("::"), TC_ACT_OK, 1));
    cases.push(pass_case("saddr ::1 under :: /128", r, udp_from("::1"), SFUNNEL_STAT_MISS));
    cases.push(pass_case(
        "saddr ffff:..:fffe under all-ones /128",
        r,
        udp_from("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"),
        SFUNNEL_STAT_MISS,
    ));
    // /0 matches every IPv6 address.
    let r = "ip6 saddr ::/0 udp actions drop";
    for s in ["::", "2001:db8::1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "fe80::1"] {
        cases.push(verdict_case(format!("saddr ::/0: {s} dropped"), r, udp_from(s), TC_ACT_SHOT, 0));
    }
    // Prefixes not on a byte boundary.
    let r = "ip6 daddr 2001:db8:8000::/33 udp actions accept\nip6 daddr 2000::/3 udp actions drop";
    cases.push(verdict_case("daddr /33: 2001:db8:8000::1 accepted", r, udp_to("2001:db8:8000::1"), TC_ACT_OK, 0));
    cases.push(verdict_case("daddr /33: 2001:db8:ffff::1 accepted", r, udp_to("2001:db8:ffff::1"), TC_ACT_OK, 0));
    cases.push(verdict_case(
        "daddr /3: 2001:db8:7fff::1 dropped by rule 1",
        r,
        udp_to("2001:db8:7fff::1"),
        TC_ACT_SHOT,
        1,
    ));
    cases.push(verdict_case("daddr /3: 3fff::1 dropped by rule 1", r, udp_to("3fff::1"), TC_ACT_SHOT, 1));
    cases.push(pass_case("daddr /3: 4000::1 misses", r, udp_to("4000::1"), SFUNNEL_STAT_MISS));
    cases.push(pass_case("daddr /3: 1fff::1 misses", r, udp_to("1fff::1"), SFUNNEL_STAT_MISS));
    // Nested prefixes: first match wins, whichever is more specific.
    let narrow_first = "ip6 saddr 2001:db8:1::/48 udp actions accept\nip6 saddr 2001:db8::/32 udp actions drop";
    cases.push(verdict_case(
        "nested, /48 first: 2001:db8:1::5 → rule 0",
        narrow_first,
        udp_from("2001:db8:1::5"),
        TC_ACT_OK,
        0,
    ));
    cases.push(verdict_case(
        "nested, /48 first: 2001:db8:2::5 → rule 1",
        narrow_first,
        udp_from("2001:db8:2::5"),
        TC_ACT_SHOT,
        1,
    ));
    let wide_first = "ip6 saddr 2001:db8::/32 udp actions drop\nip6 saddr 2001:db8:1::/48 udp actions accept";
    cases.push(verdict_case(
        "nested, /32 first: 2001:db8:1::5 → rule 0",
        wide_first,
        udp_from("2001:db8:1::5"),
        TC_ACT_SHOT,
        0,
    ));
    // saddr, daddr and ports together, negation on one.
    let r = "ip6 saddr 2001:db8::/32 daddr != 2001:db8:99::/48 udp sport 5555 dport 4739 actions funnel udp sport 5000 dport 6000";
    let p = inner_packet(Proto::Udp, &payload(20)).with_addrs(a6("2001:db8::1"), a6("2001:db8:98::1")).build();
    cases.push(funnel_case("saddr + daddr != + ports: all hold".into(), r, p, Proto::Udp, 5000, 6000));
    let p = inner_packet(Proto::Udp, &payload(20)).with_addrs(a6("2001:db8::1"), a6("2001:db8:99::1")).build();
    cases.push(pass_case("saddr + daddr != + ports: daddr in the negated prefix", r, p, SFUNNEL_STAT_MISS));
    // An IPv4 and an IPv6 prefix side by side whose first octets agree.
    let r = "saddr 32.1.0.0/16 udp actions drop\nip6 saddr 2001::/16 udp actions accept";
    cases.push(verdict_case(
        "v4 32.1.0.0/16 and v6 2001::/16: IPv6 from 2001:db8::1",
        r,
        udp_from("2001:db8::1"),
        TC_ACT_OK,
        1,
    ));
    let v4 = PacketSpec::udp(5555, 4739, &payload(20)).with_addrs([32, 1, 2, 3], [10, 0, 0, 2]).build();
    cases.push(verdict_case("v4 32.1.0.0/16 and v6 2001::/16: IPv4 from 32.1.2.3", r, v4, TC_ACT_SHOT, 0));
    let v4 = PacketSpec::udp(5555, 4739, &payload(20)).with_addrs([32, 2, 2, 3], [10, 0, 0, 2]).build();
    cases.push(pass_case("v4 32.1.0.0/16 and v6 2001::/16: IPv4 from 32.2.2.3", r, v4, SFUNNEL_STAT_MISS));
    cases.push(pass_case(
        "v4 32.1.0.0/16 and v6 2001::/16: IPv6 from 2002::1",
        r,
        udp_from("2002::1"),
        SFUNNEL_STAT_MISS,
    ));
}

/// accept, drop, miss by port or protocol, empty ruleset.
fn verdict_cases(cases: &mut Vec<Case>) {
    let https = Packet6Spec::tcp(40000, 443, &payload(100)).build();
    let accept = "ip6 saddr fd00::1 tcp dport 443 actions accept";
    cases.push(verdict_case("accept", accept, https.clone(), TC_ACT_OK, 0));
    let other_src = Packet6Spec::tcp(40000, 443, &payload(100)).with_addrs(a6("fd00::2"), a6("fd00:1::2")).build();
    cases.push(pass_case("miss: accept rule, other saddr", accept, other_src, SFUNNEL_STAT_MISS));
    let dns = Packet6Spec::udp(33333, 53, &payload(30)).build();
    let drop = "ip6 udp dport 53 actions drop";
    cases.push(verdict_case("drop", drop, dns.clone(), TC_ACT_SHOT, 0));
    cases.push(pass_case(
        "miss: drop rule, dport 54",
        drop,
        Packet6Spec::udp(33333, 54, &payload(30)).build(),
        SFUNNEL_STAT_MISS,
    ));
    cases.push(pass_case(
        "miss: tcp rule, udp packet",
        "ip6 tcp dport 53 actions drop",
        dns.clone(),
        SFUNNEL_STAT_MISS,
    ));
    cases.push(pass_case("miss: empty ruleset", "", dns.clone(), SFUNNEL_STAT_MISS));
    let two = "ip6 udp dport 53 actions accept\nip6 udp actions drop";
    cases.push(verdict_case("first match wins (rule 0 of 2)", two, dns.clone(), TC_ACT_OK, 0));
    let dns54 = Packet6Spec::udp(33333, 54, &payload(30)).build();
    cases.push(verdict_case("first match wins (falls to rule 1)", two, dns54, TC_ACT_SHOT, 1));
    let mut fc = funnel_case("funnel by the second rule".into(), "", dns, Proto::Tcp, 540, 179);
    fc.rules = "ip6 udp sport 1 actions drop; ip6 udp dport 53 actions funnel tcp sport 540 dport 179".into();
    fc.rule = Some(1);
    cases.push(fc);
}

/// The `funneled` match and `unfunnel auto` on IPv6.
fn funneled_cases(cases: &mut Vec<Case>) {
    // Funneled packets whose addresses and funnel source port a NAT rewrote.
    for (inner, outer, _, _, fs, fd) in COMBOS {
        let f = expected_funnel6(&inner_packet(inner, &payload(57)).build(), outer, fs, fd);
        let (o, i) = (outer.name(), inner.name());
        for sport in [fs, 1, 40000] {
            let n = nat_rewrite6(&f, a6("2001:db8::9"), a6("fd00:99::2"), sport, fd);
            let what = format!("{i} over {o}, funnel sport {fs} rewritten to {sport}");
            for (rules, act) in [
                (format!("ip6 {o} dport {fd} funneled actions unfunnel {i}"), i),
                (format!("ip6 {o} dport {fd} funneled actions unfunnel auto"), "auto"),
                (format!("ip6 {o} funneled actions unfunnel auto"), "auto (no ports)"),
            ] {
                cases.push(unfunnel_case(format!("funneled + unfunnel {act}: {what}"), &rules, n.clone(), inner));
            }
        }
        // The IPv4 `funneled` rule does not see it.
        cases.push(pass_case(
            format!("funneled: {i} over {o} under an IPv4 `funneled` rule"),
            &format!("{o} funneled actions unfunnel auto"),
            f,
            SFUNNEL_STAT_MISS,
        ));
    }
    // Ordinary packets to the ports of `funneled` rules: not funneled.
    let syn = {
        let mut s = Packet6Spec::tcp(540, 179, b"");
        if let L4::Tcp { flags, options, .. } = &mut s.l4 {
            *flags = 0x02;
            *options = vec![2, 4, 5, 0xa0];
        }
        s.build()
    };
    cases.push(pass_case(
        "funneled: an ordinary IPv6 SYN to port 179 is not funneled",
        "ip6 tcp dport 179 funneled actions unfunnel udp",
        syn.clone(),
        SFUNNEL_STAT_MISS,
    ));
    cases.push(verdict_case(
        "funneled: an ordinary IPv6 SYN skips the funneled rule and takes the next one",
        "ip6 tcp dport 179 funneled actions unfunnel udp\nip6 tcp dport 179 actions accept",
        syn,
        TC_ACT_OK,
        1,
    ));
    let dgram = Packet6Spec::udp(5000, 6000, &payload(40)).build();
    cases.push(pass_case(
        "funneled: an ordinary IPv6 datagram to UDP 6000 is not funneled",
        "ip6 udp dport 6000 funneled actions unfunnel auto",
        dgram.clone(),
        SFUNNEL_STAT_MISS,
    ));
    cases.push(pass_case(
        "unfunnel auto: an ordinary IPv6 datagram fits neither inner protocol",
        "ip6 udp dport 6000 actions unfunnel auto",
        dgram,
        SFUNNEL_STAT_UNDECIDED,
    ));
}

/// Funneling that would take payload_len past 65535 (SFUNNEL_STAT_TOO_BIG)
/// needs a frame of 65,5xx bytes, which PROG_TEST_RUN refuses (skb test
/// frames must fit a page).  Returns what happened, for the summary; if a
/// kernel ever runs it, the packet must not be funneled (TOO_BIG, or the MTU
/// guard first: the test device is loopback, MTU 65536).
fn too_big_probe(prog: &Prog) -> Result<String, String> {
    let p = inner_packet(Proto::Udp, &vec![0x5A; 65_520]).with_csum(L4Csum::None).build();
    assert_eq!(be16(&p, IP6_OFF_PAYLOAD_LEN), 65_528);
    prog.install(UDP_OVER_TCP).map_err(|e| format!("install: {e:#}"))?;
    let before = prog.maps.stats().map_err(|e| e.to_string())?;
    match prog.run(&p) {
        Err(e) => Ok(format!(
            "TOO_BIG not testable: PROG_TEST_RUN refused the {}-byte frame (payload_len 65528 + 20 > 65535): {e:#}",
            p.len()
        )),
        Ok((v, out)) => {
            let after = prog.maps.stats().map_err(|e| e.to_string())?;
            let moved = |s: u32| after[s as usize] - before[s as usize];
            let (too_big, over_mtu) = (moved(SFUNNEL_STAT_TOO_BIG), moved(SFUNNEL_STAT_OVER_MTU));
            if v == TC_ACT_OK || (v == TC_ACT_UNSPEC && out != p) || too_big + over_mtu != 1 {
                return Err(format!(
                    "a packet with payload_len 65528 under a TCP funnel: verdict {v}, {} bytes out, \
                     TOO_BIG +{too_big}, OVER_MTU +{over_mtu}",
                    out.len()
                ));
            }
            Ok(format!("TOO_BIG probe: verdict {v}, TOO_BIG +{too_big}, OVER_MTU +{over_mtu}"))
        }
    }
}

#[test]
fn table_driven_cases6() {
    if !require_root("table_driven_cases6") {
        return;
    }
    let prog = Prog::load().expect("load");
    let cases = build_cases();
    let (mut failed, refused) = run_all(&prog, &cases, diff6);
    match too_big_probe(&prog) {
        Ok(note) => println!("table-driven (IPv6): {note}"),
        Err(e) => failed.push(format!("FAIL: TOO_BIG probe: {e}")),
    }
    println!(
        "table-driven (IPv6): {} cases, {} failed; {refused} short frames refused by PROG_TEST_RUN (allowed)",
        cases.len(),
        failed.len()
    );
    for f in &failed {
        eprintln!("{f}\n");
    }
    assert!(failed.is_empty(), "{} of {} IPv6 table-driven cases failed (see stderr)", failed.len(), cases.len());
}

// ===========================================================================
// 2. Properties over random valid packets
// ===========================================================================

/// A random IPv6 address: mostly uniform, sometimes mostly zeros or mostly
/// ones (carries in the checksum sums), sometimes IPv4-mapped.
fn random_addr6(rng: &mut Rng) -> [u8; 16] {
    let mut a: [u8; 16] = rng.bytes(16).try_into().unwrap();
    match rng.below(8) {
        0 => a[..12].fill(0),
        1 => a[..14].fill(0xFF),
        2 => {
            a[..10].fill(0);
            a[10..12].fill(0xFF);
        }
        _ => {}
    }
    a
}

/// A random valid IPv6 packet of protocol `proto` (no extension headers):
/// random MACs, addresses, traffic class, flow label, hop limit, ports, TCP
/// fields and options, a payload of 0–1500 bytes, correct checksums.  About
/// one UDP datagram in eight carries checksum 0.
fn random_packet6(rng: &mut Rng, proto: Proto) -> Packet6Spec {
    let payload_len = if rng.one_in(8) { rng.below(8) } else { rng.range(0, 1500) };
    let payload = rng.bytes(payload_len);
    let (sport, dport) = (rng.u16(), rng.u16());
    let mut p = match proto {
        Proto::Tcp => Packet6Spec::tcp(sport, dport, &payload),
        Proto::Udp => Packet6Spec::udp(sport, dport, &payload),
    };
    randomize_tcp(rng, &mut p.l4);
    p.src_mac = rng.bytes(6).try_into().unwrap();
    p.dst_mac = rng.bytes(6).try_into().unwrap();
    p.saddr = random_addr6(rng);
    p.daddr = random_addr6(rng);
    p.traffic_class = rng.u8();
    p.flow_label = rng.u32() & 0xF_FFFF;
    p.hop_limit = rng.u8();
    if proto == Proto::Udp && rng.one_in(8) {
        p.csum = L4Csum::None;
    }
    p
}

#[test]
fn property_random_packets6() {
    if !require_root("property_random_packets6") {
        return;
    }
    let seed = Rng::seed_from_env(DEFAULT_SEED);
    let total = env_usize("SFUNNEL_PROP_CASES", 10_240);
    let per_combo = total.div_ceil(4);
    let mut rng = Rng::new(seed);
    let funneler = Prog::load().expect("load");
    let unfunneler = Prog::load().expect("load");
    let start = Instant::now();
    let mut run = 0usize;
    let mut zero = 0usize;
    let mut failures: Vec<String> = Vec::new();
    let mut nfail = 0usize;
    let mut counter_errors = Vec::new();

    for inner in Proto::ALL {
        for outer in Proto::ALL {
            // Funnel ports, and the ports the NAT rewrites them to.
            let (fs, fd) = (rng.u16().max(1), rng.u16().max(1));
            let (ns, nd) = loop {
                let p = (rng.u16().max(1), rng.u16().max(1));
                if p != (fs, fd) {
                    break p;
                }
            };
            let (i, o) = (inner.name(), outer.name());
            // Dual-stack rulesets: rule 0, the IPv4 twin, must never move.
            funneler
                .install(&format!(
                    "{i} actions funnel {o} sport {fs} dport {fd}\nip6 {i} actions funnel {o} sport {fs} dport {fd}"
                ))
                .unwrap();
            unfunneler
                .install(&format!(
                    "{o} actions unfunnel {i}\n\
                     ip6 {o} sport {fs} dport {fd} actions unfunnel {i}\n\
                     ip6 {o} sport {ns} dport {nd} actions unfunnel {i}"
                ))
                .unwrap();

            for k in 0..per_combo {
                let spec = random_packet6(&mut rng, inner);
                zero += usize::from(spec.csum == L4Csum::None);
                let (nsaddr, ndaddr) = (random_addr6(&mut rng), random_addr6(&mut rng));
                run += 1;
                if let Err(e) =
                    property_case(&funneler, &unfunneler, &spec, outer, (fs, fd), (ns, nd), (nsaddr, ndaddr))
                {
                    nfail += 1;
                    if failures.len() < 5 {
                        failures.push(format!(
                            "FAIL {i} over {o}, case {k} (seed {seed}): {e}\n  packet: {}",
                            hex(&spec.build())
                        ));
                    }
                }
            }
            // Each packet went through each rule of its family once (fewer
            // if a case failed early); the IPv4 twins never.
            let fc = funneler.maps.rule_counters().unwrap();
            let uc = unfunneler.maps.rule_counters().unwrap();
            let got = [fc[0].packets, fc[1].packets, uc[0].packets, uc[1].packets, uc[2].packets];
            let per = per_combo as u64;
            if got != [0, per, 0, per, per] {
                counter_errors.push(format!(
                    "{i} over {o}: rule counters [funnel v4, funnel v6, unfunnel v4, unfunnel v6, unfunnel v6 \
                     after NAT] = {got:?}, expected [0, {per}, 0, {per}, {per}]"
                ));
            }
        }
    }
    println!(
        "property (IPv6): {run} random packets ({zero} UDP with checksum 0; seed {seed}), 3 runs each, \
         {nfail} failed, {:.1?}",
        start.elapsed()
    );
    for f in &failures {
        eprintln!("{f}\n");
    }
    for e in &counter_errors {
        eprintln!("{e}");
    }
    assert_eq!(nfail, 0, "{nfail} of {run} random IPv6 packets failed (see stderr)");
    assert!(counter_errors.is_empty(), "rule counters (see stderr)");
}

fn property_case(
    funneler: &Prog,
    unfunneler: &Prog,
    spec: &Packet6Spec,
    outer: Proto,
    (fs, fd): (u16, u16),
    (ns, nd): (u16, u16),
    (nsaddr, ndaddr): ([u8; 16], [u8; 16]),
) -> Result<(), String> {
    let inner = spec.proto();
    let p = spec.build();
    check_plain6_zero_ok(&p).map_err(|e| format!("oracle built an invalid packet: {e}"))?;
    if spec.csum != L4Csum::None {
        check_plain6(&p).map_err(|e| format!("oracle built an invalid packet: {e}"))?;
    }

    // Funnel: the spec's bytes, every checksum valid.
    let (v, f) = funneler.run(&p).map_err(|e| format!("funnel test_run: {e:#}"))?;
    if v != TC_ACT_OK {
        return Err(format!("funnel verdict {v}"));
    }
    let want = expected_funnel6(&p, outer, fs, fd);
    if f != want {
        return Err(format!("funnel output != spec:\n{}", diff6(&want, &f)));
    }
    check_funneled6(&f, inner).map_err(|e| format!("funneled: {e}"))?;

    // Unfunnel gives the original back, byte for byte.
    let (v, u) = unfunneler.run(&f).map_err(|e| format!("unfunnel test_run: {e:#}"))?;
    if v != TC_ACT_OK {
        return Err(format!("unfunnel verdict {v}"));
    }
    if u != p {
        return Err(format!("unfunnel(funnel(p)) != p:\n{}", diff6(&p, &u)));
    }

    // A NAT in the middle rewrites addresses and outer ports.
    let n = nat_rewrite6(&f, nsaddr, ndaddr, ns, nd);
    check_funneled6(&n, inner).map_err(|e| format!("after NAT: {e}"))?;
    let (v, u2) = unfunneler.run(&n).map_err(|e| format!("unfunnel after NAT test_run: {e:#}"))?;
    if v != TC_ACT_OK {
        return Err(format!("unfunnel after NAT verdict {v}"));
    }
    let want = spec.clone().with_addrs(nsaddr, ndaddr).build();
    if u2 != want {
        return Err(format!("unfunnel(NAT(funnel(p))) != p with the new addresses:\n{}", diff6(&want, &u2)));
    }
    // Strict unless the original datagram had no checksum (which stays 0).
    if spec.csum == L4Csum::None { check_plain6_zero_ok(&u2) } else { check_plain6(&u2) }
        .map_err(|e| format!("unfunneled after NAT: {e}"))
}

// ===========================================================================
// 3. Robustness: every prefix of valid frames
// ===========================================================================

const FUNNEL_ANY: &str = "ip6 tcp actions funnel udp sport 1 dport 2\nip6 udp actions funnel tcp sport 1 dport 2";
const UNFUNNEL_ANY: &str = "ip6 tcp actions unfunnel udp\nip6 udp actions unfunnel tcp";

/// The valid frames whose prefixes are tried, each with its ruleset.
fn robustness_frames() -> Vec<(String, Mode, Vec<u8>)> {
    let x = a6("2001:db8::99");
    let mut frames = Vec::new();
    let mut tcp_opts = inner_packet(Proto::Tcp, &payload(1001));
    if let L4::Tcp { options, .. } = &mut tcp_opts.l4 {
        *options = vec![2, 4, 5, 0xb4, 1, 1, 4, 2];
    }
    let plain: Vec<(&str, Packet6Spec)> = vec![
        ("tcp with options, payload 1001", tcp_opts),
        ("udp, payload 300", inner_packet(Proto::Udp, &payload(300))),
        ("udp, payload 3", inner_packet(Proto::Udp, &payload(3))),
        ("udp, payload 0", inner_packet(Proto::Udp, &[])),
        ("tcp, payload 0", inner_packet(Proto::Tcp, &[])),
        ("tcp, payload 17", inner_packet(Proto::Tcp, &payload(17))),
        ("udp (checksum 0), payload 9", inner_packet(Proto::Udp, &payload(9)).with_csum(L4Csum::None)),
        ("udp, payload 20, 6-byte trailer", inner_packet(Proto::Udp, &payload(20)).with_trailer(&[0; 6])),
        ("tcp, payload 5, 3-byte trailer", inner_packet(Proto::Tcp, &payload(5)).with_trailer(&[0xEE; 3])),
    ];
    let exts: Vec<(&str, Vec<ExtHeader>)> = vec![
        ("hop-by-hop", vec![ExtHeader::router_alert()]),
        ("routing type 0", vec![ExtHeader::routing0(x)]),
        ("SRH", vec![ExtHeader::srh(common::packet6::DEFAULT_DADDR6)]),
        ("destination options", vec![ExtHeader::dest_opts_with(5)]),
        ("first fragment", vec![ExtHeader::fragment(0, true, 1)]),
        ("later fragment", vec![ExtHeader::fragment(185, false, 2)]),
        ("experimental 253", vec![ExtHeader::Other { number: NEXTHDR_EXP1, data: vec![7; 5] }]),
        (
            "hop-by-hop, dest opts, routing, fragment",
            vec![
                ExtHeader::hop_by_hop(),
                ExtHeader::dest_opts(),
                ExtHeader::routing0(x),
                ExtHeader::fragment(0, true, 3),
            ],
        ),
    ];
    for (what, spec) in &plain {
        frames.push((format!("plain {what}"), Mode::Funnel, spec.build()));
    }
    for (k, (what, chain)) in exts.iter().enumerate() {
        let mut spec = inner_packet(Proto::ALL[k % 2], &payload(30 + k));
        for e in chain {
            spec = spec.with_ext(e.clone());
        }
        frames.push((format!("{} behind {what}", spec.proto().name()), Mode::Funnel, spec.build()));
    }
    // Funneled frames, as the wildcard funnel rules make them (outer = the
    // other protocol), some behind an extension header.
    for (what, spec) in &plain {
        let p = spec.build();
        let inner = spec.proto();
        let f = expected_funnel6(&p, inner.other(), 1, 2);
        frames.push((format!("funneled {what}"), Mode::Unfunnel, f));
    }
    for inner in Proto::ALL {
        let f = expected_funnel6(&inner_packet(inner, &payload(44)).build(), inner.other(), 1, 2);
        for (what, e) in [("hop-by-hop", ExtHeader::hop_by_hop()), ("fragment", ExtHeader::fragment(0, true, 9))] {
            frames.push((format!("funneled {} behind {what}", inner.name()), Mode::Unfunnel, with_first_ext(&f, &e)));
        }
    }
    frames
}

/// Outcomes of the prefix runs that went as specified.
#[derive(Default, Debug)]
struct Tally {
    /// Refused by PROG_TEST_RUN (shorter than 14 bytes, or than 54).
    refused: usize,
    /// Passed unchanged (-1).
    passed: usize,
    /// Funneled or unfunneled as the spec says (the whole IP packet).
    handled: usize,
}

/// What a prefix of `frame` must give, or an error message.
fn check_prefix(prog: &Prog, frame: &[u8], cut: usize, mode: Mode, tally: &mut Tally) -> Result<(), String> {
    let prefix = &frame[..cut];
    let res = prog.run(prefix);
    if cut < ETH_HLEN {
        // PROG_TEST_RUN itself refuses frames shorter than ETH_HLEN.
        return match res {
            Err(_) => {
                tally.refused += 1;
                Ok(())
            }
            Ok((v, _)) => Err(format!("a {cut}-byte frame gave verdict {v}; expected EINVAL")),
        };
    }
    if cut < IP6_L4_OFF {
        // Refused by kernels with the test_run fix for short IP headers;
        // older ones run it, and it must pass unchanged.
        return match res {
            Err(_) => {
                tally.refused += 1;
                Ok(())
            }
            Ok((TC_ACT_UNSPEC, out)) if out == prefix => {
                tally.passed += 1;
                Ok(())
            }
            Ok((v, out)) => Err(format!("verdict {v}; expected EINVAL or -1 unchanged\n{}", diff6(prefix, &out))),
        };
    }
    let (v, out) = res.map_err(|e| format!("test_run: {e:#}"))?;
    let end = IP6_L4_OFF + usize::from(be16(frame, IP6_OFF_PAYLOAD_LEN));
    if cut < end || !funnelable6(frame) {
        // Truncated, or not ours (extension headers).
        if v != TC_ACT_UNSPEC || out != prefix {
            return Err(format!("verdict {v}, expected -1 unchanged\n{}", diff6(prefix, &out)));
        }
        tally.passed += 1;
        return Ok(());
    }
    // The whole IP packet, with all or part of any trailer.
    let l4 = Proto::from_number(frame[IP6_OFF_NEXT_HEADER]).unwrap();
    let want = match mode {
        Mode::Funnel => expected_funnel6(prefix, l4.other(), 1, 2),
        Mode::Unfunnel => expected_unfunnel6(prefix, l4.other()),
    };
    if v != TC_ACT_OK || out != want {
        return Err(format!("whole packet: verdict {v}, expected 0 and the spec's bytes\n{}", diff6(&want, &out)));
    }
    tally.handled += 1;
    Ok(())
}

#[test]
fn robustness_prefixes6() {
    if !require_root("robustness_prefixes6") {
        return;
    }
    let funnel = Prog::with_rules(FUNNEL_ANY).expect("load");
    let unfunnel = Prog::with_rules(UNFUNNEL_ANY).expect("load");
    let start = Instant::now();
    let frames = robustness_frames();
    let max_failures = env_usize("SFUNNEL_MAX_FAILURES", 8);
    let (mut runs, mut nfail) = (0usize, 0usize);
    let mut failures = Vec::new();
    let mut tally = Tally::default();
    for (what, mode, frame) in &frames {
        let prog = match mode {
            Mode::Funnel => &funnel,
            Mode::Unfunnel => &unfunnel,
        };
        for cut in 0..=frame.len() {
            runs += 1;
            if let Err(e) = check_prefix(prog, frame, cut, *mode, &mut tally) {
                nfail += 1;
                if failures.len() < max_failures {
                    failures.push(format!(
                        "FAIL {what}, prefix {cut}/{} ({mode:?}): {e}\n  frame: {}",
                        frame.len(),
                        hex(&frame[..cut])
                    ));
                }
            }
        }
    }
    println!(
        "robustness (IPv6): {runs} prefixes of {} valid frames (funnel and unfunnel rules): {} refused by \
         PROG_TEST_RUN (short), {} passed unchanged, {} handled per spec; {nfail} failures, {:.1?}",
        frames.len(),
        tally.refused,
        tally.passed,
        tally.handled,
        start.elapsed()
    );
    for f in &failures {
        eprintln!("{f}\n");
    }
    assert_eq!(nfail, 0, "{nfail} robustness failures (see stderr)");
    // Each funnelable frame is handled whole, once per trailer byte more.
    let whole: usize =
        frames.iter().filter(|(_, _, f)| funnelable6(f)).map(|(_, _, f)| 1 + f.len() - Ip6::of(f).end()).sum();
    assert_eq!(tally.handled, whole, "whole packets handled");
}

// ===========================================================================
// 4. Robustness: random mutations of valid frames
// ===========================================================================

/// What the specification says about an arbitrary frame under the wildcard
/// `ip6` rulesets.
#[derive(Debug)]
enum Expect {
    /// PROG_TEST_RUN refuses frames shorter than ETH_HLEN (EINVAL).
    RunError,
    /// An IPv6 (IPv4) ethertype frame without a whole 40 (20)-byte header:
    /// refused by kernels with the test_run fix, else -1 unchanged.
    RunErrorOrPass,
    /// -1, unchanged, for this reason.
    Pass(&'static str),
    /// The action applies: the spec's bytes, except the L4 checksum fields
    /// listed (a mutated segment carries an invalid checksum, whose
    /// "adjusted" value the spec does not pin down).
    Handled { output: Vec<u8>, masked: Vec<usize> },
    /// Self-consistent enough that the datapath may unfunnel it or pass
    /// it: -1 unchanged, or 0 with the spec's bytes (masked as above).
    Either { reason: &'static str, output: Vec<u8>, masked: Vec<usize> },
}

/// Why the L4 header at the start of `s` (the rest of the IP packet, the
/// frame going on for `room` bytes from its start) is cut or inconsistent.
fn l4_problem(p: Proto, s: &[u8], room: usize) -> Option<&'static str> {
    match p {
        Proto::Tcp if room < 20 => Some("TCP header cut by the frame"),
        Proto::Udp if room < 8 => Some("UDP header cut by the frame"),
        Proto::Tcp if s.len() < 20 => Some("TCP header cut by payload_len"),
        Proto::Udp if s.len() < 8 => Some("UDP header cut by payload_len"),
        Proto::Tcp if s[12] >> 4 < 5 => Some("TCP data offset < 5"),
        Proto::Tcp if usize::from(s[12] >> 4) * 4 > s.len() => Some("TCP data offset beyond payload_len"),
        Proto::Udp if usize::from(be16(s, 4)) != s.len() => Some("UDP length != payload_len"),
        _ => None,
    }
}

fn classify6(frame: &[u8], mode: Mode) -> Expect {
    if frame.len() < ETH_HLEN {
        return Expect::RunError;
    }
    let ethertype = be16(frame, 12);
    if (ethertype == ETH_P_IPV6 && frame.len() < IP6_L4_OFF) || (ethertype == ETH_P_IP && frame.len() < ETH_HLEN + 20) {
        return Expect::RunErrorOrPass;
    }
    if ethertype != ETH_P_IPV6 {
        return Expect::Pass("not IPv6 (no IPv4 rules)");
    }
    if frame[ETH_HLEN] >> 4 != 6 {
        return Expect::Pass("version != 6");
    }
    let nh = frame[IP6_OFF_NEXT_HEADER];
    let Some(outer) = Proto::from_number(nh) else {
        return Expect::Pass(if is_ext_header(nh) || nh == NEXTHDR_ESP { "extension header" } else { "not TCP/UDP" });
    };
    let plen = usize::from(be16(frame, IP6_OFF_PAYLOAD_LEN));
    if plen == 0 {
        return Expect::Pass("payload_len 0");
    }
    let end = IP6_L4_OFF + plen;
    if end > frame.len() {
        return Expect::Pass("truncated");
    }
    let seg = &frame[IP6_L4_OFF..end];
    if let Some(reason) = l4_problem(outer, seg, frame.len() - IP6_L4_OFF) {
        return Expect::Pass(reason);
    }
    let ip = Ip6::of(frame);
    let csum_ok = |seg: &[u8], s: [u8; 16], d: [u8; 16], p: Proto| check_l4_6_zero_ok(seg, s, d, p).is_ok();
    match mode {
        Mode::Funnel => {
            let fp = outer.other();
            let output = expected_funnel6(frame, fp, 1, 2);
            let masked = if csum_ok(seg, ip.saddr, ip.daddr, outer) {
                Vec::new()
            } else {
                vec![IP6_L4_OFF + fp.csum_offset(), IP6_L4_OFF + fp.funnel_header_len() + outer.csum_offset()]
            };
            Expect::Handled { output, masked }
        }
        Mode::Unfunnel => {
            let inner = outer.other();
            let h = l4_header_len(outer, seg);
            let rest = &seg[h..];
            if rest.len() < inner.funnel_header_len() {
                return Expect::Pass("inner header cut by payload_len");
            }
            let output = expected_unfunnel6(frame, inner);
            let inner_zero = inner == Proto::Udp && be16(rest, 6) == 0;
            let masked = if inner_zero || csum_ok(rest, [0; 16], [0; 16], inner) {
                Vec::new()
            } else {
                vec![IP6_L4_OFF + inner.csum_offset()]
            };
            match l4_problem(inner, rest, rest.len()) {
                Some(_) => Expect::Either { reason: "inner header inconsistent", output, masked },
                None => Expect::Handled { output, masked },
            }
        }
    }
}

/// Compares an action's output with the spec's, the listed fields masked.
fn compare_masked(mut want: Vec<u8>, masked: &[usize], mut out: Vec<u8>) -> Result<(), String> {
    if out.len() == want.len() {
        for &m in masked {
            out[m..m + 2].fill(0);
            want[m..m + 2].fill(0);
        }
    }
    if out != want {
        return Err(format!("output differs from the spec (masked: {masked:?}):\n{}", diff6(&want, &out)));
    }
    Ok(())
}

#[derive(Default, Debug)]
struct RandomTally {
    refused: usize,
    pass: std::collections::BTreeMap<&'static str, usize>,
    handled: usize,
    handled_exact: usize,
    /// Ambiguous inputs: (passed unchanged, handled).
    either: (usize, usize),
}

fn check_random(prog: &Prog, frame: &[u8], mode: Mode, t: &mut RandomTally) -> Result<(), String> {
    let expect = classify6(frame, mode);
    let res = prog.run(frame);
    match (expect, res) {
        (Expect::RunError | Expect::RunErrorOrPass, Err(_)) => {
            t.refused += 1;
            Ok(())
        }
        (Expect::RunError, Ok((v, _))) => Err(format!("expected EINVAL for {} bytes, got verdict {v}", frame.len())),
        (_, Err(e)) => Err(format!("test_run failed: {e:#}")),
        (Expect::RunErrorOrPass, Ok((v, out))) => {
            if v != TC_ACT_UNSPEC || out != frame {
                return Err(format!(
                    "short frame: verdict {v}, expected EINVAL or -1 unchanged\n{}",
                    diff6(frame, &out)
                ));
            }
            *t.pass.entry("short (ran)").or_default() += 1;
            Ok(())
        }
        (Expect::Pass(reason), Ok((v, out))) => {
            if v != TC_ACT_UNSPEC || out != frame {
                return Err(format!("({reason}) expected -1 unchanged, got verdict {v}\n{}", diff6(frame, &out)));
            }
            *t.pass.entry(reason).or_default() += 1;
            Ok(())
        }
        (Expect::Handled { output, masked }, Ok((v, out))) => {
            if v != TC_ACT_OK {
                return Err(format!("expected the action (verdict 0), got verdict {v}"));
            }
            t.handled_exact += usize::from(masked.is_empty());
            compare_masked(output, &masked, out)?;
            t.handled += 1;
            Ok(())
        }
        (Expect::Either { reason, output, masked }, Ok((v, out))) => {
            if v == TC_ACT_UNSPEC && out == frame {
                t.either.0 += 1;
                Ok(())
            } else if v == TC_ACT_OK {
                t.either.1 += 1;
                compare_masked(output, &masked, out).map_err(|e| format!("({reason}) {e}"))
            } else {
                Err(format!("({reason}) expected -1 unchanged or the action, got verdict {v}\n{}", diff6(frame, &out)))
            }
        }
    }
}

/// A random frame for `mode`: a valid IPv6 frame (plain for the funnel
/// rules, funneled for the unfunnel rules, sometimes behind an extension
/// header) with 0–3 random mutations of its lengths, next header, version,
/// L4 and inner header fields, end, or any header byte.
fn random_frame6(rng: &mut Rng, mode: Mode) -> Vec<u8> {
    let inner = Proto::ALL[rng.below(2)];
    let mut spec = random_packet6(rng, inner);
    let n = if rng.bool() { rng.below(48) } else { rng.below(300) };
    spec.payload.truncate(n);
    if rng.one_in(6) {
        let t = rng.range(1, 30);
        spec.trailer = rng.bytes(t);
    }
    let mut f = spec.build();
    if mode == Mode::Unfunnel {
        let outer = if rng.one_in(4) { inner } else { inner.other() };
        f = expected_funnel6(&f, outer, rng.u16(), rng.u16());
    }
    if rng.one_in(10) {
        let e = match rng.below(4) {
            0 => ExtHeader::hop_by_hop(),
            1 => ExtHeader::dest_opts_with(rng.below(11)),
            2 => ExtHeader::fragment(rng.u16() & 0x1FFF, rng.bool(), rng.u32()),
            _ => ExtHeader::srh(rng.bytes(16).try_into().unwrap()),
        };
        f = with_first_ext(&f, &e);
    }
    let mutations = if rng.one_in(5) { 0 } else { rng.range(1, 3) };
    for _ in 0..mutations {
        let len = f.len();
        if len < IP6_L4_OFF {
            break;
        }
        let plen = len.saturating_sub(IP6_L4_OFF) as u16;
        match rng.below(11) {
            0 => {
                let v = match rng.below(4) {
                    0 => rng.u16(),
                    1 => plen.wrapping_add(rng.range(1, 30) as u16),
                    2 => plen.saturating_sub(rng.range(1, 30) as u16),
                    _ => 0,
                };
                put16(&mut f, IP6_OFF_PAYLOAD_LEN, v);
            }
            1 => {
                const NH: [u8; 12] = [6, 17, 0, 43, 44, 50, 51, 58, 59, 60, 135, 253];
                f[IP6_OFF_NEXT_HEADER] = if rng.one_in(4) { rng.u8() } else { NH[rng.below(NH.len())] };
            }
            2 => f[ETH_HLEN] = ((rng.below(16) as u8) << 4) | (f[ETH_HLEN] & 0xF),
            3 => f.truncate(rng.range(len.saturating_sub(30), len)),
            4 => {
                let k = rng.range(1, 40);
                f.extend_from_slice(&rng.bytes(k));
            }
            5 if len >= IP6_L4_OFF + 8 => {
                let v = if rng.bool() { rng.u16() } else { plen.wrapping_add(rng.range(0, 4) as u16).wrapping_sub(2) };
                put16(&mut f, IP6_L4_OFF + 4, v);
            }
            6 if len >= IP6_L4_OFF + 20 => {
                f[IP6_L4_OFF + 12] = ((rng.below(16) as u8) << 4) | (f[IP6_L4_OFF + 12] & 0xF)
            }
            7 => {
                let at = rng.range(12, len.clamp(13, 120) - 1);
                if at < len {
                    f[at] = rng.u8();
                }
            }
            8 => {
                // An inner header field behind either outer header size.
                let at = IP6_L4_OFF + if rng.bool() { 8 } else { 20 } + if rng.bool() { 4 } else { 12 };
                if at + 2 <= len {
                    let v = if rng.bool() { rng.u16() } else { (len - at + 4) as u16 };
                    put16(&mut f, at, v);
                }
            }
            // A UDP header cut by payload_len, its length field agreeing.
            9 if len >= IP6_L4_OFF + 8 => {
                let v = rng.range(1, 7) as u16;
                put16(&mut f, IP6_OFF_PAYLOAD_LEN, v);
                put16(&mut f, IP6_L4_OFF + 4, v);
            }
            _ => {
                // payload_len agreeing with the frame again.
                put16(&mut f, IP6_OFF_PAYLOAD_LEN, plen);
            }
        }
    }
    f
}

#[test]
fn robustness_random_frames6() {
    if !require_root("robustness_random_frames6") {
        return;
    }
    let seed = Rng::seed_from_env(DEFAULT_SEED);
    let mut rng = Rng::new(seed ^ 0xB0B6);
    let n = env_usize("SFUNNEL_RANDOM_INPUTS", 100_000);
    let max_failures = env_usize("SFUNNEL_MAX_FAILURES", 8);
    let funnel = Prog::with_rules(FUNNEL_ANY).expect("load");
    let unfunnel = Prog::with_rules(UNFUNNEL_ANY).expect("load");
    let start = Instant::now();
    let mut tallies = [RandomTally::default(), RandomTally::default()];
    let (mut nfail, mut failures) = (0usize, Vec::new());
    let mut by_kind = std::collections::BTreeMap::new();
    for k in 0..n {
        let (mode, prog, t) = if k % 2 == 0 {
            (Mode::Funnel, &funnel, &mut tallies[0])
        } else {
            (Mode::Unfunnel, &unfunnel, &mut tallies[1])
        };
        let frame = random_frame6(&mut rng, mode);
        if let Err(e) = check_random(prog, &frame, mode, t) {
            nfail += 1;
            let kind = e.strip_prefix('(').and_then(|r| r.split_once(')')).map_or("other", |(k, _)| k);
            *by_kind.entry(format!("{mode:?}: {kind}")).or_insert(0usize) += 1;
            if failures.len() < max_failures {
                failures.push(format!("FAIL random {k} ({mode:?}, seed {seed}): {e}\n  frame: {}", hex(&frame)));
            }
        }
    }
    for (mode, t) in [("funnel", &tallies[0]), ("unfunnel", &tallies[1])] {
        println!(
            "robustness (IPv6): {} random frames under {mode} rules: {} refused (short), {} passed unchanged, \
             {} handled per spec ({} exactly, the rest with L4 checksums masked), ambiguous: {} passed, {} handled",
            n / 2,
            t.refused,
            t.pass.values().sum::<usize>(),
            t.handled,
            t.handled_exact,
            t.either.0,
            t.either.1
        );
        for (reason, c) in &t.pass {
            println!("robustness (IPv6):     passed: {reason}: {c}");
        }
    }
    println!("robustness (IPv6): {nfail} failures, {:.1?} (seed {seed})", start.elapsed());
    for (kind, c) in &by_kind {
        println!("robustness (IPv6):     failed: {kind}: {c}");
    }
    for f in &failures {
        eprintln!("{f}\n");
    }
    assert_eq!(nfail, 0, "{nfail} robustness failures (see stderr)");
    assert!(tallies.iter().all(|t| t.handled > n / 20), "the generator should make many frames to handle");
}
