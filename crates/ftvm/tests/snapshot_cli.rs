//! `ftvm snapshot` and `ftvm restore`: a VM saved while running continues from the
//! snapshot, in a new process, exactly where it was.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ftvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ftvm"))
}

fn ticks(text: &str) -> Vec<u32> {
    text.lines().filter_map(|l| l.trim_end_matches('\r').strip_prefix("tick ")?.parse().ok()).collect()
}

#[test]
fn a_restored_vm_continues_where_the_snapshot_was_taken() {
    let dir = std::env::temp_dir().join(format!("ftvm-snapcli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (socket, snap, out_path) = (dir.join("api.sock"), dir.join("vm.snap"), dir.join("out.txt"));
    let out = std::fs::File::create(&out_path).unwrap();
    let script = "for i in $(seq 1 30); do echo tick $i; sleep 1; done";
    let mut vm = ftvm()
        .args(["run", "--clock", "fast", "--api"])
        .arg(&socket)
        .args(["--", "sh", "-c", script])
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while ticks(&std::fs::read_to_string(&out_path).unwrap()).len() < 5 {
        assert!(Instant::now() < deadline, "the guest never ticked");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ctl = |verb: &[&str]| ftvm().arg("ctl").arg("--api").arg(&socket).args(verb).output().unwrap();
    assert!(ctl(&["pause"]).status.success());
    let save = ftvm().args(["snapshot", "--api"]).arg(&socket).arg(&snap).output().unwrap();
    assert!(save.status.success(), "{}", String::from_utf8_lossy(&save.stderr));
    let before = ticks(&std::fs::read_to_string(&out_path).unwrap());
    assert!(ctl(&["stop"]).status.success());
    vm.wait().unwrap();

    let info = ftvm().arg("restore").arg(&snap).arg("--info").output().unwrap();
    assert!(String::from_utf8_lossy(&info.stdout)
        .contains(&format!("format version {}", machine::snapshot::FORMAT_VERSION)));
    let restored = ftvm().arg("restore").arg(&snap).args(["--clock", "fast"]).stdin(Stdio::null()).output().unwrap();
    assert_eq!(restored.status.code(), Some(0), "{}", String::from_utf8_lossy(&restored.stderr));
    let after = ticks(&String::from_utf8_lossy(&restored.stdout));
    let last = *before.last().unwrap();
    // The line being written at the snapshot may be cut; the next whole one follows it.
    assert!(after[0] == last + 1 || after[0] == last + 2, "before ended at {last}, restored began at {}", after[0]);
    assert_eq!(after, (after[0]..=30).collect::<Vec<_>>(), "the restored guest runs on to the end, in order");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn restoring_a_corrupt_or_foreign_file_is_refused_with_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("ftvm-snapcli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.snap");
    std::fs::write(&junk, b"this is not a snapshot at all, just text").unwrap();
    let out = ftvm().arg("restore").arg(&junk).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    let expected = format!(
        "ftvm: error: {}: not an ftvm snapshot: it starts with [74, 68, 69, 73, 20, 69, 73, 20], not \"FTVMSNAP\"\n",
        junk.display()
    );
    assert_eq!(stderr, expected);
    std::fs::remove_dir_all(&dir).unwrap();
}
