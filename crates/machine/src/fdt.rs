//! The device tree Linux boots with, generated with rust-vmm's vm-fdt. Node names,
//! addresses and compatible strings follow QEMU's virt board, so the stock kernel's
//! drivers (8250 UART, SiFive PLIC, Goldfish RTC, virtio-mmio) bind without any change.

use crate::board::*;
use vm_fdt::{Error as FdtError, FdtWriter};

const CPU_INTC_PHANDLE: u32 = 1;
const PLIC_PHANDLE: u32 = 2;
/// The ISA string in the form Linux parses (`riscv,isa`): only what the hart implements.
pub const ISA_STRING: &str = "rv64imafdc_zicntr_zicsr_zifencei_sstc";

/// What the device tree describes.
pub struct FdtConfig<'a> {
    pub ram_size: u64,
    pub bootargs: &'a str,
    /// Physical start and end of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
    /// Number of virtio-mmio slots in use.
    pub virtio_slots: usize,
}

pub fn build(config: &FdtConfig) -> Result<Vec<u8>, FdtError> {
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_string("compatible", "riscv-virtio")?;
    fdt.property_string("model", "ftvm,rv64")?;

    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", config.bootargs)?;
    fdt.property_string("stdout-path", &format!("/soc/serial@{UART_BASE:x}"))?;
    if let Some((start, end)) = config.initrd {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", end)?;
    }
    fdt.end_node(chosen)?;

    let memory = fdt.begin_node(&format!("memory@{RAM_BASE:x}"))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[RAM_BASE, config.ram_size])?;
    fdt.end_node(memory)?;

    cpus(&mut fdt)?;
    soc(&mut fdt, config)?;
    fdt.end_node(root)?;
    fdt.finish()
}

fn cpus(fdt: &mut FdtWriter) -> Result<(), FdtError> {
    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 1)?;
    fdt.property_u32("#size-cells", 0)?;
    fdt.property_u32("timebase-frequency", TIMEBASE_HZ as u32)?;
    let cpu = fdt.begin_node("cpu@0")?;
    fdt.property_string("device_type", "cpu")?;
    fdt.property_u32("reg", 0)?;
    fdt.property_string("status", "okay")?;
    fdt.property_string("compatible", "riscv")?;
    fdt.property_string("riscv,isa", ISA_STRING)?;
    fdt.property_string("mmu-type", "riscv,sv39")?;
    let intc = fdt.begin_node("interrupt-controller")?;
    fdt.property_u32("#interrupt-cells", 1)?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_string("compatible", "riscv,cpu-intc")?;
    fdt.property_phandle(CPU_INTC_PHANDLE)?;
    fdt.end_node(intc)?;
    fdt.end_node(cpu)?;
    fdt.end_node(cpus)
}

fn soc(fdt: &mut FdtWriter, config: &FdtConfig) -> Result<(), FdtError> {
    let soc = fdt.begin_node("soc")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_string("compatible", "simple-bus")?;
    fdt.property_null("ranges")?;

    let test = fdt.begin_node(&format!("test@{TEST_BASE:x}"))?;
    fdt.property_string_list("compatible", vec!["sifive,test1".into(), "sifive,test0".into()])?;
    fdt.property_array_u64("reg", &[TEST_BASE, crate::devices::test_device::SIZE])?;
    fdt.end_node(test)?;

    let clint = fdt.begin_node(&format!("clint@{CLINT_BASE:x}"))?;
    fdt.property_string_list("compatible", vec!["sifive,clint0".into(), "riscv,clint0".into()])?;
    fdt.property_array_u64("reg", &[CLINT_BASE, crate::devices::clint::SIZE])?;
    fdt.property_array_u32("interrupts-extended", &[CPU_INTC_PHANDLE, 3, CPU_INTC_PHANDLE, 7])?;
    fdt.end_node(clint)?;

    let plic = fdt.begin_node(&format!("plic@{PLIC_BASE:x}"))?;
    fdt.property_string_list("compatible", vec!["sifive,plic-1.0.0".into(), "riscv,plic0".into()])?;
    fdt.property_array_u64("reg", &[PLIC_BASE, crate::devices::plic::SIZE])?;
    fdt.property_u32("#interrupt-cells", 1)?;
    fdt.property_u32("#address-cells", 0)?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("riscv,ndev", (crate::devices::plic::NUM_SOURCES - 1) as u32)?;
    fdt.property_array_u32("interrupts-extended", &[CPU_INTC_PHANDLE, 11, CPU_INTC_PHANDLE, 9])?;
    fdt.property_phandle(PLIC_PHANDLE)?;
    fdt.end_node(plic)?;

    let uart = fdt.begin_node(&format!("serial@{UART_BASE:x}"))?;
    fdt.property_string("compatible", "ns16550a")?;
    fdt.property_array_u64("reg", &[UART_BASE, UART_SIZE])?;
    fdt.property_u32("clock-frequency", 3_686_400)?;
    fdt.property_u32("interrupt-parent", PLIC_PHANDLE)?;
    fdt.property_u32("interrupts", UART_IRQ as u32)?;
    fdt.end_node(uart)?;

    let rtc = fdt.begin_node(&format!("rtc@{RTC_BASE:x}"))?;
    fdt.property_string("compatible", "google,goldfish-rtc")?;
    fdt.property_array_u64("reg", &[RTC_BASE, crate::devices::rtc::SIZE])?;
    fdt.property_u32("interrupt-parent", PLIC_PHANDLE)?;
    fdt.property_u32("interrupts", RTC_IRQ as u32)?;
    fdt.end_node(rtc)?;

    for slot in 0..config.virtio_slots {
        let base = VIRTIO_BASE + slot as u64 * VIRTIO_STRIDE;
        let node = fdt.begin_node(&format!("virtio_mmio@{base:x}"))?;
        fdt.property_string("compatible", "virtio,mmio")?;
        fdt.property_array_u64("reg", &[base, VIRTIO_STRIDE])?;
        fdt.property_u32("interrupt-parent", PLIC_PHANDLE)?;
        fdt.property_u32("interrupts", (VIRTIO_IRQ_BASE + slot) as u32)?;
        fdt.end_node(node)?;
    }
    fdt.end_node(soc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_blob_is_a_valid_fdt_with_the_bootargs() {
        let config = FdtConfig {
            ram_size: 512 << 20,
            bootargs: "console=ttyS0 quiet",
            initrd: Some((0x9000_0000, 0x9100_0000)),
            virtio_slots: 3,
        };
        let blob = build(&config).unwrap();
        assert_eq!(u32::from_be_bytes(blob[0..4].try_into().unwrap()), 0xd00d_feed);
        assert_eq!(u32::from_be_bytes(blob[4..8].try_into().unwrap()) as usize, blob.len());
        let text = String::from_utf8_lossy(&blob);
        for needle in
            ["console=ttyS0 quiet", ISA_STRING, "virtio_mmio@10003000", "ns16550a", "riscv,plic0", "rtc@101000"]
        {
            assert!(text.contains(needle), "device tree lacks {needle}");
        }
        assert!(!text.contains("virtio_mmio@10004000"), "only the slots in use are described");
        assert!(text.contains("google,goldfish-rtc"), "Linux's rtc-goldfish binds to the clock");
    }
}
