//! `sfunnel demo`, the README's first command, end to end: it must carry
//! every flow (UDP over IPv4 and IPv6, TCP) funneled, say so, exit 0, and
//! leave no namespace or pin behind.  Root only.

mod common;

use common::topology::{sfunnel, sh, status_json};

#[test]
fn demo_funnels_every_flow_and_removes_what_it_made() {
    if !common::require_root("demo_funnels_every_flow_and_removes_what_it_made") {
        return;
    }
    let out = sfunnel(&["demo"], &[]);
    println!("{}", out.stdout);
    assert!(out.ok(), "sfunnel demo failed ({}): {}\n{}", out.code, out.stderr, out.stdout);
    for line in [
        "UDP: 5/5 datagrams arrived intact",
        "UDP over IPv6: 5/5 datagrams arrived intact",
        "TCP: 4000/4000 bytes echoed back",
        "0 to 4739/8080 (should be 0)",
        "demo OK",
    ] {
        assert!(out.stdout.contains(line), "the demo's output lacks {line:?}:\n{}", out.stdout);
    }
    // Its namespaces are named after its pid; none may be left.
    let left: Vec<String> =
        sh(&["ip", "netns", "list"]).stdout.lines().filter(|l| l.starts_with("sfdemo-")).map(str::to_string).collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    // Nor any pinned attachment of its interfaces.
    let status = status_json();
    let pinned: Vec<&serde_json::Value> = status
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["iface"].as_str().is_some_and(|i| i.starts_with("sfdemo")))
        .collect();
    assert!(pinned.is_empty(), "attachments left pinned: {pinned:?}");
}
