//! `ftvm replay FILE`: rebuild the machine a log was recorded from (its images checked by
//! digest, the disk's start contents under a copy-on-write overlay), feed it the log's
//! inputs at their instruction counts and check every digest. No TAP, no terminal, no
//! waiting: idle time passes at once. With `--until`, stop at an instruction count,
//! starting from the last snapshot in the log before it.

use crate::run_cmd::CpuArg;
use anyhow::{bail, Context, Result};
use journal::replay::{Replayer, Step};
use journal::{JournalError, LogReader, Record, Section, Start};
use machine::{Machine, MachineConfig, OutputKind};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Replay a recorded run (`ftvm run --record FILE`) and check that it runs the same.
///
/// Exits 0 when every digest in the log matched up to its end (or --until); a divergence,
/// a damaged log or other images is one line `ftvm: error: ...` and status 125.
#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// The input log
    pub file: PathBuf,
    /// Stop at this instruction count (from the log's last snapshot before it, if any),
    /// with every input stamped at or before it applied. (The recording digests the end of
    /// a slice before the inputs stamped there, such as an idle guest's clock skip: a digest
    /// record followed by inputs at its own icount is not the state --until gives.)
    #[arg(long, value_name = "ICOUNT")]
    pub until: Option<u64>,
    /// Print the final state digest (to stderr), as `ftvm run --digest` does
    #[arg(long)]
    pub digest: bool,
    /// Write the guest's console output to stdout, byte for byte
    #[arg(long)]
    pub console: bool,
    /// The kernel, if not at the recorded path (it must be the recorded one: checked)
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// The initrd, if not at the recorded path (checked likewise)
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Engine for guest code (the same guest either way)
    #[arg(long, value_enum)]
    pub cpu: Option<CpuArg>,
}

pub fn run(args: ReplayArgs) -> Result<i32> {
    let started = Instant::now();
    let in_log = |e: JournalError| anyhow::Error::new(e).context(format!("{}", args.file.display()));
    let file = std::fs::File::open(&args.file).with_context(|| format!("cannot open {}", args.file.display()))?;
    let mut reader = LogReader::new(file).map_err(in_log)?;
    let header = reader.header().clone();
    let disk = header.disk_path(&args.file);
    if let Some(disk) = disk.as_ref().filter(|d| !d.exists()) {
        bail!(
            "{}: the disk's contents at the recording's start are missing: no {} (a recording keeps them in \
             FILE.disk beside the log; move and rename the two together)",
            args.file.display(),
            disk.display()
        );
    }
    let mut config = header.machine_config(args.kernel.clone(), args.initrd.clone(), disk.clone());
    config.disk_overlay = true;
    config.cpu = CpuArg::to_cpu(args.cpu);
    header.check_images(&config, disk.as_deref()).map_err(in_log)?;
    let log = std::fs::File::open(&args.file).with_context(|| format!("cannot open {}", args.file.display()))?;
    let machine = match seek_point(&args.file, args.until, header.start) {
        Some(seek) => {
            let mut machine = restore(&log, seek.snapshot, &config)?;
            same_icount(&args.file, "snapshot", seek.snapshot, seek.snapshot_icount, &machine)?;
            for &(section, icount) in &seek.deltas {
                apply_delta(&log, section, &mut machine)?;
                same_icount(&args.file, "snapshot delta", section, icount, &machine)?;
            }
            let icount = seek.icount();
            reader.seek_to_record(seek.next_offset, icount).map_err(in_log)?;
            let deltas = match seek.deltas.len() {
                0 => String::new(),
                n => format!(" (its snapshot at icount {} and {n} deltas after it)", seek.snapshot_icount),
            };
            eprintln!("ftvm: replaying from the log's snapshot at icount {icount}{deltas}");
            machine
        }
        None => match (header.start, args.until) {
            (Start::Snapshot { icount }, Some(until)) if until < icount => bail!(
                "{}: --until {until} is before the recording's start: it starts from a snapshot at icount {icount}",
                args.file.display()
            ),
            (Start::Snapshot { .. }, _) => {
                bail!("{}: the log starts from a snapshot it does not hold", args.file.display())
            }
            (Start::Boot, _) => Machine::new(&config)?,
        },
    };
    let mut replayer = Replayer::new(machine);
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let mut on_output = |output: &machine::Output| {
        if let (true, OutputKind::Console(bytes)) = (args.console, &output.kind) {
            if let Err(e) = stdout.write_all(bytes) {
                write_error.get_or_insert(e);
            }
        }
    };
    let stop = loop {
        match reader.next_record() {
            Ok(Some(record)) => match replayer.apply(&record, args.until, &mut on_output) {
                Ok(Step::Continue) => {}
                Ok(Step::ReachedUntil) => break None,
                // Every digest matched to the end, but --until asked for more than there is.
                Ok(Step::Ended(reason)) => match args.until.filter(|&u| u > record.icount()) {
                    Some(until) => {
                        break Some(anyhow::anyhow!(
                            "--until {until} is past the recording's end at icount {} ({})",
                            record.icount(),
                            end_reason(reason)
                        ))
                    }
                    // Nothing may follow the end record.
                    None => break reader.next_record().err().map(anyhow::Error::new),
                },
                Err(e) => break Some(anyhow::Error::new(e)),
            },
            Ok(None) if reader.ended() => break None,
            // A log cut on a record boundary: the recording stopped before its end record.
            Ok(None) => {
                let offset = reader.offset();
                let until = args.until.map_or(String::new(), |u| format!(", before --until {u}"));
                break Some(anyhow::anyhow!(
                    "the log ends at byte {offset} without an end record (the recording was cut short, or is \
                     still being written){until}"
                ));
            }
            Err(e) => break Some(anyhow::Error::new(e)),
        }
    };
    if let Some(until) = args.until.filter(|_| stop.is_none() && !reader.ended()) {
        anyhow::ensure!(
            replayer.machine.icount() == until,
            "the replay stopped at icount {}",
            replayer.machine.icount()
        );
    }
    stdout.flush().ok();
    if let Some(e) = write_error {
        return Err(e).context("cannot write console output");
    }
    let icount = replayer.machine.icount();
    if args.digest {
        eprintln!("ftvm: digest={} icount={icount}", replayer.machine.digest());
    }
    let summary = format!(
        "{} inputs, {} digests matching, {:.2} s",
        replayer.inputs_applied,
        replayer.digests_checked,
        started.elapsed().as_secs_f64()
    );
    match stop {
        None => {
            eprintln!("ftvm: replayed to icount {icount}: {summary}");
            Ok(0)
        }
        // The whole records before a cut or damaged one replayed: say how far.
        Some(e) => Err(e.context(format!("{}: replayed to icount {icount} ({summary}), then", args.file.display()))),
    }
}

