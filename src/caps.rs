//! Privileges, checked before anything is touched, with a message that
//! names what is missing.

use anyhow::{bail, Result};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn effective() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// What loading, attaching, unloading, `status` and `gc` need: BPF
/// programs loaded and attached (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN), and
/// sfunnel's programs found by their ids and namespaces entered
/// (CAP_SYS_ADMIN).
pub fn require_for_load() -> Result<()> {
    let eff = effective();
    let has = |c: u32| eff & (1u64 << c) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF (or CAP_SYS_ADMIN on kernels before 5.8)");
    }
    // Without it the verifier refuses variable offsets into the packet.
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON (or CAP_SYS_ADMIN)");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_SYS_ADMIN) {
        missing.push("CAP_SYS_ADMIN (to find sfunnel's programs by id, and to enter network namespaces)");
    }
    if !missing.is_empty() {
        bail!(
            "missing privileges: {}. Run as root, or grant them (Kubernetes: securityContext.capabilities.add); \
             nothing was changed",
            missing.join(", ")
        );
    }
    Ok(())
}
