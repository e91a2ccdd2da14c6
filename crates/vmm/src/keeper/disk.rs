//! A written disk under `--resilient` (DESIGN.md §7): the image holds the disk as of the
//! committed local checkpoint, so that a replay reads the sectors it read the first time.
//! The monitor's machine writes into a copy-on-write overlay (`MachineConfig::disk_overlay`)
//! that dies with the monitor; at each local checkpoint the sectors written since the last
//! one go into the **disk journal**, a memfd the keeper holds, staged with the checkpoint
//! and folded into the image once it is committed. Folding is idempotent, so a monitor
//! killed in the middle leaves the next one to fold it again (redo, like the RAM image).
//!
//! The journal's layout: a table of runs (u64 first sector, u64 sector count), then the
//! runs' bytes in the same order. The staged checkpoint records the number of runs, the
//! data's length and a CRC32C over table and data ([`DiskStaged`]).

use super::region::RegionError;
use crc32c::crc32c_append;
use machine::Machine;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const SECTOR: u64 = 512;
const RUN_BYTES: u64 = 16;
/// Sectors moved per read or write (64 KiB).
const CHUNK_SECTORS: u64 = 128;
/// A journal larger than this is truncated after folding (its memory given back).
const KEEP_BYTES: u64 = 8 << 20;

