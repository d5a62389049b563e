//! The attach path the running kernel gets: TCX from 6.6 on, a clsact qdisc
//! with a cls_bpf filter before.  Loads the real binary onto a veth in a
//! throwaway network namespace, checks what `load` and `status --json` say
//! against `uname -r`, and prints one line that the kernel matrix
//! (vmtest/run.sh) reports per kernel:
//!
//! ```text
//! attach path: clsact (kernel 6.1.0-56-amd64)
//! ```
//!
//! Root only; see `common::require_root`.

mod common;

use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::process::{Command, Output};

use common::require_root;

const BIN: &str = env!("CARGO_BIN_EXE_sfunnel");
/// TCX (BPF_LINK_TYPE_TCX) appeared in Linux 6.6.
const TCX_SINCE: (u32, u32) = (6, 6);

/// `major.minor` of a kernel release such as `6.12.117+deb12-amd64` or
/// `6.1.0-56-amd64`.
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn kernel_release() -> String {
    let out = Command::new("uname").arg("-r").output().expect("running uname -r");
    assert!(out.status.success(), "uname -r failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The mode sfunnel must pick on this kernel.
fn expected_mode(release: &str) -> &'static str {
    let v = parse_release(release).unwrap_or_else(|| panic!("cannot parse kernel release {release:?}"));
    if v >= TCX_SINCE {
        "tcx"
    } else {
        "clsact"
    }
}

/// A network namespace holding one veth pair, both ends inside it.  Removed
/// in Drop, also when a test panics.
struct Netns {
    name: String,
    iface: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let id = std::process::id() % 100_000;
        let n = Netns { name: format!("sfvm-{tag}-{id}"), iface: format!("sfvm{id}a") };
        let peer = format!("sfvm{id}b");
        // A left-over from an earlier, killed run of the same pid.
        let _ = Command::new("ip").args(["netns", "del", &n.name]).output();
        sh(&["ip", "netns", "add", &n.name]);
        sh(&["ip", "-n", &n.name, "link", "add", &n.iface, "type", "veth", "peer", "name", &peer]);
        sh(&["ip", "-n", &n.name, "link", "set", &n.iface, "up"]);
        sh(&["ip", "-n", &n.name, "link", "set", &peer, "up"]);
        n
    }

    fn inode(&self) -> u64 {
        std::fs::metadata(format!("/var/run/netns/{}", self.name)).expect("stat of the netns").ino()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Unload first (removes the pins under /sys/fs/bpf); deleting the
        // namespace then removes the veth and whatever is attached to it.
        let _ = sfunnel(&["unload", "--netns", &self.name, "-i", &self.iface, "-d", "both"]);
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The binary, with the container-interface variables cleared so that the
/// environment of the test run cannot change what it does.
fn sfunnel(args: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args);
    for k in sfunnel::cli::ENV_VARS {
        c.env_remove(k);
    }
    c.output().unwrap_or_else(|e| panic!("running {BIN}: {e}"))
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

/// Written to the stderr handle, not with eprintln!, so that the test
/// harness's capture does not hide it: the line is the point of the test.
fn report(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
    let _ = err.flush();
}

#[test]
fn release_parsing() {
    assert_eq!(parse_release("6.1.0-56-amd64"), Some((6, 1)));
    assert_eq!(parse_release("6.12.117+deb12-amd64"), Some((6, 12)));
    assert_eq!(parse_release("6.6.0"), Some((6, 6)));
    assert_eq!(parse_release("5.17.3-arch1"), Some((5, 17)));
    assert_eq!(parse_release("6.18.44-fc-v669"), Some((6, 18)));
    assert_eq!(parse_release("garbage"), None);
    assert_eq!(expected_mode("6.5.13"), "clsact");
    assert_eq!(expected_mode("6.6.0"), "tcx");
    assert_eq!(expected_mode("6.1.0-56-amd64"), "clsact");
    assert_eq!(expected_mode("6.12.117+deb12-amd64"), "tcx");
}

#[test]
fn load_uses_the_kernels_attach_path() {
    if !require_root("load_uses_the_kernels_attach_path") {
        return;
    }
    let release = kernel_release();
    let want = expected_mode(&release);
    let ns = Netns::new("attach");

    const RULE: &str = "udp dport 4739 actions accept";
    let out = sfunnel(&["load", "--netns", &ns.name, "-i", &ns.iface, RULE]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "load failed ({}):\n{stdout}{}", out.status, text(&out.stderr));
    let said = if stdout.contains("with tcx") {
        "tcx"
    } else if stdout.contains("with clsact") {
        "clsact"
    } else {
        panic!("load did not say which attach path it used:\n{stdout}")
    };
    report(&format!("attach path: {said} (kernel {release})"));
    assert_eq!(said, want, "kernel {release} should use {want}; load said:\n{stdout}");

    // status --json: the same mode for this namespace and interface.
    let out = sfunnel(&["status", "--json"]);
    assert!(out.status.success(), "status --json failed:\n{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    assert_eq!(doc["schema"], 1, "status --json's schema");
    let ino = ns.inode();
    let mine: Vec<&serde_json::Value> = doc["attachments"]
        .as_array()
        .expect("status --json lists attachments")
        .iter()
        .filter(|a| a["netns_ino"].as_u64() == Some(ino) && a["iface"] == ns.iface.as_str())
        .collect();
    assert_eq!(mine.len(), 1, "status --json should list one attachment on {}:\n{}", ns.iface, text(&out.stdout));
    assert_eq!(mine[0]["direction"], "ingress");
    assert_eq!(mine[0]["mode"], want, "status --json reports another mode:\n{}", text(&out.stdout));
    // …and the loaded ruleset, in canonical form, one counter per rule.
    assert_eq!(mine[0]["rules"].as_array().map(Vec::len), Some(1));
    assert_eq!(mine[0]["rules"][0]["text"], RULE, "status --json ruleset:\n{}", text(&out.stdout));
    assert_eq!(mine[0]["rules"][0]["index"], 0);

    let out = sfunnel(&["unload", "--netns", &ns.name, "-i", &ns.iface]);
    assert!(out.status.success(), "unload failed:\n{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("unloaded"), "unload removed nothing:\n{}", text(&out.stdout));
}
