//! One module per verb.

pub mod check;

/// How a verb ended, as the process exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok = 0,
    /// The input (a ruleset) is invalid; nothing was changed.
    Invalid = 2,
}
