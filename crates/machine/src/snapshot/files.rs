//! Files: snapshots saved through a synced temporary file and renamed, and loaded from a
//! path, every error naming the file.

use super::read::read_header;
use super::restore::read_snapshot;
use super::write::write_snapshot;
use super::{io_error, Result, SnapshotError, SnapshotInfo};
use crate::machine::{Machine, MachineConfig};
use std::path::{Path, PathBuf};

fn in_file(path: &Path, source: SnapshotError) -> SnapshotError {
    SnapshotError::File { path: path.to_path_buf(), source: Box::new(source) }
}

fn file_io(path: &Path, op: &'static str, source: std::io::Error) -> SnapshotError {
    in_file(path, SnapshotError::Io { op, source })
}

/// Writes a snapshot to `path` through a temporary file beside it, synced and then
/// renamed, so that `path` holds either the old file or the whole new snapshot.
pub fn save_to_path(machine: &Machine, path: &Path) -> Result<SnapshotInfo> {
    if let Some(blk) = machine.disk() {
        let same = |a: &Path, b: &Path| a.canonicalize().ok().zip(b.canonicalize().ok()).is_some_and(|(a, b)| a == b);
        if same(path, blk.path()) {
            return Err(in_file(path, SnapshotError::OverDisk(blk.path().to_path_buf())));
        }
    }
    let name =
        path.file_name().ok_or_else(|| file_io(path, "naming the file", std::io::ErrorKind::InvalidInput.into()))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let written = (|| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_error("creating the temporary file"))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let info = write_snapshot(machine, &mut out)?;
        let file =
            out.into_inner().map_err(|e| SnapshotError::Io { op: "writing the snapshot", source: e.into_error() })?;
        file.sync_all().map_err(io_error("syncing the snapshot"))?;
        std::fs::rename(&tmp, path).map_err(io_error("renaming the temporary file"))?;
        Ok(info)
    })();
    match written {
        Ok(info) => {
            // The rename is durable once the directory is synced.
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| file_io(path, "syncing the directory", e))?;
            Ok(info)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(in_file(path, e))
        }
    }
}

/// Rebuilds a machine from the snapshot at `path` (see [`read_snapshot`]).
pub fn load_from_path(path: &Path, config: &MachineConfig) -> Result<Machine> {
    let file = std::fs::File::open(path).map_err(|e| file_io(path, "opening the snapshot", e))?;
    read_snapshot(&mut std::io::BufReader::with_capacity(1 << 20, file), config).map_err(|e| in_file(path, e))
}

/// The header of the snapshot at `path`.
pub fn read_header_from_path(path: &Path) -> Result<SnapshotInfo> {
    let file = std::fs::File::open(path).map_err(|e| file_io(path, "opening the snapshot", e))?;
    read_header(&mut std::io::BufReader::new(file)).map_err(|e| in_file(path, e))
}
