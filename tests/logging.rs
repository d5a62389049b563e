//! Verbose logging (root): `DEBUG=1` (the container interface) and `-v`
//! give one `sfunnel: event=NAME key=value ...` line per thing that was
//! attached, installed, pinned, updated, detached or unpinned; without it a
//! load prints nothing on stderr.  A real namespace and veth, loaded by the
//! binary, removed even on failure.

mod common;

use std::collections::BTreeMap;

use common::topology::{printed_prog_id, sfunnel, Topo};

const RULES: &str = "udp dport 4739 actions funnel tcp sport 540 dport 80";

/// Whether `line` is the environment interface's start-up banner.
fn is_banner(line: &str) -> bool {
    line.starts_with(&format!("sfunnel {} (layout ", env!("CARGO_PKG_VERSION"))) && line.contains(" environment: ")
}

/// The event lines of `stderr`, parsed: (event, fields).  Panics on any
/// other line that is not libbpf's own, or the banner as the first line.
fn events(stderr: &str) -> Vec<(String, BTreeMap<String, String>)> {
    let mut out = Vec::new();
    for (i, line) in stderr.lines().enumerate() {
        if i == 0 && is_banner(line) {
            continue;
        }
        if line.starts_with("libbpf: ") {
            continue;
        }
        let rest = line.strip_prefix("sfunnel: event=").unwrap_or_else(|| panic!("not an event line: {line:?}"));
        let (name, mut rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let mut fields = BTreeMap::new();
        while !rest.is_empty() {
            let (k, v) = rest.split_once('=').unwrap_or_else(|| panic!("no key=value in {line:?}"));
            let (v, next) = if let Some(q) = v.strip_prefix('"') {
                let end = q.find('"').unwrap_or_else(|| panic!("unterminated quote in {line:?}"));
                (q[..end].to_string(), q[end + 1..].trim_start())
            } else {
                let (v, n) = v.split_once(' ').unwrap_or((v, ""));
                (v.to_string(), n)
            };
            fields.insert(k.to_string(), v);
            rest = next;
        }
        out.push((name.to_string(), fields));
    }
    out
}

fn find<'a>(ev: &'a [(String, BTreeMap<String, String>)], name: &str) -> &'a BTreeMap<String, String> {
    &ev.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name} event in {ev:?}")).1
}

