//! The BPF side seen from Rust: the skeleton, the constants of
//! bpf/sfunnel.h, and the ruleset maps with their atomic update.  Nothing
//! outside this module touches the skeleton.

use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType, OpenObject};

use crate::ruleset::Compiled;
use consts::RULESET_TEXT_CHUNK;

#[allow(clippy::all, non_camel_case_types, non_snake_case, dead_code, unused_imports)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/sfunnel.skel.rs"));
}

#[allow(clippy::all, non_camel_case_types, non_snake_case, dead_code, unused_imports)]
mod noop_skel {
    include!(concat!(env!("OUT_DIR"), "/noop.skel.rs"));
}

/// Constants shared with the datapath, generated from bpf/sfunnel.h.
#[allow(dead_code)]
pub mod consts {
    include!(concat!(env!("OUT_DIR"), "/sfunnel_consts.rs"));
}

pub use skel::types;
use skel::*;
use types::*;

/// Types of bpf/sfunnel.h that cross the boundary as raw bytes.  Their
/// sizes here must be their C sizes: no implicit padding on either side.
///
/// # Safety
/// Implement only for `#[repr(C)]` types with no padding bytes.
pub unsafe trait Pod: Copy + Default {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: Self is repr(C) without padding (the trait's contract), so
        // every byte is initialised.
        unsafe { std::slice::from_raw_parts((self as *const Self).cast::<u8>(), size_of::<Self>()) }
    }

    fn from_bytes(b: &[u8]) -> Self {
        let mut v = Self::default();
        let n = b.len().min(size_of::<Self>());
        // SAFETY: the copy stays within both buffers, and any byte pattern is
        // a valid value of these integer-only structs.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut Self).cast::<u8>(), n) };
        v
    }
}

macro_rules! pod {
    ($($t:ty = $size:expr),* $(,)?) => {$(
        const _: () = assert!(size_of::<$t>() == $size, "C and Rust disagree on a shared struct's size");
        // SAFETY: checked above to have the C size, whose layout sfunnel.h
        // spells out with explicit padding.
        unsafe impl Pod for $t {}
    )*};
}

pod! {
    sfunnel_params = 184,
    sfunnel_port_class = 24,
    sfunnel_addr_key = 24,
    sfunnel_addr_class = 16,
    sfunnel_rule_key = 16,
    sfunnel_rule_val = 12,
    sfunnel_counter = 32,
    sfunnel_meta = 64,
    sfunnel_detour = 16,
}

/// The datapath's program names, as the kernel (and `bpftool prog`) shows
/// them: the function names in bpf/sfunnel.bpf.c.
pub const PROG_NAME: &str = "sfunnel";
pub const DETOUR_PROG_NAME: &str = "sfunnel_detour";

/// The maps `RulesetMaps` holds, by the names the kernel gives them (the
/// variables of bpf/maps.h), in its field order.
pub const MAP_NAMES: [&str; 10] = [
    "sf_active",
    "sf_params",
    "sf_ports",
    "sf_addr_maps",
    "sf_rule_maps",
    "sf_counter_maps",
    "sf_text_maps",
    "sf_stats",
    "sf_meta",
    "sf_detour",
];

/// A loaded (not attached, not pinned) instance of the program and maps.
pub struct Loaded {
    skel: SfunnelSkel<'static>,
    /// Whether the detour's program was loaded too.
    detour: bool,
}

/// One PROG_TEST_RUN result.
#[derive(Debug, Clone)]
pub struct TestRun {
    /// The program's return value as a TC verdict (-1 = TC_ACT_UNSPEC).
    pub verdict: i32,
    pub data: Vec<u8>,
    /// The kernel's average time per repetition.
    pub duration: Duration,
}

impl Loaded {
    /// Opens and loads the embedded object's main program and maps.  This
    /// runs the verifier.
    pub fn load() -> Result<Loaded> {
        Self::load_for(None, false)
    }

