//! `sfunnel check`: parse and compile, print the canonical form.

use anyhow::{bail, Result};
use serde_json::json;

use super::Outcome;
use crate::cli::CheckArgs;
use crate::ruleset;

pub fn run(args: &CheckArgs) -> Result<Outcome> {
    let Some(src) = args.source.resolve()? else {
        bail!(
            "no ruleset to check: give the rules as an argument, --file FILE, $SFUNNEL_RULESET, \
             or put them in {}",
            crate::cli::DEFAULT_RULESET_FILE
        );
    };
    let (rs, compiled) = match ruleset::load(&src.text) {
        Ok(v) => v,
        Err(e) => {
            if args.json {
                let err = json!({"error": {"line": e.line, "col": e.col, "message": e.message, "origin": src.origin}});
                println!("{err}");
            }
            eprintln!("error: invalid ruleset (from {}); nothing was changed\n{e}", src.origin);
            return Ok(Outcome::Invalid);
        }
    };

    if args.json {
        let rules: Vec<_> = rs
            .rules
            .iter()
            .zip(&compiled.entries_per_rule)
            .map(|(r, n)| {
                json!({
                    "rule": r.to_string(),
                    "line": r.pos.line,
                    "entries": n,
                    "match": r.matches,
                    "action": r.action,
                })
            })
            .collect();
        let out = json!({
            "rules": rules,
            "uses_funneled": rs.uses_funneled(),
            "entries": compiled.rules.len(),
            "address_classes": compiled.addrs.len(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(Outcome::Ok);
    }

    let width = rs.rules.iter().map(|r| r.to_string().len()).max().unwrap_or(0);
    for (r, n) in rs.rules.iter().zip(&compiled.entries_per_rule) {
        let note = match n {
            0 => "0 entries: earlier rules match everything this one does, so it never applies".to_string(),
            1 => "1 entry".to_string(),
            n => format!("{n} entries"),
        };
        println!("{:width$}  # {note}", r.to_string());
    }
    println!("# {} rules from {}, {} map entries", rs.rules.len(), src.origin, compiled.rules.len());
    if rs.uses_funneled() {
        println!(
            "# uses `funneled`: packets of its protocol are tested for it, and that protocol's rules \
             without it are entered twice (funneled or not)"
        );
    }
    Ok(Outcome::Ok)
}
