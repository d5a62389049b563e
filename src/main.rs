//! The sfunnel binary: parse the command line, run one verb.  With no verb
//! it behaves like the original container: `load` from the environment, or
//! `unload` when CLEAN=1.

use std::process::ExitCode;

use clap::Parser;
use sfunnel::cli::{Cli, Command};
use sfunnel::cmd;

/// Exits on a usage error with [`cmd::USAGE`]; help and version exit 0.
fn usage(e: clap::Error) -> ! {
    let _ = e.print();
    std::process::exit(if e.use_stderr() { i32::from(cmd::USAGE) } else { 0 })
}

fn main() -> ExitCode {
    sfunnel::log::route_libbpf();
    sfunnel::cli::normalize_env();
    let cli = Cli::try_parse().unwrap_or_else(|e| usage(e));
    let command = match cli.command {
        Some(c) => c,
        None => {
            // The container interface: every setting comes from the
            // environment, read by the same flags' `env` fallbacks.
            let verb = if std::env::var("CLEAN").is_ok_and(|v| v == "1") { "unload" } else { "load" };
            sfunnel::output::err_line(format_args!("{}", sfunnel::cli::banner(verb)));
            let mut argv = vec!["sfunnel", verb];
            // 0.0.11's CLEAN=1 removed the ingress attachment unless told.
            if verb == "unload" && std::env::var_os("DIRECTION").is_none() {
                argv.extend(["--direction", "ingress"]);
            }
            match Cli::try_parse_from(argv) {
                Ok(Cli { command: Some(c) }) => c,
                Ok(_) => unreachable!("a verb was given"),
                Err(e) => usage(e),
            }
        }
    };
    let result = match &command {
        Command::Check(args) => cmd::check::run(args),
        Command::Load(args) => cmd::load::load(args),
        Command::Unload(args) => cmd::load::unload(args),
        Command::Status(args) => cmd::status::run(args),
        Command::Metrics(args) => cmd::metrics::run(args),
        Command::Gc(args) => cmd::load::gc(args),
        Command::Demo => cmd::demo::run(),
    };
    match result {
        Ok(outcome) => ExitCode::from(outcome as u8),
        Err(e) => {
            sfunnel::output::err_line(format_args!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}