    /// Like `load`, for a TCX hook when `tcx` names one (the kernel links a
    /// program only to the attach type it was loaded for), and with the
    /// segmentation detour's program when `detour` (verifying it costs
    /// about as much as the main program, so only loads that use it pay).
    pub fn load_for(tcx: Option<libbpf_rs::ProgramAttachType>, detour: bool) -> Result<Loaded> {
        // The skeleton borrows its object storage for as long as it lives;
        // one small allocation per loaded instance is kept for that.
        let storage: &'static mut MaybeUninit<OpenObject> = Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = SfunnelSkelBuilder::default().open(storage).context("opening the embedded BPF object")?;
        if let Some(t) = tcx {
            open.progs.sfunnel.set_attach_type(t);
            // The detour's program sits on a helper's ingress (detour.rs).
            open.progs.sfunnel_detour.set_attach_type(libbpf_rs::ProgramAttachType::TcxIngress);
        }
        open.progs.sfunnel_detour.set_autoload(detour);
        let skel = open.load().context(
            "loading the BPF program (the kernel refused it: it needs CAP_BPF, CAP_PERFMON and \
             CAP_NET_ADMIN, and a kernel with BTF, 5.17 or newer; `sfunnel load -v` shows the verifier's log)",
        )?;
        let loaded = Loaded { skel, detour };
        loaded.bind_all_maps()?;
        Ok(loaded)
    }

    /// Binds every map of `MAP_NAMES` to the loaded programs, also those
    /// no instruction uses (`sf_meta`, `sf_text_maps`): a program then holds
    /// all of them, and the kernel lists them as its maps, which is how a
    /// later sfunnel finds them from the program alone (`RulesetMaps::from_prog`).
    fn bind_all_maps(&self) -> Result<()> {
        let m = &self.skel.maps;
        let mut progs = vec![&self.skel.progs.sfunnel];
        if self.detour {
            progs.push(&self.skel.progs.sfunnel_detour);
        }
        for prog in progs {
            if !prog.autoload() {
                continue;
            }
            for map in [&m.sf_meta, &m.sf_text_maps] {
                // SAFETY: both fds are valid for the call; no options.
                let rc = unsafe {
                    libbpf_sys::bpf_prog_bind_map(prog.as_fd().as_raw_fd(), map.as_fd().as_raw_fd(), std::ptr::null())
                };
                if rc != 0 {
                    return Err(std::io::Error::from_raw_os_error(-rc))
                        .context("binding a map to the program (BPF_PROG_BIND_MAP, Linux 5.10)");
                }
            }
        }
        Ok(())
    }

    /// Loads only the detour's program, for the maps of an attachment that
    /// is already live (`maps`, found through its program): a rerun that
    /// makes the helper pair again hooks it there.  The main program and
    /// fresh maps are not made.
    pub fn detour_for(maps: &RulesetMaps, tcx: bool) -> Result<Loaded> {
        let storage: &'static mut MaybeUninit<OpenObject> = Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = SfunnelSkelBuilder::default().open(storage).context("opening the embedded BPF object")?;
        if tcx {
            open.progs.sfunnel_detour.set_attach_type(libbpf_rs::ProgramAttachType::TcxIngress);
        }
        open.progs.sfunnel.set_autoload(false);
        let m = &mut open.maps;
        for (map, live) in [
            (&mut m.sf_active, &maps.active),
            (&mut m.sf_params, &maps.params),
            (&mut m.sf_ports, &maps.ports),
            (&mut m.sf_addr_maps, &maps.addr_maps),
            (&mut m.sf_rule_maps, &maps.rule_maps),
            (&mut m.sf_counter_maps, &maps.counter_maps),
            (&mut m.sf_text_maps, &maps.text_maps),
            (&mut m.sf_stats, &maps.stats),
            (&mut m.sf_meta, &maps.meta),
            (&mut m.sf_detour, &maps.detour),
        ] {
            map.reuse_fd(live.as_fd()).context("reusing a live map for the detour's program")?;
        }
        let skel = open.load().context("loading the segmentation detour's program for a live attachment")?;
        let loaded = Loaded { skel, detour: true };
        loaded.bind_all_maps()?;
        Ok(loaded)
    }

    /// Handles on this instance's maps.
    pub fn maps(&self) -> Result<RulesetMaps> {
        let m = &self.skel.maps;
        let h = |map: &libbpf_rs::Map<'_>| MapHandle::try_from(map).context("duplicating a map fd");
        Ok(RulesetMaps {
            active: h(&m.sf_active)?,
            params: h(&m.sf_params)?,
            ports: h(&m.sf_ports)?,
            addr_maps: h(&m.sf_addr_maps)?,
            rule_maps: h(&m.sf_rule_maps)?,
            counter_maps: h(&m.sf_counter_maps)?,
            text_maps: h(&m.sf_text_maps)?,
            stats: h(&m.sf_stats)?,
            meta: h(&m.sf_meta)?,
            detour: h(&m.sf_detour)?,
        })
    }

