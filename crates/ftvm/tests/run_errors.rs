//! `ftvm run` refuses bad input with one clear line naming the file and the problem,
//! exit status 125, and no panic — before any guest code runs.

mod common;
use common::Scratch;

use std::path::Path;
use std::process::{Command, Output};

fn ftvm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ftvm")).args(args).output().expect("run ftvm")
}

fn scratch(name: &str) -> Scratch {
    common::scratch("run-errors", name)
}

/// A file that passes the RISC-V Image header checks (text_offset 2 MiB, 4 KiB long).
fn fake_image(path: &Path, image_size: u64) {
    let mut k = vec![0u8; 4096];
    k[8..16].copy_from_slice(&0x20_0000u64.to_le_bytes());
    k[16..24].copy_from_slice(&image_size.to_le_bytes());
    k[56..60].copy_from_slice(b"RSC\x05");
    std::fs::write(path, k).unwrap();
}

/// The single error line, after checking the exit status and that nothing panicked.
fn error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(125), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert!(lines[0].starts_with("ftvm: error: "), "{stderr}");
    lines[0].to_string()
}

#[test]
fn a_missing_kernel_is_named() {
    let line = error_line(&ftvm(&["run", "--kernel", "/nonexistent/Image", "--", "true"]));
    assert_eq!(line, "ftvm: error: cannot read kernel /nonexistent/Image: No such file or directory (os error 2)");
}

#[test]
fn a_truncated_kernel_is_refused() {
    let path = scratch("truncated");
    std::fs::write(&path, b"RISCV").unwrap();
    let line = error_line(&ftvm(&["run", "--kernel", path.to_str().unwrap(), "--", "true"]));
    let expected = format!(
        "ftvm: error: cannot load kernel {}: kernel is truncated: 5 bytes, less than the 64-byte RISC-V Image header",
        path.display()
    );
    assert_eq!(line, expected);
}

#[test]
fn a_kernel_that_is_not_a_riscv_image_is_refused() {
    let path = scratch("elf");
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.resize(8192, 0);
    std::fs::write(&path, elf).unwrap();
    let line = error_line(&ftvm(&["run", "--kernel", path.to_str().unwrap(), "--", "true"]));
    let expected = format!(
        "ftvm: error: cannot load kernel {}: kernel is not a RISC-V Image: no \"RSC\\x05\" magic at offset 56 of the header",
        path.display()
    );
    assert_eq!(line, expected);
}

#[test]
fn a_missing_initrd_is_named() {
    let kernel = scratch("k-no-initrd");
    fake_image(&kernel, 0x100_0000);
    let args = ["run", "--kernel", kernel.to_str().unwrap(), "--initrd", "/nonexistent/initrd", "--", "true"];
    let line = error_line(&ftvm(&args));
    assert_eq!(line, "ftvm: error: cannot read initrd /nonexistent/initrd: No such file or directory (os error 2)");
}

#[test]
fn an_initrd_larger_than_ram_is_refused() {
    let (kernel, initrd) = (scratch("k-initrd"), scratch("big-initrd"));
    fake_image(&kernel, 0x100_0000);
    let f = std::fs::File::create(&initrd).unwrap();
    f.set_len(40 << 20).unwrap();
    let line = error_line(&ftvm(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--mem",
        "32M",
        "--",
        "true",
    ]));
    let expected = format!(
        "ftvm: error: cannot load initrd {}: initrd is 41943040 bytes but only 14614528 bytes of RAM are free between \
         the kernel and the device tree",
        initrd.display()
    );
    assert_eq!(line, expected);
}

#[test]
fn a_disk_that_cannot_be_opened_is_named() {
    let kernel = scratch("k-disk");
    fake_image(&kernel, 0x100_0000);
    let line = error_line(&ftvm(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--disk",
        "/nonexistent/disk.img",
        "--",
        "true",
    ]));
    assert_eq!(
        line,
        "ftvm: error: cannot open disk image /nonexistent/disk.img: No such file or directory (os error 2)"
    );
}

#[test]
fn a_tap_device_that_does_not_exist_is_named() {
    let kernel = scratch("k-tap");
    fake_image(&kernel, 0x100_0000);
    let line =
        error_line(&ftvm(&["run", "--kernel", kernel.to_str().unwrap(), "--net", "tap:ftvmnosuch0", "--", "true"]));
    assert_eq!(
        line,
        "ftvm: error: TAP device ftvmnosuch0 does not exist (create it first, e.g. `ip tuntap add ftvmnosuch0 mode tap`)"
    );
}

#[test]
fn a_net_spec_without_tap_prefix_is_refused() {
    let kernel = scratch("k-netspec");
    fake_image(&kernel, 0x100_0000);
    let line = error_line(&ftvm(&["run", "--kernel", kernel.to_str().unwrap(), "--net", "user", "--", "true"]));
    assert_eq!(line, "ftvm: error: --net \"user\": expected tap:NAME");
}

