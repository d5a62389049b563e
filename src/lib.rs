//! sfunnel: multi-port session affinity with eBPF.  See README.md.

pub mod cli;
pub mod cmd;
pub mod datapath;
pub mod ruleset;