#[test]
fn debug_logs_one_structured_line_per_event() {
    if !common::require_root("debug_logs_one_structured_line_per_event") {
        return;
    }
    let (t, iface) = Topo::single();
    let ns = t.client.clone();
    let env = |debug: Option<&'static str>| {
        let mut e = vec![("SFUNNEL_RULESET", RULES), ("IFACES", iface.as_str()), ("DIRECTION", "egress")];
        e.push(("NETNS", ns.as_str()));
        if let Some(d) = debug {
            e.push(("DEBUG", d));
        }
        e
    };

    // First load, DEBUG=1: the ruleset, the attach path, the program, the
    // install and the attach, all naming the same program.
    let first = sfunnel(&[], &env(Some("1"))).expect_ok();
    let prog = printed_prog_id(&first.stdout, &iface, "egress").expect("program id printed").to_string();
    let ev = events(&first.stderr);
    eprintln!("DEBUG=1 load:\n{}", first.stderr);
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    // An egress ruleset that funnels makes its helper pair (the GSO detour),
    // whose segments go to every online CPU by default; the detour's
    // program is hooked before the attachment's own.
    let order = [
        "ruleset",
        "attach_mode",
        "prog_loaded",
        "checksum_state",
        "helper_created",
        "detour_cpus",
        "detour",
        "detour_hooked",
        "attached",
    ];
    let mut at = names.iter();
    for want in order {
        assert!(at.any(|n| *n == want), "{want} in the order {order:?}: {names:?}");
    }
    // On an empty hook the ruleset is staged and installed while the
    // program is being hooked (either may finish first), but always before
    // the load says it is attached.
    let pos = |want: &str| names.iter().position(|n| *n == want).unwrap_or_else(|| panic!("no {want}: {names:?}"));
    assert!(pos("staged") < pos("installed") && pos("installed") < pos("attached"), "{names:?}");
    let dev = find(&ev, "attach_mode")["ifindex"].clone();
    assert_eq!(find(&ev, "detour")["ifindex"], dev);
    let (gso_if, seg_if) = common::topology::helper_pair(dev.parse().expect("ifindex"), "egress");
    assert_eq!(find(&ev, "helper_created")["pair"], format!("{gso_if}/{seg_if}"));
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").expect("the online CPUs");
    assert_eq!(
        (find(&ev, "detour_cpus")["helper"].as_str(), find(&ev, "detour_cpus")["cpus"].as_str()),
        (seg_if.as_str(), online.trim())
    );
    assert_eq!(find(&ev, "ruleset")["detour_cpus"], "all");
    let helper_up = || common::topology::link_exists(&ns, &gso_if);
    assert!(helper_up(), "the helper pair exists after the load");
    assert_eq!(find(&ev, "ruleset")["rules"], "1");
    assert_eq!(find(&ev, "attach_mode")["iface"], iface);
    assert_eq!(find(&ev, "prog_loaded")["prog_id"], prog);
    assert_eq!(find(&ev, "staged")["egress"], "true");
    assert_eq!(find(&ev, "staged")["over_mtu"], "drop");
    let attached = find(&ev, "attached");
    assert_eq!((attached["prog_id"].as_str(), attached["direction"].as_str()), (prog.as_str(), "egress"));
    // TCX: the links are pinned (the detour's, then the attachment's), and
    // the pins named are there; clsact pins nothing.
    let pinned: Vec<String> = ev.iter().filter(|(n, _)| n == "pinned").map(|(_, f)| f["pin"].clone()).collect();
    let tcx = attached["mode"] == "tcx";
    assert_eq!(pinned.len(), if tcx { 2 } else { 0 }, "{pinned:?}");
    for p in &pinned {
        assert!(std::path::Path::new(p).exists(), "{p} is pinned");
    }

    // Without DEBUG (and with DEBUG=0) a rerun says nothing on stderr but
    // its banner.
    for debug in [None, Some("0")] {
        let quiet = sfunnel(&[], &env(debug)).expect_ok();
        let lines: Vec<&str> = quiet.stderr.lines().collect();
        assert!(lines.len() == 1 && is_banner(lines[0]), "DEBUG={debug:?}: stderr must be the banner alone: {lines:?}");
    }

    // A rerun with -v: updated in place, same program.
    let rerun = sfunnel(&["load", "-v", "--netns", &ns, "-i", &iface, "-d", "egress", RULES], &[]).expect_ok();
    let ev = events(&rerun.stderr);
    let updated = find(&ev, "updated");
    assert_eq!(updated["prog_id"].as_str(), prog.as_str());
    assert!(find(&ev, "installed").contains_key("generation"));

    // CLEAN=1 with DEBUG=1: the program comes off its hook before its
    // detour's pair goes, so no packet is sent to a pair that is gone.
    let clean =
        sfunnel(&[], &[("CLEAN", "1"), ("DEBUG", "1"), ("IFACES", &iface), ("NETNS", &ns), ("DIRECTION", "egress")])
            .expect_ok();
    let ev = events(&clean.stderr);
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    let detached = names.iter().position(|n| *n == "detached").expect("detached");
    let removed = names.iter().position(|n| *n == "helper_removed").expect("helper_removed");
    assert!(detached < removed, "detached before the pair went: {names:?}");
    assert!(!helper_up(), "unload removed the helper pair");
    for p in &pinned {
        assert!(!std::path::Path::new(p).exists(), "{p} unpinned");
    }
    t.teardown();
}
