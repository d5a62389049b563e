//! sfunnel: multi-port session affinity with eBPF.  See README.md.

pub mod attach;
pub mod caps;
pub mod cli;
pub mod cmd;
pub mod datapath;
pub mod detour;
pub mod loader;
pub mod log;
pub mod netlink;
pub mod netns;
pub mod objects;
pub mod output;
pub mod pins;
pub mod ruleset;
pub mod spread;
