//! TCX links (kernel 6.6+).  libbpf-rs has no wrapper, so this makes,
//! updates and detaches them with libbpf's calls and owns their fds.

use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result};
use libbpf_rs::ProgramAttachType;

use super::Direction;

pub fn attach_type(d: Direction) -> ProgramAttachType {
    match d {
        Direction::Ingress => ProgramAttachType::TcxIngress,
        Direction::Egress => ProgramAttachType::TcxEgress,
    }
}

/// Whether the kernel knows TCX: a query of the TCX ingress hook succeeds
/// where it does, and fails with EINVAL where it does not.  No side effect.
pub fn supported(ifindex: u32) -> bool {
    let mut opts =
        libbpf_sys::bpf_prog_query_opts { sz: size_of::<libbpf_sys::bpf_prog_query_opts>() as _, ..Default::default() };
    // SAFETY: opts is a valid, sized bpf_prog_query_opts with no buffers.
    let rc = unsafe { libbpf_sys::bpf_prog_query_opts(ifindex as i32, libbpf_sys::BPF_TCX_INGRESS, &mut opts) };
    rc == 0
}

/// Ids of the programs on the interface's TCX hook for `d`.
pub fn attached_ids(ifindex: u32, d: Direction) -> Vec<u32> {
    let mut ids = [0u32; 64];
    let mut opts = libbpf_sys::bpf_prog_query_opts {
        sz: size_of::<libbpf_sys::bpf_prog_query_opts>() as _,
        prog_ids: ids.as_mut_ptr(),
        ..Default::default()
    };
    opts.__bindgen_anon_1.count = ids.len() as u32;
    // SAFETY: prog_ids points at `count` writable u32s that outlive the call.
    let rc = unsafe { libbpf_sys::bpf_prog_query_opts(ifindex as i32, hook(d), &mut opts) };
    if rc != 0 {
        return Vec::new();
    }
    // SAFETY: the kernel wrote `count` back into the union's count field.
    let n = unsafe { opts.__bindgen_anon_1.count } as usize;
    ids[..n.min(ids.len())].to_vec()
}

/// The kernel's attach type of the TCX hook for `d`.
fn hook(d: Direction) -> libbpf_sys::bpf_attach_type {
    match d {
        Direction::Ingress => libbpf_sys::BPF_TCX_INGRESS,
        Direction::Egress => libbpf_sys::BPF_TCX_EGRESS,
    }
}

/// Links the program `prog` (loaded for that hook's attach type) at the
/// end of the interface's TCX chain for `d`, after any programs already
/// there.  The link lives as long as the returned fd or a pin of it.
pub fn attach(prog: BorrowedFd<'_>, ifindex: u32, d: Direction) -> Result<OwnedFd> {
    let opts = libbpf_sys::bpf_link_create_opts {
        sz: size_of::<libbpf_sys::bpf_link_create_opts>() as _,
        ..Default::default()
    };
    // SAFETY: prog is a valid program fd; opts is valid and sized.
    let fd = unsafe { libbpf_sys::bpf_link_create(prog.as_raw_fd(), ifindex as i32, hook(d), &opts) };
    if fd < 0 {
        return Err(std::io::Error::from_raw_os_error(-fd))
            .context(format!("creating a TCX {d} link on ifindex {ifindex}"));
    }
    // SAFETY: a new link fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Swaps the program of the link `link` from `old` to `new` in one step:
/// its place in the chain stays, and no packet sees neither.  Fails if
/// the link no longer runs `old`.
pub fn update(link: BorrowedFd<'_>, new: BorrowedFd<'_>, old: BorrowedFd<'_>) -> Result<()> {
    let opts = libbpf_sys::bpf_link_update_opts {
        sz: size_of::<libbpf_sys::bpf_link_update_opts>() as _,
        flags: libbpf_sys::BPF_F_REPLACE,
        old_prog_fd: old.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: valid fds; opts is valid and sized.
    let rc = unsafe { libbpf_sys::bpf_link_update(link.as_raw_fd(), new.as_raw_fd(), &opts) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(-rc)).context("swapping the program of a TCX link");
    }
    Ok(())
}

/// Detaches the link `link` now, whoever else holds it.
pub fn detach(link: BorrowedFd<'_>) -> Result<()> {
    // SAFETY: a valid link fd.
    let rc = unsafe { libbpf_sys::bpf_link_detach(link.as_raw_fd()) };
    if rc != 0 && rc != -libc::ENOLINK {
        return Err(std::io::Error::from_raw_os_error(-rc)).context("detaching a TCX link");
    }
    Ok(())
}
