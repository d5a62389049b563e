//! `sfunnel status`: every sfunnel attachment on the machine, with its
//! counters.  Attachments are found from the kernel's objects: every
//! program named `sfunnel` whose maps are this layout's, each map of which
//! says (`sf_meta`) what the program is for.  Whether it is live comes
//! from its hook: a clsact filter holds it while its interface exists; a
//! TCX link pinned in the tree says which interface it is on, 0 once that
//! interface is gone.

use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use anyhow::{Context, Result};
use serde::Serialize;

use super::Outcome;
use crate::attach::{Direction, Mode};
use crate::cli::{Filter, StatusArgs};
use crate::datapath::consts::*;
use crate::datapath::types::sfunnel_meta;
use crate::datapath::{RuleCounter, RulesetMaps, PROG_NAME};
use crate::output::errln;
use crate::output::outln;
use crate::pins::{LinkKey, Tree};

/// One attachment, as `status --json` shows it (schema 1, see
/// docs/operations.md).
#[derive(Debug, Serialize)]
pub struct Attachment {
    pub netns_cookie: u64,
    pub netns_ino: u64,
    /// A path that opens the namespace (`/var/run/netns/NAME`, a bind
    /// mount, `/proc/PID/ns/net`), where this process can see one.
    pub netns: Option<String>,
    /// Its name, where `ip netns` (/var/run/netns) has one.
    pub netns_name: Option<String>,
    pub iface: String,
    pub ifindex: u32,
    pub direction: Direction,
    pub mode: Option<Mode>,
    pub prog_id: Option<u32>,
    /// `live`, or why not.
    pub state: String,
    pub live: bool,
    /// The sfunnel version and layout that made it.
    pub version: Option<String>,
    pub layout: Option<u32>,
    pub generation: Option<u32>,
    /// The loaded rules in order, each with its canonical text and counters.
    pub rules: Vec<Rule>,
    /// Packets left alone, by reason.
    pub passed: std::collections::BTreeMap<&'static str, u64>,
    /// The segmentation detour's helper pair (attachments that funnel;
    /// docs/design.md, "The segmentation detour").
    pub detour: Option<Detour>,
    /// What is wrong with it, or what could not be read of it.
    pub problem: Option<String>,
    /// Whether `problem` is a failure to read (exit status 3).
    #[serde(skip)]
    pub unreadable: bool,
}

/// One rule of an attachment's ruleset and what it counted.
#[derive(Debug, Serialize)]
pub struct Rule {
    /// Its position in the ruleset, from 0: first match wins.
    pub index: usize,
    /// Its canonical text (`sfunnel check` prints the same).
    pub text: String,
    #[serde(flatten)]
    pub counters: RuleCounter,
}

/// `status --json`'s document.
#[derive(Debug, Serialize)]
pub struct Document<'a> {
    pub schema: u32,
    pub sfunnel: &'static str,
    pub attachments: &'a [Attachment],
    /// What could not be read, one line each (also on stderr).
    pub problems: Vec<String>,
}

pub const SCHEMA: u32 = 1;

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

pub const STAT_NAMES: [(&str, u32); SFUNNEL_STAT_MAX as usize] = [
    ("not_ip_tcp_udp", SFUNNEL_STAT_NOT_IP_TCP_UDP),
    ("fragment", SFUNNEL_STAT_FRAGMENT),
    ("malformed", SFUNNEL_STAT_MALFORMED),
    ("no_rule_matched", SFUNNEL_STAT_MISS),
    ("too_big", SFUNNEL_STAT_TOO_BIG),
    ("error", SFUNNEL_STAT_ERROR),
    ("unfunnel_auto_undecided", SFUNNEL_STAT_UNDECIDED),
    ("over_mtu", SFUNNEL_STAT_OVER_MTU),
    ("ipv6_extension_headers", SFUNNEL_STAT_IPV6_EXT),
];

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
    let counters = maps.rule_counters()?;
    let text = maps.ruleset_text()?;
    let mut lines = text.lines();
    a.rules = counters
        .into_iter()
        .enumerate()
        .map(|(index, counters)| Rule { index, text: lines.next().unwrap_or("").to_string(), counters })
        .collect();
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

impl Attachment {
    fn empty(state: &str) -> Attachment {
        Attachment {
            netns_cookie: 0,
            netns_ino: 0,
            netns: None,
            netns_name: None,
            iface: String::new(),
            ifindex: 0,
            direction: Direction::Ingress,
            mode: None,
            prog_id: None,
            state: state.into(),
            live: false,
            version: None,
            layout: None,
            generation: None,
            rules: Vec::new(),
            passed: Default::default(),
            detour: None,
            problem: None,
            unreadable: false,
        }
    }
}

