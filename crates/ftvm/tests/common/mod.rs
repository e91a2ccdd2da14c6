//! What the ftvm binary's tests share.
#![allow(dead_code)] // each test binary uses its own subset

pub mod capture;
pub mod client;
pub mod cluster;
pub mod keeper;
pub mod local;
#[path = "../../src/netns.rs"]
pub mod netns;
pub mod redis;
pub mod relay;
pub mod strangers;

use std::path::{Path, PathBuf};

/// A scratch path under the temporary directory, removed (with its directory) when
/// the test ends: every test cleans up after itself.
pub struct Scratch {
    dir: PathBuf,
    path: PathBuf,
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.path.as_os_str()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `name` in a fresh directory of its own, tagged with the test binary's `suite`.
pub fn scratch(suite: &str, name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("ftvm-{suite}-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    Scratch { path: dir.join(name), dir }
}

/// A seed from FTVM_TEST_SEED or the clock, printed so that a failing run can be replayed
/// with the same faults.
pub fn seed() -> u64 {
    let seed = std::env::var("FTVM_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
    });
    println!("FTVM_TEST_SEED={seed}");
    seed
}
