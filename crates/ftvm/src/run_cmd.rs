//! `ftvm run`: boot a VM with the console on the terminal, or run one command in the
//! guest and exit with its status.

use crate::guest_image;
use anyhow::{bail, Context, Result};
use base64::Engine;
use machine::{DiskConfig, Machine, MachineConfig};
use std::cell::RefCell;
use std::io::Write;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;
use vmm::driver::{ConsoleSink, Driver, Outcome};
use vmm::host::{console, tap::Tap};
use vmm::mode::StandDown;

/// The options that define a VM and attach it to the host: shared by `run`, `backup`
/// and `restore`, so that every replica of a VM is described the same way.
#[derive(clap::Args, Debug, Clone)]
pub struct VmArgs {
    /// Kernel: a RISC-V Linux "Image" [default: the built-in Debian guest]
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk [default: the built-in guest's busybox initramfs]
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (replaces the default one)
    #[arg(long, value_name = "ARGS")]
    pub append: Option<String>,
    /// Guest RAM, e.g. 512M or 2G
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_size)]
    pub mem: u64,
    /// Raw disk image for the guest's virtio block device (/dev/vda)
    #[arg(long, value_name = "FILE")]
    pub disk: Option<PathBuf>,
    /// Attach the disk read-only
    #[arg(long, requires = "disk")]
    pub disk_read_only: bool,
    /// Network card backend: tap:NAME (an existing TAP device)
    #[arg(long, value_name = "tap:NAME")]
    pub net: Option<String>,
    /// MAC address of the guest's network card
    #[arg(long, value_name = "MAC", default_value = "52:54:00:12:34:56", value_parser = parse_mac)]
    pub mac: [u8; 6],
    /// Serve the control API (status, pause, resume, snapshot, stop) on this Unix socket
    #[arg(long, value_name = "PATH")]
    pub api: Option<PathBuf>,
    /// Serve the guest's console on this Unix socket too (`ftvm vm console` attaches to it):
    /// clients see its output and type on it
    #[arg(long, value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
    /// Serve Prometheus metrics (`GET /metrics`, as on the API socket) over TCP on this address
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_listen: Option<String>,
    /// Guest clock when idle: realtime follows the wall clock, fast skips idle time
    #[arg(long, value_enum, default_value = "realtime")]
    pub clock: ClockArg,
    /// A guest reboot ends the run (as a power-off does) instead of booting the VM again
    #[arg(long)]
    pub no_reboot: bool,
    /// Draw the entropy the guest receives from a generator seeded with N instead of the
    /// host's randomness: with --clock fast and no outside input, two runs are alike
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Print the final state digest (to stderr)
    #[arg(long)]
    pub digest: bool,
    /// Print instructions executed and the speed at exit (to stderr)
    #[arg(long)]
    pub stats: bool,
    /// Engine for guest code: jit compiles hot code to host code, interp interprets it all
    /// (the same guest either way) [default: jit on x86-64, interp elsewhere]
    #[arg(long, value_enum)]
    pub cpu: Option<CpuArg>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuArg {
    Interp,
    Jit,
}

impl CpuArg {
    pub fn to_cpu(choice: Option<CpuArg>) -> machine::Cpu {
        match choice {
            None => machine::Cpu::host_default(),
            Some(CpuArg::Interp) => machine::Cpu::Interpreter,
            Some(CpuArg::Jit) => machine::Cpu::Jit,
        }
    }
}

