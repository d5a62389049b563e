//! `sfunnel check`: parse and compile, print the canonical form; report
//! every error, and warn about rules that can never match.

use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::json;

use super::Outcome;
use crate::cli::CheckArgs;
use crate::output::errln;
use crate::output::outln;
use crate::ruleset::{self, RulesetError};

/// `check --json`'s schema (docs/operations.md).
pub const SCHEMA: u32 = 1;

/// A finding about one rule that does not make the ruleset invalid.
#[derive(Debug, Serialize)]
struct Warning {
    line: usize,
    col: usize,
    /// The rule's index, from 0.
    rule: usize,
    message: String,
}

/// Prints every error on stderr, with its caret; the summary line first.
pub fn print_errors(origin: &str, errors: &[RulesetError]) {
    let n = errors.len();
    let what = if n == 1 { "1 error".to_string() } else { format!("{n} errors") };
    let capped = if n == ruleset::parse::MAX_ERRORS {
        " (at most that many are reported: fix these and check again)"
    } else {
        ""
    };
    errln!("error: invalid ruleset (from {origin}), {what}{capped}; nothing was changed");
    for e in errors {
        errln!("{e}");
    }
}

pub fn run(args: &CheckArgs) -> Result<Outcome> {
    let Some(src) = args.source.resolve()? else {
        bail!(
            "no ruleset to check: give the rules as an argument, --file FILE, $SFUNNEL_RULESET, \
             or put them in {}",
            crate::cli::DEFAULT_RULESET_FILE
        );
    };
    let (rs, compiled) = match ruleset::load_all(&src.text) {
        Ok(v) => v,
        Err(errors) => {
            if args.json {
                let list: Vec<_> = errors
                    .iter()
                    .map(|e| json!({"line": e.line, "col": e.col, "message": e.message, "source_line": e.source_line}))
                    .collect();
                // The same keys as a valid ruleset's document.
                let doc = json!({
                    "schema": SCHEMA,
                    "sfunnel": env!("CARGO_PKG_VERSION"),
                    "origin": src.origin,
                    "valid": false,
                    "errors": list,
                    "warnings": [],
                    "rules": [],
                    "uses_funneled": null,
                    "entries": null,
                    "address_classes": null,
                });
                outln!("{}", serde_json::to_string_pretty(&doc)?);
            }
            print_errors(&src.origin, &errors);
            return Ok(Outcome::Invalid);
        }
    };

    let report = ruleset::shadow::check(&rs, &compiled);
    let warnings: Vec<Warning> = report
        .shadowed
        .iter()
        .map(|sh| {
            let r = &rs.rules[sh.rule];
            let message = match sh.by {
                Some(i) => format!(
                    "this rule can never match: rule {} (line {}) matches every packet it would",
                    i + 1,
                    rs.rules[i].pos.line
                ),
                None => "this rule can never match: earlier rules together match every packet it would".into(),
            };
            Warning { line: r.pos.line, col: r.pos.col, rule: sh.rule, message }
        })
        .collect();
    if let Some(j) = report.stopped_at {
        errln!(
            "note: the ruleset is too large to compare every rule with each earlier one: from rule {} (line {}) on, \
             only rules that earlier ones shadow by their classes are found",
            j + 1,
            rs.rules[j].pos.line
        );
    }
    let fail = args.strict && !warnings.is_empty();
    let dead: std::collections::HashSet<usize> = warnings.iter().map(|w| w.rule).collect();

    if args.json {
        let rules: Vec<_> = rs
            .rules
            .iter()
            .zip(&compiled.entries_per_rule)
            .enumerate()
            .map(|(i, (r, n))| {
                json!({
                    "index": i,
                    "text": r.to_string(),
                    "line": r.pos.line,
                    "entries": n,
                    "shadowed": dead.contains(&i),
                    "match": r.matches,
                    "action": r.action,
                })
            })
            .collect();
        let doc = json!({
            "schema": SCHEMA,
            "sfunnel": env!("CARGO_PKG_VERSION"),
            "origin": src.origin,
            "valid": !fail,
            "errors": [],
            "warnings": warnings,
            "rules": rules,
            "uses_funneled": rs.uses_funneled(),
            "entries": compiled.rules.len(),
            "address_classes": compiled.addrs.len(),
        });
        outln!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        let width = rs.rules.iter().map(|r| r.to_string().len()).max().unwrap_or(0);
        for (i, (r, n)) in rs.rules.iter().zip(&compiled.entries_per_rule).enumerate() {
            let note = match n {
                _ if dead.contains(&i) => {
                    format!("{n} {}, never matches (see the warning)", if *n == 1 { "entry" } else { "entries" })
                }
                1 => "1 entry".to_string(),
                n => format!("{n} entries"),
            };
            outln!("{:width$}  # {note}", r.to_string());
        }
        outln!("# {} rules from {}, {} map entries", rs.rules.len(), src.origin, compiled.rules.len());
        if rs.uses_funneled() {
            outln!(
                "# uses `funneled`: packets of its protocol are tested for it, and that protocol's rules \
                 without it are entered twice (funneled or not)"
            );
        }
    }
    let lines: Vec<&str> = src.text.lines().collect();
    for w in &warnings {
        let e = RulesetError {
            line: w.line,
            col: w.col,
            message: w.message.clone(),
            source_line: lines.get(w.line - 1).copied().unwrap_or("").to_string(),
        };
        errln!("{}: {e}", if args.strict { "error (--strict)" } else { "warning" });
    }
    Ok(if fail { Outcome::Invalid } else { Outcome::Ok })
}
