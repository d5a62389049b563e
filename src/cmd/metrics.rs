//! `sfunnel metrics`: the counters of `status`, in Prometheus's text
//! exposition format (version 0.0.4), printed once for node_exporter's
//! textfile collector or served over HTTP with `--listen`.
//!
//! Every series carries the attachment's labels: `netns_cookie` (what
//! identifies the namespace for the kernel's lifetime), `netns` (its name
//! under /var/run/netns, else empty), `interface` and `direction`.  The
//! metric names and their labels are listed in docs/operations.md.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::status::{gather, Attachment, STAT_NAMES};
use super::Outcome;
use crate::cli::{Filter, MetricsArgs};
use crate::output::errln;

/// The media type of the text format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn run(args: &MetricsArgs) -> Result<Outcome> {
    crate::caps::require_for_read()?;
    match args.listen {
        None => {
            let (text, problems) = render(&args.filter)?;
            crate::output::line(format_args!("{}", text.trim_end_matches('\n')));
            Ok(if problems == 0 { Outcome::Ok } else { Outcome::Partial })
        }
        Some(addr) => serve(addr, &args.filter),
    }
}

/// The exposition of what `filter` selects, and how many things could not
/// be read.
pub fn render(filter: &Filter) -> Result<(String, usize)> {
    let (list, problems) = gather(filter)?;
    Ok((exposition(&list, problems.len()), problems.len()))
}

/// One metric family: its header, then its samples.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(String, u64)>,
}

impl Family {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Family {
        Family { name, kind, help, samples: Vec::new() }
    }

    fn add(&mut self, labels: &str, value: u64) {
        self.samples.push((labels.to_string(), value));
    }
}

/// A label value in the text format: `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// `k="v",…` for the given pairs.
fn labels(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect::<Vec<_>>().join(",")
}

/// [`labels`] of the attachment's `base` pairs, then `extra`.
fn labels_with(base: &[(&str, &str)], extra: &[(&str, &str)]) -> String {
    labels(&[base, extra].concat())
}

