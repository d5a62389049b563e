//! BPF objects as the kernel reports them: a program's name and maps, a
//! link's program and interface, every program on the machine.  With
//! these, a rerun, `status` and `gc` tell what is sfunnel's from the
//! kernel's objects themselves: the hook holds the program, the program
//! holds its maps, and nothing of either needs a pin.
//!
//! Opening an object by id needs CAP_SYS_ADMIN (the kernel's rule for
//! BPF_*_GET_FD_BY_ID and BPF_PROG_GET_NEXT_ID).

use std::ffi::CStr;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result};

/// libbpf's return value (0, an fd, or -errno) as a Result.
fn check(rc: i32, what: impl FnOnce() -> String) -> Result<i32> {
    if rc < 0 {
        Err(std::io::Error::from_raw_os_error(-rc)).with_context(what)
    } else {
        Ok(rc)
    }
}

fn own(fd: i32) -> OwnedFd {
    // SAFETY: a new descriptor returned by the kernel that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A name of at most 16 bytes (a BPF object's, or one of sf_meta's): NUL-terminated
/// within them, or all 16 long.
pub fn name_of(raw: &[std::os::raw::c_char; 16]) -> String {
    let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
    CStr::from_bytes_until_nul(&bytes)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned())
}

/// What the kernel says of a program.
#[derive(Debug, Clone)]
pub struct ProgInfo {
    pub id: u32,
    pub name: String,
    pub map_ids: Vec<u32>,
}

pub fn prog_info(fd: BorrowedFd<'_>) -> Result<ProgInfo> {
    let mut ids = vec![0u32; 32];
    loop {
        let mut info = libbpf_sys::bpf_prog_info {
            nr_map_ids: ids.len() as u32,
            map_ids: ids.as_mut_ptr() as u64,
            ..Default::default()
        };
        let mut len = size_of::<libbpf_sys::bpf_prog_info>() as u32;
        // SAFETY: info is a valid bpf_prog_info of `len` bytes whose map_ids
        // points at nr_map_ids writable u32s that outlive the call.
        let rc = unsafe { libbpf_sys::bpf_prog_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
        check(rc, || "reading a BPF program's info".into())?;
        let n = info.nr_map_ids as usize;
        if n > ids.len() {
            ids.resize(n, 0);
            continue;
        }
        ids.truncate(n);
        return Ok(ProgInfo { id: info.id, name: name_of(&info.name), map_ids: ids });
    }
}

/// A program by its id.
pub fn prog_by_id(id: u32) -> Result<OwnedFd> {
    // SAFETY: plain libbpf call.
    let fd = unsafe { libbpf_sys::bpf_prog_get_fd_by_id(id) };
    check(fd, || format!("opening BPF program {id} (needs CAP_SYS_ADMIN)")).map(own)
}

/// The id of every program loaded on the machine.
pub fn all_prog_ids() -> Result<Vec<u32>> {
    let (mut id, mut out) = (0u32, Vec::new());
    loop {
        let mut next = 0u32;
        // SAFETY: plain libbpf call with a valid out pointer.
        let rc = unsafe { libbpf_sys::bpf_prog_get_next_id(id, &mut next) };
        if rc == -libc::ENOENT {
            return Ok(out);
        }
        check(rc, || "listing BPF programs (needs CAP_SYS_ADMIN)".into())?;
        out.push(next);
        id = next;
    }
}

/// The name the kernel gives a map (its variable's name in bpf/maps.h).
pub fn map_name(fd: BorrowedFd<'_>) -> Result<String> {
    let mut info = libbpf_sys::bpf_map_info::default();
    let mut len = size_of::<libbpf_sys::bpf_map_info>() as u32;
    // SAFETY: info is a valid bpf_map_info of `len` bytes.
    let rc = unsafe { libbpf_sys::bpf_map_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
    check(rc, || "reading a BPF map's info".into())?;
    Ok(name_of(&info.name))
}

/// What the kernel says of a TCX link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
    /// The interface it is hooked on; 0 once that interface is gone (with
    /// its namespace, say): the link then holds its program for nothing.
    pub ifindex: u32,
}

pub fn link_info(fd: BorrowedFd<'_>) -> Result<LinkInfo> {
    // SAFETY: bpf_link_info is plain data; all zeroes is a valid value.
    let mut info: libbpf_sys::bpf_link_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libbpf_sys::bpf_link_info>() as u32;
    // SAFETY: info is a valid bpf_link_info of `len` bytes.
    let rc = unsafe { libbpf_sys::bpf_link_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
    check(rc, || "reading a BPF link's info".into())?;
    // SAFETY: the union's tcx member is what a TCX link fills in; for any
    // other link it reads as plain integers.
    let ifindex = unsafe { info.__bindgen_anon_1.tcx.ifindex };
    Ok(LinkInfo { id: info.id, prog_id: info.prog_id, ifindex })
}

/// A map's id.
pub fn map_id(fd: BorrowedFd<'_>) -> Result<u32> {
    let mut info = libbpf_sys::bpf_map_info::default();
    let mut len = size_of::<libbpf_sys::bpf_map_info>() as u32;
    // SAFETY: info is a valid bpf_map_info of `len` bytes.
    let rc = unsafe { libbpf_sys::bpf_map_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
    check(rc, || "reading a BPF map's info".into())?;
    Ok(info.id)
}

/// The link that holds the program `prog_id` on the interface `ifindex`
/// (a TCX link, by what it reports), among every link on the machine: for
/// a program of sfunnel's on a hook whose link is pinned nowhere this
/// build looks (an earlier build, a load killed before it pinned).
pub fn link_holding(prog_id: u32, ifindex: u32) -> Result<Option<OwnedFd>> {
    let mut id = 0u32;
    loop {
        let mut next = 0u32;
        // SAFETY: plain libbpf call with a valid out pointer.
        let rc = unsafe { libbpf_sys::bpf_link_get_next_id(id, &mut next) };
        if rc == -libc::ENOENT {
            return Ok(None);
        }
        check(rc, || "listing BPF links (needs CAP_SYS_ADMIN)".into())?;
        id = next;
        // SAFETY: plain libbpf call.
        let fd = unsafe { libbpf_sys::bpf_link_get_fd_by_id(next) };
        if fd < 0 {
            continue; // gone since it was listed
        }
        let link = own(fd);
        if link_info(link.as_fd()).is_ok_and(|i| i.prog_id == prog_id && i.ifindex == ifindex) {
            return Ok(Some(link));
        }
    }
}
