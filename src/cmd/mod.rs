//! One module per verb.

pub mod check;
pub mod demo;
pub mod load;
pub mod metrics;
pub mod status;

/// How a verb ended, as the process exit status.  An error (exit status
/// 1) is the verb's `Err`; a usage error is [`USAGE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok = 0,
    /// The input (a ruleset) is invalid; nothing was changed.
    Invalid = 2,
    /// The verb finished but could not read everything it was to show
    /// (`status`, `metrics`); what it could not read is on stderr.
    Partial = 3,
}

/// Exit status of a usage error: an unknown flag, a bad value, a bad
/// environment variable (sysexits.h's EX_USAGE).
pub const USAGE: u8 = 64;
