//! Determinism of the whole machine on the real Debian kernel (DESIGN.md §2, §7):
//! the same image and the same stamped inputs give the same state, bit for bit, at
//! the same instruction counts, however the run is split; a live run's input log,
//! fed back, reproduces it — clock-rate changes included, and the real-time clock the
//! kernel reads at boot.
//!
//! These boot part of the way into Linux (a hundred million instructions or so), so
//! they need the guest image (scripts/test builds it) and an optimized build.

use machine::{Cpu, Input, InputKind, Machine, MachineConfig, RunExit};
use std::path::PathBuf;

fn guest_out() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest/out");
    assert!(dir.join("Image").exists(), "guest image missing: run `bash guest/build.sh` (scripts/test does)");
    dir
}

fn config() -> MachineConfig {
    let out = guest_out();
    let mut config = MachineConfig::new(out.join("Image"));
    config.initrd = Some(out.join("initramfs.cpio.gz"));
    config.bootargs = "console=ttyS0 quiet cryptomgr.notests ftvm.cmd=dHJ1ZQ==".into(); // `true`
    config.ram_size = 256 << 20;
    config.net_mac = Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    config.boot_unix_ns = BOOT_UNIX_NS;
    config
}

/// 2025-11-24T16:00:00.123456789Z: the RTC's time at boot in these runs.
const BOOT_UNIX_NS: u64 = 1_764_000_000_123_456_789;

/// The live driver's slices: it looks at the wall clock between them and may change the
/// guest clock's rate (here: a fixed cycle of rates, some slower and some faster than the
/// average so far, so that the machine's clamping is exercised too).
const SLICE: u64 = 7_000_000;

fn rate_for_slice(index: u64) -> u64 {
    8 + (index % 7) * 3
}

/// Run live to `until` as the driver does with the fast clock: an idle skip to the
/// next deadline whenever the guest idles, entropy whenever the RNG device asks (from
/// a fixed generator here), each recorded in `log`.
fn drive_live(machine: &mut Machine, until: u64, log: &mut Vec<Input>) -> RunExit {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    loop {
        if machine.icount().is_multiple_of(SLICE) && machine.icount() < until {
            let rate = rate_for_slice(machine.icount() / SLICE);
            let input = Input { icount: machine.icount(), kind: InputKind::ClockRate { icount_per_tick: rate } };
            machine.push_input(input.clone()).unwrap();
            log.push(input);
        }
        if machine.wants_entropy() {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let input = Input { icount: machine.icount(), kind: InputKind::Entropy(seed.to_le_bytes().repeat(8)) };
            machine.push_input(input.clone()).unwrap();
            log.push(input);
        }
        let slice_end = (machine.icount() / SLICE + 1) * SLICE;
        match machine.run(until.min(slice_end)) {
            RunExit::Idle { next_deadline_ticks: Some(deadline) } => {
                let ticks = deadline - machine.time_ticks();
                let input = Input { icount: machine.icount(), kind: InputKind::IdleSkip { ticks } };
                machine.push_input(input.clone()).unwrap();
                log.push(input);
            }
            RunExit::Budget if machine.icount() < until => {}
            other => return other,
        }
    }
}

fn injected_inputs() -> Vec<Input> {
    // An ARP request for 10.0.2.15 from 10.0.2.2, and a line typed on the console.
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x52, 0x54, 0, 0xaa, 0xbb, 0xcc, 0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&[0x52, 0x54, 0, 0xaa, 0xbb, 0xcc, 10, 0, 2, 2, 0, 0, 0, 0, 0, 0, 10, 0, 2, 15]);
    vec![
        Input { icount: 30_000_000, kind: InputKind::Console(b"x\n".to_vec()) },
        Input { icount: 60_000_000, kind: InputKind::NetFrame(frame) },
    ]
}

const CHECKPOINTS: [u64; 3] = [20_000_000, 80_000_000, 150_000_000];

/// A live run from the given injected inputs: the digest at each checkpoint, and
/// the whole input log (injected and driver-made).
fn live_run(injected: &[Input]) -> (Vec<(u64, String)>, Vec<Input>) {
    live_run_at(&config(), injected, &CHECKPOINTS)
}

