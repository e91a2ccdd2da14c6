//! A guest reset reboots the machine at the instruction that asked for it: RAM holds the
//! boot image again, the hart starts over, the devices are at power-on, the disk and the
//! clock go on. The reboot needs no input, so it replays, restores from a snapshot and
//! reaches a backup through checkpoints exactly. With `reboot_on_reset` off the run ends
//! at the reset, as before.
//!
//! Most tests use a tiny hand-assembled kernel (microseconds); the last one reboots the
//! Debian guest with a marker on its disk.

mod common;
use common::TempDir;
use machine::board::RAM_BASE;
use machine::checkpoint;
use machine::{Input, InputKind, Machine, MachineConfig, OutputKind, RestoreError, RunExit};

/// 2025-11-24T16:00:00Z plus a little, in ns.
const BOOT_NS: u64 = 1_764_000_000_123_456_789;
const TINY_RAM: u64 = 16 << 20;
/// Where the tiny kernel runs (RAM base + its text offset) and its marker page (the page
/// after its one-page image: zero at boot).
const ENTRY: u64 = RAM_BASE + 0x20_0000;
const ENTRY_PAGE: usize = 0x200;
const MARKER_PAGE: usize = ENTRY_PAGE + 1;
/// The device tree's page: the last 64 KiB of RAM.
const FDT_PAGE: usize = (TINY_RAM as usize - 64 * 1024) / 4096;

// --- A few instruction encodings --------------------------------------------------------

const T0: u32 = 5;
const T1: u32 = 6;
const T2: u32 = 7;
const T3: u32 = 28;
const T4: u32 = 29;
const T5: u32 = 30;

fn i_type(imm: i32, rs1: u32, funct3: u32, rd: u32, opcode: u32) -> u32 {
    ((imm as u32 & 0xfff) << 20) | (rs1 << 15) | (funct3 << 12) | (rd << 7) | opcode
}
fn addi(rd: u32, rs1: u32, imm: i32) -> u32 {
    i_type(imm, rs1, 0, rd, 0x13)
}
fn sltiu(rd: u32, rs1: u32, imm: i32) -> u32 {
    i_type(imm, rs1, 3, rd, 0x13)
}
fn lw(rd: u32, rs1: u32, imm: i32) -> u32 {
    i_type(imm, rs1, 2, rd, 0x03)
}
fn sw(rs2: u32, rs1: u32, imm: i32) -> u32 {
    let imm = imm as u32 & 0xfff;
    ((imm >> 5) << 25) | (rs2 << 20) | (rs1 << 15) | (2 << 12) | ((imm & 0x1f) << 7) | 0x23
}
fn lui(rd: u32, imm20: u32) -> u32 {
    (imm20 << 12) | (rd << 7) | 0x37
}
/// `auipc rd, 1`: rd = pc + 4 KiB.
fn auipc_page(rd: u32) -> u32 {
    (1 << 12) | (rd << 7) | 0x17
}
fn csrr(rd: u32, csr: u32) -> u32 {
    (csr << 20) | (2 << 12) | (rd << 7) | 0x73
}
/// `beq`/`bne rs1, x0` by `offset` bytes (a multiple of 2, within ±4 KiB).
fn branch_zero(funct3: u32, rs1: u32, offset: i32) -> u32 {
    let o = offset as u32;
    (((o >> 12) & 1) << 31)
        | (((o >> 5) & 0x3f) << 25)
        | (rs1 << 15)
        | (funct3 << 12)
        | (((o >> 1) & 0xf) << 8)
        | (((o >> 11) & 1) << 7)
        | 0x63
}
fn beqz(rs1: u32, offset: i32) -> u32 {
    branch_zero(0, rs1, offset)
}
fn bnez(rs1: u32, offset: i32) -> u32 {
    branch_zero(1, rs1, offset)
}
/// `j` by `offset` bytes (a multiple of 2, within ±1 MiB).
fn jal_x0(offset: i32) -> u32 {
    let o = offset as u32;
    (((o >> 20) & 1) << 31) | (((o >> 1) & 0x3ff) << 21) | (((o >> 11) & 1) << 20) | (((o >> 12) & 0xff) << 12) | 0x6f
}
const CSR_TIME: u32 = 0xc01;

