//! Real network namespaces for the end-to-end tests (tests/e2e.rs).
//!
//! ```text
//!   <tag>-c (client)            <tag>-r (router, forwards)              <tag>-s (server)
//!   10.201.1.2 ── veth ── 10.201.1.1   10.201.3.1 ── veth ── 10.201.3.2
//!    if `c`              if `rc`  service 10.201.2.1/32 on lo   if `rs`        if `s`
//! ```
//! With `ipv6`, every interface also gets an IPv6 address in the same place
//! (fd00:201:<subnet>::<host>/64, service fd00:201:2::1/128), the router
//! forwards IPv6, and with `nat` ip6tables does what iptables does.
//! [`Topo::add_second_client`] adds a second client, `<tag>-d`, at
//! 10.201.4.2 behind the router's `rd` interface (10.201.4.1), set up like
//! the first; with `nat` the router masquerades both towards the server.
//!
//! Every name is unique per test: namespaces are `sfe2e<pid>-<n>-{c,r,s}`,
//! interfaces `sf<pid hex>g<n hex>{c,rc,rs,s}` (≤ 15 characters; they only
//! ever exist inside the test's own namespaces).  Dropping a [`Topo`] runs
//! the binary's CLEAN=1 on every namespace, removes whatever pin directory
//! of those namespaces is left, and deletes the namespaces (and with them
//! the veths), also when the test panics.
//!
//! Addresses are private and only ever used inside these namespaces; the
//! host's own namespace is never given an address or a route.

use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_sfunnel");
pub const NETNS_DIR: &str = "/var/run/netns";
pub const PIN_ROOT: &str = "/sys/fs/bpf/sfunnel";

pub const CLIENT_IP: [u8; 4] = [10, 201, 1, 2];
pub const ROUTER_C_IP: [u8; 4] = [10, 201, 1, 1];
pub const ROUTER_S_IP: [u8; 4] = [10, 201, 3, 1];
pub const SERVER_IP: [u8; 4] = [10, 201, 3, 2];
pub const CLIENT2_IP: [u8; 4] = [10, 201, 4, 2];
pub const ROUTER_D_IP: [u8; 4] = [10, 201, 4, 1];
/// The "Kubernetes Service" address the router owns and DNATs.
pub const SERVICE_IP: [u8; 4] = [10, 201, 2, 1];
pub const CLIENT_IP6: &str = "fd00:201:1::2";
pub const ROUTER_C_IP6: &str = "fd00:201:1::1";
pub const ROUTER_S_IP6: &str = "fd00:201:3::1";
pub const SERVER_IP6: &str = "fd00:201:3::2";
pub const SERVICE_IP6: &str = "fd00:201:2::1";

pub fn ip_str(a: [u8; 4]) -> String {
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Unique name stems for one test: (namespace stem, interface stem).
pub fn unique_stems() -> (String, String) {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let pid = std::process::id();
    (format!("sfe2e{pid}-{n}"), format!("sf{pid:x}g{n:x}"))
}

// ---------------------------------------------------------------------------
// Running commands, with timeouts
// ---------------------------------------------------------------------------

/// What a finished child printed and how it ended.
#[derive(Debug, Clone)]
pub struct Out {
    pub cmd: String,
    /// Exit code; -1 when killed by a signal (or our timeout).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.code == 0
    }

    /// Panics with everything the command printed unless it succeeded.
    pub fn expect_ok(self) -> Out {
        assert!(
            self.ok(),
            "`{}` failed with {}:\nstdout: {}\nstderr: {}",
            self.cmd,
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// A spawned child whose output is collected on threads (so that a full
/// pipe can never block it), reaped with a deadline.
pub struct Running {
    cmd: String,
    child: std::process::Child,
    readers: Vec<std::thread::JoinHandle<String>>,
}

pub fn spawn(cmd: &mut Command) -> Running {
    let desc = format!("{cmd:?}");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {desc}: {e}"));
    let mut readers = Vec::new();
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    for mut r in [Box::new(out) as Box<dyn std::io::Read + Send>, Box::new(err)] {
        readers.push(std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        }));
    }
    Running { cmd: desc, child, readers }
}

impl Running {
    /// Waits at most `timeout`; kills the child and panics past it.
    pub fn wait(mut self, timeout: Duration) -> Out {
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!("`{}` did not finish within {timeout:?}", self.cmd);
                }
                Err(e) => panic!("waiting for `{}`: {e}", self.cmd),
            }
        };
        let mut texts = self.readers.drain(..).map(|h| h.join().unwrap_or_default());
        let stdout = texts.next().unwrap_or_default();
        let stderr = texts.next().unwrap_or_default();
        Out { cmd: self.cmd, code: status.code().unwrap_or(-1), stdout, stderr }
    }
}