/// A program named like sfunnel's whose maps are not of this layout.
fn unreadable(id: u32, e: anyhow::Error) -> Attachment {
    let mut a = Attachment::empty("unknown");
    a.prog_id = Some(id);
    a.unreadable = is_denied(&e);
    a.problem = Some(format!("a program named {PROG_NAME} that this build cannot read (an earlier build's?): {e:#}"));
    a
}

/// Whether `e` is the kernel refusing access, not an object of another
/// layout or one that went away meanwhile.
fn is_denied(e: &anyhow::Error) -> bool {
    e.chain().filter_map(|c| c.downcast_ref::<std::io::Error>()).any(|io| {
        matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
            || io.kind() == std::io::ErrorKind::PermissionDenied
    })
}

/// The name of a namespace path under /var/run/netns.
fn netns_name(path: &std::path::Path) -> Option<String> {
    let dir = std::path::Path::new(crate::netns::NETNS_RUN_DIR);
    let dir2 = std::path::Path::new("/run/netns");
    if path.parent() == Some(dir) || path.parent() == Some(dir2) {
        path.file_name().map(|n| n.to_string_lossy().into_owned())
    } else {
        None
    }
}

/// Every attachment the kernel holds, and earlier builds' pins; and what
/// could not be read at all (programs the kernel would not open, which a
/// filter cannot tell apart).
pub fn collect() -> Result<(Vec<Attachment>, Vec<String>)> {
    let tree = Tree::open_existing()?;
    let mut out = Vec::new();
    let mut problems = Vec::new();
    // Finding a namespace may walk every process: once per namespace.
    let mut paths = std::collections::HashMap::new();
    let mut denied = 0;
    let mut first_denied = None;
    for id in crate::objects::all_prog_ids()? {
        // A program that went away meanwhile is no problem; one the kernel
        // will not show may be sfunnel's.
        let prog = match crate::objects::prog_by_id(id) {
            Ok(p) => p,
            Err(e) => {
                if is_denied(&e) {
                    denied += 1;
                    first_denied.get_or_insert(format!("{e:#}"));
                }
                continue;
            }
        };
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
        let state = state(tree.as_ref(), &meta, &key, id);
        let mut a = Attachment {
            netns_cookie: meta.netns_cookie,
            netns_ino: meta.netns_ino,
            netns_name: path.as_deref().and_then(netns_name),
            netns: path.map(|p| p.display().to_string()),
            iface: crate::objects::name_of(&meta.ifname),
            ifindex: meta.ifindex,
            direction,
            mode: match meta.mode {
                SFUNNEL_MODE_TCX => Some(Mode::Tcx),
                SFUNNEL_MODE_CLSACT => Some(Mode::Clsact),
                _ => None,
            },
            prog_id: Some(id),
            live: state == "live",
            state,
            version: Some(crate::objects::name_of(&meta.version)).filter(|v| !v.is_empty()),
            layout: Some(meta.abi_version),
            ..Attachment::empty("")
        };
        if meta.abi_version != SFUNNEL_ABI_VERSION {
            a.problem =
                Some(format!("made by a build of layout {}; a load of this target replaces it", meta.abi_version));
        } else {
            // A load that updates it in place meanwhile releases the tables
            // of the generation it leaves: read again.
            let mut tries = 0;
            while let Err(e) = read(&mut a, &maps) {
                tries += 1;
                if tries == 3 {
                    a.unreadable = true;
                    a.problem = Some(format!("reading its maps: {e:#}"));
                    break;
                }
            }
        }
        out.push(a);
    }
    for l in tree.as_ref().map(|t| t.legacy()).unwrap_or_default() {
        let mut a = Attachment::empty("pinned by an earlier build");
        a.netns_ino = l.netns_ino;
        a.iface = l.iface.clone();
        a.direction = l.direction;
        a.problem = Some(
            "in an earlier build's pin layout: a load of this target replaces it, an unload removes it, and gc \
             removes it once its TCX link is hooked on nothing"
                .into(),
        );
        out.push(a);
    }
    out.sort_by(|a, b| (a.netns_ino, &a.iface, a.direction).cmp(&(b.netns_ino, &b.iface, b.direction)));
    if denied > 0 {
        problems.push(format!(
            "{denied} BPF program(s) could not be opened, so sfunnel's among them cannot be shown: {} (run as root, \
             or with CAP_SYS_ADMIN)",
            first_denied.unwrap_or_default()
        ));
    }
    Ok((out, problems))
}

