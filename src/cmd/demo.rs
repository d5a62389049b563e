//! `sfunnel demo`: see README.

use anyhow::{bail, Result};

use super::Outcome;

pub fn run() -> Result<Outcome> {
    bail!("the demo is not written yet")
}