/// Runs a command with a timeout and returns what it did.
pub fn run(cmd: &mut Command, timeout: Duration) -> Out {
    spawn(cmd).wait(timeout)
}

/// Runs `args` (program first) and panics unless it succeeds.
pub fn sh(args: &[&str]) -> Out {
    run(Command::new(args[0]).args(&args[1..]), Duration::from_secs(20)).expect_ok()
}

/// `nsenter --net=/var/run/netns/NS args...`: only the network namespace
/// is entered, so /sys (and /sys/fs/bpf) stays the host's.
pub fn ns_cmd(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={NETNS_DIR}/{ns}")).args(args);
    c
}

/// Runs `args` inside `ns` and panics unless it succeeds.
pub fn nsh(ns: &str, args: &[&str]) -> Out {
    run(&mut ns_cmd(ns, args), Duration::from_secs(20)).expect_ok()
}

/// The sfunnel binary with a clean container environment plus `env`.
/// The index of `iface` in the namespace `ns` (asked of `ip`: /sys shows
/// the test's own namespace).
pub fn ifindex(ns: &str, iface: &str) -> u32 {
    let out = nsh(ns, &["ip", "-o", "link", "show", iface]).stdout;
    out.split(':').next().and_then(|i| i.trim().parse().ok()).unwrap_or_else(|| panic!("no index in {out:?}"))
}

/// The socket address `a:port`.
pub fn sa(a: [u8; 4], port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::from(a), port))
}

/// `n` bytes of test data that differ with `seed` and along the buffer.
pub fn pattern(seed: usize, n: usize) -> Vec<u8> {
    (0..n).map(|i| (seed.wrapping_mul(131) ^ i.wrapping_mul(7) ^ (i >> 8).wrapping_mul(29)) as u8).collect()
}

/// Echoes every read on `s` back at once, until EOF; returns what was
/// read.  The server side of the TCP exchanges.
pub fn echo_until_eof(s: &mut std::net::TcpStream) -> Result<Vec<u8>, String> {
    use std::io::Write as _;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                s.write_all(&buf[..n]).map_err(|e| format!("server write: {e}"))?;
            }
            Err(e) => return Err(format!("server read after {} bytes: {e}", got.len())),
        }
    }
}

/// Whether the interface `name` exists in the namespace `ns`.
pub fn link_exists(ns: &str, name: &str) -> bool {
    run(&mut ns_cmd(ns, &["ip", "link", "show", name]), Duration::from_secs(10)).ok()
}

/// The helper pair sfunnel makes for the attachment on the interface with
/// index `ifindex` in `direction` (src/detour.rs): (the end GSO packets go
/// out of, the end segments come in on).  Spelled here from docs/design.md,
/// not taken from the code.
pub fn helper_pair(ifindex: u32, direction: &str) -> (String, String) {
    let d = &direction[..1];
    (format!("sf{d}g{ifindex}"), format!("sf{d}s{ifindex}"))
}