    pub fn program(&self) -> &libbpf_rs::ProgramMut<'static> {
        &self.skel.progs.sfunnel
    }

    /// The detour's program (bpf/detour.h), for a helper's ingress; None
    /// unless loaded with it.
    pub fn detour_program(&self) -> Option<&libbpf_rs::ProgramMut<'static>> {
        self.detour.then_some(&self.skel.progs.sfunnel_detour)
    }

    /// Runs the program on `frame` (Ethernet onwards) with PROG_TEST_RUN.
    /// The kernel reuses one skb across `repeat` runs.
    // ProgramInput is non-exhaustive: no struct literal.
    #[allow(clippy::field_reassign_with_default)]
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<TestRun> {
        let mut out = vec![0u8; frame.len() + 256];
        let mut input = libbpf_rs::ProgramInput::default();
        input.data_in = Some(frame);
        input.data_out = Some(&mut out);
        input.repeat = repeat;
        let output = self.program().test_run(input).context("BPF_PROG_TEST_RUN failed")?;
        let n = output.data.as_ref().map_or(0, |d| d.len());
        let verdict = output.return_value as i32;
        let duration = output.duration;
        out.truncate(n);
        Ok(TestRun { verdict, data: out, duration })
    }
}

/// A TC program that returns TC_ACT_UNSPEC and nothing else: the floor
/// that benchmarks compare the datapath against.
pub struct Noop {
    skel: noop_skel::NoopSkel<'static>,
}

impl Noop {
    pub fn load() -> Result<Noop> {
        use noop_skel::NoopSkelBuilder;
        let storage: &'static mut MaybeUninit<OpenObject> = Box::leak(Box::new(MaybeUninit::uninit()));
        let skel = NoopSkelBuilder::default().open(storage)?.load().context("loading the no-op program")?;
        Ok(Noop { skel })
    }

    /// Average time per run of `repeat` PROG_TEST_RUN repetitions on `frame`.
    #[allow(clippy::field_reassign_with_default)]
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<Duration> {
        let mut input = libbpf_rs::ProgramInput::default();
        input.data_in = Some(frame);
        input.repeat = repeat;
        Ok(self.skel.progs.noop.test_run(input).context("BPF_PROG_TEST_RUN failed")?.duration)
    }
}

/// The maps that hold a ruleset, however they were obtained (a fresh load
/// or pins from an earlier run).
pub struct RulesetMaps {
    pub active: MapHandle,
    pub params: MapHandle,
    pub ports: MapHandle,
    pub addr_maps: MapHandle,
    pub rule_maps: MapHandle,
    pub counter_maps: MapHandle,
    pub text_maps: MapHandle,
    pub stats: MapHandle,
    pub meta: MapHandle,
    pub detour: MapHandle,
}

/// Packets and bytes of one rule, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RuleCounter {
    pub packets: u64,
    pub bytes: u64,
    /// Funnel rules: packets left out because funneled they would exceed
    /// the MTU (dropped or passed, per [`OverMtu`]).
    pub over_mtu: u64,
    /// `packets` by the CPU that counted them, for the CPUs that counted
    /// any: for a funnel rule's GSO segments, the CPUs of `--detour-cpus`.
    pub packets_per_cpu: std::collections::BTreeMap<u32, u64>,
}

/// What becomes of a packet that funneling would push past the MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OverMtu {
    /// Drop it; if its DF bit is set, tell the sender the MTU that fits
    /// (ICMP "fragmentation needed"), so path MTU discovery adapts.
    #[default]
    Drop,
    /// Pass it on unfunneled.
    Pass,
}

impl OverMtu {
    /// The value as `--over-mtu` and $OVER_MTU spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            OverMtu::Drop => "drop",
            OverMtu::Pass => "pass",
        }
    }
}

/// How one attachment's datapath behaves beyond its rules
/// (`sfunnel_params.flags`), fixed at each install.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settings {
    pub egress: bool,
    pub over_mtu: OverMtu,
}

impl Settings {
    pub fn flags(self) -> u32 {
        let mut f = 0;
        if self.egress {
            f |= consts::SFUNNEL_PARAMS_EGRESS;
        }
        if self.over_mtu == OverMtu::Pass {
            f |= consts::SFUNNEL_PARAMS_OVER_MTU_PASS;
        }
        f
    }
}

