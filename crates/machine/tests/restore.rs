//! Save and restore (the verbs checkpoints and snapshots are built from): run N
//! instructions, save, restore into a fresh machine, run M more — the same state as
//! running N+M straight. Also the backup's side: apply dirty pages and state.

mod common;
use common::{debian_config as config, drive};
use machine::{Input, InputKind, Machine, MachineConfig, RestoreError};

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
fn a_restored_machine_keeps_its_clock_in_a_machine_built_at_another_time() {
    // A backup or a restore builds its machine later, with the host's time then: the
    // saved state brings the boot time (the RTC's base) and the clock's rate with it.
    const BOOT: u64 = 1_764_000_000_123_456_789;
    let booted_at = |boot_unix_ns| MachineConfig { boot_unix_ns, ..config(None) };
    let (n, m) = (40_000_000, 30_000_000);
    let rate = Input { icount: 20_000_000, kind: InputKind::ClockRate { icount_per_tick: 23 } };
    let mut straight = Machine::new(&booted_at(BOOT)).unwrap();
    straight.push_input(rate.clone()).unwrap();
    drive(&mut straight, n + m);

    let mut first = Machine::new(&booted_at(BOOT)).unwrap();
    first.push_input(rate).unwrap();
    drive(&mut first, n);
    let mut restored = Machine::new(&booted_at(BOOT + 3_600_000_000_000)).unwrap();
    for i in 0..first.ram().page_count() {
        restored.write_page(i, first.page(i).unwrap()).unwrap();
    }
    restored.restore_state(first.save_state()).unwrap();
    assert_eq!((restored.icount_per_tick(), restored.rtc_unix_ns()), (23, first.rtc_unix_ns()));
    drive(&mut restored, n + m);
    assert_eq!((restored.icount(), restored.digest()), (straight.icount(), straight.digest()));
    assert_eq!(restored.rtc_unix_ns(), straight.rtc_unix_ns());
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

#[test]
fn check_state_refuses_a_state_that_does_not_fit_any_component() {
    // Each case would fail (or corrupt the machine) when restored; check_state says so
    // beforehand and restore_state changes nothing.
    let dir = common::TempDir::new("check-state");
    let mut config = machine::MachineConfig::new(common::tiny_kernel(&dir));
    config.ram_size = 16 << 20;
    let mut plain = Machine::new(&config).unwrap(); // an entropy device only
    config.net_mac = Some([2, 0, 0, 0, 0, 1]);
    let mut networked = Machine::new(&config).unwrap(); // network card, then entropy
    assert_eq!(plain.run(1_000), machine::RunExit::Budget);
    assert_eq!(networked.run(1_000), machine::RunExit::Budget);
    let good = networked.save_state();
    networked.check_state(&good).unwrap();
    let frame = |icount| machine::Input { icount, kind: machine::InputKind::NetFrame(vec![0; 60]) };
    let console = |icount| machine::Input { icount, kind: machine::InputKind::Console(b"x".to_vec()) };
    let edited = |edit: &dyn Fn(&mut machine::MachineState)| {
        let mut state = good.clone();
        edit(&mut state);
        state
    };
    let cases = [
        (edited(&|s| s.hart.x[0] = 1), "saved hart state does not fit this machine: register x0 holds 0x1, not 0"),
        (
            edited(&|s| s.uart.rx = vec![b'a'; 64 * 1024 + 1].into()),
            "saved UART state does not fit this machine: 65537 bytes waiting to be received, at most 65536",
        ),
        (
            edited(&|s| s.virtio.swap(0, 1)),
            "virtio device 0: the saved virtio state is of the entropy device, this one is the network device",
        ),
        (
            edited(&|s| s.pending_inputs = vec![console(5_000), console(4_000)]),
            "saved input queue state does not fit this machine: an input stamped 4000 before icount 5000",
        ),
        (
            edited(&|s| s.pending_inputs = vec![console(999)]),
            "saved input queue state does not fit this machine: an input stamped 999 before icount 1000",
        ),
        (
            edited(&|s| s.icount_per_tick = 0),
            "saved clock state does not fit this machine: a rate of 0 instructions per tick, not within 1..=1000000",
        ),
        (
            edited(&|s| s.pending_inputs = vec![machine::Input { icount: 2_000, kind: machine::InputKind::ClockRate { icount_per_tick: 0 } }]),
            "saved input queue state does not fit this machine: a clock rate of 0 instructions per tick, not within 1..=1000000",
        ),
    ];
    for (state, expected) in cases {
        assert_eq!(common::error_chain(&networked.check_state(&state).unwrap_err()), expected);
    }
    let mut queued = plain.save_state();
    queued.pending_inputs = vec![frame(2_000)];
    assert_eq!(
        common::error_chain(&plain.check_state(&queued).unwrap_err()),
        "saved input queue state does not fit this machine: a network frame is pending, and there is no network card"
    );
    let mut other_mac = good.clone();
    let machine::devices::virtio::VirtioDeviceState::Net(net) = &mut other_mac.virtio[0].device else {
        panic!("slot 0 is the network card")
    };
    net.mac = [2, 0, 0, 0, 0, 2];
    let before = networked.digest();
    assert!(matches!(networked.restore_state(other_mac), Err(RestoreError::Virtio { slot: 0, .. })));
    assert_eq!(networked.digest(), before);
    let before = plain.digest();
    assert!(plain.restore_state(queued).is_err());
    assert_eq!(plain.digest(), before);
}
