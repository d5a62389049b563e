//! Privileges, checked before anything is touched, with a message that
//! names what is missing.

use anyhow::{bail, Result};

use rustix::thread::{capabilities, CapabilitySet};

/// The calling thread's effective capabilities (capget(2)); none if the
/// kernel will not say.
fn effective() -> CapabilitySet {
    capabilities(None).map_or(CapabilitySet::empty(), |c| c.effective)
}

/// What loading, attaching, unloading, `status` and `gc` need: BPF
/// programs loaded and attached (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN), and
/// sfunnel's programs found by their ids and namespaces entered
/// (CAP_SYS_ADMIN).
pub fn require_for_load() -> Result<()> {
    let eff = effective();
    let has = |c: CapabilitySet| eff.contains(c);
    let mut missing = Vec::new();
    if !has(CapabilitySet::BPF) && !has(CapabilitySet::SYS_ADMIN) {
        missing.push("CAP_BPF (or CAP_SYS_ADMIN on kernels before 5.8)");
    }
    // Without it the verifier refuses variable offsets into the packet.
    if !has(CapabilitySet::PERFMON) && !has(CapabilitySet::SYS_ADMIN) {
        missing.push("CAP_PERFMON (or CAP_SYS_ADMIN)");
    }
    if !has(CapabilitySet::NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CapabilitySet::SYS_ADMIN) {
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

/// What reading sfunnel's programs and maps needs (`status`, `metrics`):
/// CAP_SYS_ADMIN, without which the kernel opens no BPF object by its id.
pub fn require_for_read() -> Result<()> {
    if !effective().contains(CapabilitySet::SYS_ADMIN) {
        bail!(
            "missing privileges: CAP_SYS_ADMIN (to find sfunnel's programs and maps by their ids). Run as root, or \
             grant it"
        );
    }
    Ok(())
}
