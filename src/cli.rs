//! Command-line types (clap derive).  The original container's environment
//! interface maps onto the same types: each flag falls back to its
//! variable, and main.rs runs `load` (or `unload` with CLEAN=1) when no
//! verb is given.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

pub use crate::datapath::OverMtu;
pub use crate::detour::DetourReturn;
pub use crate::spread::DetourCpus;

use crate::attach::{AttachChoice, Direction};

/// Where rules come from when none are given: the original container's
/// default file.
pub const DEFAULT_RULESET_FILE: &str = "/etc/sfunnel/ruleset";

#[derive(Debug, Parser)]
#[command(name = "sfunnel", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Parse and compile a ruleset, and print it in canonical form with the
    /// map entries each rule compiles to.  Exit status 0: valid; 2: invalid.
    Check(CheckArgs),
    /// Load a ruleset onto interfaces, or update it in place where sfunnel
    /// is already attached (same program, no detach).  Exit status 2: the
    /// ruleset is invalid and nothing was changed.
    Load(LoadArgs),
    /// Detach from interfaces and remove everything sfunnel pinned for them.
    Unload(UnloadArgs),
    /// Show every attachment sfunnel manages, with per-rule counters.
    /// Exit status 3: something could not be read (each is listed).
    Status(StatusArgs),
    /// Print the counters of every attachment in Prometheus's text format,
    /// once (for node_exporter's textfile collector), or serve them over
    /// HTTP with --listen.  Exit status 3: something could not be read.
    Metrics(MetricsArgs),
    /// Remove what sfunnel keeps for attachments the kernel shows dead (a
    /// TCX link whose interface is gone, with a pod's namespace, say).
    /// Every load and unload does the same first.
    Gc(GcArgs),
    /// Build throwaway namespaces, funnel UDP and TCP through them, show
    /// what happened, and remove everything.  Needs root.
    Demo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DirectionArg {
    Ingress,
    Egress,
    Both,
}

impl DirectionArg {
    pub fn directions(self) -> Vec<Direction> {
        match self {
            DirectionArg::Ingress => vec![Direction::Ingress],
            DirectionArg::Egress => vec![Direction::Egress],
            DirectionArg::Both => vec![Direction::Ingress, Direction::Egress],
        }
    }
}

/// Where to act.  Each flag falls back to the original container's
/// environment variable; a flag wins over its variable.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// An interface; repeat for more.  Default: every interface in the
    /// namespace.
    #[arg(short, long = "iface", value_name = "IFACE", env = "IFACES", value_delimiter = ' ')]
    pub ifaces: Vec<String>,

    /// Which hook: ingress, egress or both.  Default: ingress for `load`
    /// (and for the environment interface), both for `unload`.
    #[arg(short, long, value_enum, env = "DIRECTION")]
    pub direction: Option<DirectionArg>,

    /// A named network namespace (/var/run/netns/NAME) or a path to one.
    #[arg(short, long, env = "NETNS")]
    pub netns: Option<String>,

    /// Log what is attached, pinned and updated (one `key=value` line per
    /// event on stderr).  $DEBUG takes 1/0, true/false, yes/no, on/off.
    #[arg(short, long, env = "DEBUG", value_parser = clap::builder::BoolishValueParser::new())]
    pub verbose: bool,

    #[command(flatten)]
    pub lock: LockArgs,
}

/// A number of seconds, from 0 to a day: more is a usage error, not a
/// panic when it becomes a `Duration`.
fn seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("{e}: give seconds, such as 3 or 0.5"))?;
    if (0.0..=86_400.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 86400 seconds"))
    }
}

/// How long to wait for another sfunnel on the node.
#[derive(Debug, Args)]
pub struct LockArgs {
    /// Seconds to wait for the lock that every sfunnel on the node shares
    /// (another load, unload or gc holds it), before giving up with an
    /// error that names who holds it.
    #[arg(long, env = "SFUNNEL_LOCK_TIMEOUT", value_name = "SECONDS", default_value_t = 30.0, value_parser = seconds)]
    pub lock_timeout: f64,
}

