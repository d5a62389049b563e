//! Load, update and unload one attachment (netns × interface × direction).
//! The caller has entered the namespace and holds the pin lock.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use libbpf_rs::Program;
use serde::Serialize;

use crate::attach::{self, clsact, tcx, AttachChoice, Direction, Mode};
use crate::datapath::consts::{SFUNNEL_ABI_VERSION, SFUNNEL_MODE_CLSACT, SFUNNEL_MODE_TCX};
use crate::datapath::consts::{SFUNNEL_ACT_FUNNEL, SFUNNEL_DETOUR_INGRESS, SFUNNEL_DETOUR_PEER};
use crate::datapath::types::{sfunnel_detour, sfunnel_meta};
use crate::datapath::{Loaded, OverMtu, RulesetMaps, Settings};
use crate::detour::DetourReturn;
use crate::log::event;
use crate::pins::Target;
use crate::ruleset::Compiled;
use crate::spread::DetourCpus;

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub attach: AttachChoice,
    /// Tries at finding an interface that does not exist yet.
    pub attempts: u32,
    pub retry_delay: Duration,
    /// What becomes of packets that funneled would exceed the MTU.
    pub over_mtu: OverMtu,
    /// How segments leave the segmentation detour on egress.
    pub detour_return: DetourReturn,
    /// The CPUs that funnel the detour's segments.
    pub detour_cpus: DetourCpus,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub iface: String,
    pub direction: Direction,
    pub mode: Mode,
    pub prog_id: u32,
    /// "attached", "updated in place", or "replaced (why)".
    pub what: String,
}

/// The interface's index, waiting for it to appear (the original
/// container's N_ATTEMPTS and RETRY_DELAY).
pub fn wait_for_iface(iface: &str, attempts: u32, delay: Duration) -> Result<u32> {
    let attempts = attempts.max(1);
    for i in 1..=attempts {
        match nix::net::if_::if_nametoindex(iface) {
            Ok(idx) => return Ok(idx),
            Err(e) if i == attempts => {
                return Err(anyhow!(e)).with_context(|| {
                    format!(
                        "interface {iface} not found after {attempts} attempts {delay:?} apart: check the name \
                         (`ip link` in the target namespace), or raise N_ATTEMPTS/RETRY_DELAY"
                    )
                })
            }
            Err(_) => {
                event!("wait_iface", iface = iface, attempt = i, attempts = attempts, retry_in = format!("{delay:?}"));
                std::thread::sleep(delay);
            }
        }
    }
    unreachable!("the loop returns on its last attempt")
}

fn mode_of(meta: &sfunnel_meta) -> Option<Mode> {
    match meta.mode {
        SFUNNEL_MODE_TCX => Some(Mode::Tcx),
        SFUNNEL_MODE_CLSACT => Some(Mode::Clsact),
        _ => None,
    }
}

fn pinned_prog(dir: &Path) -> Result<(OwnedFd, u32)> {
    let fd = Program::fd_from_pinned_path(dir.join("prog")).context("opening the pinned program")?;
    let id = Program::id_from_fd(fd.as_fd())?;
    Ok((fd, id))
}

/// Whether the pinned program is still hooked where the meta says.
fn still_attached(meta: &sfunnel_meta, ifindex: u32, d: Direction, prog: &OwnedFd, prog_id: u32) -> bool {
    meta.ifindex == ifindex
        && match mode_of(meta) {
            Some(Mode::Tcx) => tcx::attached_ids(ifindex, d).contains(&prog_id),
            Some(Mode::Clsact) => clsact::query(prog.as_fd(), ifindex, d) == Some(prog_id),
            None => false,
        }
}

