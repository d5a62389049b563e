//! Command-line types (clap derive).  The original container's environment
//! interface maps onto the same types: see `container_mode` in main.rs.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

/// Where rules come from when none are given: the original container's
/// default file.
pub const DEFAULT_RULESET_FILE: &str = "/etc/sfunnel/ruleset";

#[derive(Debug, Parser)]
#[command(name = "sfunnel", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Parse and compile a ruleset, and print it in canonical form with the
    /// map entries each rule compiles to.  Exit status 0: valid; 2: invalid.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct RulesSource {
    /// The rules themselves (newline- or `;`-separated).  Takes precedence
    /// over --file, $SFUNNEL_RULESET and /etc/sfunnel/ruleset, in that order.
    pub rules: Option<String>,

    /// Read the rules from this file.
    #[arg(short, long, value_name = "FILE")]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub source: RulesSource,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A ruleset's text and where it came from (for messages).
#[derive(Debug, Clone)]
pub struct RulesText {
    pub text: String,
    pub origin: String,
}

impl RulesSource {
    /// The rules by precedence: argument, --file, $SFUNNEL_RULESET, the
    /// default file.  `None` when there are none anywhere.
    pub fn resolve(&self) -> Result<Option<RulesText>> {
        if let Some(text) = &self.rules {
            return Ok(Some(RulesText {
                text: text.clone(),
                origin: "the command line".into(),
            }));
        }
        if let Some(path) = &self.file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the ruleset file {}", path.display()))?;
            return Ok(Some(RulesText {
                text,
                origin: path.display().to_string(),
            }));
        }
        if let Ok(text) = std::env::var("SFUNNEL_RULESET") {
            return Ok(Some(RulesText {
                text,
                origin: "$SFUNNEL_RULESET".into(),
            }));
        }
        match std::fs::read_to_string(DEFAULT_RULESET_FILE) {
            Ok(text) => Ok(Some(RulesText {
                text,
                origin: DEFAULT_RULESET_FILE.into(),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {DEFAULT_RULESET_FILE}")),
        }
    }
}
