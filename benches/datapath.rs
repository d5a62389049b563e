//! `cargo bench --bench datapath` (root): nanoseconds per packet through
//! PROG_TEST_RUN, by ruleset size, against a no-op TC program measured in
//! the same run.
//!
//! - round trip: `udp dport 4739 → funnel tcp sport 540 dport 179` and the
//!   matching unfunnel; the kernel reuses one skb across repetitions, so
//!   they alternate and each repetition is one funnel or one unfunnel.
//! - miss: a TCP packet to port 443, which decoys name with other sources.
//!
//! Decoy rules (benches/common) come ahead of the two real ones.  Targets:
//! round trip ≤ 6× the floor and miss ≤ 2× the floor at every size.

mod common;

use anyhow::{ensure, Result};
use sfunnel::datapath::{Loaded, Noop, Settings};
use sfunnel::ruleset;

const REAL: &[&str] =
    &["udp dport 4739 actions funnel tcp sport 540 dport 179", "tcp sport 540 dport 179 actions unfunnel udp"];
const SIZES: [usize; 4] = [2, 100, 10_000, 100_000];
const REPEAT: u32 = 200_000;
const TRIALS: usize = 7;

fn median_ns(mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut v = (0..TRIALS).map(|_| f()).collect::<Result<Vec<f64>>>()?;
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    Ok(v[TRIALS / 2])
}

fn main() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the datapath benchmark loads BPF programs: run it as root");
        std::process::exit(1);
    }
    let udp = common::frame(17, 5000, 4739, 64);
    let miss = common::frame(6, 40000, 443, 64);

    let noop = Noop::load()?;
    let floor = median_ns(|| Ok(noop.test_run(&udp, REPEAT)?.as_nanos() as f64))?;

    let mut round = Vec::new();
    let mut misses = Vec::new();
    for n in SIZES {
        let (_, compiled) = ruleset::load(&common::ruleset_with_decoys(n, REAL))?;
        let dp = Loaded::load()?;
        dp.maps()?.install(&compiled, Settings { egress: true, ..Default::default() })?;
        // Sanity: the packets take the paths we mean to time.
        let once = dp.test_run(&udp, 1)?;
        ensure!(once.verdict == 0 && once.data.len() == udp.len() + 20, "{n} rules: the UDP packet was not funneled");
        ensure!(dp.test_run(&once.data, 1)?.data == udp, "{n} rules: unfunnel did not restore the packet");
        ensure!(dp.test_run(&miss, 1)?.verdict == -1, "{n} rules: the miss packet matched");
        // An even repeat count: funnel, unfunnel, …, back to the start.
        round.push(median_ns(|| Ok(dp.test_run(&udp, REPEAT)?.duration.as_nanos() as f64))?);
        misses.push(median_ns(|| Ok(dp.test_run(&miss, REPEAT)?.duration.as_nanos() as f64))?);
    }

    println!("ns per packet via PROG_TEST_RUN (median of {TRIALS} × {REPEAT} runs); ratio to the no-op floor");
    print!("{:<22}", "rules:");
    for n in SIZES {
        print!("{:>16}", n);
    }
    println!();
    println!("{:<22}{:>16.1}", "no-op (floor)", floor);
    for (name, row, target) in [("round trip", &round, 6.0), ("miss", &misses, 2.0)] {
        print!("{:<22}", name);
        for ns in row {
            print!("{:>16}", format!("{ns:.1} ({:.2}x)", ns / floor));
        }
        let worst = row.iter().fold(0f64, |m, ns| m.max(ns / floor));
        println!("   worst {worst:.2}x, target <= {target}x: {}", if worst <= target { "met" } else { "MISSED" });
    }
    Ok(())
}
