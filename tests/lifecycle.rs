//! An attachment's life on a busy node (root; real namespaces, veths,
//! sockets, and the binary as a user runs it): pods that come and go
//! without an unload, gc from a pod's view, a load that dies at any step,
//! loads racing, a load over several targets that fails on one, and the
//! pin tree against other users.
//!
//! The tests of this file run one at a time (`serial`): the churn test
//! sums the locked memory of every BPF object on the machine before and
//! after.

mod common;

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::capture::Capture;
use common::topology::{
    hook_prog_ids, in_ns, nsh, prog_name, run, sfunnel, sfunnel_cmd, sh, status_json, unique_stems, Namespaces, Out,
    BIN,
};
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Funnel on the way out, unfunnel on the way in: one ruleset for both
/// directions, as the container interface loads it (DIRECTION=both).
const RULES: &str = "\
udp dport 4739 actions funnel tcp sport 540 dport 80
tcp sport 540 dport 80 actions unfunnel udp";
/// Another ruleset, for reruns that change something.
const RULES_B: &str = "\
udp dport 4739 actions funnel udp sport 542 dport 81
udp sport 542 dport 81 actions unfunnel udp";

/// A pod-like namespace `<stem>-p` wired to a peer `<stem>-q` by a veth
/// (`<ifs>p` / `<ifs>q`), 10.204.0.2 ↔ 10.204.0.1.
struct Pod {
    p: String,
    q: String,
    p_if: String,
    q_if: String,
}

fn pod(nss: &mut Namespaces, stem: &str, ifs: &str) -> Pod {
    let pod = Pod { p: format!("{stem}-p"), q: format!("{stem}-q"), p_if: format!("{ifs}p"), q_if: format!("{ifs}q") };
    nss.add(&pod.p);
    nss.add(&pod.q);
    sh(&["ip", "-n", &pod.p, "link", "add", &pod.p_if, "type", "veth", "peer", "name", &pod.q_if, "netns", &pod.q]);
    sh(&["ip", "-n", &pod.p, "addr", "add", "10.204.0.2/24", "dev", &pod.p_if]);
    sh(&["ip", "-n", &pod.q, "addr", "add", "10.204.0.1/24", "dev", &pod.q_if]);
    sh(&["ip", "-n", &pod.p, "link", "set", &pod.p_if, "mtu", "1480", "up"]);
    sh(&["ip", "-n", &pod.q, "link", "set", &pod.q_if, "up"]);
    pod
}

/// The container interface with IFACES unset: every interface.
fn env_load_all(ns: &str, rules: &str, extra: &[(&str, &str)]) -> Out {
    let mut env = vec![("SFUNNEL_RULESET", rules), ("DIRECTION", "both"), ("NETNS", ns)];
    env.extend_from_slice(extra);
    sfunnel(&[], &env)
}

fn links(ns: &str) -> Vec<String> {
    nsh(ns, &["ip", "-o", "link", "show"])
        .stdout
        .lines()
        .filter_map(|l| l.split(": ").nth(1).map(|n| n.split('@').next().unwrap_or(n).to_string()))
        .collect()
}

/// Sends `n` datagrams to UDP/4739 from the pod and counts the frames that
/// arrive at the peer funneled (TCP 540 → 80, SYN, seq 0xCAFEBABE), from a
/// capture on the peer's interface (before its tc ingress).
fn funneled_on_the_wire(pod: &Pod, n: usize) -> usize {
    let cap = Capture::start(&pod.q, &pod.q_if);
    let s = in_ns(&pod.p, || UdpSocket::bind("10.204.0.2:0").expect("bind"));
    for k in 0..n {
        let _ = s.send_to(&common::topology::pattern(k, 100), "10.204.0.1:4739");
    }
    std::thread::sleep(Duration::from_millis(50));
    cap.stop()
        .frames
        .iter()
        .filter(|f| {
            let d = &f.data;
            !f.outgoing
                && d.len() >= 54
                && d[12..14] == [0x08, 0x00]
                && d[23] == 6
                && d[34..36] == 540u16.to_be_bytes()
                && d[36..38] == 80u16.to_be_bytes()
                && d[38..42] == 0xCAFE_BABEu32.to_be_bytes()
        })
        .count()
}

