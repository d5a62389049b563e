//! The BPF skeleton and the constants of bpf/sfunnel.h.  Nothing outside
//! this module names generated items except through these re-exports.

#[allow(clippy::all, non_camel_case_types, non_snake_case, dead_code, unused_imports)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/sfunnel.skel.rs"));
}

/// Constants shared with the datapath, generated from bpf/sfunnel.h.
#[allow(dead_code)]
pub mod consts {
    include!(concat!(env!("OUT_DIR"), "/sfunnel_consts.rs"));
}

pub use skel::*;
