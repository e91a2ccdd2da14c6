//! `--cpu interp|jit` is a choice of speed only: a seeded run with the fast clock (no input
//! from outside) ends in the same state, at the same instruction count, on either engine;
//! `--stats` names the engine; a run recorded on one engine replays on the other, every
//! digest matching. These need the guest image (scripts/test builds it).

mod common;
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

#[test]
fn a_run_recorded_on_either_engine_replays_on_the_other_every_digest_matching() {
    let script = "head -c 16 /dev/urandom | od -An -tx1; head -n 3 /proc/interrupts";
    for (recorded_on, replayed_on) in [("jit", "interp"), ("interp", "jit")] {
        let log = common::scratch("cpu", &format!("{recorded_on}.log"));
        let run = Command::new(env!("CARGO_BIN_EXE_ftvm"))
            .args(["run", "--cpu", recorded_on, "--record"])
            .arg(&*log)
            .args(["--digest", "--digest-every-ms", "200", "--", "sh", "-c", script])
            .output()
            .unwrap();
        assert_eq!(run.status.code(), Some(0), "{}", String::from_utf8_lossy(&run.stderr));
        let replay = Command::new(env!("CARGO_BIN_EXE_ftvm"))
            .args(["replay", "--cpu", replayed_on, "--digest", "--console"])
            .arg(&*log)
            .output()
            .unwrap();
        let what = format!("recorded on {recorded_on}, replayed on {replayed_on}");
        assert_eq!(replay.status.code(), Some(0), "{what}: {}", String::from_utf8_lossy(&replay.stderr));
        assert_eq!(line(&replay, "ftvm: digest="), line(&run, "ftvm: digest="), "{what}");
        let text = String::from_utf8_lossy(&replay.stderr);
        assert!(text.contains(" digests matching"), "{what}: {text}");
        let console = String::from_utf8_lossy(&replay.stdout).replace("\r\n", "\n");
        assert!(console.contains(&*String::from_utf8_lossy(&run.stdout)), "{what}: the same console: {console}");
    }
}