/// How a recording's end record says it ended, in words.
fn end_reason(reason: journal::EndReason) -> String {
    match reason {
        journal::EndReason::PowerOff { code } => format!("the guest powered off with status {code}"),
        journal::EndReason::Reset => "the guest reset".to_string(),
        journal::EndReason::Stopped => "the run was stopped".to_string(),
    }
}

/// Where a replay starts when it does not boot.
struct SeekPoint {
    /// The last whole snapshot at or before the target, and the deltas after it (in order,
    /// with their icounts) up to the target.
    snapshot: Section,
    snapshot_icount: u64,
    deltas: Vec<(Section, u64)>,
    /// The offset of the record after the last of them.
    next_offset: u64,
}

impl SeekPoint {
    fn icount(&self) -> u64 {
        self.deltas.last().map_or(self.snapshot_icount, |&(_, icount)| icount)
    }
}

/// Where a replay to `until` starts: the last snapshot or delta record at or before it, or
/// the start snapshot of a log that starts from one. None: from boot. A damaged log is read
/// as far as it goes here; the replay itself reports the damage.
fn seek_point(path: &Path, until: Option<u64>, start: Start) -> Option<SeekPoint> {
    if until.is_none() && start == Start::Boot {
        return None;
    }
    let mut scan = LogReader::open_path(path).ok()?;
    let mut best: Option<SeekPoint> = None;
    while let Ok(Some(record)) = scan.next_record() {
        let icount = record.icount();
        if until.is_some_and(|u| icount > u) {
            break;
        }
        match record {
            Record::Snapshot { icount, section } => {
                best = Some(SeekPoint {
                    snapshot: section,
                    snapshot_icount: icount,
                    deltas: Vec::new(),
                    next_offset: scan.offset(),
                });
                if until.is_none() {
                    break; // the start snapshot only
                }
            }
            // A delta applies to the snapshot before it (a log cut before any has none).
            Record::Delta { icount, section } => {
                if let Some(best) = &mut best {
                    best.deltas.push((section, icount));
                    best.next_offset = scan.offset();
                }
            }
            _ => {}
        }
    }
    best
}

/// Apply a snapshot delta record to the machine restored from the snapshot before it (and
/// the deltas between): the checkpoint it holds, checked by the digest it carries.
fn apply_delta(log: &std::fs::File, section: Section, machine: &mut Machine) -> Result<()> {
    use std::io::Read;
    // A delta holds at most every page and sector twice over, and the state.
    let disk_bytes = machine.disk_sectors().unwrap_or(0).saturating_mul(512);
    let cap = 2 * (machine.ram().size() + disk_bytes) + machine::snapshot::MAX_STATE_BYTES;
    let context = || format!("cannot apply the log's snapshot delta at byte {}", section.offset);
    if section.len > cap {
        bail!("{}: {} bytes, more than the {cap} a delta of this machine can hold", context(), section.len);
    }
    let mut bytes = Vec::with_capacity(section.len as usize);
    section.open(log).read_to_end(&mut bytes).with_context(context)?;
    machine::checkpoint::apply(machine, &bytes).with_context(context)
}

/// A snapshot or delta record's icount must be its state's: the records after it are
/// stamped from there (a hostile record at another icount would make the replay run the
/// machine from the state's icount to theirs, however far).
fn same_icount(file: &Path, what: &str, section: Section, icount: u64, machine: &Machine) -> Result<()> {
    anyhow::ensure!(
        machine.icount() == icount,
        "{}: the {what} record at byte {} says icount {icount}, but the state it holds is at icount {}",
        file.display(),
        section.offset.saturating_sub(journal::FRAME_HEADER_BYTES as u64 + 8),
        machine.icount()
    );
    Ok(())
}

fn restore(log: &std::fs::File, section: Section, config: &MachineConfig) -> Result<Machine> {
    let mut input = section.open(log);
    machine::snapshot::read_snapshot(&mut input, config)
        .with_context(|| format!("cannot restore the log's snapshot at byte {}", section.offset))
}
