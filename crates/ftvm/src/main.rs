//! ftvm: the command-line front of the fault-tolerant virtual machine monitor.
//! Each subcommand lives in its own module; this file only dispatches.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ftvm", version, about = "A fault-tolerant virtual machine monitor", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {}
}
