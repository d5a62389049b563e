//! One module per verb.

pub mod check;
pub mod demo;
pub mod load;
pub mod status;

/// How a verb ended, as the process exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok = 0,
    /// The input (a ruleset) is invalid; nothing was changed.
    Invalid = 2,
}
