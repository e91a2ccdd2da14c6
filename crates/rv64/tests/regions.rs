//! Compiled regions: a block is compiled once. A region reaches the blocks after its
//! entry by links when they have code of their own, rather than compiling them again;
//! and a guest that rewrites a linked block runs the new code at once, as the
//! interpreter does, and so does code a device writes over a compiled loop. User code is
//! hot sooner than the rest.

mod common;

use common::*;
use rv64::{Cpu, Exit, HartConfig, HartState, JitConfig};

const LOOPS: u64 = 100;
const ROUNDS: u64 = 2;
/// Where block B's first instruction is (the one the guest rewrites).
const B: u64 = CODE + 0x04;
/// Where the guest goes once the second loop ends.
const REWRITE: u64 = CODE + 0x1c;

/// E jumps to B, a loop on t0 (three instructions, compiled first, on its own). When t0
/// reaches t1 it goes on to A, a loop on a0 that runs B again each time round (B's branch
/// is taken at once now): A becomes hot with B compiled already. Then the guest rewrites
/// B's increment into 2 and runs both loops again, ROUNDS times in all, and parks.
fn program() -> Vec<u32> {
    vec![
        jal(ZERO, 4),      // 0x00 E
        addi(T0, T0, 1),   // 0x04 B
        bgeu(T0, T1, 8),   // 0x08
        jal(ZERO, -8),     // 0x0c
        addi(A0, A0, 1),   // 0x10 A
        bgeu(A0, A1, 8),   // 0x14
        jal(ZERO, -0x14),  // 0x18 -> B
        addi(S0, S0, 1),   // 0x1c REWRITE
        bgeu(S0, S1, 20),  // 0x20 -> park
        sw(T3, S2, 0),     // 0x24: B becomes addi t0, t0, 2
        addi(T0, ZERO, 0), // 0x28
        addi(A0, ZERO, 0), // 0x2c
        jal(ZERO, -0x2c),  // 0x30 -> B
        jal(ZERO, 0),      // 0x34 park
    ]
}

fn machine(cpu: Cpu) -> Machine {
    // Compiled on the hart's thread as soon as a block has run 8 times, so that what is
    // compiled when does not depend on a thread's speed.
    let jit = JitConfig { hot_threshold: 8, background: false, ..JitConfig::default() };
    let mut m = Machine::with_config(HartConfig { icount_per_tick: 10, sbi_in_monitor: false, cpu, jit });
    m.load(CODE, &program());
    m.set_x(T1, LOOPS);
    m.set_x(A1, LOOPS);
    m.set_x(S1, ROUNDS);
    m.set_x(S2, B);
    m.set_x(T3, addi(T0, T0, 2) as u64);
    m
}

/// Steps from the start to the first arrival at REWRITE: E, then B's loop (the last
/// round leaves after its branch), then A's loop, each round with B's two instructions.
const TO_REWRITE: u64 = 1 + (LOOPS - 1) * 3 + 2 + (LOOPS - 1) * (3 + 2) + 2;

fn run_to_the_end(m: &mut Machine) -> HartState {
    assert_eq!(m.run(4 * TO_REWRITE), Exit::Budget);
    m.hart.state.clone()
}

#[test]
fn a_block_with_code_is_linked_to_rather_than_compiled_again_into_the_next_region() {
    let mut jit = machine(Cpu::Jit);
    assert_eq!(jit.run(TO_REWRITE), Exit::Budget);
    assert_eq!(jit.hart.state.pc, REWRITE, "both loops ran");
    // A's loop ran B's increment too, in all but its last round.
    assert_eq!((jit.x(T0), jit.x(A0)), (2 * LOOPS - 1, LOOPS));
    let stats = jit.hart.jit_stats();
    assert_eq!(stats.blocks_compiled, 2, "B, then A: {stats:?}");
    assert_eq!(stats.instructions_translated, 6, "B's three instructions and A's, once each: {stats:?}");
    assert!(stats.compiled_instructions * 10 > TO_REWRITE * 8, "the loops ran compiled: {stats:?}");
}

