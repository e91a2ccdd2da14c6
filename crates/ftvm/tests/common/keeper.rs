//! A `--resilient` keeper's processes, seen from outside: its running monitor, not the
//! spare it keeps started ahead (argv[0] `ftvm-spare`, named `ftvm-monitor` once woken).

/// The keeper's children that run (or recover) the VM, oldest first: every child but a
/// spare that waits to be woken.
pub fn monitors(keeper: u32) -> Vec<u32> {
    let children = std::fs::read_to_string(format!("/proc/{keeper}/task/{keeper}/children")).unwrap_or_default();
    children.split_whitespace().filter_map(|p| p.parse().ok()).filter(|&pid| !waiting_spare(pid)).collect()
}

fn waiting_spare(pid: u32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let arg0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    arg0 == b"ftvm-spare" && comm.trim_end() != "ftvm-monitor"
}

/// The keeper's running monitor (not its spare), other than `not`.
pub fn monitor_of(keeper: u32, not: Option<u32>) -> u32 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let pid = monitors(keeper).first().copied();
        if let Some(pid) = pid.filter(|p| Some(*p) != not) {
            return pid;
        }
        assert!(std::time::Instant::now() < deadline, "the keeper {keeper} has no new monitor");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

pub fn sigkill(pid: u32) {
    let status = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill -KILL {pid}");
}

/// `ftvm ctl --api API VERB ARGS` for a planned handover (`rejuvenate`, `upgrade --binary
/// PATH`): the keeper's handover status it prints once done; panics (with `explain`) if
/// the handover did not happen.
pub fn handover(api: &std::path::Path, args: &[&str], explain: &dyn Fn() -> String) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .arg("ctl")
        .arg("--api")
        .arg(api)
        .args(args)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "ctl {args:?}: {stderr}\n{}", explain());
    let done: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("ctl {args:?} printed {stdout:?}: {e}"));
    assert_eq!(done["state"], "done", "{done}");
    done
}

/// A copy of this ftvm binary at `to` (another binary to upgrade to).
pub fn binary_copy(to: &std::path::Path) -> String {
    std::fs::copy(env!("CARGO_BIN_EXE_ftvm"), to).unwrap();
    to.display().to_string()
}
