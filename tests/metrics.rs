//! `sfunnel metrics`: the exposition of a live attachment that carried
//! real traffic passes Prometheus's own checker (`promtool check metrics`,
//! from Debian's prometheus package; scripts/setup.sh unpacks it), its
//! counters are those `status --json` shows, and `--listen` serves the
//! same over HTTP.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::topology::{nsh, run, sfunnel, status_json, Topo, BIN, NETNS_DIR};

/// promtool: target/tools/promtool (scripts/setup.sh), else on PATH.
fn promtool() -> String {
    let local = concat!(env!("CARGO_MANIFEST_DIR"), "/target/tools/promtool");
    if std::path::Path::new(local).exists() {
        return local.to_string();
    }
    let on_path = run(Command::new("sh").args(["-c", "command -v promtool"]), Duration::from_secs(5));
    assert!(
        on_path.ok(),
        "promtool is missing: run scripts/setup.sh (it unpacks Debian's promtool into target/tools/)"
    );
    on_path.stdout.trim().to_string()
}

/// `promtool check metrics` of `text`: its verdict and what it said.
fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), said)
}

/// The samples of `metric` whose labels include every `want` pair: their
/// full label text and value.
fn samples(text: &str, metric: &str, want: &[(&str, &str)]) -> BTreeMap<String, u64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| want.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .map(|l| {
            let (labels, value) = l.rsplit_once(' ').expect("a sample has a value");
            (labels.to_string(), value.parse().expect("an integer value"))
        })
        .collect()
}

fn one(text: &str, metric: &str, want: &[(&str, &str)]) -> u64 {
    let s = samples(text, metric, want);
    assert_eq!(s.len(), 1, "one {metric} with {want:?}:\n{text}");
    *s.values().next().unwrap()
}

/// A server we started, killed when dropped.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connecting to the exporter");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_string(), body.to_string())
}

