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
