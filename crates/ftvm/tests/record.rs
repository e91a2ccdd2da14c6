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

/// A recording of the default guest running `script` with a small disk of its own, in a
/// scratch directory that goes with the test.
struct Recorded {
    log: common::Scratch,
    disk: std::path::PathBuf,
    run: Output,
}

fn record(name: &str, extra: &[&str], script: &str) -> Recorded {
    let log = common::scratch("record", name);
    let disk = log.with_file_name("disk.img");
    let mut image = b"sector zero of the recorded disk".to_vec();
    image.resize(1 << 20, 0);
    std::fs::write(&disk, image).unwrap();
    let run = ftvm()
        .arg("run")
        .arg("--record")
        .arg(&*log)
        .arg("--disk")
        .arg(&disk)
        .args(["--digest", "--digest-every-ms", "200"])
        .args(extra)
        .args(["--", "sh", "-c", script])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    Recorded { log, disk, run }
}

fn replay(log: &std::path::Path, extra: &[&str]) -> Output {
    ftvm().arg("replay").arg(log).args(extra).output().unwrap()
}

/// The records of a log, read with the journal crate.
fn records(log: &std::path::Path) -> Vec<journal::Record> {
    let mut reader = journal::LogReader::open_path(log).unwrap();
    let mut out = Vec::new();
    while let Some(record) = reader.next_record().unwrap() {
        out.push(record);
    }
    out
}

const DISK_SCRIPT: &str =
    "head -c 32 /dev/vda; echo; printf WRITTEN | dd of=/dev/vda bs=1 seek=7 conv=fsync 2>/dev/null; \
     head -c 32 /dev/vda; echo";