/// Boot a virtual machine (the default Debian guest unless --kernel is given).
///
/// Without COMMAND, the guest's console is attached to the terminal: Ctrl-A x quits.
/// With COMMAND, the guest runs it, ftvm prints its output and exits with its status.
/// Recording the run (`ftvm run`, and `ftvm restore` from a snapshot).
#[derive(clap::Args, Debug)]
pub struct RecordArgs {
    /// Record the run to FILE (an input log for `ftvm replay`), the disk's contents at the
    /// start kept beside it in FILE.disk
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// While recording, put a snapshot in the log this often (in seconds of wall time), so
    /// that `ftvm replay --until` starts from the nearest one before its target
    #[arg(long, value_name = "SECONDS", requires = "record")]
    pub snapshot_every: Option<f64>,
    /// While recording, put a digest of the machine and its outputs in the log this often
    /// (milliseconds of wall time; 0: at every slice's end); a replay checks each one. A
    /// digest costs what the guest wrote since the previous one (the first hashes all of RAM)
    #[arg(long, value_name = "MS", default_value_t = 100, requires = "record")]
    pub digest_every_ms: u64,
}

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  ftvm run                      boot the default guest, console on the terminal\n  ftvm run -- uname -m          prints riscv64\n  ftvm run --disk d.img --net tap:tap0 -- wget -O- http://10.0.2.2/\n  ftvm run --replicate-to 192.168.77.2:7000 --key k --store file:/shared/ftvm -- /usr/share/ftvm/counter-httpd"
)]
pub struct RunArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub replication: crate::replication_args::ReplicationArgs,
    #[command(flatten)]
    pub record: RecordArgs,
    /// Show the console up to the command's start in command mode (kernel messages
    /// and the guest's `ftvm: userspace up` line)
    #[arg(long)]
    pub boot_log: bool,
    /// Keep the VM running across crashes and hangs of its monitor: a small keeper process
    /// owns the terminal, the TAP device and the API socket, and restarts the monitor, which
    /// takes the VM over from a local checkpoint (docs/microreboot.md)
    #[arg(long)]
    pub resilient: bool,
    #[command(flatten)]
    pub keeper: crate::resilient::KeeperArgs,
    /// Command to run in the guest (after --)
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `--clock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClockArg {
    /// Guest time follows the wall clock when the guest idles.
    Realtime,
    /// Idle time is skipped at once.
    Fast,
}

impl From<ClockArg> for vmm::driver::Clock {
    fn from(clock: ClockArg) -> Self {
        match clock {
            ClockArg::Realtime => vmm::driver::Clock::Realtime,
            ClockArg::Fast => vmm::driver::Clock::Fast,
        }
    }
}

/// Parse a size with an optional K/M/G suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let upper = t.to_ascii_uppercase();
    let stripped = upper.trim_end_matches("IB").trim_end_matches('B');
    let (digits, shift) = match stripped.chars().last() {
        Some('K') => (&stripped[..stripped.len() - 1], 10),
        Some('M') => (&stripped[..stripped.len() - 1], 20),
        Some('G') => (&stripped[..stripped.len() - 1], 30),
        _ => (stripped, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size (examples: 512M, 2G, 1048576)"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("size {s:?} is too large"))
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let err = || format!("{s:?} is not a MAC address (example: 52:54:00:12:34:56)");
    if parts.len() != 6 {
        return Err(err());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
    }
    Ok(mac)
}

/// Quote words for the guest's shell so that `ftvm run -- sh -c 'a b'` keeps its words.
fn shell_join(words: &[String]) -> String {
    let quote = |w: &String| {
        if !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
            w.clone()
        } else {
            format!("'{}'", w.replace('\'', r"'\''"))
        }
    };
    words.iter().map(quote).collect::<Vec<_>>().join(" ")
}

pub fn machine_config(args: &VmArgs, command: &[String]) -> Result<MachineConfig> {
    let (kernel, initrd, mut bootargs) = match &args.kernel {
        Some(kernel) => (kernel.clone(), args.initrd.clone(), "console=ttyS0 earlycon=sbi".to_string()),
        None => {
            let image = guest_image::ensure()?;
            (image.kernel, args.initrd.clone().or(Some(image.initrd)), image.cmdline)
        }
    };
    if let Some(append) = &args.append {
        bootargs = append.clone();
    }
    if !command.is_empty() {
        let encoded = base64::engine::general_purpose::STANDARD.encode(shell_join(command));
        bootargs.push_str(&format!(" ftvm.cmd={encoded}"));
    }
    let mut config = MachineConfig::new(kernel);
    config.initrd = initrd;
    config.bootargs = bootargs;
    config.ram_size = args.mem;
    config.disk = args.disk.clone().map(|path| DiskConfig { path, read_only: args.disk_read_only });
    config.cpu = CpuArg::to_cpu(args.cpu);
    if args.net.is_some() {
        config.net_mac = Some(args.mac);
    }
    config.boot_unix_ns = match args.seed {
        // A seeded run is reproducible: its guest clock starts at a fixed time.
        Some(_) => SEEDED_BOOT_UNIX_NS,
        None => host_unix_ns()?,
    };
    config.reboot_on_reset = !args.no_reboot;
    Ok(config)
}

/// Where the guest's real-time clock starts in a run with `--seed`: 2026-01-01T00:00:00Z.
const SEEDED_BOOT_UNIX_NS: u64 = 1_767_225_600_000_000_000;

/// The host's wall-clock time: the guest's real-time clock starts from it.
fn host_unix_ns() -> Result<u64> {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the host's clock is set before 1970")?;
    u64::try_from(since_epoch.as_nanos()).context("the host's clock is set after the year 2554")
}

pub fn tap_name(spec: &str) -> Result<&str> {
    match spec.split_once(':') {
        Some(("tap", name)) => Ok(name),
        _ => bail!("--net {spec:?}: expected tap:NAME"),
    }
}

/// Console output in command mode: hide boot messages until the guest's
/// "ftvm: userspace up" line and the "ftvm: exit N" line, pass the rest.
pub(crate) struct CommandConsole {
    started: bool,
    line: Vec<u8>,
    show_boot: bool,
}

impl CommandConsole {
    pub(crate) fn new(show_boot: bool) -> CommandConsole {
        CommandConsole { started: false, line: Vec::new(), show_boot }
    }

    /// Where it is (started or not, the line so far), for a keeper re-executed for an
    /// upgrade: `1:HEX` or `0:HEX`.
    pub(crate) fn encode_state(&self) -> String {
        let hex: String = self.line.iter().map(|b| format!("{b:02x}")).collect();
        format!("{}:{hex}", u8::from(self.started))
    }

    pub(crate) fn from_state(show_boot: bool, state: &str) -> CommandConsole {
        let mut console = CommandConsole::new(show_boot);
        if let Some((started, hex)) = state.split_once(':') {
            console.started = started == "1";
            console.line =
                (0..hex.len() / 2).filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()).collect();
        }
        console
    }
}

const UP_MARKER: &[u8] = b"ftvm: userspace up";
const EXIT_MARKER: &[u8] = b"ftvm: exit ";

impl ConsoleSink for CommandConsole {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        for &b in bytes {
            self.line.push(b);
            if b != b'\n' {
                continue;
            }
            let line = std::mem::take(&mut self.line);
            let text = trim_cr(&line);
            if !self.started {
                if text.ends_with(UP_MARKER) {
                    self.started = true;
                }
                if self.show_boot {
                    out.write_all(&line)?;
                }
            } else if let Some(before) = strip_exit_marker(text) {
                // Output that did not end in a newline runs into init's marker line.
                out.write_all(before)?;
            } else {
                // The guest's terminal turns "\n" into "\r\n"; a command's output on the
                // host is plain text, as if the command had run here.
                out.write_all(text)?;
                out.write_all(b"\n")?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }

    fn rebooted(&mut self) -> std::io::Result<()> {
        // What the command printed last still belongs to its output; the new boot's
        // messages are hidden again until its command starts.
        if self.started && !self.line.is_empty() {
            std::io::stdout().write_all(&std::mem::take(&mut self.line))?;
        }
        self.line.clear();
        self.started = false;
        Ok(())
    }

    fn finish(&mut self) -> std::io::Result<()> {
        // A last line without a newline (e.g. `printf x`) still belongs to the output.
        if self.started && !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            std::io::stdout().write_all(&line)?;
        }
        std::io::stdout().flush()
    }
}

/// If `line` ends with init's "ftvm: exit N" marker, the part before it.
fn strip_exit_marker(line: &[u8]) -> Option<&[u8]> {
    let pos = line.windows(EXIT_MARKER.len()).rposition(|w| w == EXIT_MARKER)?;
    let status = &line[pos + EXIT_MARKER.len()..];
    (!status.is_empty() && status.iter().all(u8::is_ascii_digit)).then_some(&line[..pos])
}

fn trim_cr(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && (line[end - 1] == b'\n' || line[end - 1] == b'\r') {
        end -= 1;
    }
    &line[..end]
}

pub(crate) struct TerminalConsole;

impl ConsoleSink for TerminalConsole {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        std::io::stdout().lock().write_all(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

pub fn open_tap(vm: &VmArgs) -> Result<Option<Tap>> {
    match &vm.net {
        Some(spec) => Ok(Some(Tap::open(tap_name(spec)?)?)),
        None => Ok(None),
    }
}

pub fn run(args: RunArgs) -> Result<i32> {
    if args.resilient {
        return crate::resilient::run(args);
    }
    // Before any thread starts (the JIT's worker, the TAP reader): they inherit the mask.
    let sigterm = block_sigterm()?;
    // Fault points named in FAILPOINTS (with the `failpoints` feature; the migration's too).
    let _faults = vmm::keeper::fault::setup();
    let vm = &args.vm;
    let config = machine_config(vm, &args.command)?;
    let tap = open_tap(vm)?;
    let recording = match &args.record.record {
        Some(path) => Some(vmm::record::Recording::start(&config, &record_options(&args.record, &args.vm, path)?)?),
        None => None,
    };
    let machine = Machine::new(&config)?;
    let (tx, rx) = std::sync::mpsc::channel();
    stop_on_sigterm(sigterm, tx.clone())?;
    let _metrics = crate::metrics_http::bind(vm, &tx)?; // a busy port is refused before the record is touched
    let replicated = args.replication.replicate_to.is_some();
    if let (true, Some(key)) = (replicated, &args.replication.key) {
        vmm::replicate::load_key(key)?; // a bad key is refused before the record is touched
    }
    let role = if replicated { "primary" } else { "vm" };
    let mut ownership = vmm::replicate::Ownership::open(&args.replication.ownership.spec(), &config, role)?;
    if let Some(ownership) = &mut ownership {
        let from = args.replication.claim_from.as_ref().map(|(generation, owner)| (*generation, owner.as_str()));
        ownership.claim_for_start_from(from)?;
    }
    // The driver holds the record (and marks it ended when the VM ends here, so that no
    // other replica ever brings it back), or hands it to replication.
    let mut driver = Driver::new(machine, rx, vm.clock.into());
    if let Some(recording) = recording {
        driver.add_observer(Box::new(recording));
    }
    driver.vm_id = ownership.as_ref().map(|o| o.vm_id.clone());
    driver.ownership = ownership;
    if replicated {
        anyhow::ensure!(driver.ownership.is_some(), "--replicate-to needs --store");
        match args.replication.mode {
            crate::replication_args::ReplicationMode::Checkpoint => {
                driver.start_replication(crate::replication_args::options(&args.replication)?, tx.clone())?
            }
            crate::replication_args::ReplicationMode::Lockstep => {
                let options = crate::replication_args::lockstep_options(&args.replication, &config)?;
                let ownership = driver.ownership.take().context("--replicate-to needs --store")?;
                let mode =
                    vmm::mode::lockstep::LockstepPrimary::start(options, ownership, tx.clone(), &mut driver.machine)?;
                driver.set_mode(Box::new(mode));
            }
        }
    }
    run_driver(driver, vm, tap, tx, &args.command, args.boot_log, Attach::Now)
}

/// SIGTERM, blocked in the calling thread (call before any other thread starts) so that only
/// [`stop_on_sigterm`]'s thread takes it.
fn block_sigterm() -> Result<nix::sys::signal::SigSet> {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGTERM);
    set.thread_block().context("cannot block SIGTERM")?;
    Ok(set)
}

/// A SIGTERM stops the run as Ctrl-A x does, between two slices: the guest stops where it
/// is and a recording gets its end record ("stopped"; the default action would have killed
/// the process with the log's last inputs in its buffer and no end record).
fn stop_on_sigterm(set: nix::sys::signal::SigSet, events: std::sync::mpsc::Sender<vmm::host::HostEvent>) -> Result<()> {
    std::thread::Builder::new()
        .name("sigterm".into())
        .spawn(move || {
            if set.wait().is_ok() {
                eprintln!("ftvm: SIGTERM: stopping the VM");
                let _ = events.send(vmm::host::HostEvent::Quit);
            }
        })
        .context("cannot start the SIGTERM thread")?;
    Ok(())
}

/// What `--record FILE` and its options ask for.
pub fn record_options(args: &RecordArgs, vm: &VmArgs, path: &std::path::Path) -> Result<vmm::record::RecordOptions> {
    let snapshot_every = match args.snapshot_every {
        Some(s) if !(s.is_finite() && s > 0.0) => bail!("--snapshot-every {s}: give a number of seconds above 0"),
        s => s.map(std::time::Duration::from_secs_f64),
    };
    Ok(vmm::record::RecordOptions {
        path: path.to_path_buf(),
        digest_every: std::time::Duration::from_millis(args.digest_every_ms),
        snapshot_every,
        seed: vm.seed,
    })
}

/// When the host's terminal and TAP frames start reaching a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// At once (a VM that runs from the start).
    Now,
    /// When the backup takes over (before that, the terminal stays as it is and the TAP's
    /// frames, meant for the primary's guest, queue and are thrown away); then the MAC is
    /// announced.
    AtGoLive { mac: [u8; 6] },
}

/// Attach the host side (terminal, TAP, API) to a driver, run it, and turn its
/// outcome into an exit status. Shared by `run`, `restore` and `backup`.
pub fn run_driver(
    mut driver: Driver,
    vm: &VmArgs,
    tap: Option<Tap>,
    tx: std::sync::mpsc::Sender<vmm::host::HostEvent>,
    command: &[String],
    boot_log: bool,
    attach: Attach,
) -> Result<i32> {
    let interactive = command.is_empty();
    let raw: Rc<RefCell<Option<console::RawMode>>> = Rc::default();
    let attach_host = {
        let (raw, events) = (raw.clone(), tx.clone());
        let tap = tap.as_ref().map(Tap::clone_handle).transpose()?;
        move |announce: Option<[u8; 6]>| -> Result<()> {
            if interactive {
                *raw.borrow_mut() = Some(console::RawMode::enter());
                console::spawn_reader(events.clone());
            }
            if let Some(tap) = &tap {
                if announce.is_some() {
                    tap.discard_pending().context("cannot empty the TAP device's queue")?;
                }
                tap.spawn_reader(events.clone()).context("cannot start the TAP reader")?;
                if let Some(mac) = announce {
                    vmm::host::announce::spawn_announcer(tap.clone_handle()?, mac);
                }
            }
            Ok(())
        }
    };
    match attach {
        Attach::Now => attach_host(None)?,
        Attach::AtGoLive { mac } => driver.on_go_live(Box::new(move |_| {
            if let Err(e) = attach_host(Some(mac)) {
                vmm::log::warn(format_args!("{e:#}"));
            }
        })),
    }
    let _api = match &vm.api {
        Some(path) => Some(crate::api::serve(path, tx.clone())?),
        None => None,
    };
    let console_hub = match &vm.console_socket {
        Some(path) => Some(crate::console_socket::serve(path, tx.clone())?),
        None => None,
    };
    driver.events_possible =
        interactive || tap.is_some() || vm.api.is_some() || console_hub.is_some() || driver.replicating();
    // Only the control API can ask to start replicating later; without it the driver keeps
    // no sender of its own, so that it notices when no event can come any more.
    if vm.api.is_some() {
        driver.events_tx = Some(tx.clone());
    }
    driver.tap = tap;
    if let Some(seed) = vm.seed {
        driver.entropy = vmm::host::EntropySource::seeded(seed);
    }
    drop(tx);
    let started = Instant::now();
    let mut console: Box<dyn ConsoleSink> = if interactive {
        Box::new(TerminalConsole)
    } else {
        Box::new(CommandConsole { started: false, line: Vec::new(), show_boot: boot_log })
    };
    if let Some(hub) = console_hub {
        console = Box::new(crate::console_socket::TeeConsole { inner: console, hub });
    }
    let outcome = driver.run(console.as_mut())?;
    console.finish().context("cannot write console output")?;
    drop(raw.borrow_mut().take()); // the terminal as it was
    let seconds = started.elapsed().as_secs_f64();
    if vm.stats {
        let n = driver.machine.icount();
        let jit = driver.machine.hart().jit_stats();
        let cpu = if jit.active { "jit" } else { "interp" };
        eprintln!(
            "ftvm: instructions={n} seconds={seconds:.3} mips={:.1} cpu={cpu} compiled_share={:.3} \
             compile_share={:.3} blocks_compiled={}",
            n as f64 / seconds / 1e6,
            jit.compiled_instructions as f64 / n.max(1) as f64,
            jit.compile_ns as f64 / 1e9 / seconds,
            jit.blocks_compiled
        );
    }
    if vm.digest {
        eprintln!("ftvm: digest={} icount={}", driver.machine.digest(), driver.machine.icount());
    }
    exit_status(outcome)
}

/// The exit status of a run that ended with `outcome` (its message on stderr).
pub fn exit_status(outcome: Outcome) -> Result<i32> {
    Ok(match outcome {
        Outcome::PowerOff { code } => code as i32,
        Outcome::Reset => {
            eprintln!("ftvm: the guest asked for a reboot; --no-reboot ends the run here");
            0
        }
        Outcome::Quit => {
            eprintln!("\r\nftvm: quit");
            0
        }
        Outcome::Stopped => {
            eprintln!("ftvm: stopped through the control API");
            0
        }
        Outcome::Fenced(message) => anyhow::bail!("{message}"),
        Outcome::Migrated(message) => {
            eprintln!("ftvm: {message}");
            0
        }
        Outcome::Hung => {
            eprintln!("ftvm: the guest is idle with no timer armed and nothing can wake it; stopping");
            1
        }
        Outcome::StoodDown(StandDown::EndedOnPrimary { exit_code }) => {
            eprintln!("ftvm backup: the VM ended on the primary with exit status {exit_code}; this backup stands down");
            exit_code as i32
        }
        Outcome::StoodDown(StandDown::Unprotected) => {
            eprintln!(
                "ftvm backup: the primary stopped replicating to this backup (unprotect); it can never take over \
                 now, so it stands down"
            );
            0
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
        assert!(parse_size("99999999999G").unwrap_err().contains("too large"));
    }

    #[test]
    fn commands_keep_their_words_through_the_guest_shell() {
        let words = ["sh", "-c", "echo 'hi there'"].map(String::from);
        assert_eq!(shell_join(&words), r#"sh -c 'echo '\''hi there'\'''"#);
        assert_eq!(shell_join(&["uname".into(), "-m".into()]), "uname -m");
    }

    #[test]
    fn the_exit_marker_is_stripped_even_after_a_partial_line() {
        assert_eq!(strip_exit_marker(b"ftvm: exit 0"), Some(&b""[..]));
        assert_eq!(strip_exit_marker(b"bftvm: exit 12"), Some(&b"b"[..]));
        assert_eq!(strip_exit_marker(b"ftvm: exit soon"), None);
        assert_eq!(strip_exit_marker(b"plain output"), None);
    }

    #[test]
    fn macs_are_parsed_and_bad_ones_refused() {
        assert_eq!(parse_mac("52:54:00:12:34:56"), Ok([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert!(parse_mac("52:54:00").is_err());
        assert!(parse_mac("zz:54:00:12:34:56").is_err());
    }
}