#[test]
fn metrics_of_a_live_attachment_parse_and_match_status() {
    if !common::require_root("metrics_of_a_live_attachment_parse_and_match_status") {
        return;
    }
    // Dropped at the end (also on a failure), the topology unloads sfunnel
    // from its namespace and deletes it.
    let (topo, iface) = Topo::single();
    let ns = topo.client.clone();
    let peer = topo.rc_if.clone();
    let rules = "udp dport 4739 actions funnel tcp sport 540 dport 80\nudp dport 4740 actions accept";
    sfunnel(&["load", "--netns", &ns, "-i", &iface, "-d", "egress", rules], &[]).expect_ok();

    // Traffic out of the interface: the peer's address is set by hand, so
    // that no ARP is needed before the datagrams leave.
    let link: serde_json::Value =
        serde_json::from_str(&nsh(&ns, &["ip", "-j", "link", "show", "dev", &peer]).expect_ok().stdout).unwrap();
    let mac = link[0]["address"].as_str().expect("the peer's MAC address").to_string();
    nsh(&ns, &["ip", "neigh", "replace", "10.201.9.2", "lladdr", &mac, "dev", &iface, "nud", "permanent"]).expect_ok();
    let send = "for i in 1 2 3 4 5; do echo funnel-me > /dev/udp/10.201.9.2/4739; done; \
                for i in 1 2; do echo pass-me > /dev/udp/10.201.9.2/4740; done; \
                echo missed > /dev/udp/10.201.9.2/5000";
    nsh(&ns, &["bash", "-c", send]).expect_ok();

    let once = sfunnel(&["metrics", "-n", &ns], &[]);
    assert_eq!(once.code, 0, "{once:?}");
    let (ok, said) = promtool_check(&once.stdout);
    assert!(ok, "promtool check metrics failed: {said}\n{}", once.stdout);
    eprintln!("promtool check metrics: passed ({} lines){}", once.stdout.lines().count(), said.trim());

    // The same counters as status --json, read right after (no traffic
    // since).
    let path = format!("{NETNS_DIR}/{ns}");
    let a = status_json()
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["netns"] == path.as_str() && a["iface"] == iface.as_str())
        .cloned()
        .expect("the attachment in status");
    let base = [("netns", ns.as_str()), ("interface", iface.as_str()), ("direction", "egress")];
    for (i, r) in a["rules"].as_array().unwrap().iter().enumerate() {
        let index = i.to_string();
        let mut want = base.to_vec();
        want.extend([("rule", index.as_str()), ("rule_text", r["text"].as_str().unwrap())]);
        for (metric, field) in [
            ("sfunnel_rule_packets_total", "packets"),
            ("sfunnel_rule_bytes_total", "bytes"),
            ("sfunnel_rule_over_mtu_packets_total", "over_mtu"),
        ] {
            assert_eq!(Some(one(&once.stdout, metric, &want)), r[field].as_u64(), "{metric} of rule {i}");
        }
    }
    // …and those counters are the traffic's.
    assert_eq!(a["rules"][0]["packets"], 5, "{a}");
    assert_eq!(a["rules"][1]["packets"], 2, "{a}");
    let mut missed = base.to_vec();
    missed.push(("reason", "no_rule_matched"));
    assert!(one(&once.stdout, "sfunnel_passed_packets_total", &missed) >= 1);
    assert_eq!(
        Some(one(&once.stdout, "sfunnel_passed_packets_total", &missed)),
        a["passed"]["no_rule_matched"].as_u64()
    );
    let prog = a["prog_id"].to_string();
    let mut info = base.to_vec();
    info.extend([("program_id", prog.as_str()), ("state", "live"), ("version", env!("CARGO_PKG_VERSION"))]);
    assert_eq!(one(&once.stdout, "sfunnel_attachment_info", &info), 1);
    assert_eq!(one(&once.stdout, "sfunnel_attachment_rules", &base), 2);
    assert_eq!(one(&once.stdout, "sfunnel_detour_info", &base), 1, "a funneling attachment has its detour");

    // The exporter, in the test's namespace (whose loopback is up; a
    // vmtest guest's own is not): port 0 picks a free port, which it says
    // on stderr.
    // (nsenter, not `ip netns exec`, which remounts /sys without bpffs.)
    let mut child = Command::new("nsenter")
        .arg(format!("--net={NETNS_DIR}/{ns}"))
        .args([BIN, "metrics", "--listen", "127.0.0.1:0", "-n", &ns])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting the exporter");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let server = Server(child);
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("sfunnel: serving metrics at http://")
        .and_then(|r| r.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("the exporter's first line: {line}"))
        .to_string();
    let get = |path: &'static str| {
        let (ns, addr) = (ns.clone(), addr.clone());
        common::topology::in_ns(&ns.clone(), move || http_get(&addr, path))
    };
    let (head, body) = get("/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let (ok, said) = promtool_check(&body);
    assert!(ok, "promtool on the served metrics: {said}");
    // The rules' counters: only the test's datagrams reach them.  (The
    // passed ones also count what the interface sends of itself meanwhile,
    // IPv6 neighbour discovery say.)
    for metric in ["sfunnel_rule_packets_total", "sfunnel_rule_bytes_total"] {
        assert_eq!(samples(&body, metric, &base), samples(&once.stdout, metric, &base), "{metric} served vs printed");
    }
    let reasons = a["passed"].as_object().map_or(0, |p| p.len());
    assert!(reasons > 0, "{a}");
    assert_eq!(samples(&body, "sfunnel_passed_packets_total", &base).len(), reasons, "every reason:\n{body}");
    // Clients that connect and send nothing do not hold up a scrape (one
    // server thread would wait out each one's deadline, 7 × 5 s, longer
    // than http_get waits).
    let idle: Vec<TcpStream> = {
        let (ns, addr) = (ns.clone(), addr.clone());
        common::topology::in_ns(&ns.clone(), move || (0..7).map(|_| TcpStream::connect(&addr).unwrap()).collect())
    };
    let (head, _) = get("/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "a scrape beside 7 silent clients: {head}");
    drop(idle);
    let (head, _) = get("/nothing");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    drop(server);
}

#[test]
fn promtool_rejects_what_is_not_the_format() {
    // The checker is real: a malformed exposition fails it.
    let (ok, said) = promtool_check("# TYPE x counter\nx{a=\"1\" 3\n");
    assert!(!ok, "promtool accepted a malformed line: {said}");
}
