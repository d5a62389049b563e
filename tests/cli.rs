//! The command line and the environment interface as an operator meets
//! them: exit codes, a closed pipe, every error of a ruleset at once,
//! rules that can never match, empty variables, IFACES split on any
//! whitespace, the start-up banner, `unload`'s default directions, and
//! `status`'s filters, JSON document and JSON Lines.
//!
//! The tests that load need root (a throwaway namespace); the others run
//! anywhere.

mod common;

use std::io::Write as _;
use std::time::Duration;

use common::topology::{run, sfunnel, status_json, Topo, BIN};
use serde_json::Value;

fn bash(script: &str) -> common::topology::Out {
    run(std::process::Command::new("bash").args(["-c", script]), Duration::from_secs(60))
}

/// `n` distinct valid rules, one per line.
fn many_rules(n: usize) -> String {
    (0..n).map(|i| format!("tcp dport {} actions funnel tcp sport 540 dport 80\n", 1 + i)).collect()
}

fn temp_file(tag: &str, text: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("sfunnel-cli-{}-{tag}", std::process::id()));
    std::fs::File::create(&p).and_then(|mut f| f.write_all(text.as_bytes())).expect("writing a temp file");
    p
}

#[test]
fn a_closed_pipe_ends_quietly() {
    // More output than a pipe holds, so that `check` writes after `head`
    // has gone.
    let f = temp_file("pipe", &many_rules(5000));
    let out = bash(&format!("{BIN} check -f {} | head -1; echo \"rc=${{PIPESTATUS[0]}}\"", f.display()));
    let _ = std::fs::remove_file(&f);
    assert!(out.stdout.starts_with("tcp dport 1 actions funnel"), "{out:?}");
    assert!(out.stdout.contains("rc=0"), "check | head -1 should exit 0: {out:?}");
    assert!(!out.stderr.contains("panicked") && !out.stderr.contains("Broken pipe"), "{out:?}");

    // The same for stderr: a rule shadowing 2000 others is 2000 warnings
    // there.
    let f = temp_file("pipe2", &format!("tcp actions accept\n{}", many_rules(2000)));
    let out =
        bash(&format!("{BIN} check -f {} 2>&1 >/dev/null | head -1; echo \"rc=${{PIPESTATUS[0]}}\"", f.display()));
    let _ = std::fs::remove_file(&f);
    assert!(out.stdout.starts_with("warning: 2:1: this rule can never match"), "{out:?}");
    assert!(out.stdout.contains("rc=0"), "check 2>&1 | head -1 should exit 0: {out:?}");
}

#[test]
fn usage_errors_and_invalid_rulesets_have_their_own_exit_codes() {
    let usage = sfunnel(&["check", "--no-such-flag"], &[]);
    assert_eq!(usage.code, 64, "a usage error: {usage:?}");
    let usage = sfunnel(&["load", "-d", "sideways", "tcp accept"], &[]);
    assert_eq!(usage.code, 64, "a bad value: {usage:?}");
    let usage = sfunnel(&["status", "--interval", "inf"], &[]);
    assert_eq!(usage.code, 64, "seconds out of range: {usage:?}");
    // A bad variable in the environment interface is a usage error too.
    let usage = sfunnel(&[], &[("DIRECTION", "sideways"), ("SFUNNEL_RULESET", "tcp accept")]);
    assert_eq!(usage.code, 64, "a bad environment value: {usage:?}");
    assert!(usage.stderr.contains("sideways"), "{usage:?}");
    let invalid = sfunnel(&["check", "tcp dport 70000 accept"], &[]);
    assert_eq!(invalid.code, 2, "an invalid ruleset: {invalid:?}");
    let help = sfunnel(&["--help"], &[]);
    assert_eq!(help.code, 0, "{help:?}");
    assert!(help.stdout.contains("metrics"), "{help:?}");
}

