//! The header: the fixed 140 bytes (versions 1 to 4), encoded and parsed (its fields checked
//! against each other).

use super::{
    malformed, Result, SnapshotDisk, SnapshotInfo, DEVICE_DISK, DEVICE_DISK_READ_ONLY, DEVICE_NET, HEADER_BYTES,
    HEADER_CRC_AT, MAGIC, PAGE_BYTES,
};
use crate::machine::{Digest, MAX_RAM_BYTES, MIN_RAM_BYTES};

pub(super) fn encode_header(info: &SnapshotInfo) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    let mut put = |at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, &MAGIC);
    put(8, &info.format_version.to_le_bytes());
    put(12, &(HEADER_BYTES as u32).to_le_bytes());
    put(16, &info.body_bytes.to_le_bytes());
    put(24, &info.body_crc32c.to_le_bytes());
    let devices = match info.disk {
        None => 0,
        Some(SnapshotDisk { read_only: false, .. }) => DEVICE_DISK,
        Some(SnapshotDisk { read_only: true, .. }) => DEVICE_DISK | DEVICE_DISK_READ_ONLY,
    } | if info.net_mac.is_some() { DEVICE_NET } else { 0 };
    put(28, &devices.to_le_bytes());
    put(32, &info.icount.to_le_bytes());
    put(40, &info.ram_bytes.to_le_bytes());
    put(48, &info.icount_per_tick.to_le_bytes());
    put(56, &info.disk.map_or(0, |d| d.sectors).to_le_bytes());
    put(64, &info.net_mac.unwrap_or_default());
    put(72, &info.ram_pages_saved.to_le_bytes());
    put(80, &info.disk_sectors_saved.to_le_bytes());
    put(88, &info.config_digest);
    put(120, &info.machine_digest.0.to_le_bytes());
    let crc = crc32c::crc32c(&h[..HEADER_CRC_AT]);
    h[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Parses a header of this version whose checksum has been checked.
pub(super) fn decode_header(h: &[u8]) -> Result<SnapshotInfo> {
    debug_assert_eq!(h.len(), HEADER_BYTES);
    let u32_at = |at: usize| u32::from_le_bytes(h[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().expect("8 bytes"));
    let devices = u32_at(28);
    if devices & !(DEVICE_DISK | DEVICE_DISK_READ_ONLY | DEVICE_NET) != 0
        || devices & (DEVICE_DISK | DEVICE_DISK_READ_ONLY) == DEVICE_DISK_READ_ONLY
    {
        return Err(malformed(28, format!("device bits {devices:#x} are not a device set")));
    }
    let ram_bytes = u64_at(40);
    if !(MIN_RAM_BYTES..=MAX_RAM_BYTES).contains(&ram_bytes) || ram_bytes % PAGE_BYTES as u64 != 0 {
        return Err(malformed(
            40,
            format!("RAM size {ram_bytes} is not a multiple of 4 KiB from {MIN_RAM_BYTES} to {MAX_RAM_BYTES}"),
        ));
    }
    let icount_per_tick = u64_at(48);
    if icount_per_tick == 0 {
        return Err(malformed(48, "0 instructions per timer tick"));
    }
    let sectors = u64_at(56);
    let disk = (devices & DEVICE_DISK != 0)
        .then_some(SnapshotDisk { sectors, read_only: devices & DEVICE_DISK_READ_ONLY != 0 });
    if disk.is_none() && sectors != 0 {
        return Err(malformed(56, format!("a disk size of {sectors} sectors without a disk")));
    }
    let mac: [u8; 6] = h[64..70].try_into().expect("6 bytes");
    let net_mac = (devices & DEVICE_NET != 0).then_some(mac);
    if (net_mac.is_none() && mac != [0; 6]) || h[70..72] != [0, 0] {
        return Err(malformed(64, "stray bytes in the MAC field"));
    }
    let ram_pages_saved = u64_at(72);
    if ram_pages_saved > ram_bytes / PAGE_BYTES as u64 {
        return Err(malformed(
            72,
            format!("{ram_pages_saved} pages saved of a RAM of {} pages", ram_bytes / PAGE_BYTES as u64),
        ));
    }
    let disk_sectors_saved = u64_at(80);
    if disk_sectors_saved > sectors {
        return Err(malformed(80, format!("{disk_sectors_saved} disk sectors saved of a disk of {sectors}")));
    }
    let info = SnapshotInfo {
        format_version: u32_at(8),
        icount: u64_at(32),
        ram_bytes,
        icount_per_tick,
        disk,
        net_mac,
        ram_pages_saved,
        disk_sectors_saved,
        config_digest: h[88..120].try_into().expect("32 bytes"),
        machine_digest: Digest(u128::from_le_bytes(h[120..136].try_into().expect("16 bytes"))),
        body_bytes: u64_at(16),
        body_crc32c: u32_at(24),
    };
    if info.config_digest != info.shape().digest() {
        return Err(malformed(88, "the configuration digest does not match the header's own fields"));
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::config::BoardShape;
    use crate::snapshot::read::read_header;
    use crate::snapshot::{SnapshotError, FORMAT_VERSION};

    fn sample_info() -> SnapshotInfo {
        let shape = BoardShape {
            ram_bytes: 64 << 20,
            icount_per_tick: 10,
            disk_read_only: Some(true),
            net_mac: Some([2, 0, 0, 0, 0, 9]),
        };
        SnapshotInfo {
            format_version: FORMAT_VERSION,
            icount: 123,
            ram_bytes: shape.ram_bytes,
            icount_per_tick: 10,
            disk: Some(SnapshotDisk { sectors: 4096, read_only: true }),
            net_mac: shape.net_mac,
            ram_pages_saved: 17,
            disk_sectors_saved: 3,
            config_digest: shape.digest(),
            machine_digest: Digest(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
            body_bytes: 9999,
            body_crc32c: 0xdead_beef,
        }
    }

    fn reseal(header: &mut [u8]) {
        let at = header.len() - 4;
        let crc = crc32c::crc32c(&header[..at]);
        header[at..].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn the_header_round_trips_and_names_what_the_file_holds() {
        let info = sample_info();
        let bytes = encode_header(&info);
        assert_eq!(read_header(&mut &bytes[..]).unwrap(), info);
        let text = info.to_string();
        assert!(
            text.contains(&format!("format version {FORMAT_VERSION}"))
                && text.contains("02:00:00:00:00:09")
                && text.contains("4096 sectors, read-only"),
            "{text}"
        );
    }

    #[test]
    fn another_format_version_is_refused_naming_both() {
        let mut bytes = encode_header(&sample_info());
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        let damaged = read_header(&mut &bytes[..]).unwrap_err();
        assert!(matches!(damaged, SnapshotError::UnsupportedVersion { found: 1, supported: 4, header_intact: false }));
        reseal(&mut bytes);
        let err = read_header(&mut &bytes[..]).unwrap_err();
        assert_eq!(err.to_string(), "snapshot format version 1, this ftvm reads version 4");
        // A later version with a longer header is still recognised by its version.
        let mut longer = bytes[..HEADER_BYTES - 4].to_vec();
        longer[12..16].copy_from_slice(&300u32.to_le_bytes());
        longer.resize(300, 7);
        reseal(&mut longer);
        assert!(matches!(read_header(&mut &longer[..]), Err(SnapshotError::UnsupportedVersion { found: 1, .. })));
    }

    #[test]
    fn a_damaged_or_foreign_header_is_refused() {
        let bytes = encode_header(&sample_info());
        for i in 0..HEADER_BYTES {
            let mut damaged = bytes;
            damaged[i] ^= 0x10;
            let err = read_header(&mut &damaged[..]).unwrap_err();
            let expected = match i {
                0..=7 => matches!(err, SnapshotError::NotASnapshot { .. }),
                8..=11 => matches!(err, SnapshotError::UnsupportedVersion { header_intact: false, .. }),
                12..=15 => matches!(
                    err,
                    SnapshotError::Checksum { .. }
                        | SnapshotError::Truncated { .. }
                        | SnapshotError::Malformed { offset: 12, .. }
                ),
                _ => matches!(err, SnapshotError::Checksum { what: "header", .. }),
            };
            assert!(expected, "byte {i}: {err}");
        }
        for len in 0..HEADER_BYTES {
            let err = read_header(&mut &bytes[..len]).unwrap_err();
            assert!(matches!(err, SnapshotError::Truncated { offset, .. } if offset == len as u64), "{len}: {err}");
        }
        let err = read_header(&mut &b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0"[..]).unwrap_err();
        assert!(err.to_string().starts_with("not an ftvm snapshot"), "{err}");
    }

    #[test]
    fn header_fields_that_contradict_each_other_are_refused() {
        let cases: [(usize, &[u8]); 5] = [
            (28, &[0x2, 0, 0, 0]),              // read-only without a disk
            (40, &[0, 0x10, 0, 0, 0, 0, 0, 0]), // RAM not page aligned... and too small
            (48, &[0; 8]),                      // no timer rate
            (72, &[0xff; 8]),                   // more pages saved than RAM has
            (88, &[0; 32]),                     // a digest of other fields
        ];
        for (at, bytes) in cases {
            let mut header = encode_header(&sample_info());
            header[at..at + bytes.len()].copy_from_slice(bytes);
            reseal(&mut header);
            let err = read_header(&mut &header[..]).unwrap_err();
            assert!(matches!(err, SnapshotError::Malformed { offset, .. } if offset == at as u64), "{at}: {err}");
        }
    }
}
