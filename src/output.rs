//! Standard output and error that a closed reader never turns into a
//! panic.
//!
//! `println!` panics when stdout is a pipe whose reader has gone
//! (`sfunnel status | head -1`).  Every verb prints through `outln!`
//! instead: the first broken pipe is remembered, later output is dropped,
//! and the verb ends as it would have with its own exit status.  A load
//! whose report nobody reads still finishes (or undoes) what it began.

use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};

static CLOSED: AtomicBool = AtomicBool::new(false);

/// Whether the reader of stdout has gone.
pub fn closed() -> bool {
    CLOSED.load(Ordering::Relaxed)
}

/// Writes `args` and a newline to stdout, flushed; nothing once the
/// reader has gone.  Other write errors are reported once on stderr.
pub fn line(args: std::fmt::Arguments<'_>) {
    if closed() {
        return;
    }
    let mut out = std::io::stdout().lock();
    let r = out.write_fmt(args).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush());
    if let Err(e) = r {
        CLOSED.store(true, Ordering::Relaxed);
        if e.kind() != ErrorKind::BrokenPipe {
            err_line(format_args!("warning: writing to standard output: {e}; the rest of the output is dropped"));
        }
    }
}

/// Writes `args` and a newline to stderr; a stderr nobody reads any more
/// (`sfunnel load 2>&1 | head -1`) is not an error to end a load over.
pub fn err_line(args: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}

/// `eprintln!` that never panics (see [`err_line`]).
macro_rules! errln {
    ($($arg:tt)*) => { $crate::output::err_line(format_args!($($arg)*)) };
}
pub(crate) use errln;

/// `println!` that ends quietly on a closed pipe (see the module doc).
macro_rules! outln {
    () => { $crate::output::line(format_args!("")) };
    ($($arg:tt)*) => { $crate::output::line(format_args!($($arg)*)) };
}
pub(crate) use outln;