/// Locked kernel memory of every BPF program and map on the machine, and
/// of those that are sfunnel's (programs `sfunnel*`, maps `sf_*` and the
/// per-ruleset tables `sfunnel_*`), from bpftool.
fn memlock() -> (u64, u64, Vec<u32>) {
    let mut total = 0;
    let mut ours = 0;
    let mut progs = Vec::new();
    for kind in ["prog", "map"] {
        let out = run(Command::new("bpftool").args(["-j", kind, "show"]), Duration::from_secs(60)).expect_ok();
        let v: Value = serde_json::from_str(&out.stdout).expect("bpftool -j is JSON");
        for o in v.as_array().into_iter().flatten() {
            let m = o["bytes_memlock"].as_u64().unwrap_or(0);
            let name = o["name"].as_str().unwrap_or("");
            total += m;
            let mine = match kind {
                "prog" => name.starts_with("sfunnel"),
                _ => name.starts_with("sf_") || name.starts_with("sfunnel_"),
            };
            if mine {
                ours += m;
                if kind == "prog" && name == "sfunnel" {
                    progs.push(o["id"].as_u64().unwrap_or(0) as u32);
                }
            }
        }
    }
    (total, ours, progs)
}

/// The pins under sfunnel's tree, as paths relative to it.
fn pins() -> BTreeSet<String> {
    let root = std::path::Path::new(common::topology::PIN_ROOT);
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(root).unwrap_or(&p).display().to_string());
            }
        }
    }
    out
}

