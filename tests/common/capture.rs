//! Packet capture for the end-to-end tests: an AF_PACKET raw socket bound
//! to one interface inside a namespace, read on its own thread for as long
//! as the capture runs.  Each frame comes with its direction and with the
//! kernel's "checksum not ready" flag (PACKET_AUXDATA): a frame that is
//! still CHECKSUM_PARTIAL carries only a pseudo-header seed in the checksum
//! field the device is to complete.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use super::packet::{be16, Csum, Ip, Proto, ETH_HLEN, ETH_P_IP};
use super::topology::enter_ns;

const SOL_PACKET: libc::c_int = 263;
const PACKET_AUXDATA: libc::c_int = 8;
const PACKET_STATISTICS: libc::c_int = 6;
const PACKET_OUTGOING: u8 = 4;
const ETH_P_ALL: u16 = 0x0003;
const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;

/// linux/if_packet.h `struct tpacket_auxdata`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct TpacketAuxdata {
    tp_status: u32,
    tp_len: u32,
    tp_snaplen: u32,
    tp_mac: u16,
    tp_net: u16,
    tp_vlan_tci: u16,
    tp_vlan_tpid: u16,
}

/// linux/if_packet.h `struct tpacket_stats`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct TpacketStats {
    tp_packets: u32,
    tp_drops: u32,
}

#[derive(Clone, Debug)]
pub struct Frame {
    pub data: Vec<u8>,
    /// Sent by this interface (PACKET_OUTGOING), else received.
    pub outgoing: bool,
    /// TP_STATUS_CSUMNOTREADY: the skb was CHECKSUM_PARTIAL.
    pub csum_not_ready: bool,
    /// Longer than the buffer (never expected).
    pub truncated: bool,
}

/// The TCP/UDP view of an IPv4 frame: (protocol, sport, dport).
pub fn l4_of(f: &[u8]) -> Option<(Proto, u16, u16)> {
    if f.len() < ETH_HLEN + 20 || be16(f, 12) != ETH_P_IP || f[ETH_HLEN] >> 4 != 4 {
        return None;
    }
    let hlen = usize::from(f[ETH_HLEN] & 0xF) * 4;
    let proto = Proto::from_number(f[ETH_HLEN + 9])?;
    let l4 = ETH_HLEN + hlen;
    if f.len() < l4 + 4 {
        return None;
    }
    Some((proto, be16(f, l4), be16(f, l4 + 2)))
}

/// Does what the device (or skb_checksum_help) does for a CHECKSUM_PARTIAL
/// funneled frame: the pending checksum is the inner L4 one (csum_start
/// stays at the original transport header when the funnel header is
/// inserted in front of it), whose field holds the seed; it becomes the
/// folded complement of the sum from there to the end, 0 sent as 0xffff.
pub fn complete_inner_csum(frame: &[u8], inner: Proto) -> Vec<u8> {
    let ip = Ip::of(frame);
    let outer = Proto::from_number(ip.proto).expect("outer TCP/UDP");
    let hl = super::packet::l4_header_len(outer, &frame[ip.l4_off()..]);
    let start = ip.l4_off() + hl;
    let mut f = frame.to_vec();
    let c = Csum::new().add(&f[start..ip.end()]).checksum();
    let c = if c == 0 { 0xFFFF } else { c };
    super::packet::put16(&mut f, start + inner.csum_offset(), c);
    f
}

pub struct CaptureResult {
    pub frames: Vec<Frame>,
    /// Frames the kernel dropped because our socket's queue was full.
    pub drops: u32,
}

/// A running capture; `stop` returns what it saw.
pub struct Capture {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<CaptureResult>>,
}

fn setopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, v: &T) -> std::io::Result<()> {
    // SAFETY: v points at a live value of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The socket's PACKET_STATISTICS since the last read (reading resets them).
fn packet_stats(fd: &OwnedFd) -> TpacketStats {
    let mut st = TpacketStats::default();
    let mut len = std::mem::size_of::<TpacketStats>() as libc::socklen_t;
    // SAFETY: st is a writable tpacket_stats of `len` bytes.
    unsafe {
        libc::getsockopt(fd.as_raw_fd(), SOL_PACKET, PACKET_STATISTICS, (&mut st as *mut TpacketStats).cast(), &mut len)
    };
    st
}

fn open(iface: &str) -> std::io::Result<OwnedFd> {
    // Protocol 0 at socket(): nothing is received until bind() names the
    // interface, so no frame of another interface gets in.
    // SAFETY: plain socket(2).
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    setopt(&fd, SOL_PACKET, PACKET_AUXDATA, &1i32)?;
    setopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &(64i32 << 20))?;
    let tv = libc::timeval { tv_sec: 0, tv_usec: 20_000 };
    setopt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
    let ifindex = sfunnel::netlink::index_of(iface).ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENODEV))?;
    // SAFETY: an all-zero sockaddr_ll is valid; fields set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ALL.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a valid sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// One recvmsg: Ok(None) on timeout/EAGAIN.
fn recv(fd: &OwnedFd, buf: &mut [u8], flags: libc::c_int) -> std::io::Result<Option<Frame>> {
    // SAFETY: zeroed C structs are valid; the pointers set below live for
    // the duration of the call.
    unsafe {
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        let mut cbuf = [0u64; 16];
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut addr as *mut libc::sockaddr_ll).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        let n = libc::recvmsg(fd.as_raw_fd(), &mut msg, flags | libc::MSG_TRUNC);
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
        let n = n as usize;
        let mut aux = TpacketAuxdata::default();
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_PACKET && (*c).cmsg_type == PACKET_AUXDATA {
                aux = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<TpacketAuxdata>());
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        Ok(Some(Frame {
            data: buf[..n.min(buf.len())].to_vec(),
            outgoing: addr.sll_pkttype == PACKET_OUTGOING,
            csum_not_ready: aux.tp_status & TP_STATUS_CSUMNOTREADY != 0,
            truncated: n > buf.len(),
        }))
    }
}

impl Capture {
    /// Starts capturing every frame on `iface` in namespace `ns`; returns
    /// once the socket is bound, so nothing sent afterwards is missed.
    pub fn start(ns: &str, iface: &str) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (ns, iface) = (ns.to_string(), iface.to_string());
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            enter_ns(&ns);
            let fd = match open(&iface) {
                Ok(fd) => fd,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("AF_PACKET socket on {iface} in {ns}: {e}")));
                    return CaptureResult { frames: Vec::new(), drops: 0 };
                }
            };
            // Reading PACKET_STATISTICS resets it: start from zero.
            packet_stats(&fd);
            let _ = ready_tx.send(Ok(()));
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let stopping = stop2.load(Ordering::SeqCst);
                let flags = if stopping { libc::MSG_DONTWAIT } else { 0 };
                match recv(&fd, &mut buf, flags) {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) if stopping => break,
                    Ok(None) => {}
                    Err(e) => panic!("capture recvmsg: {e}"),
                }
            }
            CaptureResult { frames, drops: packet_stats(&fd).tp_drops }
        });
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{e}"),
            Err(e) => panic!("capture thread did not start: {e}"),
        }
        Capture { stop, handle: Some(handle) }
    }

    /// Stops (after a short settling time for frames in flight) and returns
    /// every frame seen.
    pub fn stop(mut self) -> CaptureResult {
        std::thread::sleep(Duration::from_millis(30));
        self.stop.store(true, Ordering::SeqCst);
        let h = self.handle.take().expect("running");
        h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
