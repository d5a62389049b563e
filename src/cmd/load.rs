//! `sfunnel load` and `sfunnel unload`.

use anyhow::{bail, Context, Result};

use super::Outcome;
use crate::cli::{GcArgs, LoadArgs, TargetArgs, UnloadArgs};
use crate::loader::{self, LoadOptions};
use crate::pins::{self, Lock, Target};
use crate::{caps, netns, ruleset};

/// Enters the namespace and lists the (interface, direction) pairs.
fn targets(args: &TargetArgs) -> Result<Vec<Target>> {
    if let Some(ns) = &args.netns {
        netns::enter(ns)?;
    }
    let ino = netns::current_inode()?;
    let ifaces = if args.ifaces.iter().any(|i| !i.is_empty()) {
        args.ifaces.iter().filter(|i| !i.is_empty()).cloned().collect()
    } else {
        // The namespace's own interfaces (not /sys/class/net, which shows
        // the namespace sysfs was mounted in).
        nix::net::if_::if_nameindex()
            .context("listing the namespace's interfaces")?
            .iter()
            .map(|i| i.name().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    };
    Ok(ifaces
        .into_iter()
        .flat_map(|iface| {
            args.direction.directions().into_iter().map(move |direction| Target {
                netns_ino: ino,
                iface: iface.clone(),
                direction,
            })
        })
        .collect())
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
    let (rs, compiled) = match ruleset::load(&src.text) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: invalid ruleset (from {}); nothing was changed\n{e}", src.origin);
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
    caps::require_for_load(args.target.netns.is_some())?;
    crate::datapath::check_kernel()?;
    pins::ensure_bpffs()?;
    let targets = targets(&args.target)?;
    if targets.is_empty() {
        bail!("no interfaces to load onto");
    }
    let opts = LoadOptions {
        attach: args.attach,
        attempts: args.attempts,
        retry_delay: args.retry_delay(),
        over_mtu: args.over_mtu,
        detour_return: args.detour_return,
        detour_cpus: args.detour_cpus.clone(),
    };
    // Wait for missing interfaces before taking the lock, which every
    // loader on the node shares.
    for t in &targets {
        loader::wait_for_iface(&t.iface, opts.attempts, opts.retry_delay)
            .with_context(|| format!("loading onto {} {}", t.iface, t.direction))?;
    }
    let _lock = Lock::acquire()?;
    for t in &targets {
        let r =
            loader::load(t, &compiled, &opts).with_context(|| format!("loading onto {} {}", t.iface, t.direction))?;
        println!(
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

pub fn unload(args: &UnloadArgs) -> Result<Outcome> {
    crate::log::set_verbose(args.target.verbose);
    caps::require_for_load(args.target.netns.is_some())?;
    pins::ensure_bpffs()?;
    let explicit = args.target.ifaces.iter().any(|i| !i.is_empty());
    let mut wanted = targets(&args.target)?;
    if !explicit {
        // Every interface: also those that are gone but left pins here.
        let ino = netns::current_inode()?;
        let dirs = args.target.direction.directions();
        for t in Target::all().into_iter().filter(|t| t.netns_ino == ino && dirs.contains(&t.direction)) {
            if !wanted.contains(&t) {
                wanted.push(t);
            }
        }
    }
    let _lock = Lock::acquire()?;
    let mut removed = 0;
    for t in wanted.iter().filter(|t| t.dir().exists()) {
        loader::unload(t).with_context(|| format!("unloading from {} {}", t.iface, t.direction))?;
        println!("{} {}: unloaded", t.iface, t.direction);
        removed += 1;
    }
    if removed == 0 {
        println!("nothing of sfunnel's was loaded there");
    }
    Ok(Outcome::Ok)
}

pub fn gc(args: &GcArgs) -> Result<Outcome> {
    caps::require_for_load(true)?;
    pins::ensure_bpffs()?;
    let _lock = Lock::acquire()?;
    let (mut removed, mut kept) = (0, 0);
    for t in Target::all() {
        let Some(stale) = loader::stale(&t) else {
            kept += 1;
            continue;
        };
        let (dir, why) = (t.dir(), &stale.why);
        if args.dry_run {
            println!("would remove {}: {why}", dir.display());
        } else {
            loader::remove_stale(&t, &stale).with_context(|| format!("removing {}", dir.display()))?;
            println!("removed {}: {why}", dir.display());
        }
        removed += 1;
    }
    let verb = if args.dry_run { "would remove" } else { "removed" };
    println!("gc: {verb} {removed} stale attachment(s), kept {kept}");
    Ok(Outcome::Ok)
}
