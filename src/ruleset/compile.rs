//! Typed ruleset → the map entries of bpf/sfunnel.h.
//!
//! The scheme (classification, then one exact-match probe per shape):
//!
//! 1. Each field is cut into classes: values that no rule can tell apart.
//!    - Ports: the boundaries of every range any rule names split 0..=65535
//!      into segments; each segment is a class.
//!    - Addresses: every prefix a rule names (plus 0.0.0.0/0, or ::/0) is a
//!      class, holding the addresses whose longest named prefix it is.  The
//!      datapath finds it with one LPM lookup.  IPv4 and IPv6 classes are
//!      numbered apart, per field.
//!
//!    A match (`dport { 80, 443 }`, `saddr != 10.0.0.0/8`, …) is then a set
//!    of classes.
//! 2. A rule's shape is the set of fields it constrains.  The rule becomes
//!    one hash entry per combination of classes of those fields, keyed by
//!    (family, protocol, shape, classes).  A key that an earlier rule
//!    already holds keeps the earlier rule: first match wins.
//! 3. Every class also records which shapes have a rule that admits it, so
//!    the datapath probes only shapes that can still match.
//!
//! 4. A ruleset that uses `funneled` adds one bit to the key: whether the
//!    packet looks funneled, computed by the datapath only then.  A rule
//!    with `funneled` is entered under bit 1 only, any other rule under both
//!    0 and 1, so each key still holds the first rule that matches a packet
//!    with that bit.
//!
//! A packet costs 2 array lookups, at most 2 LPM lookups and at most 16 hash
//! lookups, whatever the number of rules.  The price is paid in entries: a
//! rule costs the product of its class-set sizes, so negations and wide
//! ranges in several fields of one rule multiply.  The total is capped at
//! [`MAX_ENTRIES`]; a ruleset over the cap is refused with the rule that
//! crossed it.

use std::collections::HashMap;

use super::ast::{slot, AddrMatch, Family, IpNet, Ipv4Net, Ipv6Net, PortMatch, Proto, Ruleset};
use super::error::RulesetError;
use crate::datapath::consts::*;
use crate::datapath::types::{
    sfunnel_addr_class, sfunnel_addr_key, sfunnel_params, sfunnel_port_class, sfunnel_rule_key, sfunnel_rule_val,
};
use crate::ruleset::ast::Action;

/// The most hash entries a ruleset may compile to (about 64 MiB of kernel
/// memory in the rules table).
pub const MAX_ENTRIES: usize = 1 << 20;

/// The map entries of one ruleset generation.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub params: sfunnel_params,
    /// Indexed by port (host order); `PORT_SPACE` entries.
    pub ports: Vec<sfunnel_port_class>,
    pub addrs: Vec<(sfunnel_addr_key, sfunnel_addr_class)>,
    pub rules: Vec<(sfunnel_rule_key, sfunnel_rule_val)>,
    /// How many rule entries each rule owns (0: shadowed by earlier rules).
    pub entries_per_rule: Vec<usize>,
    /// The ruleset in canonical form, one rule a line (kept for `status`).
    pub canonical: String,
}

/// Shape bits of a rule's constrained fields.
fn shape_of(m: &super::ast::Match) -> u32 {
    let mut s = 0;
    if m.saddr.is_some() {
        s |= SHAPE_SADDR;
    }
    if m.daddr.is_some() {
        s |= SHAPE_DADDR;
    }
    if m.sport.is_some() {
        s |= SHAPE_SPORT;
    }
    if m.dport.is_some() {
        s |= SHAPE_DPORT;
    }
    s
}

/// The shape-set bit of (family, protocol, shape).
pub(crate) fn shape_bit(family: Family, proto: Proto, shape: u32) -> u64 {
    1 << (slot(family, proto) * SHAPES_PER_PROTO + shape)
}

