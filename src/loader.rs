//! Loads, updates and unloads attachments (a network namespace × an
//! interface × a direction), all of them or none.
//!
//! An attachment is what its hook holds: a clsact filter or a TCX link
//! holds the program, and the program holds its maps (src/pins.rs).  A
//! load over several targets runs in three phases, each step of which
//! registers its own undo:
//!
//! - **prepare**, nothing that traffic sees: the new program and its maps
//!   loaded and filled, or the new ruleset staged in the inactive
//!   generation of the live maps; a helper pair made where one is needed.
//!   Dropped, it all goes again.  One exception acts on a live target: a
//!   detour that a rerun in place finds missing is repaired here
//!   (`repair_detour`), and undone with the rest.
//! - **commit**, one atomic switch per target: a generation flip, a TCX
//!   link made or given its new program, a clsact filter put in its slot
//!   or swapped there.  If a later target fails, the targets committed so
//!   far switch back, and the load fails having changed nothing.
//! - **release**, once every target is live: the old generation's
//!   tables, the old program, an earlier layout's pins.
//!
//! A process that dies at any step leaves each target as it was or as the
//! load makes it.  What prepare made dies with its descriptors, but for a
//! helper pair, which the next load in that namespace removes or reuses;
//! each commit is a single switch; a TCX link made but not yet pinned goes
//! with the process.  SFUNNEL_FAULT=<step> (one of [`FAULT_STEPS`]) ends
//! the process at that step, as a crash would, for the tests.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use crate::attach::{self, clsact, tcx, AttachChoice, Direction, Mode};
use crate::datapath::consts::{SFUNNEL_ABI_VERSION, SFUNNEL_MODE_CLSACT, SFUNNEL_MODE_TCX};
use crate::datapath::consts::{SFUNNEL_ACT_FUNNEL, SFUNNEL_DETOUR_INGRESS, SFUNNEL_DETOUR_PEER};
use crate::datapath::types::{sfunnel_detour, sfunnel_meta};
use crate::datapath::{Loaded, OverMtu, RulesetMaps, Settings, Staged, DETOUR_PROG_NAME, PROG_NAME};
use crate::detour::{DetourReturn, Pair};
use crate::log::event;
use crate::netns;
use crate::objects;
use crate::output::errln;
use crate::pins::{Legacy, LinkKey, Tree};
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

/// One attachment's place: a network namespace, an interface, a direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub netns: netns::Id,
    pub iface: String,
    pub ifindex: u32,
    pub direction: Direction,
}

impl Target {
    fn key(&self, detour: bool) -> LinkKey {
        LinkKey { netns_cookie: self.netns.cookie, ifindex: self.ifindex, direction: self.direction, detour }
    }

    fn legacy(&self) -> Legacy {
        Legacy { netns_ino: self.netns.ino, iface: self.iface.clone(), direction: self.direction }
    }
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

/// The steps at which SFUNNEL_FAULT ends a load, in order: every target
/// prepared; a new detour program hooked (its target's main program not
/// yet); a main program hooked (a new TCX link not yet pinned); the first
/// target committed; everything released.
pub const FAULT_STEPS: [&str; 5] = ["prepared", "detour-hooked", "attached", "committed", "released"];

fn fault(step: &str) {
    if std::env::var("SFUNNEL_FAULT").is_ok_and(|s| s == step) {
        errln!("sfunnel: SFUNNEL_FAULT={step}: ending the process here");
        std::process::abort();
    }
}

/// The interface's index, waiting for it to appear (the original
/// container's N_ATTEMPTS and RETRY_DELAY), with a warning at each wait.
pub fn wait_for_iface(iface: &str, attempts: u32, delay: Duration) -> Result<u32> {
    let attempts = attempts.max(1);
    for i in 1..=attempts {
        if let Some(idx) = crate::netlink::lookup(iface)? {
            return Ok(idx);
        }
        if i == attempts {
            bail!(
                "interface {iface} not found after {attempts} attempts {delay:?} apart: check the name (`ip link` in \
                 the target namespace), or raise N_ATTEMPTS/RETRY_DELAY"
            );
        }
        errln!("warning: interface {iface} not found (attempt {i} of {attempts}); trying again in {delay:?}");
        event!("wait_iface", iface = iface, attempt = i, attempts = attempts, retry_in = format!("{delay:?}"));
        std::thread::sleep(delay);
    }
    unreachable!("the loop returns on its last attempt")
}

// ---------------------------------------------------------------------------
// Undo
// ---------------------------------------------------------------------------

type UndoFn<'a> = Box<dyn FnOnce() -> Result<()> + 'a>;

/// What the steps so far made, undone in reverse order when dropped,
/// unless disarmed.  An undo that fails is reported, never dropped.
struct Undo<'a>(Vec<(String, UndoFn<'a>)>);

