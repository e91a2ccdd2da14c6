//! Save/restore is exact at every point of a boot, including while the guest's
//! drivers are half-way through setting devices up (a checkpoint can land anywhere).

mod common;
use common::drive;
use machine::Machine;

#[test]
fn state_restores_exactly_at_every_point_of_early_boot() {
    let mut config = common::debian_config(None);
    config.net_mac = Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    let mut machine = Machine::new(&config).unwrap();
    let mut fresh = Machine::new(&config).unwrap();
    let mut failures = Vec::new();
    let mut at = 0;
    while at < 700_000_000 && failures.len() < 3 {
        at += 2_000_000;
        drive(&mut machine, at);
        for index in machine.take_dirty_pages() {
            let page = machine.page(index).unwrap().to_vec();
            fresh.write_page(index, &page).unwrap();
        }
        let state = machine.save_state();
        fresh.restore_state(state.clone()).unwrap();
        if fresh.digest() != machine.digest() {
            let back = fresh.save_state();
            let diff = if back.virtio != state.virtio {
                format!("virtio: saved {:?}\nrestored {:?}", state.virtio, back.virtio)
            } else if back.hart != state.hart {
                "hart".into()
            } else {
                "other".into()
            };
            failures.push(format!("icount {}: {diff}", machine.icount()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