/// Bits of every shape, in every slot, that leaves `field` free.
fn shapes_without(field: u32) -> u64 {
    let one_slot = (0..SHAPES_PER_PROTO).filter(|s| s & field == 0).fold(0u64, |acc, s| acc | 1 << s);
    (0..SLOTS).fold(0, |acc, slot| acc | one_slot << (slot * SHAPES_PER_PROTO))
}

/// Port classes of one field: segment starts, ascending, the first being 0.
struct PortClasses {
    starts: Vec<u32>,
}

impl PortClasses {
    fn new<'a>(matches: impl Iterator<Item = &'a PortMatch>) -> PortClasses {
        let mut starts = vec![0u32];
        for m in matches {
            for &(lo, hi) in m.ports.ranges() {
                starts.push(u32::from(lo));
                starts.push(u32::from(hi) + 1);
            }
        }
        starts.retain(|&s| s < PORT_SPACE);
        starts.sort_unstable();
        starts.dedup();
        PortClasses { starts }
    }

    fn len(&self) -> usize {
        self.starts.len()
    }

    fn class_of(&self, port: u32) -> u32 {
        (self.starts.partition_point(|&s| s <= port) - 1) as u32
    }

    fn classes(&self, m: &PortMatch) -> Vec<u32> {
        let mut inside = Vec::new();
        for &(lo, hi) in m.ports.ranges() {
            inside.extend(self.class_of(u32::from(lo))..=self.class_of(u32::from(hi)));
        }
        if m.negated {
            complement(&inside, self.len())
        } else {
            inside
        }
    }
}

/// Address classes of one field and family: the named prefixes, sorted by
/// (address, length), so that the whole space (0.0.0.0/0 or ::/0) is class
/// 0 and each prefix's subtree is the contiguous run that follows it.
struct AddrClasses {
    nets: Vec<IpNet>,
}

impl AddrClasses {
    fn new<'a>(family: Family, matches: impl Iterator<Item = &'a AddrMatch>) -> AddrClasses {
        let root = match family {
            Family::Ip => IpNet::V4(Ipv4Net::new(0, 0)),
            Family::Ip6 => IpNet::V6(Ipv6Net::new(0, 0)),
        };
        let mut nets = vec![root];
        nets.extend(matches.map(|m| m.net).filter(|n| n.family() == family));
        nets.sort_unstable();
        nets.dedup();
        AddrClasses { nets }
    }

    /// The first octets the named prefixes (all but the root) cover, as a
    /// 256-bit set: outside it, an address is in class 0.
    fn first_octets(&self) -> [u64; 4] {
        let mut set = [0u64; 4];
        for net in &self.nets[1..] {
            for octet in net.bits() >> 120..=net.last_bits() >> 120 {
                set[(octet >> 6) as usize] |= 1 << (octet & 63);
            }
        }
        set
    }

    fn classes(&self, m: &AddrMatch) -> Vec<u32> {
        let start = self.nets.binary_search(&m.net).expect("every named prefix is a class");
        let last = m.net.last_bits();
        let end = start + self.nets[start..].partition_point(|n| n.bits() <= last);
        let inside: Vec<u32> = (start as u32..end as u32).collect();
        if m.negated {
            complement(&inside, self.nets.len())
        } else {
            inside
        }
    }
}

/// Sorted classes 0..n not in `inside` (which is sorted or nearly so).
fn complement(inside: &[u32], n: usize) -> Vec<u32> {
    let mut member = vec![false; n];
    for &c in inside {
        member[c as usize] = true;
    }
    (0..n as u32).filter(|&c| !member[c as usize]).collect()
}

fn rule_val(index: u32, action: &Action) -> sfunnel_rule_val {
    let mut v = sfunnel_rule_val { index, ..Default::default() };
    match *action {
        Action::Funnel { proto, sport, dport } => {
            v.action = SFUNNEL_ACT_FUNNEL as u8;
            v.proto = proto.number();
            v.sport = sport.to_be();
            v.dport = dport.to_be();
        }
        Action::Unfunnel { proto } => {
            v.action = SFUNNEL_ACT_UNFUNNEL as u8;
            v.proto = proto.number();
        }
        Action::UnfunnelAuto => {
            v.action = SFUNNEL_ACT_UNFUNNEL as u8;
            v.proto = SFUNNEL_INNER_AUTO as u8;
        }
        Action::Accept => v.action = SFUNNEL_ACT_ACCEPT as u8,
        Action::Drop => v.action = SFUNNEL_ACT_DROP as u8,
    }
    v
}

