//! `cargo bench --bench rules`: parse and compile time by ruleset size.
//!
//! The baseline column splits the same text into whitespace-separated
//! words, the least any parser must do; the ratio is what our grammar,
//! checks and compilation cost on top.  Target: 100,000 rules in ≤ 1 s.

mod common;

use std::hint::black_box;

use sfunnel::ruleset::{compile, parse};

const REAL: &[&str] =
    &["udp dport 4739 actions funnel tcp sport 540 dport 179", "tcp sport 540 dport 179 actions unfunnel udp"];

fn main() {
    println!("parse + compile (median of runs; ms)");
    println!(
        "{:>8} {:>9} {:>9} {:>9} {:>9} {:>10} {:>11} {:>9}",
        "rules", "entries", "parse", "compile", "total", "us/rule", "baseline", "ratio"
    );
    for n in [10usize, 10_000, 100_000] {
        let text = common::ruleset_with_decoys(n, REAL);
        let runs = if n >= 100_000 { 5 } else { 11 };
        let rs = parse(&text).expect("the generated ruleset is valid");
        let entries = compile(&rs).expect("compiles").rules.len();
        let parse_s = common::median_secs(runs, || {
            black_box(parse(black_box(&text)).unwrap());
        });
        let compile_s = common::median_secs(runs, || {
            black_box(compile(black_box(&rs)).unwrap());
        });
        let base_s = common::median_secs(runs, || {
            black_box(black_box(&text).split_whitespace().count());
        });
        let total = parse_s + compile_s;
        println!(
            "{:>8} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>10.2} {:>11.3} {:>8.0}x",
            n,
            entries,
            parse_s * 1e3,
            compile_s * 1e3,
            total * 1e3,
            total * 1e6 / n as f64,
            base_s * 1e3,
            total / base_s
        );
    }
}