fn u32_key(k: u32) -> [u8; 4] {
    k.to_ne_bytes()
}

fn create_inner(ty: MapType, name: &str, key: u32, value: u32, entries: usize, flags: u32) -> Result<MapHandle> {
    let opts = libbpf_sys::bpf_map_create_opts {
        sz: size_of::<libbpf_sys::bpf_map_create_opts>() as _,
        map_flags: flags,
        ..Default::default()
    };
    let entries = u32::try_from(entries.max(1)).context("too many entries for one map")?;
    MapHandle::create(ty, Some(name), key, value, entries, &opts).with_context(|| {
        format!("creating the {name} map with {entries} entries (is the memlock limit or memory cgroup too small?)")
    })
}

/// Fills `map` with `count` fixed-size entries, in batches where the
/// kernel supports that and one by one where it does not.
fn fill(map: &MapHandle, keys: &[u8], values: &[u8], count: usize) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    const BATCH: usize = 8192;
    let (ks, vs) = (keys.len() / count, values.len() / count);
    for start in (0..count).step_by(BATCH) {
        let n = BATCH.min(count - start);
        let k = &keys[start * ks..(start + n) * ks];
        let v = &values[start * vs..(start + n) * vs];
        if map.update_batch(k, v, n as u32, MapFlags::ANY, MapFlags::ANY).is_err() {
            for i in 0..n {
                map.update(&k[i * ks..(i + 1) * ks], &v[i * vs..(i + 1) * vs], MapFlags::ANY)
                    .context("writing a ruleset entry")?;
            }
        }
    }
    Ok(())
}

/// Runs `f` on every item at once, one thread each; the first error wins.
fn concurrently<T: Sync>(items: &[T], f: impl Fn(&T) -> Result<()> + Sync) -> Result<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = items.iter().map(|item| s.spawn(|| f(item))).collect();
        handles.into_iter().try_for_each(|h| h.join().map_err(|_| anyhow::anyhow!("a map update thread panicked"))?)
    })
}

/// Maps `len` bytes of an mmapable array map for `f`, then unmaps them.
fn with_mapping(map: &MapHandle, len: usize, prot: i32, f: impl FnOnce(*mut u8)) -> Result<()> {
    // SAFETY: a shared mapping of the map's data, sized by the caller to
    // at most the map's size; it is unmapped below and the pointer does not
    // outlive `f`.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, map.as_fd().as_raw_fd(), 0) };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error()).context("mapping an array map");
    }
    f(base.cast::<u8>());
    // SAFETY: the mapping made above, with its length.
    unsafe { libc::munmap(base, len) };
    Ok(())
}

/// Writes one generation of the mmapable `ports` array with plain stores.
/// The datapath reads only the active generation, never this one.
fn write_ports(ports: &MapHandle, gen: u32, classes: &[sfunnel_port_class]) -> Result<()> {
    use consts::{GENERATIONS, PORT_SPACE};
    // Array elements are laid out at 8-byte-aligned strides.
    let stride = size_of::<sfunnel_port_class>().next_multiple_of(8);
    let len = stride * (GENERATIONS * PORT_SPACE) as usize;
    ensure!(classes.len() == PORT_SPACE as usize, "a generation has {PORT_SPACE} ports");
    let first = (gen * PORT_SPACE) as usize * stride;
    with_mapping(ports, len, libc::PROT_READ | libc::PROT_WRITE, |base| {
        for (i, pc) in classes.iter().enumerate() {
            let b = pc.as_bytes();
            // SAFETY: first + i * stride + b.len() <= len: gen < GENERATIONS
            // and i < PORT_SPACE, and b.len() <= stride.
            unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), base.add(first + i * stride), b.len()) };
        }
    })
}

/// A ruleset staged in the inactive generation of an attachment's maps.
#[derive(Debug, Clone, Copy)]
pub struct Staged {
    pub old: u32,
    pub new: u32,
}

impl Staged {
    /// Makes the staged generation the active one: one aligned 4-byte
    /// write, so a packet sees either the old ruleset or the new one,
    /// whole.
    pub fn flip(&self, maps: &RulesetMaps) -> Result<()> {
        maps.active.update(&u32_key(0), &u32_key(self.new), MapFlags::ANY).context("activating the new ruleset")
    }