/// Compiles a ruleset.  Fails only when the entries would exceed
/// [`MAX_ENTRIES`]; the error points at the rule that crossed the cap.
pub fn compile(rs: &Ruleset) -> Result<Compiled, RulesetError> {
    let sport_cls = PortClasses::new(rs.rules.iter().filter_map(|r| r.matches.sport.as_ref()));
    let dport_cls = PortClasses::new(rs.rules.iter().filter_map(|r| r.matches.dport.as_ref()));
    // [family][field]: the classes of the addresses each field names.
    let addr_cls = [Family::Ip, Family::Ip6].map(|f| {
        [
            AddrClasses::new(f, rs.rules.iter().filter_map(|r| r.matches.saddr.as_ref())),
            AddrClasses::new(f, rs.rules.iter().filter_map(|r| r.matches.daddr.as_ref())),
        ]
    });

    let mut sport_shapes = vec![shapes_without(SHAPE_SPORT); sport_cls.len()];
    let mut dport_shapes = vec![shapes_without(SHAPE_DPORT); dport_cls.len()];
    let mut addr_shapes = addr_cls.each_ref().map(|[s, d]| {
        [vec![shapes_without(SHAPE_SADDR); s.nets.len()], vec![shapes_without(SHAPE_DADDR); d.nets.len()]]
    });

    let mut table: HashMap<RuleKeyTuple, u32> = HashMap::new();
    let mut entries_per_rule = vec![0usize; rs.rules.len()];
    let mut shapes_used = 0u64;
    let wildcard = vec![0u32];
    // Per slot: does some rule of that family and protocol use `funneled`?
    let funneled_slots: u32 = rs
        .rules
        .iter()
        .filter(|r| r.matches.funneled)
        .fold(0, |acc, r| acc | 1 << slot(r.matches.family, r.matches.proto));

    for (i, rule) in rs.rules.iter().enumerate() {
        let m = &rule.matches;
        let shape = shape_of(m);
        let bit = shape_bit(m.family, m.proto, shape);
        shapes_used |= bit;
        let fam = usize::from(m.family.number());
        let [saddr_cls, daddr_cls] = &addr_cls[fam];

        let sa = m.saddr.as_ref().map_or_else(|| wildcard.clone(), |a| saddr_cls.classes(a));
        let da = m.daddr.as_ref().map_or_else(|| wildcard.clone(), |a| daddr_cls.classes(a));
        let sp = m.sport.as_ref().map_or_else(|| wildcard.clone(), |p| sport_cls.classes(p));
        let dp = m.dport.as_ref().map_or_else(|| wildcard.clone(), |p| dport_cls.classes(p));

        // Values of the key's `funneled` bit this rule is entered under.
        let funneled_bits: &[u8] = match (funneled_slots >> slot(m.family, m.proto) & 1 != 0, m.funneled) {
            (false, _) => &[0],
            (true, true) => &[1],
            (true, false) => &[0, 1],
        };
        let product =
            [sa.len(), da.len(), sp.len(), dp.len(), funneled_bits.len()].iter().fold(1u128, |acc, &n| acc * n as u128);
        if product + table.len() as u128 > MAX_ENTRIES as u128 {
            return Err(RulesetError {
                line: rule.pos.line,
                col: rule.pos.col,
                message: format!(
                    "the ruleset needs more than {MAX_ENTRIES} map entries by this rule, which alone needs {product}: \
                     negations and wide ranges in several fields of one rule multiply; split the rule or narrow its matches"
                ),
                source_line: String::new(),
            });
        }

        if m.saddr.is_some() {
            sa.iter().for_each(|&c| addr_shapes[fam][0][c as usize] |= bit);
        }
        if m.daddr.is_some() {
            da.iter().for_each(|&c| addr_shapes[fam][1][c as usize] |= bit);
        }
        if m.sport.is_some() {
            sp.iter().for_each(|&c| sport_shapes[c as usize] |= bit);
        }
        if m.dport.is_some() {
            dp.iter().for_each(|&c| dport_shapes[c as usize] |= bit);
        }

        let proto = m.proto.number();
        let family = m.family.number();
        for &a in &sa {
            for &d in &da {
                for &s in &sp {
                    for &p in &dp {
                        for &f in funneled_bits {
                            let key = (a, d, s as u16, p as u16, proto, shape as u8, f, family);
                            if let std::collections::hash_map::Entry::Vacant(e) = table.entry(key) {
                                e.insert(i as u32);
                                entries_per_rule[i] += 1;
                            }
                        }
                    }
                }
            }
        }
    }

    let mut ports = vec![sfunnel_port_class::default(); PORT_SPACE as usize];
    for (port, pc) in ports.iter_mut().enumerate() {
        let sc = sport_cls.class_of(port as u32);
        let dc = dport_cls.class_of(port as u32);
        *pc = sfunnel_port_class {
            sport_class: sc as u16,
            dport_class: dc as u16,
            pad: 0,
            sport_shapes: sport_shapes[sc as usize],
            dport_shapes: dport_shapes[dc as usize],
        };
    }

    let mut addrs = Vec::new();
    for family in [Family::Ip, Family::Ip6] {
        let fam = usize::from(family.number());
        // The shapes of this family's slots.
        let slots = (0xffffffffu64) << (fam as u32 * 2 * SHAPES_PER_PROTO);
        // A field no rule constrains is never looked up: it needs no entries.
        for (field, with) in [(0, SHAPESET_WITH_SADDR), (1, SHAPESET_WITH_DADDR)] {
            if shapes_used & with & slots != 0 {
                let code = family.number() * 2 + field as u8;
                push_addr_classes(&mut addrs, code, &addr_cls[fam][field], &addr_shapes[fam][field]);
            }
        }
    }

    let rules = table
        .into_iter()
        .map(|((sa, da, sc, dc, proto, shape, funneled, family), index)| {
            let key = sfunnel_rule_key {
                saddr_class: sa,
                daddr_class: da,
                sport_class: sc,
                dport_class: dc,
                proto,
                shape,
                funneled,
                family,
            };
            (key, rule_val(index, &rs.rules[index as usize].action))
        })
        .collect();

    Ok(Compiled {
        params: sfunnel_params {
            shapes: shapes_used,
            nrules: rs.rules.len() as u32,
            counter_stride: (rs.rules.len() as u32).next_multiple_of(COUNTERS_PER_LINE).max(COUNTERS_PER_LINE),
            root_class: 0,
            // SFUNNEL_PARAMS_FUNNELED_*: bit = slot; the per-attachment bits
            // are RulesetMaps::install's.
            flags: funneled_slots,
            // Indexed by the trie's field: family * 2 + (saddr, daddr).
            octets: [0, 1, 2, 3].map(|f| addr_cls[f / 2][f % 2].first_octets()),
            root_shapes: [0, 1, 2, 3].map(|f| addr_shapes[f / 2][f % 2][0]),
        },
        ports,
        addrs,
        rules,
        entries_per_rule,
        canonical: rs.to_string(),
    })
}

