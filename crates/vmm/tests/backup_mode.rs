//! Checkpoint mode's backup through the seam, without root or a RISC-V guest: fake VMs
//! whose checkpoint is their instruction count, a real primary (`CheckpointPrimary`) and a
//! real backup (`CheckpointBackup`) in drivers of their own, over loopback (through a proxy
//! the test can cut), with the ownership record in a file store. Pins the backup mode's
//! policy: its machine never runs while it waits, it answers only status and stop, it
//! applies whole checkpoints and counts the ones that fail, it stands down with the VM's
//! code when the VM ends on the primary, and a takeover is a change of mode in the same
//! driver, after which the VM runs on from the last checkpoint and can be protected again.

mod common;

use common::{Collect, FakeVm};
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm::control::{Command, ControlRequest, ProtectRequest, Reply};
use vmm::driver::{Clock, Driver, Outcome};
use vmm::host::HostEvent;
use vmm::mode::backup::CheckpointBackup;
use vmm::mode::StandDown;
use vmm::replicate::backup::BackupOptions;
use vmm::replicate::{Ownership, OwnershipSpec};
use vmm::status::{Role, State, Status};

const KEY: &[u8; 32] = b"a test key of 32 bytes, no more.";
const VM_ID: &str = "vm-backup-mode-test";
/// Generous for a loaded host (heartbeats every 10 ms).
const FAILOVER_TIMEOUT_MS: u64 = 400;
const DEADLINE: Duration = Duration::from_secs(30);

