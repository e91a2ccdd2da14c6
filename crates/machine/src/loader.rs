//! Loading a Linux kernel "Image" (the RISC-V boot image format), an initrd and the
//! device tree into RAM, and the boot register state (a0 = hart id, a1 = FDT).
//!
//! Layout: the kernel at RAM base + the header's text_offset; the device tree in the
//! last 64 KiB of RAM; the initrd just below it, clear of the kernel's whole footprint
//! (the header's image_size, which includes BSS).

use crate::board::RAM_BASE;
use rv64::GuestRam;
use thiserror::Error;

/// Room reserved at the top of RAM for the device tree.
pub const FDT_RESERVE: u64 = 64 * 1024;
const HEADER_LEN: usize = 64;
/// "RSC\x05", the header's magic2 field.
const MAGIC2: u32 = 0x0543_5352;
/// "RISCV\0\0\0", the header's deprecated magic field (still written by Linux).
const MAGIC: u64 = 0x0056_4353_5249;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LoadError {
    #[error("kernel is truncated: {len} bytes, less than the {HEADER_LEN}-byte RISC-V Image header")]
    KernelTruncated { len: usize },
    #[error("kernel is not a RISC-V Image: no \"RSC\\x05\" magic at offset 56 of the header")]
    NotRiscvImage,
    #[error("kernel needs {need} bytes at offset {offset:#x} of RAM, but RAM is only {ram} bytes")]
    KernelTooLarge { need: u64, offset: u64, ram: u64 },
    #[error(
        "initrd is {size} bytes but only {available} bytes of RAM are free between the kernel and the device tree"
    )]
    InitrdTooLarge { size: u64, available: u64 },
    #[error("device tree is {size} bytes, more than the {FDT_RESERVE} reserved for it")]
    FdtTooLarge { size: u64 },
}

/// The fields of the RISC-V Image header the loader uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    pub text_offset: u64,
    /// Memory the kernel occupies once running, including BSS.
    pub image_size: u64,
}

/// Parse and check the header of a RISC-V Linux Image.
pub fn parse_header(kernel: &[u8]) -> Result<ImageHeader, LoadError> {
    if kernel.len() < HEADER_LEN {
        return Err(LoadError::KernelTruncated { len: kernel.len() });
    }
    let u64_at = |off: usize| u64::from_le_bytes(kernel[off..off + 8].try_into().expect("8 bytes"));
    let magic2 = u32::from_le_bytes(kernel[56..60].try_into().expect("4 bytes"));
    if magic2 != MAGIC2 && u64_at(48) != MAGIC {
        return Err(LoadError::NotRiscvImage);
    }
    let image_size = u64_at(16).max(kernel.len() as u64);
    if image_size > u64_at(16) && u64_at(16) != 0 {
        // The file is longer than the size the header claims: the header lies or the
        // file carries trailing data; either way it is not loadable as is.
        return Err(LoadError::NotRiscvImage);
    }
    Ok(ImageHeader { text_offset: u64_at(8), image_size })
}

/// Where things went in RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootLayout {
    pub entry: u64,
    pub kernel_end: u64,
    pub initrd: Option<(u64, u64)>,
    pub fdt_addr: u64,
}

/// Decide where the kernel, initrd and device tree go, checking everything fits.
pub fn layout(header: &ImageHeader, initrd_len: Option<u64>, ram_size: u64) -> Result<BootLayout, LoadError> {
    let ram_end = RAM_BASE + ram_size;
    let entry = RAM_BASE + header.text_offset;
    let need = header.text_offset.saturating_add(header.image_size);
    if need.saturating_add(FDT_RESERVE) > ram_size {
        return Err(LoadError::KernelTooLarge { need: header.image_size, offset: header.text_offset, ram: ram_size });
    }
    let kernel_end = RAM_BASE + need;
    let fdt_addr = ram_end - FDT_RESERVE;
    let available = (fdt_addr - kernel_end) & !0xfff;
    let initrd = match initrd_len {
        None => None,
        Some(size) if size > available => return Err(LoadError::InitrdTooLarge { size, available }),
        Some(size) => {
            let start = (fdt_addr - size) & !0xfff;
            Some((start, start + size))
        }
    };
    Ok(BootLayout { entry, kernel_end, initrd, fdt_addr })
}

/// Copy the pieces into RAM.
pub fn place(
    ram: &mut GuestRam,
    layout: &BootLayout,
    kernel: &[u8],
    initrd: Option<&[u8]>,
    fdt: &[u8],
) -> Result<(), LoadError> {
    if fdt.len() as u64 > FDT_RESERVE {
        return Err(LoadError::FdtTooLarge { size: fdt.len() as u64 });
    }
    ram.write(layout.entry, kernel).expect("layout checked the kernel fits");
    if let (Some((start, _)), Some(bytes)) = (layout.initrd, initrd) {
        ram.write(start, bytes).expect("layout checked the initrd fits");
    }
    ram.write(layout.fdt_addr, fdt).expect("layout reserved the device tree's room");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(text_offset: u64, image_size: u64, len: usize) -> Vec<u8> {
        let mut k = vec![0u8; len];
        k[8..16].copy_from_slice(&text_offset.to_le_bytes());
        k[16..24].copy_from_slice(&image_size.to_le_bytes());
        k[56..60].copy_from_slice(&MAGIC2.to_le_bytes());
        k
    }

    #[test]
    fn a_valid_header_is_parsed() {
        let h = parse_header(&image(0x20_0000, 0x100_0000, 4096)).unwrap();
        assert_eq!(h, ImageHeader { text_offset: 0x20_0000, image_size: 0x100_0000 });
    }

    #[test]
    fn truncated_and_foreign_kernels_are_refused() {
        assert_eq!(parse_header(&[0; 10]), Err(LoadError::KernelTruncated { len: 10 }));
        assert_eq!(parse_header(&[0; 4096]), Err(LoadError::NotRiscvImage));
        let elf = [&b"\x7fELF"[..], &[0; 100]].concat();
        assert_eq!(parse_header(&elf), Err(LoadError::NotRiscvImage));
    }

    #[test]
    fn initrd_goes_below_the_fdt_and_clear_of_the_kernel_footprint() {
        let h = ImageHeader { text_offset: 0x20_0000, image_size: 0x200_0000 };
        let l = layout(&h, Some(0x1234), 64 << 20).unwrap();
        let (start, end) = l.initrd.unwrap();
        assert_eq!(start % 4096, 0);
        assert_eq!(end, start + 0x1234);
        assert!(end <= l.fdt_addr);
        assert!(start >= l.kernel_end);
        assert_eq!(l.fdt_addr, RAM_BASE + (64 << 20) - FDT_RESERVE);
    }

    #[test]
    fn an_initrd_larger_than_free_ram_is_refused() {
        let h = ImageHeader { text_offset: 0x20_0000, image_size: 0x200_0000 };
        let err = layout(&h, Some(64 << 20), 64 << 20).unwrap_err();
        assert!(matches!(err, LoadError::InitrdTooLarge { size, .. } if size == 64 << 20));
    }

    #[test]
    fn a_kernel_larger_than_ram_is_refused() {
        let h = ImageHeader { text_offset: 0x20_0000, image_size: 0x400_0000 };
        assert!(matches!(layout(&h, None, 32 << 20), Err(LoadError::KernelTooLarge { .. })));
    }
}