impl<'a> Undo<'a> {
    fn new() -> Undo<'a> {
        Undo(Vec::new())
    }

    fn push(&mut self, what: impl Into<String>, f: impl FnOnce() -> Result<()> + 'a) {
        self.0.push((what.into(), Box::new(f)));
    }

    fn disarm(&mut self) {
        self.0.clear();
    }
}

/// Set once an undo has failed: a failed load can then no longer say that
/// it changed nothing.
static UNDO_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        while let Some((what, f)) = self.0.pop() {
            match f() {
                Ok(()) => event!("undone", what = what),
                Err(e) => {
                    UNDO_FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
                    errln!("warning: could not undo {what}: {e:#}");
                    event!("undo_failed", what = what, error = format!("{e:#}"));
                }
            }
        }
    }
}

fn dup(fd: BorrowedFd<'_>) -> Result<OwnedFd> {
    fd.try_clone_to_owned().context("duplicating a descriptor")
}

// ---------------------------------------------------------------------------
// What a hook holds
// ---------------------------------------------------------------------------

/// What a program is, to sfunnel.
enum Identity {
    /// sfunnel's, of this layout.
    Current,
    /// sfunnel's, of another layout (an earlier or later build).
    OtherLayout(String),
    /// Not sfunnel's (its name).
    NotOurs(String),
}

fn identify(prog: BorrowedFd<'_>) -> Result<Identity> {
    let info = objects::prog_info(prog)?;
    if info.name != PROG_NAME {
        return Ok(Identity::NotOurs(info.name));
    }
    match RulesetMaps::from_prog(prog).and_then(|m| m.read_meta()) {
        Ok(meta) if meta.abi_version == SFUNNEL_ABI_VERSION => Ok(Identity::Current),
        Ok(meta) => Ok(Identity::OtherLayout(format!("made by a build of layout {}", meta.abi_version))),
        Err(_) => Ok(Identity::OtherLayout("made by an earlier build".into())),
    }
}

/// sfunnel's attachment found on a target's hook.
struct Existing {
    mode: Mode,
    prog: OwnedFd,
    prog_id: u32,
    /// TCX: the link holding the program.
    link: Option<OwnedFd>,
    /// Whether that link is pinned where this build keeps it.
    link_pinned: bool,
    /// Why it is replaced rather than updated in place.
    replace: Option<String>,
    /// Pins of the earlier layout for this target.
    legacy: bool,
}

enum OnHook {
    Nothing,
    Ours(Box<Existing>),
    /// Someone else's program in sfunnel's clsact slot.
    Foreign(u32, String),
}

fn existing(mode: Mode, prog: OwnedFd, link: Option<OwnedFd>, link_pinned: bool, legacy: bool) -> Result<OnHook> {
    let prog_id = objects::prog_info(prog.as_fd())?.id;
    let replace = match identify(prog.as_fd())? {
        Identity::Current if legacy => Some("kept in an earlier build's pin layout".to_string()),
        Identity::Current => None,
        Identity::OtherLayout(why) => Some(why),
        Identity::NotOurs(name) => return Ok(OnHook::Foreign(prog_id, name)),
    };
    Ok(OnHook::Ours(Box::new(Existing { mode, prog, prog_id, link, link_pinned, replace, legacy })))
}

/// What the target's hook holds now.
fn inspect(tree: &Tree, t: &Target) -> Result<OnHook> {
    // TCX: the link this build pins.
    if let Some(link) = tree.open_link(&t.key(false))? {
        let info = objects::link_info(link.as_fd())?;
        if info.ifindex == t.ifindex {
            let prog = objects::prog_by_id(info.prog_id)?;
            return existing(Mode::Tcx, prog, Some(link), true, false);
        }
        // Hooked on nothing (or on an interface that had this index before):
        // the pin is stale.
        tree.unpin_link(&t.key(false))?;
        tree.unpin_link(&t.key(true))?;
    }
    // An earlier layout's pins of this target, if its program is on the hook.
    let legacy = t.legacy();
    let has_legacy = tree.legacy().contains(&legacy);
    if has_legacy {
        let (link, _) = tree.legacy_links(&legacy);
        if let Some(link) = link {
            let info = objects::link_info(link.as_fd())?;
            if info.ifindex == t.ifindex {
                let prog = objects::prog_by_id(info.prog_id)?;
                return existing(Mode::Tcx, prog, Some(link), false, true);
            }
        }
    }
    // TCX: a program of sfunnel's on the hook, held by a link pinned
    // nowhere this build looks (it is then pinned where it does).
    for id in tcx::attached_ids(t.ifindex, t.direction) {
        let Ok(prog) = objects::prog_by_id(id) else { continue };
        if objects::prog_info(prog.as_fd()).is_ok_and(|i| i.name == PROG_NAME) {
            if let Some(link) = objects::link_holding(id, t.ifindex)? {
                return existing(Mode::Tcx, prog, Some(link), false, has_legacy);
            }
        }
    }
    // clsact: sfunnel's filter slot.
    if let Some(id) = clsact::query(t.ifindex, t.direction) {
        let prog = objects::prog_by_id(id)?;
        return existing(Mode::Clsact, prog, None, false, has_legacy);
    }
    if has_legacy {
        // Its program is on no hook of this interface in this namespace:
        // what it pinned holds memory for nothing.
        tree.remove_legacy(&legacy)?;
        event!("swept", pins = format!("{legacy:?}"), why = "its program is on no hook");
    }
    Ok(OnHook::Nothing)
}