impl LockArgs {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.lock_timeout.max(0.0))
    }
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    #[command(flatten)]
    pub source: RulesSource,

    #[command(flatten)]
    pub target: TargetArgs,

    /// How to hook in: TCX if the kernel has it, else clsact.
    #[arg(long, value_enum, default_value = "auto")]
    pub attach: AttachChoice,

    /// Tries at finding an interface that does not exist yet.
    #[arg(long, env = "N_ATTEMPTS", default_value_t = 6)]
    pub attempts: u32,

    /// Seconds between those tries.
    #[arg(long, env = "RETRY_DELAY", default_value_t = 3.0, value_parser = seconds)]
    pub retry_delay: f64,

    /// A packet that funneled would exceed the MTU: `drop` it (telling a
    /// sender that set DF the MTU that fits, by ICMP "fragmentation
    /// needed"), or `pass` it on unfunneled.  Counted per rule either way.
    #[arg(long, value_enum, env = "OVER_MTU", default_value = "drop")]
    pub over_mtu: OverMtu,

    /// How funneled segments leave the segmentation detour on egress:
    /// `auto` goes straight into a veth's peer where the interface's
    /// transmit path would change nothing (no qdisc, tx checksumming on),
    /// and out of the interface elsewhere; `transmit` always goes out of
    /// the interface, so that its counters, tcpdump and later tc programs
    /// see the segments.
    #[arg(long, value_enum, env = "DETOUR_RETURN", default_value = "auto")]
    pub detour_return: DetourReturn,

    /// The CPUs that funnel the detour's segments: `all` (the online
    /// ones, a flow to each by its hash, with receive packet steering on
    /// the helper), `sender` (the CPU that sent them), or a list such as
    /// 0-3,8.  Spreading lets the sending CPU go on sending.
    #[arg(long, env = "DETOUR_CPUS", default_value = "all")]
    pub detour_cpus: DetourCpus,
}

impl LoadArgs {
    pub fn retry_delay(&self) -> Duration {
        Duration::from_secs_f64(self.retry_delay.max(0.0))
    }
}

#[derive(Debug, Args)]
pub struct UnloadArgs {
    #[command(flatten)]
    pub target: TargetArgs,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Only say what would be removed.
    #[arg(long)]
    pub dry_run: bool,

    #[command(flatten)]
    pub lock: LockArgs,
}

/// Which attachments `status` and `metrics` show.
#[derive(Debug, Clone, Args)]
pub struct Filter {
    /// Only attachments on this interface; repeat for more.
    #[arg(short, long = "iface", value_name = "IFACE")]
    pub ifaces: Vec<String>,

    /// Only attachments in this namespace: a name (/var/run/netns/NAME), a
    /// path to one, or its cookie as `status` prints it.
    #[arg(short, long, value_name = "NETNS")]
    pub netns: Option<String>,

    /// Only attachments on this hook.
    #[arg(short, long, value_enum)]
    pub direction: Option<crate::attach::Direction>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON (the document `"schema": 1`, see docs/operations.md).
    #[arg(long)]
    pub json: bool,

    /// Print again every this many seconds, until interrupted; with
    /// --json, one compact document per line (JSON Lines).
    #[arg(long, value_name = "SECONDS", value_parser = seconds)]
    pub interval: Option<f64>,

    #[command(flatten)]
    pub filter: Filter,
}

#[derive(Debug, Args)]
pub struct MetricsArgs {
    /// Serve the metrics at http://ADDR/metrics until stopped, instead of
    /// printing them once; e.g. 127.0.0.1:9469 or [::]:9469.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,

    #[command(flatten)]
    pub filter: Filter,
}

#[derive(Debug, Args)]
pub struct RulesSource {
    /// The rules themselves (newline- or `;`-separated).  Takes precedence
    /// over --file, $SFUNNEL_RULESET and /etc/sfunnel/ruleset, in that order.
    pub rules: Option<String>,

