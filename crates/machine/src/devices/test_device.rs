//! The SiFive "test" device (QEMU virt's, at 0x100000): the guest writes a 32-bit
//! word to power off with an exit code or to reset. The guest image's init uses it
//! to report the command's exit status (see guest/README.md).

use super::AccessError;
use crate::io::OutputKind;

pub const SIZE: u64 = 0x1000;
const FINISHER_FAIL: u64 = 0x3333;
const FINISHER_PASS: u64 = 0x5555;
const FINISHER_RESET: u64 = 0x7777;

/// Decode a write: `Some(output)` when it ends the machine.
pub fn write(offset: u64, size: u8, value: u64) -> Result<Option<OutputKind>, AccessError> {
    if offset != 0 || size != 4 {
        return Err(AccessError);
    }
    Ok(match value & 0xffff {
        FINISHER_PASS => Some(OutputKind::PowerOff { code: 0 }),
        FINISHER_FAIL => Some(OutputKind::PowerOff { code: ((value >> 16) & 0xffff) as u32 }),
        FINISHER_RESET => Some(OutputKind::Reset),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_fail_and_reset_codes_are_decoded() {
        assert_eq!(write(0, 4, 0x5555).unwrap(), Some(OutputKind::PowerOff { code: 0 }));
        assert_eq!(write(0, 4, (3 << 16) | 0x3333).unwrap(), Some(OutputKind::PowerOff { code: 3 }));
        assert_eq!(write(0, 4, 0x7777).unwrap(), Some(OutputKind::Reset));
        assert_eq!(write(0, 4, 0x1234).unwrap(), None);
        assert_eq!(write(4, 4, 0x5555), Err(AccessError));
    }
}