/// What could not be read of `list`'s attachments, one line each.
fn unreadable_in(list: &[Attachment]) -> Vec<String> {
    list.iter()
        .filter(|a| a.unreadable)
        .map(|a| {
            format!(
                "{} {} (program {}): {}",
                if a.iface.is_empty() { "?" } else { &a.iface },
                a.direction,
                a.prog_id.map_or("?".into(), |p| p.to_string()),
                a.problem.as_deref().unwrap_or("")
            )
        })
        .collect()
}

/// The attachments `filter` selects.
pub fn select(list: Vec<Attachment>, filter: &Filter) -> Result<Vec<Attachment>> {
    let netns = match &filter.netns {
        None => None,
        // All digits: a cookie, unless a namespace has that name.
        Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && !crate::netns::path_of(n).exists() => {
            Some((n.parse::<u64>().context("a namespace cookie")?, None))
        }
        Some(n) => {
            let path = crate::netns::path_of(n);
            let meta = std::fs::metadata(&path).with_context(|| {
                format!(
                    "--netns {n}: no namespace at {} (`ip netns list` shows named ones; a cookie is the number \
                     `status` prints)",
                    path.display()
                )
            })?;
            // Namespace files are nsfs's, as this process's own is.
            let nsfs = std::fs::metadata("/proc/self/ns/net").context("reading /proc/self/ns/net")?.dev();
            anyhow::ensure!(meta.dev() == nsfs, "--netns {n}: {} is not a network namespace", path.display());
            Some((0, Some(meta.ino())))
        }
    };
    Ok(list
        .into_iter()
        .filter(|a| filter.ifaces.is_empty() || filter.ifaces.contains(&a.iface))
        .filter(|a| filter.direction.is_none_or(|d| d == a.direction))
        .filter(|a| match netns {
            None => true,
            Some((cookie, None)) => a.netns_cookie == cookie,
            // A live namespace's inode is its own.
            Some((_, Some(ino))) => a.netns_ino == ino && a.netns.is_some(),
        })
        .collect())
}

fn print_text(list: &[Attachment]) {
    if list.is_empty() {
        outln!("sfunnel has nothing loaded");
        return;
    }
    for a in list {
        let mode = a.mode.map_or("?".to_string(), |m| m.to_string());
        let prog = a.prog_id.map_or("?".to_string(), |p| p.to_string());
        let ns = match (&a.netns_name, &a.netns) {
            (Some(name), _) => format!("netns {name}"),
            (None, Some(path)) => format!("netns {path}"),
            (None, None) => format!("netns cookie {}", a.netns_cookie),
        };
        outln!("{ns} {} {}: {mode}, program {prog}, {}, {} rules", a.iface, a.direction, a.state, a.rules.len());
        for r in &a.rules {
            let c = &r.counters;
            let over = if c.over_mtu > 0 { format!("  ({} over the MTU)", c.over_mtu) } else { String::new() };
            outln!("  {:>12} packets {:>14} bytes  {}{over}", c.packets, c.bytes, r.text);
        }
        let passed: Vec<String> = a.passed.iter().filter(|(_, n)| **n > 0).map(|(k, n)| format!("{k} {n}")).collect();
        if !passed.is_empty() {
            outln!("  passed unchanged: {}", passed.join(", "));
        }
        if let Some(d) = &a.detour {
            outln!(
                "  GSO detour: out of {} ({}), segments back in on {} ({}), then {}",
                d.out,
                d.out_ifindex,
                d.r#in,
                d.in_ifindex,
                d.back.describe()
            );
        }
        if let Some(e) = &a.problem {
            outln!("  problem: {e}");
        }
    }
}

/// Collects, filters, and says on stderr what could not be read.
pub fn gather(filter: &Filter) -> Result<(Vec<Attachment>, Vec<String>)> {
    let (list, mut problems) = collect()?;
    let list = select(list, filter)?;
    problems.extend(unreadable_in(&list));
    for p in &problems {
        errln!("sfunnel: could not read: {p}");
    }
    Ok((list, problems))
}

pub fn run(args: &StatusArgs) -> Result<Outcome> {
    crate::caps::require_for_read()?;
    loop {
        let (list, problems) = gather(&args.filter)?;
        let doc = Document { schema: SCHEMA, sfunnel: env!("CARGO_PKG_VERSION"), attachments: &list, problems };
        match (args.json, args.interval) {
            (true, Some(_)) => outln!("{}", serde_json::to_string(&doc)?),
            (true, None) => outln!("{}", serde_json::to_string_pretty(&doc)?),
            (false, _) => print_text(&list),
        }
        let outcome = if doc.problems.is_empty() { Outcome::Ok } else { Outcome::Partial };
        match args.interval {
            Some(s) if s > 0.0 && !crate::output::closed() => std::thread::sleep(std::time::Duration::from_secs_f64(s)),
            _ => return Ok(outcome),
        }
    }
}