    /// Read the rules from this file.
    #[arg(short, long, value_name = "FILE")]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub source: RulesSource,

    /// Print JSON (the document `"schema": 1`, see docs/operations.md).
    #[arg(long)]
    pub json: bool,

    /// Fail (exit status 2) on warnings too: a rule that earlier rules
    /// shadow completely, so that it can never match.
    #[arg(long)]
    pub strict: bool,
}

/// The original container's environment variables, and ours.
pub const ENV_VARS: &[&str] = &[
    "SFUNNEL_RULESET",
    "IFACES",
    "DIRECTION",
    "NETNS",
    "CLEAN",
    "DEBUG",
    "N_ATTEMPTS",
    "RETRY_DELAY",
    "OVER_MTU",
    "DETOUR_RETURN",
    "DETOUR_CPUS",
    "SFUNNEL_LOCK_TIMEOUT",
    "SFUNNEL_BPFFS",
];

/// Reads the environment as 0.0.11's entrypoint did (`${VAR:-default}`):
/// a variable set to the empty string is unset.  IFACES is a list split on
/// any whitespace (blanks alone: unset, every interface).  Any other value
/// is taken as it is, so `DIRECTION=" "` is a usage error, and
/// `SFUNNEL_RULESET=" "` a ruleset with no rules.  Called once at start,
/// before any thread exists.
pub fn normalize_env() {
    for var in ENV_VARS {
        let Some(v) = std::env::var_os(var) else { continue };
        if *var == "IFACES" {
            let list = v.to_string_lossy().split_whitespace().collect::<Vec<_>>().join(" ");
            if list.is_empty() {
                std::env::remove_var(var);
            } else {
                std::env::set_var(var, list);
            }
        } else if v.is_empty() {
            std::env::remove_var(var);
        }
    }
}

/// The start-up banner of the environment interface (`kubectl logs` of
/// the init container): version, kernel, the verb and attach mode, and
/// every variable it read.
pub fn banner(verb: &str) -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or("?".into(), |k| k.trim().to_string());
    let attach = if crate::attach::tcx::supported(1) {
        "tcx"
    } else {
        "clsact (the kernel did not answer a TCX query: before 6.6, or no privileges)"
    };
    let mut line = format!(
        "sfunnel {} (layout {}): {verb} from the environment; kernel {kernel}; attach {attach}; environment:",
        env!("CARGO_PKG_VERSION"),
        crate::datapath::consts::SFUNNEL_ABI_VERSION
    );
    let mut any = false;
    for var in ENV_VARS {
        if let Ok(v) = std::env::var(var) {
            let v = if *var == "SFUNNEL_RULESET" { format!("<{} rule lines>", v.lines().count()) } else { v };
            line.push_str(&format!(" {var}={v:?}"));
            any = true;
        }
    }
    if !any {
        line.push_str(" none set (defaults)");
    }
    line
}

/// A ruleset's text and where it came from (for messages).
#[derive(Debug, Clone)]
pub struct RulesText {
    pub text: String,
    pub origin: String,
}

impl RulesSource {
    /// The rules by precedence: argument, --file, $SFUNNEL_RULESET, the
    /// default file.  `None` when there are none anywhere.
    pub fn resolve(&self) -> Result<Option<RulesText>> {
        if let Some(text) = &self.rules {
            return Ok(Some(RulesText { text: text.clone(), origin: "the command line".into() }));
        }
        if let Some(path) = &self.file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the ruleset file {}", path.display()))?;
            return Ok(Some(RulesText { text, origin: path.display().to_string() }));
        }
        if let Ok(text) = std::env::var("SFUNNEL_RULESET") {
            return Ok(Some(RulesText { text, origin: "$SFUNNEL_RULESET".into() }));
        }
        match std::fs::read_to_string(DEFAULT_RULESET_FILE) {
            Ok(text) => Ok(Some(RulesText { text, origin: DEFAULT_RULESET_FILE.into() })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {DEFAULT_RULESET_FILE}")),
        }
    }
}