#[test]
fn check_reports_every_error_with_its_position() {
    let rules = "tcp dport 80 actions accept\n\
                 udp sport 70000 actions drop\n\
                 frob tcp accept\n\
                 tcp dport 81 accept; tcp tcp accept\n\
                 # fine\n\
                 ip6 tcp saddr 10.0.0.1 accept\n\
                 tcp dport 82 # web; no action\n\
                 udp dport 83 accept\n";
    let out = sfunnel(&["check", rules], &[]);
    assert_eq!(out.code, 2, "{out:?}");
    // Each error: `line:col: message`, then the line and a caret.
    let positions: Vec<&str> = out
        .stderr
        .lines()
        .filter_map(|l| l.split_once(": ").map(|(p, _)| p))
        .filter(|p| p.split(':').count() == 2 && p.split(':').all(|n| n.parse::<u32>().is_ok()))
        .collect();
    // A `;` in a comment separates nothing: the rule before it has no
    // action, and the rules after it are still checked.
    assert_eq!(positions, ["2:11", "3:1", "4:26", "6:15", "7:13"], "{}", out.stderr);
    assert!(out.stderr.contains("5 errors"), "{}", out.stderr);
    assert_eq!(out.stderr.matches('^').count(), 5, "a caret under each: {}", out.stderr);

    let json = sfunnel(&["check", "--json", rules], &[]);
    assert_eq!(json.code, 2, "{json:?}");
    let doc: Value = serde_json::from_str(&json.stdout).expect("check --json prints JSON on an invalid ruleset");
    assert_eq!(doc["schema"], 1);
    assert_eq!(doc["valid"], false);
    let at: Vec<(u64, u64)> = doc["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| (e["line"].as_u64().unwrap(), e["col"].as_u64().unwrap()))
        .collect();
    assert_eq!(at, [(2, 11), (3, 1), (4, 26), (6, 15), (7, 13)]);

    // `load` reports them all too, and changes nothing (it never gets as
    // far as needing privileges).
    let load = sfunnel(&["load", "-i", "nonexistent0", rules], &[]);
    assert_eq!(load.code, 2, "{load:?}");
    assert_eq!(load.stderr.matches('^').count(), 5, "{}", load.stderr);
}

#[test]
fn check_warns_about_rules_that_can_never_match_and_strict_fails() {
    let rules = "tcp dport 1-1024 actions accept\ntcp dport 80 actions drop\nudp dport 80 actions drop\n";
    let out = sfunnel(&["check", rules], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("warning: 2:1: this rule can never match: rule 1 (line 1)"), "{}", out.stderr);
    assert!(out.stdout.contains("never matches"), "{}", out.stdout);
    let strict = sfunnel(&["check", "--strict", rules], &[]);
    assert_eq!(strict.code, 2, "{strict:?}");
    let json = sfunnel(&["check", "--json", rules], &[]);
    let doc: Value = serde_json::from_str(&json.stdout).expect("JSON");
    assert_eq!(doc["schema"], 1);
    assert_eq!(doc["warnings"].as_array().map(Vec::len), Some(1), "{doc}");
    assert_eq!(doc["warnings"][0]["rule"], 1);
    let shadowed: Vec<bool> = doc["rules"].as_array().unwrap().iter().map(|r| r["shadowed"] == true).collect();
    assert_eq!(shadowed, [false, true, false]);
    assert_eq!(doc["rules"][1]["text"], "tcp dport 80 actions drop");
    // Nothing shadowed: --strict passes.
    assert_eq!(sfunnel(&["check", "--strict", "tcp dport 80 accept; tcp drop"], &[]).code, 0);
}

#[test]
fn an_empty_ruleset_variable_falls_back_to_the_file() {
    // As 0.0.11: SFUNNEL_RULESET="" is unset, so the default file is read.
    let file = std::path::Path::new(sfunnel::cli::DEFAULT_RULESET_FILE);
    let out = sfunnel(&["check"], &[("SFUNNEL_RULESET", "")]);
    if file.exists() {
        assert!(out.stdout.contains(&format!("from {}", file.display())), "{out:?}");
    } else {
        assert_eq!(out.code, 1, "no ruleset anywhere is an error, not an empty ruleset: {out:?}");
        assert!(out.stderr.contains("no ruleset to check") && out.stderr.contains("/etc/sfunnel/ruleset"), "{out:?}");
    }
    // An empty setting is its default; blanks are a value, and a bad one.
    for var in ["DIRECTION", "N_ATTEMPTS", "RETRY_DELAY", "DEBUG", "OVER_MTU", "SFUNNEL_LOCK_TIMEOUT"] {
        let out = sfunnel(&["load", "-i", "x", "tcp dport 70000 accept"], &[(var, "")]);
        assert_eq!(out.code, 2, "{var}=\"\" is its default, so the ruleset's error is what stops the load: {out:?}");
        let out = sfunnel(&["load", "-i", "x", "tcp dport 70000 accept"], &[(var, " ")]);
        assert_eq!(out.code, 64, "{var}=\" \" is a usage error: {out:?}");
    }
}

/// One namespace with two interfaces; dropping it removes everything
/// (the topology unloads sfunnel from the namespace, then deletes it).
struct Pod {
    _topo: Topo,
    ns: String,
    a: String,
    b: String,
}

impl Pod {
    fn new() -> Pod {
        let (topo, a) = Topo::single();
        let ns = topo.client.clone();
        let b = topo.rc_if.clone();
        Pod { _topo: topo, ns, a, b }
    }

    fn mine(&self) -> Vec<Value> {
        let path = format!("{}/{}", common::topology::NETNS_DIR, self.ns);
        status_json().as_array().into_iter().flatten().filter(|a| a["netns"] == path.as_str()).cloned().collect()
    }

    /// (interface, direction) of each of its attachments, sorted.
    fn hooks(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .mine()
            .iter()
            .map(|a| (a["iface"].as_str().unwrap().to_string(), a["direction"].as_str().unwrap().to_string()))
            .collect();
        v.sort();
        v
    }

    fn pair(&self, iface: &str, dir: &str) -> (String, String) {
        (iface.to_string(), dir.to_string())
    }
}

#[test]
fn the_environment_interface_reads_like_the_original() {
    if !common::require_root("the_environment_interface_reads_like_the_original") {
        return;
    }
    let pod = Pod::new();
    // Empty settings are their defaults (ingress, 6 attempts, 3 s, quiet);
    // IFACES is split on tabs and newlines too.
    let ifaces = format!("\t{}\n {} ", pod.a, pod.b);
    let out = sfunnel(
        &[],
        &[
            ("SFUNNEL_RULESET", "udp dport 4739 actions funnel tcp sport 540 dport 80"),
            ("IFACES", &ifaces),
            ("NETNS", &pod.ns),
            ("DIRECTION", ""),
            ("N_ATTEMPTS", ""),
            ("RETRY_DELAY", ""),
            ("DEBUG", ""),
        ],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(pod.hooks(), [pod.pair(&pod.a, "ingress"), pod.pair(&pod.b, "ingress")], "{out:?}");
    // The banner: version, kernel, attach mode, and what it read.
    let banner = out.stderr.lines().next().unwrap_or("");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(banner.starts_with(&format!("sfunnel {} ", env!("CARGO_PKG_VERSION"))), "{banner}");
    assert!(banner.contains(&format!("kernel {}", kernel.trim())), "{banner}");
    assert!(banner.contains("attach tcx") || banner.contains("attach clsact"), "{banner}");
    assert!(banner.contains(&format!("IFACES=\"{} {}\"", pod.a, pod.b)), "{banner}");
    assert!(banner.contains("NETNS=") && !banner.contains("DIRECTION="), "empty ones are unset: {banner}");

    // CLEAN=1 without DIRECTION removes ingress, as 0.0.11 did.
    let both = sfunnel(&["load", "--netns", &pod.ns, "-i", &pod.a, "-d", "both", "udp accept"], &[]);
    assert_eq!(both.code, 0, "{both:?}");
    let clean = sfunnel(&[], &[("CLEAN", "1"), ("IFACES", &pod.a), ("NETNS", &pod.ns)]);
    assert_eq!(clean.code, 0, "{clean:?}");
    assert_eq!(pod.hooks(), [pod.pair(&pod.a, "egress"), pod.pair(&pod.b, "ingress")]);
}

#[test]
fn unload_defaults_to_both_directions() {
    if !common::require_root("unload_defaults_to_both_directions") {
        return;
    }
    let pod = Pod::new();
    let load = sfunnel(&["load", "--netns", &pod.ns, "-i", &pod.a, "-d", "both", "udp accept"], &[]);
    assert_eq!(load.code, 0, "{load:?}");
    assert_eq!(pod.hooks(), [pod.pair(&pod.a, "egress"), pod.pair(&pod.a, "ingress")]);
    let unload = sfunnel(&["unload", "--netns", &pod.ns, "-i", &pod.a], &[]);
    assert_eq!(unload.code, 0, "{unload:?}");
    assert!(unload.stdout.contains("ingress: unloaded") && unload.stdout.contains("egress: unloaded"), "{unload:?}");
    assert_eq!(pod.hooks(), []);
}

#[test]
fn status_filters_and_names_and_prints_json_lines() {
    if !common::require_root("status_filters_and_names_and_prints_json_lines") {
        return;
    }
    let pod = Pod::new();
    let a = sfunnel(&["load", "--netns", &pod.ns, "-i", &pod.a, "udp dport 1 accept"], &[]);
    let b = sfunnel(&["load", "--netns", &pod.ns, "-i", &pod.b, "-d", "egress", "tcp dport 2 drop"], &[]);
    assert!(a.ok() && b.ok(), "{a:?}\n{b:?}");
    let cookie = common::topology::netns_cookie(&pod.ns).to_string();
    let path = format!("{}/{}", common::topology::NETNS_DIR, pod.ns);
    let select = |args: &[&str]| -> Vec<(String, String)> {
        let mut argv = vec!["status", "--json"];
        argv.extend(args);
        let out = sfunnel(&argv, &[]);
        assert_eq!(out.code, 0, "{out:?}");
        let doc: Value = serde_json::from_str(&out.stdout).expect("JSON");
        assert_eq!(doc["schema"], 1);
        let mut v: Vec<(String, String)> = doc["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| (a["iface"].as_str().unwrap().to_string(), a["direction"].as_str().unwrap().to_string()))
            .collect();
        v.sort();
        v
    };
    let both = vec![pod.pair(&pod.b, "egress"), pod.pair(&pod.a, "ingress")];
    let mut sorted = both.clone();
    sorted.sort();
    assert_eq!(select(&["-n", &pod.ns]), sorted, "by name");
    assert_eq!(select(&["-n", &path]), sorted, "by path");
    assert_eq!(select(&["-n", &cookie]), sorted, "by cookie");
    assert_eq!(select(&["-n", &pod.ns, "-i", &pod.a]), [pod.pair(&pod.a, "ingress")]);
    assert_eq!(select(&["-n", &pod.ns, "-d", "egress"]), [pod.pair(&pod.b, "egress")]);
    assert_eq!(select(&["-n", &pod.ns, "-i", &pod.a, "-d", "egress"]), []);
    let missing = sfunnel(&["status", "-n", "sfunnel-no-such-netns"], &[]);
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(missing.stderr.contains("ip netns list"), "{missing:?}");

    // Named by its name; each rule carries its text and counters.
    let mine = pod.mine();
    let a = mine.iter().find(|x| x["iface"] == pod.a.as_str()).expect("a");
    assert_eq!(a["netns_name"], pod.ns.as_str());
    assert_eq!(a["netns_cookie"].as_u64().map(|c| c.to_string()), Some(cookie.clone()));
    assert_eq!(a["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(a["live"], true);
    assert_eq!(a["rules"][0]["text"], "udp dport 1 actions accept");
    assert_eq!(a["rules"][0]["packets"], 0);
    assert!(a["passed"]["not_ip_tcp_udp"].is_u64(), "{a}");
    let text = sfunnel(&["status", "-n", &pod.ns, "-i", &pod.a], &[]);
    assert!(text.stdout.starts_with(&format!("netns {} {} ingress: ", pod.ns, pod.a)), "{text:?}");

    // --interval with --json: one compact document per line.
    let out = bash(&format!("{BIN} status --json --interval 0.3 -n {} | head -n 2", pod.ns));
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "JSON Lines: {out:?}");
    for l in &lines {
        let doc: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON document a line ({e}): {l}"));
        assert_eq!(doc["schema"], 1);
        assert_eq!(doc["attachments"].as_array().map(Vec::len), Some(2), "{l}");
    }
    // …and a reader that goes: the loop ends, quietly, with 0.
    let out = bash(&format!("{BIN} status --interval 0.2 -n {} | head -1; echo \"rc=${{PIPESTATUS[0]}}\"", pod.ns));
    assert!(out.stdout.contains("rc=0") && !out.stderr.contains("panicked"), "{out:?}");
}

#[test]
fn status_says_when_it_cannot_read() {
    if !common::require_root("status_says_when_it_cannot_read") {
        return;
    }
    // A user namespace's root has every capability there, but BPF objects
    // answer to the initial namespace's: nothing can be read.
    let out = run(
        std::process::Command::new("unshare").args(["--user", "--map-root-user", BIN, "status"]),
        Duration::from_secs(30),
    );
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("Operation not permitted") && out.stderr.contains("CAP_SYS_ADMIN"), "{out:?}");
}

#[test]
fn each_wait_for_a_missing_interface_is_a_warning() {
    if !common::require_root("each_wait_for_a_missing_interface_is_a_warning") {
        return;
    }
    let pod = Pod::new();
    let late = format!("{}l", pod.a);
    // An interface that comes after the first tries: a warning each wait,
    // then the load.  It is made once two waits have been said.
    let mut child = common::topology::sfunnel_cmd(
        &["load", "--netns", &pod.ns, "-i", &late, "udp accept"],
        &[("N_ATTEMPTS", "400"), ("RETRY_DELAY", "0.25")],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("starting sfunnel load");
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut said = Vec::new();
    while said.iter().filter(|l: &&String| l.starts_with("warning: interface")).count() < 2 {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut stderr, &mut line).unwrap_or(0) == 0 {
            break;
        }
        said.push(line.trim_end().to_string());
    }
    let made = common::topology::nsh(
        &pod.ns,
        &["ip", "link", "add", &late, "type", "veth", "peer", "name", &format!("{late}p")],
    );
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
    let status = child.wait().expect("waiting for sfunnel load");
    said.extend(rest.lines().map(str::to_string));
    made.expect_ok();
    assert!(status.success(), "{said:?}");
    let waits: Vec<&String> = said.iter().filter(|l| l.starts_with("warning: interface")).collect();
    assert!(waits.len() >= 2, "a warning per wait: {said:?}");
    for (i, w) in waits.iter().enumerate() {
        assert!(w.contains(&format!("{late} not found (attempt {} of 400)", i + 1)), "{w}");
    }
    assert_eq!(pod.hooks(), [pod.pair(&late, "ingress")]);
    // One that never comes: every wait said, then an error that says what
    // to check.
    let out = sfunnel(
        &["load", "--netns", &pod.ns, "-i", "sfnosuch0", "udp accept"],
        &[("N_ATTEMPTS", "3"), ("RETRY_DELAY", "0.1")],
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.stderr.matches("warning: interface sfnosuch0 not found").count(), 2, "{out:?}");
    assert!(out.stderr.contains("after 3 attempts"), "{out:?}");
}

#[test]
fn an_empty_ruleset_variable_reads_the_default_file() {
    if !common::require_root("an_empty_ruleset_variable_reads_the_default_file") {
        return;
    }
    // /etc/sfunnel/ruleset written in a mount namespace of the test's own:
    // a tmpfs on /etc holds links to the real /etc's entries (bound
    // aside) and the ruleset, so that the machine's /etc is never touched
    // (an overlay would not take every root filesystem, 9p say).
    let host_file = std::path::Path::new(sfunnel::cli::DEFAULT_RULESET_FILE);
    let host_before = std::fs::read(host_file).ok();
    let t = std::env::temp_dir().join(format!("sfunnel-cli-etc-{}", std::process::id()));
    std::fs::create_dir_all(&t).unwrap();
    let script = format!(
        "set -e; t={}; mount -t tmpfs none $t; mkdir $t/etc; mount --bind /etc $t/etc; mount -t tmpfs none /etc; \
         for e in $t/etc/* $t/etc/.[!.]*; do [ -e \"$e\" ] && ln -s \"$e\" /etc/ || true; done; \
         mkdir -p /etc/sfunnel; echo 'tcp dport 7 actions accept' > /etc/sfunnel/ruleset; \
         echo '--- empty'; SFUNNEL_RULESET= {BIN} check; \
         echo '--- blanks'; SFUNNEL_RULESET=' ' {BIN} check; \
         echo '--- set'; SFUNNEL_RULESET='udp dport 9 actions drop' {BIN} check",
        t.display()
    );
    let out = run(
        std::process::Command::new("unshare").args(["--mount", "--propagation", "private", "bash", "-c", &script]),
        Duration::from_secs(120),
    );
    let _ = std::fs::remove_dir(&t);
    assert!(out.ok(), "{out:?}");
    let parts: Vec<&str> = out.stdout.split("--- ").skip(1).collect();
    assert_eq!(parts.len(), 3, "{out:?}");
    assert!(
        parts[0].contains("tcp dport 7 actions accept") && parts[0].contains("from /etc/sfunnel/ruleset"),
        "{out:?}"
    );
    // Blanks only are a ruleset with no rules, given on purpose.
    assert!(parts[1].contains("# 0 rules from $SFUNNEL_RULESET"), "{out:?}");
    assert!(parts[2].contains("udp dport 9 actions drop") && parts[2].contains("from $SFUNNEL_RULESET"), "{out:?}");
    assert_eq!(std::fs::read(host_file).ok(), host_before, "the host's {} is untouched", host_file.display());
}

#[test]
fn status_and_metrics_exit_3_when_an_attachment_cannot_be_read() {
    if !common::require_root("status_and_metrics_exit_3_when_an_attachment_cannot_be_read") {
        return;
    }
    let pod = Pod::new();
    sfunnel(&["load", "--netns", &pod.ns, "-i", &pod.a, "udp dport 1 accept"], &[]).expect_ok();
    let a = pod.mine().into_iter().next().expect("the attachment");
    let (prog, gen) = (a["prog_id"].as_u64().unwrap(), a["generation"].as_u64().unwrap());
    // Take the active generation's counters away from it (as damage from
    // outside would): its maps can no longer be read whole.
    let show = run(
        std::process::Command::new("bpftool").args(["-j", "prog", "show", "id", &prog.to_string()]),
        Duration::from_secs(10),
    );
    let maps: Value = serde_json::from_str(&show.stdout).expect("bpftool prog show");
    let outer = maps["map_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_u64().unwrap().to_string())
        .find(|id| {
            let m = run(
                std::process::Command::new("bpftool").args(["-j", "map", "show", "id", id]),
                Duration::from_secs(10),
            );
            serde_json::from_str::<Value>(&m.stdout).is_ok_and(|v| v["name"] == "sf_counter_maps")
        })
        .expect("the program's sf_counter_maps");
    let key = (gen as u32).to_le_bytes().map(|b| b.to_string());
    let mut del = std::process::Command::new("bpftool");
    del.args(["map", "delete", "id", &outer, "key"]).args(&key);
    run(&mut del, Duration::from_secs(10)).expect_ok();

    let status = sfunnel(&["status", "-n", &pod.ns], &[]);
    assert_eq!(status.code, 3, "{status:?}");
    assert!(status.stderr.contains(&format!("could not read: {} ingress (program {prog})", pod.a)), "{status:?}");
    assert!(status.stdout.contains("problem: reading its maps"), "{status:?}");
    let metrics = sfunnel(&["metrics", "-n", &pod.ns], &[]);
    assert_eq!(metrics.code, 3, "{metrics:?}");
    assert!(metrics.stdout.lines().any(|l| l == "sfunnel_read_problems 1"), "{}", metrics.stdout);
    // What the filter leaves out is not a problem of this run.
    let other = sfunnel(&["status", "-n", &pod.ns, "-i", &pod.b], &[]);
    assert_eq!(other.code, 0, "{other:?}");
    // …and the damaged attachment still unloads.
    let unload = sfunnel(&["unload", "--netns", &pod.ns, "-i", &pod.a], &[]);
    assert_eq!(unload.code, 0, "{unload:?}");
    assert_eq!(pod.hooks(), []);
}
