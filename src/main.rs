//! The sfunnel binary: parse the command line, run one verb.

use std::process::ExitCode;

use clap::Parser;
use sfunnel::cli::{Cli, Command};
use sfunnel::cmd;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Some(Command::Check(args)) => cmd::check::run(args),
        None => {
            eprintln!("error: no verb given; see `sfunnel --help`");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(outcome) => ExitCode::from(outcome as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
