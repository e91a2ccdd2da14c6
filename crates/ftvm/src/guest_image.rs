//! The default guest image (Debian's riscv64 kernel and a busybox initramfs), built
//! by `guest/build.sh` on first use and cached under `guest/out`.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The project's guest directory: `$FTVM_GUEST_DIR`, or `guest/` of the source tree
/// this binary was built from.
pub fn guest_dir() -> PathBuf {
    match std::env::var_os("FTVM_GUEST_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../guest")),
    }
}

pub struct DefaultImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

/// The kernel command line the image was built for (guest/out/cmdline).
const FALLBACK_CMDLINE: &str = "console=ttyS0 earlycon=sbi quiet cryptomgr.notests";

/// Locate the default image, building it first if it is missing.
pub fn ensure() -> Result<DefaultImage> {
    let dir = guest_dir();
    let out = dir.join("out");
    let image =
        DefaultImage { kernel: out.join("Image"), initrd: out.join("initramfs.cpio.gz"), cmdline: String::new() };
    if !image.kernel.exists() || !image.initrd.exists() {
        build(&dir)?;
    }
    let cmdline = std::fs::read_to_string(out.join("cmdline"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| FALLBACK_CMDLINE.to_string());
    Ok(DefaultImage { cmdline, ..image })
}

/// Run guest/build.sh, showing its steps on a spinner.
fn build(dir: &std::path::Path) -> Result<()> {
    let script = dir.join("build.sh");
    if !script.exists() {
        bail!("the default guest image is missing and {} does not exist; pass --kernel and --initrd", script.display());
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} building the guest image ({elapsed}): {msg}")
            .expect("valid template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar.set_message("starting");
    let mut child = Command::new("bash")
        .arg(&script)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", script.display()))?;
    let stderr = child.stderr.take().expect("piped");
    let mut log = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap_or_default();
        bar.set_message(line.trim_start_matches("guest: ").to_string());
        log.push(line);
    }
    let status = child.wait().context("waiting for the guest image build")?;
    bar.finish_and_clear();
    if !status.success() {
        let tail = log.iter().rev().take(15).rev().cloned().collect::<Vec<_>>().join("\n");
        bail!("building the guest image failed ({status}):\n{tail}");
    }
    eprintln!("ftvm: guest image built in {}", dir.join("out").display());
    Ok(())
}
