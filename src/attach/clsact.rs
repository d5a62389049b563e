//! clsact qdisc + direct-action cls_bpf filter, for kernels without TCX.
//!
//! sfunnel owns one filter per hook, at a fixed handle and priority, and
//! touches nothing else: an existing clsact qdisc is reused and never
//! deleted (other tools share it), and a filter at our handle and priority
//! whose program is not the one expected is an error, never replaced.
//! The filter holds its program: when the interface goes, it goes, and
//! the kernel frees the program and its maps.

use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

use anyhow::{bail, Context, Result};

use super::Direction;

/// Our filter's handle ("sf") and priority.
pub const HANDLE: u32 = 0x5f;
pub const PRIORITY: u32 = 0xc05f;

fn hook(ifindex: u32, d: Direction) -> libbpf_sys::bpf_tc_hook {
    libbpf_sys::bpf_tc_hook {
        sz: size_of::<libbpf_sys::bpf_tc_hook>() as _,
        ifindex: ifindex as i32,
        attach_point: match d {
            Direction::Ingress => libbpf_sys::BPF_TC_INGRESS,
            Direction::Egress => libbpf_sys::BPF_TC_EGRESS,
        },
        ..Default::default()
    }
}

fn opts(prog: Option<BorrowedFd<'_>>, flags: u32) -> libbpf_sys::bpf_tc_opts {
    libbpf_sys::bpf_tc_opts {
        sz: size_of::<libbpf_sys::bpf_tc_opts>() as _,
        prog_fd: prog.map_or(0, |p| p.as_raw_fd()),
        flags,
        handle: HANDLE,
        priority: PRIORITY,
        ..Default::default()
    }
}

/// The id of the program in our filter slot, if any.
pub fn query(ifindex: u32, d: Direction) -> Option<u32> {
    let h = hook(ifindex, d);
    let mut o = opts(None, 0);
    // SAFETY: hook and opts are valid and sized; no buffers.
    let rc = unsafe { libbpf_sys::bpf_tc_query(&h, &mut o) };
    (rc == 0).then_some(o.prog_id)
}

/// Puts `prog` in our slot.  `expect` is the id of the program the slot
/// is to hold now, which is swapped out in one step; None: the slot must
/// be empty.  Anything else there is refused.
pub fn attach(prog: BorrowedFd<'_>, ifindex: u32, d: Direction, expect: Option<u32>) -> Result<()> {
    let mut h = hook(ifindex, d);
    // SAFETY: hook is valid and sized.
    let rc = unsafe { libbpf_sys::bpf_tc_hook_create(&mut h) };
    if rc != 0 && rc != -libc::EEXIST {
        return Err(std::io::Error::from_raw_os_error(-rc)).context("creating the clsact qdisc");
    }
    let now = query(ifindex, d);
    if now != expect {
        match now {
            Some(id) => bail!(
                "a tc {d} filter at handle {HANDLE:#x} priority {PRIORITY:#x} on ifindex {ifindex} holds program {id}, \
                 which is not sfunnel's: remove it (`tc filter del dev DEV {d} handle {HANDLE:#x} prio {PRIORITY:#x} \
                 bpf`) and run again"
            ),
            None => bail!("sfunnel's tc {d} filter on ifindex {ifindex} went away during the load: run it again"),
        }
    }
    let mut o = opts(Some(prog), if expect.is_some() { libbpf_sys::BPF_TC_F_REPLACE } else { 0 });
    // SAFETY: hook and opts are valid and sized; prog is a valid fd.
    let rc = unsafe { libbpf_sys::bpf_tc_attach(&h, &mut o) };
    if rc == -libc::EEXIST {
        // A filter no query shows a program for (classic BPF, say).
        bail!(
            "a tc {d} filter at handle {HANDLE:#x} priority {PRIORITY:#x} on ifindex {ifindex} is not sfunnel's: \
             remove it (`tc filter del dev DEV {d} handle {HANDLE:#x} prio {PRIORITY:#x} bpf`) and run again"
        );
    }
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(-rc)).context("attaching the cls_bpf filter");
    }
    Ok(())
}

/// Removes our filter (not there: nothing to do).  The qdisc stays: other
/// tools may use it.
pub fn detach(ifindex: u32, d: Direction) -> Result<()> {
    let h = hook(ifindex, d);
    let o = opts(None, 0);
    // SAFETY: hook and opts are valid and sized.
    let rc = unsafe { libbpf_sys::bpf_tc_detach(&h, &o) };
    if rc != 0 && rc != -libc::ENOENT && rc != -libc::EINVAL && rc != -libc::ENODEV {
        return Err(std::io::Error::from_raw_os_error(-rc)).context("removing the cls_bpf filter");
    }
    Ok(())
}