/// Whether an attachment whose ruleset is `compiled` needs the
/// segmentation detour: some funnel rule (GSO packets: sent on egress,
/// GRO-merged on ingress; and packets whose checksum is owed).
fn wants_detour(compiled: &Compiled) -> bool {
    compiled.rules.iter().any(|(_, v)| v.action as u32 == SFUNNEL_ACT_FUNNEL)
}

/// The program on the far end of `pair` (the detour's hook), if any.
fn detour_prog_on(pair: Pair, mode: Mode) -> Option<OwnedFd> {
    let id = match mode {
        Mode::Tcx => tcx::attached_ids(pair.inn, Direction::Ingress).into_iter().find(|id| {
            objects::prog_by_id(*id)
                .is_ok_and(|p| objects::prog_info(p.as_fd()).is_ok_and(|i| i.name == DETOUR_PROG_NAME))
        })?,
        Mode::Clsact => clsact::query(pair.inn, Direction::Ingress)?,
    };
    objects::prog_by_id(id).ok()
}

/// Whether the detour of the live attachment with `maps` is whole: its
/// record names the interface's pair, and the program on the pair's far
/// end is the one that shares these maps.
fn detour_intact(maps: &RulesetMaps, t: &Target, mode: Mode) -> Option<Pair> {
    let d = maps.read_detour().ok()?;
    let pair = crate::detour::find(t.ifindex, t.direction)?;
    if d.dev_ifindex != t.ifindex || d.out_ifindex != pair.out || d.in_ifindex != pair.inn {
        return None;
    }
    let ours = objects::map_id(maps.detour.as_fd()).ok()?;
    let hooked = detour_prog_on(pair, mode)?;
    objects::prog_info(hooked.as_fd()).ok()?.map_ids.contains(&ours).then_some(pair)
}

/// How segments go back from the detour (bpf/detour.h): into the
/// interface's receive path for an ingress attachment; on egress straight
/// into its peer's where `back` and `detour::peer_return` allow, else out
/// of it.
fn detour_flags(t: &Target, back: DetourReturn) -> u32 {
    match t.direction {
        Direction::Ingress => SFUNNEL_DETOUR_INGRESS,
        Direction::Egress if back == DetourReturn::Auto && crate::detour::peer_return(t.ifindex) => SFUNNEL_DETOUR_PEER,
        Direction::Egress => 0,
    }
}