pub fn sfunnel_cmd(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args);
    // The container interface's variables: the test's own environment
    // must not leak in.
    for k in sfunnel::cli::ENV_VARS {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// Runs the binary (verb and flags in `args`, possibly none) with `env`.
pub fn sfunnel(args: &[&str], env: &[(&str, &str)]) -> Out {
    run(&mut sfunnel_cmd(args, env), Duration::from_secs(60))
}

/// The container interface: no verb, everything from the environment
/// (SFUNNEL_RULESET, IFACES, DIRECTION, NETNS), as the original image.
pub fn env_load(ns: &str, ifaces: &str, direction: &str, rules: &str) -> Out {
    sfunnel(&[], &[("SFUNNEL_RULESET", rules), ("IFACES", ifaces), ("DIRECTION", direction), ("NETNS", ns)])
}

/// The container interface with CLEAN=1.
pub fn env_unload(ns: &str, ifaces: &str, direction: &str) -> Out {
    sfunnel(&[], &[("CLEAN", "1"), ("IFACES", ifaces), ("DIRECTION", direction), ("NETNS", ns)])
}

/// The program id a `load` printed for `iface direction` ("…, program N, …").
pub fn printed_prog_id(out: &str, iface: &str, direction: &str) -> Option<u32> {
    let line = out.lines().find(|l| l.starts_with(&format!("{iface} {direction}:")))?;
    let rest = &line[line.find("program ")? + "program ".len()..];
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// `sfunnel status --json`'s list of attachments (its document is schema 1).
pub fn status_json() -> Value {
    let out = sfunnel(&["status", "--json"], &[]).expect_ok();
    let doc: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", out.stdout));
    assert_eq!(doc["schema"], 1, "status --json's schema: {doc}");
    doc["attachments"].clone()
}

/// The status entry of one attachment, if any.
pub fn attachment(ino: u64, iface: &str, direction: &str) -> Option<Value> {
    status_json()
        .as_array()?
        .iter()
        .find(|a| a["netns_ino"].as_u64() == Some(ino) && a["iface"] == iface && a["direction"] == direction)
        .cloned()
}

/// Per-rule packet counters of an attachment.
pub fn rule_packets(a: &Value) -> Vec<u64> {
    a["rules"].as_array().map(|r| r.iter().map(|c| c["packets"].as_u64().unwrap_or(0)).collect()).unwrap_or_default()
}

/// The cookie of the namespace `ns` (what keys its pins), read from a
/// thread inside it.
pub fn netns_cookie(ns: &str) -> u64 {
    in_ns(ns, || sfunnel::netns::current_cookie().expect("the namespace's cookie"))
}

/// Whether this kernel has TCX (6.6+), asked of the kernel.
pub fn kernel_has_tcx() -> bool {
    sfunnel::attach::tcx::supported(1)
}

/// Writes `abi` as the layout number of the attachment on `iface`
/// `direction` in `ns`, as if an earlier (or later) build had made it:
/// its next load must replace it.
pub fn set_layout(ns: &str, iface: &str, direction: &str, abi: u32) {
    use std::os::fd::AsFd as _;
    let path = format!("{NETNS_DIR}/{ns}");
    let a = status_json()
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["netns"] == path.as_str() && a["iface"] == iface && a["direction"] == direction)
        .cloned()
        .unwrap_or_else(|| panic!("no attachment {ns} {iface} {direction} in status"));
    let id = a["prog_id"].as_u64().expect("a program id") as u32;
    let prog = sfunnel::objects::prog_by_id(id).expect("the program");
    let maps = sfunnel::datapath::RulesetMaps::from_prog(prog.as_fd()).expect("its maps");
    let mut meta = maps.read_meta().expect("its meta");
    meta.abi_version = abi;
    maps.write_meta(&meta).expect("writing its meta");
}

// ---------------------------------------------------------------------------
// Threads inside a namespace
// ---------------------------------------------------------------------------

/// Moves the calling thread into the named network namespace.
pub fn enter_ns(ns: &str) {
    let path = format!("{NETNS_DIR}/{ns}");
    sfunnel::netns::enter(&path).unwrap_or_else(|e| panic!("setns {path}: {e:#}"));
}

/// Runs `f` on a new thread inside `ns` and returns its result.  Sockets
/// made there stay in `ns` and may be used from any thread afterwards.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_ns(ns, f).join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Starts `f` on a new thread inside `ns`.
pub fn spawn_in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter_ns(&ns);
        f()
    })
}