/// What a staged checkpoint says of the disk journal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStaged {
    pub runs: u32,
    pub bytes: u64,
    pub crc: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot create the disk journal")]
    Create(#[source] nix::Error),
    #[error("cannot use the disk journal")]
    Journal(#[source] std::io::Error),
    #[error("cannot open the disk image {path} for writing")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot write the disk image {path}")]
    Image { path: PathBuf, source: std::io::Error },
    #[error("cannot read the guest's disk for the local checkpoint")]
    Read(#[source] machine::RestoreError),
}

/// The keeper's side: create the journal (passed to every monitor as `disk=N`).
pub fn create_journal() -> Result<OwnedFd, DiskError> {
    nix::sys::memfd::memfd_create(c"ftvm-keeper-disk", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
        .map_err(DiskError::Create)
}

/// The monitor's side: the journal and the image it folds into.
pub struct DiskJournal {
    journal: File,
    image: File,
    path: PathBuf,
    capacity_sectors: u64,
    buf: Vec<u8>,
}

impl DiskJournal {
    /// Open the image at `path` for writing (the machine reads it through its overlay).
    pub fn open(journal: OwnedFd, path: &Path) -> Result<DiskJournal, DiskError> {
        let open = |source| DiskError::Open { path: path.to_path_buf(), source };
        let image = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(open)?;
        let capacity_sectors = image.metadata().map_err(open)?.len() / SECTOR;
        Ok(DiskJournal {
            journal: File::from(journal),
            image,
            path: path.to_path_buf(),
            capacity_sectors,
            buf: vec![0; (CHUNK_SECTORS * SECTOR) as usize],
        })
    }

    /// Write `sectors` (ascending, as the machine gives them) as they read now into the
    /// journal: what the staged checkpoint will fold into the image.
    pub fn stage(&mut self, machine: &Machine, sectors: &[u64]) -> Result<DiskStaged, DiskError> {
        let runs = runs(sectors);
        let mut table = Vec::with_capacity(runs.len() * RUN_BYTES as usize);
        for &(first, count) in &runs {
            table.extend_from_slice(&first.to_le_bytes());
            table.extend_from_slice(&count.to_le_bytes());
        }
        self.journal.write_all_at(&table, 0).map_err(DiskError::Journal)?;
        let mut crc = crc32c_append(0, &table);
        let mut at = table.len() as u64;
        for &(first, count) in &runs {
            let mut done = 0;
            while done < count {
                let n = (count - done).min(CHUNK_SECTORS);
                let buf = &mut self.buf[..(n * SECTOR) as usize];
                machine.read_sectors(first + done, buf).map_err(DiskError::Read)?;
                self.journal.write_all_at(buf, at).map_err(DiskError::Journal)?;
                crc = crc32c_append(crc, buf);
                (at, done) = (at + n * SECTOR, done + n);
            }
        }
        let bytes = at - table.len() as u64;
        Ok(DiskStaged { runs: runs.len() as u32, bytes, crc })
    }

    /// Fold a committed checkpoint's sectors into the image, after checking the journal
    /// whole (a damaged journal leaves the image untouched).
    pub fn fold(&mut self, staged: DiskStaged) -> Result<(), RegionError> {
        let corrupt = |problem: String| RegionError::Corrupt { part: "disk journal", problem };
        let journal_err = |e| RegionError::Disk(DiskError::Journal(e));
        if u64::from(staged.runs) > self.capacity_sectors || staged.bytes > self.capacity_sectors * SECTOR {
            return Err(corrupt(format!("{} runs of {} bytes", staged.runs, staged.bytes)));
        }
        let mut table = vec![0u8; staged.runs as usize * RUN_BYTES as usize];
        self.journal.read_exact_at(&mut table, 0).map_err(journal_err)?;
        let runs: Vec<(u64, u64)> = table
            .chunks_exact(RUN_BYTES as usize)
            .map(|r| {
                let word = |i: usize| u64::from_le_bytes(r[i..i + 8].try_into().expect("8 bytes"));
                (word(0), word(8))
            })
            .collect();
        let mut total = 0u64;
        for &(first, count) in &runs {
            if first.checked_add(count).is_none_or(|end| end > self.capacity_sectors) {
                return Err(corrupt(format!("a run of {count} sectors at {first} is outside the disk")));
            }
            total += count * SECTOR;
        }
        if total != staged.bytes {
            return Err(corrupt(format!("its runs hold {total} bytes, the checkpoint says {}", staged.bytes)));
        }
        // First check, then write: two passes over the journal (in memory).
        let mut crc = crc32c_append(0, &table);
        let data = table.len() as u64;
        each_chunk(&self.journal, &mut self.buf, &runs, data, |chunk, _| {
            crc = crc32c_append(crc, chunk);
            Ok(())
        })
        .map_err(journal_err)?;
        if crc != staged.crc {
            return Err(corrupt("CRC mismatch".to_string()));
        }
        let image = &self.image;
        each_chunk(&self.journal, &mut self.buf, &runs, data, |chunk, sector| {
            image.write_all_at(chunk, sector * SECTOR)
        })
        .map_err(|source| RegionError::Disk(DiskError::Image { path: self.path.clone(), source }))?;
        if self.journal.metadata().map_err(journal_err)?.len() > KEEP_BYTES {
            self.journal.set_len(0).map_err(journal_err)?;
        }
        Ok(())
    }
}

/// Read the journal's data from byte `at`, run by run, a chunk at a time: `f(chunk, its
/// first sector)`.
fn each_chunk(
    journal: &File,
    buf: &mut [u8],
    runs: &[(u64, u64)],
    mut at: u64,
    mut f: impl FnMut(&[u8], u64) -> std::io::Result<()>,
) -> std::io::Result<()> {
    for &(first, count) in runs {
        let mut done = 0;
        while done < count {
            let n = (count - done).min(CHUNK_SECTORS);
            let chunk = &mut buf[..(n * SECTOR) as usize];
            journal.read_exact_at(chunk, at)?;
            f(chunk, first + done)?;
            (at, done) = (at + n * SECTOR, done + n);
        }
    }
    Ok(())
}

/// Ascending sectors as runs of consecutive ones: (first, count).
fn runs(sectors: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &s in sectors {
        match runs.last_mut() {
            Some((first, count)) if *first + *count == s => *count += 1,
            _ => runs.push((s, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A journal holding `runs`, each sector filled with its number's low byte.
    fn journal_of(runs: &[(u64, u64)]) -> (OwnedFd, DiskStaged) {
        let fd = create_journal().unwrap();
        let file = File::from(fd.try_clone().unwrap());
        let mut bytes = Vec::new();
        for &(first, count) in runs {
            bytes.extend_from_slice(&first.to_le_bytes());
            bytes.extend_from_slice(&count.to_le_bytes());
        }
        let table = bytes.len();
        for &(first, count) in runs {
            for s in first..first + count {
                bytes.extend(std::iter::repeat_n(s as u8, SECTOR as usize));
            }
        }
        file.write_all_at(&bytes, 0).unwrap();
        let staged =
            DiskStaged { runs: runs.len() as u32, bytes: (bytes.len() - table) as u64, crc: crc32c_append(0, &bytes) };
        (fd, staged)
    }

    fn image(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("ftvm-disk-journal-{}-{name}.img", std::process::id()));
        std::fs::write(&path, vec![0xee; 16 * SECTOR as usize]).unwrap();
        path
    }

    #[test]
    fn a_committed_journal_folds_into_the_image_again_and_again() {
        let path = image("fold");
        let (fd, staged) = journal_of(&[(1, 2), (5, 1)]);
        let mut disk = DiskJournal::open(fd, &path).unwrap();
        disk.fold(staged).unwrap();
        disk.fold(staged).unwrap(); // a monitor killed after folding: the next folds again
        let image = std::fs::read(&path).unwrap();
        let sector = |s: usize| &image[s * SECTOR as usize..(s + 1) * SECTOR as usize];
        assert!(sector(1).iter().all(|&b| b == 1) && sector(2).iter().all(|&b| b == 2));
        assert!(sector(5).iter().all(|&b| b == 5));
        assert!(sector(0).iter().chain(sector(3)).chain(sector(6)).all(|&b| b == 0xee));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_damaged_journal_leaves_the_image_untouched() {
        let path = image("damaged");
        let (fd, staged) = journal_of(&[(3, 4)]);
        let mut disk = DiskJournal::open(fd, &path).unwrap();
        let err = disk.fold(DiskStaged { crc: staged.crc ^ 1, ..staged }).unwrap_err();
        assert_eq!(err.to_string(), "the shared recovery region's disk journal is corrupt: CRC mismatch");
        let err = disk.fold(DiskStaged { runs: 2, ..staged }).unwrap_err();
        assert!(err.to_string().starts_with("the shared recovery region's disk journal is corrupt: "), "{err}");
        let err = disk.fold(DiskStaged { runs: 1, bytes: 512, ..staged }).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the shared recovery region's disk journal is corrupt: its runs hold 2048 bytes, the checkpoint says 512"
        );
        assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0xee));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn sectors_coalesce_into_runs() {
        assert_eq!(runs(&[1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 1), (9, 2)]);
        assert!(runs(&[]).is_empty());
    }
}
