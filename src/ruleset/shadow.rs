//! Rules that can never match: an earlier rule matches every packet they
//! would, so first match never reaches them.  `check` warns about them and
//! `check --strict` fails on them.
//!
//! Two ways are found:
//! - one earlier rule covers the rule: each of its fields is a superset of
//!   the rule's (a missing field is every value);
//! - the compiler gave the rule no map entry: earlier rules together match
//!   every class it names (`Compiled::entries_per_rule`).
//!
//! Earlier rules that only cover a rule together, in ways the classes do
//! not show, are not found.  Each rule is compared with the earlier rules
//! of its family and protocol, up to [`MAX_COMPARISONS`] comparisons in
//! all; past that the check says where it stopped.

use super::ast::{AddrMatch, Match, PortMatch, Ruleset};
use super::compile::Compiled;

/// The comparisons the pairwise check makes at most (a few seconds' worth
/// would be too many for `check` on a large ruleset).
pub const MAX_COMPARISONS: u64 = 5_000_000;

/// A rule that can never match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shadowed {
    /// Its index, from 0.
    pub rule: usize,
    /// The earlier rule that covers it alone, if one does.
    pub by: Option<usize>,
}

/// The result of the check.
#[derive(Debug, Default)]
pub struct Report {
    pub shadowed: Vec<Shadowed>,
    /// The pairwise check stopped before this rule (too many comparisons);
    /// rules from here on were checked by their map entries only.
    pub stopped_at: Option<usize>,
}

/// Inclusive intervals, sorted, disjoint and not adjacent.
type Set = Vec<(u128, u128)>;

fn complement(set: &Set, max: u128) -> Set {
    let mut out = Vec::new();
    let mut next = 0u128;
    for &(lo, hi) in set {
        if lo > next {
            out.push((next, lo - 1));
        }
        if hi == max {
            return out;
        }
        next = hi + 1;
    }
    out.push((next, max));
    out
}

/// Whether every interval of `b` lies inside one of `a`'s (enough, as
/// `a`'s intervals are not adjacent).
fn subset(b: &Set, a: &Set) -> bool {
    b.iter().all(|&(lo, hi)| {
        let i = a.partition_point(|&(alo, _)| alo <= lo);
        i > 0 && a[i - 1].1 >= hi
    })
}

fn ports(m: &Option<PortMatch>) -> Set {
    let max = u128::from(u16::MAX);
    match m {
        None => vec![(0, max)],
        Some(p) => {
            let set = p.ports.ranges().iter().map(|&(lo, hi)| (u128::from(lo), u128::from(hi))).collect();
            if p.negated {
                complement(&set, max)
            } else {
                set
            }
        }
    }
}

fn addrs(m: &Option<AddrMatch>) -> Set {
    match m {
        None => vec![(0, u128::MAX)],
        Some(a) => {
            let set = vec![(a.net.bits(), a.net.last_bits())];
            if a.negated {
                // Addresses are left-aligned: an IPv4 one ends in 96 zero bits,
                // so the complement's ends need not be exact addresses.
                complement(&set, u128::MAX)
            } else {
                set
            }
        }
    }
}

/// What a rule matches, field by field (its family and protocol are its
/// slot's).
struct Sets {
    funneled: bool,
    fields: [Set; 4],
}

impl Sets {
    fn of(m: &Match) -> Sets {
        Sets { funneled: m.funneled, fields: [ports(&m.sport), ports(&m.dport), addrs(&m.saddr), addrs(&m.daddr)] }
    }

    /// Whether `self` matches every packet that `b` matches (same slot).
    fn covers(&self, b: &Sets) -> bool {
        (!self.funneled || b.funneled) && self.fields.iter().zip(&b.fields).all(|(a, b)| subset(b, a))
    }
}

/// Whether `a` matches every packet that `b` matches.
pub fn covers(a: &Match, b: &Match) -> bool {
    a.family == b.family && a.proto == b.proto && Sets::of(a).covers(&Sets::of(b))
}

