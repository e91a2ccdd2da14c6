//! The keeper (DESIGN.md §7, docs/microreboot.md): a VM that outlives its monitor process.
//! `ftvm run --resilient` starts a small keeper that owns what must survive the monitor
//! (the TAP descriptor, the terminal, the API socket, a shared-memory [`region`]) and runs
//! the monitor as its child; a monitor that dies or hangs is replaced by one that takes the
//! VM over from the region's local checkpoint and input log, with every output once.
//!
//! - [`region`]: the shared recovery region's layout, checkpoint commit and input log.
//! - [`disk`]: a written disk kept as of the local checkpoint (the disk journal).
//! - [`monitor`]: the monitor's mode (log, heartbeat, local checkpoints, exactly-once outputs) and its recovery.
//! - [`replicated`]: a replicated primary's mode (the monitor's and checkpoint mode's together).
//! - [`resilient_backup`]: a checkpoint backup's mode (`ftvm backup --resilient`).
//! - [`sent`]: what a replicated primary sent, for a restarted monitor to take its run up.
//! - [`supervisor`]: the keeper's loop.
//! - [`stream`]: the console stream from monitor to keeper.
//! - [`fault`]: fault points (the `fail` crate, with the `failpoints` feature).

pub mod disk;
pub mod fault;
pub mod monitor;
pub mod region;
pub mod replicated;
pub mod resilient_backup;
pub mod sent;
pub mod stream;
pub mod supervisor;

use anyhow::{bail, Context, Result};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// The environment variable by which a keeper tells its monitor which descriptors it
/// inherited: `region=N,stream=N[,tap=N][,api=N][,disk=N][,listen=N][,sent=N]`.
pub const ENV_FDS: &str = "FTVM_KEEPER_FDS";
/// The monitor's attempt number (1 for the first).
pub const ENV_ATTEMPT: &str = "FTVM_KEEPER_ATTEMPT";

/// What a monitor inherited from its keeper.
pub struct Inherited {
    pub region: OwnedFd,
    pub stream: std::fs::File,
    pub tap: Option<OwnedFd>,
    pub api: Option<OwnedFd>,
    /// The disk journal, when the VM's disk is written.
    pub disk: Option<OwnedFd>,
    /// A spare's wake pipe (see [`supervisor::WAKE_RECOVER`]).
    pub wake: Option<std::fs::File>,
    /// A backup's listening socket (`ftvm backup --resilient`).
    pub listen: Option<OwnedFd>,
    /// A replicated primary's record of what it sent ([`sent`]).
    pub sent: Option<OwnedFd>,
    pub attempt: u32,
}

/// The descriptors from the keeper, if this process is a keeper's monitor. Call once, early.
pub fn inherited() -> Result<Option<Inherited>> {
    let Ok(spec) = std::env::var(ENV_FDS) else { return Ok(None) };
    let attempt = std::env::var(ENV_ATTEMPT).ok().and_then(|a| a.parse().ok()).unwrap_or(1);
    let (mut region, mut stream, mut tap, mut api, mut disk, mut wake, mut listen, mut sent) =
        (None, None, None, None, None, None, None, None);
    for part in spec.split(',') {
        let Some((name, fd)) = part.split_once('=') else { bail!("{ENV_FDS}={spec:?}: expected name=fd pairs") };
        let fd: RawFd = fd.parse().with_context(|| format!("{ENV_FDS}: {part:?} is not a descriptor"))?;
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
            .with_context(|| format!("{ENV_FDS}: descriptor {fd} ({name}) is not open"))?;
        // SAFETY: the keeper passed this open descriptor to this process alone (checked
        // open just above), and nothing else here has taken ownership of it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let slot = match name {
            "region" => &mut region,
            "stream" => &mut stream,
            "tap" => &mut tap,
            "api" => &mut api,
            "disk" => &mut disk,
            "wake" => &mut wake,
            "listen" => &mut listen,
            "sent" => &mut sent,
            _ => bail!("{ENV_FDS}: unknown descriptor name {name:?}"),
        };
        anyhow::ensure!(slot.replace(owned).is_none(), "{ENV_FDS}: {name} given twice");
    }
    // A monitor whose keeper is gone must not run on unsupervised.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .context("cannot tie the monitor to its keeper")?;
    Ok(Some(Inherited {
        region: region.context("the keeper passed no region")?,
        stream: std::fs::File::from(stream.context("the keeper passed no console stream")?),
        tap,
        api,
        disk,
        wake: wake.map(std::fs::File::from),
        listen,
        sent,
        attempt,
    }))
}

/// What a spare monitor was woken for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Take the VM over from the region (a monitor died).
    Recover,
    /// Be a planned handover's successor.
    Handover,
}

/// Wait on a spare's wake pipe for the keeper's word; None at its end (the keeper is gone,
/// or needs no spare any more): the spare then just ends.
pub fn wait_to_be_woken(wake: &mut std::fs::File) -> Result<Option<Wake>> {
    use std::io::Read as _;
    let mut word = [0u8; 1];
    loop {
        match wake.read(&mut word) {
            Ok(0) => return Ok(None),
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("cannot read the spare's wake pipe"),
        }
    }
    match word[0] {
        supervisor::WAKE_RECOVER => Ok(Some(Wake::Recover)),
        supervisor::WAKE_HANDOVER => Ok(Some(Wake::Handover)),
        other => bail!("the keeper woke the spare with an unknown word {other}"),
    }
}
