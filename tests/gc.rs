//! `sfunnel gc` (root): pins whose network namespace or interface is gone
//! are removed, live ones are kept.  Real namespaces and veths, loaded by
//! the binary; every name is unique to this run and removed even on
//! failure.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_sfunnel");

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("the command runs");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// Namespaces of this test; deleted on drop, with whatever pins are left.
struct Namespaces(Vec<(String, u64)>);

impl Namespaces {
    /// A namespace holding a veth pair `<tag>a`/`<tag>b`, up.
    fn add(&mut self, tag: &str) -> (String, u64) {
        let ns = format!("sfgc{}{tag}", std::process::id());
        ip(&["netns", "add", &ns]);
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(format!("/var/run/netns/{ns}")).unwrap());
        self.0.push((ns.clone(), ino));
        ip(&["-n", &ns, "link", "add", &format!("sfgc{tag}a"), "type", "veth", "peer", "name", &format!("sfgc{tag}b")]);
        ip(&["-n", &ns, "link", "set", &format!("sfgc{tag}a"), "up"]);
        (ns, ino)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for (ns, ino) in &self.0 {
            let _ = Command::new(BIN).args(["unload", "--netns", ns, "-d", "both"]).output();
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            let _ = std::fs::remove_dir_all(pin_dir(*ino));
        }
    }
}

fn pin_dir(ino: u64) -> PathBuf {
    PathBuf::from("/sys/fs/bpf/sfunnel").join(format!("netns-{ino}"))
}

/// Our part of the pin tree, one path per line.
fn listing(inos: &[u64]) -> Vec<String> {
    let mut out = Vec::new();
    for ino in inos {
        let mut stack = vec![pin_dir(*ino)];
        while let Some(p) = stack.pop() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                out.push(format!("{}/", p.display()));
                stack.extend(rd.flatten().map(|e| e.path()));
            } else if p.exists() {
                out.push(p.display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn gc_removes_pins_of_gone_namespaces_and_interfaces_only() {
    if !common::require_root("gc_removes_pins_of_gone_namespaces_and_interfaces_only") {
        return;
    }
    let mut nss = Namespaces(Vec::new());
    let (gone_ns, gone) = nss.add("g");
    let (live_ns, live) = nss.add("l");
    let (ifdel_ns, ifdel) = nss.add("i");
    for (ns, tag) in [(&gone_ns, "g"), (&live_ns, "l"), (&ifdel_ns, "i")] {
        run(Command::new(BIN)
            .args(["load", "udp dport 4739 actions accept", "--netns", ns, "-d", "both", "-i"])
            .arg(format!("sfgc{tag}a")));
    }
    let inos = [gone, live, ifdel];
    let before = listing(&inos);

    // The namespace goes away with its pins left behind, as when a pod dies;
    // in another namespace only the interface goes.
    ip(&["netns", "del", &gone_ns]);
    ip(&["-n", &ifdel_ns, "link", "del", "sfgcia"]);
    let gc = run(Command::new(BIN).arg("gc"));
    let after = listing(&inos);
    let gc_out = String::from_utf8_lossy(&gc.stdout);
    eprintln!(
        "\n=== gc ===\nbefore ({} paths):\n  {}\ngc said:\n  {}\nafter ({} paths):\n  {}",
        before.len(),
        before.join("\n  "),
        gc_out.trim().replace('\n', "\n  "),
        after.len(),
        after.join("\n  ")
    );

    let ours = |ino: u64| format!("{}/", pin_dir(ino).display());
    for ino in inos {
        assert!(before.contains(&ours(ino)), "netns {ino} had pins before gc");
    }
    assert!(!after.iter().any(|p| p.starts_with(&ours(gone))), "pins of the deleted namespace remain: {after:?}");
    assert!(!after.iter().any(|p| p.starts_with(&ours(ifdel))), "pins of the deleted interface remain: {after:?}");
    let live_before: Vec<_> = before.iter().filter(|p| p.starts_with(&ours(live))).collect();
    let live_after: Vec<_> = after.iter().filter(|p| p.starts_with(&ours(live))).collect();
    assert_eq!(live_before, live_after, "the live namespace's pins are untouched");
    assert!(gc_out.contains("its network namespace is gone"), "{gc_out}");
    assert!(gc_out.contains("interface sfgcia is gone"), "{gc_out}");

    // The live attachment still works after gc: a rerun updates it in place.
    let rerun =
        run(Command::new(BIN).args(["load", "udp dport 4739 actions drop", "--netns", &live_ns, "-i", "sfgcla"]));
    assert!(String::from_utf8_lossy(&rerun.stdout).contains("updated in place"));
}
