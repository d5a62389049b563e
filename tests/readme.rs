//! The README's host quick start, run as it is written: the test takes the
//! shell block that follows the line `<!-- tests/readme.rs runs the next
//! block -->` in README.md, so that the README and this test cannot drift.
//! It runs it under `bash -euo pipefail` with this build's binary first on
//! PATH and the block's namespace names made unique, then checks that the
//! datagram arrived, that both rules counted it (so it crossed the wire
//! funneled), and that the block removed what it made.  Whatever happens,
//! the namespaces and attachments are removed again.  Root only.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::topology::{run, sh, unique_stems, BIN};

const README: &str = include_str!("../README.md");
const MARKER: &str = "<!-- tests/readme.rs runs the next block -->";
/// The names the block gives its namespaces, and the interface in each.
const NAMES: [&str; 2] = ["sfq-client", "sfq-server"];
const IFACE: &str = "veth0";

/// The shell block after the marker.
fn quick_start() -> String {
    let mut lines = README.lines().skip_while(|l| l.trim() != MARKER);
    assert!(lines.next().is_some(), "README.md has no line {MARKER:?}");
    assert_eq!(lines.next().map(str::trim), Some("```sh"), "the line after {MARKER:?} must open a ```sh block");
    let block: Vec<&str> = lines.take_while(|l| l.trim() != "```").collect();
    assert!(!block.is_empty(), "the block after {MARKER:?} is empty");
    block.join("\n") + "\n"
}

/// Removes the namespaces and whatever the block attached in them, also
/// when the block or an assertion failed halfway.
struct Cleanup {
    names: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for ns in &self.names {
            if Path::new("/var/run/netns").join(ns).exists() {
                let _ = run(
                    Command::new(BIN).args(["unload", "-n", ns, "-i", IFACE, "-d", "both"]),
                    Duration::from_secs(60),
                );
                let _ = run(Command::new("ip").args(["netns", "del", ns]), Duration::from_secs(20));
            }
        }
    }
}

/// The packet counter of the rule whose text contains `rule`, on the
/// attachment in namespace `ns` in `direction`, from `sfunnel status`'s
/// text: a header line naming the namespace, the interface and the
/// direction, then indented lines, one a rule: `N packets M bytes RULE`.
fn rule_packets(status: &str, ns: &str, direction: &str, rule: &str) -> Option<u64> {
    let mut lines = status
        .lines()
        .skip_while(|l| l.starts_with(' ') || !(l.contains(ns) && l.contains(&format!("{IFACE} {direction}"))));
    lines.next()?;
    let line = lines.take_while(|l| l.starts_with(' ')).find(|l| l.contains(rule) && l.contains(" packets"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "packets")?;
    words.get(at.checked_sub(1)?)?.parse().ok()
}

#[test]
fn readme_host_quick_start_funnels_and_cleans_up() {
    if !common::require_root("readme_host_quick_start_funnels_and_cleans_up") {
        return;
    }
    assert!(
        run(Command::new("sh").args(["-c", "command -v socat"]), Duration::from_secs(10)).ok(),
        "the README's quick start needs socat: apt-get install socat (scripts/setup.sh installs it)"
    );
    let (stem, _) = unique_stems();
    let names: Vec<String> = ["c", "s"].iter().map(|s| format!("{stem}-{s}")).collect();
    let _cleanup = Cleanup { names: names.clone() };

    let mut script = quick_start();
    for (from, to) in NAMES.iter().zip(&names) {
        assert!(script.contains(from), "the quick start no longer names the namespace {from:?}:\n{script}");
        script = script.replace(from, to);
    }
    let bin_dir = Path::new(BIN).parent().expect("the binary's directory");
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    println!("--- the README's quick start, as run:\n{script}");
    let out =
        run(Command::new("bash").args(["-euo", "pipefail", "-c", &script]).env("PATH", path), Duration::from_secs(120));
    println!("--- stdout:\n{}\n--- stderr:\n{}", out.stdout, out.stderr);
    assert!(out.ok(), "the quick start failed ({}):\n{}\n{}", out.code, out.stdout, out.stderr);

    assert!(
        out.stdout.lines().any(|l| l.trim() == "hello through the funnel"),
        "the server did not print the client's datagram:\n{}",
        out.stdout
    );
    let funneled = rule_packets(&out.stdout, &names[0], "egress", "funnel tcp sport 540 dport 80");
    let unfunneled = rule_packets(&out.stdout, &names[1], "ingress", "unfunnel udp");
    assert!(
        funneled.is_some_and(|n| n > 0) && unfunneled.is_some_and(|n| n > 0),
        "the datagram did not cross funneled: funnel rule counted {funneled:?}, unfunnel rule {unfunneled:?}:\n{}",
        out.stdout
    );

    let left: Vec<String> = sh(&["ip", "netns", "list"])
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| names.iter().any(|m| m == n))
        .map(str::to_string)
        .collect();
    assert!(left.is_empty(), "the quick start left namespaces behind: {left:?}");
}
