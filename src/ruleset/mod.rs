//! The rule language: grammar → typed AST → compiled map entries.

pub mod ast;
pub mod compile;
pub mod error;
pub mod lookup;
pub mod parse;
pub mod shadow;

pub use ast::{Action, Match, PacketFields, Proto, Rule, Ruleset};
pub use compile::{compile, Compiled, MAX_ENTRIES};
pub use error::RulesetError;
pub use parse::{parse, parse_all};

/// Parses and compiles `text`, reporting every error found, in the order
/// of the text; each carries its source line.
pub fn load_all(text: &str) -> Result<(Ruleset, Compiled), Vec<RulesetError>> {
    let rs = parse_all(text)?;
    let compiled = compile(&rs).map_err(|mut e| {
        e.source_line = text.lines().nth(e.line.saturating_sub(1)).unwrap_or("").trim_end_matches('\r').to_string();
        vec![e]
    })?;
    Ok((rs, compiled))
}

/// Parses and compiles `text`; the first error (see [`load_all`]).
pub fn load(text: &str) -> Result<(Ruleset, Compiled), RulesetError> {
    load_all(text).map_err(|mut errors| errors.swap_remove(0))
}