/// Steers the segments that come in on the pair's far end to
/// `opts.detour_cpus` (spread.rs).  The default, `all`, only speeds things
/// up: where it cannot be set, the load goes on with a warning.  A choice
/// given explicitly that cannot be set fails the load.
fn spread_detour(pair: Pair, t: &Target, cpus: &DetourCpus) -> Result<()> {
    let (_, name) = crate::detour::names(t.ifindex, t.direction);
    match crate::spread::set(&name, pair.inn, cpus) {
        Ok(set) => {
            event!("detour_cpus", helper = name, cpus = if set.is_empty() { "sender".into() } else { set });
            Ok(())
        }
        Err(e) if *cpus == DetourCpus::All => {
            errln!("warning: {e:#}; the CPU that sends the segments funnels them");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Readies the pair of a detour that is kept: the checksums its out end
/// completes, and the CPUs that funnel its segments.
fn ready_pair(pair: Pair, t: &Target, opts: &LoadOptions) -> Result<()> {
    let (out, _) = crate::detour::names(t.ifindex, t.direction);
    crate::detour::complete_checksums(pair.out, &out)?;
    spread_detour(pair, t, &opts.detour_cpus)
}

/// Makes the pair of `t` afresh (whatever holds its names goes first),
/// registering its removal.
fn make_pair(t: &Target, opts: &LoadOptions, undo: &mut Undo<'_>) -> Result<Pair> {
    let pair = crate::detour::create(t.ifindex, t.direction)?;
    let (ifindex, direction) = (t.ifindex, t.direction);
    undo.push("the helper pair", move || crate::detour::remove(ifindex, direction).map(|_| ()));
    spread_detour(pair, t, &opts.detour_cpus)?;
    Ok(pair)
}

fn record(pair: Pair, t: &Target, opts: &LoadOptions) -> sfunnel_detour {
    sfunnel_detour {
        dev_ifindex: t.ifindex,
        out_ifindex: pair.out,
        in_ifindex: pair.inn,
        flags: detour_flags(t, opts.detour_return),
    }
}

// ---------------------------------------------------------------------------
// Prepare
// ---------------------------------------------------------------------------

/// What a prepared target will switch at commit.
enum Change {
    /// Nothing was on the hook: hook the new program (and its detour's).
    Attach,
    /// sfunnel's of this layout: flip to the staged generation, and set
    /// the detour's way back.
    InPlace { staged: Staged, detour_flags: Option<u32> },
    /// sfunnel's of another layout: swap in the new program (and its
    /// detour's), then let the old one go.
    Replace { why: String },
}

/// The detour program a commit hooks on the pair's far end, in place of
/// `old` if one is there.
struct DetourHook {
    pair: Pair,
    prog: OwnedFd,
    old: Option<OwnedFd>,
    /// TCX: the link on the pair that runs `old`.
    old_link: Option<OwnedFd>,
}

struct Prepared<'a> {
    t: Target,
    mode: Mode,
    change: Change,
    existing: Option<Box<Existing>>,
    /// The new program and its maps (Attach, Replace).
    loaded: Option<Loaded>,
    /// The new program's maps, or the live ones (InPlace).
    maps: RulesetMaps,
    prog_id: u32,
    /// Attach, Replace: the detour program to hook, where the new ruleset
    /// funnels.
    detour: Option<DetourHook>,
    /// Attach: the ruleset that goes into the new maps while the program is
    /// being hooked (commit).
    fill: Option<(&'a Compiled, Settings)>,
    /// Undoes what prepare made.
    undo: Undo<'a>,
}

/// `s` as a NUL-terminated C string of at most 15 bytes.
fn c_str16(s: &str) -> [std::os::raw::c_char; 16] {
    let mut out = [0 as std::os::raw::c_char; 16];
    for (d, b) in out.iter_mut().zip(s.bytes().take(15)) {
        *d = b as std::os::raw::c_char;
    }
    out
}

fn meta_for(t: &Target, mode: Mode) -> sfunnel_meta {
    sfunnel_meta {
        abi_version: SFUNNEL_ABI_VERSION,
        ifindex: t.ifindex,
        mode: if mode == Mode::Tcx { SFUNNEL_MODE_TCX } else { SFUNNEL_MODE_CLSACT },
        egress: u32::from(t.direction == Direction::Egress),
        netns_cookie: t.netns.cookie,
        netns_ino: t.netns.ino,
        ifname: c_str16(&t.iface),
        version: c_str16(env!("CARGO_PKG_VERSION")),
    }
}

fn prepare<'a>(tree: &'a Tree, t: &Target, compiled: &'a Compiled, opts: &LoadOptions) -> Result<Prepared<'a>> {
    let settings = Settings { egress: t.direction == Direction::Egress, over_mtu: opts.over_mtu };
    let detour = wants_detour(compiled);
    let mut undo = Undo::new();
    let found = match inspect(tree, t)? {
        OnHook::Foreign(id, name) => bail!(
            "a tc {d} filter at handle {h:#x} priority {p:#x} on {i} holds program {id} ({name}), which is not \
             sfunnel's: remove it (`tc filter del dev {i} {d} handle {h:#x} prio {p:#x} bpf`) and run again",
            d = t.direction,
            h = clsact::HANDLE,
            p = clsact::PRIORITY,
            i = t.iface
        ),
        OnHook::Nothing => None,
        OnHook::Ours(e) => Some(e),
    };

    if let Some(e) = &found {
        let asked = match opts.attach {
            AttachChoice::Auto => e.mode,
            AttachChoice::Tcx => Mode::Tcx,
            AttachChoice::Clsact => Mode::Clsact,
        };
        if asked != e.mode {
            bail!(
                "{i} {d} is attached with {m}; to move it to {asked}, unload it first (`sfunnel unload -i {i} -d {d}`, \
                 with this load's --netns or NETNS), then load with --attach {asked}",
                i = t.iface,
                d = t.direction,
                m = e.mode
            );
        }
    }

    // In place: the ruleset staged in the live maps' other generation.
    if let Some(e) = found.as_ref().filter(|e| e.replace.is_none()) {
        let maps = RulesetMaps::from_prog(e.prog.as_fd())?;
        if let (Some(link), false) = (&e.link, e.link_pinned) {
            // Held by a link pinned nowhere this build looks: pinned here too.
            tree.pin_link(&t.key(false), link.as_fd())?;
            let key = t.key(false);
            undo.push("the link's new pin", move || tree.unpin_link(&key));
        }
        let mut flags = None;
        if detour {
            match detour_intact(&maps, t, e.mode) {
                Some(pair) => {
                    ready_pair(pair, t, opts)?;
                    let want = detour_flags(t, opts.detour_return);
                    flags = (maps.read_detour()?.flags != want).then_some(want);
                }
                None => repair_detour(tree, t, e.mode, &maps, opts, &mut undo)?,
            }
        }
        let staged = maps.stage(compiled, settings).context("staging the new ruleset")?;
        let (mode, prog_id) = (e.mode, e.prog_id);
        return Ok(Prepared {
            t: t.clone(),
            mode,
            change: Change::InPlace { staged, detour_flags: flags },
            existing: found,
            loaded: None,
            maps,
            prog_id,
            detour: None,
            fill: None,
            undo,
        });
    }

    // A new program: on an empty hook, or in place of one of another layout,
    // on the same kind of hook.
    let mode = match &found {
        Some(e) => e.mode,
        None => {
            let (mode, why) = attach::choose(opts.attach, t.ifindex)?;
            event!(
                "attach_mode",
                iface = t.iface,
                direction = t.direction,
                ifindex = t.ifindex,
                mode = mode,
                why = why
            );
            mode
        }
    };
    let started = std::time::Instant::now();
    let loaded = Loaded::load_for((mode == Mode::Tcx).then(|| tcx::attach_type(t.direction)), detour)?;
    let maps = loaded.maps()?;
    let prog_id = objects::prog_info(loaded.program().as_fd())?.id;
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
    maps.write_meta(&meta_for(t, mode))?;
    // In place of another program, the ruleset goes in whole now, so that
    // no packet meets an empty one.  On an empty hook it goes in while the
    // program is being hooked (commit): each waits for a grace period,
    // and overlapped the waits do not add up.  That is safe because the
    // program sees no ruleset (generation 0, empty) until the install
    // flips to the complete new one: until then it passes every packet,
    // as if it were not there yet.
    let fill = if found.is_some() {
        maps.install(compiled, settings).context("filling the new program's maps")?;
        None
    } else {
        Some((compiled, settings))
    };
    let mut hook = None;
    if detour {
        let prog = dup(loaded.detour_program().context("the detour's program")?.as_fd())?;
        // The old attachment's pair is kept where whole: its detour program
        // is swapped at commit, as the main one is.
        let kept = found.as_ref().and_then(|e| {
            let pair = crate::detour::find(t.ifindex, t.direction)?;
            let old = detour_prog_on(pair, e.mode)?;
            Some((pair, old))
        });
        let (pair, old, old_link) = match kept {
            Some((pair, old)) => {
                ready_pair(pair, t, opts)?;
                let link = match mode {
                    Mode::Tcx => match tree.open_link(&t.key(true))? {
                        Some(l) => Some(l),
                        None => objects::link_holding(objects::prog_info(old.as_fd())?.id, pair.inn)?,
                    },
                    Mode::Clsact => None,
                };
                (pair, Some(old), link)
            }
            None => (make_pair(t, opts, &mut undo)?, None, None),
        };
        maps.write_detour(&record(pair, t, opts))?;
        event!("detour", ifindex = t.ifindex, out_ifindex = pair.out, in_ifindex = pair.inn, mode = mode);
        hook = Some(DetourHook { pair, prog, old, old_link });
    }
    let change = match &found {
        Some(e) => Change::Replace { why: e.replace.clone().unwrap_or_default() },
        None => Change::Attach,
    };
    if let Some(e) = &found {
        event!(
            "replace",
            iface = t.iface,
            direction = t.direction,
            old_prog = e.prog_id,
            why = e.replace.as_deref().unwrap_or("")
        );
    }
    Ok(Prepared {
        t: t.clone(),
        mode,
        change,
        existing: found,
        loaded: Some(loaded),
        maps,
        prog_id,
        detour: hook,
        fill,
        undo,
    })
}

// ---------------------------------------------------------------------------
// Commit
// ---------------------------------------------------------------------------

/// Makes the helper pair of a live attachment of this layout again (it was
/// deleted, or the ruleset did not funnel until now), with a detour program
/// for its maps, and points its record at the pair.  This repairs what
/// is live (a pair that is gone drops what is sent to it), so it is done
/// at once; dropping `undo` takes it back.
fn repair_detour<'a>(
    tree: &'a Tree,
    t: &Target,
    mode: Mode,
    maps: &RulesetMaps,
    opts: &LoadOptions,
    undo: &mut Undo<'a>,
) -> Result<()> {
    let pair = make_pair(t, opts, undo)?;
    let loaded = Loaded::detour_for(maps, mode == Mode::Tcx)?;
    let prog = dup(loaded.detour_program().context("the detour's program")?.as_fd())?;
    let mut hook = DetourHook { pair, prog, old: None, old_link: None };
    hook_detour(tree, t, mode, &mut hook, undo)?;
    let old = maps.read_detour()?;
    maps.write_detour(&record(pair, t, opts))?;
    let m = maps.try_clone()?;
    undo.push("the detour record", move || m.write_detour(&old));
    event!("detour", ifindex = t.ifindex, out_ifindex = pair.out, in_ifindex = pair.inn, mode = mode, why = "repaired");
    Ok(())
}

/// Hooks `h.prog` on the pair's far end, in place of `h.old` if there.
fn hook_detour<'a>(tree: &'a Tree, t: &Target, mode: Mode, h: &mut DetourHook, undo: &mut Undo<'a>) -> Result<()> {
    match (mode, &h.old) {
        (Mode::Tcx, Some(old)) => {
            let link = h.old_link.as_ref().context("the detour's TCX link is not pinned: load again")?;
            tcx::update(link.as_fd(), h.prog.as_fd(), old.as_fd())?;
            let (link, new, old) = (dup(link.as_fd())?, dup(h.prog.as_fd())?, dup(old.as_fd())?);
            undo.push("the detour program's swap", move || tcx::update(link.as_fd(), old.as_fd(), new.as_fd()));
            if tree.open_link(&t.key(true))?.is_none() {
                tree.pin_link(&t.key(true), h.old_link.as_ref().expect("checked").as_fd())?;
            }
        }
        (Mode::Tcx, None) => {
            let link = tcx::attach(h.prog.as_fd(), h.pair.inn, Direction::Ingress)?;
            tree.pin_link(&t.key(true), link.as_fd())?;
            let key = t.key(true);
            undo.push("the detour's TCX link", move || {
                tcx::detach(link.as_fd())?;
                tree.unpin_link(&key)
            });
        }
        (Mode::Clsact, old) => {
            let old_id = old.as_ref().map(|o| objects::prog_info(o.as_fd())).transpose()?.map(|i| i.id);
            clsact::attach(h.prog.as_fd(), h.pair.inn, Direction::Ingress, old_id)?;
            let new_id = objects::prog_info(h.prog.as_fd())?.id;
            let inn = h.pair.inn;
            match old.as_ref().map(|o| dup(o.as_fd())).transpose()? {
                Some(old) => undo.push("the detour program's swap", move || {
                    clsact::attach(old.as_fd(), inn, Direction::Ingress, Some(new_id))
                }),
                None => undo.push("the detour's filter", move || clsact::detach(inn, Direction::Ingress)),
            }
        }
    }
    event!("detour_hooked", iface = t.iface, direction = t.direction, helper = h.pair.inn, mode = mode);
    Ok(())
}

/// Hooks a new program (Attach, Replace): its detour's first, then its own,
/// each in place of the old one where there is one.
#[allow(clippy::too_many_arguments)]
fn hook_new<'a>(
    tree: &'a Tree,
    t: &Target,
    mode: Mode,
    detour: &mut Option<DetourHook>,
    loaded: Option<&Loaded>,
    existing: Option<&Existing>,
    prog_id: u32,
    undo: &mut Undo<'a>,
) -> Result<()> {
    if let Some(h) = detour.as_mut() {
        hook_detour(tree, t, mode, h, undo)?;
        fault("detour-hooked");
    }
    let loaded = loaded.context("a new program")?;
    let prog = loaded.program().as_fd();
    match (mode, existing) {
        (Mode::Tcx, Some(e)) => {
            let link = e.link.as_ref().context("the old TCX link")?;
            tcx::update(link.as_fd(), prog, e.prog.as_fd())?;
            let (link2, new, oldp) = (dup(link.as_fd())?, dup(prog)?, dup(e.prog.as_fd())?);
            undo.push("the program's swap", move || tcx::update(link2.as_fd(), oldp.as_fd(), new.as_fd()));
            fault("attached");
            if !e.link_pinned {
                tree.pin_link(&t.key(false), link.as_fd())?;
                let key = t.key(false);
                undo.push("the link's new pin", move || tree.unpin_link(&key));
            }
        }
        (Mode::Tcx, None) => {
            let link = tcx::attach(prog, t.ifindex, t.direction)?;
            fault("attached");
            tree.pin_link(&t.key(false), link.as_fd())?;
            let key = t.key(false);
            undo.push("the TCX link", move || {
                tcx::detach(link.as_fd())?;
                tree.unpin_link(&key)
            });
        }
        (Mode::Clsact, old) => {
            clsact::attach(prog, t.ifindex, t.direction, old.map(|e| e.prog_id))?;
            fault("attached");
            let (ifindex, d, new_id) = (t.ifindex, t.direction, prog_id);
            match old.map(|e| dup(e.prog.as_fd())).transpose()? {
                Some(o) => undo.push("the program's swap", move || clsact::attach(o.as_fd(), ifindex, d, Some(new_id))),
                None => undo.push("the clsact filter", move || clsact::detach(ifindex, d)),
            }
        }
    }
    Ok(())
}