/// The rules of `rs` that can never match.
pub fn check(rs: &Ruleset, compiled: &Compiled) -> Report {
    let mut report = Report::default();
    // Earlier rules by family and protocol: only those can cover a rule.
    let mut by_slot: std::collections::HashMap<u32, Vec<(usize, Sets)>> = Default::default();
    let mut budget = MAX_COMPARISONS;
    for (j, rule) in rs.rules.iter().enumerate() {
        let m = &rule.matches;
        let slot = super::ast::slot(m.family, m.proto);
        let mut by = None;
        if report.stopped_at.is_none() {
            let earlier = by_slot.entry(slot).or_default();
            if (earlier.len() as u64) > budget {
                report.stopped_at = Some(j);
            } else {
                budget -= earlier.len() as u64;
                let sets = Sets::of(m);
                by = earlier.iter().find(|(_, a)| a.covers(&sets)).map(|(i, _)| *i);
                earlier.push((j, sets));
            }
        }
        if by.is_some() || compiled.entries_per_rule.get(j) == Some(&0) {
            report.shadowed.push(Shadowed { rule: j, by });
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ruleset::{compile, parse};

    fn shadowed(text: &str) -> Vec<Shadowed> {
        let rs = parse(text).unwrap();
        check(&rs, &compile(&rs).unwrap()).shadowed
    }

    #[test]
    fn a_wider_earlier_rule_shadows() {
        assert_eq!(shadowed("tcp accept; tcp dport 80 drop"), vec![Shadowed { rule: 1, by: Some(0) }]);
        assert_eq!(
            shadowed("tcp dport 1-100 accept; tcp dport { 5, 7-9 } daddr 10.1.0.0/16 drop"),
            vec![Shadowed { rule: 1, by: Some(0) }]
        );
        assert_eq!(
            shadowed("ip daddr 10.0.0.0/8 udp accept; udp daddr 10.2.3.4 sport 9 drop"),
            vec![Shadowed { rule: 1, by: Some(0) }]
        );
        // Negations: != 80 covers 81; != 10.0.0.0/8 covers 11.0.0.0/8.
        assert_eq!(shadowed("tcp dport != 80 accept; tcp dport 81 drop"), vec![Shadowed { rule: 1, by: Some(0) }]);
        assert_eq!(
            shadowed("tcp saddr != 10.0.0.0/8 accept; tcp saddr 11.0.0.0/8 drop"),
            vec![Shadowed { rule: 1, by: Some(0) }]
        );
        // Without `funneled` a rule covers the same rule with it.
        assert_eq!(shadowed("tcp dport 80 accept; tcp dport 80 funneled drop").len(), 1);
    }

    #[test]
    fn a_narrower_or_other_rule_does_not() {
        assert!(shadowed("tcp dport 80 accept; tcp drop").is_empty());
        assert!(shadowed("tcp accept; udp drop").is_empty());
        assert!(shadowed("tcp accept; ip6 tcp drop").is_empty());
        assert!(shadowed("tcp dport 80 funneled accept; tcp dport 80 drop").is_empty());
        assert!(shadowed("tcp dport != 80 accept; tcp dport 80-81 drop").is_empty());
        assert!(shadowed("tcp saddr 10.0.0.0/8 accept; tcp saddr 10.0.0.0/7 drop").is_empty());
        assert!(shadowed("tcp dport { 1, 3 } accept; tcp dport 1-3 drop").is_empty());
    }

    #[test]
    fn earlier_rules_together_shadow_by_their_classes() {
        // Neither covers the third alone; together they match its ports.
        let s = shadowed("tcp dport 1-85 accept; tcp dport 86-100 accept; tcp dport 80-90 drop");
        assert_eq!(s, vec![Shadowed { rule: 2, by: None }]);
    }

    #[test]
    fn complement_and_subset() {
        assert_eq!(complement(&vec![(0, 4), (9, 10)], 10), vec![(5, 8)]);
        assert_eq!(complement(&vec![], 10), vec![(0, 10)]);
        assert!(subset(&vec![(2, 3), (6, 6)], &vec![(0, 4), (6, 9)]));
        assert!(!subset(&vec![(2, 5)], &vec![(0, 4), (6, 9)]));
    }
}
