//! `sfunnel status`: every attachment under the pin tree, with counters.

use std::os::fd::AsFd;

use anyhow::Result;
use libbpf_rs::Program;
use serde::Serialize;

use super::Outcome;
use crate::cli::StatusArgs;
use crate::datapath::consts::*;
use crate::datapath::{RuleCounter, RulesetMaps};
use crate::pins::Target;

#[derive(Debug, Serialize)]
pub struct Attachment {
    pub netns_ino: u64,
    pub iface: String,
    pub direction: crate::attach::Direction,
    pub mode: Option<crate::attach::Mode>,
    pub prog_id: Option<u32>,
    pub generation: Option<u32>,
    /// The loaded rules, in canonical form; `rules[i]` counts `ruleset[i]`.
    pub ruleset: Vec<String>,
    pub rules: Vec<RuleCounter>,
    /// Packets left alone, by reason.
    pub passed: std::collections::BTreeMap<&'static str, u64>,
    /// The segmentation detour's helper pair (attachments that funnel;
    /// README, "Funneling GSO packets").
    pub detour: Option<Detour>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Detour {
    /// The end GSO packets go out of, and its index.
    pub out: String,
    pub out_ifindex: u32,
    /// The end their segments come in on (where the detour program is).
    pub r#in: String,
    pub in_ifindex: u32,
    /// Where the funneled segments go from there.
    pub back: crate::detour::Back,
}

const STAT_NAMES: [(&str, u32); SFUNNEL_STAT_MAX as usize] = [
    ("not_ipv4_tcp_udp", SFUNNEL_STAT_NOT_IPV4),
    ("fragment", SFUNNEL_STAT_FRAGMENT),
    ("malformed", SFUNNEL_STAT_MALFORMED),
    ("no_rule_matched", SFUNNEL_STAT_MISS),
    ("too_big", SFUNNEL_STAT_TOO_BIG),
    ("error", SFUNNEL_STAT_ERROR),
    ("unfunnel_auto_undecided", SFUNNEL_STAT_UNDECIDED),
    ("over_mtu", SFUNNEL_STAT_OVER_MTU),
    ("ipv6_extension_headers", SFUNNEL_STAT_IPV6_EXT),
];

pub fn collect() -> Vec<Attachment> {
    Target::all()
        .into_iter()
        .map(|t| {
            let dir = t.dir();
            let mut a = Attachment {
                netns_ino: t.netns_ino,
                iface: t.iface.clone(),
                direction: t.direction,
                mode: None,
                prog_id: None,
                generation: None,
                ruleset: Vec::new(),
                rules: Vec::new(),
                passed: Default::default(),
                detour: None,
                error: None,
            };
            let read = (|| -> Result<()> {
                a.prog_id = Program::fd_from_pinned_path(dir.join("prog"))
                    .ok()
                    .and_then(|fd| Program::id_from_fd(fd.as_fd()).ok());
                let maps = RulesetMaps::from_pins(&dir)?;
                let meta = maps.read_meta()?;
                a.mode = match meta.mode {
                    SFUNNEL_MODE_TCX => Some(crate::attach::Mode::Tcx),
                    SFUNNEL_MODE_CLSACT => Some(crate::attach::Mode::Clsact),
                    _ => None,
                };
                a.generation = Some(maps.active_gen()?);
                a.rules = maps.rule_counters()?;
                a.ruleset = maps.ruleset_text()?.lines().map(str::to_string).collect();
                let stats = maps.stats()?;
                for (name, i) in STAT_NAMES {
                    a.passed.insert(name, stats.get(i as usize).copied().unwrap_or(0));
                }
                let d = maps.read_detour()?;
                if d.dev_ifindex != 0 {
                    let (out, inn) = crate::detour::names(d.dev_ifindex, t.direction);
                    a.detour = Some(Detour {
                        out,
                        out_ifindex: d.out_ifindex,
                        r#in: inn,
                        in_ifindex: d.in_ifindex,
                        back: crate::detour::Back::of(d.flags),
                    });
                }
                Ok(())
            })();
            a.error = read.err().map(|e| format!("{e:#}"));
            a
        })
        .collect()
}

fn print_text(list: &[Attachment]) {
    if list.is_empty() {
        println!("sfunnel has nothing loaded (no pins under {})", crate::pins::root().display());
        return;
    }
    for a in list {
        let mode = a.mode.map_or("?".to_string(), |m| m.to_string());
        let prog = a.prog_id.map_or("?".to_string(), |p| p.to_string());
        println!("netns {} {} {}: {mode}, program {prog}, {} rules", a.netns_ino, a.iface, a.direction, a.rules.len());
        for (i, c) in a.rules.iter().enumerate() {
            let rule = a.ruleset.get(i).map_or("", String::as_str);
            let over = if c.over_mtu > 0 { format!("  ({} over the MTU)", c.over_mtu) } else { String::new() };
            println!("  {:>12} packets {:>14} bytes  {rule}{over}", c.packets, c.bytes);
        }
        let passed: Vec<String> = a.passed.iter().filter(|(_, n)| **n > 0).map(|(k, n)| format!("{k} {n}")).collect();
        if !passed.is_empty() {
            println!("  passed unchanged: {}", passed.join(", "));
        }
        if let Some(d) = &a.detour {
            println!(
                "  GSO detour: out of {} ({}), segments back in on {} ({}), then {}",
                d.out,
                d.out_ifindex,
                d.r#in,
                d.in_ifindex,
                d.back.describe()
            );
        }
        if let Some(e) = &a.error {
            println!("  problem: {e}");
        }
    }
}

pub fn run(args: &StatusArgs) -> Result<Outcome> {
    loop {
        let list = collect();
        if args.json {
            println!("{}", serde_json::to_string_pretty(&list)?);
        } else {
            print_text(&list);
        }
        match args.interval {
            Some(s) if s > 0.0 => std::thread::sleep(std::time::Duration::from_secs_f64(s)),
            _ => return Ok(Outcome::Ok),
        }
    }
}
