//! The sfunnel binary: parse the command line, run one verb.  With no verb
//! it behaves like the original container: `load` from the environment, or
//! `unload` when CLEAN=1.

use std::process::ExitCode;

use clap::Parser;
use sfunnel::cli::{Cli, Command};
use sfunnel::cmd;

fn main() -> ExitCode {
    sfunnel::log::route_libbpf();
    let cli = Cli::parse();
    let command = match cli.command {
        Some(c) => c,
        None => {
            // The container interface: every setting comes from the
            // environment, read by the same flags' `env` fallbacks.
            let verb = if std::env::var("CLEAN").is_ok_and(|v| v == "1") { "unload" } else { "load" };
            match Cli::try_parse_from(["sfunnel", verb]) {
                Ok(Cli { command: Some(c) }) => c,
                Ok(_) => unreachable!("a verb was given"),
                Err(e) => e.exit(),
            }
        }
    };
    let result = match &command {
        Command::Check(args) => cmd::check::run(args),
        Command::Load(args) => cmd::load::load(args),
        Command::Unload(args) => cmd::load::unload(args),
        Command::Status(args) => cmd::status::run(args),
        Command::Gc(args) => cmd::load::gc(args),
        Command::Demo => cmd::demo::run(),
    };
    match result {
        Ok(outcome) => ExitCode::from(outcome as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
