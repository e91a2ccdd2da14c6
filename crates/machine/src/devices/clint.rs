//! The core-local interruptor (SiFive CLINT layout): msip, mtimecmp and mtime for
//! hart 0. The registers themselves live in the hart (its timer deadline is checked
//! every instruction); this model turns MMIO accesses into requests that the machine
//! applies to the hart between instructions.

use super::AccessError;

pub const SIZE: u64 = 0x1_0000;
const MSIP: u64 = 0x0;
const MTIMECMP: u64 = 0x4000;
const MTIME: u64 = 0xbff8;

/// A change the hart must see, requested through the CLINT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HartRequest {
    SetMsip(bool),
    SetMtimecmp(u64),
    SetTime(u64),
}

/// The hart's values as of the current instruction, for reads.
#[derive(Debug, Default, Clone, Copy)]
pub struct ClintView {
    pub msip: bool,
    pub mtimecmp: u64,
    pub time: u64,
}

/// Read a CLINT register (4- or 8-byte accesses; 4-byte halves of the 64-bit ones).
pub fn read(view: &ClintView, offset: u64, size: u8) -> Result<u64, AccessError> {
    let (reg, value) = match offset & !7 {
        MSIP => (MSIP, view.msip as u64),
        MTIMECMP => (MTIMECMP, view.mtimecmp),
        MTIME => (MTIME, view.time),
        _ => {
            return match size {
                4 | 8 => Ok(0),
                _ => Err(AccessError),
            }
        }
    };
    match (size, offset - reg) {
        (8, 0) => Ok(value),
        (4, 0) => Ok(value & 0xffff_ffff),
        (4, 4) if reg != MSIP => Ok(value >> 32),
        (4, 4) => Ok(0),
        _ => Err(AccessError),
    }
}

/// Write a CLINT register; returns the request for the hart, if any.
pub fn write(view: &ClintView, offset: u64, size: u8, value: u64) -> Result<Option<HartRequest>, AccessError> {
    let merge = |old: u64, reg: u64| -> Result<u64, AccessError> {
        match (size, offset - reg) {
            (8, 0) => Ok(value),
            (4, 0) => Ok((old & !0xffff_ffff) | (value & 0xffff_ffff)),
            (4, 4) => Ok((old & 0xffff_ffff) | (value << 32)),
            _ => Err(AccessError),
        }
    };
    Ok(match offset & !7 {
        MSIP if offset == MSIP && size == 4 => Some(HartRequest::SetMsip(value & 1 != 0)),
        MTIMECMP => Some(HartRequest::SetMtimecmp(merge(view.mtimecmp, MTIMECMP)?)),
        MTIME => Some(HartRequest::SetTime(merge(view.time, MTIME)?)),
        _ => match size {
            4 | 8 => None,
            _ => return Err(AccessError),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtimecmp_halves_are_merged() {
        let view = ClintView { msip: false, mtimecmp: 0x1111_2222_3333_4444, time: 0 };
        assert_eq!(
            write(&view, MTIMECMP + 4, 4, 0xaaaa).unwrap(),
            Some(HartRequest::SetMtimecmp(0x0000_aaaa_3333_4444))
        );
        assert_eq!(write(&view, MTIMECMP, 4, 0xbbbb).unwrap(), Some(HartRequest::SetMtimecmp(0x1111_2222_0000_bbbb)));
    }

    #[test]
    fn mtime_reads_the_hart_time() {
        let view = ClintView { msip: true, mtimecmp: 0, time: 0x5_0000_0007 };
        assert_eq!(read(&view, MTIME, 8).unwrap(), 0x5_0000_0007);
        assert_eq!(read(&view, MTIME + 4, 4).unwrap(), 5);
        assert_eq!(read(&view, MSIP, 4).unwrap(), 1);
    }

    #[test]
    fn byte_accesses_are_refused() {
        let view = ClintView::default();
        assert_eq!(read(&view, MTIME, 1), Err(AccessError));
        assert_eq!(write(&view, MTIMECMP, 2, 0), Err(AccessError));
    }
}