/// Program ids on an interface's TCX hook (egress or ingress), asked of
/// the kernel directly (BPF_PROG_QUERY), not of sfunnel.
pub fn tcx_prog_ids(ns: &str, iface: &str, egress: bool) -> Vec<u32> {
    let iface = iface.to_string();
    in_ns(ns, move || {
        let ifindex = sfunnel::netlink::index_of(&iface).expect("interface index");
        let mut ids = [0u32; 64];
        let mut opts = libbpf_sys::bpf_prog_query_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_prog_query_opts>() as _,
            prog_ids: ids.as_mut_ptr(),
            ..Default::default()
        };
        opts.__bindgen_anon_1.count = ids.len() as u32;
        let ty = if egress { libbpf_sys::BPF_TCX_EGRESS } else { libbpf_sys::BPF_TCX_INGRESS };
        // SAFETY: prog_ids points at `count` writable u32s that outlive the call.
        let rc = unsafe { libbpf_sys::bpf_prog_query_opts(ifindex as i32, ty, &mut opts) };
        if rc == -libc::EINVAL {
            // A kernel without TCX (before 6.6): nothing can be there.
            return Vec::new();
        }
        assert_eq!(rc, 0, "BPF_PROG_QUERY on {iface}");
        // SAFETY: the kernel wrote the number of ids back into `count`.
        let n = unsafe { opts.__bindgen_anon_1.count } as usize;
        ids[..n.min(64)].to_vec()
    })
}

/// Ids of the BPF programs in the interface's tc (clsact) filters for one
/// direction, from `tc filter show`.
pub fn clsact_prog_ids(ns: &str, iface: &str, egress: bool) -> Vec<u32> {
    let dir = if egress { "egress" } else { "ingress" };
    let out = run(
        Command::new("nsenter").args([
            &format!("--net=/var/run/netns/{ns}"),
            "tc",
            "filter",
            "show",
            "dev",
            iface,
            dir,
        ]),
        Duration::from_secs(10),
    );
    out.stdout
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.by_ref().find(|w| *w == "id")?;
            words.next()?.parse().ok()
        })
        .collect()
}

/// Every program on the hook, TCX links and clsact filters alike: what
/// "exactly one sfunnel program on the hook" is checked against, whichever
/// attach path the kernel gave.
pub fn hook_prog_ids(ns: &str, iface: &str, egress: bool) -> Vec<u32> {
    let mut ids = tcx_prog_ids(ns, iface, egress);
    ids.extend(clsact_prog_ids(ns, iface, egress));
    ids
}

/// The name of a loaded BPF program, from bpftool; None if it is gone.
pub fn prog_name(id: u32) -> Option<String> {
    let out = run(Command::new("bpftool").args(["-j", "prog", "show", "id", &id.to_string()]), Duration::from_secs(10));
    if !out.ok() {
        return None;
    }
    let v: Value = serde_json::from_str(&out.stdout).ok()?;
    v["name"].as_str().map(str::to_string)
}

/// Selected counters of `nstat -azs` (absolute, zeros too, no history
/// update) run inside `ns`.
pub fn nstat(ns: &str, names: &[&str]) -> Vec<(String, u64)> {
    let out = nsh(ns, &["nstat", "-azs"]);
    names
        .iter()
        .map(|n| {
            let v = out
                .stdout
                .lines()
                .find_map(|l| {
                    let mut w = l.split_whitespace();
                    (w.next() == Some(n)).then(|| w.next().and_then(|x| x.parse().ok()).unwrap_or(0))
                })
                .unwrap_or(0);
            (n.to_string(), v)
        })
        .collect()
}

