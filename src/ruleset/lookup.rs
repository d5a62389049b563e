//! A user-space lookup over the compiled entries, step for step what
//! bpf/lookup.h does.  Tests check it against the plain first-match scan of
//! the typed ruleset; the datapath tests check the BPF side.

use std::collections::HashMap;

use super::ast::PacketFields;
use super::compile::{shape_bit, Compiled, RuleKeyTuple};
use crate::datapath::consts::*;
use crate::datapath::types::{sfunnel_addr_class, sfunnel_rule_val};

pub struct Reference<'c> {
    compiled: &'c Compiled,
    /// (field, prefix length, network address) → class, standing in for the
    /// kernel's LPM trie.
    addrs: HashMap<(u8, u8, u32), sfunnel_addr_class>,
    rules: HashMap<RuleKeyTuple, sfunnel_rule_val>,
}

impl<'c> Reference<'c> {
    pub fn new(compiled: &'c Compiled) -> Reference<'c> {
        let addrs = compiled
            .addrs
            .iter()
            .map(|(k, v)| ((k.field, (k.prefixlen - 32) as u8, u32::from_be(k.addr)), *v))
            .collect();
        let rules = compiled
            .rules
            .iter()
            .map(|(k, v)| {
                ((k.saddr_class, k.daddr_class, k.sport_class, k.dport_class, k.proto, k.shape, k.funneled), *v)
            })
            .collect();
        Reference { compiled, addrs, rules }
    }

    fn addr_class(&self, field: u32, addr: u32) -> Option<sfunnel_addr_class> {
        let params = &self.compiled.params;
        let octet = addr >> 24;
        if params.octets[field as usize][(octet >> 6) as usize] >> (octet & 63) & 1 == 0 {
            return Some(sfunnel_addr_class { class: 0, shapes: params.root_shapes[field as usize] });
        }
        (0..=32u8).rev().find_map(|len| {
            let net = if len == 0 { 0 } else { addr & (u32::MAX << (32 - u32::from(len))) };
            self.addrs.get(&(field as u8, len, net)).copied()
        })
    }

    /// The index of the rule the datapath applies to this packet, if any.
    pub fn lookup(&self, pkt: &PacketFields) -> Option<u32> {
        let slot = pkt.proto.slot() * SHAPES_PER_PROTO;
        let sp = self.compiled.ports[usize::from(pkt.sport)];
        let dp = self.compiled.ports[usize::from(pkt.dport)];
        let mut shapes =
            (self.compiled.params.shapes >> slot) & (sp.sport_shapes >> slot) & (dp.dport_shapes >> slot) & 0xffff;
        if shapes == 0 {
            return None;
        }
        let (mut sa, mut da) = (0, 0);
        if shapes & SHAPESET_WITH_SADDR & 0xffff != 0 {
            let c = self.addr_class(SFUNNEL_FIELD_SADDR, pkt.saddr)?;
            sa = c.class;
            shapes &= c.shapes >> slot;
        }
        if shapes & SHAPESET_WITH_DADDR & 0xffff != 0 {
            let c = self.addr_class(SFUNNEL_FIELD_DADDR, pkt.daddr)?;
            da = c.class;
            shapes &= c.shapes >> slot;
        }
        // The datapath tests for `funneled` only when the ruleset uses it.
        let funneled = u8::from(self.compiled.params.flags >> pkt.proto.slot() & 1 != 0 && pkt.funneled);
        (0..SHAPES_PER_PROTO)
            .filter(|s| shapes & (shape_bit(pkt.proto, *s) >> slot) != 0)
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
                );
                self.rules.get(&key).map(|v| v.index)
            })
            .min()
    }
}