fn cycles() -> usize {
    std::env::var("SFUNNEL_CHURN_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(100)
}

/// Pods that come and go: each cycle makes a pod-like namespace wired to a
/// peer, loads through the container interface with IFACES unset and
/// DIRECTION=both, checks on the wire that it funnels, reruns twice (the
/// interfaces must stay the same), and deletes the namespace without an
/// unload.  Afterwards, and after one more load elsewhere, no pin is left
/// for a dead namespace, every sfunnel program on the machine is a live
/// attachment, and the locked memory of all BPF objects grew by no more
/// than what those live attachments hold.
#[test]
fn churn_of_pods_leaves_nothing_behind() {
    if !common::require_root("churn_of_pods_leaves_nothing_behind") {
        return;
    }
    let _serial = serial();
    let (stem, ifs) = unique_stems();
    let mut keep = Namespaces::default();
    let home = pod(&mut keep, &format!("{stem}h"), &format!("{ifs}h"));
    let home_cookie = common::topology::netns_cookie(&home.p).to_string();
    // A live attachment elsewhere, loaded before and again after the churn.
    let first = env_load_all(&home.p, RULES, &[]);
    assert!(first.ok(), "{}", first.stderr);
    let (before, ours_before, _) = memlock();
    let pins_before = pins();
    let started = Instant::now();
    let n = cycles();
    let mut problems = Vec::new();
    let mut dead_cookies = Vec::new();
    for c in 0..n {
        let mut nss = Namespaces::default();
        let pod = pod(&mut nss, &format!("{stem}c{c}"), &format!("{ifs}c"));
        dead_cookies.push(common::topology::netns_cookie(&pod.p));
        let first = env_load_all(&pod.p, RULES, &[]);
        if !first.ok() {
            problems.push(format!("cycle {c}: load failed: {}", first.stderr.trim()));
            break;
        }
        let after_first = links(&pod.p);
        let funneled = funneled_on_the_wire(&pod, 5);
        for (k, rules) in [RULES_B, RULES].iter().enumerate() {
            let rerun = env_load_all(&pod.p, rules, &[]);
            if !rerun.ok() || rerun.stdout.contains("attached") {
                problems.push(format!("cycle {c}: rerun {k}: {} {}", rerun.stdout.trim(), rerun.stderr.trim()));
            }
            let now = links(&pod.p);
            if now != after_first {
                problems.push(format!("cycle {c}: rerun {k}: interfaces {after_first:?} became {now:?}"));
            }
        }
        if funneled != 5 {
            problems.push(format!("cycle {c}: {funneled} of 5 datagrams crossed funneled"));
        }
        if c == 0 {
            eprintln!("cycle 0: {} interfaces after each load: {after_first:?}", after_first.len());
        }
        // The pod dies: its namespace goes, with no unload.
        std::mem::forget(nss);
        sh(&["ip", "netns", "del", &pod.p]);
        sh(&["ip", "netns", "del", &pod.q]);
        if !problems.is_empty() {
            break;
        }
    }
    // The kernel tears a deleted namespace down in the background (its
    // loopback last): wait until no attachment of a dead pod is on a hook.
    let teardown = Instant::now();
    let still_live = || -> usize {
        status_json()
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["state"] == "live" && a["netns_cookie"].as_u64().is_some_and(|c| dead_cookies.contains(&c)))
            .count()
    };
    while still_live() > 0 && teardown.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left_live = still_live();
    // One more load, elsewhere (the same ruleset again, in place): it frees
    // what the dead pods held.
    let last = env_load_all(&home.p, RULES, &[]);
    let (after, ours, progs) = memlock();
    let status = status_json();
    let live: Vec<u32> = status
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["state"] == "live")
        .filter_map(|a| a["prog_id"].as_u64().map(|i| i as u32))
        .collect();
    let pins_after = pins();
    let new_pins: Vec<&String> = pins_after.difference(&pins_before).collect();
    eprintln!(
        "\n=== churn: {n} pods, each loaded with IFACES unset and DIRECTION=both, rerun twice, deleted without \
         unload ({:.1} s) ===\nthe last dead pod's attachments off their hooks {:.1} s after its deletion \
         ({left_live} still on one)\nlocked memory of all BPF objects: {before} B before, {after} B after (+{} B); \
         sfunnel's: {ours_before} B before, {ours} B after, in {} programs named sfunnel; live attachments \
         {live:?}\npins added: {new_pins:?}",
        started.elapsed().as_secs_f64(),
        teardown.elapsed().as_secs_f64(),
        after as i64 - before as i64,
        progs.len()
    );
    drop(keep);
    assert!(last.ok(), "the last load: {}", last.stderr);
    assert_eq!(left_live, 0, "a dead pod's attachment still on a hook 30 s after its namespace was deleted");
    assert!(problems.is_empty(), "{problems:#?}");
    let mut progs = progs;
    progs.sort();
    let mut live = live;
    live.sort();
    assert_eq!(progs, live, "every sfunnel program on the machine is a live attachment");
    // The live attachments are the same before and after: nothing grows.
    assert!(after <= before, "locked memory grew by {} B", after - before);
    assert_eq!(ours, ours_before, "sfunnel's locked memory");
    // Only the home pod's attachments (TCX: their links) are pinned now.
    assert!(new_pins.iter().all(|p| p.contains(&home_cookie)), "pins of dead namespaces: {new_pins:?}");
}