/// The tiny kernel: the first boot (guest time below 8 ticks, one tick per instruction)
/// writes a marker to the page after the image and resets through the test device; a
/// later boot powers off with code 7 if the marker is gone (RAM was loaded again), with
/// code 3 if it survived.
fn program() -> Vec<u32> {
    let mut code = vec![jal_x0(64), 0];
    code.resize(16, 0); // the Image header's room
    code.extend([
        lui(T4, 0x100),      // 16: the test device
        csrr(T1, CSR_TIME),  // 17
        sltiu(T2, T1, 8),    // 18: t2 = time < 8: the first boot
        beqz(T2, 8 * 4),     // 19: later boots go to 27
        auipc_page(T0),      // 20: t0 = the marker's address
        addi(T3, 0, 1),      // 21
        sw(T3, T0, 0),       // 22: the marker
        lui(T5, 0x7),        // 23
        addi(T5, T5, 0x777), // 24: RESET
        sw(T5, T4, 0),       // 25
        jal_x0(0),           // 26
        auipc_page(T0),      // 27: 7 words after 20: the marker is 28 bytes back
        lw(T3, T0, -28),     // 28
        bnez(T3, 5 * 4),     // 29: the marker survived: go to 34
        lui(T5, 0x73),       // 30
        addi(T5, T5, 0x333), // 31: FAIL with code 7 (7 << 16 | 0x3333)
        sw(T5, T4, 0),       // 32
        jal_x0(0),           // 33
        lui(T5, 0x33),       // 34
        addi(T5, T5, 0x333), // 35: FAIL with code 3
        sw(T5, T4, 0),       // 36
        jal_x0(0),           // 37
    ]);
    code
}