#[test]
fn a_recorded_run_replays_with_the_same_digest_and_console_however_often() {
    let rec = record("replay.log", &[], DISK_SCRIPT);
    let console = String::from_utf8_lossy(&rec.run.stdout).to_string();
    assert_eq!(console, "sector zero of the recorded disk\nsector WRITTEN the recorded disk\n");
    // The user's disk took the run's writes; the recording kept the disk as it was.
    assert!(std::fs::read(&rec.disk).unwrap().starts_with(b"sector WRITTEN"));
    let copy = vmm::record::disk_copy_path(&rec.log);
    assert!(std::fs::read(&copy).unwrap().starts_with(b"sector zero"));
    for _ in 0..2 {
        let out = replay(&rec.log, &["--digest", "--console"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(digest_line(&out), digest_line(&rec.run));
        let replayed = String::from_utf8_lossy(&out.stdout);
        assert!(replayed.contains("sector WRITTEN the recorded disk\r\n"), "{replayed}");
        assert!(stderr(&out).contains(" digests matching"), "{}", stderr(&out));
    }
    assert!(std::fs::read(&copy).unwrap().starts_with(b"sector zero"), "a replay never writes the start contents");
    let digests = records(&rec.log).iter().filter(|r| matches!(r, journal::Record::Digest { .. })).count();
    assert!(digests >= 2, "a digest every 200 ms: {digests}");
}

#[test]
fn replay_until_starts_from_the_nearest_snapshot_and_reaches_the_recorded_digest() {
    let rec = record("seek.log", &["--snapshot-every", "0.5"], &format!("{DISK_SCRIPT}; sleep 2"));
    let log = records(&rec.log);
    let first_snapshot = log.iter().position(|r| matches!(r, journal::Record::Snapshot { .. })).expect("a snapshot");
    let (snapshot_icount, target) = log[first_snapshot + 1..]
        .iter()
        .find_map(|r| match r {
            journal::Record::Digest { state, .. } => Some((log[first_snapshot].icount(), *state)),
            _ => None,
        })
        .expect("a digest after the snapshot");
    let out = replay(&rec.log, &["--until", &target.icount.to_string(), "--digest"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stderr(&out);
    let from = text.lines().find_map(|l| l.strip_prefix("ftvm: replaying from the log's snapshot at icount "));
    let from: u64 = from.unwrap_or_else(|| panic!("no seek in {text}")).parse().unwrap();
    assert!(from >= snapshot_icount && from <= target.icount, "{text}");
    assert_eq!(digest_line(&out), format!("ftvm: digest={:032x} icount={}", target.machine, target.icount));
}

/// Copies a log record by record, changing the first entropy input's bytes.
fn with_other_entropy(from: &std::path::Path, to: &std::path::Path) -> u64 {
    let reader = journal::LogReader::open_path(from).unwrap();
    let mut writer = journal::LogWriter::create(to, reader.header()).unwrap();
    let mut changed = None;
    for record in records(from) {
        match record {
            journal::Record::Input(mut input) => {
                if let (None, machine::InputKind::Entropy(bytes)) = (changed, &mut input.kind) {
                    bytes.iter_mut().for_each(|b| *b ^= 0x55);
                    changed = Some(input.icount);
                }
                writer.input(&input).unwrap();
            }
            journal::Record::Digest { state, regions } => writer.digest(state, &regions.unwrap()).unwrap(),
            journal::Record::End { state, regions, reason } => writer.end(state, &regions.unwrap(), reason).unwrap(),
            journal::Record::Snapshot { .. } | journal::Record::Delta { .. } => {
                unreachable!("recorded without snapshots")
            }
        }
    }
    changed.expect("the guest drew entropy")
}

#[test]
fn a_changed_input_is_a_divergence_naming_the_first_digest_that_differs() {
    let rec = record("diverge.log", &[], "head -c 16 /dev/urandom | od -x | head -1");
    let altered = rec.log.with_file_name("altered.log");
    let changed_at = with_other_entropy(&rec.log, &altered);
    std::fs::copy(vmm::record::disk_copy_path(&rec.log), vmm::record::disk_copy_path(&altered)).unwrap();
    // The first digest recorded after the changed input (in the log's order: a digest taken
    // at a slice's end may carry the icount of an input stamped at the next slice's start).
    let first_digest_after = records(&rec.log)
        .iter()
        .skip_while(|r| !matches!(r, journal::Record::Input(i) if i.icount == changed_at && matches!(i.kind, machine::InputKind::Entropy(_))))
        .find_map(|r| match r {
            journal::Record::Digest { state, .. } | journal::Record::End { state, .. } => Some(state.icount),
            _ => None,
        })
        .unwrap();
    let out = replay(&altered, &[]);
    assert_eq!(out.status.code(), Some(125));
    let text = stderr(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    // Named at the first digest after the change, or earlier where the altered guest ended
    // before the recording's next digest (with frequent digests both happen, by timing).
    assert!(text.starts_with("ftvm: error: "), "{text}");
    let at: u64 = text
        .split_once("then: divergence at icount ")
        .and_then(|(_, rest)| rest.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no divergence named: {text}"));
    let what = text.split_once(&format!("divergence at icount {at}: ")).map_or("", |(_, w)| w);
    // A state digest that differs names where: the entropy went into RAM.
    let digest = at == first_digest_after
        && what.starts_with("the replay's state digest is ")
        && what.contains("; they differ in ")
        && what.contains("RAM 0x");
    let ended = (changed_at..=first_digest_after).contains(&at) && what.starts_with("the guest ended there");
    assert!(digest || ended, "changed at {changed_at}, first digest after at {first_digest_after}: {text}");
}

#[test]
fn a_damaged_or_foreign_log_is_refused_with_one_line() {
    let rec = record("bad.log", &["--seed", "1"], "echo hello");
    let bytes = std::fs::read(&*rec.log).unwrap();
    let dir = rec.log.parent().unwrap();
    let variant = |name: &str, contents: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::copy(vmm::record::disk_copy_path(&rec.log), vmm::record::disk_copy_path(&path)).unwrap();
        path
    };
    let one_line_error = |path: &std::path::Path, extra: &[&str]| {
        let out = replay(path, extra);
        assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
        let text = stderr(&out);
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("ftvm: error: ")).collect();
        assert_eq!(lines.len(), 1, "{text}");
        lines[0].to_string()
    };
    // Where the records are: cut one in its middle, damage a byte in another.
    let mut reader = journal::LogReader::open_path(&rec.log).unwrap();
    let mut starts = vec![reader.offset()];
    while reader.next_record().unwrap().is_some() {
        starts.push(reader.offset());
    }
    let cut_record = starts[starts.len() / 2] as usize;
    let truncated = variant("truncated.log", &bytes[..cut_record + 25]);
    let line = one_line_error(&truncated, &[]);
    assert!(line.contains(&format!("the log is cut short at byte {cut_record}: the ")), "{line}");
    assert!(line.contains(": replayed to icount "), "the whole records before the cut replay: {line}");

    let mut corrupt = bytes.clone();
    corrupt[cut_record + journal::FRAME_HEADER_BYTES] ^= 0x01;
    let line = one_line_error(&variant("corrupt.log", &corrupt), &[]);
    assert!(line.contains(&format!("corrupt record at byte {cut_record}: the ")), "{line}");

    let mut appended = bytes.clone();
    appended.extend_from_slice(b"more");
    let line = one_line_error(&variant("appended.log", &appended), &[]);
    assert!(
        line.ends_with(&format!("corrupt record at byte {}: there are bytes after the end record", bytes.len())),
        "{line}"
    );

    let mut other_version = bytes.clone();
    other_version[8] = 2; // before digest records held region digests
    let line = one_line_error(&variant("version.log", &other_version), &[]);
    assert!(line.ends_with("version.log: input log format version 2; this ftvm reads version 3"), "{line}");

    let other_disk = variant("disk.log", &bytes);
    std::fs::write(vmm::record::disk_copy_path(&other_disk), vec![0u8; 1 << 20]).unwrap();
    let line = one_line_error(&other_disk, &[]);
    assert!(line.contains("disk.log: the log was recorded with another disk: "), "{line}");

    // Asked for more than there is: every digest matched to the end, and the line says so.
    let end = records(&rec.log).last().map(journal::Record::icount).unwrap();
    let line = one_line_error(&rec.log, &["--until", &(end + 1).to_string()]);
    assert!(
        line.ends_with(&format!(
            "then: --until {} is past the recording's end at icount {end} (the guest powered off with status 0)",
            end + 1
        )),
        "{line}"
    );

    // A log moved without its disk copy, an empty file, no file, not a log.
    let alone = dir.join("moved").join("alone.log");
    std::fs::create_dir(alone.parent().unwrap()).unwrap();
    std::fs::write(&alone, &bytes).unwrap();
    let line = one_line_error(&alone, &[]);
    assert!(
        line.contains("alone.log: the disk's contents at the recording's start are missing: no ")
            && line.contains("bad.log.disk (a recording keeps them in FILE.disk beside the log"),
        "{line}"
    );
    let empty = variant("empty.log", b"");
    let line = one_line_error(&empty, &[]);
    assert!(line.ends_with("empty.log: not an ftvm input log: the file is empty"), "{line}");
    let line = one_line_error(&dir.join("no-such.log"), &[]);
    assert!(line.starts_with("ftvm: error: cannot open ") && line.contains("no-such.log: No such file"), "{line}");
    let line = one_line_error(&rec.disk, &[]);
    assert!(line.contains("disk.img: not an ftvm input log: it starts with [73, 65, 63,"), "{line}");

    let other_initrd = dir.join("other-initrd");
    std::fs::write(&other_initrd, b"not the recorded initrd").unwrap();
    let line = one_line_error(&rec.log, &["--initrd", other_initrd.to_str().unwrap()]);
    assert!(line.contains("the log was recorded with another initrd: "), "{line}");
}

#[test]
fn recording_over_a_file_the_run_reads_is_refused_and_leaves_it_intact() {
    let dir = common::scratch("record-overwrite", "disk.img");
    let disk = dir.to_path_buf();
    std::fs::write(&disk, vec![0x5a; 1 << 20]).unwrap();
    let refused = |args: &[&std::ffi::OsStr]| {
        let out = ftvm().args(args).stdin(std::process::Stdio::null()).output().unwrap();
        assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
        let text = stderr(&out);
        assert_eq!(text.lines().count(), 1, "{text}");
        text.trim_end().to_string()
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    // The log is the disk image itself.
    let line = refused(&[
        &os("run"),
        &os("--record"),
        disk.as_os_str(),
        &os("--disk"),
        disk.as_os_str(),
        &os("--"),
        &os("true"),
    ]);
    assert_eq!(
        line,
        format!(
            "ftvm: error: --record {}: that is the disk image this run reads, which recording would overwrite; \
             record to another file",
            disk.display()
        )
    );
    // The log's disk copy (FILE.disk) is the disk image.
    let log = dir.with_file_name("disk");
    let with_copy = dir.with_file_name("disk.disk");
    std::fs::copy(&disk, &with_copy).unwrap();
    let line = refused(&[
        &os("run"),
        &os("--record"),
        log.as_os_str(),
        &os("--disk"),
        with_copy.as_os_str(),
        &os("--"),
        &os("true"),
    ]);
    assert!(line.contains("the recording keeps the disk's start contents in "), "{line}");
    assert!(line.ends_with("disk.disk, which is the disk image this run reads; record to another file"), "{line}");
    // The log is the snapshot being restored.
    let snap = dir.with_file_name("vm.snap");
    std::fs::write(&snap, b"a snapshot's bytes").unwrap();
    let line = refused(&[&os("restore"), snap.as_os_str(), &os("--record"), snap.as_os_str()]);
    assert!(
        line.ends_with(
            "vm.snap: that is the snapshot this run reads, which recording would overwrite; record to another file"
        ),
        "{line}"
    );
    assert_eq!(std::fs::read(&disk).unwrap(), vec![0x5a; 1 << 20]);
    assert_eq!(std::fs::read(&with_copy).unwrap(), vec![0x5a; 1 << 20]);
    assert_eq!(std::fs::read(&snap).unwrap(), b"a snapshot's bytes");
}

/// A network namespace holding a TAP device for the guest and an HTTP server on the host
/// side of it (10.0.2.2:8080, serving `hello.txt`); removed, server stopped by PID, on drop.
struct TestNet {
    ns: String,
    server: std::process::Child,
    dir: common::Scratch,
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

impl TestNet {
    fn new() -> TestNet {
        let ns = format!("ftvm-record-{}", std::process::id());
        let dir = common::scratch("record-net", "hello.txt");
        std::fs::write(&*dir, "hello from the host side\n").unwrap();
        ip(&["netns", "add", &ns]);
        for args in [&["tuntap", "add", "tap0", "mode", "tap"][..], &["addr", "add", "10.0.2.2/24", "dev", "tap0"]] {
            ip(&[&["netns", "exec", &ns, "ip"][..], args].concat());
        }
        ip(&["netns", "exec", &ns, "ip", "link", "set", "tap0", "up"]);
        let server = Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-m", "http.server", "--bind", "10.0.2.2", "8080", "--directory"])
            .arg(dir.parent().unwrap())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the HTTP server");
        TestNet { ns, server, dir }
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// Read from `reader` until `needle` appears (or the stream ends); appends to `seen`.
fn read_until(reader: &mut impl std::io::Read, seen: &mut Vec<u8>, needle: &str) -> bool {
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(seen).contains(needle) {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// `ftvm run --initrd INITRD --net tap:tap0 --digest ARGS --record LOG` in namespace `ns`, its
/// console on pipes (typed input, output read as it comes), killed after `limit` if it has
/// not ended by then.
struct Live {
    child: std::process::Child,
    out: std::process::ChildStdout,
    stdin: std::process::ChildStdin,
    console: Vec<u8>,
    watchdog: std::thread::JoinHandle<()>,
}

/// How a [`Live`] run ended: its status, its whole console and its stderr.
struct Ended {
    status: std::process::ExitStatus,
    console: Vec<u8>,
    stderr: String,
}

impl Live {
    fn start(
        ns: &str,
        initrd: &std::path::Path,
        args: &[&std::ffi::OsStr],
        log: &std::path::Path,
        limit_s: u64,
    ) -> Live {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(env!("CARGO_BIN_EXE_ftvm"))
            .arg("run")
            .arg("--initrd")
            .arg(initrd)
            .args(["--net", "tap:tap0", "--digest"])
            .args(args)
            .arg("--record")
            .arg(log)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (out, stdin) = (child.stdout.take().unwrap(), child.stdin.take().unwrap());
        let pid = child.id();
        let watchdog = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(limit_s));
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        });
        Live { child, out, stdin, console: Vec::new(), watchdog }
    }

    /// Reads the console until `needle` appears; panics with what it read if it never does.
    fn until(&mut self, needle: &str) {
        let found = read_until(&mut self.out, &mut self.console, needle);
        assert!(found, "no {needle:?} on the console: {}", String::from_utf8_lossy(&self.console));
    }

    fn type_line(&mut self, line: &str) {
        use std::io::Write;
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.write_all(b"\n").unwrap();
    }

    /// Types `exit` (the guest powers off) and waits for the run to end.
    fn exit(mut self) -> Ended {
        use std::io::Read;
        self.type_line("exit");
        self.out.read_to_end(&mut self.console).unwrap();
        let status = self.child.wait().unwrap();
        let mut stderr = String::new();
        self.child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        drop(self.watchdog);
        assert_eq!(status.code(), Some(0), "{stderr}");
        Ended { status, console: self.console, stderr }
    }
}

/// How many of a log's inputs are of the kind `f` picks.
fn inputs_of(records: &[journal::Record], f: fn(&machine::InputKind) -> bool) -> usize {
    records.iter().filter(|r| matches!(r, journal::Record::Input(i) if f(&i.kind))).count()
}

/// Replays `log` with no TAP and no terminal: the same console byte for byte as `run`, the
/// same final digest, every digest of the log matching. The replay's stderr.
fn replays_like(log: &std::path::Path, run: &Ended) -> String {
    assert!(run.status.success());
    let replayed = replay(log, &["--digest", "--console"]);
    assert_eq!(replayed.status.code(), Some(0), "{}", stderr(&replayed));
    let run_digest = run.stderr.lines().find(|l| l.starts_with("ftvm: digest=")).expect("the run's digest");
    assert_eq!(digest_line(&replayed), run_digest);
    assert!(replayed.stdout == run.console, "the replay's console differs from the run's");
    let digests = records(log).iter().filter(|r| matches!(r, journal::Record::Digest { .. })).count();
    assert!(stderr(&replayed).contains(&format!("{} digests matching", digests + 1)), "{}", stderr(&replayed));
    stderr(&replayed)
}

#[test]
fn a_debian_run_with_network_traffic_and_typed_input_replays_with_the_same_digests_and_console() {
    let guest = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest");
    let test_image = guest.join("debian-test/out");
    for file in [test_image.join("initrd.cpio.gz"), test_image.join("disk.img")] {
        assert!(file.exists(), "{} missing: run `bash guest/build-debian-test.sh` (scripts/test does)", file.display());
    }
    let net = TestNet::new();
    let log = net.dir.with_file_name("debian.log");
    let disk = net.dir.with_file_name("disk.img");
    std::fs::copy(test_image.join("disk.img"), &disk).unwrap();
    let args = ["--disk".as_ref(), disk.as_os_str(), "--digest-every-ms".as_ref(), "500".as_ref()];
    let mut live = Live::start(&net.ns, &test_image.join("initrd.cpio.gz"), &args, &log, 180);
    live.until("~ # ");
    // Typed input, frames both ways (an HTTP fetch from the host), the disk read and
    // entropy drawn by a Debian program, then the shell's exit powers the guest off.
    live.type_line(
        "wget -q -T 10 -O- http://10.0.2.2:8080/hello.txt; /usr/share/ftvm/mount-disk && \
         ftvm-files /mnt/hello.txt /mnt/pattern.bin; echo typed-$((6*7))",
    );
    live.until("typed-42");
    let run = live.exit();
    let text = String::from_utf8_lossy(&run.console);
    for line in ["hello from the host side", "files: ok", "typed-42"] {
        assert!(text.contains(line), "no {line:?} in {text}");
    }
    let inputs = records(&log);
    assert!(
        inputs_of(&inputs, |k| matches!(k, machine::InputKind::NetFrame(_))) >= 3,
        "frames were received and logged"
    );
    assert!(inputs_of(&inputs, |k| matches!(k, machine::InputKind::Console(_))) >= 1, "keys were logged");
    replays_like(&log, &run);
}

#[test]
fn a_run_restored_from_a_snapshot_records_a_log_that_replays_its_console_and_digests() {
    use std::io::Write;
    use std::time::{Duration, Instant};
    let dir = common::scratch("record-restore", "vm.snap");
    let (snap, socket, out_path) = (dir.to_path_buf(), dir.with_file_name("api.sock"), dir.with_file_name("out.txt"));
    let disk = dir.with_file_name("disk.img");
    let mut image = b"sector zero of the recorded disk".to_vec();
    image.resize(1 << 20, 0);
    std::fs::write(&disk, image).unwrap();
    // A VM that ticks, waits for a line on its console, ticks on, then writes its disk;
    // saved while it waits. (Under --clock fast a `sleep 1` costs the host next to nothing:
    // a VM saved "while it ticks" had often finished its script before the pause arrived.)
    let script = format!(
        "for i in 1 2; do echo tick $i; sleep 1; done; read word; echo read $word; \
         for i in 3 4 5 6; do echo tick $i; sleep 1; done; {DISK_SCRIPT}"
    );
    let mut vm = ftvm()
        .args(["run", "--clock", "fast", "--api"])
        .arg(&socket)
        .arg("--disk")
        .arg(&disk)
        .args(["--", "sh", "-c", &script])
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&out_path).unwrap().contains("tick 2") {
        assert!(Instant::now() < deadline, "the guest never ticked");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ctl = |verb: &[&str]| ftvm().arg("ctl").arg("--api").arg(&socket).args(verb).output().unwrap();
    assert!(ctl(&["pause"]).status.success());
    let save = ftvm().args(["snapshot", "--api"]).arg(&socket).arg(&snap).output().unwrap();
    assert!(save.status.success(), "{}", stderr(&save));
    assert!(ctl(&["stop"]).status.success());
    vm.wait().unwrap();
    let snapshot_icount = machine::snapshot::read_header_from_path(&snap).unwrap().icount;

    let saved = std::fs::read_to_string(&out_path).unwrap();
    assert!(!saved.contains("read "), "the VM was saved while it waited for its line: {saved}");

    let log = dir.with_file_name("restored.log");
    let mut restore = ftvm()
        .arg("restore")
        .arg(&snap)
        .args(["--clock", "fast", "--digest", "--digest-every-ms", "0", "--disk"])
        .arg(&disk)
        .arg("--record")
        .arg(&log)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The line the restored guest waits for: typed input, recorded in the log.
    restore.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let restored = restore.wait_with_output().unwrap();
    assert_eq!(restored.status.code(), Some(0), "{}", stderr(&restored));
    let console = String::from_utf8_lossy(&restored.stdout);
    for line in ["read go", "tick 3", "tick 6", "sector WRITTEN the recorded disk"] {
        assert!(console.contains(line), "no {line:?} in {console}\n{}", stderr(&restored));
    }
    assert!(!console.contains("tick 2"), "the restored guest goes on from where it was saved: {console}");

    let header = journal::LogReader::open_path(&log).unwrap().header().clone();
    assert_eq!(header.start, journal::Start::Snapshot { icount: snapshot_icount });
    let recorded = records(&log);
    assert!(
        matches!(recorded[0], journal::Record::Snapshot { icount, .. } if icount == snapshot_icount),
        "the log's first record is the start state"
    );
    let digests = recorded.iter().filter(|r| matches!(r, journal::Record::Digest { .. })).count();
    assert!(digests >= 10, "a digest at every slice's end: {digests}");
    let typed: Vec<u8> = recorded
        .iter()
        .filter_map(|r| match r {
            journal::Record::Input(machine::Input { kind: machine::InputKind::Console(bytes), .. }) => {
                Some(bytes.clone())
            }
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(typed, b"go\n", "the typed line is an input of the log");
    let before = replay(&log, &["--until", &(snapshot_icount - 1).to_string()]);
    assert_eq!(before.status.code(), Some(125));
    assert!(
        stderr(&before).trim_end().ends_with(&format!(
            "restored.log: --until {} is before the recording's start: it starts from a snapshot at icount \
             {snapshot_icount}",
            snapshot_icount - 1
        )),
        "{}",
        stderr(&before)
    );
    for _ in 0..2 {
        let out = replay(&log, &["--digest", "--console"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(stderr(&out).contains(&format!("replaying from the log's snapshot at icount {snapshot_icount}")));
        assert_eq!(digest_line(&out), digest_line(&restored));
        assert_eq!(String::from_utf8_lossy(&out.stdout), console, "the same console, byte for byte");
    }
    assert!(
        std::fs::read(vmm::record::disk_copy_path(&log)).unwrap().starts_with(b"sector zero"),
        "the log keeps the disk as the snapshot had it"
    );
}

#[test]
fn periodic_snapshots_after_the_first_are_small_deltas_and_replay_until_seeks_through_them() {
    let script = format!("sleep 1; {DISK_SCRIPT}; sleep 2");
    let rec = record("deltas.log", &["--snapshot-every", "0.25"], &script);
    let log = records(&rec.log);
    let full = log
        .iter()
        .find_map(|r| match r {
            journal::Record::Snapshot { section, .. } => Some(section.len),
            _ => None,
        })
        .expect("a whole snapshot");
    let deltas: Vec<(u64, u64)> = log
        .iter()
        .filter_map(|r| match r {
            journal::Record::Delta { icount, section } => Some((*icount, section.len)),
            _ => None,
        })
        .collect();
    assert!(deltas.len() >= 3, "deltas between whole snapshots: {deltas:?}");
    let mut lens: Vec<u64> = deltas.iter().map(|&(_, len)| len).collect();
    lens.sort();
    // Boot rewrites much of RAM between two snapshots; a guest at work, little.
    // How many deltas fall in the boot depends on the host's speed (snapshots are taken by
    // host time); the idle tail's always are small.
    let small = lens.iter().filter(|&&len| len < full / 8).count();
    assert!(small >= 3, "deltas of {lens:?} bytes against {full} bytes whole");
    // (Whether the disk write falls in a delta or a whole snapshot depends on timing; the
    // machine's tests check deltas of disk sectors.)
    // Seek to a digest whose nearest snapshot record at or before it is a delta: the whole
    // snapshot before that restored, then the deltas up to it applied.
    let seek_record = |icount: u64| {
        log.iter()
            .rev()
            .filter(|r| matches!(r, journal::Record::Snapshot { .. } | journal::Record::Delta { .. }))
            .find(|r| r.icount() <= icount)
    };
    // `--until N` stops with every input stamped at or before N applied. The recorder takes a
    // digest at the end of a slice, before the inputs stamped where the machine stands (an
    // idle guest's clock skip comes after it): such a digest is not the state at N, so the
    // target is a digest with no input after it at its icount.
    let last_at_its_icount = |at: usize, icount: u64| {
        log[at + 1..].iter().take_while(|r| r.icount() == icount).all(|r| !matches!(r, journal::Record::Input(_)))
    };
    let (target, last_delta) = log
        .iter()
        .enumerate()
        .rev()
        .find_map(|(at, r)| match r {
            journal::Record::Digest { state: d, .. } if last_at_its_icount(at, d.icount) => {
                match seek_record(d.icount) {
                    Some(journal::Record::Delta { icount, .. }) => Some((*d, *icount)),
                    _ => None,
                }
            }
            _ => None,
        })
        .expect("a digest after a delta, the last record at its icount but for snapshots");
    let out = replay(&rec.log, &["--until", &target.icount.to_string(), "--digest"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains(&format!("replaying from the log's snapshot at icount {last_delta} (its snapshot at icount ")),
        "{text}"
    );
    assert_eq!(digest_line(&out), format!("ftvm: digest={:032x} icount={}", target.machine, target.icount));
    // And the whole log still replays from boot, deltas passed over.
    let whole = replay(&rec.log, &["--digest"]);
    assert_eq!(whole.status.code(), Some(0), "{}", stderr(&whole));
    assert_eq!(digest_line(&whole), digest_line(&rec.run));
}

/// A recording's end record says how the run ended — the guest powering off with its
/// status, `ctl stop`, a SIGTERM (which stops the run as `ctl stop` does) — and the replay
/// ends the same way, at the same digest.
#[test]
fn a_recording_says_whether_the_guest_powered_off_or_the_run_was_stopped_and_its_replay_agrees() {
    use std::io::Read;
    let dir = common::scratch("record-ends", "api.sock");
    let ticking = "while true; do echo tick; sleep 0.2; done";
    let end_of = |log: &std::path::Path| match records(log).last() {
        Some(journal::Record::End { reason, .. }) => *reason,
        other => panic!("the log ends with {other:?}"),
    };
    let replays_to = |log: &std::path::Path, run_stderr: &str| {
        let out = replay(log, &["--digest"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let run_digest = run_stderr.lines().find(|l| l.starts_with("ftvm: digest=")).expect("the run's digest");
        assert_eq!(digest_line(&out), run_digest);
        let past = replay(log, &["--until", &(end_icount(log) + 1).to_string()]);
        stderr(&past).lines().find(|l| l.starts_with("ftvm: error: ")).expect("an error line").to_string()
    };

    // The guest powers off with its command's status.
    let log = dir.with_file_name("poweroff.log");
    let run = ftvm()
        .args(["run", "--digest", "--record"])
        .arg(&log)
        .args(["--", "sh", "-c", "echo bye; exit 3"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(3), "{}", stderr(&run));
    assert_eq!(end_of(&log), journal::EndReason::PowerOff { code: 3 });
    let line = replays_to(&log, &stderr(&run));
    assert!(line.ends_with("(the guest powered off with status 3)"), "{line}");

    // Stopped from outside while it runs: by the control API, then by SIGTERM.
    let socket = dir.to_path_buf();
    for how in ["ctl stop", "SIGTERM"] {
        let log = dir.with_file_name(format!("{}.log", how.replace(' ', "-")));
        let mut child = ftvm()
            .args(["run", "--digest", "--api"])
            .arg(&socket)
            .arg("--record")
            .arg(&log)
            .args(["--", "sh", "-c", ticking])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut console = Vec::new();
        assert!(read_until(&mut out, &mut console, "tick\ntick"), "no ticks: {}", String::from_utf8_lossy(&console));
        match how {
            "ctl stop" => {
                let ctl = ftvm().args(["ctl", "--api"]).arg(&socket).arg("stop").output().unwrap();
                assert!(ctl.status.success(), "{}", stderr(&ctl));
            }
            _ => {
                let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
                assert!(kill.success());
            }
        }
        out.read_to_end(&mut console).unwrap();
        let status = child.wait().unwrap();
        let mut run_stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut run_stderr).unwrap();
        assert_eq!(status.code(), Some(0), "{how}: {run_stderr}");
        assert_eq!(end_of(&log), journal::EndReason::Stopped, "{how}");
        let line = replays_to(&log, &run_stderr);
        assert!(line.ends_with("(the run was stopped)"), "{how}: {line}");
    }
}

/// The icount of a log's last record.
fn end_icount(log: &std::path::Path) -> u64 {
    records(log).last().map(journal::Record::icount).expect("a record")
}

/// A real service recorded with real traffic: Debian's redis-server started from the guest's
/// shell (typed input), Debian's redis-cli on the host counting and storing over the TAP,
/// then typed input reading what the network wrote (`redis-cli GET` inside the guest), then
/// `exit` powers the guest off. The replay, with no TAP and no terminal, prints the same
/// console byte for byte and ends at the same digest, every digest on the way matching.
#[test]
fn a_recorded_redis_server_driven_by_debians_redis_cli_replays_with_the_same_digests_and_console() {
    use common::redis::{redis_cli, redis_image, wait_pong};
    let image = redis_image();
    let net = TestNet::new();
    let log = net.dir.with_file_name("redis.log");
    let mut live = Live::start(&net.ns, &image, &["--digest-every-ms".as_ref(), "200".as_ref()], &log, 400);
    live.until("~ # ");
    live.type_line("redis-server --save '' --appendonly no --protected-mode no --daemonize yes; echo started-$((1+1))");
    live.until("started-2");
    assert!(wait_pong(&net.ns, std::time::Duration::from_secs(180)), "redis-server never answered PING");
    // Frames both ways: 300 INCRs on one connection, a SET on another.
    let last = redis_cli(&net.ns, &["-r", "300", "INCR", "n"]).expect("redis-cli INCR");
    assert!(last.ends_with("300"), "{last}");
    assert_eq!(redis_cli(&net.ns, &["SET", "word", "recorded"]).as_deref(), Some("OK"));
    // Typed input that reads what the network wrote.
    live.type_line("redis-cli GET n; redis-cli GET word; echo typed-$((6*7))");
    live.until("typed-42");
    let run = live.exit();
    let text = String::from_utf8_lossy(&run.console);
    assert!(text.contains("\"300\"\r\n\"recorded\"\r\n"), "the guest's redis-cli read what the network wrote: {text}");

    let recorded = records(&log);
    let frames = inputs_of(&recorded, |k| matches!(k, machine::InputKind::NetFrame(_)));
    assert!(frames >= 300, "the INCRs' frames were received and logged: {frames}");
    assert!(inputs_of(&recorded, |k| matches!(k, machine::InputKind::Console(_))) >= 3, "keys were logged");
    assert!(matches!(
        recorded.last(),
        Some(journal::Record::End { reason: journal::EndReason::PowerOff { code: 0 }, .. })
    ));
    let replayed = replays_like(&log, &run);
    println!("{frames} frames; {}", replayed.trim_end());
}
