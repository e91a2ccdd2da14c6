//! The configuration digest: what a snapshot needs of the machine it is restored into,
//! beyond what it carries.

use crate::devices::virtio::VirtioDeviceState;
use crate::machine::{Machine, MachineConfig, MachineState};

/// What a snapshot needs of the machine it is restored into, beyond what it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BoardShape {
    pub(super) ram_bytes: u64,
    pub(super) icount_per_tick: u64,
    /// `Some(read_only)` with a disk.
    pub(super) disk_read_only: Option<bool>,
    pub(super) net_mac: Option<[u8; 6]>,
}

impl BoardShape {
    pub(super) fn of_config(config: &MachineConfig) -> BoardShape {
        BoardShape {
            ram_bytes: config.ram_size,
            // Machine::new runs a rate of 0 as 1.
            icount_per_tick: config.icount_per_tick.max(1),
            disk_read_only: config.disk.as_ref().map(|d| d.read_only),
            net_mac: config.net_mac,
        }
    }

    pub(super) fn of_machine(machine: &Machine, state: &MachineState) -> BoardShape {
        let blk = state.virtio.iter().find_map(|d| match &d.device {
            VirtioDeviceState::Blk(b) => Some(b),
            _ => None,
        });
        let net = state.virtio.iter().find_map(|d| match &d.device {
            VirtioDeviceState::Net(n) => Some(n.mac),
            _ => None,
        });
        BoardShape {
            ram_bytes: machine.ram().size(),
            // The configured rate: the rate now (after ClockRate inputs) is state.
            icount_per_tick: machine.boot_icount_per_tick(),
            disk_read_only: blk.map(|b| b.read_only),
            net_mac: net,
        }
    }

    pub(super) fn digest(&self) -> [u8; 32] {
        use sha2::{Digest as _, Sha256};
        let mut h = Sha256::new();
        h.update(b"ftvm machine configuration v1\0");
        h.update(self.ram_bytes.to_le_bytes());
        h.update(self.icount_per_tick.to_le_bytes());
        h.update([match self.disk_read_only {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        }]);
        match self.net_mac {
            Some(mac) => h.update([[1].as_slice(), &mac].concat()),
            None => h.update([0]),
        }
        h.finalize().into()
    }
}

/// A digest of the parts of a configuration that shape the machine after boot: RAM
/// size, timer rate, and the devices (disk and whether it is read-only, network card
/// and its MAC). Not the kernel, initrd or command line: they only shape the initial
/// RAM, which a snapshot or a full checkpoint carries; a peer that needs the same
/// initial image (lockstep from boot) must compare the image as well.
pub fn config_digest(config: &MachineConfig) -> [u8; 32] {
    BoardShape::of_config(config).digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_digest_covers_every_part_of_the_board_shape() {
        let mut config = MachineConfig::new("kernel");
        let mut seen = vec![config_digest(&config)];
        config.ram_size *= 2;
        seen.push(config_digest(&config));
        config.icount_per_tick = 20;
        seen.push(config_digest(&config));
        config.disk = Some(crate::DiskConfig { path: "a.img".into(), read_only: false });
        seen.push(config_digest(&config));
        config.disk = Some(crate::DiskConfig { path: "b.img".into(), read_only: true });
        seen.push(config_digest(&config));
        config.net_mac = Some([2, 0, 0, 0, 0, 1]);
        seen.push(config_digest(&config));
        config.net_mac = Some([2, 0, 0, 0, 0, 2]);
        seen.push(config_digest(&config));
        let unique: std::collections::HashSet<_> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len());
        // Not the kernel, initrd or command line: they only shape the initial RAM.
        let mut other = config.clone();
        other.kernel = "other".into();
        other.bootargs = "console=ttyS0".into();
        other.disk = Some(crate::DiskConfig { path: "elsewhere.img".into(), read_only: true });
        // Nor the boot time: replicas built at different moments are the same VM (the
        // clock travels in the RTC's state).
        other.boot_unix_ns = 1_764_000_000_000_000_000;
        assert_eq!(config_digest(&other), config_digest(&config));
    }
}