/// gc from a pod's point of view: its own PID and mount namespaces,
/// /var/run/netns hidden, so it can see no other namespace.  It removes
/// what the kernel shows dead (a TCX link whose namespace was deleted) and
/// leaves a live attachment funneling.
#[test]
fn gc_from_a_pods_view_keeps_live_attachments() {
    if !common::require_root("gc_from_a_pods_view_keeps_live_attachments") {
        return;
    }
    let _serial = serial();
    let (stem, ifs) = unique_stems();
    let mut nss = Namespaces::default();
    let live = pod(&mut nss, &format!("{stem}l"), &format!("{ifs}l"));
    let mut dead_nss = Namespaces::default();
    let dead = pod(&mut dead_nss, &format!("{stem}d"), &format!("{ifs}d"));
    for p in [&live, &dead] {
        sfunnel(&[], &[("SFUNNEL_RULESET", RULES), ("IFACES", &p.p_if), ("DIRECTION", "egress"), ("NETNS", &p.p)])
            .expect_ok();
    }
    let before = funneled_on_the_wire(&live, 5);
    let dead_cookie = common::topology::netns_cookie(&dead.p).to_string();
    std::mem::forget(dead_nss);
    sh(&["ip", "netns", "del", &dead.p]);
    sh(&["ip", "netns", "del", &dead.q]);
    // The kernel tears the namespace down in the background: wait (30 s at
    // most) until none of its attachments is on a hook.
    let cookie = dead_cookie.parse::<u64>().unwrap();
    let teardown = Instant::now();
    while status_json()
        .as_array()
        .into_iter()
        .flatten()
        .any(|a| a["state"] == "live" && a["netns_cookie"].as_u64() == Some(cookie))
        && teardown.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let gc = run(
        Command::new("unshare").args(["--pid", "--mount", "--fork", "--mount-proc", "sh", "-c"]).arg(format!(
            "mount -t tmpfs none /var/run/netns && ls /var/run/netns | wc -l && ps -e | wc -l && {BIN} gc"
        )),
        Duration::from_secs(60),
    );
    let after = funneled_on_the_wire(&live, 5);
    let left: Vec<String> = pins().into_iter().filter(|p| p.contains(&dead_cookie)).collect();
    eprintln!(
        "\n=== gc from a pod's view ===\n{}{}funneled before: {before}/5, after: {after}/5; pins of the dead pod left: \
         {left:?}",
        gc.stdout, gc.stderr
    );
    drop(nss);
    assert!(gc.ok(), "gc: {}", gc.stderr);
    assert_eq!(gc.stdout.lines().next(), Some("0"), "gc saw no named namespace");
    assert_eq!((before, after), (5, 5), "the live attachment funnels before and after gc");
    assert!(left.is_empty(), "the dead pod's pins were removed: {left:?}");
}

/// Where a target stands, as the kernel and the tree show it.
#[derive(Debug, PartialEq)]
struct Shape {
    /// sfunnel programs on the pod interface's egress hook.
    progs: usize,
    /// Helper interfaces in the pod's namespace.
    helpers: Vec<String>,
    /// Pins for the pod's namespace.
    pins: usize,
    funneled: usize,
}

fn shape(pod: &Pod, cookie: &str) -> Shape {
    let progs = hook_prog_ids(&pod.p, &pod.p_if, true)
        .into_iter()
        .filter(|id| prog_name(*id).as_deref() == Some("sfunnel"))
        .count();
    let helpers = links(&pod.p).into_iter().filter(|n| n.starts_with("sfe") || n.starts_with("sfi")).collect();
    let pins = pins().iter().filter(|p| p.contains(cookie)).count();
    Shape { progs, helpers, pins, funneled: funneled_on_the_wire(pod, 5) }
}

fn attach_modes() -> Vec<&'static str> {
    // TCX where the kernel has it (6.6+); clsact everywhere.
    let probe = Command::new(BIN).args(["load", "--help"]).output().map(|_| ()).is_ok();
    let tcx = probe && common::topology::kernel_has_tcx();
    if tcx {
        vec!["tcx", "clsact"]
    } else {
        eprintln!("NOTE: this kernel has no TCX (before 6.6): fault injection runs in clsact mode only");
        vec!["clsact"]
    }
}