/// (saddr, daddr, sport, dport classes, protocol, shape, funneled, family):
/// a rule key as a hashable tuple while compiling.
pub(crate) type RuleKeyTuple = (u32, u32, u16, u16, u8, u8, u8, u8);

/// `field` is the key's: family * 2 + (0 saddr, 1 daddr).
fn push_addr_classes(
    out: &mut Vec<(sfunnel_addr_key, sfunnel_addr_class)>,
    field: u8,
    classes: &AddrClasses,
    shapes: &[u64],
) {
    for (class, net) in classes.nets.iter().enumerate() {
        let key = sfunnel_addr_key {
            prefixlen: 32 + u32::from(net.prefix_len()),
            field,
            pad: [0; 3],
            // Left-aligned: an IPv4 address fills addr[0..4].
            addr: net.bits().to_be_bytes(),
        };
        out.push((key, sfunnel_addr_class { class: class as u32, pad: 0, shapes: shapes[class] }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ruleset::parse::parse;

    #[test]
    fn a_single_exact_rule_is_one_entry() {
        let rs = parse("ip daddr 1.1.1.1 tcp dport 8080 actions funnel tcp dport 80 sport 540").unwrap();
        let c = compile(&rs).unwrap();
        assert_eq!(c.rules.len(), 1);
        assert_eq!(c.entries_per_rule, vec![1]);
        let (k, v) = c.rules[0];
        assert_eq!(k.shape as u32, SHAPE_DADDR | SHAPE_DPORT);
        assert_eq!(k.proto, 6);
        assert_eq!(v.sport, 540u16.to_be());
        assert_eq!(v.dport, 80u16.to_be());
        // 8080 is in its own dport class, which admits the rule's shape.
        let pc = c.ports[8080];
        assert_ne!(pc.dport_class, c.ports[8081].dport_class);
        assert_ne!(pc.dport_shapes & shape_bit(Family::Ip, Proto::Tcp, SHAPE_DADDR | SHAPE_DPORT), 0);
        assert_eq!(c.ports[8081].dport_shapes & shape_bit(Family::Ip, Proto::Tcp, SHAPE_DADDR | SHAPE_DPORT), 0);
        // Only daddr is looked up: the root and 1.1.1.1/32.
        assert_eq!(c.addrs.len(), 2);
    }

    #[test]
    fn funneled_rules_take_bit_1_and_the_others_both_bits() {
        let rs = parse("tcp dport 80 funneled unfunnel auto\ntcp dport 80 accept\nudp drop").unwrap();
        let c = compile(&rs).unwrap();
        assert_eq!(c.params.flags, SFUNNEL_PARAMS_FUNNELED_TCP);
        // The funneled rule: bit 1; `tcp dport 80 accept`: bit 0 only (bit 1
        // is the first rule's); `udp drop`: bit 0 (no UDP rule uses it).
        assert_eq!(c.entries_per_rule, vec![1, 1, 1]);
        let (k, v) = c.rules.iter().find(|(_, v)| v.index == 0).unwrap();
        assert_eq!((k.funneled, v.action, v.proto), (1, SFUNNEL_ACT_UNFUNNEL as u8, SFUNNEL_INNER_AUTO as u8));
        // A UDP `funneled` rule: UDP rules get both bits, TCP rules one.
        let c = compile(&parse("udp funneled dport 1 accept\ntcp accept\nudp drop").unwrap()).unwrap();
        assert_eq!((c.params.flags, c.entries_per_rule.clone()), (SFUNNEL_PARAMS_FUNNELED_UDP, vec![1, 1, 2]));
        // Without `funneled` in the ruleset, every key has bit 0.
        let c = compile(&parse("tcp dport 80 accept").unwrap()).unwrap();
        assert_eq!((c.params.flags, c.rules[0].0.funneled), (0, 0));
    }

    #[test]
    fn a_shadowed_rule_owns_no_entries() {
        let rs = parse("tcp dport 80 accept\ntcp dport 80 drop").unwrap();
        assert_eq!(compile(&rs).unwrap().entries_per_rule, vec![1, 0]);
    }

    #[test]
    fn a_negated_port_covers_every_other_segment() {
        let rs = parse("tcp dport 80 accept; tcp dport != 80 drop").unwrap();
        // Segments: [0,79] [80] [81,65535]; `!= 80` owns the two outer ones.
        assert_eq!(compile(&rs).unwrap().entries_per_rule, vec![1, 2]);
    }
}
