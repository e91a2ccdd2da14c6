//! End-to-end with Debian's own dynamically linked programs, not only busybox: the test
//! image of guest/build-debian-test.sh (scripts/test builds it) adds Debian trixie's C
//! library, coreutils' `date`, and three programs built with Debian's riscv64 cross
//! compiler: one reads the clock through the vDSO (`rdtime` in user mode), one uses
//! threads, one reads entropy and files on the virtio disk (an ext2 file system). Each
//! program prints verdicts that any correct machine prints alike: the same programs run
//! under QEMU's TCG (qemu-system-riscv64, which scripts/test installs) must print the
//! same, line for line.

mod common;
use std::path::PathBuf;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// The three programs (the disk's file system mounted first) and Debian's `date`.
const SCRIPT: &str = "ftvm-clock && ftvm-threads && /usr/share/ftvm/mount-disk \
    && ftvm-files /mnt/hello.txt /mnt/pattern.bin && /opt/debian/bin/date -u '+info: date %s'";

fn guest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest")
}

/// The kernel, the test initrd and a fresh copy of the test disk.
struct Image {
    kernel: PathBuf,
    initrd: PathBuf,
    disk: common::Scratch,
}

fn image(name: &str) -> Image {
    let guest = guest_dir();
    let out = guest.join("debian-test/out");
    for file in [guest.join("out/Image"), out.join("initrd.cpio.gz"), out.join("disk.img")] {
        assert!(file.exists(), "{} missing: run `bash guest/build-debian-test.sh` (scripts/test does)", file.display());
    }
    let disk = common::scratch("debian", name);
    std::fs::copy(out.join("disk.img"), &*disk).unwrap();
    Image { kernel: guest.join("out/Image"), initrd: out.join("initrd.cpio.gz"), disk }
}

fn under_ftvm(image: &Image) -> (Vec<String>, i32) {
    let out = Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .arg("run")
        .arg("--initrd")
        .arg(&image.initrd)
        .arg("--disk")
        .arg(&*image.disk)
        .args(["--", "sh", "-c", SCRIPT])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    (text.lines().map(str::to_string).collect(), out.status.code().unwrap_or(-1))
}

/// The same kernel, initrd, disk and command on QEMU's virt board, as guest/README.md
/// shows; the command's lines are those between /init's markers.
fn under_qemu(image: &Image) -> (Vec<String>, i32) {
    use base64::Engine;
    let cmdline = std::fs::read_to_string(guest_dir().join("out/cmdline")).unwrap();
    let command = base64::engine::general_purpose::STANDARD.encode(SCRIPT);
    let drive = format!("file={},format=raw,if=none,id=d0", image.disk.display());
    let out = Command::new("qemu-system-riscv64")
        .args(["-machine", "virt", "-m", "512M", "-nographic", "-bios", "default", "-kernel"])
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", &format!("{} ftvm.cmd={command}", cmdline.trim())])
        .args(["-drive", &drive, "-device", "virtio-blk-device,drive=d0", "-device", "virtio-rng-device"])
        .output()
        .expect("qemu-system-riscv64 missing: install qemu-system-misc (scripts/test does)");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let lines: Vec<String> = text
        .lines()
        .skip_while(|l| !l.ends_with("ftvm: userspace up"))
        .skip(1)
        .take_while(|l| !l.starts_with("ftvm: exit "))
        .map(str::to_string)
        .collect();
    (lines, out.status.code().unwrap_or(-1))
}

fn verdicts(lines: &[String]) -> Vec<&String> {
    lines.iter().filter(|l| !l.starts_with("info: ")).collect()
}

fn info(lines: &[String], key: &str) -> f64 {
    let prefix = format!("info: {key} ");
    let line =
        lines.iter().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {prefix:?} in {lines:#?}"));
    line.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn debian_programs_read_the_clock_use_threads_and_read_entropy_and_the_disk() {
    let image = image("ftvm.img");
    let (lines, status) = under_ftvm(&image);
    assert_eq!(status, 0, "{lines:#?}");
    for verdict in ["clock: ok", "threads: ok", "files: ok", "/mnt/hello.txt: 27 bytes, fnv1a 71bf5d9ec14af56e"] {
        assert!(lines.iter().any(|l| l == verdict), "no {verdict:?} in {lines:#?}");
    }
    // The guest's wall clock is the host's: the RTC's boot time, then Linux sets its
    // clock from it in whole seconds plus half a second.
    let host = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    for key in ["realtime", "date"] {
        let guest = info(&lines, key);
        assert!((host - 60.0..=host + 1.0).contains(&guest), "{key}: guest {guest}, host {host}");
    }
}

#[test]
fn debian_programs_give_the_same_answers_under_ftvm_and_qemu() {
    let (ftvm, status) = under_ftvm(&image("ftvm.img"));
    assert_eq!(status, 0, "{ftvm:#?}");
    let (qemu, status) = under_qemu(&image("qemu.img"));
    assert_eq!(status, 0, "QEMU: {qemu:#?}");
    assert!(verdicts(&qemu).len() >= 15, "QEMU printed the programs' lines: {qemu:#?}");
    assert_eq!(verdicts(&ftvm), verdicts(&qemu));
}
