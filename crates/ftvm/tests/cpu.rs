//! `--cpu interp|jit` is a choice of speed only: a seeded run with the fast clock (no input
//! from outside) ends in the same state, at the same instruction count, on either engine;
//! `--stats` names the engine. These need the guest image (scripts/test builds it).

use std::process::{Command, Output};

fn run(cpu: &str) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .args(["run", "--cpu", cpu, "--clock", "fast", "--seed", "7", "--digest", "--stats", "--"])
        .args(["cat", "/proc/interrupts"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// The stderr line that starts with `prefix`.
fn line<'a>(out: &'a Output, prefix: &str) -> &'a str {
    let text = std::str::from_utf8(&out.stderr).unwrap();
    text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?} line in {text}"))
}

#[test]
fn the_debian_boot_ends_in_the_same_state_at_the_same_icount_on_either_engine() {
    let (interp, jit) = (run("interp"), run("jit"));
    assert_eq!(line(&jit, "ftvm: digest="), line(&interp, "ftvm: digest="));
    assert_eq!(jit.stdout, interp.stdout, "the same console output");
    assert!(line(&interp, "ftvm: instructions=").contains(" cpu=interp "), "{}", line(&interp, "ftvm: instr"));
    let stats = line(&jit, "ftvm: instructions=");
    assert!(stats.contains(" cpu=jit "), "{stats}");
    let share: f64 = stats.split(" compiled_share=").nth(1).and_then(|s| s.split(' ').next()).unwrap().parse().unwrap();
    assert!(share > 0.3, "the compiler ran: {stats}");
}
