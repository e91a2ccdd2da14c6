//! The engine is a matter of speed only (DESIGN.md §4): the Debian boot on the
//! compiler and on the interpreter gives the same machine, bit for bit, at the same
//! instruction counts, however the runs are split; a machine saved on one engine
//! restores exactly on the other.

mod common;

use common::{debian_config, drive, TempDir};
use machine::{Cpu, Machine, MachineConfig, RunExit};

fn config(cpu: Cpu) -> MachineConfig {
    MachineConfig { cpu, ..debian_config(None) }
}

/// Where the two first differ, if they do: the hart, or else anything in the digest.
fn difference(interp: &Machine, jit: &Machine) -> Option<String> {
    let (a, b) = (&interp.hart().state, &jit.hart().state);
    if a != b {
        let (sa, sb) = (format!("{a:#?}"), format!("{b:#?}"));
        let lines: Vec<String> = sa
            .lines()
            .zip(sb.lines())
            .filter(|(x, y)| x != y)
            .take(8)
            .map(|(x, y)| format!("interpreter {} / compiler {}", x.trim(), y.trim()))
            .collect();
        return Some(lines.join("; "));
    }
    (interp.digest() != jit.digest()).then(|| "RAM or devices differ".to_string())
}

#[test]
fn the_boot_is_the_same_machine_on_the_compiler_and_on_the_interpreter() {
    let mut interp = Machine::new(&config(Cpu::Interpreter)).unwrap();
    let mut jit = Machine::new(&config(Cpu::Jit)).unwrap();
    // Odd budgets, so that blocks are cut everywhere; both engines take the same ones.
    let budgets = [1u64, 7, 1_000, 99_999, 1_234_567, 3_000_017, 10_000_019];
    let mut until = 0;
    let mut step = 0;
    while until < 300_000_000 {
        until += budgets[step % budgets.len()];
        step += 1;
        drive(&mut interp, until);
        drive(&mut jit, until);
        if let Some(diff) = difference(&interp, &jit) {
            panic!("the engines differ at icount {until}: {diff}");
        }
    }
    let stats = jit.hart().jit_stats();
    assert!(stats.active && stats.compiled_instructions > 50_000_000, "the compiler ran little: {stats:?}");
}

/// Save `from` and restore it into a new machine running on `cpu`.
fn restored_on(from: &Machine, cpu: Cpu) -> Machine {
    let mut to = Machine::new(&config(cpu)).unwrap();
    for i in 0..from.ram().page_count() {
        to.write_page(i, from.page(i).unwrap()).unwrap();
    }
    to.restore_state(from.save_state()).unwrap();
    to
}

#[test]
fn a_machine_saved_on_one_engine_continues_exactly_on_the_other() {
    let (n, m) = (60_000_000, 40_000_000);
    let mut straight = Machine::new(&config(Cpu::Interpreter)).unwrap();
    drive(&mut straight, n + m);
    for (first, then) in [(Cpu::Jit, Cpu::Interpreter), (Cpu::Interpreter, Cpu::Jit), (Cpu::Jit, Cpu::Jit)] {
        let mut machine = Machine::new(&config(first)).unwrap();
        drive(&mut machine, n);
        let mut restored = restored_on(&machine, then);
        assert_eq!(restored.digest(), machine.digest(), "{first:?} -> {then:?}: restore reproduces the machine");
        drive(&mut restored, n + m);
        assert_eq!(difference(&straight, &restored), None, "{first:?} -> {then:?}");
    }
}

/// A kernel whose first instruction jumps to address 0, outside RAM: the fetch faults, and
/// so does every fetch at the trap vector after it, so no instruction retires again.
fn trap_loop_config(dir: &TempDir, cpu: Cpu) -> MachineConfig {
    let mut image = vec![0u8; 4096];
    image[0..4].copy_from_slice(&0x0000_0067u32.to_le_bytes()); // jalr x0, 0(x0)
    image[8..16].copy_from_slice(&0x20_0000u64.to_le_bytes());
    image[16..24].copy_from_slice(&4096u64.to_le_bytes());
    image[56..60].copy_from_slice(b"RSC\x05");
    let path = dir.path("Image");
    std::fs::write(&path, image).unwrap();
    MachineConfig { ram_size: 16 << 20, cpu, ..MachineConfig::new(path) }
}

#[test]
fn a_guest_trapping_forever_still_hands_the_machine_back_at_every_budget() {
    let dir = TempDir::new("trap-loop");
    let mut digests = Vec::new();
    for cpu in [Cpu::Interpreter, Cpu::Jit] {
        let mut machine = Machine::new(&trap_loop_config(&dir, cpu)).unwrap();
        for until in [1_000, 1_000_001, 3_000_000] {
            assert_eq!(machine.run(until), RunExit::Budget, "{cpu:?}");
            assert_eq!(machine.icount(), until, "{cpu:?}");
        }
        let s = &machine.hart().state;
        assert_eq!(s.icount.wrapping_add(s.instret_offset), 1, "{cpu:?}: only the jump retired");
        digests.push(machine.digest());
    }
    assert_eq!(digests[0], digests[1], "the engines trap the same");
}
