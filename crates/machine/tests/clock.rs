//! The guest's clocks, on tiny hand-assembled kernels (milliseconds each): user mode may
//! read `time`, `cycle` and `instret` from boot (glibc's vDSO does).

use machine::{Machine, MachineConfig, RunExit};
use std::path::PathBuf;

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
    config
}

// --- A few instruction encodings --------------------------------------------------------

const A3: u32 = 13;
const A4: u32 = 14;
const A5: u32 = 15;
const T0: u32 = 5;
const T1: u32 = 6;

fn i_type(imm: i32, rs1: u32, funct3: u32, rd: u32, opcode: u32) -> u32 {
    ((imm as u32 & 0xfff) << 20) | (rs1 << 15) | (funct3 << 12) | (rd << 7) | opcode
}
fn auipc(rd: u32) -> u32 {
    (rd << 7) | 0x17
}
fn addi(rd: u32, rs1: u32, imm: i32) -> u32 {
    i_type(imm, rs1, 0, rd, 0x13)
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
const SRET: u32 = 0x1020_0073;
const CSR_STVEC: u32 = 0x105;
const CSR_SEPC: u32 = 0x141;
const CSR_CYCLE: u32 = 0xc00;
const CSR_TIME: u32 = 0xc01;
const CSR_INSTRET: u32 = 0xc02;

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
