//! Verbose logging (--verbose, DEBUG=1) to stderr.

use std::sync::atomic::{AtomicBool, Ordering};

static VERBOSE: AtomicBool = AtomicBool::new(false);

pub fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// Prints when verbose logging is on.
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::verbose() {
            eprintln!("sfunnel: {}", format!($($arg)*));
        }
    };
}
pub(crate) use debug;

/// Routes libbpf's messages: all of them when verbose; otherwise warnings,
/// less the netlink notice a query of an empty tc slot produces.
pub fn route_libbpf() {
    fn print(level: libbpf_rs::PrintLevel, msg: String) {
        let benign = msg.contains("Cannot find specified filter chain");
        if verbose() || (level == libbpf_rs::PrintLevel::Warn && !benign) {
            eprint!("libbpf: {msg}");
        }
    }
    libbpf_rs::set_print(Some((libbpf_rs::PrintLevel::Debug, print)));
}