    /// Makes the old generation active again (a load over several targets
    /// that failed on a later one); it is whole until [`Staged::release`].
    pub fn unflip(&self, maps: &RulesetMaps) -> Result<()> {
        maps.active.update(&u32_key(0), &u32_key(self.old), MapFlags::ANY).context("activating the old ruleset again")
    }

    /// Drops the old generation's tables.  The kernel waits for running
    /// programs first (synchronize_rcu on map-in-map updates), so no
    /// packet still walking them loses them.
    pub fn release(&self, maps: &RulesetMaps) -> Result<()> {
        let old = self.old;
        concurrently(&[&maps.addr_maps, &maps.rule_maps, &maps.counter_maps, &maps.text_maps], |outer| {
            // An empty slot (the first load) needs no delete, and a delete
            // costs a grace period even when there is nothing to delete.
            if outer.lookup(&u32_key(old), MapFlags::ANY)?.is_none() {
                return Ok(());
            }
            match outer.delete(&u32_key(old)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e).context("releasing the previous ruleset's tables"),
            }
        })?;
        crate::log::event!("installed", generation = format!("{}->{}", self.old, self.new));
        Ok(())
    }
}

impl RulesetMaps {
    /// The maps of the program `prog` (one of sfunnel's, of this layout),
    /// found by their names among the maps the kernel says it uses.
    pub fn from_prog(prog: std::os::fd::BorrowedFd<'_>) -> Result<RulesetMaps> {
        let info = crate::objects::prog_info(prog)?;
        let mut found: [Option<MapHandle>; 10] = Default::default();
        for id in info.map_ids {
            let map = MapHandle::from_map_id(id).with_context(|| format!("opening BPF map {id}"))?;
            let name = crate::objects::map_name(map.as_fd())?;
            if let Some(i) = MAP_NAMES.iter().position(|n| *n == name) {
                found[i] = Some(map);
            }
        }
        let mut it = found.into_iter().zip(MAP_NAMES);
        let mut next = || {
            let (m, name) = it.next().expect("ten maps");
            m.with_context(|| format!("program {} has no map {name}: it is not of this sfunnel's layout", info.id))
        };
        Ok(RulesetMaps {
            active: next()?,
            params: next()?,
            ports: next()?,
            addr_maps: next()?,
            rule_maps: next()?,
            counter_maps: next()?,
            text_maps: next()?,
            stats: next()?,
            meta: next()?,
            detour: next()?,
        })
    }

    /// Another set of handles on the same maps.
    pub fn try_clone(&self) -> Result<RulesetMaps> {
        let h = |m: &MapHandle| MapHandle::try_from(m).context("duplicating a map fd");
        Ok(RulesetMaps {
            active: h(&self.active)?,
            params: h(&self.params)?,
            ports: h(&self.ports)?,
            addr_maps: h(&self.addr_maps)?,
            rule_maps: h(&self.rule_maps)?,
            counter_maps: h(&self.counter_maps)?,
            text_maps: h(&self.text_maps)?,
            stats: h(&self.stats)?,
            meta: h(&self.meta)?,
            detour: h(&self.detour)?,
        })
    }

    pub fn read_meta(&self) -> Result<sfunnel_meta> {
        let v = self.meta.lookup(&u32_key(0), MapFlags::ANY)?.context("the meta map has no entry")?;
        Ok(sfunnel_meta::from_bytes(&v))
    }

    pub fn write_meta(&self, m: &sfunnel_meta) -> Result<()> {
        self.meta.update(&u32_key(0), m.as_bytes(), MapFlags::ANY).context("writing the meta map")
    }

    pub fn read_detour(&self) -> Result<sfunnel_detour> {
        let v = self.detour.lookup(&u32_key(0), MapFlags::ANY)?.context("the detour map has no entry")?;
        Ok(sfunnel_detour::from_bytes(&v))
    }

    /// Written when a helper pair is made (detour.rs): from all zero (no
    /// detour) to complete, or, when a rerun remakes a pair that was gone,
    /// from the old indexes to the new.
    pub fn write_detour(&self, d: &sfunnel_detour) -> Result<()> {
        self.detour.update(&u32_key(0), d.as_bytes(), MapFlags::ANY).context("writing the detour map")
    }

    /// The generation in use.
    pub fn active_gen(&self) -> Result<u32> {
        let v = self.active.lookup(&u32_key(0), MapFlags::ANY)?.context("the active map has no entry")?;
        Ok(u32::from_ne_bytes(v[..4].try_into()?) & 1)
    }

