//! Announcing the guest's MAC address after a takeover, as QEMU does after a migration:
//! RARP request frames broadcast from the new port, so that switches learn at once
//! where the guest now lives (the guest's IP is not known to the monitor, so RARP —
//! which needs only the MAC — rather than gratuitous ARP).

const ETHERTYPE_RARP: [u8; 2] = [0x80, 0x35];
/// Minimum Ethernet frame without FCS.
const MIN_FRAME: usize = 60;

/// One RARP "request reverse" frame announcing `mac`.
pub fn rarp_announce(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(MIN_FRAME);
    f.extend_from_slice(&[0xff; 6]); // broadcast
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETHERTYPE_RARP);
    f.extend_from_slice(&[0, 1]); // hardware type: Ethernet
    f.extend_from_slice(&[0x08, 0x00]); // protocol type: IPv4
    f.extend_from_slice(&[6, 4]); // address lengths
    f.extend_from_slice(&[0, 3]); // op: request reverse
    f.extend_from_slice(&mac); // sender hardware address
    f.extend_from_slice(&[0; 4]); // sender protocol address: unknown
    f.extend_from_slice(&mac); // target hardware address
    f.extend_from_slice(&[0; 4]); // target protocol address: unknown
    f.resize(MIN_FRAME, 0);
    f
}

/// When a takeover announces the MAC, in milliseconds after it: a TAP attached a moment ago,
/// or a bridge port still learning, may miss the first frames, so the announcement is
/// repeated in rounds over the first few hundred milliseconds (as QEMU's announce-self does).
pub const ANNOUNCE_ROUNDS_MS: [u64; 5] = [0, 20, 60, 150, 300];

/// Send the announcement of `mac` on `tap` in rounds, on a thread of its own.
pub fn spawn_announcer(mut tap: super::tap::Tap, mac: [u8; 6]) {
    let frame = rarp_announce(mac);
    std::thread::spawn(move || {
        let start = std::time::Instant::now();
        for at_ms in ANNOUNCE_ROUNDS_MS {
            let at = std::time::Duration::from_millis(at_ms);
            std::thread::sleep(at.saturating_sub(start.elapsed()));
            if let Err(e) = tap.send(&frame) {
                crate::log::warn(format_args!("cannot announce the guest's MAC address on {}: {e}", tap.name));
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcement_is_a_broadcast_rarp_request_from_the_mac() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let f = rarp_announce(mac);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[32..38], &mac);
    }
}
