//! `ftvm ctl`: the client of a running VM's control API.

use crate::api::{self, Command};
use anyhow::{bail, Result};
use std::path::PathBuf;

/// Talk to a running VM through its control API socket (`ftvm run --api PATH`).
#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// The VM's API socket
    #[arg(long, value_name = "PATH")]
    pub api: PathBuf,
    #[command(subcommand)]
    pub verb: Verb,
}

#[derive(clap::Subcommand, Debug)]
pub enum Verb {
    /// Role, state, epoch, replication lag, protection, takeover... (JSON: vmm::status::Status)
    Status,
    /// Stop running the guest (its state stays in memory)
    Pause,
    /// Run the guest again after pause
    Resume,
    /// Save the VM's whole state to FILE (`ftvm restore FILE` continues it)
    Snapshot {
        /// Where to write the snapshot
        file: PathBuf,
    },
    /// Stop the VM
    Stop,
    /// The status as Prometheus metrics (text; `--metrics-listen` serves them over TCP)
    Metrics,
}

pub fn run(args: CtlArgs) -> Result<i32> {
    let command = match args.verb {
        Verb::Metrics => {
            print!("{}", api::metrics_text(&args.api)?);
            return Ok(0);
        }
        Verb::Status => Command::Status,
        Verb::Pause => Command::Pause,
        Verb::Resume => Command::Resume,
        Verb::Stop => Command::Stop,
        // The VM resolves a relative path against its own directory; make it ours.
        Verb::Snapshot { file } => Command::Snapshot { path: std::path::absolute(&file)? },
    };
    let reply = api::request(&args.api, &command)?;
    if reply.status != 200 {
        let message = reply.body.get("error").and_then(|e| e.as_str()).unwrap_or("unknown error");
        bail!("the VM refused: {message} (HTTP {})", reply.status);
    }
    println!("{}", serde_json::to_string_pretty(&reply.body)?);
    Ok(0)
}