/// A committed target: live, and switched back when dropped: `undo` (the
/// switch) first, then what prepare made (`p.undo`).  Fields drop in this
/// order.
struct Committed<'a> {
    undo: Undo<'a>,
    p: Prepared<'a>,
}

/// `SFUNNEL_FAIL_COMMIT=<n>`: the switch of the n-th target (from 0)
/// fails, for the tests of switching back.
fn failing_commit(i: usize) -> Result<()> {
    if std::env::var("SFUNNEL_FAIL_COMMIT").ok().and_then(|v| v.parse().ok()) == Some(i) {
        bail!("SFUNNEL_FAIL_COMMIT={i}: this switch fails, as asked");
    }
    Ok(())
}

fn commit<'a>(tree: &'a Tree, mut p: Prepared<'a>, i: usize) -> Result<Committed<'a>> {
    failing_commit(i)?;
    let mut undo = Undo::new();
    let t = p.t.clone();
    match &p.change {
        Change::InPlace { staged, detour_flags } => {
            if let Some(flags) = *detour_flags {
                let mut d = p.maps.read_detour()?;
                let old = d;
                d.flags = flags;
                p.maps.write_detour(&d)?;
                let m = p.maps.try_clone()?;
                undo.push("the detour's way back", move || m.write_detour(&old));
                event!("detour", ifindex = t.ifindex, back = crate::detour::Back::of(flags).as_str());
            }
            staged.flip(&p.maps)?;
            let (staged, m) = (*staged, p.maps.try_clone()?);
            undo.push("the ruleset's generation", move || staged.unflip(&m));
        }
        Change::Attach | Change::Replace { .. } => {
            let (maps, fill) = (&p.maps, p.fill);
            let hooked = std::thread::scope(|s| {
                let filling = fill.map(|(c, settings)| s.spawn(move || maps.install(c, settings)));
                let hooked = hook_new(
                    tree,
                    &t,
                    p.mode,
                    &mut p.detour,
                    p.loaded.as_ref(),
                    p.existing.as_deref(),
                    p.prog_id,
                    &mut undo,
                );
                let filled = match filling {
                    Some(h) => h.join().unwrap_or_else(|_| Err(anyhow!("the ruleset install thread panicked"))),
                    None => Ok(()),
                };
                hooked.and(filled.context("filling the new program's maps"))
            });
            hooked?;
        }
    }
    // What prepare made is now part of what is live: it is undone only if
    // this commit is switched back, after the switch (Committed), and kept
    // by release.
    Ok(Committed { undo, p })
}

