//! What an attachment holds once its namespace or interface is gone (root;
//! real namespaces and veths, loaded by the binary).  A clsact filter goes
//! with its interface and the kernel frees the program and its maps at
//! once; a pinned TCX link stays, hooked on nothing, until `gc` (or any
//! load or unload) removes its pin.  Live attachments are never touched.

mod common;

use std::process::Command;

use common::topology::{prog_name, sfunnel, sh, status_json, unique_stems, Namespaces, BIN};

/// The program id of the attachment on `iface` `direction` in `ns`.
fn prog_of(ns: &str, iface: &str, direction: &str) -> Option<u32> {
    let path = format!("/var/run/netns/{ns}");
    status_json()
        .as_array()?
        .iter()
        .find(|a| a["netns"] == path.as_str() && a["iface"] == iface && a["direction"] == direction)
        .and_then(|a| a["prog_id"].as_u64())
        .map(|i| i as u32)
}

#[test]
fn dead_attachments_are_freed_and_live_ones_kept() {
    if !common::require_root("dead_attachments_are_freed_and_live_ones_kept") {
        return;
    }
    let (stem, ifs) = unique_stems();
    let mut nss = Namespaces::default();
    let mut gone_nss = Namespaces::default();
    let ns = |tag: &str| format!("{stem}{tag}");
    let ifc = |tag: &str, end: &str| format!("{ifs}{tag}{end}");
    for tag in ["g", "l", "i"] {
        if tag == "g" { &mut gone_nss } else { &mut nss }.add(&ns(tag));
        sh(&["ip", "-n", &ns(tag), "link", "add", &ifc(tag, "a"), "type", "veth", "peer", "name", &ifc(tag, "b")]);
        sh(&["ip", "-n", &ns(tag), "link", "set", &ifc(tag, "a"), "up"]);
        sfunnel(
            &["load", "udp dport 4739 actions accept", "--netns", &ns(tag), "-d", "both", "-i", &ifc(tag, "a")],
            &[],
        )
        .expect_ok();
    }
    let progs = |tag: &str| -> Vec<u32> {
        ["ingress", "egress"].iter().filter_map(|d| prog_of(&ns(tag), &ifc(tag, "a"), d)).collect()
    };
    let (gone, live, ifdel) = (progs("g"), progs("l"), progs("i"));
    assert_eq!((gone.len(), live.len(), ifdel.len()), (2, 2, 2), "each target loaded");
    let tcx = common::topology::kernel_has_tcx();

    // The namespace goes away with no unload, as when a pod dies; in
    // another namespace only the interface goes.
    std::mem::forget(gone_nss);
    sh(&["ip", "netns", "del", &ns("g")]);
    sh(&["ip", "-n", &ns("i"), "link", "del", &ifc("i", "a")]);
    // The kernel frees a program once nothing holds it; that takes a grace
    // period or two.
    let alive = |ids: &[u32]| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let n = ids.iter().filter(|id| prog_name(**id).is_some()).count();
            if n == 0 || std::time::Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    // The kernel tears a deleted namespace down in the background: wait
    // (30 s at most) until none of its attachments reads live.
    let dead_states = || -> Vec<String> {
        status_json()
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| {
                a["prog_id"].as_u64().is_some_and(|i| gone.contains(&(i as u32)) || ifdel.contains(&(i as u32)))
            })
            .map(|a| format!("{} {}: {}", a["iface"], a["direction"], a["state"]))
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut states = dead_states();
    while states.iter().any(|s| s.contains("\"live\"")) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        states = dead_states();
    }
    // TCX links hold their programs until gc: nothing to wait for there.
    let count = |ids: &[u32]| if tcx { ids.iter().filter(|id| prog_name(**id).is_some()).count() } else { alive(ids) };
    let before_gc = (count(&gone), count(&ifdel));
    let gc = Command::new(BIN).arg("gc").output().expect("gc runs");
    let gc_out = String::from_utf8_lossy(&gc.stdout).into_owned();
    let after_gc = (alive(&gone), alive(&ifdel), alive(&live));
    eprintln!(
        "\n=== gc ({}) ===\nprograms: gone namespace {gone:?}, live {live:?}, deleted interface {ifdel:?}\n\
         status of the dead ones before gc: {states:?}\nstill loaded before gc (gone, interface deleted): \
         {before_gc:?}\ngc said:\n  {}\nstill loaded after gc (gone, interface deleted, live): {after_gc:?}",
        if tcx { "TCX" } else { "clsact" },
        gc_out.trim().replace('\n', "\n  ")
    );
    assert!(gc.status.success(), "{}", String::from_utf8_lossy(&gc.stderr));
    if tcx {
        // Pinned links hold them until gc, which says why it removed each.
        assert_eq!(before_gc, (2, 2), "TCX links keep their programs until gc");
        assert!(states.iter().all(|s| s.contains("dead")), "status calls them dead: {states:?}");
        assert_eq!(gc_out.matches("its interface is gone").count(), 4, "{gc_out}");
    } else {
        // The filters went with the interfaces, and with them everything.
        assert_eq!(before_gc, (0, 0), "clsact programs are freed with their interface");
        assert!(gc_out.contains("removed 0 pin(s)"), "{gc_out}");
    }
    assert_eq!(after_gc, (0, 0, 2), "dead ones freed, live ones kept");

    // The live attachment still works after gc: a rerun updates it in place.
    let rerun =
        sfunnel(&["load", "udp dport 4739 actions drop", "--netns", &ns("l"), "-i", &ifc("l", "a")], &[]).expect_ok();
    assert!(rerun.stdout.contains("updated in place"), "{}", rerun.stdout);
    drop(nss);
}
