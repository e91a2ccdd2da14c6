//! The driver through its two seams, without a RISC-V guest: a fake [`Vm`] that prints at
//! fixed instruction counts and powers off, and modes/observers that hold, release and
//! watch. Pins what a new mode may rely on (SEAM.md).

mod common;

use common::{Collect, FakeVm};
use machine::{Input, InputKind, Output};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use vmm::driver::{Clock, Driver, Outcome};
use vmm::host::HostEvent;
use vmm::mode::{EndProgress, Mode, ModeError, Observer};
use vmm::vm::Vm;

fn driver(vm: FakeVm) -> (Driver<FakeVm>, mpsc::Sender<HostEvent>) {
    let (tx, rx) = mpsc::channel();
    (Driver::new(vm, rx, Clock::Fast), tx)
}

#[test]
fn standalone_sends_every_output_in_order_and_ends_with_the_guests_code() {
    let (mut driver, _tx) = driver(FakeVm::new(1_000_000, 5_000_000, 3));
    let console = Collect::default();
    let outcome = driver.run(&mut console.clone()).unwrap();
    assert_eq!(outcome, Outcome::PowerOff { code: 3 });
    assert_eq!(console.text(), "1000000;2000000;3000000;4000000;5000000;");
    assert!(!driver.replicating());
}

/// Holds every output, counts slices, releases everything at the end; slices of 1.5 M.
struct HoldAll {
    held: Vec<Output>,
    released: Vec<Output>,
    slice_ends: Arc<Mutex<Vec<u64>>>,
}

impl Mode<FakeVm> for HoldAll {
    fn kind(&self) -> vmm::status::Mode {
        vmm::status::Mode::Checkpoint
    }
    fn next_slice_end(&self, icount: u64) -> u64 {
        icount + 1_500_000
    }
    fn on_outputs(&mut self, outputs: Vec<Output>) -> Vec<Output> {
        self.held.extend(outputs);
        Vec::new()
    }
    fn on_slice_end(&mut self, vm: &mut FakeVm, _idle: bool) -> Result<(), ModeError> {
        self.slice_ends.lock().unwrap().push(vm.icount());
        Ok(())
    }
    fn take_released(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.released)
    }
    fn begin_end(&mut self, _vm: &mut FakeVm, _exit_code: u32) -> Result<EndProgress, ModeError> {
        self.released.append(&mut self.held);
        Ok(EndProgress::Settled)
    }
}

#[test]
fn a_mode_decides_where_slices_end_and_what_leaves_and_the_driver_sends_what_it_releases() {
    let (mut driver, _tx) = driver(FakeVm::new(1_000_000, 4_000_000, 0));
    let slice_ends = Arc::new(Mutex::new(Vec::new()));
    driver.set_mode(Box::new(HoldAll { held: Vec::new(), released: Vec::new(), slice_ends: slice_ends.clone() }));
    assert!(driver.replicating());
    assert_eq!(driver.status().mode, vmm::status::Mode::Checkpoint);
    let console = Collect::default();
    let outcome = driver.run(&mut console.clone()).unwrap();
    assert_eq!(outcome, Outcome::PowerOff { code: 0 });
    assert_eq!(*slice_ends.lock().unwrap(), vec![1_500_000, 3_000_000, 4_000_000]);
    assert_eq!(console.text(), "1000000;2000000;3000000;4000000;", "released at the end, in order");
}

/// Sees inputs and the outputs that leave.
#[derive(Clone, Default)]
struct Watch {
    inputs: Arc<Mutex<Vec<Input>>>,
    produced: Arc<Mutex<Vec<u64>>>,
    left: Arc<Mutex<Vec<u64>>>,
    ended: Arc<Mutex<Option<u32>>>,
}

impl Observer<FakeVm> for Watch {
    fn on_input(&mut self, input: &Input) -> Result<(), ModeError> {
        self.inputs.lock().unwrap().push(input.clone());
        Ok(())
    }
    fn on_outputs_produced(&mut self, outputs: &[Output]) {
        self.produced.lock().unwrap().extend(outputs.iter().map(|o| o.icount));
    }
    fn on_output_left(&mut self, output: &Output) {
        self.left.lock().unwrap().push(output.icount);
    }
    fn on_end(&mut self, _vm: &FakeVm, exit_code: u32) {
        *self.ended.lock().unwrap() = Some(exit_code);
    }
}