/// A load that dies at each step (SFUNNEL_FAULT; docs/development.md), in
/// each attach mode: first loads, reruns in place, and reruns that replace
/// a program of another layout.  A normal load afterwards must leave
/// exactly one working attachment, no stray filter, helper pair or pin.
#[test]
fn a_load_that_dies_at_any_step_is_recovered_by_the_next() {
    if !common::require_root("a_load_that_dies_at_any_step_is_recovered_by_the_next") {
        return;
    }
    let _serial = serial();
    const STEPS: [&str; 5] = ["prepared", "detour-hooked", "attached", "committed", "released"];
    let mut table = String::new();
    let mut problems = Vec::new();
    for mode in attach_modes() {
        for path in ["first load", "rerun in place", "replace another layout"] {
            // A rerun in place switches by a generation flip: it hooks nothing.
            let steps: Vec<&str> = STEPS
                .iter()
                .copied()
                .filter(|s| path != "rerun in place" || !["detour-hooked", "attached"].contains(s))
                .collect();
            for step in steps {
                let (stem, ifs) = unique_stems();
                let mut nss = Namespaces::default();
                let pod = pod(&mut nss, &stem, &ifs);
                let load = |rules: &str, fault: Option<&str>| {
                    let mut env = vec![("SFUNNEL_RULESET", rules), ("IFACES", pod.p_if.as_str())];
                    env.extend([("DIRECTION", "egress"), ("NETNS", pod.p.as_str())]);
                    if let Some(f) = fault {
                        env.push(("SFUNNEL_FAULT", f));
                    }
                    run(&mut sfunnel_cmd(&["load", "--attach", mode], &env), Duration::from_secs(120))
                };
                if path != "first load" {
                    load(RULES_B, None).expect_ok();
                }
                if path == "replace another layout" {
                    common::topology::set_layout(&pod.p, &pod.p_if, "egress", 1);
                }
                let crashed = load(RULES, Some(step));
                let after = load(RULES, None);
                let cookie = common::topology::netns_cookie(&pod.p).to_string();
                let s = shape(&pod, &cookie);
                let want_pins = if mode == "tcx" { 2 } else { 0 };
                let ok = crashed.code != 0
                    && after.ok()
                    && s.progs == 1
                    && s.helpers.len() == 2
                    && s.pins == want_pins
                    && s.funneled == 5;
                table.push_str(&format!(
                    "{mode:<7} {path:<23} {step:<14} crashed with {:>4}, then load {} | programs on the hook {}, \
                     helpers {:?}, pins {}, funneled {}/5 {}\n",
                    crashed.code,
                    if after.ok() { "ok" } else { "FAILED" },
                    s.progs,
                    s.helpers,
                    s.pins,
                    s.funneled,
                    if ok { "ok" } else { "FAIL" }
                ));
                if !ok {
                    problems.push(format!("{mode} {path} {step}: {s:?}; {}", after.stderr.trim()));
                }
                drop(nss);
            }
        }
    }
    eprintln!("\n=== a load that dies at each step, then a normal load ===\n{table}");
    assert!(problems.is_empty(), "{problems:#?}");
}

