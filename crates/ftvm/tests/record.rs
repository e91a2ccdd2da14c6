//! Record and replay end to end (issue 10): `ftvm run --seed` makes a live run
//! reproducible; `ftvm run --record FILE` keeps the configuration, every input and a
//! digest now and then; `ftvm replay FILE` reproduces the run, its console and its
//! digests, and refuses a damaged or foreign log with one line. These need the guest
//! image (scripts/test builds it).

mod common;
use std::process::{Command, Output};

fn ftvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ftvm"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// The `ftvm: digest=D icount=N` line of a run or replay with --digest.
fn digest_line(out: &Output) -> String {
    let text = stderr(out);
    text.lines().find(|l| l.starts_with("ftvm: digest=")).unwrap_or_else(|| panic!("no digest in {text}")).to_string()
}

#[test]
fn two_seeded_fast_runs_give_the_same_digest_and_icount() {
    let run = |seed: &str| {
        let out = ftvm()
            .args(["run", "--clock", "fast", "--seed", seed, "--digest", "--", "cat", "/proc/interrupts"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        digest_line(&out)
    };
    let first = run("7");
    assert_eq!(run("7"), first);
    assert_ne!(run("8"), first, "another seed, other entropy: another run");
}