// ---------------------------------------------------------------------------
// Release
// ---------------------------------------------------------------------------

/// Lets the old state go: problems are reported, the new one stays live.
fn release(tree: &Tree, c: Committed<'_>) -> LoadReport {
    let Committed { mut undo, mut p } = c;
    undo.disarm();
    p.undo.disarm();
    let t = &p.t;
    let warn = |what: &str, r: Result<()>| {
        if let Err(e) = r {
            errln!("warning: {} {}: {what}: {e:#}", t.iface, t.direction);
        }
    };
    let what = match &p.change {
        Change::InPlace { staged, .. } => {
            warn("releasing the previous ruleset", staged.release(&p.maps));
            "updated in place".to_string()
        }
        Change::Attach => "attached".to_string(),
        Change::Replace { why } => {
            if let Some(e) = &p.existing {
                if e.legacy {
                    warn("removing an earlier build's pins", tree.remove_legacy(&t.legacy()));
                }
            }
            if p.detour.is_none() {
                // The new ruleset does not funnel: the old pair goes.
                warn("removing the helper pair", remove_detour(tree, t));
            }
            format!("replaced ({why})")
        }
    };
    event!(
        match p.change {
            Change::InPlace { .. } => "updated",
            _ => "attached",
        },
        iface = t.iface,
        direction = t.direction,
        mode = p.mode,
        prog_id = p.prog_id,
        what = what
    );
    LoadReport { iface: t.iface.clone(), direction: t.direction, mode: p.mode, prog_id: p.prog_id, what }
}