/// The router's conntrack statistics summed over CPUs (per namespace).
pub fn conntrack_stat(ns: &str, field: &str) -> Option<u64> {
    let text = in_ns(ns, || std::fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack").ok())?;
    let mut lines = text.lines();
    let col = lines.next()?.split_whitespace().position(|h| h == field)?;
    Some(lines.filter_map(|l| l.split_whitespace().nth(col).and_then(|x| u64::from_str_radix(x, 16).ok())).sum())
}

// ---------------------------------------------------------------------------
// The topology
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, Default)]
pub struct TopoOpts {
    /// The router DNATs SERVICE_IP (TCP/80, UDP/81) to the server and
    /// masquerades towards the server.
    pub nat: bool,
    /// `ethtool -K tx off tso off gso off` on the client's and the server's
    /// veth (the funneling ends).
    pub endpoints_offloads_off: bool,
    /// The same on both router veths (its egress towards either side), so
    /// that every forwarded checksum is completed before the receiver
    /// verifies it.
    pub router_offloads_off: bool,
    /// IPv6 addresses and routes beside the IPv4 ones (and ip6tables NAT
    /// with `nat`).
    pub ipv6: bool,
}

/// Three namespaces, two veth pairs; dropping it removes everything.
pub struct Topo {
    pub client: String,
    pub router: String,
    pub server: String,
    /// Client's interface (towards the router).
    pub c_if: String,
    /// Router's client-facing interface.
    pub rc_if: String,
    /// Router's server-facing interface.
    pub rs_if: String,
    /// Server's interface.
    pub s_if: String,
    /// The second client and its interface, and the router's interface
    /// towards it: empty until [`Topo::add_second_client`].
    pub client2: String,
    pub d_if: String,
    pub rd_if: String,
    /// Stem of the interface names.
    if_stem: String,
    pub opts: TopoOpts,
    /// Namespaces created so far: (name, inode, cookie).
    created: Vec<(String, u64, u64)>,
}

impl Topo {
    pub fn new(opts: TopoOpts) -> Topo {
        let (ns, ifp) = unique_stems();
        let mut t = Topo {
            client: format!("{ns}-c"),
            router: format!("{ns}-r"),
            server: format!("{ns}-s"),
            c_if: format!("{ifp}c"),
            rc_if: format!("{ifp}rc"),
            rs_if: format!("{ifp}rs"),
            s_if: format!("{ifp}s"),
            client2: String::new(),
            d_if: String::new(),
            rd_if: String::new(),
            if_stem: ifp.clone(),
            opts,
            created: Vec::new(),
        };
        for i in [&t.c_if, &t.rc_if, &t.rs_if, &t.s_if] {
            assert!(i.len() <= 15, "interface name {i} too long");
        }
        for n in [t.client.clone(), t.router.clone(), t.server.clone()] {
            t.add_ns(&n);
        }
        t.build();
        t
    }

    /// Only one namespace, `<tag>-x`, with a veth pair inside it (`<if>a`
    /// up with 10.201.9.1/24, `<if>b` in the same namespace).  For tests that
    /// need a target but no traffic.
    pub fn single() -> (Topo, String) {
        let (ns, ifp) = unique_stems();
        let mut t = Topo {
            client: format!("{ns}-x"),
            router: String::new(),
            server: String::new(),
            c_if: format!("{ifp}a"),
            rc_if: format!("{ifp}b"),
            rs_if: String::new(),
            s_if: String::new(),
            client2: String::new(),
            d_if: String::new(),
            rd_if: String::new(),
            if_stem: ifp.clone(),
            opts: TopoOpts::default(),
            created: Vec::new(),
        };
        let n = t.client.clone();
        t.add_ns(&n);
        sh(&["ip", "-n", &n, "link", "add", &t.c_if, "type", "veth", "peer", "name", &t.rc_if]);
        sh(&["ip", "-n", &n, "addr", "add", "10.201.9.1/24", "dev", &t.c_if]);
        sh(&["ip", "-n", &n, "link", "set", &t.c_if, "up"]);
        sh(&["ip", "-n", &n, "link", "set", &t.rc_if, "up"]);
        let ifc = t.c_if.clone();
        (t, ifc)
    }

