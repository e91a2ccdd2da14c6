//! What a periodic machine digest costs, incremental (region digests updated from the pages
//! and disk leaves written since the previous digest) against the same digest computed from
//! scratch (every page and every disk leaf that may hold data hashed again).
//!
//! The default Debian guest with 512 MiB of RAM and a 256 MiB disk holding 32 MiB of data:
//! a digest every 100 ms of guest time while the guest idles (light) and while it writes
//! 48 MiB of random bytes into its RAM file system (heavy), plus a synthetic heavy slice
//! (16384 scattered pages, then 16 MiB of the disk, written behind the guest's back). Prints
//! figures; asserts only that the two digests agree, never anything about timing.
//!
//! `cargo bench --profile release -p machine --bench digest` (the release profile: the
//! bench profile would rebuild everything with LTO).

use machine::{DiskConfig, Input, InputKind, Machine, MachineConfig, OutputKind, RunExit};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Guest time between two digests, in timer ticks (10 MHz): 100 ms.
const SLICE_TICKS: u64 = 1_000_000;

fn main() {
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest/out");
    if !out.join("Image").exists() {
        eprintln!("guest image missing: run `bash guest/build.sh`");
        std::process::exit(2);
    }
    let dir = std::env::temp_dir().join(format!("ftvm-digest-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).and_then(|f| f.set_len(256 << 20)).expect("a sparse disk image");

    let script = "echo ready; sleep 2; dd if=/dev/urandom of=/big bs=1M count=48 2>/dev/null; echo done; sleep 1000";
    let mut config = MachineConfig::new(out.join("Image"));
    config.initrd = Some(out.join("initramfs.cpio.gz"));
    config.bootargs = format!("console=ttyS0 quiet cryptomgr.notests ftvm.cmd={}", base64(script));
    config.ram_size = 512 << 20;
    config.disk = Some(DiskConfig { path: disk, read_only: false });
    let mut machine = Machine::new(&config).expect("the guest machine");
    let data: Vec<u8> = (0..32u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    machine.write_sectors(0, &data).expect("the disk's data");

    let mut console = Vec::new();
    run_until(&mut machine, &mut console, "ready");
    println!("digest of 512 MiB RAM + a 256 MiB disk holding 32 MiB, at icount {}", machine.icount());
    let full = median_ms(5, || {
        machine.digest_from_scratch();
    });
    let one_pass = median_ms(5, || {
        std::hint::black_box(xxhash_rust::xxh3::xxh3_128(machine.ram().as_slice()));
    });
    let start = Instant::now();
    machine.digest();
    let first = ms(start.elapsed());
    println!(
        "for comparison, one XXH3-128 pass over the 512 MiB of RAM alone (as the old digest did): {one_pass:.1} ms"
    );
    println!("from scratch: {full:.1} ms (median of 5); first incremental digest (builds the regions): {first:.1} ms");
    println!();
    println!(
        "{:<28} {:>7} {:>10} {:>10} {:>12} {:>10}",
        "slice (100 ms guest time)", "digests", "pages", "disk leaves", "incremental", "scratch"
    );

    let mut light = Vec::new();
    for _ in 0..10 {
        run_ticks(&mut machine, &mut console, SLICE_TICKS);
        light.push(measure(&machine));
    }
    report("guest idle (light)", &light);

    let mut heavy = Vec::new();
    while !String::from_utf8_lossy(&console).contains("done") && heavy.len() < 400 {
        run_ticks(&mut machine, &mut console, SLICE_TICKS);
        heavy.push(measure(&machine));
    }
    // Only the slices in which the guest wrote much: dd's, not the sleep before it.
    heavy.retain(|s| s.pages >= 256);
    report("guest dd 48 MiB (heavy)", &heavy);

    let (mut pages_only, mut disk_only) = (Vec::new(), Vec::new());
    for round in 0..3u64 {
        let pages = machine.ram().page_count() as u64;
        for i in 0..16384u64 {
            let index = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(round) >> 7) % pages;
            machine.write_page(index as usize, &[(i + round) as u8 | 1; 4096]).expect("a page in RAM");
        }
        pages_only.push(measure(&machine));
        let at = (round * 16 + 40) << 11; // 16 MiB of the disk
        machine.write_sectors(at, &vec![round as u8 + 1; 16 << 20]).expect("sectors on the disk");
        disk_only.push(measure(&machine));
    }
    report("16384 scattered pages", &pages_only);
    // The floor: hashing those very pages and nothing else (scattered pages cost far more
    // per byte than a sequential pass: the memory system, not the digest's bookkeeping).
    let ram = machine.ram().as_slice();
    let page_count = machine.ram().page_count() as u64;
    let floor = median_ms(3, || {
        for i in 0..16384u64 {
            let index = ((i.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(2) >> 7) % page_count) as usize;
            std::hint::black_box(xxhash_rust::xxh3::xxh3_64(&ram[index * 4096..][..4096]));
        }
    });
    println!("{:<28} {:>7} {:>10} {:>10} {:>9.2} ms", "  floor: XXH3-64 of them", 3, 16384, 0, floor);
    report("16 MiB of the disk", &disk_only);
    let _ = std::fs::remove_dir_all(&dir);
}

struct Sample {
    pages: usize,
    disk_leaves: usize,
    incremental_ms: f64,
    scratch_ms: f64,
}

/// One digest, incremental then from scratch (which must agree).
fn measure(machine: &Machine) -> Sample {
    let start = Instant::now();
    let digest = machine.digest();
    let incremental_ms = ms(start.elapsed());
    let work = machine.last_digest_work();
    let start = Instant::now();
    let scratch = machine.digest_from_scratch();
    let scratch_ms = ms(start.elapsed());
    assert_eq!(digest, scratch, "the incremental digest disagrees with the one from scratch");
    Sample { pages: work.ram_leaves, disk_leaves: work.disk_leaves, incremental_ms, scratch_ms }
}

fn report(name: &str, samples: &[Sample]) {
    if samples.is_empty() {
        println!("{name:<28} (no slice)");
        return;
    }
    let median = |f: &dyn Fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{name:<28} {:>7} {:>10.0} {:>10.0} {:>9.2} ms {:>7.1} ms   (medians)",
        samples.len(),
        median(&|s| s.pages as f64),
        median(&|s| s.disk_leaves as f64),
        median(&|s| s.incremental_ms),
        median(&|s| s.scratch_ms),
    );
}

fn median_ms(n: usize, mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let start = Instant::now();
            f();
            ms(start.elapsed())
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[n / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Run, skipping idle time, until the console shows `marker`.
fn run_until(machine: &mut Machine, console: &mut Vec<u8>, marker: &str) {
    let deadline = machine.icount() + 20_000_000_000;
    while !String::from_utf8_lossy(console).contains(marker) {
        assert!(machine.icount() < deadline, "the guest never printed {marker:?}");
        step(machine, console, u64::MAX);
    }
}

/// Run for `ticks` of guest time, skipping idle time.
fn run_ticks(machine: &mut Machine, console: &mut Vec<u8>, ticks: u64) {
    let end = machine.time_ticks() + ticks;
    while machine.time_ticks() < end {
        step(machine, console, end);
    }
}

/// One run of at most 1M instructions, idle skips capped at guest time `end_ticks`.
fn step(machine: &mut Machine, console: &mut Vec<u8>, end_ticks: u64) {
    if machine.wants_entropy() {
        let input = Input { icount: machine.icount(), kind: InputKind::Entropy(vec![7; 64]) };
        machine.push_input(input).expect("an entropy input");
    }
    let exit = machine.run(machine.icount() + 1_000_000);
    for output in machine.take_outputs() {
        if let OutputKind::Console(bytes) = output.kind {
            console.extend(bytes);
        }
    }
    match exit {
        RunExit::Idle { next_deadline_ticks } => {
            let now = machine.time_ticks();
            let to = next_deadline_ticks.unwrap_or(end_ticks).min(end_ticks).max(now + 1);
            let input = Input { icount: machine.icount(), kind: InputKind::IdleSkip { ticks: to - now } };
            machine.push_input(input).expect("an idle skip");
        }
        RunExit::Budget => {}
        other => panic!("the guest ended: {other:?}"),
    }
}

fn base64(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