// ---------------------------------------------------------------------------
// Load, all or nothing
// ---------------------------------------------------------------------------

/// Where one target of a failed load stands.
#[derive(Debug)]
pub enum Outcome {
    /// As it was before the load.
    Unchanged,
    /// As it was, after its change was switched back.
    RolledBack,
    /// This target's step failed (with why); it is as it was.
    Failed(String),
}

/// A load that changed nothing: what each target's state is, and why.
#[derive(Debug)]
pub struct LoadFailure {
    pub targets: Vec<(Target, Outcome)>,
    pub error: anyhow::Error,
}

impl std::fmt::Display for LoadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if UNDO_FAILED.load(std::sync::atomic::Ordering::Relaxed) {
            // The warnings above say what stayed; a rerun repairs it.
            write!(
                f,
                "{:#}; not all of it could be undone (see the warnings above; load again to repair):",
                self.error
            )?;
        } else {
            write!(f, "{:#}; nothing was changed:", self.error)?;
        }
        for (t, o) in &self.targets {
            let s = match o {
                Outcome::Unchanged => "unchanged".to_string(),
                Outcome::RolledBack => "unchanged (switched back)".to_string(),
                Outcome::Failed(e) => format!("unchanged, failed here: {e}"),
            };
            write!(f, "\n  {} {}: {s}", t.iface, t.direction)?;
        }
        Ok(())
    }
}