    fn add_ns(&mut self, name: &str) {
        sh(&["ip", "netns", "add", name]);
        let ino = std::fs::metadata(format!("{NETNS_DIR}/{name}")).expect("netns file").ino();
        self.created.push((name.to_string(), ino, netns_cookie(name)));
        sh(&["ip", "-n", name, "link", "set", "lo", "up"]);
    }

    /// The inode of one of our namespaces (`status --json`'s netns_ino).
    pub fn ino(&self, ns: &str) -> u64 {
        self.created.iter().find(|(n, ..)| n == ns).map(|(_, i, _)| *i).expect("one of our namespaces")
    }

    /// The cookie of one of our namespaces (what keys its pins).
    pub fn cookie(&self, ns: &str) -> u64 {
        self.created.iter().find(|(n, ..)| n == ns).map(|(.., c)| *c).expect("one of our namespaces")
    }

    /// The directory of a namespace's pins (TCX links only).
    pub fn pin_dir(&self, ns: &str) -> PathBuf {
        PathBuf::from(PIN_ROOT).join("tcx").join(self.cookie(ns).to_string())
    }

    fn build(&self) {
        let (c, r, s) = (&self.client, &self.router, &self.server);
        sh(&["ip", "-n", c, "link", "add", &self.c_if, "type", "veth", "peer", "name", &self.rc_if, "netns", r]);
        sh(&["ip", "-n", r, "link", "add", &self.rs_if, "type", "veth", "peer", "name", &self.s_if, "netns", s]);
        let addr = |ns: &str, a: [u8; 4], len: u8, dev: &str| {
            sh(&["ip", "-n", ns, "addr", "add", &format!("{}/{len}", ip_str(a)), "dev", dev]);
        };
        addr(c, CLIENT_IP, 24, &self.c_if);
        addr(r, ROUTER_C_IP, 24, &self.rc_if);
        addr(r, ROUTER_S_IP, 24, &self.rs_if);
        addr(r, SERVICE_IP, 32, "lo");
        addr(s, SERVER_IP, 24, &self.s_if);
        // Headroom for a 20-byte funnel header on the two funneling ends
        // (NOTES §4 MTU): the router keeps 1500.
        sh(&["ip", "-n", c, "link", "set", &self.c_if, "mtu", "1480", "up"]);
        sh(&["ip", "-n", s, "link", "set", &self.s_if, "mtu", "1480", "up"]);
        sh(&["ip", "-n", r, "link", "set", &self.rc_if, "up"]);
        sh(&["ip", "-n", r, "link", "set", &self.rs_if, "up"]);
        sh(&["ip", "-n", c, "route", "add", "default", "via", &ip_str(ROUTER_C_IP)]);
        sh(&["ip", "-n", s, "route", "add", "default", "via", &ip_str(ROUTER_S_IP)]);
        nsh(r, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        // TCP funneling needs non-GSO segments (NOTES §4): no autocorking
        // at the two TCP ends (the tests also write small chunks with
        // TCP_NODELAY and wait for each echo).
        for ns in [c, s] {
            nsh(ns, &["sysctl", "-qw", "net.ipv4.tcp_autocorking=0"]);
        }
        if self.opts.endpoints_offloads_off {
            nsh(c, &["ethtool", "-K", &self.c_if, "tx", "off", "tso", "off", "gso", "off"]);
            nsh(s, &["ethtool", "-K", &self.s_if, "tx", "off", "tso", "off", "gso", "off"]);
        }
        if self.opts.router_offloads_off {
            for i in [&self.rc_if, &self.rs_if] {
                nsh(r, &["ethtool", "-K", i, "tx", "off", "tso", "off", "gso", "off"]);
            }
        }
        if self.opts.ipv6 {
            self.build_ipv6();
        }
        if self.opts.nat {
            // Like a Kubernetes Service on port 80: DNAT matches what is on
            // the wire, i.e. the funnel header (TCP/80 or UDP/81).
            self.service_nat("iptables", &ip_str(SERVICE_IP), &ip_str(SERVER_IP));
        }
    }

    /// The router's NAT, as a Kubernetes Service's: DNAT of TCP/80 and
    /// UDP/81 to `svc` over to `srv`, MASQUERADE towards the server.
    /// `tables` is iptables or ip6tables.
    fn service_nat(&self, tables: &str, svc: &str, srv: &str) {
        for (proto, port) in [("tcp", "80"), ("udp", "81")] {
            let dnat =
                ["-A", "PREROUTING", "-d", svc, "-p", proto, "--dport", port, "-j", "DNAT", "--to-destination", srv];
            nsh(&self.router, &[&[tables, "-t", "nat"][..], &dnat].concat());
        }
        nsh(&self.router, &[tables, "-t", "nat", "-A", "POSTROUTING", "-o", &self.rs_if, "-j", "MASQUERADE"]);
    }

    /// The IPv6 half of [`Topo::build`]: addresses without duplicate
    /// address detection (usable at once), routes, forwarding, and NAT.
    fn build_ipv6(&self) {
        let (c, r, s) = (&self.client, &self.router, &self.server);
        let addr = |ns: &str, a: &str, len: u8, dev: &str| {
            sh(&["ip", "-n", ns, "-6", "addr", "add", &format!("{a}/{len}"), "dev", dev, "nodad"]);
        };
        addr(c, CLIENT_IP6, 64, &self.c_if);
        addr(r, ROUTER_C_IP6, 64, &self.rc_if);
        addr(r, ROUTER_S_IP6, 64, &self.rs_if);
        addr(r, SERVICE_IP6, 128, "lo");
        addr(s, SERVER_IP6, 64, &self.s_if);
        sh(&["ip", "-n", c, "-6", "route", "add", "default", "via", ROUTER_C_IP6]);
        sh(&["ip", "-n", s, "-6", "route", "add", "default", "via", ROUTER_S_IP6]);
        nsh(r, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        if self.opts.nat {
            self.service_nat("ip6tables", SERVICE_IP6, SERVER_IP6);
        }
    }

    /// Where the client sends over IPv6: the service address with NAT,
    /// else the server itself.
    pub fn dest6(&self) -> &'static str {
        if self.opts.nat {
            SERVICE_IP6
        } else {
            SERVER_IP6
        }
    }

    /// The IPv6 address the server sees the client's traffic come from.
    pub fn client_seen_by_server6(&self) -> &'static str {
        if self.opts.nat {
            ROUTER_S_IP6
        } else {
            CLIENT_IP6
        }
    }