/// Why the pins of `t` cannot be reused for `compiled`; None when they can.
fn reuse_problem(t: &Target, ifindex: u32, compiled: &Compiled) -> Option<String> {
    let dir = t.dir();
    let meta = match RulesetMaps::from_pins(&dir).and_then(|m| m.read_meta()) {
        Ok(m) => m,
        Err(e) => return Some(format!("incomplete pins: {e:#}")),
    };
    if meta.abi_version != SFUNNEL_ABI_VERSION {
        return Some(format!("pinned by an incompatible version (layout {})", meta.abi_version));
    }
    let Ok((fd, id)) = pinned_prog(&dir) else { return Some("the pinned program is missing".into()) };
    if !still_attached(&meta, ifindex, t.direction, &fd, id) {
        return Some("no longer attached (was the interface re-created?)".into());
    }
    if wants_detour(compiled) && !dir.join("detour_prog").exists() {
        return Some("the ruleset now funnels, which needs the segmentation detour's program".into());
    }
    None
}

/// Whether an attachment needs the segmentation detour for `compiled`:
/// some funnel rule (GSO packets: sent on egress, GRO-merged on ingress).
fn wants_detour(compiled: &Compiled) -> bool {
    compiled.rules.iter().any(|(_, v)| v.action as u32 == SFUNNEL_ACT_FUNNEL)
}

/// Hooks the detour program `prog` on the far end of the helper pair of
/// the interface `ifindex`, and points the datapath (`maps`) at the pair.
/// The pair is made afresh, unless `reuse` and it is whole: a replacing
/// load hooks its program beside (TCX) or in place of (clsact) the old
/// one, whose datapath keeps using the pair until it is unhooked.  Its
/// segments are steered to `opts.detour_cpus` first.  Returns
/// the TCX link (the caller pins it as `detour_link`) and whether the pair
/// was made here.  On failure a pair made here is gone again, and its hook
/// with it.
fn hook_detour(
    maps: &RulesetMaps,
    prog: BorrowedFd<'_>,
    ifindex: u32,
    direction: Direction,
    mode: Mode,
    reuse: bool,
    opts: &LoadOptions,
) -> Result<(Option<OwnedFd>, bool)> {
    let (pair, made) = match crate::detour::find(ifindex, direction).filter(|_| reuse) {
        Some(p) => (p, false),
        None => (crate::detour::create(ifindex, direction)?, true),
    };
    let (out_name, _) = crate::detour::names(ifindex, direction);
    let hooked = crate::detour::complete_checksums(pair.out, &out_name)
        .and_then(|()| spread_detour(pair.inn, ifindex, direction, &opts.detour_cpus))
        .and_then(|()| match mode {
            Mode::Tcx => tcx::attach_ingress_fd(prog, pair.inn).map(Some),
            Mode::Clsact => {
                let old = clsact::query(prog, pair.inn, Direction::Ingress).filter(|_| !made);
                clsact::attach(prog, pair.inn, Direction::Ingress, old).map(|()| None)
            }
        })
        .and_then(|link| {
            let d = sfunnel_detour {
                dev_ifindex: ifindex,
                out_ifindex: pair.out,
                in_ifindex: pair.inn,
                flags: detour_flags(ifindex, direction, opts.detour_return),
            };
            maps.write_detour(&d).map(|()| (link, d.flags))
        });
    match hooked {
        Ok((link, flags)) => {
            event!(
                "detour",
                ifindex = ifindex,
                out_ifindex = pair.out,
                in_ifindex = pair.inn,
                mode = mode,
                back = crate::detour::Back::of(flags).as_str()
            );
            Ok((link, made))
        }
        Err(e) => {
            if made {
                let _ = crate::detour::remove(ifindex, direction);
            }
            Err(e).context("setting up the segmentation detour")
        }
    }
}