/// The exposition text of `list`.
pub fn exposition(list: &[Attachment], problems: usize) -> String {
    let mut info = Family::new(
        "sfunnel_attachment_info",
        "gauge",
        "An sfunnel attachment, 1 each; its mode, program, state, version and layout are labels.",
    );
    let mut live = Family::new(
        "sfunnel_attachment_live",
        "gauge",
        "1 for each live attachment (on its hook); the series below are of live attachments only.",
    );
    let mut rules = Family::new("sfunnel_attachment_rules", "gauge", "Rules in the attachment's loaded ruleset.");
    let mut packets = Family::new(
        "sfunnel_rule_packets_total",
        "counter",
        "Packets a rule matched and acted on (funneled, unfunneled, accepted or dropped).",
    );
    let mut bytes = Family::new("sfunnel_rule_bytes_total", "counter", "Bytes of those packets, as they arrived.");
    let mut over_mtu = Family::new(
        "sfunnel_rule_over_mtu_packets_total",
        "counter",
        "Packets a funnel rule left out because funneled they would exceed the MTU (dropped or passed, per \
         --over-mtu).",
    );
    let mut per_cpu = Family::new(
        "sfunnel_rule_cpu_packets_total",
        "counter",
        "Packets a rule acted on, by the CPU that did it (for a funnel rule's GSO segments: the CPUs of \
         --detour-cpus); only CPUs that counted any.",
    );
    let mut passed = Family::new(
        "sfunnel_passed_packets_total",
        "counter",
        "Packets the attachment left unchanged, by reason (no_rule_matched, not_ip_tcp_udp, ...).",
    );
    let mut detour = Family::new(
        "sfunnel_detour_info",
        "gauge",
        "The segmentation detour of an attachment that funnels, 1 each; its helper interfaces are labels.",
    );
    let mut seen = std::collections::HashSet::new();
    for a in list {
        let Some(prog) = a.prog_id else { continue };
        let cookie = a.netns_cookie.to_string();
        let netns = a.netns_name.clone().unwrap_or_default();
        let base = [
            ("netns_cookie", cookie.as_str()),
            ("netns", netns.as_str()),
            ("interface", a.iface.as_str()),
            ("direction", a.direction.as_str()),
        ];
        let prog = prog.to_string();
        let mode = a.mode.map_or("", |m| m.as_str());
        let version = a.version.clone().unwrap_or_default();
        let layout = a.layout.map_or(String::new(), |l| l.to_string());
        let extra = [
            ("mode", mode),
            ("program_id", prog.as_str()),
            ("state", a.state.as_str()),
            ("version", version.as_str()),
            ("layout", layout.as_str()),
        ];
        info.add(&labels_with(&base, &extra), 1);
        // Counters once per attachment: a program a loader is still
        // setting up for the same hook is not counted twice.
        if !a.live || !seen.insert((a.netns_cookie, a.iface.clone(), a.direction)) {
            continue;
        }
        let b = labels(&base);
        live.add(&b, 1);
        rules.add(&b, a.rules.len() as u64);
        for r in &a.rules {
            let index = r.index.to_string();
            let rl = labels_with(&base, &[("rule", index.as_str()), ("rule_text", r.text.as_str())]);
            packets.add(&rl, r.counters.packets);
            bytes.add(&rl, r.counters.bytes);
            over_mtu.add(&rl, r.counters.over_mtu);
            for (cpu, n) in &r.counters.packets_per_cpu {
                let cpu = cpu.to_string();
                per_cpu.add(&labels_with(&base, &[("rule", index.as_str()), ("cpu", cpu.as_str())]), *n);
            }
        }
        for (reason, _) in STAT_NAMES {
            passed.add(&labels_with(&base, &[("reason", reason)]), a.passed.get(reason).copied().unwrap_or(0));
        }
        if let Some(d) = &a.detour {
            let extra = [("out", d.out.as_str()), ("in", d.r#in.as_str()), ("back", d.back.as_str())];
            detour.add(&labels_with(&base, &extra), 1);
        }
    }
    let mut build = Family::new("sfunnel_build_info", "gauge", "The sfunnel that made this exposition, 1.");
    let layout = crate::datapath::consts::SFUNNEL_ABI_VERSION.to_string();
    build.add(&labels(&[("version", env!("CARGO_PKG_VERSION")), ("layout", layout.as_str())]), 1);
    let mut unread = Family::new(
        "sfunnel_read_problems",
        "gauge",
        "Things this scrape could not read (programs the kernel would not open, maps that failed); they are \
         missing above.",
    );
    unread.add("", problems as u64);

    let mut out = String::new();
    for f in [build, unread, info, live, rules, packets, bytes, over_mtu, per_cpu, passed, detour] {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for (l, v) in &f.samples {
            if l.is_empty() {
                let _ = writeln!(out, "{} {v}", f.name);
            } else {
                let _ = writeln!(out, "{}{{{l}}} {v}", f.name);
            }
        }
    }
    out
}

/// Connections answered at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 8;

/// How long a client has to send its request, all of it.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `addr` until the process is stopped.  Each
/// connection is answered on a thread of its own, at most
/// [`MAX_CONNECTIONS`] at once, and must send its request within
/// [`REQUEST_DEADLINE`]: a slow or silent client holds one thread for that
/// long, never the exporter.
fn serve(addr: std::net::SocketAddr, filter: &Filter) -> Result<Outcome> {
    let listener = TcpListener::bind(addr)
        .with_context(|| format!("listening on {addr} (is the port in use, or the address not on this host?)"))?;
    errln!("sfunnel: serving metrics at http://{}/metrics", listener.local_addr()?);
    let busy = Arc::new((Mutex::new(0usize), Condvar::new()));
    let filter = Arc::new(filter.clone());
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                errln!("warning: accepting a metrics connection: {e}");
                continue;
            }
        };
        {
            let (n, freed) = &*busy;
            let mut n = freed.wait_while(n.lock().unwrap(), |n| *n >= MAX_CONNECTIONS).unwrap();
            *n += 1;
        }
        let (busy, filter) = (busy.clone(), filter.clone());
        std::thread::spawn(move || {
            if let Err(e) = answer(conn, &filter) {
                errln!("warning: a metrics request: {e:#}");
            }
            let (n, freed) = &*busy;
            *n.lock().unwrap() -= 1;
            freed.notify_one();
        });
    }
    Ok(Outcome::Ok)
}

/// Reads the request line and headers, each read bounded by what is left
/// of the deadline.
fn read_request(conn: &TcpStream) -> Result<String> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut reader = BufReader::new(conn.try_clone()?.take(16 * 1024));
    let mut request = String::new();
    let mut line = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(!left.is_zero(), "the client did not send its request within {REQUEST_DEADLINE:?}");
        conn.set_read_timeout(Some(left))?;
        line.clear();
        // The first line is the request; the headers, which nothing here
        // needs, end at an empty line.
        if reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
            return Ok(request);
        }
        if request.is_empty() {
            request = line.clone();
        }
    }
}

/// Reads one request and answers it.
fn answer(conn: TcpStream, filter: &Filter) -> Result<()> {
    conn.set_write_timeout(Some(REQUEST_DEADLINE))?;
    let request = read_request(&conn)?;
    let mut parts = request.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => match render(filter) {
            Ok((text, _)) => ("200 OK", CONTENT_TYPE, text),
            Err(e) => ("500 Internal Server Error", "text/plain", format!("{e:#}\n")),
        },
        ("GET" | "HEAD", "/") => ("200 OK", "text/plain", "sfunnel metrics: GET /metrics\n".to_string()),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found: the metrics are at /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".to_string()),
    };
    let mut w = conn;
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    if method != "HEAD" {
        w.write_all(body.as_bytes())?;
    }
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a "b" \c"#), r#"a \"b\" \\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
        assert_eq!(labels(&[("a", "1"), ("b", "\"")]), r#"a="1",b="\"""#);
    }
}