    /// Adds the second client, `<tag>-d` (10.201.4.2), behind the router's
    /// `rd` interface, configured like the first client (MTU, autocorking,
    /// offloads as `opts` say).  With `nat`, the router's MASQUERADE
    /// towards the server covers it too: both clients reach the server from
    /// ROUTER_S_IP.
    pub fn add_second_client(&mut self) {
        let stem = self.client.strip_suffix("-c").expect("a three-namespace topology").to_string();
        self.client2 = format!("{stem}-d");
        self.d_if = format!("{}d", self.if_stem);
        self.rd_if = format!("{}rd", self.if_stem);
        let (d, r) = (self.client2.clone(), self.router.clone());
        self.add_ns(&d);
        sh(&["ip", "-n", &d, "link", "add", &self.d_if, "type", "veth", "peer", "name", &self.rd_if, "netns", &r]);
        sh(&["ip", "-n", &d, "addr", "add", &format!("{}/24", ip_str(CLIENT2_IP)), "dev", &self.d_if]);
        sh(&["ip", "-n", &r, "addr", "add", &format!("{}/24", ip_str(ROUTER_D_IP)), "dev", &self.rd_if]);
        sh(&["ip", "-n", &d, "link", "set", &self.d_if, "mtu", "1480", "up"]);
        sh(&["ip", "-n", &r, "link", "set", &self.rd_if, "up"]);
        sh(&["ip", "-n", &d, "route", "add", "default", "via", &ip_str(ROUTER_D_IP)]);
        nsh(&d, &["sysctl", "-qw", "net.ipv4.tcp_autocorking=0"]);
        if self.opts.endpoints_offloads_off {
            nsh(&d, &["ethtool", "-K", &self.d_if, "tx", "off", "tso", "off", "gso", "off"]);
        }
        if self.opts.router_offloads_off {
            nsh(&r, &["ethtool", "-K", &self.rd_if, "tx", "off", "tso", "off", "gso", "off"]);
        }
    }

