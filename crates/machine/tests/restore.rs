//! Save and restore (the verbs checkpoints and snapshots are built from): run N
//! instructions, save, restore into a fresh machine, run M more — the same state as
//! running N+M straight. Also the backup's side: apply dirty pages and state.

mod common;
use common::{debian_config as config, drive};
use machine::{Machine, RestoreError};

#[test]
fn a_restored_machine_continues_exactly() {
    let (n, m) = (40_000_000, 30_000_000);
    let mut straight = Machine::new(&config(None)).unwrap();
    drive(&mut straight, n + m);

    let mut first = Machine::new(&config(None)).unwrap();
    drive(&mut first, n);
    let state = first.save_state();
    let pages: Vec<Vec<u8>> = (0..first.ram().page_count()).map(|i| first.page(i).unwrap().to_vec()).collect();

    let mut restored = Machine::new(&config(None)).unwrap();
    for (i, page) in pages.iter().enumerate() {
        restored.write_page(i, page).unwrap();
    }
    restored.restore_state(state).unwrap();
    assert_eq!(restored.digest(), first.digest(), "restore reproduces the saved machine");
    drive(&mut restored, n + m);
    assert_eq!((restored.icount(), restored.digest()), (straight.icount(), straight.digest()));
}

#[test]
fn dirty_pages_and_state_carry_a_machine_forward_incrementally() {
    // The backup's side of checkpoint replication: a copy kept in step with only the
    // pages written since the last checkpoint plus the small state.
    let mut primary = Machine::new(&config(None)).unwrap();
    let mut backup = Machine::new(&config(None)).unwrap();
    primary.take_dirty_pages();
    for epoch in 1..=4u64 {
        drive(&mut primary, epoch * 10_000_000);
        let dirty = primary.take_dirty_pages();
        assert!(!dirty.is_empty(), "a running kernel writes memory every epoch");
        for index in dirty {
            let page = primary.page(index).unwrap().to_vec();
            backup.write_page(index, &page).unwrap();
        }
        backup.restore_state(primary.save_state()).unwrap();
        assert_eq!(backup.digest(), primary.digest(), "epoch {epoch}");
    }
}

#[test]
fn disk_sectors_written_by_the_guest_are_tracked_and_copyable() {
    let dir = std::env::temp_dir().join(format!("ftvm-restore-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    std::fs::write(&a, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&b, vec![0u8; 1 << 20]).unwrap();
    let mut machine = Machine::new(&config(Some(a.clone()))).unwrap();
    machine.write_sectors(3, &[0x5a; 1024]).unwrap();
    let dirty = machine.take_dirty_sectors();
    assert_eq!(dirty, vec![3, 4]);
    let mut copy = Machine::new(&config(Some(b.clone()))).unwrap();
    let mut buf = vec![0u8; 512];
    for sector in dirty {
        machine.read_sectors(sector, &mut buf).unwrap();
        copy.write_sectors(sector, &buf).unwrap();
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_restores_are_refused_and_leave_the_machine_untouched() {
    let mut with_disk_dir = std::env::temp_dir().join(format!("ftvm-restore-bad-{}", std::process::id()));
    std::fs::create_dir_all(&with_disk_dir).unwrap();
    with_disk_dir.push("d.img");
    std::fs::write(&with_disk_dir, vec![0u8; 1 << 20]).unwrap();
    let disked = Machine::new(&config(Some(with_disk_dir.clone()))).unwrap();
    let mut plain = Machine::new(&config(None)).unwrap();
    let before = plain.digest();
    let err = plain.restore_state(disked.save_state()).unwrap_err();
    assert!(matches!(err, RestoreError::DeviceCount { saved: 2, configured: 1 }), "{err}");
    assert_eq!(plain.digest(), before);
    let pages = plain.ram().page_count();
    assert!(matches!(plain.write_page(pages, &[0; 4096]), Err(RestoreError::Page { .. })));
    assert!(matches!(plain.write_page(0, &[0; 100]), Err(RestoreError::Page { .. })));
    assert!(matches!(plain.write_sectors(0, &[0; 512]), Err(RestoreError::NoDisk)));
    std::fs::remove_dir_all(with_disk_dir.parent().unwrap()).unwrap();
}
