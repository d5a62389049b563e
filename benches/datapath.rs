//! `cargo bench --bench datapath` (root): nanoseconds per packet through
//! PROG_TEST_RUN, by ruleset size, against a no-op TC program measured in
//! the same run.
//!
//! - round trip: `udp dport 4739 → funnel tcp sport 540 dport 179` and the
//!   matching unfunnel; the kernel reuses one skb across repetitions, so
//!   they alternate and each repetition is one funnel or one unfunnel.
//! - miss: a TCP packet to port 443, which decoys name with other sources.
//!
//! The round trip and the miss are measured with three unfunnel rules:
//! by ports (`tcp sport 540 dport 179 … unfunnel udp`), by `funneled` with
//! the inner protocol given, and by `funneled` with `unfunnel auto`; and
//! once more over a UDP funnel header (`funneled` + `auto` there reads the
//! inner header and checks the outer checksum).  A ruleset that uses
//! `funneled` makes the datapath test the packets of that protocol that
//! reach the hash probes; the miss packet here ends before them (its port
//! and address classes admit no shape), as most misses do.  In the
//! round trip the unfunnel step alone pays for `funneled` (the funnel step
//! is UDP, the TCP-header variants' `funneled` rule is TCP), except in the
//! UDP variant, where both steps do.
//!
//! The `ipv6 ports` rows repeat the port-based ones over IPv6 (`ip6` rules,
//! IPv6 packets, IPv6 decoys), and are shown against them.
//!
//! Decoy rules (benches/common) come ahead of the two real ones.  Targets:
//! round trip ≤ 6× the floor and miss ≤ 2× the floor at every size.

mod common;

use anyhow::{ensure, Result};
use sfunnel::datapath::{Loaded, Noop, Settings};
use sfunnel::ruleset;

/// (row label, the two real rules, funnel header length, IPv6)
const VARIANTS: [(&str, [&str; 2], usize, bool); 5] = [
    (
        "ports",
        ["udp dport 4739 actions funnel tcp sport 540 dport 179", "tcp sport 540 dport 179 actions unfunnel udp"],
        20,
        false,
    ),
    (
        "funneled",
        ["udp dport 4739 actions funnel tcp sport 540 dport 179", "tcp dport 179 funneled actions unfunnel udp"],
        20,
        false,
    ),
    (
        "funneled+auto",
        ["udp dport 4739 actions funnel tcp sport 540 dport 179", "tcp dport 179 funneled actions unfunnel auto"],
        20,
        false,
    ),
    (
        "udp funneled+auto",
        ["udp dport 4739 actions funnel udp sport 540 dport 179", "udp dport 179 funneled actions unfunnel auto"],
        8,
        false,
    ),
    (
        "ipv6 ports",
        [
            "ip6 udp dport 4739 actions funnel tcp sport 540 dport 179",
            "ip6 tcp sport 540 dport 179 actions unfunnel udp",
        ],
        20,
        true,
    ),
];
const SIZES: [usize; 4] = [2, 100, 10_000, 100_000];
const REPEAT: u32 = 200_000;
const TRIALS: usize = 7;

fn median_ns(mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut v = (0..TRIALS).map(|_| f()).collect::<Result<Vec<f64>>>()?;
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    Ok(v[TRIALS / 2])
}

fn main() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        eprintln!("the datapath benchmark loads BPF programs: run it as root");
        std::process::exit(1);
    }
    let noop = Noop::load()?;
    let floor = median_ns(|| Ok(noop.test_run(&common::frame(17, 5000, 4739, 64), REPEAT)?.as_nanos() as f64))?;

    let mut rows: Vec<(String, Vec<f64>, f64)> = Vec::new();
    for (label, real, hlen, ipv6) in VARIANTS {
        // The same packets over either family, among decoys of that family.
        let (udp, miss, decoy) = if ipv6 {
            (common::frame6(17, 5000, 4739, 64), common::frame6(6, 40000, 443, 64), common::decoy6 as fn(u32) -> String)
        } else {
            (common::frame(17, 5000, 4739, 64), common::frame(6, 40000, 443, 64), common::decoy as fn(u32) -> String)
        };
        let mut round = Vec::new();
        let mut misses = Vec::new();
        for n in SIZES {
            let (_, compiled) = ruleset::load(&common::ruleset_with(n, &real, decoy))?;
            let dp = Loaded::load()?;
            dp.maps()?.install(&compiled, Settings { egress: true, ..Default::default() })?;
            // Sanity: the packets take the paths we mean to time.
            let once = dp.test_run(&udp, 1)?;
            ensure!(
                once.verdict == 0 && once.data.len() == udp.len() + hlen,
                "{label}, {n} rules: the UDP packet was not funneled"
            );
            ensure!(dp.test_run(&once.data, 1)?.data == udp, "{label}, {n} rules: unfunnel did not restore the packet");
            ensure!(dp.test_run(&miss, 1)?.verdict == -1, "{label}, {n} rules: the miss packet matched");
            // An even repeat count: funnel, unfunnel, …, back to the start.
            round.push(median_ns(|| Ok(dp.test_run(&udp, REPEAT)?.duration.as_nanos() as f64))?);
            misses.push(median_ns(|| Ok(dp.test_run(&miss, REPEAT)?.duration.as_nanos() as f64))?);
        }
        // The targets are the port-based paths'; the others are shown
        // against IPv4's.
        let ports = label.ends_with("ports");
        rows.push((format!("round trip, {label}"), round, if ports { 6.0 } else { 0.0 }));
        rows.push((format!("miss, {label}"), misses, if ports { 2.0 } else { 0.0 }));
    }

    println!("ns per packet via PROG_TEST_RUN (median of {TRIALS} × {REPEAT} runs); ratio to the no-op floor");
    print!("{:<30}", "rules:");
    for n in SIZES {
        print!("{:>16}", n);
    }
    println!();
    println!("{:<30}{:>16.1}", "no-op (floor)", floor);
    // Each `funneled` row also as a ratio to the port-based row beside it.
    let base: Vec<(String, Vec<f64>)> =
        rows.iter().filter(|r| r.0.ends_with(", ports")).map(|r| (r.0.clone(), r.1.clone())).collect();
    // (The IPv6 rows end in "ipv6 ports": they are shown against IPv4's.)
    for (name, row, target) in &rows {
        let (name, row, target) = (name.as_str(), row, *target);
        print!("{:<30}", name);
        for ns in row {
            print!("{:>16}", format!("{ns:.1} ({:.2}x)", ns / floor));
        }
        let worst = row.iter().fold(0f64, |m, ns| m.max(ns / floor));
        if target > 0.0 {
            println!("   worst {worst:.2}x, target <= {target}x: {}", if worst <= target { "met" } else { "MISSED" });
        } else {
            println!("   worst {worst:.2}x");
        }
        if let Some((_, b)) = base.iter().find(|(b, _)| b.split(',').next() == name.split(',').next() && b != name) {
            print!("{:<30}", "  vs ports");
            for (ns, bns) in row.iter().zip(b) {
                print!("{:>16}", format!("{:.2}x", ns / bns));
            }
            println!();
        }
    }
    Ok(())
}
