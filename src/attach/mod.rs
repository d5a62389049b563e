//! Hooking the program into an interface: TCX where the kernel has it
//! (6.6 and newer), else a clsact qdisc with a direct-action cls_bpf filter.
//! The choice is made by probing the kernel and always reported: a silent
//! fallback would hide a TCX bug.

pub mod clsact;
pub mod tcx;

use std::fmt;

use anyhow::{bail, Result};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Tcx,
    Clsact,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Tcx => "tcx",
            Mode::Clsact => "clsact",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the user asked for with --attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AttachChoice {
    /// TCX if the kernel has it, else clsact.
    #[default]
    Auto,
    Tcx,
    Clsact,
}

/// The mode to use on `ifindex`, and why.
pub fn choose(choice: AttachChoice, ifindex: u32) -> Result<(Mode, &'static str)> {
    let tcx = tcx::supported(ifindex);
    Ok(match (choice, tcx) {
        (AttachChoice::Auto, true) => (Mode::Tcx, "the kernel supports TCX"),
        (AttachChoice::Auto, false) => (Mode::Clsact, "the kernel has no TCX (before 6.6): using a clsact qdisc"),
        (AttachChoice::Tcx, true) => (Mode::Tcx, "--attach tcx"),
        (AttachChoice::Tcx, false) => {
            bail!("--attach tcx: this kernel has no TCX (it came in 6.6); use --attach clsact or auto")
        }
        (AttachChoice::Clsact, _) => (Mode::Clsact, "--attach clsact"),
    })
}
