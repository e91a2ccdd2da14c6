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
