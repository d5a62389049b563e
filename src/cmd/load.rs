//! `sfunnel load`, `sfunnel unload` and `sfunnel gc`.

use anyhow::{bail, Context, Result};

use super::Outcome;
use crate::cli::{DirectionArg, GcArgs, LoadArgs, TargetArgs, UnloadArgs};
use crate::loader::{self, LoadOptions, Target};
use crate::output::errln;
use crate::output::outln;
use crate::pins::{self, Tree};
use crate::{caps, netns, ruleset};

/// The interfaces to act on: those given, or every interface in the
/// namespace but sfunnel's own helpers (a helper carries no traffic of
/// its own; loading onto it would give it a helper of its own).
fn interfaces(args: &TargetArgs) -> Result<Vec<String>> {
    let given: Vec<String> = args.ifaces.iter().filter(|i| !i.is_empty()).cloned().collect();
    if !given.is_empty() {
        for i in &given {
            pins::check_iface_name(i)?;
        }
        return Ok(given);
    }
    // The namespace's own interfaces (not /sys/class/net, which shows the
    // namespace sysfs was mounted in).
    let all = crate::netlink::Netlink::open()?.links().context("listing the namespace's interfaces")?;
    Ok(all.into_iter().filter(|l| !crate::detour::is_helper(l)).map(|l| l.name).collect())
}

/// Enters the namespace; the targets, each interface waited for
/// (N_ATTEMPTS, RETRY_DELAY) when `wait`.
fn targets(args: &TargetArgs, default: DirectionArg, wait: Option<&LoadOptions>) -> Result<Vec<Target>> {
    if let Some(ns) = &args.netns {
        netns::enter(ns)?;
    }
    let id = netns::current()?;
    let mut out = Vec::new();
    for iface in interfaces(args)? {
        let ifindex = match wait {
            Some(o) => loader::wait_for_iface(&iface, o.attempts, o.retry_delay)?,
            None => match crate::netlink::lookup(iface.as_str())? {
                Some(i) => i,
                None => {
                    errln!("warning: interface {iface} not found: nothing to unload there");
                    continue;
                }
            },
        };
        for direction in args.direction.unwrap_or(default).directions() {
            out.push(Target { netns: id, iface: iface.clone(), ifindex, direction });
        }
    }
    Ok(out)
}

/// Opens and locks the tree, then frees what the kernel shows dead.
fn open_tree(lock: &crate::cli::LockArgs) -> Result<(Tree, pins::Lock)> {
    let tree = Tree::open()?;
    let guard = tree.lock(lock.timeout())?;
    tree.sweep();
    Ok((tree, guard))
}

pub fn load(args: &LoadArgs) -> Result<Outcome> {
    crate::log::set_verbose(args.target.verbose);
    let Some(src) = args.source.resolve()? else {
        bail!(
            "no ruleset: give the rules as an argument, --file FILE or $SFUNNEL_RULESET, or put them in {}",
            crate::cli::DEFAULT_RULESET_FILE
        );
    };
    // Parse and compile first: a bad ruleset changes nothing.
    let (rs, compiled) = match ruleset::load_all(&src.text) {
        Ok(v) => v,
        Err(errors) => {
            super::check::print_errors(&src.origin, &errors);
            return Ok(Outcome::Invalid);
        }
    };
    crate::log::event!(
        "ruleset",
        origin = src.origin,
        rules = rs.rules.len(),
        rule_entries = compiled.rules.len(),
        over_mtu = args.over_mtu.as_str(),
        detour_return = args.detour_return.as_str(),
        detour_cpus = args.detour_cpus
    );
    caps::require_for_load()?;
    crate::datapath::check_kernel()?;
    let opts = LoadOptions {
        attach: args.attach,
        attempts: args.attempts,
        retry_delay: args.retry_delay(),
        over_mtu: args.over_mtu,
        detour_return: args.detour_return,
        detour_cpus: args.detour_cpus.clone(),
    };
    // Missing interfaces are waited for before the lock, which every
    // sfunnel on the node shares.
    let targets = targets(&args.target, DirectionArg::Ingress, Some(&opts))?;
    if targets.is_empty() {
        bail!("no interfaces to load onto");
    }
    let (tree, _lock) = open_tree(&args.target.lock)?;
    for pair in crate::detour::remove_orphans()? {
        crate::log::event!("swept", pair = pair, why = "its interface is gone");
    }
    match loader::load_all(&tree, &targets, &compiled, &opts) {
        Ok(reports) => {
            for r in reports {
                outln!(
                    "{} {}: {} with {}, program {}, {} rules, {} map entries",
                    r.iface,
                    r.direction,
                    r.what,
                    r.mode,
                    r.prog_id,
                    rs.rules.len(),
                    compiled.rules.len()
                );
            }
            Ok(Outcome::Ok)
        }
        Err(f) => bail!("{f}"),
    }
}

pub fn unload(args: &UnloadArgs) -> Result<Outcome> {
    crate::log::set_verbose(args.target.verbose);
    caps::require_for_load()?;
    let targets = targets(&args.target, DirectionArg::Both, None)?;
    let (tree, _lock) = open_tree(&args.target.lock)?;
    let mut removed = 0;
    for t in &targets {
        if loader::unload(&tree, t).with_context(|| format!("unloading from {} {}", t.iface, t.direction))? {
            outln!("{} {}: unloaded", t.iface, t.direction);
            removed += 1;
        }
    }
    if args.target.ifaces.iter().all(|i| i.is_empty()) {
        // Every interface: pairs whose interface is gone too.
        removed += crate::detour::remove_orphans()?.len();
    }
    if removed == 0 {
        outln!("nothing of sfunnel's was loaded there");
    }
    Ok(Outcome::Ok)
}

/// Removes what the kernel's objects show dead, and nothing else: it never
/// enters a namespace, so it does the same from a pod as from the host.
pub fn gc(args: &GcArgs) -> Result<Outcome> {
    caps::require_for_load()?;
    let tree = Tree::open()?;
    let _lock = tree.lock(args.lock.timeout())?;
    let dead = tree.dead();
    for (d, why) in &dead {
        let what = tree.describe(d);
        if args.dry_run {
            outln!("would remove {what}: {why}");
        } else {
            tree.remove(d).with_context(|| format!("removing {what}"))?;
            outln!("removed {what}: {why}");
        }
    }
    let verb = if args.dry_run { "would remove" } else { "removed" };
    outln!("gc: {verb} {} pin(s) of dead attachments", dead.len());
    Ok(Outcome::Ok)
}
