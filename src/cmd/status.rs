//! `sfunnel status`: every sfunnel attachment on the machine, with its
//! counters.  Attachments are found from the kernel's objects: every
//! program named `sfunnel` whose maps are this layout's, each map of which
//! says (`sf_meta`) what the program is for.  Whether it is live comes
//! from its hook: a clsact filter holds it while its interface exists; a
//! TCX link pinned in the tree says which interface it is on, 0 once that
//! interface is gone.

use std::os::fd::AsFd;

use anyhow::{Context, Result};
use serde::Serialize;

use super::Outcome;
use crate::attach::{Direction, Mode};
use crate::cli::StatusArgs;
use crate::datapath::consts::*;
use crate::datapath::types::sfunnel_meta;
use crate::datapath::{RuleCounter, RulesetMaps, PROG_NAME};
use crate::pins::{LinkKey, Tree};

#[derive(Debug, Serialize)]
pub struct Attachment {
    pub netns_cookie: u64,
    pub netns_ino: u64,
    /// A path that opens the namespace (`/var/run/netns/NAME`, a bind
    /// mount, `/proc/PID/ns/net`), where this process can see one.
    pub netns: Option<String>,
    pub iface: String,
    pub ifindex: u32,
    pub direction: Direction,
    pub mode: Option<Mode>,
    pub prog_id: Option<u32>,
    /// `live`, or why not.
    pub state: String,
    pub generation: Option<u32>,
    /// The loaded rules, in canonical form; `rules[i]` counts `ruleset[i]`.
    pub ruleset: Vec<String>,
    pub rules: Vec<RuleCounter>,
    /// Packets left alone, by reason.
    pub passed: std::collections::BTreeMap<&'static str, u64>,
    /// The segmentation detour's helper pair (attachments that funnel;
    /// docs/design.md, "The segmentation detour").
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

fn ifname(meta: &sfunnel_meta) -> String {
    let b: Vec<u8> = meta.ifname.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&b).into_owned()
}

/// Whether a program that says it is for `key` is live: on its hook.
fn state(tree: Option<&Tree>, meta: &sfunnel_meta, key: &LinkKey, prog_id: u32) -> String {
    match meta.mode {
        SFUNNEL_MODE_CLSACT => "live".into(),
        SFUNNEL_MODE_TCX => {
            let link = tree.and_then(|t| t.open_link(key).ok().flatten());
            match link.map(|l| crate::objects::link_info(l.as_fd())) {
                Some(Ok(i)) if i.prog_id == prog_id && i.ifindex != 0 => "live".into(),
                Some(Ok(i)) if i.prog_id == prog_id => {
                    "dead: its interface is gone (freed at the next load, unload or gc)".into()
                }
                _ => "not pinned (a load in progress, or a program another process holds)".into(),
            }
        }
        m => format!("unknown attach mode {m}"),
    }
}

fn read(a: &mut Attachment, maps: &RulesetMaps) -> Result<()> {
    a.generation = Some(maps.active_gen()?);
    a.rules = maps.rule_counters()?;
    a.ruleset = maps.ruleset_text()?.lines().map(str::to_string).collect();
    let stats = maps.stats()?;
    for (name, i) in STAT_NAMES {
        a.passed.insert(name, stats.get(i as usize).copied().unwrap_or(0));
    }
    let d = maps.read_detour()?;
    if d.dev_ifindex != 0 {
        let (out, inn) = crate::detour::names(d.dev_ifindex, a.direction);
        a.detour = Some(Detour {
            out,
            out_ifindex: d.out_ifindex,
            r#in: inn,
            in_ifindex: d.in_ifindex,
            back: crate::detour::Back::of(d.flags),
        });
    }
    Ok(())
}

/// A program named like sfunnel's whose maps are not of this layout.
fn unreadable(id: u32, e: anyhow::Error) -> Attachment {
    Attachment {
        netns_cookie: 0,
        netns_ino: 0,
        netns: None,
        iface: String::new(),
        ifindex: 0,
        direction: Direction::Ingress,
        mode: None,
        prog_id: Some(id),
        state: "unknown".into(),
        generation: None,
        ruleset: Vec::new(),
        rules: Vec::new(),
        passed: Default::default(),
        detour: None,
        error: Some(format!("a program named {PROG_NAME} that this build cannot read (an earlier build's?): {e:#}")),
    }
}