/// A load over two interfaces that fails on the second leaves both as they
/// were, after the first target had switched: at the second switch
/// (SFUNNEL_FAIL_COMMIT=1), as a first load and as a rerun, and when
/// someone else's filter holds sfunnel's clsact slot on the second.  The
/// exit status is 1 and the error names each target's state.
#[test]
fn a_load_over_several_targets_changes_all_or_none() {
    if !common::require_root("a_load_over_several_targets_changes_all_or_none") {
        return;
    }
    let _serial = serial();
    let (stem, ifs) = unique_stems();
    let mut nss = Namespaces::default();
    let pod = pod(&mut nss, &stem, &ifs);
    let second = format!("{ifs}x");
    sh(&["ip", "-n", &pod.p, "link", "add", &second, "type", "veth", "peer", "name", &format!("{ifs}y")]);
    sh(&["ip", "-n", &pod.p, "link", "set", &second, "up"]);
    let ifaces = format!("{} {second}", pod.p_if);
    let env = |rules: &'static str| {
        vec![
            ("SFUNNEL_RULESET", rules),
            ("IFACES", ifaces.as_str()),
            ("DIRECTION", "egress"),
            ("NETNS", pod.p.as_str()),
        ]
    };
    let rules_of = |iface: &str| -> Vec<String> {
        status_json()
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| {
                a["iface"] == iface
                    && a["direction"] == "egress"
                    && a["netns"].as_str().is_some_and(|n| n.ends_with(&pod.p))
            })
            .flat_map(|a| a["rules"].as_array().cloned().unwrap_or_default())
            .filter_map(|r| r["text"].as_str().map(str::to_string))
            .collect()
    };
    // A first load that fails at the second switch: the first target is
    // switched back, and what was prepared for it (its helper pair, for
    // the funnel rule) goes too.
    let links_before = links(&pod.p);
    let pins_before = pins();
    let mut first_fail = env(RULES);
    first_fail.push(("SFUNNEL_FAIL_COMMIT", "1"));
    let failed = sfunnel(&["load"], &first_fail);
    eprintln!("a first load failing at the second switch: exit {}: {}", failed.code, failed.stderr.trim());
    assert_eq!(failed.code, 1);
    assert!(failed.stderr.contains(&format!("{} egress: unchanged (switched back)", pod.p_if)), "{}", failed.stderr);
    assert_eq!((rules_of(&pod.p_if), rules_of(&second)), (vec![], vec![]), "no attachment on either");
    assert_eq!(links(&pod.p), links_before, "no helper pair left behind");
    assert_eq!(pins(), pins_before, "no pin left behind");

    sfunnel(&["load", "--attach", "clsact"], &env(RULES)).expect_ok();
    let before = (rules_of(&pod.p_if), rules_of(&second));
    let mut env_fail = env(RULES_B);
    env_fail.push(("SFUNNEL_FAIL_COMMIT", "1"));
    let failed = sfunnel(&["load", "--attach", "clsact"], &env_fail);
    let after = (rules_of(&pod.p_if), rules_of(&second));
    let funneled = funneled_on_the_wire(&pod, 5);
    eprintln!(
        "\n=== a load over two targets that fails at the second switch ===\nexit {}: {}\nrules before: {before:?}\n\
         rules after: {after:?}\nstill funneled by the old rules: {funneled}/5",
        failed.code,
        failed.stderr.trim()
    );
    assert_eq!(failed.code, 1);
    assert!(failed.stderr.contains(&format!("{} egress: unchanged (switched back)", pod.p_if)), "{}", failed.stderr);
    assert!(failed.stderr.contains(&format!("{second} egress: unchanged, failed here")), "{}", failed.stderr);
    assert_eq!(before, after, "both targets keep the old ruleset");
    assert!(!before.0.is_empty());
    assert_eq!(funneled, 5, "the old ruleset still funnels");

    // Someone else's filter in sfunnel's slot on the second interface (a
    // classic BPF one, which shows the query no program): refused when its
    // switch comes, and the first target is switched back.
    let (h, p) = (format!("{:#x}", 0x5f), format!("{:#x}", 0xc05f));
    common::topology::nsh(&pod.p, &["tc", "filter", "del", "dev", &second, "egress", "handle", &h, "prio", &p, "bpf"]);
    common::topology::nsh(
        &pod.p,
        &["tc", "filter", "add", "dev", &second, "egress", "handle", &h, "prio", &p, "bpf", "bytecode", "1,6 0 0 0,"],
    );
    let refused = sfunnel(&["load", "--attach", "clsact"], &env(RULES_B));
    let after = (rules_of(&pod.p_if), rules_of(&second));
    eprintln!("someone else's filter on {second}: exit {}: {}", refused.code, refused.stderr.trim());
    assert_eq!(refused.code, 1);
    assert!(refused.stderr.contains("not sfunnel's"), "{}", refused.stderr);
    assert!(refused.stderr.contains(&format!("{} egress: unchanged (switched back)", pod.p_if)), "{}", refused.stderr);
    assert_eq!(after.0, before.0, "the first target keeps the old ruleset");
    drop(nss);
}

