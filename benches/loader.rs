//! `sudo cargo bench --bench loader`: how long `sfunnel load` takes, as a
//! user runs it (a process per run), in a throwaway namespace with a dummy
//! interface.  Baseline in the same run: starting the same binary for
//! `--version`, the floor of any run.
//!
//! Targets: load + attach ≤ 50 ms median (≤ 100 ms for a funnel rule,
//! which also makes the segmentation detour); rerun with 10,000 rules ≤
//! 200 ms; unload ≤ 50 ms (≤ 100 ms with the detour); 100,000 rules load.

mod common;

use std::process::Command;

use anyhow::{ensure, Context, Result};

const BIN: &str = env!("CARGO_BIN_EXE_sfunnel");
const RUNS: usize = 15;

fn ip(args: &[&str]) -> Result<()> {
    let ok = Command::new("ip").args(args).status().context("running ip")?.success();
    ensure!(ok, "ip {} failed", args.join(" "));
    Ok(())
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new(BIN).args(["unload", "--netns", &self.0, "-d", "both"]).output();
        let _ = ip(&["netns", "del", &self.0]);
    }
}

fn sfunnel(ns: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(BIN).args(args).args(["--netns", ns, "-i", "sfbench0"]).output()?;
    ensure!(out.status.success(), "sfunnel {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn main() -> Result<()> {
    ensure!(rustix::process::geteuid().is_root(), "the loader benchmark attaches programs: run it as root");
    let ns = Netns(format!("sfbench-{}", std::process::id()));
    ip(&["netns", "add", &ns.0])?;
    ip(&["-n", &ns.0, "link", "add", "sfbench0", "type", "veth", "peer", "name", "sfbench1"])?;
    ip(&["-n", &ns.0, "link", "set", "sfbench0", "up"])?;

    let small = "udp dport 4739 actions funnel tcp sport 540 dport 179";
    let rules_10k = common::ruleset_with_decoys(10_000, &[small]);
    let rules_100k = common::ruleset_with_decoys(100_000, &[small]);
    let file_10k = std::env::temp_dir().join(format!("sfbench-{}-10k", std::process::id()));
    let file_100k = std::env::temp_dir().join(format!("sfbench-{}-100k", std::process::id()));
    std::fs::write(&file_10k, &rules_10k)?;
    std::fs::write(&file_100k, &rules_100k)?;

    let floor = common::median_secs(RUNS, || {
        Command::new(BIN).arg("--version").output().expect("the binary runs");
    });
    let mut failed = None;
    // The load and the unload after it are timed apart.
    // One rule each: an unfunnel rule (a pod's ingress), and a funnel rule,
    // which also makes the segmentation detour (its helper veth pair and
    // its second program).
    let median = |mut runs: Vec<f64>| {
        runs.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
        runs[RUNS / 2]
    };
    let fresh_load = |rule: &str| -> Result<(f64, f64)> {
        let (mut loads, mut unloads) = (Vec::with_capacity(RUNS), Vec::with_capacity(RUNS));
        for _ in 0..RUNS {
            let start = std::time::Instant::now();
            sfunnel(&ns.0, &["load", rule])?;
            loads.push(start.elapsed().as_secs_f64());
            let start = std::time::Instant::now();
            sfunnel(&ns.0, &["unload"])?;
            unloads.push(start.elapsed().as_secs_f64());
        }
        Ok((median(loads), median(unloads)))
    };
    let (fresh, unload) = fresh_load("tcp sport 540 dport 179 actions unfunnel udp")?;
    let (fresh_detour, unload_detour) = fresh_load(small)?;
    sfunnel(&ns.0, &["load", small])?;
    let mut flip = false;
    let rerun = common::median_secs(RUNS, || {
        // Alternate rulesets so every run really changes something.
        flip = !flip;
        let r = if flip {
            sfunnel(&ns.0, &["load", "--file", file_10k.to_str().expect("utf-8 path")])
        } else {
            sfunnel(&ns.0, &["load", small])
        };
        failed = failed.take().or(r.err());
    });
    let big = common::median_secs(1, || {
        let r = sfunnel(&ns.0, &["load", "--file", file_100k.to_str().expect("utf-8 path")]);
        failed = failed.take().or(r.err());
    });
    let _ = std::fs::remove_file(&file_10k);
    let _ = std::fs::remove_file(&file_100k);
    if let Some(e) = failed {
        return Err(e);
    }

    println!("sfunnel load, one interface, one process per run (median of {RUNS}; ms)");
    println!("{:<44} {:>9} {:>9} {:>8}", "", "ms", "x floor", "target");
    println!("{:<44} {:>9.1} {:>9} {:>8}", "floor: sfunnel --version", floor * 1e3, "1.0", "");
    let row = |name: &str, s: f64, target_ms: f64| {
        let verdict = if s * 1e3 <= target_ms { "met" } else { "MISSED" };
        println!("{:<44} {:>9.1} {:>9.1} {:>5} ms {verdict}", name, s * 1e3, s / floor, target_ms);
    };
    row("load + attach (an unfunnel rule)", fresh, 50.0);
    row("  a funnel rule: with the GSO detour", fresh_detour, 100.0);
    row("rerun, alternating 10,000 rules / 1 rule", rerun, 200.0);
    row("unload (an unfunnel rule)", unload, 50.0);
    row("  a funnel rule: with the GSO detour", unload_detour, 100.0);
    row("load 100,000 rules (one run, in place)", big, f64::INFINITY);
    Ok(())
}