/// Every attachment the kernel holds, and earlier builds' pins.
pub fn collect() -> Result<Vec<Attachment>> {
    let tree = Tree::open_existing()?;
    let mut out = Vec::new();
    // Finding a namespace may walk every process: once per namespace.
    let mut paths = std::collections::HashMap::new();
    for id in crate::objects::all_prog_ids()? {
        let Ok(prog) = crate::objects::prog_by_id(id) else { continue };
        let Ok(info) = crate::objects::prog_info(prog.as_fd()) else { continue };
        if info.name != PROG_NAME {
            continue;
        }
        let (maps, meta) = match RulesetMaps::from_prog(prog.as_fd()).and_then(|m| Ok((m.read_meta()?, m))) {
            Ok((meta, maps)) => (maps, meta),
            Err(e) => {
                out.push(unreadable(id, e));
                continue;
            }
        };
        let direction = if meta.egress != 0 { Direction::Egress } else { Direction::Ingress };
        let key = LinkKey { netns_cookie: meta.netns_cookie, ifindex: meta.ifindex, direction, detour: false };
        let ns = crate::netns::Id { cookie: meta.netns_cookie, ino: meta.netns_ino };
        let path =
            paths.entry(ns).or_insert_with(|| crate::netns::find(ns.ino).filter(|p| crate::netns::is(p, ns))).clone();
        let mut a = Attachment {
            netns_cookie: meta.netns_cookie,
            netns_ino: meta.netns_ino,
            netns: path.map(|p| p.display().to_string()),
            iface: ifname(&meta),
            ifindex: meta.ifindex,
            direction,
            mode: match meta.mode {
                SFUNNEL_MODE_TCX => Some(Mode::Tcx),
                SFUNNEL_MODE_CLSACT => Some(Mode::Clsact),
                _ => None,
            },
            prog_id: Some(id),
            state: state(tree.as_ref(), &meta, &key, id),
            generation: None,
            ruleset: Vec::new(),
            rules: Vec::new(),
            passed: Default::default(),
            detour: None,
            error: None,
        };
        if meta.abi_version != SFUNNEL_ABI_VERSION {
            a.error =
                Some(format!("made by a build of layout {}; a load of this target replaces it", meta.abi_version));
        } else if let Err(e) = read(&mut a, &maps) {
            a.error = Some(format!("{e:#}"));
        }
        out.push(a);
    }
    for l in tree.as_ref().map(|t| t.legacy()).unwrap_or_default() {
        out.push(Attachment {
            netns_cookie: 0,
            netns_ino: l.netns_ino,
            netns: None,
            iface: l.iface.clone(),
            ifindex: 0,
            direction: l.direction,
            mode: None,
            prog_id: None,
            state: "pinned by an earlier build".into(),
            generation: None,
            ruleset: Vec::new(),
            rules: Vec::new(),
            passed: Default::default(),
            detour: None,
            error: Some(
                "in an earlier build's pin layout: a load of this target replaces it, an unload removes it, and \
                 gc removes it once its TCX link is hooked on nothing"
                    .into(),
            ),
        });
    }
    out.sort_by(|a, b| (a.netns_ino, &a.iface, a.direction).cmp(&(b.netns_ino, &b.iface, b.direction)));
    Ok(out)
}

fn print_text(list: &[Attachment]) {
    if list.is_empty() {
        println!("sfunnel has nothing loaded");
        return;
    }
    for a in list {
        let mode = a.mode.map_or("?".to_string(), |m| m.to_string());
        let prog = a.prog_id.map_or("?".to_string(), |p| p.to_string());
        let ns = a.netns.clone().unwrap_or_else(|| format!("netns cookie {}", a.netns_cookie));
        println!("{ns} {} {}: {mode}, program {prog}, {}, {} rules", a.iface, a.direction, a.state, a.rules.len());
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
    crate::caps::require_for_load().context("sfunnel status reads sfunnel's programs and maps by their ids")?;
    loop {
        let list = collect()?;
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