/// Loads `compiled` onto every target, or onto none: each target ends on
/// the new ruleset, or all of them as they were.
pub fn load_all(
    tree: &Tree,
    targets: &[Target],
    compiled: &Compiled,
    opts: &LoadOptions,
) -> std::result::Result<Vec<LoadReport>, LoadFailure> {
    let fail = |i: usize, e: anyhow::Error, done: Outcome| LoadFailure {
        targets: targets
            .iter()
            .enumerate()
            .map(|(j, t)| {
                let o = match j.cmp(&i) {
                    std::cmp::Ordering::Less => match done {
                        Outcome::RolledBack => Outcome::RolledBack,
                        _ => Outcome::Unchanged,
                    },
                    std::cmp::Ordering::Equal => Outcome::Failed(format!("{e:#}")),
                    std::cmp::Ordering::Greater => Outcome::Unchanged,
                };
                (t.clone(), o)
            })
            .collect(),
        error: anyhow!("loading onto {} {} failed", targets[i].iface, targets[i].direction),
    };
    let mut prepared = Vec::with_capacity(targets.len());
    for (i, t) in targets.iter().enumerate() {
        match prepare(tree, t, compiled, opts).with_context(|| format!("preparing {} {}", t.iface, t.direction)) {
            Ok(p) => prepared.push(p),
            // Dropping `prepared` undoes every target prepared so far.
            Err(e) => return Err(fail(i, e, Outcome::Unchanged)),
        }
    }
    fault("prepared");
    let mut committed: Vec<Committed<'_>> = Vec::with_capacity(targets.len());
    let mut rest = prepared.into_iter();
    let mut i = 0;
    while let Some(p) = rest.next() {
        match commit(tree, p, i).with_context(|| format!("switching {} {}", targets[i].iface, targets[i].direction)) {
            Ok(c) => committed.push(c),
            Err(e) => {
                // Switch back in reverse order, then drop what is prepared.
                while let Some(c) = committed.pop() {
                    drop(c);
                }
                drop(rest);
                return Err(fail(i, e, Outcome::RolledBack));
            }
        }
        if i == 0 {
            fault("committed");
        }
        i += 1;
    }
    let reports = committed.into_iter().map(|c| release(tree, c)).collect();
    fault("released");
    Ok(reports)
}

// ---------------------------------------------------------------------------
// Unload
// ---------------------------------------------------------------------------

/// Takes sfunnel's program off the target's hook, first, so no packet is
/// sent to a detour that is going.
fn detach_existing(tree: &Tree, t: &Target, e: &Existing) -> Result<()> {
    match e.mode {
        Mode::Tcx => {
            if let Some(link) = &e.link {
                tcx::detach(link.as_fd())?;
            }
            tree.unpin_link(&t.key(false))?;
        }
        Mode::Clsact => {
            // Only while the slot still holds the program found there.
            if clsact::query(t.ifindex, t.direction) == Some(e.prog_id) {
                clsact::detach(t.ifindex, t.direction)?;
            }
        }
    }
    event!("detached", iface = t.iface, direction = t.direction, mode = e.mode, prog_id = e.prog_id);
    Ok(())
}

/// Removes the target's helper pair, then the pin of the detour's link.
/// In that order: deleting the pair leaves the link hooked on nothing, and
/// releasing it then costs nothing.  A link released (or detached) while
/// still hooked waits for an RCU grace period under the rtnl lock, which
/// the pair's deletion would then wait for too (10-20 ms per unload).
fn remove_detour(tree: &Tree, t: &Target) -> Result<()> {
    crate::detour::remove(t.ifindex, t.direction)?;
    tree.unpin_link(&t.key(true))?;
    Ok(())
}

/// Detaches and removes everything sfunnel made for `t`: the program
/// first, then its detour.  Returns whether there was anything.  Someone
/// else's filter in sfunnel's slot is left alone.
pub fn unload(tree: &Tree, t: &Target) -> Result<bool> {
    let had = match inspect(tree, t)? {
        OnHook::Ours(e) => {
            detach_existing(tree, t, &e)?;
            if e.legacy {
                tree.remove_legacy(&t.legacy())?;
            }
            true
        }
        OnHook::Foreign(id, name) => {
            errln!(
                "warning: {} {}: the filter in sfunnel's slot holds program {id} ({name}), not sfunnel's: left alone",
                t.iface,
                t.direction
            );
            false
        }
        OnHook::Nothing => false,
    };
    let pair = crate::detour::find(t.ifindex, t.direction).is_some();
    remove_detour(tree, t)?;
    Ok(had || pair)
}
