//! The compiler's code cache is bounded: when it is full, all compiled code goes at once
//! and compiling starts again. A guest whose code does not fit (a hash over a buffer,
//! one loop per code page over 64 pages, three rounds) computes the same hash, and ends
//! in the same state, on a tiny cache that flushes again and again as on the interpreter.

mod common;

use common::*;
use rv64::{Cpu, Exit, HartConfig, HartState, JitConfig};

/// The code pages: one loop each, the last one going back to the first.
const PAGES: u64 = 64;
const FIRST_PAGE: u64 = RAM_BASE + 0x2_0000;
const BUFFER_WORDS: u64 = 512;
const ROUNDS: u64 = 3;
const PRIME: u64 = 0x0000_0100_0000_01b3;
/// Where the guest stores its hash when it is done.
const RESULT: u64 = DATA - 8;
const CACHE_BYTES: usize = 16 << 10;

fn buffer() -> Vec<u64> {
    let mut x = 0x1234_5678_9abc_def0u64;
    (0..BUFFER_WORDS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        })
        .collect()
}

/// The hash, computed here: what the guest must come to.
fn expected_hash() -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for _ in 0..ROUNDS {
        for k in 0..PAGES {
            for w in buffer() {
                h = (h ^ w ^ k).wrapping_mul(PRIME);
            }
        }
    }
    h
}

/// Page `k`'s code: a1 = start of the buffer; loop { h ^= word ^ k; h *= prime }; then
/// on to the next page, or (the last page) round again or store the hash and park.
fn page_code(k: u64) -> Vec<u32> {
    let mut code = vec![
        addi(A1, S2, 0),
        ld(T0, A1, 0),
        xor(A0, A0, T0),
        xori(A0, A0, k as i64),
        mul(A0, A0, A3),
        addi(A1, A1, 8),
        bltu(A1, A2, -20),
    ];
    if k + 1 < PAGES {
        code.push(jal(ZERO, 4096 - 4 * code.len() as i64));
    } else {
        code.push(addi(S0, S0, 1));
        code.push(bge(S0, S1, 8));
        code.push(jal(ZERO, -((PAGES - 1) as i64 * 4096) - 4 * code.len() as i64));
        code.push(sd(A0, S2, -8));
        code.push(jal(ZERO, 0));
    }
    code
}

fn machine(cpu: Cpu) -> Machine {
    // Compiled at first sight, on the hart's thread, into a cache far smaller than the code.
    let jit = JitConfig { hot_threshold: 0, background: false, code_cache_bytes: CACHE_BYTES, ..JitConfig::default() };
    let mut m = Machine::with_config(HartConfig { icount_per_tick: 10, sbi_in_monitor: false, cpu, jit });
    let bytes: Vec<u8> = buffer().iter().flat_map(|w| w.to_le_bytes()).collect();
    m.write_bytes(DATA, &bytes);
    for k in 0..PAGES {
        m.load(FIRST_PAGE + k * 4096, &page_code(k));
    }
    m.load(CODE, &[jal(ZERO, (FIRST_PAGE - CODE) as i64)]);
    m.set_x(A0, 0xcbf2_9ce4_8422_2325);
    m.set_x(A2, DATA + 8 * BUFFER_WORDS);
    m.set_x(A3, PRIME);
    m.set_x(S1, ROUNDS);
    m.set_x(S2, DATA);
    m
}

/// Steps the whole computation takes, and a few more at the parking loop.
fn run_to_the_end(m: &mut Machine) -> HartState {
    let per_page = 1 + 6 * BUFFER_WORDS + 1;
    let steps = 1 + ROUNDS * (PAGES * per_page + 2) + 100;
    assert_eq!(m.run(steps), Exit::Budget);
    m.hart.state.clone()
}

#[test]
fn a_guest_whose_code_overflows_the_code_cache_computes_the_same_hash() {
    let mut interp = machine(Cpu::Interpreter);
    let mut jit = machine(Cpu::Jit);
    let interp_state = run_to_the_end(&mut interp);
    let jit_state = run_to_the_end(&mut jit);
    assert_eq!(interp.read_u64(RESULT), expected_hash(), "the interpreter's hash");
    assert_eq!(jit.read_u64(RESULT), expected_hash(), "the compiled hash");
    assert_eq!(jit_state, interp_state);
    let stats = jit.hart.jit_stats();
    assert!(stats.active, "{stats:?}");
    assert!(stats.flushes >= 3, "the cache filled and was flushed: {stats:?}");
    assert!(stats.code_bytes > 4 * CACHE_BYTES as u64, "more code was made than the cache holds: {stats:?}");
    assert!(stats.compiled_instructions * 10 > interp_state.icount * 9, "it ran compiled: {stats:?}");
}