#[test]
fn too_little_memory_is_refused() {
    let kernel = scratch("k-mem");
    fake_image(&kernel, 0x100_0000);
    let line = error_line(&ftvm(&["run", "--kernel", kernel.to_str().unwrap(), "--mem", "1M", "--", "true"]));
    assert_eq!(line, "ftvm: error: memory size 1048576 bytes is too small: at least 16777216 bytes (16M) are needed");
}

/// More RAM than the host can give (the most a machine takes, 64G, beyond this host's memory
/// and swap): an error naming the size, not an abort with a backtrace. Skipped, saying so, on
/// a host with 64 GiB or more to give.
#[test]
fn more_memory_than_the_host_has_is_refused_naming_the_size() {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib = |field: &str| -> u64 {
        let line = meminfo.lines().find(|l| l.starts_with(field)).unwrap_or_default();
        line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let host_bytes = (kib("MemTotal:") + kib("SwapTotal:")) * 1024;
    if host_bytes >= 64 << 30 {
        eprintln!("skipped: this host has {host_bytes} bytes of memory and swap, enough for 64G");
        return;
    }
    let out = ftvm(&["run", "--mem", "64G", "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        error_line(&out),
        "ftvm: error: cannot allocate 68719476736 bytes of guest memory: the host refused (ask for less with --mem)"
    );
}

#[test]
fn a_kernel_larger_than_ram_is_refused() {
    let kernel = scratch("k-huge");
    fake_image(&kernel, 0x4000_0000);
    let line = error_line(&ftvm(&["run", "--kernel", kernel.to_str().unwrap(), "--mem", "64M", "--", "true"]));
    let expected = format!(
        "ftvm: error: cannot load kernel {}: kernel needs 1073741824 bytes at offset 0x200000 of RAM, but RAM is only \
         67108864 bytes",
        kernel.display()
    );
    assert_eq!(line, expected);
}

#[test]
fn a_malformed_memory_size_is_a_usage_error() {
    let out = ftvm(&["run", "--mem", "lots", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a size"));
}

/// Replication refuses a key too short to authenticate anything, naming the key file,
/// on both sides, before any network traffic.
#[test]
fn a_short_replication_key_is_refused_on_both_sides() {
    let key = scratch("short.key");
    std::fs::write(&key, b"abc").unwrap();
    let store = scratch("store");
    let key_arg = key.to_str().unwrap();
    let store_arg = format!("file:{}", store.display());
    let primary =
        ftvm(&["run", "--replicate-to", "127.0.0.1:9", "--key", key_arg, "--store", &store_arg, "--", "true"]);
    let line = error_line(&primary);
    assert!(line.contains(key_arg), "{line}");
    let backup = ftvm(&["backup", "--listen", "127.0.0.1:0", "--key", key_arg, "--store", &store_arg]);
    let line = error_line(&backup);
    assert!(line.contains(key_arg), "{line}");
    // Refused before the VM's ownership record was touched.
    assert!(!store.join("vm-demo.json").exists() && std::fs::read_dir(&store).map_or(true, |d| d.count() == 0));
}

/// A VM whose ownership record says another replica runs it is not started a second time.
#[test]
fn a_vm_owned_by_another_running_replica_is_refused() {
    let dir = scratch("owned");
    let mut store = store::FileStore::open(&dir).unwrap();
    let record =
        store::OwnershipRecord { generation: 1, owner: "primary-elsewhere-1".into(), state: store::VmState::Active };
    store::OwnershipStore::compare_and_swap(&mut store, "vm-taken", None, &record).unwrap();
    let spec = format!("file:{}", dir.display());
    let out = ftvm(&["run", "--store", &spec, "--vm-id", "vm-taken", "--", "true"]);
    assert_eq!(
        error_line(&out),
        "ftvm: error: VM vm-taken is running elsewhere: its ownership record (generation 1) is owned by \
         primary-elsewhere-1; stop that replica first (its record is marked ended when it stops), or give this VM \
         another --vm-id"
    );
    assert_eq!(out.status.code(), Some(125));
}

/// A VM that ran alone with a store holds a record, marked ended with its exit status.
#[test]
fn a_standalone_vm_with_a_store_marks_its_record_ended_with_its_status() {
    let dir = scratch("standalone-store");
    let spec = format!("file:{}", dir.display());
    let out = ftvm(&["run", "--clock", "fast", "--store", &spec, "--vm-id", "alone", "--", "sh", "-c", "exit 4"]);
    assert_eq!(out.status.code(), Some(4));
    let mut store = store::FileStore::open(&dir).unwrap();
    let record = store::OwnershipStore::read(&mut store, "alone").unwrap().unwrap();
    assert_eq!(record.state, store::VmState::Ended { exit_code: 4 });
    // Ended, so it may be started again.
    let again = ftvm(&["run", "--clock", "fast", "--store", &spec, "--vm-id", "alone", "--", "true"]);
    assert_eq!(again.status.code(), Some(0));
}
