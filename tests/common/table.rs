//! Table-driven PROG_TEST_RUN cases, for the IPv4 and the IPv6 datapath
//! tests alike: one ruleset and one frame, with the verdict, the bytes, the
//! rule counter and the skip statistic the specification expects of them.
//! The expected bytes come from each test's oracle (`packet`, `packet6`).

use sfunnel::datapath::consts::SFUNNEL_STAT_MAX;
use sfunnel::datapath::RuleCounter;

use super::packet::hex;
use super::{Prog, TC_ACT_UNSPEC};

pub struct Case {
    pub name: String,
    pub rules: String,
    pub input: Vec<u8>,
    pub verdict: i32,
    pub output: Vec<u8>,
    /// Index of the rule that must match (its counter moves by one packet,
    /// every other rule's stays at zero); None: no rule counter moves.
    pub rule: Option<usize>,
    /// The SFUNNEL_STAT_* entry that must move by one (None: none moves).
    pub stat: Option<u32>,
    /// PROG_TEST_RUN may refuse the frame (EINVAL) instead of running the
    /// program: an IP-ethertype frame without a whole IP header, on kernels
    /// with the 2026 test_run fix "bpf: test_run: reject short IP headers".
    /// If it runs, the rest of the case holds.
    pub refusal_ok: bool,
}

/// A frame that must pass on unchanged (TC_ACT_UNSPEC), counted under
/// `stat`.
pub fn pass_case(name: impl Into<String>, rules: &str, input: Vec<u8>, stat: u32) -> Case {
    let output = input.clone();
    Case {
        name: name.into(),
        rules: rules.into(),
        input,
        verdict: TC_ACT_UNSPEC,
        output,
        rule: None,
        stat: Some(stat),
        refusal_ok: false,
    }
}

/// Runs one case.  The ruleset is installed only when it differs from
/// `installed` (installing is the slow part); counters and statistics are
/// compared as differences across the run.  `diff` shows how two frames
/// differ.  Ok(true): PROG_TEST_RUN refused the frame, which the case
/// allows.
pub fn run_case(
    prog: &Prog,
    c: &Case,
    installed: &mut Option<String>,
    diff: fn(&[u8], &[u8]) -> String,
) -> Result<bool, String> {
    if installed.as_deref() != Some(c.rules.as_str()) {
        *installed = None;
        prog.install(&c.rules).map_err(|e| format!("install: {e:#}"))?;
        *installed = Some(c.rules.clone());
        let fresh = prog.maps.rule_counters().map_err(|e| e.to_string())?;
        if fresh.iter().any(|k| k.packets != 0 || k.bytes != 0) {
            return Err(format!("counters not zero after install: {fresh:?}"));
        }
    }
    let counters_before = prog.maps.rule_counters().map_err(|e| e.to_string())?;
    let stats_before = prog.maps.stats().map_err(|e| e.to_string())?;
    let (verdict, data) = match prog.run(&c.input) {
        Ok(r) => r,
        Err(e) if c.refusal_ok => {
            let stats_after = prog.maps.stats().map_err(|e| e.to_string())?;
            if stats_after != stats_before {
                return Err(format!("refused ({e:#}), yet the stats moved"));
            }
            return Ok(true);
        }
        Err(e) => return Err(format!("test_run: {e:#}")),
    };
    let mut errs = Vec::new();
    if verdict != c.verdict {
        errs.push(format!("verdict: expected {} got {}", c.verdict, verdict));
    }
    if data != c.output {
        errs.push(format!("output bytes differ:\n{}", diff(&c.output, &data)));
    }
    let counters = prog.maps.rule_counters().map_err(|e| e.to_string())?;
    if counters.len() != counters_before.len() {
        return Err("the number of rule counters changed".into());
    }
    for (i, (after, before)) in counters.iter().zip(&counters_before).enumerate() {
        let k = RuleCounter {
            packets: after.packets - before.packets,
            bytes: after.bytes - before.bytes,
            over_mtu: after.over_mtu - before.over_mtu,
            packets_per_cpu: Default::default(),
        };
        if Some(i) == c.rule {
            let ok_bytes = [c.input.len() as u64, c.output.len() as u64];
            if k.packets != 1 || !ok_bytes.contains(&k.bytes) || k.over_mtu != 0 {
                errs.push(format!("rule {i} counter: expected 1 packet of {ok_bytes:?} bytes, got {k:?}"));
            }
        } else if k != RuleCounter::default() {
            errs.push(format!("rule {i} counter moved: {k:?}"));
        }
    }
    if let Some(r) = c.rule {
        if r >= counters.len() {
            errs.push(format!("no counter for rule {r} ({} counters)", counters.len()));
        }
    }
    let stats_after = prog.maps.stats().map_err(|e| e.to_string())?;
    for i in 0..SFUNNEL_STAT_MAX as usize {
        let d = stats_after[i] - stats_before[i];
        let want = u64::from(c.stat == Some(i as u32));
        if d != want {
            errs.push(format!("stat {i}: expected +{want}, got +{d}"));
        }
    }
    if errs.is_empty() {
        Ok(false)
    } else {
        Err(errs.join("\n"))
    }
}

/// Runs every case, grouped by ruleset so that each ruleset is installed
/// once.  Returns a report per failed case and how many frames
/// PROG_TEST_RUN refused where the case allowed it.
pub fn run_all(prog: &Prog, cases: &[Case], diff: fn(&[u8], &[u8]) -> String) -> (Vec<String>, usize) {
    let mut order: Vec<&Case> = cases.iter().collect();
    order.sort_by(|a, b| a.rules.cmp(&b.rules));
    let mut installed = None;
    let mut failed = Vec::new();
    let mut refused = 0usize;
    for c in order {
        match run_case(prog, c, &mut installed, diff) {
            Ok(r) => refused += usize::from(r),
            Err(e) => failed.push(format!(
                "FAIL: {}\n  rules: {:?}\n  input ({} bytes): {}\n{e}",
                c.name,
                c.rules,
                c.input.len(),
                hex(&c.input[..c.input.len().min(96)])
            )),
        }
    }
    (failed, refused)
}