fn tiny_config(dir: &TempDir) -> MachineConfig {
    let mut image = vec![0u8; 4096];
    for (i, word) in program().iter().enumerate() {
        image[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
    }
    image[8..16].copy_from_slice(&0x20_0000u64.to_le_bytes());
    image[16..24].copy_from_slice(&4096u64.to_le_bytes());
    image[56..60].copy_from_slice(b"RSC\x05");
    let path = dir.path("Image");
    std::fs::write(&path, image).unwrap();
    let mut config = MachineConfig::new(path);
    config.ram_size = TINY_RAM;
    config.icount_per_tick = 1;
    config.boot_unix_ns = BOOT_NS;
    config.bootargs = "console=ttyS0 first".into();
    config
}

/// The icount of the reset request (the output's stamp).
fn reset_icount(dir: &TempDir) -> u64 {
    let mut machine = Machine::new(&tiny_config(dir)).unwrap();
    assert_eq!(machine.run(1_000), RunExit::PowerOff { code: 7 });
    let outputs = machine.take_outputs();
    let kinds: Vec<_> = outputs.iter().map(|o| o.kind.clone()).collect();
    assert_eq!(kinds, [OutputKind::Reset, OutputKind::PowerOff { code: 7 }]);
    outputs[0].icount
}

#[test]
fn a_reset_reboots_the_machine_and_the_next_boot_starts_from_the_boot_image() {
    let dir = TempDir::new("reboot");
    let mut machine = Machine::new(&tiny_config(&dir)).unwrap();
    assert_eq!(machine.run(1_000), RunExit::PowerOff { code: 7 }, "code 3: RAM kept the marker; none: no reboot");
    assert_eq!(machine.reboots(), 1);
    assert_eq!(machine.save_state().reboots, 1);
    let mut no_reboot = tiny_config(&dir);
    no_reboot.reboot_on_reset = false;
    let mut machine = Machine::new(&no_reboot).unwrap();
    assert_eq!(machine.run(1_000), RunExit::Reset, "--no-reboot: the run ends at the reset");
    assert_eq!(machine.run(2_000), RunExit::Reset, "and stays ended");
    assert_eq!(machine.reboots(), 0);
}

#[test]
fn after_a_reboot_the_hart_is_at_its_boot_state_and_guest_time_goes_on() {
    let dir = TempDir::new("boot-state");
    let at = reset_icount(&dir);
    let mut machine = Machine::new(&tiny_config(&dir)).unwrap();
    // The reset is the store at icount `at`; the reboot follows it.
    assert_eq!(machine.run(at + 1), RunExit::Budget);
    assert_eq!(machine.reboots(), 1);
    let hart = machine.hart();
    assert_eq!(hart.state.pc, ENTRY, "at the kernel's entry");
    assert_eq!(hart.state.privilege, rv64::PrivMode::Supervisor);
    assert_eq!(hart.state.x[10], 0, "a0: the hart id");
    assert_eq!(hart.state.x[11], RAM_BASE + TINY_RAM - 64 * 1024, "a1: the device tree");
    let others = hart.state.x.iter().enumerate().filter(|&(i, _)| i != 11);
    assert!(others.into_iter().all(|(_, &r)| r == 0), "the program's registers are cleared");
    assert_eq!(machine.icount(), at + 1, "icount is the machine's timeline: it goes on");
    assert_eq!(machine.time_ticks(), at + 1, "guest time goes on (one tick per instruction here)");
    assert_eq!(machine.rtc_unix_ns(), BOOT_NS + (at + 1) * 100, "the RTC still reads boot time + guest time");
    let s = &machine.hart().state;
    assert_eq!(s.icount.wrapping_add(s.instret_offset), 0, "instret starts from 0 again, as at boot");
    assert_eq!(s.icount.wrapping_add(s.cycle_offset), 0, "and cycle");
}

#[test]
fn every_page_a_reboot_writes_is_dirty_so_a_checkpoint_brings_the_backup_along() {
    let dir = TempDir::new("dirty");
    let at = reset_icount(&dir);
    let config = tiny_config(&dir);
    let mut primary = Machine::new(&config).unwrap();
    let mut backup = Machine::new(&config).unwrap();
    assert_eq!(primary.run(at - 1), RunExit::Budget);
    checkpoint::apply(&mut backup, &checkpoint::take(&mut primary, true).unwrap()).unwrap();
    assert_eq!(primary.run(at + 1), RunExit::Budget);
    let delta = checkpoint::take(&mut primary, false).unwrap();
    let mut probe = Machine::new(&config).unwrap();
    probe.run(at + 1);
    let dirty = probe.take_dirty_pages();
    for page in [ENTRY_PAGE, MARKER_PAGE, FDT_PAGE] {
        assert!(dirty.contains(&page), "page {page:#x} is dirty after the reboot: {dirty:x?}");
    }
    checkpoint::apply(&mut backup, &delta).unwrap();
    assert_eq!(backup.digest(), primary.digest(), "the backup holds the rebooted machine");
    assert_eq!(backup.reboots(), 1);
    assert_eq!(backup.page(MARKER_PAGE).unwrap(), &[0; 4096][..], "the cleared marker reached the backup");
    assert_eq!(backup.run(1_000), RunExit::PowerOff { code: 7 }, "and it carries on as the primary would");
}

#[test]
fn a_reboot_replays_to_the_same_digest_however_the_run_is_split() {
    let dir = TempDir::new("split");
    let config = tiny_config(&dir);
    let mut whole = Machine::new(&config).unwrap();
    assert_eq!(whole.run(1_000), RunExit::PowerOff { code: 7 });
    let mut stepped = Machine::new(&config).unwrap();
    let mut exit = RunExit::Budget;
    while exit == RunExit::Budget {
        exit = stepped.run(stepped.icount() + 1);
    }
    assert_eq!(exit, RunExit::PowerOff { code: 7 });
    assert_eq!(stepped.icount(), whole.icount());
    assert_eq!(stepped.take_outputs(), whole.take_outputs());
    assert_eq!(stepped.digest(), whole.digest());
    assert_eq!(stepped.save_state(), whole.save_state());
}

#[test]
fn a_snapshot_taken_after_a_reboot_restores_the_rebooted_machine_exactly() {
    let dir = TempDir::new("snapshot");
    let at = reset_icount(&dir);
    let config = tiny_config(&dir);
    let mut machine = Machine::new(&config).unwrap();
    assert_eq!(machine.run(at + 3), RunExit::Budget);
    let mut file = std::io::Cursor::new(Vec::new());
    machine::snapshot::write_snapshot(&machine, &mut file).unwrap();
    let mut restored = machine::snapshot::read_snapshot(&mut std::io::Cursor::new(file.into_inner()), &config).unwrap();
    assert_eq!(restored.reboots(), 1);
    assert_eq!(restored.digest(), machine.digest());
    assert_eq!(machine.run(1_000), RunExit::PowerOff { code: 7 });
    assert_eq!(restored.run(1_000), RunExit::PowerOff { code: 7 });
    assert_eq!(restored.digest(), machine.digest());
}

#[test]
fn a_vm_restored_elsewhere_reboots_with_its_own_command_line() {
    // A backup or `ftvm restore` is not given the guest's command: the state carries it.
    let dir = TempDir::new("bootargs");
    let at = reset_icount(&dir);
    let primary_config = tiny_config(&dir);
    let mut primary = Machine::new(&primary_config).unwrap();
    let backup_config = MachineConfig { bootargs: "console=ttyS0 other".into(), ..primary_config };
    let mut backup = Machine::new(&backup_config).unwrap();
    assert_eq!(primary.run(at - 1), RunExit::Budget);
    checkpoint::apply(&mut backup, &checkpoint::take(&mut primary, true).unwrap()).unwrap();
    assert_eq!(backup.run(at + 1), RunExit::Budget);
    assert_eq!(backup.reboots(), 1);
    let fdt = backup.page(FDT_PAGE).unwrap();
    let has = |text: &[u8]| fdt.windows(text.len()).any(|w| w == text);
    assert!(has(b"console=ttyS0 first") && !has(b"other"), "the rebooted device tree has the primary's bootargs");
}

#[test]
fn a_state_with_more_reboots_than_instructions_or_an_unbootable_command_line_is_refused() {
    let dir = TempDir::new("check");
    let machine = Machine::new(&tiny_config(&dir)).unwrap();
    let mut state = machine.save_state();
    state.reboots = 1;
    let err = machine.check_state(&state).unwrap_err();
    assert_eq!(err.to_string(), "saved reboot count state does not fit this machine: 1 reboots by icount 0");
    let mut state = machine.save_state();
    state.bootargs = "console=ttyS0\0".into();
    let err = machine.check_state(&state).unwrap_err();
    assert!(matches!(err, RestoreError::Bootargs(_)), "{err}");
    assert_eq!(
        common::error_chain(&err),
        "the saved kernel command line cannot boot this machine: cannot build the device tree: Strings cannot contain NUL"
    );
}

#[test]
fn inputs_queued_across_a_reboot_apply_at_their_stamps() {
    let dir = TempDir::new("inputs");
    let at = reset_icount(&dir);
    let mut machine = Machine::new(&tiny_config(&dir)).unwrap();
    let skip = Input { icount: at + 2, kind: InputKind::IdleSkip { ticks: 1_000 } };
    machine.push_input(skip).unwrap();
    assert_eq!(machine.run(at + 3), RunExit::Budget);
    assert_eq!(machine.time_ticks(), at + 3 + 1_000, "the skip stamped after the reboot applied");
}

// --- The Debian guest --------------------------------------------------------------------

/// The guest's command, base64 as `ftvm.cmd` takes it: the first boot writes a marker to
/// the disk and reboots; the second finds it and exits 7. It reads:
/// `if [ "$(head -c 11 /dev/vda)" = booted-once ]; then exit 7; fi; echo booted-once > /dev/vda; sync; reboot -f`
const REBOOT_ONCE_B64: &str = "aWYgWyAiJChoZWFkIC1jIDExIC9kZXYvdmRhKSIgPSBib290ZWQtb25jZSBdOyB0aGVuIGV4aXQgNzsgZmk7IGVjaG8gYm9vdGVkLW9uY2UgPiAvZGV2L3ZkYTsgc3luYzsgcmVib290IC1m";

#[test]
fn the_debian_guest_reboots_finds_the_disk_it_wrote_and_a_snapshot_of_its_second_boot_restores_exactly() {
    let dir = TempDir::new("debian");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let debian = |disk| {
        let mut config = common::debian_config(Some(disk));
        config.bootargs = format!("console=ttyS0 quiet cryptomgr.notests ftvm.cmd={REBOOT_ONCE_B64}");
        config
    };
    let mut machine = Machine::new(&debian(disk.clone())).unwrap();
    let (mut console, mut snapshot, mut limit) = (String::new(), None, 0);
    let exit = loop {
        limit += 100_000_000;
        assert!(limit < 8_000_000_000, "no end in sight:\n{console}");
        let (exit, text) = common::drive_to_end(&mut machine, limit);
        console.push_str(&text);
        if exit != RunExit::Budget {
            break exit;
        }
        if snapshot.is_none() && machine.reboots() == 1 {
            let mut file = std::io::Cursor::new(Vec::new());
            machine::snapshot::write_snapshot(&machine, &mut file).unwrap();
            snapshot = Some(file.into_inner()); // the second boot, under way
        }
    };
    assert_eq!(exit, RunExit::PowerOff { code: 7 }, "console:\n{console}");
    assert_eq!(machine.reboots(), 1);
    assert_eq!(console.matches("ftvm: userspace up").count(), 2, "two boots:\n{console}");
    assert!(std::fs::read(&disk).unwrap().starts_with(b"booted-once\n"), "the marker is on the image file");

    let copy = dir.path("restored.img");
    std::fs::write(&copy, vec![0u8; 1 << 20]).unwrap();
    let snapshot = snapshot.expect("a snapshot between the reboot and the end");
    let mut restored = machine::snapshot::read_snapshot(&mut std::io::Cursor::new(snapshot), &debian(copy)).unwrap();
    assert_eq!(restored.reboots(), 1);
    let (exit, _) = common::drive_to_end(&mut restored, machine.icount() + 1);
    assert_eq!(exit, RunExit::PowerOff { code: 7 });
    assert_eq!(
        (restored.icount(), restored.digest()),
        (machine.icount(), machine.digest()),
        "the same end, bit for bit"
    );
}
