//! Verbose logging (--verbose, DEBUG=1) to stderr.

use crate::output::errln;
use std::sync::atomic::{AtomicBool, Ordering};

static VERBOSE: AtomicBool = AtomicBool::new(false);

pub fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// One structured line on stderr when verbose logging is on, logfmt style:
///
/// ```text
/// sfunnel: event=attach iface=eth0 direction=egress mode=tcx why="the kernel has TCX"
/// ```
///
/// `event!("name", key = value, ...)`; values are formatted with Display.
macro_rules! event {
    ($name:expr $(, $k:ident = $v:expr)* $(,)?) => {
        if $crate::log::verbose() {
            $crate::log::emit($name, &[$((stringify!($k), format!("{}", $v))),*]);
        }
    };
}
pub(crate) use event;

/// Writes one event line: `key=value`, values quoted when they hold
/// spaces, quotes or `=`, or are empty.
pub fn emit(event: &str, fields: &[(&str, String)]) {
    let mut line = format!("sfunnel: event={event}");
    for (k, v) in fields {
        let plain = !v.is_empty() && !v.contains(|c: char| c.is_whitespace() || c == '"' || c == '=');
        if plain {
            line.push_str(&format!(" {k}={v}"));
        } else {
            line.push_str(&format!(" {k}={v:?}"));
        }
    }
    errln!("{line}");
}

/// Routes libbpf's messages: its warnings always, its info notes too when
/// verbose (its debug chatter, the ELF walk, never), less the netlink
/// notices of expected answers: a query of an empty tc slot or of a device
/// without a clsact qdisc, and creating a clsact qdisc that is already there.
pub fn route_libbpf() {
    fn print(level: libbpf_rs::PrintLevel, msg: String) {
        let benign = [
            "Cannot find specified filter chain",
            "Exclusivity flag on, cannot modify",
            "Parent Qdisc doesn't exists",
            "Filter already exists",
        ]
        .iter()
        .any(|m| msg.contains(m));
        let wanted = match level {
            libbpf_rs::PrintLevel::Warn => true,
            libbpf_rs::PrintLevel::Info => verbose(),
            libbpf_rs::PrintLevel::Debug => false,
        };
        if wanted && !benign {
            // Never a panic here: this is called from C.
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), msg.as_bytes());
        }
    }
    libbpf_rs::set_print(Some((libbpf_rs::PrintLevel::Info, print)));
}
