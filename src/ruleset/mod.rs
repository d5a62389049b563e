//! The rule language: grammar → typed AST → compiled map entries.

pub mod ast;
pub mod compile;
pub mod error;
pub mod lookup;
pub mod parse;

pub use ast::{Action, Match, PacketFields, Proto, Rule, Ruleset};
pub use compile::{compile, Compiled, MAX_ENTRIES};
pub use error::RulesetError;
pub use parse::parse;

/// Parses and compiles `text`; an error carries the offending source line.
pub fn load(text: &str) -> Result<(Ruleset, Compiled), RulesetError> {
    let rs = parse(text)?;
    let compiled = compile(&rs).map_err(|mut e| {
        e.source_line = text.lines().nth(e.line.saturating_sub(1)).unwrap_or("").to_string();
        e
    })?;
    Ok((rs, compiled))
}