fn live_run_at(config: &MachineConfig, injected: &[Input], checkpoints: &[u64]) -> (Vec<(u64, String)>, Vec<Input>) {
    let mut machine = Machine::new(config).unwrap();
    let mut log = injected.to_vec();
    for input in injected {
        machine.push_input(input.clone()).unwrap();
    }
    let digests = checkpoints
        .iter()
        .map(|&at| {
            assert_eq!(drive_live(&mut machine, at, &mut log), RunExit::Budget);
            (machine.icount(), machine.digest().to_string())
        })
        .collect();
    // Equal stamps apply in push order; a stable sort keeps it.
    log.sort_by_key(|i| i.icount);
    (digests, log)
}

/// Replay a log with the given run lengths; the digest at the end.
fn replay(log: &[Input], until: u64, slice: u64) -> (u64, String) {
    replay_with(&config(), log, until, slice)
}

fn replay_with(config: &MachineConfig, log: &[Input], until: u64, slice: u64) -> (u64, String) {
    let machine = replayed(config, log, until, slice);
    (machine.icount(), machine.digest().to_string())
}

fn replayed(config: &MachineConfig, log: &[Input], until: u64, slice: u64) -> Machine {
    let mut machine = Machine::new(config).unwrap();
    for input in log {
        machine.push_input(input.clone()).unwrap();
    }
    while machine.icount() < until {
        let target = (machine.icount() + slice).min(until);
        assert_eq!(machine.run(target), RunExit::Budget, "the log alone must carry the replay forward");
    }
    machine
}

#[test]
fn two_boots_give_identical_digests_at_the_same_instruction_counts() {
    let (a, _) = live_run(&[]);
    let (b, _) = live_run(&[]);
    assert_eq!(a, b);
    assert_eq!(a.iter().map(|(i, _)| *i).collect::<Vec<_>>(), CHECKPOINTS.to_vec());
    assert_ne!(a[0].1, a[1].1, "the machine must actually be running between checkpoints");
}

#[test]
fn injected_console_and_network_inputs_replay_identically_and_matter() {
    let inputs = injected_inputs();
    let (a, _) = live_run(&inputs);
    let (b, _) = live_run(&inputs);
    assert_eq!(a, b);
    let (without, _) = live_run(&[]);
    assert_eq!(a[0], without[0], "before the first input the runs agree");
    assert_ne!(a[2], without[2], "the inputs must change the machine");
}

#[test]
fn a_recorded_input_log_fed_back_reproduces_the_run_however_it_is_split() {
    let (live, log) = live_run(&injected_inputs());
    let end = *CHECKPOINTS.last().unwrap();
    assert_eq!(replay(&log, end, u64::MAX), live[2]);
    assert_eq!(replay(&log, end, 777_777), live[2]);
}

#[test]
fn the_log_carries_the_clock_rates_and_the_rtc_the_kernel_reads() {
    // Far enough for the kernel's RTC driver to read the clock (about 635 M instructions
    // in, with these rates): the boot time reaches guest memory.
    const END: u64 = 700_000_000;
    let (live, log) = live_run_at(&config(), &[], &[END]);
    assert!(log.iter().any(|i| matches!(i.kind, InputKind::ClockRate { .. })));
    let same = replayed(&config(), &log, END, 3_333_333);
    assert_eq!((same.icount(), same.digest().to_string()), live[0], "rates replay exactly, however split");
    let later = replayed(&MachineConfig { boot_unix_ns: BOOT_UNIX_NS + 1_000_000_000, ..config() }, &log, END, END);
    assert!(same.rtc().time_high != 0, "the kernel read the clock");
    assert_ne!(same.ram().as_slice(), later.ram().as_slice(), "the boot time reached guest memory");
}

#[test]
fn a_log_recorded_on_either_engine_replays_exactly_on_the_other() {
    // The engine is a matter of speed only: a run recorded with compiled code replays on
    // the interpreter, and the other way round, in budgets that cut blocks anywhere.
    let end = *CHECKPOINTS.last().unwrap();
    for (recorded_on, replayed_on) in [(Cpu::Jit, Cpu::Interpreter), (Cpu::Interpreter, Cpu::Jit)] {
        let (live, log) = live_run_at(&MachineConfig { cpu: recorded_on, ..config() }, &injected_inputs(), &[end]);
        let replay = replay_with(&MachineConfig { cpu: replayed_on, ..config() }, &log, end, 9_999_991);
        assert_eq!(replay, live[0], "recorded on {recorded_on:?}, replayed on {replayed_on:?}");
    }
}