/// Loaders at once, on one target and on different ones: each exits 0, and
/// each target ends with one whole attachment.
#[test]
fn concurrent_loaders_each_end_with_one_attachment() {
    if !common::require_root("concurrent_loaders_each_end_with_one_attachment") {
        return;
    }
    let _serial = serial();
    let (stem, ifs) = unique_stems();
    let mut nss = Namespaces::default();
    let a = pod(&mut nss, &format!("{stem}a"), &format!("{ifs}a"));
    let b = pod(&mut nss, &format!("{stem}b"), &format!("{ifs}b"));
    let started = Instant::now();
    let runs: Vec<_> = (0..8)
        .map(|k| {
            let (p, rules) = if k % 2 == 0 { (&a, RULES) } else { (&b, RULES_B) };
            let mut c = sfunnel_cmd(&[], &[]);
            c.envs([("SFUNNEL_RULESET", rules), ("IFACES", &p.p_if), ("DIRECTION", "both"), ("NETNS", &p.p)]);
            common::topology::spawn(&mut c)
        })
        .collect();
    let outs: Vec<Out> = runs.into_iter().map(|r| r.wait(Duration::from_secs(120))).collect();
    let took = started.elapsed();
    let mut shapes = Vec::new();
    for p in [&a, &b] {
        for egress in [true, false] {
            let n = hook_prog_ids(&p.p, &p.p_if, egress)
                .into_iter()
                .filter(|id| prog_name(*id).as_deref() == Some("sfunnel"))
                .count();
            shapes.push(n);
        }
    }
    eprintln!(
        "\n=== 8 loaders at once, 4 on each of two pods ({:.1} s) ===\nexit codes {:?}\nsfunnel programs per hook {shapes:?}",
        took.as_secs_f64(),
        outs.iter().map(|o| o.code).collect::<Vec<_>>()
    );
    for o in &outs {
        assert!(o.ok(), "{}", o.stderr);
    }
    assert_eq!(shapes, [1, 1, 1, 1], "one attachment per target");
    assert_eq!(funneled_on_the_wire(&a, 5), 5);
    drop(nss);
}

/// A BPF filesystem of the test's own, so that the pin tree can be made
/// hostile without touching the machine's.  Unmounted on drop.
struct Bpffs(std::path::PathBuf);

impl Bpffs {
    fn new(tag: &str) -> Bpffs {
        let p = std::env::temp_dir().join(format!("sfbpffs-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        sh(&["mount", "-t", "bpf", "bpf", p.to_str().unwrap()]);
        Bpffs(p)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        // A mount still held (say by a process a failed test left behind)
        // is detached lazily: it goes when the last user does.
        let unmounted = Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The pin tree is root's alone: another user can neither read nor lock
/// it; a tree someone else made, or one holding a symbolic link, is
/// refused and nothing outside it is touched; a held lock ends in an error
/// that names its holder; interface names that are paths are refused.
#[test]
fn the_pin_tree_is_roots_alone() {
    if !common::require_root("the_pin_tree_is_roots_alone") {
        return;
    }
    let _serial = serial();
    let (stem, ifs) = unique_stems();
    let mut nss = Namespaces::default();
    let pod = pod(&mut nss, &stem, &ifs);
    let load_with = |bpffs: &std::path::Path, extra: &[(&str, &str)]| {
        let mut env = vec![("SFUNNEL_RULESET", RULES), ("IFACES", pod.p_if.as_str()), ("DIRECTION", "egress")];
        env.extend([("NETNS", pod.p.as_str()), ("SFUNNEL_BPFFS", bpffs.to_str().unwrap())]);
        env.extend_from_slice(extra);
        sfunnel(&[], &env)
    };
    let on_hook = || hook_prog_ids(&pod.p, &pod.p_if, true).len();
    let mut report = String::new();

    // Made by sfunnel: mode 0700, root's; nobody can list it or lock it.
    let fs = Bpffs::new("ok");
    load_with(&fs.0, &[]).expect_ok();
    let tree = fs.0.join("sfunnel");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&tree).unwrap().permissions()) & 0o777;
    let as_nobody = |args: &[&str]| {
        run(
            Command::new("setpriv")
                .args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "--inh-caps=-all"])
                .args(args),
            Duration::from_secs(10),
        )
    };
    let ls = as_nobody(&["ls", tree.to_str().unwrap()]);
    let lock = as_nobody(&["flock", "-n", tree.to_str().unwrap(), "true"]);
    report.push_str(&format!(
        "tree mode {mode:o}; as nobody: ls exit {} ({}), flock exit {} ({})\n",
        ls.code,
        ls.stderr.trim(),
        lock.code,
        lock.stderr.trim()
    ));
    assert_eq!(mode, 0o700);
    assert!(!ls.ok() && !lock.ok(), "nobody must not open or lock the tree");
    sfunnel(
        &[],
        &[
            ("CLEAN", "1"),
            ("IFACES", &pod.p_if),
            ("DIRECTION", "egress"),
            ("NETNS", &pod.p),
            ("SFUNNEL_BPFFS", fs.0.to_str().unwrap()),
        ],
    )
    .expect_ok();
    drop(fs);

