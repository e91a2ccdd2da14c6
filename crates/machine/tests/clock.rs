//! The guest's clocks, on tiny hand-assembled kernels (milliseconds each): user mode may
//! read `time`, `cycle` and `instret` from boot (glibc's vDSO does); the Goldfish RTC
//! reads the configured boot time plus guest time and its alarm fires at the same
//! instruction whatever the run splits; a clock-rate input changes the pace of guest
//! time without moving it, and never moves it back; inputs stamped where the machine
//! stands take effect as they are pushed, so the state at an icount does not depend on
//! how many runs stopped there (a live driver runs an idle guest between its idle skips,
//! a replay or a lockstep backup pushes them back to back).

use machine::{Input, InputError, InputKind, Machine, MachineConfig, RunExit};
use std::path::PathBuf;

/// 2025-11-24T16:00:00Z plus a little, in ns: a boot time with a non-zero low half.
const BOOT_NS: u64 = 1_764_000_000_123_456_789;

/// A directory for one test's files, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("ftvm-clock-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A RISC-V Image whose code is `code` (entered in S-mode at its first instruction).
fn tiny_config(dir: &Scratch, code: &[u32]) -> MachineConfig {
    let mut image = vec![0u8; 4096];
    for (i, word) in code.iter().enumerate() {
        image[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
    }
    // The Image header's fields after the first two words: text offset, image size, magic.
    image[8..16].copy_from_slice(&0x20_0000u64.to_le_bytes());
    image[16..24].copy_from_slice(&4096u64.to_le_bytes());
    image[56..60].copy_from_slice(b"RSC\x05");
    // The header's first two words are code: the program starts with a jump over the
    // header (64 bytes), so `code[0]` must be that jump and `code[16..]` the program.
    let path = dir.0.join("Image");
    std::fs::write(&path, image).unwrap();
    let mut config = MachineConfig::new(path);
    config.ram_size = 16 << 20;
    config.boot_unix_ns = BOOT_NS;
    config
}

// --- A few instruction encodings --------------------------------------------------------

const A0: u32 = 10;
const A1: u32 = 11;
const A2: u32 = 12;
const A3: u32 = 13;
const A4: u32 = 14;
const A5: u32 = 15;
const T0: u32 = 5;
const T1: u32 = 6;

fn i_type(imm: i32, rs1: u32, funct3: u32, rd: u32, opcode: u32) -> u32 {
    ((imm as u32 & 0xfff) << 20) | (rs1 << 15) | (funct3 << 12) | (rd << 7) | opcode
}
fn s_type(imm: i32, rs2: u32, rs1: u32, funct3: u32) -> u32 {
    let imm = imm as u32 & 0xfff;
    ((imm >> 5) << 25) | (rs2 << 20) | (rs1 << 15) | (funct3 << 12) | ((imm & 0x1f) << 7) | 0x23
}
fn lui(rd: u32, imm20: u32) -> u32 {
    (imm20 << 12) | (rd << 7) | 0x37
}
fn auipc(rd: u32) -> u32 {
    (rd << 7) | 0x17
}
fn addi(rd: u32, rs1: u32, imm: i32) -> u32 {
    i_type(imm, rs1, 0, rd, 0x13)
}
fn add(rd: u32, rs1: u32, rs2: u32) -> u32 {
    (rs2 << 20) | (rs1 << 15) | (rd << 7) | 0x33
}
fn lwu(rd: u32, rs1: u32, imm: i32) -> u32 {
    i_type(imm, rs1, 6, rd, 0x03)
}
fn sw(rs2: u32, rs1: u32, imm: i32) -> u32 {
    s_type(imm, rs2, rs1, 2)
}
/// `bne rs1, x0` by `offset` bytes (a multiple of 2, within ±4 KiB).
fn bnez(rs1: u32, offset: i32) -> u32 {
    let o = offset as u32;
    (((o >> 12) & 1) << 31)
        | (((o >> 5) & 0x3f) << 25)
        | (rs1 << 15)
        | (1 << 12)
        | (((o >> 1) & 0xf) << 8)
        | (((o >> 11) & 1) << 7)
        | 0x63
}
fn csrr(rd: u32, csr: u32) -> u32 {
    (csr << 20) | (2 << 12) | (rd << 7) | 0x73
}
fn csrw(csr: u32, rs1: u32) -> u32 {
    (csr << 20) | (rs1 << 15) | (1 << 12) | 0x73
}
/// `j` by `offset` bytes (a multiple of 2, within ±1 MiB).
fn jal_x0(offset: i32) -> u32 {
    let o = offset as u32;
    (((o >> 20) & 1) << 31) | (((o >> 1) & 0x3ff) << 21) | (((o >> 11) & 1) << 20) | (((o >> 12) & 0xff) << 12) | 0x6f
}
const NOP: u32 = 0x0000_0013;
const SRET: u32 = 0x1020_0073;
const WFI: u32 = 0x1050_0073;
const CSR_STVEC: u32 = 0x105;
const CSR_SEPC: u32 = 0x141;
const CSR_CYCLE: u32 = 0xc00;
const CSR_TIME: u32 = 0xc01;
const CSR_INSTRET: u32 = 0xc02;
const RTC_PAGE: u32 = 0x101; // lui of 0x101000

/// The image: a jump over the 64-byte header, then `program`.
fn image(program: &[u32]) -> Vec<u32> {
    let mut code = vec![jal_x0(64), 0];
    code.resize(16, 0);
    code.extend_from_slice(program);
    code
}

fn reg(machine: &Machine, r: u32) -> u64 {
    machine.hart().state.x[r as usize]
}

fn run_to_spin(machine: &mut Machine, budget: u64) {
    assert_eq!(machine.run(budget), RunExit::Budget);
}

#[test]
fn user_mode_reads_time_cycle_and_instret_from_boot() {
    let dir = Scratch::new("counters");
    // S-mode: stvec = a spin (a trap lands there), sepc = the user code, sret
    // (sstatus.SPP is 0 at boot: to U-mode). U-mode: rdtime, rdcycle, rdinstret, spin.
    let program = [
        auipc(T0),
        addi(T1, T0, 40),
        csrw(CSR_STVEC, T1),
        addi(T0, T0, 24),
        csrw(CSR_SEPC, T0),
        SRET,
        csrr(A3, CSR_TIME),
        csrr(A4, CSR_CYCLE),
        csrr(A5, CSR_INSTRET),
        jal_x0(0),
        jal_x0(0), // the trap handler
    ];
    let mut machine = Machine::new(&tiny_config(&dir, &image(&program))).unwrap();
    run_to_spin(&mut machine, 100_000);
    let hart = &machine.hart().state;
    assert_eq!(hart.pc, 0x8020_0000 + 64 + 9 * 4, "spinning after the three reads, not in the trap handler");
    assert_eq!(hart.privilege, rv64::PrivMode::User, "no trap: still in user mode");
    assert!(reg(&machine, A4) > 0 && reg(&machine, A5) > 0, "cycle and instret count instructions");
    assert!(reg(&machine, A3) < 100, "time is guest time, a few ticks after boot");
}

#[test]
fn the_rtc_reads_boot_time_plus_guest_time() {
    let dir = Scratch::new("rtc-read");
    // Spin 1000 instructions' worth (a countdown loop), then read TIME_LOW, TIME_HIGH.
    let program = [
        addi(T1, 0, 500),
        addi(T1, T1, -1), // loop: t1 -= 1
        NOP,
        bnez(T1, -8),
        lui(A0, RTC_PAGE),
        lwu(A1, A0, 0),
        lwu(A2, A0, 4),
        jal_x0(0),
    ];
    let mut machine = Machine::new(&tiny_config(&dir, &image(&program))).unwrap();
    run_to_spin(&mut machine, 100_000);
    let rtc_ns = reg(&machine, A2) << 32 | reg(&machine, A1);
    let ticks_at_read = rtc_ns - BOOT_NS;
    assert_eq!(ticks_at_read % 100, 0, "whole ticks of 100 ns");
    let ticks_at_read = ticks_at_read / 100;
    // ~1500 instructions at 10 per tick: the read happened at tick ~150.
    assert!((140..=160).contains(&ticks_at_read), "the clock read {ticks_at_read} ticks after boot");
    assert_eq!(machine.rtc_unix_ns(), BOOT_NS + machine.time_ticks() * 100);
}

/// Read the clock, set the alarm 1 ms (10,000 ticks) later with its interrupt enabled,
/// then wait for interrupts (none is enabled in the hart: the guest just idles).
fn alarm_program() -> Vec<u32> {
    image(&[
        lui(A0, RTC_PAGE),
        lwu(A1, A0, 0),
        lwu(A2, A0, 4),
        lui(T1, 0xf4),
        addi(T1, T1, 0x240), // t1 = 1_000_000
        add(A1, A1, T1),
        sw(A2, A0, 0xc), // ALARM_HIGH (the low half does not carry with this boot time)
        sw(A1, A0, 0x8), // ALARM_LOW: arms it
        addi(T0, 0, 1),
        sw(T0, A0, 0x10), // IRQ_ENABLED
        WFI,
        jal_x0(-4),
    ])
}

#[test]
fn an_rtc_alarm_is_a_deadline_and_fires_when_guest_time_reaches_it() {
    let dir = Scratch::new("rtc-alarm");
    let mut machine = Machine::new(&tiny_config(&dir, &alarm_program())).unwrap();
    let RunExit::Idle { next_deadline_ticks: Some(deadline) } = machine.run(1_000_000) else {
        panic!("the guest waits for its alarm")
    };
    let read_at = (reg(&machine, A2) << 32 | reg(&machine, A1)) - 1_000_000;
    assert_eq!(deadline, (read_at + 1_000_000 - BOOT_NS) / 100, "the alarm's tick is the deadline");
    assert!(!machine.rtc().irq_pending);
    let skip = deadline - machine.time_ticks() - 1;
    machine.push_input(Input { icount: machine.icount(), kind: InputKind::IdleSkip { ticks: skip } }).unwrap();
    assert_eq!(machine.run(1_000_000), RunExit::Idle { next_deadline_ticks: Some(deadline) });
    assert!(!machine.rtc().irq_pending, "one tick early");
    machine.push_input(Input { icount: machine.icount(), kind: InputKind::IdleSkip { ticks: 1 } }).unwrap();
    let RunExit::Idle { next_deadline_ticks } = machine.run(1_000_000) else { panic!("still waiting") };
    assert_ne!(next_deadline_ticks, Some(deadline), "the alarm is no deadline once it fired");
    assert!(machine.rtc().irq_pending);
    assert!(!machine.rtc().alarm_running);
}

#[test]
fn a_busy_guest_meets_its_alarm_at_one_icount_however_runs_are_split() {
    let dir = Scratch::new("rtc-split");
    // The alarm program, with the wait replaced by a spin: the alarm must stop the run.
    let mut program = alarm_program();
    let n = program.len();
    program[n - 2] = NOP;
    let fired_at = |slice: u64| {
        let mut machine = Machine::new(&tiny_config(&dir, &program)).unwrap();
        while !machine.rtc().irq_pending {
            let target = machine.icount() + slice;
            assert_eq!(machine.run(target), RunExit::Budget);
        }
        machine.icount()
    };
    // Seen after the first run that passes the alarm's icount (a run that ends exactly
    // there leaves it for the next run to fire before anything else).
    let reference = fired_at(1);
    assert!((100_000..100_100).contains(&reference), "10,000 ticks of 10 instructions: {reference}");
    for slice in [7, 1000, 33_333, 99_999] {
        assert_eq!(fired_at(slice), reference.div_ceil(slice) * slice, "slice {slice}");
    }
}

fn spinning_machine(dir: &Scratch) -> Machine {
    Machine::new(&tiny_config(dir, &image(&[jal_x0(0)]))).unwrap()
}

fn push(machine: &mut Machine, icount: u64, kind: InputKind) {
    machine.push_input(Input { icount, kind }).unwrap();
}

#[test]
fn a_clock_rate_changes_the_pace_of_guest_time_without_moving_it() {
    let dir = Scratch::new("rate");
    let mut machine = spinning_machine(&dir);
    push(&mut machine, 1_000_000, InputKind::ClockRate { icount_per_tick: 25 });
    run_to_spin(&mut machine, 1_000_000);
    assert_eq!(machine.time_ticks(), 100_000, "10 per tick until the input");
    run_to_spin(&mut machine, 1_000_001);
    assert_eq!(machine.icount_per_tick(), 25);
    assert_eq!(machine.time_ticks(), 100_000, "the new rate does not move time");
    run_to_spin(&mut machine, 3_500_000);
    assert_eq!(machine.time_ticks(), 200_000, "2.5 M instructions at 25 per tick");
}

#[test]
fn a_rate_faster_than_time_allows_is_slowed_so_time_never_goes_back() {
    let dir = Scratch::new("rate-clamp");
    let mut machine = spinning_machine(&dir);
    // 1 M instructions at 40 per tick: 25,000 ticks. A rate of 10 would put time at
    // 100,000 ticks with a negative offset; the slowest rate that keeps it is 39.
    push(&mut machine, 0, InputKind::ClockRate { icount_per_tick: 40 });
    push(&mut machine, 1_000_000, InputKind::ClockRate { icount_per_tick: 10 });
    run_to_spin(&mut machine, 1_000_000);
    let before = machine.time_ticks();
    run_to_spin(&mut machine, 1_000_001);
    assert_eq!(machine.time_ticks(), before);
    assert_eq!(machine.icount_per_tick(), 1_000_000 / (before + 1) + 1);
    run_to_spin(&mut machine, 2_000_000);
    assert!(machine.time_ticks() > before);
}

#[test]
fn clock_rates_out_of_range_are_refused() {
    let dir = Scratch::new("rate-range");
    let mut machine = spinning_machine(&dir);
    for bad in [0, machine::machine::MAX_ICOUNT_PER_TICK + 1] {
        let input = Input { icount: 0, kind: InputKind::ClockRate { icount_per_tick: bad } };
        assert_eq!(machine.push_input(input), Err(InputError::ClockRate(bad)));
    }
}

/// The machine's state where it stands, and its guest time.
fn state_at(machine: &Machine) -> (u64, u64, u128) {
    (machine.icount(), machine.time_ticks(), machine.digest().0)
}

#[test]
fn inputs_at_the_icount_where_the_machine_stands_need_no_run_to_take_effect() {
    let dir = Scratch::new("idle-inputs");
    // The guest arms its RTC alarm and waits for interrupts, none enabled in the hart: it
    // idles at one icount for good, and the last skip passes the alarm.
    let config = tiny_config(&dir, &alarm_program());
    let inputs = [
        InputKind::IdleSkip { ticks: 200 },
        InputKind::ClockRate { icount_per_tick: 20 },
        InputKind::IdleSkip { ticks: 50 },
        InputKind::IdleSkip { ticks: 20_000 },
    ];
    // A live driver (a lockstep primary, a keeper's monitor: idle waits cut short): each
    // input stamped, then a run that idles at once; the state looked at after the last run.
    let mut live = Machine::new(&config).unwrap();
    let RunExit::Idle { .. } = live.run(1_000_000) else { panic!("the guest idles") };
    let at = live.icount();
    for kind in inputs.clone() {
        push(&mut live, at, kind);
        assert!(matches!(live.run(at + 1_000), RunExit::Idle { .. }), "still idle");
        assert_eq!(live.icount(), at);
    }
    assert!(live.rtc().irq_pending, "the alarm fired");
    // A replay or a lockstep backup: run to the stamp, then the inputs back to back.
    let mut follower = Machine::new(&config).unwrap();
    assert!(matches!(follower.run(at), RunExit::Budget | RunExit::Idle { .. }));
    assert_eq!(follower.icount(), at);
    for kind in inputs {
        push(&mut follower, at, kind);
    }
    assert_eq!(state_at(&follower), state_at(&live), "the same inputs at the same icount: the same state");
    assert!(follower.rtc().irq_pending);
    // And on from there alike.
    follower.run(at + 1_000);
    assert_eq!(state_at(&follower), state_at(&live));
}
