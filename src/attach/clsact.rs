//! clsact qdisc + direct-action cls_bpf filter, for kernels without TCX.
//!
//! sfunnel owns one filter per hook, at a fixed handle and priority, and
//! touches nothing else: an existing clsact qdisc is reused and never
//! deleted (other tools share it), and a filter at our handle and priority
//! that is not ours is an error, never replaced.

use std::os::fd::BorrowedFd;

use anyhow::{bail, Context, Result};
use libbpf_rs::{TcHook, TcHookBuilder, TC_EGRESS, TC_INGRESS};

use super::Direction;

/// Our filter's handle ("sf") and priority.
pub const HANDLE: u32 = 0x5f;
pub const PRIORITY: u32 = 0xc05f;

fn hook(fd: BorrowedFd<'_>, ifindex: u32, d: Direction) -> TcHook {
    let mut b = TcHookBuilder::new(fd);
    b.ifindex(ifindex as i32).replace(true).handle(HANDLE).priority(PRIORITY);
    b.hook(match d {
        Direction::Ingress => TC_INGRESS,
        Direction::Egress => TC_EGRESS,
    })
}

/// The id of the program in our filter slot, if any.
pub fn query(fd: BorrowedFd<'_>, ifindex: u32, d: Direction) -> Option<u32> {
    hook(fd, ifindex, d).query().ok()
}

/// Attaches `fd` in our slot.  `ours` is the id of a program we attached
/// before, which may be replaced; anything else in the slot is refused.
pub fn attach(fd: BorrowedFd<'_>, ifindex: u32, d: Direction, ours: Option<u32>) -> Result<()> {
    let mut h = hook(fd, ifindex, d);
    // Creates the qdisc, or finds it there already (EEXIST is fine).
    if let Err(e) = h.create() {
        if e.kind() != libbpf_rs::ErrorKind::AlreadyExists {
            return Err(e).context("creating the clsact qdisc");
        }
    }
    if let Ok(id) = h.query() {
        if Some(id) != ours {
            bail!(
                "a tc {d} filter at handle {HANDLE:#x} priority {PRIORITY:#x} on ifindex {ifindex} holds program {id}, \
                 which is not sfunnel's: remove it (`tc filter del dev DEV {d} handle {HANDLE:#x} prio {PRIORITY:#x} bpf`) \
                 and run again"
            );
        }
    }
    h.attach().context("attaching the cls_bpf filter")?;
    Ok(())
}

/// Removes our filter.  The qdisc stays: other tools may use it.
pub fn detach(fd: BorrowedFd<'_>, ifindex: u32, d: Direction) -> Result<()> {
    let mut h = hook(fd, ifindex, d);
    match h.detach() {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).context("removing the cls_bpf filter"),
    }
}