    // Made by someone else first.
    let fs = Bpffs::new("other");
    let tree = fs.0.join("sfunnel");
    std::fs::create_dir(&tree).unwrap();
    std::os::unix::fs::chown(&tree, Some(65534), Some(65534)).unwrap();
    let out = load_with(&fs.0, &[]);
    report.push_str(&format!("tree owned by uid 65534: exit {}: {}\n", out.code, out.stderr.trim()));
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("belongs to uid 65534"), "{}", out.stderr);
    assert_eq!(on_hook(), 0, "nothing attached");
    drop(fs);

    // A symbolic link inside it, pointing outside: refused, the outside untouched.
    let fs = Bpffs::new("link");
    let outside = std::env::temp_dir().join(format!("sfoutside-{}", std::process::id()));
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("keep"), b"x").unwrap();
    std::fs::create_dir(fs.0.join("sfunnel")).unwrap();
    std::os::unix::fs::symlink(&outside, fs.0.join("sfunnel").join("tcx")).unwrap();
    let out = load_with(&fs.0, &[]);
    let outside_now: Vec<_> = std::fs::read_dir(&outside).unwrap().flatten().map(|e| e.file_name()).collect();
    report.push_str(&format!(
        "tree holding a symlink: exit {}: {}; outside now {outside_now:?}\n",
        out.code,
        out.stderr.trim()
    ));
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("symbolic link"), "{}", out.stderr);
    assert_eq!(outside_now.len(), 1, "nothing outside the tree touched");
    assert_eq!(on_hook(), 0, "nothing attached");
    let _ = std::fs::remove_dir_all(&outside);
    drop(fs);

    // The tree itself a symbolic link.
    let fs = Bpffs::new("selflink");
    std::os::unix::fs::symlink("/tmp", fs.0.join("sfunnel")).unwrap();
    let out = load_with(&fs.0, &[]);
    report.push_str(&format!("tree a symlink: exit {}: {}\n", out.code, out.stderr.trim()));
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("symbolic link"), "{}", out.stderr);
    drop(fs);

    // A lock held by another process: a bounded wait, then its pid.
    let fs = Bpffs::new("lock");
    std::fs::create_dir(fs.0.join("sfunnel")).unwrap();
    std::fs::set_permissions(fs.0.join("sfunnel"), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    // -o: the lock stays with flock, not with the sleep it runs; both are
    // in a process group of their own, which is ended below, so nothing
    // holds the tree's mount after.
    let mut holder = std::os::unix::process::CommandExt::process_group(
        Command::new("flock").arg("-o").arg(fs.0.join("sfunnel")).args(["sleep", "30"]),
        0,
    )
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let out = load_with(&fs.0, &[("SFUNNEL_LOCK_TIMEOUT", "2")]);
    let waited = t0.elapsed();
    // SAFETY: kill(2) on the process group this test made; no memory is involved.
    unsafe { libc::kill(-(holder.id() as i32), libc::SIGKILL) };
    let _ = holder.wait();
    report.push_str(&format!(
        "lock held by pid {}: exit {} after {:.1} s: {}\n",
        holder.id(),
        out.code,
        waited.as_secs_f64(),
        out.stderr.trim()
    ));
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("gave up waiting for the lock"), "{}", out.stderr);
    assert!(out.stderr.contains("waiting for the lock"), "a message while waiting: {}", out.stderr);
    assert!(out.stderr.contains("flock") || out.stderr.contains("sleep"), "names the holder: {}", out.stderr);
    assert!(waited < Duration::from_secs(15));
    drop(fs);

    // Interface names that would be paths.
    for bad in ["../../x", "a/b", ".", ".."] {
        let out = sfunnel(&["unload", "--netns", &pod.p, "-i", bad], &[]);
        report.push_str(&format!("unload -i {bad}: exit {}: {}\n", out.code, out.stderr.trim()));
        assert_eq!(out.code, 1, "{bad}");
        assert!(out.stderr.contains("is not an interface name"), "{}", out.stderr);
    }
    eprintln!("\n=== the pin tree ===\n{report}");
    drop(nss);
}
