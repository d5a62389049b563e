//! Text → typed ruleset, with pest.  Syntax errors come from the grammar;
//! everything the grammar cannot say (a keyword given twice, a port out of
//! range, a prefix too long) is checked here, each at its own span.

use pest::error::{ErrorVariant, InputLocation};
use pest::iterators::Pair;
use pest::{Parser as _, Span};

use super::ast::{
    Action, AddrMatch, Family, IpNet, Ipv4Net, Ipv6Net, Match, PortMatch, PortSet, Proto, Rule, Ruleset, SourcePos,
};
use super::error::RulesetError;

mod grammar {
    #[derive(pest_derive::Parser)]
    #[grammar = "../grammar/sfunnel.pest"]
    pub struct Grammar;
}

use grammar::{Grammar, Rule as G};

/// Every keyword of the language, for "did you mean" suggestions.
const KEYWORDS: &[&str] = &[
    "ip", "ip6", "saddr", "daddr", "sport", "dport", "tcp", "udp", "funneled", "actions", "funnel", "unfunnel", "auto",
    "accept", "drop",
];

/// Parses a whole ruleset.  Either every rule is valid and returned, or the
/// first error in the text is.
pub fn parse(input: &str) -> Result<Ruleset, RulesetError> {
    parse_all(input).map_err(|mut errors| errors.swap_remove(0))
}

/// At most this many errors are reported for one ruleset.
pub const MAX_ERRORS: usize = 100;

/// Parses a whole ruleset.  Either every rule is valid and returned, or
/// every error found is, in the order of the text (at most [`MAX_ERRORS`]).
///
/// A syntax error ends pest's parse, so to find the next one the rule it
/// is in is blanked out (spaces, so every later offset stays where it
/// was) and the text parsed again; rules end at a newline or `;`.  Each
/// rule that parses is then built, and its own errors (a keyword twice, a
/// port out of range) collected.
pub fn parse_all(input: &str) -> Result<Ruleset, Vec<RulesetError>> {
    let mut errors = Vec::new();
    let mut text = std::borrow::Cow::Borrowed(input);
    let mut last_pos = None;
    let top = loop {
        match Grammar::parse(G::ruleset, &text) {
            Ok(mut pairs) => break pairs.next().expect("the grammar always yields a ruleset pair"),
            Err(e) => {
                let pos = match e.location {
                    InputLocation::Pos(p) => p,
                    InputLocation::Span((s, _)) => s,
                };
                // The same place again: blanking did not get past it.
                let again = last_pos == Some(pos);
                last_pos = Some(pos);
                if !again {
                    errors.push(syntax_error(input, e));
                }
                if again || errors.len() == MAX_ERRORS || !blank_rule_at(text.to_mut(), pos) {
                    return Err(sorted(input, errors));
                }
            }
        }
    };
    let mut rules = Vec::new();
    for pair in top.into_inner() {
        if pair.as_rule() == G::rule {
            // Offsets are the same in both: blanking keeps them.
            match build_rule(input, pair) {
                Ok(r) => rules.push(r),
                Err(e) => errors.push(e),
            }
        }
    }
    if errors.is_empty() {
        Ok(Ruleset { rules })
    } else {
        errors.truncate(MAX_ERRORS);
        Err(sorted(input, errors))
    }
}

/// Errors in the order of the text, each showing the original line.
fn sorted(input: &str, mut errors: Vec<RulesetError>) -> Vec<RulesetError> {
    errors.sort_by_key(|e| (e.line, e.col));
    for e in &mut errors {
        e.source_line = input.lines().nth(e.line - 1).unwrap_or("").trim_end_matches('\r').to_string();
    }
    errors
}

/// Replaces the rule around byte `pos` with spaces: from the separator
/// before it to the separator or comment after it (rules end at a newline
/// or `;`, a comment at the end of the line).  False when there is
/// nothing left to blank there.
fn blank_rule_at(text: &mut String, pos: usize) -> bool {
    let pos = pos.min(text.len());
    let line_start = text[..pos].rfind('\n').map_or(0, |i| i + 1);
    // An error past a comment (a rule with no action, found at the end of
    // the line) is in the rule before the comment: a `;` in the comment
    // separates nothing.
    let pos = text[line_start..pos].find('#').map_or(pos, |i| line_start + i);
    let start = text[line_start..pos].rfind(';').map_or(line_start, |i| line_start + i + 1);
    let end = text[pos..].find(['\n', ';', '#']).map_or(text.len(), |i| pos + i);
    if text[start..end].trim().is_empty() {
        return false;
    }
    // Multi-byte characters become as many spaces: offsets stay put.
    let blanks = " ".repeat(end - start);
    text.replace_range(start..end, &blanks);
    true
}

