//! The disk under a copy-on-write overlay (`MachineConfig::disk_overlay`, how a replay runs
//! over a recording's start contents): the image file is never written, the machine sees
//! its writes, and the machine's digest depends on the disk's contents only — not on where
//! the image file has holes, nor on whether the sectors sit in an overlay.

mod common;
use common::{tiny_kernel, TempDir};
use machine::{DiskConfig, Machine, MachineConfig};
use std::path::Path;

const SECTORS: u64 = 8192; // 4 MiB: several digest pieces

fn config(dir: &TempDir, disk: &Path, overlay: bool) -> MachineConfig {
    let mut config = MachineConfig::new(tiny_kernel(dir));
    config.ram_size = 16 << 20;
    config.disk = Some(DiskConfig { path: disk.to_path_buf(), read_only: false });
    config.disk_overlay = overlay;
    config
}

#[test]
fn the_digest_depends_on_the_disks_contents_not_on_holes_or_an_overlay() {
    let dir = TempDir::new("overlay-digest");
    // The same contents three ways: written out in full (zeros as data), sparse, and
    // sparse under an overlay that took the non-zero sectors.
    let mut full = vec![0u8; (SECTORS * 512) as usize];
    full[5000 * 512..5001 * 512].fill(0xab);
    let (dense, sparse, base) = (dir.path("dense.img"), dir.path("sparse.img"), dir.path("base.img"));
    std::fs::write(&dense, &full).unwrap();
    let file = std::fs::File::create(&sparse).unwrap();
    file.set_len(SECTORS * 512).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0xab; 512], 5000 * 512).unwrap();
    std::fs::File::create(&base).unwrap().set_len(SECTORS * 512).unwrap();

    let dense_digest = Machine::new(&config(&dir, &dense, false)).unwrap().digest();
    assert_eq!(Machine::new(&config(&dir, &sparse, false)).unwrap().digest(), dense_digest);
    let mut overlaid = Machine::new(&config(&dir, &base, true)).unwrap();
    assert_ne!(overlaid.digest(), dense_digest, "an empty disk is another state");
    overlaid.write_sectors(5000, &[0xab; 512]).unwrap();
    assert_eq!(overlaid.digest(), dense_digest);
    let mut buf = [0u8; 512];
    overlaid.read_sectors(5000, &mut buf).unwrap();
    assert_eq!(buf, [0xab; 512]);
    assert_eq!(overlaid.next_data_sector(0), Some(5000), "the overlay's sectors are the only data");
    assert_eq!(std::fs::read(&base).unwrap(), vec![0u8; (SECTORS * 512) as usize], "the image is never written");
}
