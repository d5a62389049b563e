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
/// less the netlink notices of two expected answers: a query of an empty tc
/// slot, and creating a clsact qdisc that is already there.
pub fn route_libbpf() {
    fn print(level: libbpf_rs::PrintLevel, msg: String) {
        let benign = ["Cannot find specified filter chain", "Exclusivity flag on, cannot modify"]
            .iter()
            .any(|m| msg.contains(m));
        if verbose() || (level == libbpf_rs::PrintLevel::Warn && !benign) {
            eprint!("{msg}");
        }
    }
    libbpf_rs::set_print(Some((libbpf_rs::PrintLevel::Debug, print)));
}