#[test]
fn an_observer_sees_each_input_as_stamped_and_each_output_as_it_leaves() {
    let (mut driver, tx) = driver(FakeVm::new(1_000_000, 3_000_000, 9));
    let watch = Watch::default();
    driver.add_observer(Box::new(watch.clone()));
    // Queued before the run: delivered after the first slice, stamped at its end.
    tx.send(HostEvent::Console(b"k".to_vec())).unwrap();
    let outcome = driver.run(&mut Collect::default()).unwrap();
    assert_eq!(outcome, Outcome::PowerOff { code: 9 });
    let inputs = watch.inputs.lock().unwrap().clone();
    assert_eq!(inputs, vec![Input { icount: 2_000_000, kind: InputKind::Console(b"k".to_vec()) }]);
    assert_eq!(driver.machine.inputs, inputs, "the machine took the same input");
    assert_eq!(*watch.produced.lock().unwrap(), vec![1_000_000, 2_000_000, 3_000_000]);
    assert_eq!(*watch.left.lock().unwrap(), vec![1_000_000, 2_000_000, 3_000_000]);
    assert_eq!(*watch.ended.lock().unwrap(), Some(9));
}

/// Checkpoint mode through the seam, on a fake VM and loopback only: the primary's backup
/// never answers (a closed port), so under `Hold` nothing the guest printed leaves while it
/// runs; at the end the replication thread marks the record ended and the held outputs
/// leave, in order.
#[test]
fn checkpoint_mode_holds_every_output_until_replication_releases_it() {
    let dir = std::env::temp_dir().join(format!("vmm-mode-seam-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = vmm::replicate::OwnershipSpec {
        store: Some(format!("file:{}", dir.display())),
        vm_id: Some("vm-seam-test".into()),
        replica_name: Some("primary-test".into()),
    };
    let config = machine::MachineConfig::new("/nonexistent-kernel");
    let mut ownership = vmm::replicate::Ownership::open(&spec, &config, "primary").unwrap().unwrap();
    ownership.claim_for_start().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let options = vmm::mode::checkpoint::ReplicationOptions {
        primary: vmm::replicate::primary::PrimaryOptions {
            backup: closed,
            key: replica::PresharedKey::new(b"a test key of 32 bytes, no more.").unwrap(),
            heartbeat_ms: 10,
            on_backup_loss: replica::BackupLossPolicy::Hold,
            backup_loss_grace_ms: 50,
        },
        epoch_ms: 5,
        verify_every: 0,
    };
    let (mut driver, tx) = driver(FakeVm::new(1_000_000, 8_000_000, 4));
    driver.ownership = Some(ownership);
    driver.start_replication(options, tx.clone()).unwrap();
    drop(tx);
    let watch = Watch::default();
    let left_at_slice_ends = Arc::new(Mutex::new(Vec::new()));
    driver.add_observer(Box::new(watch.clone()));
    driver.add_observer(Box::new(CountLeft { watch: watch.clone(), seen: left_at_slice_ends.clone() }));
    assert_eq!(driver.status().mode, vmm::status::Mode::Checkpoint);
    assert_eq!(driver.status().role, vmm::status::Role::Primary);
    let console = Collect::default();
    let outcome = driver.run(&mut console.clone()).unwrap();
    assert_eq!(outcome, Outcome::PowerOff { code: 4 });
    let seen = left_at_slice_ends.lock().unwrap().clone();
    assert!(seen.len() >= 30 && seen.iter().all(|&n| n == 0), "outputs left while the guest ran: {seen:?}");
    let expected: String = (1..=8).map(|i| format!("{}000000;", i)).collect();
    assert_eq!(console.text(), expected);
    let mut reader = vmm::replicate::Ownership::open(&spec, &config, "reader").unwrap().unwrap();
    let record = reader.read().unwrap().expect("a record");
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(record.ended, Some(4), "the replication thread marks the record ended: {record:?}");
}

/// How many outputs had left at each slice end.
struct CountLeft {
    watch: Watch,
    seen: Arc<Mutex<Vec<usize>>>,
}

impl Observer<FakeVm> for CountLeft {
    fn on_slice_end(&mut self, _vm: &FakeVm) -> Result<(), ModeError> {
        self.seen.lock().unwrap().push(self.watch.left.lock().unwrap().len());
        Ok(())
    }
}
