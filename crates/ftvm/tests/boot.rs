//! End-to-end: boot the default Debian guest and run commands in it. These need the
//! guest image (scripts/test builds it) and, for the network test, root (network
//! namespaces and a TAP device, all created here and removed afterwards).

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

fn ftvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ftvm"))
}

fn guest_out() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest/out");
    assert!(dir.join("Image").exists(), "guest image missing: run `bash guest/build.sh` (scripts/test does)");
    dir
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn uname_in_the_guest_prints_riscv64() {
    guest_out();
    let out = ftvm().args(["run", "--clock", "fast", "--", "uname", "-m"]).output().unwrap();
    assert_eq!(stdout(&out), "riscv64\n", "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn the_guest_command_exit_status_becomes_ftvm_exit_status() {
    guest_out();
    let out = ftvm()
        .args(["run", "--clock", "fast", "--", "sh", "-c", "echo 'it works'; printf partial; exit 3"])
        .output()
        .unwrap();
    assert_eq!(stdout(&out), "it works\npartial", "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(3));
}

/// A network namespace with a TAP device for the guest and an HTTP server on the
/// host side of it; removed on drop.
struct TestNet {
    ns: String,
    server: Option<Child>,
    dir: PathBuf,
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

impl TestNet {
    fn new() -> TestNet {
        let ns = format!("ftvm-e2e-{}", std::process::id());
        let dir = std::env::temp_dir().join(&ns);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hello.txt"), "hello from the host side\n").unwrap();
        ip(&["netns", "add", &ns]);
        let mut net = TestNet { ns, server: None, dir };
        net.exec(&["ip", "tuntap", "add", "tap0", "mode", "tap"]);
        net.exec(&["ip", "addr", "add", "10.0.2.2/24", "dev", "tap0"]);
        net.exec(&["ip", "link", "set", "tap0", "up"]);
        net.exec(&["ip", "link", "set", "lo", "up"]);
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &net.ns,
                "python3",
                "-m",
                "http.server",
                "--bind",
                "10.0.2.2",
                "8080",
                "--directory",
            ])
            .arg(&net.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the HTTP server");
        net.server = Some(server);
        net
    }

    fn exec(&self, args: &[&str]) {
        let mut full = vec!["netns", "exec", &self.ns];
        full.extend_from_slice(args);
        ip(&full);
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_guest_reads_its_disk_and_fetches_over_a_tap_device() {
    guest_out();
    let net = TestNet::new();
    let disk = net.dir.join("disk.img");
    let mut image = b"ftvm-disk-sector-zero".to_vec();
    image.resize(1 << 20, 0);
    std::fs::write(&disk, image).unwrap();
    let script = "head -c 21 /dev/vda; echo; wget -q -T 10 -O- http://10.0.2.2:8080/hello.txt";
    let out = Command::new("ip")
        .args(["netns", "exec", &net.ns])
        .arg(env!("CARGO_BIN_EXE_ftvm"))
        .args(["run", "--net", "tap:tap0", "--disk"])
        .arg(&disk)
        .args(["--", "sh", "-c", script])
        .output()
        .unwrap();
    assert_eq!(
        stdout(&out),
        "ftvm-disk-sector-zero\nhello from the host side\n",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
}

/// Read from `reader` until `needle` appears (or the stream ends); returns all read.
fn read_until(reader: &mut impl std::io::Read, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&seen).to_string()
}

#[test]
fn the_interactive_console_takes_typed_input_and_powers_off() {
    use std::io::Write;
    guest_out();
    let mut child =
        ftvm().args(["run", "--clock", "fast"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // A watchdog: a hung guest fails the test instead of hanging the suite.
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(240));
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
    let boot = read_until(&mut out, "~ # ");
    assert!(boot.contains("interactive shell"), "no shell prompt: {boot}");
    stdin.write_all(b"echo hello-$((6*7))\n").unwrap();
    let answer = read_until(&mut out, "hello-42");
    assert!(answer.contains("hello-42"), "{answer}");
    stdin.write_all(b"poweroff -f\n").unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    drop(watchdog);
}
