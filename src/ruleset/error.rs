//! Ruleset errors: a position, the offending source line with a caret, and a
//! plain message.

use std::fmt;

/// An error in a ruleset's text or meaning.  Nothing is compiled or loaded
/// from a ruleset that produced one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RulesetError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub col: usize,
    pub message: String,
    /// The whole source line the error is on, without its newline.
    pub source_line: String,
}

impl RulesetError {
    /// An error at byte offset `pos` of `input`.
    pub fn at(input: &str, pos: usize, message: impl Into<String>) -> RulesetError {
        let pos = pos.min(input.len());
        let line_start = input[..pos].rfind('\n').map_or(0, |i| i + 1);
        let line_end = input[pos..].find('\n').map_or(input.len(), |i| pos + i);
        let line = input[..line_start].matches('\n').count() + 1;
        let col = input[line_start..pos].chars().count() + 1;
        RulesetError {
            line,
            col,
            message: message.into(),
            source_line: input[line_start..line_end].trim_end_matches('\r').to_string(),
        }
    }
}

impl fmt::Display for RulesetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gutter = self.line.to_string().len();
        writeln!(f, "{}:{}: {}", self.line, self.col, self.message)?;
        writeln!(f, "{:gutter$} |", "")?;
        writeln!(f, "{} | {}", self.line, self.source_line)?;
        write!(f, "{:gutter$} | {:>width$}", "", "^", width = self.col)
    }
}