#[test]
fn a_rewritten_block_that_a_region_links_to_runs_its_new_code_at_once() {
    let mut interp = machine(Cpu::Interpreter);
    let mut jit = machine(Cpu::Jit);
    let interp_state = run_to_the_end(&mut interp);
    let jit_state = run_to_the_end(&mut jit);
    assert_eq!(interp_state.pc, CODE + 0x34, "the interpreter parked");
    // The second round counted t0 by 2, from 0: B's loop left at 100 after 50 rounds,
    // and A's loop added 2 in each of its rounds but the last.
    assert_eq!((interp.x(T0), interp.x(A0), interp.x(S0)), (LOOPS + 2 * (LOOPS - 1), LOOPS, ROUNDS));
    assert_eq!(jit_state, interp_state);
    let stats = jit.hart.jit_stats();
    assert!(stats.blocks_compiled > 2, "B was compiled again after the rewrite: {stats:?}");
}

#[test]
fn a_compiled_block_given_less_budget_than_it_needs_runs_interpreted_to_the_budget() {
    let mut interp = machine(Cpu::Interpreter);
    let mut jit = machine(Cpu::Jit);
    // Both loops compiled, then the rest one instruction per run: a compiled block is
    // found (through the jump cache) at most steps, and only a one-instruction block fits.
    for m in [&mut interp, &mut jit] {
        assert_eq!(m.run(TO_REWRITE), Exit::Budget);
    }
    for step in 0..3 * TO_REWRITE {
        assert_eq!(interp.run(1), Exit::Budget);
        assert_eq!(jit.run(1), Exit::Budget);
        assert_eq!(jit.hart.state, interp.hart.state, "after {step} single steps");
    }
}

/// A two-instruction loop (addi t0; bltu t0, t1 back) in `privilege`, run `rounds` times
/// with user code hot after 8 runs and other code after 64; the blocks compiled.
fn loop_compiled_after(privilege: rv64::PrivMode, rounds: u64) -> u64 {
    let jit = JitConfig { hot_threshold: 64, user_hot_threshold: 8, background: false, ..JitConfig::default() };
    let mut m = Machine::with_config(HartConfig { icount_per_tick: 10, sbi_in_monitor: false, cpu: Cpu::Jit, jit });
    m.load(CODE, &[addi(T0, T0, 1), bltu(T0, T1, -4), jal(ZERO, 0)]);
    m.set_x(T1, rounds);
    m.set_privilege(privilege);
    assert_eq!(m.run(2 * rounds), Exit::Budget);
    assert_eq!((m.x(T0), m.privilege()), (rounds, privilege), "the loop ran where it was put");
    m.hart.jit_stats().blocks_compiled
}

#[test]
fn user_code_is_compiled_after_fewer_runs_than_kernel_code() {
    assert_eq!(loop_compiled_after(rv64::PrivMode::User, 20), 1, "user code is hot after 8 runs");
    assert_eq!(loop_compiled_after(rv64::PrivMode::Supervisor, 20), 0, "kernel code waits for 64");
    assert_eq!(loop_compiled_after(rv64::PrivMode::Supervisor, 100), 1);
}

/// Runs `m` half way to REWRITE (inside A's loop, both loops compiled), then, when
/// `dma`, writes B's increment as 3 into RAM from outside the hart (as a virtio device
/// writes guest memory between two runs), and runs as far again.
fn run_with_a_device_rewriting_b(m: &mut Machine, dma: bool) -> HartState {
    assert_eq!(m.run(TO_REWRITE / 2), Exit::Budget);
    if dma {
        m.load(B, &[addi(T0, T0, 3)]);
    }
    assert_eq!(m.run(TO_REWRITE / 2), Exit::Budget);
    m.hart.state.clone()
}

#[test]
fn code_a_device_writes_over_a_compiled_loop_runs_at_once() {
    let mut jit = machine(Cpu::Jit);
    assert_eq!(jit.run(TO_REWRITE / 2), Exit::Budget);
    let before = jit.hart.jit_stats();
    assert!(before.blocks_compiled >= 2 && before.compiled_instructions > 0, "both loops compiled: {before:?}");
    let mut jit = machine(Cpu::Jit);
    let mut interp = machine(Cpu::Interpreter);
    let mut unwritten = machine(Cpu::Interpreter);
    let jit_state = run_with_a_device_rewriting_b(&mut jit, true);
    let interp_state = run_with_a_device_rewriting_b(&mut interp, true);
    run_with_a_device_rewriting_b(&mut unwritten, false);
    assert!(interp.x(T0) > unwritten.x(T0), "the written increment ran: {} vs {}", interp.x(T0), unwritten.x(T0));
    assert_eq!(jit_state, interp_state);
    let after = jit.hart.jit_stats();
    assert!(after.blocks_compiled > before.blocks_compiled, "B was compiled again: {after:?}");
}