    /// Installs `c` as the new ruleset: [`RulesetMaps::stage`], then
    /// [`Staged::flip`], then [`Staged::release`].  Counters start at zero.
    pub fn install(&self, c: &Compiled, settings: Settings) -> Result<()> {
        let staged = self.stage(c, settings)?;
        staged.flip(self)?;
        staged.release(self)
    }

    /// Fills the inactive generation with `c`, completely, without making
    /// it active: no packet sees any of it until [`Staged::flip`].  What a
    /// previous stage left in that generation is replaced.
    pub fn stage(&self, c: &Compiled, settings: Settings) -> Result<Staged> {
        let started = std::time::Instant::now();
        let old = self.active_gen()?;
        let new = old ^ 1;

        let addrs = create_inner(
            MapType::LpmTrie,
            "sfunnel_addrs",
            size_of::<sfunnel_addr_key>() as u32,
            size_of::<sfunnel_addr_class>() as u32,
            c.addrs.len(),
            libbpf_sys::BPF_F_NO_PREALLOC,
        )?;
        for (k, v) in &c.addrs {
            addrs.update(k.as_bytes(), v.as_bytes(), MapFlags::ANY).context("writing an address class")?;
        }
        let rules = create_inner(
            MapType::Hash,
            "sfunnel_rules",
            size_of::<sfunnel_rule_key>() as u32,
            size_of::<sfunnel_rule_val>() as u32,
            c.rules.len(),
            0,
        )?;
        let keys: Vec<u8> = c.rules.iter().flat_map(|(k, _)| k.as_bytes().to_vec()).collect();
        let vals: Vec<u8> = c.rules.iter().flat_map(|(_, v)| v.as_bytes().to_vec()).collect();
        fill(&rules, &keys, &vals, c.rules.len())?;
        // One cache-line-aligned block of counters per possible CPU; the
        // kernel zeroes the array.
        let ncpus = libbpf_rs::num_possible_cpus().context("counting possible CPUs")?;
        let counters = create_inner(
            MapType::Array,
            "sfunnel_counts",
            4,
            size_of::<sfunnel_counter>() as u32,
            ncpus * c.params.counter_stride as usize,
            libbpf_sys::BPF_F_INNER_MAP | libbpf_sys::BPF_F_MMAPABLE,
        )?;

        write_ports(&self.ports, new, &c.ports)?;
        let params = sfunnel_params { flags: c.params.flags | settings.flags(), ..c.params };
        self.params.update(&u32_key(new), params.as_bytes(), MapFlags::ANY)?;
        // The canonical text, for `status`, in RULESET_TEXT_CHUNK pieces.
        let chunk = RULESET_TEXT_CHUNK as usize;
        let pieces: Vec<&[u8]> = c.canonical.as_bytes().chunks(chunk).collect();
        let text =
            create_inner(MapType::Array, "sfunnel_text", 4, chunk as u32, pieces.len(), libbpf_sys::BPF_F_INNER_MAP)?;
        for (i, piece) in pieces.iter().enumerate() {
            let mut v = piece.to_vec();
            v.resize(chunk, 0);
            text.update(&u32_key(i as u32), &v, MapFlags::ANY).context("writing the ruleset text")?;
        }

        // Each map-in-map update waits for a grace period (synchronize_rcu);
        // made concurrently, the waits overlap instead of adding up.
        let slots = [
            (&self.addr_maps, &addrs),
            (&self.rule_maps, &rules),
            (&self.counter_maps, &counters),
            (&self.text_maps, &text),
        ];
        concurrently(&slots, |(outer, inner)| {
            let fd = inner.as_fd().as_raw_fd();
            outer
                .update(&u32_key(new), &fd.to_ne_bytes(), MapFlags::ANY)
                .context("placing a ruleset table in its generation slot")
        })?;
        crate::log::event!(
            "staged",
            generation = new,
            rules = c.params.nrules,
            rule_entries = c.rules.len(),
            prefixes = c.addrs.len(),
            egress = settings.egress,
            over_mtu = settings.over_mtu.as_str(),
            ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3)
        );
        Ok(Staged { old, new })
    }

    /// The active generation's ruleset, in canonical form.
    pub fn ruleset_text(&self) -> Result<String> {
        let gen = self.active_gen()?;
        let Some(id) = self.text_maps.lookup(&u32_key(gen), MapFlags::ANY)? else {
            return Ok(String::new());
        };
        let text = MapHandle::from_map_id(u32::from_ne_bytes(id[..4].try_into()?)).context("opening the text map")?;
        let mut bytes = Vec::new();
        for i in 0..text.max_entries() {
            bytes.extend(text.lookup(&u32_key(i), MapFlags::ANY)?.unwrap_or_default());
        }
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        bytes.truncate(end);
        String::from_utf8(bytes).context("the ruleset text is not UTF-8")
    }

    /// Per-rule counters of the active generation, summed over CPUs.
    pub fn rule_counters(&self) -> Result<Vec<RuleCounter>> {
        let gen = self.active_gen()?;
        let params = self
            .params
            .lookup(&u32_key(gen), MapFlags::ANY)?
            .map(|v| sfunnel_params::from_bytes(&v))
            .context("the params map has no entry for the active generation")?;
        let Some(id) = self.counter_maps.lookup(&u32_key(gen), MapFlags::ANY)? else {
            // No ruleset installed yet: nothing to count.
            anyhow::ensure!(
                params.nrules == 0,
                "the counters of the active generation ({} rules) are gone",
                params.nrules
            );
            return Ok(Vec::new());
        };
        let counters =
            MapHandle::from_map_id(u32::from_ne_bytes(id[..4].try_into()?)).context("opening the counters map")?;
        let stride = params.counter_stride as usize;
        let entries = counters.max_entries() as usize;
        let mut out = vec![RuleCounter::default(); params.nrules as usize];
        with_mapping(&counters, entries * size_of::<sfunnel_counter>(), libc::PROT_READ, |base| {
            for cpu_block in 0..entries / stride.max(1) {
                for (rule, total) in out.iter_mut().enumerate() {
                    let off = (cpu_block * stride + rule) * size_of::<sfunnel_counter>();
                    // SAFETY: off + size_of::<sfunnel_counter>() <= entries *
                    // size: cpu_block < entries / stride, rule < nrules <= stride.
                    let c = sfunnel_counter::from_bytes(unsafe {
                        std::slice::from_raw_parts(base.add(off), size_of::<sfunnel_counter>())
                    });
                    total.packets += c.packets;
                    if c.packets > 0 {
                        total.packets_per_cpu.insert(cpu_block as u32, c.packets);
                    }
                    total.bytes += c.bytes;
                    total.over_mtu += c.over_mtu;
                }
            }
        })?;
        Ok(out)
    }

    /// The per-CPU `stats` array summed over CPUs, indexed by SFUNNEL_STAT_*.
    pub fn stats(&self) -> Result<Vec<u64>> {
        let n = consts::SFUNNEL_STAT_MAX;
        let mut out = Vec::with_capacity(n as usize);
        for i in 0..n {
            let per_cpu = self.stats.lookup_percpu(&u32_key(i), MapFlags::ANY)?.unwrap_or_default();
            out.push(per_cpu.iter().map(|v| u64::from_ne_bytes(v[..8].try_into().unwrap_or([0; 8]))).sum());
        }
        Ok(out)
    }
}

/// Whether the datapath can tell a packet whose checksum the kernel still
/// owes (bpf/csum_state.h): the kernel has `bpf_cast_to_kern_ctx` (Linux
/// 6.2), which libbpf resolves the same way, from the kernel's BTF.
/// Without it every packet to funnel takes the segmentation detour.
pub fn reads_checksum_state() -> bool {
    // SAFETY: plain libbpf calls; the BTF object is freed below and the
    // name is a NUL-terminated literal.
    unsafe {
        let btf = libbpf_sys::btf__load_vmlinux_btf();
        if btf.is_null() || libbpf_sys::libbpf_get_error(btf as *const _) != 0 {
            return false;
        }
        let id = libbpf_sys::btf__find_by_name_kind(btf, c"bpf_cast_to_kern_ctx".as_ptr(), libbpf_sys::BTF_KIND_FUNC);
        libbpf_sys::btf__free(btf);
        id > 0
    }
}

/// Fails with a clear message when the kernel lacks something the
/// datapath needs.  Call before loading on an unknown host.
pub fn check_kernel() -> Result<()> {
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!("this kernel has no BTF (/sys/kernel/btf/vmlinux): sfunnel needs CONFIG_DEBUG_INFO_BTF=y");
    }
    Ok(())
}
