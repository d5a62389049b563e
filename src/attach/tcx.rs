//! TCX links (kernel 6.6+).  libbpf-rs has no wrapper, so this calls
//! libbpf's bpf_program__attach_tcx and owns the link it returns.

use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::ptr::NonNull;

use anyhow::{Context, Result};
use libbpf_rs::{AsRawLibbpf, Link, ProgramAttachType};

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

/// Links the program (loaded for the matching TCX attach type) at the end
/// of the interface's TCX chain, after any programs already there.
pub fn attach(prog: &libbpf_rs::ProgramMut<'_>, ifindex: u32) -> Result<Link> {
    let opts = libbpf_sys::bpf_tcx_opts { sz: size_of::<libbpf_sys::bpf_tcx_opts>() as _, ..Default::default() };
    // SAFETY: the program pointer comes from a loaded libbpf object that
    // outlives this call; opts is valid and sized.
    let ptr = unsafe { libbpf_sys::bpf_program__attach_tcx(prog.as_libbpf_object().as_ptr(), ifindex as i32, &opts) };
    // SAFETY: libbpf_get_error reads errno-style errors from the pointer.
    let err = unsafe { libbpf_sys::libbpf_get_error(ptr as *const _) };
    if err != 0 || ptr.is_null() {
        let e = std::io::Error::from_raw_os_error(if err != 0 { (-err) as i32 } else { libc::EINVAL });
        return Err(e).context(format!("creating a TCX link on ifindex {ifindex}"));
    }
    // SAFETY: a non-null, error-free pointer is a link we now own.
    Ok(unsafe { Link::from_ptr(NonNull::new_unchecked(ptr)) })
}

/// Detaches a pinned link: the link goes when its pin and our fd go.
pub fn detach_pinned(path: &Path) -> Result<()> {
    let link = Link::open(path).with_context(|| format!("opening the pinned link {}", path.display()))?;
    // An explicit detach also works when someone else holds the link open.
    let _ = link.detach();
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
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
    let ty = match d {
        Direction::Ingress => libbpf_sys::BPF_TCX_INGRESS,
        Direction::Egress => libbpf_sys::BPF_TCX_EGRESS,
    };
    // SAFETY: prog_ids points at `count` writable u32s that outlive the call.
    let rc = unsafe { libbpf_sys::bpf_prog_query_opts(ifindex as i32, ty, &mut opts) };
    if rc != 0 {
        return Vec::new();
    }
    // SAFETY: the kernel wrote `count` back into the union's count field.
    let n = unsafe { opts.__bindgen_anon_1.count } as usize;
    ids[..n.min(ids.len())].to_vec()
}

/// Links the program `prog` at the end of the interface's TCX ingress
/// chain; the link lives as long as the returned fd or a pin of it.
pub fn attach_ingress_fd(prog: BorrowedFd<'_>, ifindex: u32) -> Result<OwnedFd> {
    let opts = libbpf_sys::bpf_link_create_opts {
        sz: size_of::<libbpf_sys::bpf_link_create_opts>() as _,
        ..Default::default()
    };
    // SAFETY: prog is a valid program fd; opts is valid and sized.
    let fd =
        unsafe { libbpf_sys::bpf_link_create(prog.as_raw_fd(), ifindex as i32, libbpf_sys::BPF_TCX_INGRESS, &opts) };
    if fd < 0 {
        return Err(std::io::Error::from_raw_os_error(-fd))
            .context(format!("creating a TCX link on ifindex {ifindex}"));
    }
    // SAFETY: a new link fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Pins the link `link` at `pin`, replacing a pin left there.
pub fn pin_link(link: BorrowedFd<'_>, pin: &Path) -> Result<()> {
    let _ = std::fs::remove_file(pin);
    let c = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).context("a pin path with a NUL byte")?;
    // SAFETY: link is a valid fd; c is a NUL-terminated path.
    let rc = unsafe { libbpf_sys::bpf_obj_pin(link.as_raw_fd(), c.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(-rc))
            .context(format!("pinning the TCX link at {}", pin.display()));
    }
    Ok(())
}