    /// Where the client sends: the service address with NAT, else the
    /// server itself.
    pub fn dest(&self) -> [u8; 4] {
        if self.opts.nat {
            SERVICE_IP
        } else {
            SERVER_IP
        }
    }

    /// The address the server sees the client's traffic come from.
    pub fn client_seen_by_server(&self) -> [u8; 4] {
        if self.opts.nat {
            ROUTER_S_IP
        } else {
            CLIENT_IP
        }
    }

    /// Removes everything now and checks that nothing is left: no
    /// namespace of ours in `ip netns list`, no pin directory of ours.
    pub fn teardown(mut self) {
        let created = std::mem::take(&mut self.created);
        cleanup(&created);
        let list = sh(&["ip", "netns", "list"]).stdout;
        for (ns, _, cookie) in &created {
            assert!(!list.lines().any(|l| l.split_whitespace().next() == Some(ns)), "namespace {ns} still listed");
            let d = PathBuf::from(PIN_ROOT).join("tcx").join(cookie.to_string());
            assert!(!d.exists(), "{} still exists after cleanup", d.display());
        }
        eprintln!("cleanup: {} namespaces and their pins removed", created.len());
    }
}

/// Namespaces a test made itself, for topologies other than [`Topo`]'s:
/// dropping it (also when the test panics) unloads sfunnel from each and
/// deletes them, with everything in them.
#[derive(Default)]
pub struct Namespaces {
    created: Vec<(String, u64, u64)>,
}

impl Namespaces {
    /// Makes the namespace `name` with its loopback up.
    pub fn add(&mut self, name: &str) {
        sh(&["ip", "netns", "add", name]);
        let ino = std::fs::metadata(format!("{NETNS_DIR}/{name}")).expect("netns file").ino();
        self.created.push((name.to_string(), ino, netns_cookie(name)));
        sh(&["ip", "-n", name, "link", "set", "lo", "up"]);
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        cleanup(&std::mem::take(&mut self.created));
    }
}

/// CLEAN=1 per namespace (every interface, both directions), then the
/// removal of any pin of those namespaces left, then the namespaces.
/// Best effort: reports problems, never panics.
fn cleanup(created: &[(String, u64, u64)]) {
    for (ns, _, cookie) in created {
        let out = run(
            &mut sfunnel_cmd(&[], &[("CLEAN", "1"), ("DIRECTION", "both"), ("NETNS", ns)]),
            Duration::from_secs(30),
        );
        if !out.ok() {
            eprintln!("cleanup: CLEAN=1 NETNS={ns} failed ({}): {}", out.code, out.stderr.trim());
        }
        let d = PathBuf::from(PIN_ROOT).join("tcx").join(cookie.to_string());
        if d.exists() {
            eprintln!("cleanup: {} left after CLEAN=1; removing it", d.display());
            let _ = std::fs::remove_dir_all(&d);
        }
    }
    for (ns, ..) in created {
        let out = run(Command::new("ip").args(["netns", "del", ns]), Duration::from_secs(20));
        if !out.ok() {
            eprintln!("cleanup: ip netns del {ns}: {}", out.stderr.trim());
        }
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        let created = std::mem::take(&mut self.created);
        if !created.is_empty() {
            cleanup(&created);
        }
    }
}