/// A temporary store directory and the key file, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("vmm-backup-mode-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::File::create(dir.join("key")).unwrap().write_all(KEY).unwrap();
        Dir(dir)
    }

    fn ownership(&self, replica: &str) -> Ownership {
        let spec = OwnershipSpec {
            store: Some(format!("file:{}", self.0.join("store").display())),
            vm_id: Some(VM_ID.into()),
            replica_name: Some(replica.into()),
        };
        Ownership::open(&spec, &machine::MachineConfig::new("/nonexistent-kernel"), replica).unwrap().unwrap()
    }

    /// The record as the store holds it: (generation, exit code if ended).
    fn record(&self) -> Option<(u64, Option<u32>)> {
        self.ownership("reader").read().unwrap().map(|r| (r.generation, r.ended))
    }

    fn key(&self) -> PathBuf {
        self.0.join("key")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a driver's thread ends with.
struct Ended {
    outcome: Outcome,
    console: Collect,
    /// The status after the run (a backup that stood down still reports as one).
    status: Status,
    vm: FakeVm,
}

/// A driver running on a thread of its own, and the sender of its events.
struct Side {
    events: Sender<HostEvent>,
    thread: JoinHandle<Ended>,
}

impl Side {
    /// Ask the driver something through its control channel.
    fn ask(&self, command: Command) -> Reply {
        let (reply, answer) = mpsc::channel();
        self.events.send(HostEvent::Control(ControlRequest { command, reply })).expect("the driver runs");
        answer.recv_timeout(DEADLINE).expect("the driver answers")
    }

    fn status(&self) -> Status {
        serde_json::from_value(self.ask(Command::Status).body).unwrap()
    }

    /// Poll the status until `until` holds.
    fn wait_for(&self, what: &str, until: impl Fn(&Status) -> bool) -> Status {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let status = self.status();
            if until(&status) {
                return status;
            }
            assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}; last status {status:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn join(self) -> Ended {
        drop(self.events);
        self.thread.join().expect("the driver's thread")
    }
}

/// A backup in a driver of its own, waiting on `listener`.
fn backup(dir: &Dir, name: &str, vm: FakeVm, listener: TcpListener) -> Side {
    let (tx, rx) = mpsc::channel();
    let ownership = dir.ownership(name);
    let events = tx.clone();
    let thread = std::thread::spawn(move || {
        let options = BackupOptions {
            listener,
            key: replica::PresharedKey::new(KEY).unwrap(),
            config_digest: ownership.replication_digest,
            failover_timeout_ms: FAILOVER_TIMEOUT_MS,
            heartbeat_ms: 10,
        };
        let mode = CheckpointBackup::start(options, ownership, events.clone(), &vm).unwrap();
        let mut driver = Driver::new(vm, rx, Clock::Fast);
        driver.set_mode(Box::new(mode));
        driver.events_tx = Some(events); // `ctl protect` after a takeover
        run(driver)
    });
    Side { events: tx, thread }
}

/// A primary in a driver of its own, replicating to `to` with `on_backup_loss: Hold`.
fn primary(dir: &Dir, vm: FakeVm, to: SocketAddr) -> Side {
    let (tx, rx) = mpsc::channel();
    let mut ownership = dir.ownership("primary");
    ownership.claim_for_start().unwrap();
    let events = tx.clone();
    let thread = std::thread::spawn(move || {
        let mut driver = Driver::new(vm, rx, Clock::Fast);
        driver.ownership = Some(ownership);
        driver.start_replication(replication_to(to), events).unwrap();
        run(driver)
    });
    Side { events: tx, thread }
}

fn replication_to(backup: SocketAddr) -> vmm::mode::checkpoint::ReplicationOptions {
    vmm::mode::checkpoint::ReplicationOptions {
        primary: vmm::replicate::primary::PrimaryOptions {
            backup,
            key: replica::PresharedKey::new(KEY).unwrap(),
            heartbeat_ms: 10,
            on_backup_loss: replica::BackupLossPolicy::Hold,
            backup_loss_grace_ms: 50,
        },
        epoch_ms: 5,
        verify_every: 0,
    }
}

fn run(mut driver: Driver<FakeVm>) -> Ended {
    let console = Collect::default();
    let outcome = driver.run(&mut console.clone()).unwrap();
    let status = driver.status();
    let vm = std::mem::replace(&mut driver.machine, FakeVm::new(1, 1, 0));
    Ended { outcome, console, status, vm }
}

fn listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// A TCP proxy in front of a backup: `cut` pulls the cable (every connection through it is
/// shut, and later ones are refused), so the primary falls silent for the backup while it
/// runs on.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(to: SocketAddr) -> Proxy {
        let (listener, addr) = listener();
        let cut = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (cut_flag, kept) = (cut.clone(), links.clone());
        std::thread::spawn(move || {
            for from in listener.incoming() {
                let Ok(from) = from else { continue };
                if cut_flag.load(Ordering::SeqCst) {
                    continue; // refused: dropped at once
                }
                let Ok(to) = TcpStream::connect(to) else { continue };
                let mut kept = kept.lock().unwrap();
                kept.push(from.try_clone().unwrap());
                kept.push(to.try_clone().unwrap());
                pump(from.try_clone().unwrap(), to.try_clone().unwrap());
                pump(to, from);
            }
        });
        Proxy { addr, cut, links }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            let _ = link.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}

/// The multiples of `every` in `(after, up_to]`.
fn multiples(every: u64, after: u64, up_to: u64) -> Vec<u64> {
    (after / every + 1..=up_to / every).map(|n| n * every).collect()
}

#[test]
fn a_waiting_backup_never_runs_its_machine_takes_no_input_and_answers_only_status_and_stop() {
    let dir = Dir::new("waiting");
    let (listener, _) = listener();
    let side = backup(&dir, "backup", FakeVm::new(1_000_000, 100_000_000, 0), listener);
    let status = side.status();
    assert_eq!((status.role, status.state, status.mode), (Role::Backup, State::Waiting, vmm::status::Mode::Checkpoint));
    let backup = status.backup.expect("a backup's part");
    assert_eq!((backup.primary_connected, backup.applied_epoch, backup.applied_checkpoints), (false, None, 0));
    side.events.send(HostEvent::Console(b"typed at a backup".to_vec())).unwrap();
    for command in [Command::Pause, Command::Snapshot { path: dir.0.join("snap") }, Command::Unprotect] {
        let reply = side.ask(command.clone());
        assert_eq!((reply.status, &reply.body["error"]), (409, &vmm::mode::backup::REFUSAL.into()), "{command:?}");
    }
    let protect = ProtectRequest {
        to: "127.0.0.1:1".into(),
        key: dir.key(),
        epoch_ms: 20,
        on_backup_loss: replica::BackupLossPolicy::Hold,
        mode: vmm::control::ProtectMode::Checkpoint,
    };
    assert_eq!(side.ask(Command::Protect(protect)).status, 409);
    assert_eq!(side.ask(Command::Stop).status, 200);
    let ended = side.join();
    assert_eq!(ended.outcome, Outcome::Stopped);
    assert_eq!(
        (ended.vm.runs, ended.vm.icount, ended.vm.inputs.len()),
        (0, 0, 0),
        "the machine never ran nor took input"
    );
    assert_eq!(ended.console.text(), "");
    assert_eq!(dir.record(), None, "a stopped backup leaves the record alone");
}

#[test]
fn a_backup_applies_each_whole_checkpoint_and_stands_down_with_the_code_of_a_vm_that_ended_on_the_primary() {
    let dir = Dir::new("ended");
    let (listener, addr) = listener();
    let side = backup(&dir, "backup", FakeVm::new(1_000_000, u64::MAX, 0), listener);
    let primary = primary(&dir, FakeVm::new(1_000_000, 60_000_000, 4).slow(Duration::from_millis(1)), addr);
    let (backup, primary) = (side.join(), primary.join());
    assert_eq!(backup.outcome, Outcome::StoodDown(StandDown::EndedOnPrimary { exit_code: 4 }));
    assert_eq!(primary.outcome, Outcome::PowerOff { code: 4 });
    assert_eq!(primary.console.numbers(), multiples(1_000_000, 0, 60_000_000), "every output left the primary");
    assert_eq!(backup.vm.runs, 0, "the backup's machine never ran");
    assert_eq!(backup.vm.applied.last(), Some(&60_000_000), "the final checkpoint was applied");
    assert!(backup.vm.applied.windows(2).all(|w| w[0] <= w[1]), "in order: {:?}", backup.vm.applied);
    let counts = backup.status.backup.expect("a backup's part");
    assert_eq!((counts.applied_checkpoints, counts.diverged_checkpoints), (backup.vm.applied.len() as u64, 0));
    assert_eq!(dir.record(), Some((2, Some(4))), "the primary marked the record ended (one more swap)");
}

#[test]
fn a_checkpoint_that_fails_its_check_is_counted_as_diverged_and_a_later_one_repairs_the_backup() {
    let dir = Dir::new("diverged");
    let (listener, addr) = listener();
    let mut vm = FakeVm::new(1_000_000, u64::MAX, 0);
    vm.fail_applies = vec![3];
    let side = backup(&dir, "backup", vm, listener);
    let primary = primary(&dir, FakeVm::new(1_000_000, 60_000_000, 0).slow(Duration::from_millis(1)), addr);
    let (backup, primary) = (side.join(), primary.join());
    assert_eq!(primary.outcome, Outcome::PowerOff { code: 0 });
    assert_eq!(backup.outcome, Outcome::StoodDown(StandDown::EndedOnPrimary { exit_code: 0 }));
    let counts = backup.status.backup.expect("a backup's part");
    assert_eq!(counts.diverged_checkpoints, 1);
    assert_eq!(counts.applied_checkpoints, backup.vm.applied.len() as u64);
    assert_eq!(backup.vm.applied.last(), Some(&60_000_000), "repaired: the final checkpoint was applied");
}

/// A primary and its backup through a proxy; the cable is cut once the backup applied a few
/// checkpoints, and the backup takes over. Returns the backup's side (running as the new
/// primary), the primary's, and the status just after the takeover.
fn take_over(dir: &Dir, backup_end: u64) -> (Side, Side, Status) {
    let (listener, addr) = listener();
    let proxy = Proxy::start(addr);
    let side = backup(dir, "backup", FakeVm::new(1_000_000, backup_end, 7).slow(Duration::from_millis(1)), listener);
    let primary = primary(dir, FakeVm::new(1_000_000, u64::MAX, 7).slow(Duration::from_millis(1)), proxy.addr);
    side.wait_for("protected, three checkpoints applied", |s| {
        s.backup.as_ref().is_some_and(|b| b.state_generation == Some(1) && b.applied_epoch >= Some(3))
    });
    proxy.cut();
    let live = side.wait_for("the takeover", |s| s.took_over.is_some());
    (side, primary, live)
}

#[test]
fn a_takeover_is_a_change_of_mode_and_the_same_driver_runs_the_vm_on_from_the_last_checkpoint() {
    let dir = Dir::new("takeover");
    let (side, primary, live) = take_over(&dir, 100_000_000);
    assert_eq!((live.role, live.mode, live.backup), (Role::Primary, vmm::status::Mode::None, None));
    let took_over = live.took_over.clone().unwrap();
    assert_eq!(took_over.generation, 2, "swapped from the generation the backup's state belonged to");
    assert!(took_over.epoch >= 3, "{took_over:?}");
    assert_eq!(took_over.diverged_checkpoints, 0);
    assert_eq!(primary.ask(Command::Stop).status, 200);
    let (backup, primary) = (side.join(), primary.join());
    // Its end settles without releasing what it held: the record is the new primary's.
    assert_eq!(primary.outcome, Outcome::Stopped);
    assert_eq!(backup.outcome, Outcome::PowerOff { code: 7 });
    let from = *backup.vm.applied.last().expect("a checkpoint to go live from");
    assert_eq!(backup.console.numbers(), multiples(1_000_000, from, 100_000_000), "runs on from the checkpoint");
    let left = primary.console.numbers();
    assert_eq!(left, multiples(1_000_000, 0, left.last().copied().unwrap_or(0)), "the primary's outputs, in order");
    assert!(left.last().is_none_or(|&last| last <= from), "an output left the old primary after icount {from}");
    assert_eq!(dir.record(), Some((3, Some(7))), "the new primary marked the record ended");
}

#[test]
fn a_backup_that_took_over_can_be_protected_again_and_its_new_backup_stands_down_at_the_end() {
    let dir = Dir::new("reprotect");
    let (side, primary, _) = take_over(&dir, 400_000_000);
    assert_eq!(primary.ask(Command::Stop).status, 200);
    let (listener, addr) = listener();
    let fresh = backup(&dir, "fresh", FakeVm::new(1_000_000, u64::MAX, 0), listener);
    let protect = ProtectRequest {
        to: addr.to_string(),
        key: dir.key(),
        epoch_ms: 5,
        on_backup_loss: replica::BackupLossPolicy::Hold,
        mode: vmm::control::ProtectMode::Checkpoint,
    };
    let reply = side.ask(Command::Protect(protect));
    assert_eq!((reply.status, &reply.body["generation"]), (200, &2.into()), "{:?}", reply.body);
    fresh.wait_for("a checkpoint applied", |s| s.backup.as_ref().and_then(|b| b.applied_epoch).is_some());
    let (fresh, live) = (fresh.join(), side.join());
    assert_eq!(live.outcome, Outcome::PowerOff { code: 7 });
    assert_eq!(fresh.outcome, Outcome::StoodDown(StandDown::EndedOnPrimary { exit_code: 7 }));
    assert_eq!(fresh.vm.applied.last(), Some(&400_000_000));
    assert_eq!(primary.join().outcome, Outcome::Stopped);
    assert_eq!(dir.record().map(|r| r.1), Some(Some(7)));
}