fn err(input: &str, span: Span<'_>, msg: impl Into<String>) -> RulesetError {
    RulesetError::at(input, span.start(), msg)
}

fn build_rule(input: &str, pair: Pair<'_, G>) -> Result<Rule, RulesetError> {
    let rule_span = pair.as_span();
    let (line, col) = pair.line_col();
    let mut family: Option<(Family, Span<'_>)> = None;
    let mut proto: Option<(Proto, Span<'_>)> = None;
    let mut saddr = None;
    let mut daddr = None;
    let mut sport = None;
    let mut dport = None;
    let mut funneled: Option<Span<'_>> = None;
    let mut actions: Vec<(Action, Span<'_>, &str)> = Vec::new();
    let mut addr_families: Vec<(Family, Span<'_>)> = Vec::new();

    for item in pair.into_inner() {
        let span = item.as_span();
        match item.as_rule() {
            G::family => {
                let f = if item.as_str() == "ip6" { Family::Ip6 } else { Family::Ip };
                if let Some((prev, _)) = family.replace((f, span)) {
                    let msg = if prev == f {
                        format!("`{f}` given twice")
                    } else {
                        format!("`{f}` after `{prev}`: a rule matches one family, IPv4 (`ip`) or IPv6 (`ip6`)")
                    };
                    return Err(err(input, span, msg));
                }
            }
            G::l4_proto => {
                let p = build_proto(&item);
                if let Some((prev, _)) = proto {
                    let msg = if prev == p {
                        format!("`{p}` given twice")
                    } else {
                        format!("`{p}` after `{prev}`: a rule matches exactly one of tcp or udp")
                    };
                    return Err(err(input, span, msg));
                }
                proto = Some((p, span));
            }
            G::addr_match => {
                let mut inner = item.into_inner();
                let field = inner.next().expect("addr_match has a field");
                let (negated, net_pair) = negation(&mut inner);
                let net_span = net_pair.as_span();
                let m = AddrMatch { negated, net: build_net(input, net_pair)? };
                addr_families.push((m.net.family(), net_span));
                let slot = if field.as_str() == "saddr" { &mut saddr } else { &mut daddr };
                set_once(input, slot, m, field.as_span(), field.as_str())?;
            }
            G::port_match => {
                let mut inner = item.into_inner();
                let field = inner.next().expect("port_match has a field");
                let (negated, spec) = negation(&mut inner);
                let m = PortMatch { negated, ports: build_ports(input, spec)? };
                let slot = if field.as_str() == "sport" { &mut sport } else { &mut dport };
                set_once(input, slot, m, field.as_span(), field.as_str())?;
            }
            G::funneled => {
                if funneled.replace(span).is_some() {
                    return Err(err(input, span, "`funneled` given twice"));
                }
            }
            G::kw_actions => {}
            G::funnel => actions.push((build_funnel(input, item)?, span, "funnel")),
            G::unfunnel => {
                let inner = item.into_inner().nth(1).expect("unfunnel has an inner protocol");
                let a = match inner.as_str() {
                    "auto" => Action::UnfunnelAuto,
                    _ => Action::Unfunnel { proto: build_proto(&inner) },
                };
                actions.push((a, span, "unfunnel"));
            }
            G::accept => actions.push((Action::Accept, span, "accept")),
            G::drop => actions.push((Action::Drop, span, "drop")),
            other => unreachable!("grammar produced {other:?} inside a rule"),
        }
    }

    let Some((proto, _)) = proto else {
        if let Some(span) = funneled {
            return Err(err(
                input,
                span,
                "`funneled` needs `tcp` or `udp`: it tests the funnel header of that protocol",
            ));
        }
        return Err(err(input, rule_span, "a rule needs `tcp` or `udp`: which protocol does it match?"));
    };
    let action = match actions.as_slice() {
        [(a, _, _)] => *a,
        [] => unreachable!("the grammar requires an action"),
        many => {
            // Point at the standalone action if there is one, else the second.
            let (_, span, word) =
                many.iter().find(|(a, _, _)| matches!(a, Action::Accept | Action::Drop)).copied().unwrap_or(many[1]);
            let msg = if word == "accept" || word == "drop" {
                format!("`{word}` cannot be combined with other actions")
            } else {
                "a rule takes one action: `funnel` and `unfunnel` cannot be combined".to_string()
            };
            return Err(err(input, span, msg));
        }
    };
    let family = rule_family(input, family, &addr_families)?;
    let funneled = funneled.is_some();
    Ok(Rule {
        matches: Match { family, saddr, daddr, proto, sport, dport, funneled },
        action,
        pos: SourcePos { line, col },
    })
}

/// A rule's family: its `ip`/`ip6` word, else that of its addresses, else
/// IPv4 (as in 0.0.11).  Every address must be of that family.
fn rule_family(
    input: &str,
    word: Option<(Family, Span<'_>)>,
    addrs: &[(Family, Span<'_>)],
) -> Result<Family, RulesetError> {
    let family = word.map(|(f, _)| f).or(addrs.first().map(|(f, _)| *f)).unwrap_or_default();
    for (f, span) in addrs {
        if *f != family {
            let (this, other) = match f {
                Family::Ip => ("an IPv4", "`ip6` rule matches IPv6 packets only"),
                Family::Ip6 => ("an IPv6", "`ip` rule matches IPv4 packets only"),
            };
            let msg = match word {
                Some(_) => format!("`{}` is {this} address, but this {other}", span.as_str()),
                None => format!(
                    "`{}` is {this} address, but this rule's first address is not: a rule matches one family; write two rules",
                    span.as_str()
                ),
            };
            return Err(err(input, *span, msg));
        }
    }
    Ok(family)
}

fn set_once<T>(input: &str, slot: &mut Option<T>, value: T, span: Span<'_>, word: &str) -> Result<(), RulesetError> {
    if slot.is_some() {
        return Err(err(input, span, format!("`{word}` given twice")));
    }
    *slot = Some(value);
    Ok(())
}

fn negation<'i>(inner: &mut pest::iterators::Pairs<'i, G>) -> (bool, Pair<'i, G>) {
    let next = inner.next().expect("a match has a value");
    if next.as_rule() == G::neq {
        (true, inner.next().expect("`!=` is followed by a value"))
    } else {
        (false, next)
    }
}

fn build_proto(pair: &Pair<'_, G>) -> Proto {
    match pair.as_str() {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        other => unreachable!("l4_proto matched {other:?}"),
    }
}

fn build_funnel(input: &str, pair: Pair<'_, G>) -> Result<Action, RulesetError> {
    let span = pair.as_span();
    let mut inner = pair.into_inner();
    let _kw = inner.next();
    let proto = build_proto(&inner.next().expect("funnel has a protocol"));
    let (mut sport, mut dport) = (None, None);
    for fp in inner {
        let mut parts = fp.into_inner();
        let field = parts.next().expect("funnel_port has a field");
        let port = build_port(input, parts.next().expect("funnel_port has a port"))?;
        let slot = if field.as_str() == "sport" { &mut sport } else { &mut dport };
        set_once(input, slot, port, field.as_span(), field.as_str())?;
    }
    match (sport, dport) {
        (Some(sport), Some(dport)) => Ok(Action::Funnel { proto, sport, dport }),
        _ => Err(err(input, span, "`funnel` needs both sport and dport, e.g. `funnel tcp sport 540 dport 80`")),
    }
}

fn build_port(input: &str, pair: Pair<'_, G>) -> Result<u16, RulesetError> {
    let text = pair.as_str();
    match text.parse::<u32>() {
        Ok(n @ 1..=65535) => Ok(n as u16),
        _ => Err(err(input, pair.as_span(), format!("port {text} is out of range: expected a port number (1-65535)"))),
    }
}

fn build_ports(input: &str, spec: Pair<'_, G>) -> Result<PortSet, RulesetError> {
    let items: Vec<Pair<'_, G>> = match spec.as_rule() {
        G::port_set => spec.into_inner().collect(),
        _ => vec![spec],
    };
    let mut ranges = Vec::with_capacity(items.len());
    for item in items {
        match item.as_rule() {
            G::port => {
                let p = build_port(input, item)?;
                ranges.push((p, p));
            }
            G::port_range => {
                let span = item.as_span();
                let mut ends = item.into_inner();
                let lo = build_port(input, ends.next().expect("range start"))?;
                let hi = build_port(input, ends.next().expect("range end"))?;
                if lo > hi {
                    return Err(err(input, span, format!("range {lo}-{hi} is empty: its start is after its end")));
                }
                ranges.push((lo, hi));
            }
            other => unreachable!("port set item {other:?}"),
        }
    }
    Ok(PortSet::new(ranges))
}

fn build_net(input: &str, pair: Pair<'_, G>) -> Result<IpNet, RulesetError> {
    if pair.as_rule() == G::ipv6_net {
        return build_net6(input, pair).map(IpNet::V6);
    }
    let mut inner = pair.into_inner();
    let ip = inner.next().expect("ipv4_net has an address");
    let mut addr: u32 = 0;
    for octet in ip.into_inner() {
        let text = octet.as_str();
        match text.parse::<u8>() {
            Ok(b) if text.len() <= 3 => addr = addr << 8 | u32::from(b),
            _ => return Err(err(input, octet.as_span(), format!("`{text}` is not an address byte (0-255)"))),
        }
    }
    let len = match inner.next() {
        None => 32,
        Some(p) => match p.as_str().parse::<u32>() {
            Ok(n @ 0..=32) => n as u8,
            Ok(n) => return Err(err(input, p.as_span(), format!("prefix length {n} is longer than 32"))),
            Err(_) => return Err(err(input, p.as_span(), format!("prefix length {} is longer than 32", p.as_str()))),
        },
    };
    Ok(IpNet::V4(Ipv4Net::new(addr, len)))
}

fn build_net6(input: &str, pair: Pair<'_, G>) -> Result<Ipv6Net, RulesetError> {
    let mut inner = pair.into_inner();
    let ip = inner.next().expect("ipv6_net has an address");
    let text = ip.as_str();
    let addr: std::net::Ipv6Addr = text.parse().map_err(|_| {
        err(input, ip.as_span(), format!("`{text}` is not an IPv6 address (like 2001:db8::1 or fd00::/8)"))
    })?;
    let len = match inner.next() {
        None => 128,
        Some(p) => match p.as_str().parse::<u32>() {
            Ok(n @ 0..=128) => n as u8,
            _ => return Err(err(input, p.as_span(), format!("prefix length {} is longer than 128", p.as_str()))),
        },
    };
    Ok(Ipv6Net::new(u128::from(addr), len))
}

const MATCH_WORDS: &str = "a match (ip, ip6, saddr, daddr, tcp, udp, sport, dport, funneled)";

/// What a grammar rule means to a user, for "expected …" messages.
fn describe(r: G) -> &'static str {
    match r {
        G::port | G::port_set | G::port_range | G::funnel_port => "a port number (1-65535)",
        G::ipv4_net | G::ipv4 | G::octet | G::ipv6_net | G::ipv6 => {
            "an address or prefix (like 10.0.0.0/8 or fd00::/8)"
        }
        G::prefix_len => "a prefix length (0-32, or 0-128 for IPv6)",
        G::neq => "`!=`",
        G::family
        | G::kw_ip
        | G::kw_ip6
        | G::addr_match
        | G::addr_field
        | G::kw_saddr
        | G::kw_daddr
        | G::port_match
        | G::port_field
        | G::kw_sport
        | G::kw_dport
        | G::funneled
        | G::kw_funneled => MATCH_WORDS,
        G::l4_proto | G::kw_tcp | G::kw_udp => "`tcp` or `udp`",
        G::inner_proto | G::kw_auto => "`tcp`, `udp` or `auto`",
        G::kw_actions => "`actions`",
        G::funnel | G::unfunnel | G::accept | G::drop | G::kw_funnel | G::kw_unfunnel | G::kw_accept | G::kw_drop => {
            "an action (funnel, unfunnel, accept, drop)"
        }
        G::rule => "a rule",
        G::EOI => "the end of the rule",
        _ => "more input",
    }
}

fn is_keyword_rule(r: G) -> bool {
    !matches!(
        r,
        G::port
            | G::port_set
            | G::port_range
            | G::ipv4_net
            | G::ipv4
            | G::ipv6_net
            | G::ipv6
            | G::octet
            | G::prefix_len
            | G::neq
            | G::EOI
    )
}

/// The word (or single character) at `pos`, for "found …".
fn token_at(input: &str, pos: usize) -> &str {
    let rest = &input[pos..];
    if rest.starts_with(|c: char| c.is_ascii_digit()) {
        let n = rest.find(|c: char| !(c.is_ascii_hexdigit() || c == '.' || c == '/' || c == ':')).unwrap_or(rest.len());
        return &rest[..n];
    }
    let word_len = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
    if word_len > 0 {
        &rest[..word_len]
    } else {
        rest.chars().next().map_or("", |c| &rest[..c.len_utf8()])
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn syntax_error(input: &str, e: pest::error::Error<G>) -> RulesetError {
    let pos = match e.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((s, _)) => s,
    };
    let positives = match &e.variant {
        ErrorVariant::ParsingError { positives, .. } => positives.clone(),
        ErrorVariant::CustomError { .. } => Vec::new(),
    };
    let found = token_at(input, pos);
    let is_word = found.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');

    if is_word && !KEYWORDS.contains(&found) && (positives.is_empty() || positives.iter().any(|r| is_keyword_rule(*r)))
    {
        let best =
            KEYWORDS.iter().map(|k| (edit_distance(found, k), *k)).filter(|(d, k)| *d <= 2 && *d < k.len()).min();
        let msg = match best {
            Some((_, k)) => format!("unknown word `{found}`; did you mean `{k}`?"),
            None => format!(
                "unknown word `{found}`; rules are made of matches (ip, ip6, saddr, daddr, tcp, udp, sport, dport, funneled) and actions (funnel, unfunnel, accept, drop)"
            ),
        };
        return RulesetError::at(input, pos, msg);
    }

    let at_end = matches!(found, "" | "\n" | ";") || found.starts_with('#');
    if at_end && positives.iter().any(|r| matches!(r, G::funnel | G::unfunnel | G::accept | G::drop | G::kw_funnel)) {
        // Point just after the rule's last word, not past a comment.
        let line_start = input[..pos].rfind('\n').map_or(0, |i| i + 1);
        let code = input[line_start..pos].split('#').next().unwrap_or("");
        let end = line_start + code.trim_end().len();
        return RulesetError::at(
            input,
            end,
            "this rule has no action: end it with `actions` and one of funnel, unfunnel, accept or drop",
        );
    }
    // A value is what is missing: `!=` would only be noise.
    let wants_value = positives.iter().any(|r| {
        matches!(r, G::port | G::port_set | G::port_range | G::ipv4_net | G::ipv4 | G::ipv6_net | G::ipv6 | G::octet)
    });
    let mut wanted: Vec<&str> = Vec::new();
    for r in positives.iter().filter(|r| !(wants_value && **r == G::neq)) {
        let d = describe(*r);
        if !wanted.contains(&d) {
            wanted.push(d);
        }
    }
    // "a match" already names tcp and udp.
    if wanted.contains(&MATCH_WORDS) {
        wanted.retain(|w| *w != "`tcp` or `udp`");
    }
    let expected = match wanted.as_slice() {
        [] => "something else".to_string(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {}", init.join(", "), last),
    };
    let found = match found {
        "" => "the end of the input".to_string(),
        "\n" => "the end of the line".to_string(),
        " " | "\t" => "a space".to_string(),
        t => format!("`{t}`"),
    };
    RulesetError::at(input, pos, format!("expected {expected}, found {found}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("dprot", "dport"), 2);
        assert_eq!(edit_distance("sport", "sport"), 0);
        assert_eq!(edit_distance("spor", "sport"), 1);
    }

    #[test]
    fn token_at_takes_a_word_or_one_char() {
        assert_eq!(token_at("tcp dport", 4), "dport");
        assert_eq!(token_at("a {", 2), "{");
        assert_eq!(token_at("x", 1), "");
    }
}
