//! sfunnel: multi-port session affinity with eBPF.  See README.md.

pub mod datapath;
pub mod ruleset;