/// Steers the segments that come in on the pair's far end (`inn`) to
/// `cpus` (spread.rs).  The default, `all`, only speeds things up: where it
/// cannot be set, the load goes on with a warning.  A choice given
/// explicitly that cannot be set fails the load.
fn spread_detour(inn: u32, ifindex: u32, direction: Direction, cpus: &DetourCpus) -> Result<()> {
    let (_, name) = crate::detour::names(ifindex, direction);
    match crate::spread::set(&name, inn, cpus) {
        Ok(set) => {
            event!("detour_cpus", helper = name, cpus = if set.is_empty() { "sender".into() } else { set });
            Ok(())
        }
        Err(e) if *cpus == DetourCpus::All => {
            eprintln!("warning: {e:#}; the CPU that sends the segments funnels them");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// How segments go back from the detour (bpf/detour.h): into the
/// interface's receive path for an ingress attachment; on egress straight
/// into its peer's where `back` and `detour::peer_return` allow, else out
/// of it.
fn detour_flags(ifindex: u32, direction: Direction, back: DetourReturn) -> u32 {
    match direction {
        Direction::Ingress => SFUNNEL_DETOUR_INGRESS,
        Direction::Egress if back == DetourReturn::Auto && crate::detour::peer_return(ifindex) => SFUNNEL_DETOUR_PEER,
        Direction::Egress => 0,
    }
}

/// A rerun keeps the pair (its record `d`), and sets the way back afresh:
/// the interface's queue may have changed since.  Only the record's flags
/// word changes, and the datapath reads it once per segment.
fn refresh_detour_flags(
    maps: &RulesetMaps,
    mut d: sfunnel_detour,
    ifindex: u32,
    direction: Direction,
    back: DetourReturn,
) -> Result<()> {
    let flags = detour_flags(ifindex, direction, back);
    if d.flags != flags {
        d.flags = flags;
        maps.write_detour(&d)?;
        event!(
            "detour",
            ifindex = ifindex,
            out_ifindex = d.out_ifindex,
            in_ifindex = d.in_ifindex,
            back = crate::detour::Back::of(flags).as_str()
        );
    }
    Ok(())
}

/// Whether the datapath's detour record still names the attachment's pair.
fn detour_intact(maps: &RulesetMaps, ifindex: u32, direction: Direction) -> bool {
    match (maps.read_detour(), crate::detour::find(ifindex, direction)) {
        (Ok(d), Some(p)) => d.dev_ifindex == ifindex && d.out_ifindex == p.out && d.in_ifindex == p.inn,
        _ => false,
    }
}

/// Loads or updates the ruleset on one target.
pub fn load(t: &Target, compiled: &Compiled, opts: &LoadOptions) -> Result<LoadReport> {
    let ifindex = wait_for_iface(&t.iface, opts.attempts, opts.retry_delay)?;
    let dir = t.dir();
    let settings = Settings { egress: t.direction == Direction::Egress, over_mtu: opts.over_mtu };
    let mut replaced = None;
    if dir.exists() {
        match reuse_problem(t, ifindex, compiled) {
            None => {
                let maps = RulesetMaps::from_pins(&dir)?;
                let meta = maps.read_meta()?;
                // The detour first: the new funnel rules may send GSO
                // packets to it as soon as they are in.
                let detour = wants_detour(compiled);
                let rehook = detour && !detour_intact(&maps, ifindex, t.direction);
                // A pair kept: its record, read once for its far end now
                // and for the way back once the ruleset is in.
                let mut kept = None;
                if rehook {
                    let prog = Program::fd_from_pinned_path(dir.join("detour_prog"))
                        .context("opening the pinned detour program")?;
                    let (link, _) = hook_detour(
                        &maps,
                        prog.as_fd(),
                        ifindex,
                        t.direction,
                        mode_of(&meta).unwrap_or(Mode::Tcx),
                        false,
                        opts,
                    )?;
                    if let Some(link) = link {
                        if let Err(e) = tcx::pin_link(link.as_fd(), &dir.join("detour_link")) {
                            let _ = crate::detour::remove(ifindex, t.direction);
                            return Err(e);
                        }
                    }
                } else if detour {
                    let d = maps.read_detour()?;
                    let (out_name, _) = crate::detour::names(ifindex, t.direction);
                    crate::detour::complete_checksums(d.out_ifindex, &out_name)?;
                    spread_detour(d.in_ifindex, ifindex, t.direction, &opts.detour_cpus)?;
                    kept = Some(d);
                }
                maps.install(compiled, settings).context("updating the pinned ruleset")?;
                // Once the ruleset is in: a failed install changes nothing.
                // (hook_detour set it just now on a pair it hooked again.)
                if let Some(d) = kept {
                    refresh_detour_flags(&maps, d, ifindex, t.direction, opts.detour_return)?;
                }
                let report = LoadReport {
                    iface: t.iface.clone(),
                    direction: t.direction,
                    mode: mode_of(&meta).unwrap_or(Mode::Tcx),
                    prog_id: pinned_prog(&dir)?.1,
                    what: "updated in place".into(),
                };
                event!(
                    "updated",
                    iface = t.iface,
                    direction = t.direction,
                    prog_id = report.prog_id,
                    generation = maps.active_gen()?,
                    pins = dir.display()
                );
                return Ok(report);
            }
            Some(why) => {
                event!("replace", iface = t.iface, direction = t.direction, why = why, pins = dir.display());
                replaced = Some(why);
            }
        }
    }
    // What the old pins still hold on the hook, if anything: the new
    // program goes on first, then the old one comes off, so no packet
    // passes unfunneled in between.
    let old_prog = replaced.as_ref().and_then(|_| pinned_prog(&dir).ok()).map(|(_, id)| id);

    let (mode, why) = attach::choose(opts.attach, ifindex)?;
    event!("attach_mode", iface = t.iface, direction = t.direction, ifindex = ifindex, mode = mode, why = why);
    let started = std::time::Instant::now();
    let detour = wants_detour(compiled);
    let mut loaded = Loaded::load_for((mode == Mode::Tcx).then(|| tcx::attach_type(t.direction)), detour)?;
    let maps = loaded.maps()?;
    maps.write_meta(&sfunnel_meta {
        abi_version: SFUNNEL_ABI_VERSION,
        ifindex,
        mode: if mode == Mode::Tcx { SFUNNEL_MODE_TCX } else { SFUNNEL_MODE_CLSACT },
        egress: u32::from(t.direction == Direction::Egress),
        tc_handle: if mode == Mode::Clsact { clsact::HANDLE } else { 0 },
        tc_prio: if mode == Mode::Clsact { clsact::PRIORITY } else { 0 },
        netns_ino: t.netns_ino,
    })?;
    let prog_id = Program::id_from_fd(loaded.program().as_fd())?;
    event!("prog_loaded", prog_id = prog_id, verified_ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3));
    if detour && crate::log::verbose() {
        let known = crate::datapath::reads_checksum_state();
        event!(
            "checksum_state",
            known = known,
            detour = if known {
                "GSO packets, TCP, and packets whose checksum is owed"
            } else {
                "every packet to funnel (the kernel cannot tell owed checksums before 6.2)"
            }
        );
    }
    // The detour is in place before any funnel rule can send GSO packets
    // to it.  Its TCX link is pinned with the other pins, below.
    let detour_prog = loaded.detour_program().map(|p| p.as_fd());
    let (detour_link, made_pair) = match detour_prog {
        Some(prog) => hook_detour(&maps, prog, ifindex, t.direction, mode, replaced.is_some(), opts)?,
        None => (None, false),
    };
    // Undoes the detour when the load fails from here on: a pair made here
    // goes (and our hook with it); a reused one keeps serving the old
    // program, and our TCX link goes when its fd is dropped.
    let detour_prog_id = detour_prog.and_then(|p| Program::id_from_fd(p).ok());
    let undo_detour = || {
        if made_pair {
            let _ = crate::detour::remove(ifindex, t.direction);
        } else if detour && mode == Mode::Clsact {
            // Our filter took the old one's slot: put the old one back.
            if let (Ok(old), Some(pair)) =
                (Program::fd_from_pinned_path(dir.join("detour_prog")), crate::detour::find(ifindex, t.direction))
            {
                let _ = clsact::attach(old.as_fd(), pair.inn, Direction::Ingress, detour_prog_id);
            }
        }
    };
    // On a fresh hook the rules go in while the program is being hooked
    // in: both wait for a grace period, and overlapped the waits do not add
    // up.  That is safe because the program sees no ruleset (generation 0,
    // empty) until `install` flips to the complete new one: until then it
    // passes every packet, as if it were not there yet.  When it replaces
    // an old program, the rules go in first, so that no packet meets an
    // empty ruleset.
    // clsact: our slot may hold the old program, which the attach then
    // replaces atomically.  TCX: the new link goes after the old one.
    if replaced.is_some() {
        maps.install(compiled, settings)?;
    }
    let (installed, attached) = std::thread::scope(|s| {
        let install = s.spawn(|| if replaced.is_none() { maps.install(compiled, settings) } else { Ok(()) });
        let attached = match mode {
            Mode::Tcx => tcx::attach(loaded.program(), ifindex).map(Some),
            Mode::Clsact => clsact::attach(loaded.program().as_fd(), ifindex, t.direction, old_prog).map(|()| None),
        };
        let installed = install.join().unwrap_or_else(|_| Err(anyhow!("the ruleset install thread panicked")));
        (installed, attached)
    });
    let mut link = match attached {
        Ok(l) => l,
        Err(e) => {
            undo_detour();
            return Err(e);
        }
    };
    if let Err(e) = installed {
        if mode == Mode::Clsact && old_prog.is_none() {
            let _ = clsact::detach(loaded.program().as_fd(), ifindex, t.direction);
        }
        undo_detour();
        return Err(e);
    }
    if replaced.is_some() {
        // The new program is live: take the old one off and its pins away.
        if let Err(e) = unload_old(t, prog_id) {
            if mode == Mode::Clsact {
                let _ = clsact::detach(loaded.program().as_fd(), ifindex, t.direction);
            }
            undo_detour();
            return Err(e).context("removing the old pins");
        }
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Pin; if that fails, undo the attach so nothing is left half-done.
    let pinned = loaded
        .pin(&dir)
        .and_then(|()| match link.as_mut() {
            Some(l) => l.pin(dir.join("link")).context("pinning the TCX link"),
            None => Ok(()),
        })
        .and_then(|()| match &detour_link {
            Some(l) => tcx::pin_link(l.as_fd(), &dir.join("detour_link")),
            None => Ok(()),
        });
    if let Err(e) = pinned {
        if mode == Mode::Clsact {
            let _ = clsact::detach(loaded.program().as_fd(), ifindex, t.direction);
        }
        drop(link);
        undo_detour();
        let _ = t.remove_pins();
        return Err(e);
    }
    let what = match replaced {
        Some(why) => format!("replaced ({why})"),
        None => "attached".into(),
    };
    event!(
        "attached",
        iface = t.iface,
        direction = t.direction,
        mode = mode,
        prog_id = prog_id,
        what = what,
        pins = dir.display()
    );
    Ok(LoadReport { iface: t.iface.clone(), direction: t.direction, mode, prog_id, what })
}

/// Detaches and removes everything sfunnel made for `t`.  Missing pieces
/// (an interface that is gone, a pin already removed) are not errors.
pub fn unload(t: &Target) -> Result<()> {
    release(t, None)
}

/// Removes old pins that the new program (`new_id`) replaces: the old TCX
/// link is detached; an old clsact filter was already replaced in place.
fn unload_old(t: &Target, new_id: u32) -> Result<()> {
    release(t, Some(new_id))
}

/// Detaches what the pins of `t` hold on the hook and removes the pins.
/// A clsact slot is cleared only while it holds the pinned program itself,
/// never someone else's filter, and never `keep` (a program that replaced
/// ours in place).
fn release(t: &Target, keep: Option<u32>) -> Result<()> {
    let dir = t.dir();
    let ifindex = nix::net::if_::if_nametoindex(t.iface.as_str()).ok();
    // The helper pair, and with it the detour's hook; but not the pair a
    // replacing load has just made for the same interface.
    if let Ok(d) = RulesetMaps::from_pins(&dir).and_then(|m| m.read_detour()) {
        if d.dev_ifindex != 0 && (keep.is_none() || Some(d.dev_ifindex) != ifindex) {
            crate::detour::remove(d.dev_ifindex, t.direction)?;
        }
    }
    let link = dir.join("link");
    if link.exists() {
        tcx::detach_pinned(&link)?;
        event!("detached", iface = t.iface, direction = t.direction, mode = Mode::Tcx, link = link.display());
    }
    if let (Ok((fd, ours)), Some(ifindex)) = (pinned_prog(&dir), ifindex) {
        if Some(ours) != keep && clsact::query(fd.as_fd(), ifindex, t.direction) == Some(ours) {
            clsact::detach(fd.as_fd(), ifindex, t.direction)?;
            event!("detached", iface = t.iface, direction = t.direction, mode = Mode::Clsact, prog_id = ours);
        }
    }
    t.remove_pins()?;
    event!("unpinned", iface = t.iface, direction = t.direction, pins = dir.display());
    Ok(())
}

/// Why the pins of a target are stale, and the namespace they were for if
/// it is still there (found once: finding it may walk every process).
pub struct Stale {
    pub why: String,
    netns: Option<std::path::PathBuf>,
}

/// Why the pins of `t` are stale, if they are: its network namespace is
/// gone, or its interface is gone or was re-created (which took our hook
/// with it).
pub fn stale(t: &Target) -> Option<Stale> {
    let Some(ns) = crate::netns::find(t.netns_ino) else {
        return Some(Stale { why: "its network namespace is gone".into(), netns: None });
    };
    let meta = RulesetMaps::from_pins(&t.dir()).and_then(|m| m.read_meta()).ok();
    let iface = t.iface.clone();
    let path = ns.to_string_lossy().into_owned();
    let ifindex = crate::netns::run_in(&path, move || Ok(nix::net::if_::if_nametoindex(iface.as_str()).ok()));
    let why = match (ifindex, meta) {
        (Err(e), _) => format!("its network namespace cannot be entered ({e:#})"),
        (Ok(None), _) => format!("interface {} is gone", t.iface),
        (_, None) => "its pins are incomplete".into(),
        (Ok(Some(i)), Some(m)) if i != m.ifindex => format!("interface {} was re-created", t.iface),
        _ => return None,
    };
    Some(Stale { why, netns: Some(ns) })
}

/// Removes the pins of a stale target.  Its hook went with its device or
/// namespace; a TCX link that outlived them is detached first.
pub fn remove_stale(t: &Target, s: &Stale) -> Result<()> {
    // A namespace that is still there keeps the helper pair of an interface
    // that is gone: delete it there.
    let detour = RulesetMaps::from_pins(&t.dir()).and_then(|m| m.read_detour()).map(|d| d.dev_ifindex).unwrap_or(0);
    if let (true, Some(ns)) = (detour != 0, &s.netns) {
        let ns = ns.to_string_lossy().into_owned();
        let direction = t.direction;
        crate::netns::run_in(&ns, move || crate::detour::remove(detour, direction))?;
    }
    let link = t.dir().join("link");
    if link.exists() {
        tcx::detach_pinned(&link)?;
        event!("detached", netns = t.netns_ino, iface = t.iface, direction = t.direction, link = link.display());
    }
    t.remove_pins()?;
    event!("unpinned", netns = t.netns_ino, iface = t.iface, direction = t.direction, pins = t.dir().display());
    Ok(())
}
