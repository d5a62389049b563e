//! A user-space lookup over the compiled entries, step for step what
//! bpf/lookup.h does.  Tests check it against the plain first-match scan of
//! the typed ruleset; the datapath tests check the BPF side.

use std::collections::HashMap;
use std::net::IpAddr;

use super::ast::{addr_bits, slot, Family, PacketFields};
use super::compile::{shape_bit, Compiled, RuleKeyTuple};
use crate::datapath::consts::*;
use crate::datapath::types::{sfunnel_addr_class, sfunnel_rule_val};

pub struct Reference<'c> {
    compiled: &'c Compiled,
    /// (field, prefix length, left-aligned network address) → class,
    /// standing in for the kernel's LPM trie.
    addrs: HashMap<(u8, u8, u128), sfunnel_addr_class>,
    rules: HashMap<RuleKeyTuple, sfunnel_rule_val>,
}

impl<'c> Reference<'c> {
    pub fn new(compiled: &'c Compiled) -> Reference<'c> {
        let addrs = compiled
            .addrs
            .iter()
            .map(|(k, v)| ((k.field, (k.prefixlen - 32) as u8, u128::from_be_bytes(k.addr)), *v))
            .collect();
        let rules = compiled
            .rules
            .iter()
            .map(|(k, v)| {
                (
                    (
                        k.saddr_class,
                        k.daddr_class,
                        k.sport_class,
                        k.dport_class,
                        k.proto,
                        k.shape,
                        k.funneled,
                        k.family,
                    ),
                    *v,
                )
            })
            .collect();
        Reference { compiled, addrs, rules }
    }

    /// `field` is the trie's: family * 2 + (0 saddr, 1 daddr).
    fn addr_class(&self, field: u8, addr: IpAddr) -> Option<sfunnel_addr_class> {
        let params = &self.compiled.params;
        let bits = addr_bits(addr);
        // The first-octet filter.
        let octet = bits >> 120;
        if params.octets[usize::from(field)][(octet >> 6) as usize] >> (octet & 63) & 1 == 0 {
            return Some(sfunnel_addr_class { class: 0, pad: 0, shapes: params.root_shapes[usize::from(field)] });
        }
        (0..=Family::of(addr).bits()).rev().find_map(|len| {
            let net = if len == 0 { 0 } else { bits & (u128::MAX << (128 - u32::from(len))) };
            self.addrs.get(&(field, len, net)).copied()
        })
    }

    /// The index of the rule the datapath applies to this packet, if any.
    pub fn lookup(&self, pkt: &PacketFields) -> Option<u32> {
        let family = Family::of(pkt.saddr);
        let slot = slot(family, pkt.proto);
        let shift = slot * SHAPES_PER_PROTO;
        let sp = self.compiled.ports[usize::from(pkt.sport)];
        let dp = self.compiled.ports[usize::from(pkt.dport)];
        let mut shapes =
            (self.compiled.params.shapes >> shift) & (sp.sport_shapes >> shift) & (dp.dport_shapes >> shift) & 0xffff;
        if shapes == 0 {
            return None;
        }
        let (mut sa, mut da) = (0, 0);
        let field = family.number() * 2;
        if shapes & SHAPESET_WITH_SADDR & 0xffff != 0 {
            let c = self.addr_class(field, pkt.saddr)?;
            sa = c.class;
            shapes &= c.shapes >> shift;
        }
        if shapes & SHAPESET_WITH_DADDR & 0xffff != 0 {
            let c = self.addr_class(field + 1, pkt.daddr)?;
            da = c.class;
            shapes &= c.shapes >> shift;
        }
        // The datapath tests for `funneled` only when the ruleset uses it.
        let funneled = u8::from(self.compiled.params.flags >> slot & 1 != 0 && pkt.funneled);
        (0..SHAPES_PER_PROTO)
            .filter(|s| shapes & (shape_bit(family, pkt.proto, *s) >> shift) != 0)
            .filter_map(|s| {
                let pick = |bit: u32, v: u32| if s & bit != 0 { v } else { 0 };
                let key = (
                    pick(SHAPE_SADDR, sa),
                    pick(SHAPE_DADDR, da),
                    pick(SHAPE_SPORT, u32::from(sp.sport_class)) as u16,
                    pick(SHAPE_DPORT, u32::from(dp.dport_class)) as u16,
                    pkt.proto.number(),
                    s as u8,
                    funneled,
                    family.number(),
                );
                self.rules.get(&key).map(|v| v.index)
            })
            .min()
    }
}
