//! `ftvm snapshot` (save a running VM through its control API) and `ftvm restore`
//! (continue a VM from a snapshot file, with the same device options as `run`).

use crate::api::{self, Command};
use crate::run_cmd::{machine_config, open_tap, record_options, run_driver, Attach, RecordArgs, VmArgs};
use anyhow::{bail, Result};
use std::path::PathBuf;
use vmm::driver::Driver;

/// Save the whole state of a running VM to a file, through its control API.
#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// The running VM's API socket (`ftvm run --api PATH`)
    #[arg(long, value_name = "PATH")]
    pub api: PathBuf,
    /// Where to write the snapshot
    pub file: PathBuf,
}

pub fn snapshot(args: SnapshotArgs) -> Result<i32> {
    let path = std::path::absolute(&args.file)?;
    let reply = api::request(&args.api, &Command::Snapshot { path: path.clone() })?;
    if reply.status != 200 {
        let message = reply.body.get("error").and_then(|e| e.as_str()).unwrap_or("unknown error");
        bail!("the VM refused: {message} (HTTP {})", reply.status);
    }
    eprintln!(
        "ftvm: snapshot of icount {} written to {} ({} bytes, guest paused {:.1} ms)",
        reply.body["icount"],
        path.display(),
        reply.body["bytes"],
        reply.body["pause_ms"].as_f64().unwrap_or(0.0)
    );
    Ok(0)
}

/// Continue a VM from a snapshot file. Give the same device options as the VM had
/// (--mem, --disk, --net/--mac): the snapshot's disk contents are written into --disk.
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The snapshot file (`ftvm snapshot`)
    pub file: PathBuf,
    #[command(flatten)]
    pub vm: VmArgs,
    /// `--record FILE`: the log starts from the snapshot's state (its first record), so
    /// that `ftvm replay FILE` restores it and replays what followed
    #[command(flatten)]
    pub record: RecordArgs,
    /// Only print what the snapshot holds
    #[arg(long)]
    pub info: bool,
}

pub fn restore(args: RestoreArgs) -> Result<i32> {
    if let Some(log) = &args.record.record {
        vmm::record::refuse_overwriting(log, &[("snapshot", &args.file)])?;
    }
    let info = machine::snapshot::read_header_from_path(&args.file)?;
    if args.info {
        println!(
            "format version {}\nicount {}\nRAM {} bytes ({} pages saved)\ndisk {}\nnetwork card {}\nmachine digest {}",
            info.format_version,
            info.icount,
            info.ram_bytes,
            info.ram_pages_saved,
            info.disk.as_ref().map_or("none".to_string(), |d| format!("{d:?}")),
            info.net_mac.map_or("none".to_string(), |m| m
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")),
            info.machine_digest
        );
        return Ok(0);
    }
    let config = machine_config(&args.vm, &[])?;
    let tap = open_tap(&args.vm)?;
    // The snapshot's errors name the file.
    let machine = machine::snapshot::load_from_path(&args.file, &config)?;
    eprintln!("ftvm: restored {} at icount {}", args.file.display(), machine.icount());
    let recording = match &args.record.record {
        Some(path) => {
            let options = record_options(&args.record, &args.vm, path)?;
            Some(vmm::record::Recording::start_from(&config, &machine, &options)?)
        }
        None => None,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let _metrics = crate::metrics_http::bind(&args.vm, &tx)?;
    let mut driver = Driver::new(machine, rx, args.vm.clock.into());
    if let Some(recording) = recording {
        driver.add_observer(Box::new(recording));
    }
    run_driver(driver, &args.vm, tap, tx, &[], false, Attach::Now)
}
