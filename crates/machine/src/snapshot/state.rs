//! The state section: the [`MachineState`] (hart, UART, PLIC, RTC, clock rate, reboots and
//! the command line they boot with, virtio, pending inputs, end of run). Structs are destructured whole, so that a field added to any of them
//! fails to compile here until the format (and FORMAT_VERSION) takes it in.

use super::codec::Encoder;
use super::{malformed, Result, SnapshotError, MAX_INPUT_BYTES, MAX_QUEUES, MAX_STATE_BYTES};
use crate::board::VIRTIO_SLOTS;
use crate::devices::plic::{PlicState, NUM_CONTEXTS, NUM_SOURCES};
use crate::devices::rtc::RtcState;
use crate::devices::uart::{UartState, RX_QUEUE_CAP};
use crate::devices::virtio::blk::BlkState;
use crate::devices::virtio::net::{NetState, NetStats, MAX_FRAME_BYTES, RX_PENDING_MAX_FRAMES};
use crate::devices::virtio::rng::{RngState, POOL_MAX_BYTES};
use crate::devices::virtio::{Queue, VirtioDeviceState, VirtioMmioState, DEVICE_ID_BLK, DEVICE_ID_NET, DEVICE_ID_RNG};
use crate::io::{Input, InputKind};
use crate::machine::{MachineState, RunExit, MAX_BOOTARGS_BYTES, MAX_ICOUNT_PER_TICK, MAX_PENDING_INPUTS};
use bounded_reader::{ReadError, Reader};
use rv64::{HartState, PrivMode};

pub(super) fn encode_state(state: &MachineState) -> Result<Vec<u8>> {
    let MachineState { hart, uart, plic, rtc, icount_per_tick, reboots, bootargs, virtio, pending_inputs, ended } =
        state;
    let mut e = Encoder::default();
    encode_hart(&mut e, hart);
    encode_uart(&mut e, uart)?;
    encode_plic(&mut e, plic);
    encode_rtc(&mut e, rtc);
    e.u64(*icount_per_tick);
    e.u64(*reboots);
    e.bytes(bootargs.as_bytes(), MAX_BOOTARGS_BYTES, "the kernel command line")?;
    e.count(virtio.len(), VIRTIO_SLOTS, "virtio devices")?;
    for device in virtio {
        encode_virtio(&mut e, device)?;
    }
    e.count(pending_inputs.len(), MAX_PENDING_INPUTS, "pending inputs")?;
    for input in pending_inputs {
        encode_input(&mut e, input)?;
    }
    encode_ended(&mut e, ended);
    if e.buf.len() as u64 > MAX_STATE_BYTES {
        return Err(SnapshotError::TooLarge {
            what: "the machine state".into(),
            found: e.buf.len() as u64,
            max: MAX_STATE_BYTES,
        });
    }
    Ok(e.buf)
}

pub(super) fn decode_state(d: &mut Reader) -> Result<MachineState> {
    let hart = decode_hart(d)?;
    let uart = decode_uart(d)?;
    let plic = decode_plic(d)?;
    let rtc = decode_rtc(d)?;
    let icount_per_tick = decode_clock_rate(d, "the clock rate")?;
    let (reboots, bootargs) = decode_reboots(d, hart.icount)?;
    let count = d.count("virtio devices", VIRTIO_SLOTS, 1)?;
    let virtio = (0..count).map(|_| decode_virtio(d)).collect::<Result<Vec<_>>>()?;
    let count = d.count("pending inputs", MAX_PENDING_INPUTS, 9)?;
    let mut pending_inputs = Vec::with_capacity(count);
    let mut earliest = hart.icount;
    for _ in 0..count {
        let at = d.offset();
        let input = decode_input(d)?;
        // The machine's queue is in stamp order and never holds the past.
        if input.icount < earliest {
            return Err(malformed(
                at,
                format!("pending input stamped {} comes before icount {earliest}", input.icount),
            ));
        }
        earliest = input.icount;
        pending_inputs.push(input);
    }
    let ended = decode_ended(d)?;
    d.finish()?;
    Ok(MachineState { hart, uart, plic, rtc, icount_per_tick, reboots, bootargs, virtio, pending_inputs, ended })
}

/// The reboot count (each reboot follows the instruction that asked for it, so there are
/// no more than instructions) and the command line a reboot boots with (text the device
/// tree can hold: UTF-8 with no NUL).
fn decode_reboots(d: &mut Reader, icount: u64) -> Result<(u64, String)> {
    let at = d.offset();
    let reboots = d.u64("the reboot count")?;
    if reboots > icount {
        return Err(malformed(at, format!("{reboots} reboots by icount {icount}")));
    }
    let at = d.offset();
    let bytes = d.bytes("the kernel command line", MAX_BOOTARGS_BYTES)?;
    let bootargs = match std::str::from_utf8(bytes) {
        Ok(text) if !text.contains('\0') => text.to_string(),
        _ => return Err(malformed(at, "the kernel command line is not text without NUL bytes")),
    };
    Ok((reboots, bootargs))
}

fn encode_hart(e: &mut Encoder, hart: &HartState) {
    let HartState {
        x,
        f,
        pc,
        privilege,
        icount,
        time_offset_ticks,
        cycle_offset,
        instret_offset,
        mtimecmp,
        stimecmp,
        reservation,
        wfi,
        hart_id,
        fcsr,
        mstatus,
        medeleg,
        mideleg,
        mie,
        mip,
        mtvec,
        mscratch,
        mepc,
        mcause,
        mtval,
        mcounteren,
        menvcfg,
        stvec,
        sscratch,
        sepc,
        scause,
        stval,
        satp,
        scounteren,
        senvcfg,
    } = hart;
    for v in x.iter().chain(f.iter()) {
        e.u64(*v);
    }
    e.u64(*pc);
    e.u8(*privilege as u8);
    for v in [icount, time_offset_ticks, cycle_offset, instret_offset, mtimecmp, stimecmp] {
        e.u64(*v);
    }
    e.bool(reservation.is_some());
    e.u64(reservation.unwrap_or(0));
    e.bool(*wfi);
    let csrs = [
        hart_id, fcsr, mstatus, medeleg, mideleg, mie, mip, mtvec, mscratch, mepc, mcause, mtval, mcounteren, menvcfg,
        stvec, sscratch, sepc, scause, stval, satp, scounteren, senvcfg,
    ];
    for v in csrs {
        e.u64(*v);
    }
}

fn decode_hart(d: &mut Reader) -> Result<HartState> {
    let x: [u64; 32] = d.u64s("the integer registers")?;
    if x[0] != 0 {
        return Err(malformed(d.offset(), format!("register x0 holds {:#x}, not 0", x[0])));
    }
    let f = d.u64s("the floating-point registers")?;
    let pc = d.u64("pc")?;
    let at = d.offset();
    let privilege = match d.u8("the privilege mode")? {
        0 => PrivMode::User,
        1 => PrivMode::Supervisor,
        3 => PrivMode::Machine,
        other => return Err(malformed(at, format!("privilege mode {other} does not exist"))),
    };
    let [icount, time_offset_ticks, cycle_offset, instret_offset, mtimecmp, stimecmp] =
        d.u64s("the hart's counters")?;
    let reserved = d.bool("the reservation flag")?;
    let address = d.u64("the reservation address")?;
    let reservation = reserved.then_some(address);
    let wfi = d.bool("the WFI flag")?;
    let [hart_id, fcsr, mstatus, medeleg, mideleg, mie, mip, mtvec, mscratch, mepc, mcause, mtval, mcounteren, menvcfg, stvec, sscratch, sepc, scause, stval, satp, scounteren, senvcfg] =
        d.u64s("the CSRs")?;
    Ok(HartState {
        x,
        f,
        pc,
        privilege,
        icount,
        time_offset_ticks,
        cycle_offset,
        instret_offset,
        mtimecmp,
        stimecmp,
        reservation,
        wfi,
        hart_id,
        fcsr,
        mstatus,
        medeleg,
        mideleg,
        mie,
        mip,
        mtvec,
        mscratch,
        mepc,
        mcause,
        mtval,
        mcounteren,
        menvcfg,
        stvec,
        sscratch,
        sepc,
        scause,
        stval,
        satp,
        scounteren,
        senvcfg,
    })
}

fn encode_uart(e: &mut Encoder, uart: &UartState) -> Result<()> {
    let UartState { ier, lcr, mcr, scr, dll, dlm, fcr, thre_pending, rx, rx_dropped } = uart;
    e.raw(&[*ier, *lcr, *mcr, *scr, *dll, *dlm, *fcr]);
    e.bool(*thre_pending);
    let (a, b) = rx.as_slices();
    e.count(rx.len(), RX_QUEUE_CAP, "UART receive queue bytes")?;
    e.raw(a);
    e.raw(b);
    e.u64(*rx_dropped);
    Ok(())
}

fn decode_uart(d: &mut Reader) -> Result<UartState> {
    let [ier, lcr, mcr, scr, dll, dlm, fcr] = d.array("the UART registers")?;
    let thre_pending = d.bool("the UART's THR-empty flag")?;
    let rx = d.bytes("UART receive queue bytes", RX_QUEUE_CAP)?.to_vec().into();
    let rx_dropped = d.u64("the UART's dropped count")?;
    Ok(UartState { ier, lcr, mcr, scr, dll, dlm, fcr, thre_pending, rx, rx_dropped })
}

fn encode_plic(e: &mut Encoder, plic: &PlicState) {
    let PlicState { priority, pending, in_service, level, enable, threshold } = plic;
    for v in priority.iter().chain([pending, in_service, level]).chain(enable).chain(threshold) {
        e.u32(*v);
    }
}

fn decode_plic(d: &mut Reader) -> Result<PlicState> {
    let priority: [u32; NUM_SOURCES] = d.u32s("the PLIC priorities")?;
    let [pending, in_service, level] = d.u32s("the PLIC lines")?;
    let enable: [u32; NUM_CONTEXTS] = d.u32s("the PLIC enables")?;
    let threshold: [u32; NUM_CONTEXTS] = d.u32s("the PLIC thresholds")?;
    Ok(PlicState { priority, pending, in_service, level, enable, threshold })
}

fn encode_rtc(e: &mut Encoder, rtc: &RtcState) {
    let RtcState { base_ns, time_high, alarm_ns, alarm_running, irq_enabled, irq_pending } = rtc;
    e.u64(*base_ns);
    e.u32(*time_high);
    e.u64(*alarm_ns);
    for v in [alarm_running, irq_enabled, irq_pending] {
        e.bool(*v);
    }
}

fn decode_rtc(d: &mut Reader) -> Result<RtcState> {
    let base_ns = d.u64("the RTC's base time")?;
    let time_high = d.u32("the RTC's latched high half")?;
    let alarm_ns = d.u64("the RTC's alarm")?;
    let alarm_running = d.bool("the RTC's alarm flag")?;
    let irq_enabled = d.bool("the RTC's interrupt enable")?;
    let irq_pending = d.bool("the RTC's pending interrupt")?;
    Ok(RtcState { base_ns, time_high, alarm_ns, alarm_running, irq_enabled, irq_pending })
}

/// Instructions per tick, within the range the machine runs.
fn decode_clock_rate(d: &mut Reader, what: &'static str) -> Result<u64> {
    let at = d.offset();
    let rate = d.u64(what)?;
    if !(1..=MAX_ICOUNT_PER_TICK).contains(&rate) {
        return Err(malformed(
            at,
            format!("{what} of {rate} instructions per tick is not within 1..={MAX_ICOUNT_PER_TICK}"),
        ));
    }
    Ok(rate)
}

fn encode_virtio(e: &mut Encoder, state: &VirtioMmioState) -> Result<()> {
    let VirtioMmioState {
        status,
        device_features_sel,
        driver_features_sel,
        driver_features,
        queue_sel,
        interrupt_status,
        queues,
        device,
    } = state;
    for v in [status, device_features_sel, driver_features_sel] {
        e.u32(*v);
    }
    e.u64(*driver_features);
    e.u32(*queue_sel);
    e.u32(*interrupt_status);
    e.count(queues.len(), MAX_QUEUES, "virtio queues")?;
    for queue in queues {
        let Queue { size, ready, desc_addr, avail_addr, used_addr, next_avail, next_used } = queue;
        e.u32(*size);
        e.bool(*ready);
        for v in [desc_addr, avail_addr, used_addr] {
            e.u64(*v);
        }
        e.u16(*next_avail);
        e.u16(*next_used);
    }
    match device {
        VirtioDeviceState::Blk(BlkState { capacity_sectors, read_only, injected_errors }) => {
            e.u32(DEVICE_ID_BLK);
            e.u64(*capacity_sectors);
            e.bool(*read_only);
            e.u32(*injected_errors);
        }
        VirtioDeviceState::Net(NetState { mac, rx_pending, stats }) => {
            e.u32(DEVICE_ID_NET);
            e.raw(mac);
            e.count(rx_pending.len(), RX_PENDING_MAX_FRAMES, "received frames waiting")?;
            for frame in rx_pending {
                e.bytes(frame, MAX_FRAME_BYTES, "a waiting received frame's bytes")?;
            }
            let NetStats {
                rx_frames,
                tx_frames,
                rx_dropped_oversize,
                rx_dropped_not_ready,
                rx_dropped_queue_full,
                rx_dropped_buffer_too_small,
                tx_dropped_malformed,
            } = stats;
            for v in [
                rx_frames,
                tx_frames,
                rx_dropped_oversize,
                rx_dropped_not_ready,
                rx_dropped_queue_full,
                rx_dropped_buffer_too_small,
                tx_dropped_malformed,
            ] {
                e.u64(*v);
            }
        }
        VirtioDeviceState::Rng(RngState { pool, starved }) => {
            e.u32(DEVICE_ID_RNG);
            e.bytes(pool, POOL_MAX_BYTES, "entropy pool bytes")?;
            e.bool(*starved);
        }
    }
    Ok(())
}

fn decode_virtio(d: &mut Reader) -> Result<VirtioMmioState> {
    let [status, device_features_sel, driver_features_sel] = d.u32s("the virtio transport registers")?;
    let driver_features = d.u64("the driver features")?;
    let [queue_sel, interrupt_status] = d.u32s("the virtio transport registers")?;
    let count = d.count("virtio queues", MAX_QUEUES, 33)?;
    let mut queues = Vec::with_capacity(count);
    for _ in 0..count {
        let size = d.u32("a queue's size")?;
        let ready = d.bool("a queue's ready flag")?;
        let [desc_addr, avail_addr, used_addr] = d.u64s("a queue's ring addresses")?;
        let next_avail = d.u16("a queue's next available index")?;
        let next_used = d.u16("a queue's next used index")?;
        queues.push(Queue { size, ready, desc_addr, avail_addr, used_addr, next_avail, next_used });
    }
    let at = d.offset();
    let device = match d.u32("the virtio device id")? {
        DEVICE_ID_BLK => {
            let capacity_sectors = d.u64("the disk's size")?;
            let read_only = d.bool("the disk's read-only flag")?;
            let injected_errors = d.u32("the disk's injected error count")?;
            VirtioDeviceState::Blk(BlkState { capacity_sectors, read_only, injected_errors })
        }
        DEVICE_ID_NET => {
            let mac = d.array("the MAC address")?;
            let count = d.count("received frames waiting", RX_PENDING_MAX_FRAMES, 4)?;
            let rx_pending = (0..count)
                .map(|_| d.bytes("a waiting received frame's bytes", MAX_FRAME_BYTES).map(<[u8]>::to_vec))
                .collect::<Result<_, ReadError>>()?;
            let [rx_frames, tx_frames, rx_dropped_oversize, rx_dropped_not_ready, rx_dropped_queue_full, rx_dropped_buffer_too_small, tx_dropped_malformed] =
                d.u64s("the network card's counters")?;
            let stats = NetStats {
                rx_frames,
                tx_frames,
                rx_dropped_oversize,
                rx_dropped_not_ready,
                rx_dropped_queue_full,
                rx_dropped_buffer_too_small,
                tx_dropped_malformed,
            };
            VirtioDeviceState::Net(NetState { mac, rx_pending, stats })
        }
        DEVICE_ID_RNG => {
            let pool = d.bytes("entropy pool bytes", POOL_MAX_BYTES)?.to_vec();
            let starved = d.bool("the entropy device's starved flag")?;
            VirtioDeviceState::Rng(RngState { pool, starved })
        }
        other => return Err(malformed(at, format!("virtio device id {other} is none of block, network, entropy"))),
    };
    Ok(VirtioMmioState {
        status,
        device_features_sel,
        driver_features_sel,
        driver_features,
        queue_sel,
        interrupt_status,
        queues,
        device,
    })
}

const INPUT_CONSOLE: u8 = 1;
const INPUT_NET_FRAME: u8 = 2;
const INPUT_ENTROPY: u8 = 3;
const INPUT_IDLE_SKIP: u8 = 4;
const INPUT_CLOCK_RATE: u8 = 5;

fn encode_input(e: &mut Encoder, input: &Input) -> Result<()> {
    let Input { icount, kind } = input;
    e.u64(*icount);
    let what = || format!("the input stamped {icount}");
    match kind {
        InputKind::Console(bytes) => {
            e.u8(INPUT_CONSOLE);
            e.bytes(bytes, MAX_INPUT_BYTES, &what())
        }
        InputKind::NetFrame(bytes) => {
            e.u8(INPUT_NET_FRAME);
            e.bytes(bytes, MAX_INPUT_BYTES, &what())
        }
        InputKind::Entropy(bytes) => {
            e.u8(INPUT_ENTROPY);
            e.bytes(bytes, MAX_INPUT_BYTES, &what())
        }
        InputKind::IdleSkip { ticks } => {
            e.u8(INPUT_IDLE_SKIP);
            e.u64(*ticks);
            Ok(())
        }
        InputKind::ClockRate { icount_per_tick } => {
            e.u8(INPUT_CLOCK_RATE);
            e.u64(*icount_per_tick);
            Ok(())
        }
    }
}

fn decode_input(d: &mut Reader) -> Result<Input> {
    let icount = d.u64("an input's stamp")?;
    let at = d.offset();
    let kind = match d.u8("an input's kind")? {
        INPUT_CONSOLE => InputKind::Console(d.bytes("an input's bytes", MAX_INPUT_BYTES)?.to_vec()),
        INPUT_NET_FRAME => InputKind::NetFrame(d.bytes("an input's bytes", MAX_INPUT_BYTES)?.to_vec()),
        INPUT_ENTROPY => InputKind::Entropy(d.bytes("an input's bytes", MAX_INPUT_BYTES)?.to_vec()),
        INPUT_IDLE_SKIP => InputKind::IdleSkip { ticks: d.u64("an idle skip")? },
        INPUT_CLOCK_RATE => InputKind::ClockRate { icount_per_tick: decode_clock_rate(d, "a clock-rate input")? },
        other => return Err(malformed(at, format!("input kind {other} does not exist"))),
    };
    Ok(Input { icount, kind })
}

fn encode_ended(e: &mut Encoder, ended: &Option<RunExit>) {
    match ended {
        None => e.u8(0),
        Some(RunExit::PowerOff { code }) => {
            e.u8(1);
            e.u32(*code);
        }
        Some(RunExit::Reset) => e.u8(2),
        Some(RunExit::Budget) => e.u8(3),
        Some(RunExit::Idle { next_deadline_ticks }) => {
            e.u8(4);
            e.bool(next_deadline_ticks.is_some());
            e.u64(next_deadline_ticks.unwrap_or(0));
        }
    }
}

fn decode_ended(d: &mut Reader) -> Result<Option<RunExit>> {
    let at = d.offset();
    Ok(match d.u8("the end of the run")? {
        0 => None,
        1 => Some(RunExit::PowerOff { code: d.u32("the exit code")? }),
        2 => Some(RunExit::Reset),
        3 => Some(RunExit::Budget),
        4 => {
            let some = d.bool("the idle deadline flag")?;
            let ticks = d.u64("the idle deadline")?;
            Some(RunExit::Idle { next_deadline_ticks: some.then_some(ticks) })
        }
        other => return Err(malformed(at, format!("end-of-run kind {other} does not exist"))),
    })
}

// ---------------------------------------------------------------------------------------
// The state section on its own, for checkpoints (crate::checkpoint): one encoding of the
// machine state for snapshots and replication alike.

/// Encode a machine state (no RAM, no disk) as the snapshot's state section does.
pub fn encode_machine_state(state: &MachineState) -> Result<Vec<u8>> {
    encode_state(state)
}

/// Decode a state encoded by [`encode_machine_state`], with the same limits and checks.
pub fn decode_machine_state(bytes: &[u8]) -> Result<MachineState> {
    let mut d = Reader::new(bytes);
    decode_state(&mut d)
}
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn queue(seed: u64) -> Queue {
        Queue {
            size: 256,
            ready: seed & 1 == 0,
            desc_addr: seed << 12,
            avail_addr: (seed << 12) + 0x1000,
            used_addr: (seed << 12) + 0x2000,
            next_avail: seed as u16,
            next_used: !seed as u16,
        }
    }

    fn transport(device: VirtioDeviceState, queues: usize) -> VirtioMmioState {
        VirtioMmioState {
            status: 0xf,
            device_features_sel: 1,
            driver_features_sel: 0,
            driver_features: 1 << 32 | 1 << 5,
            queue_sel: 1,
            interrupt_status: 1,
            queues: (0..queues as u64).map(queue).collect(),
            device,
        }
    }

    /// A state with a distinct value in every field.
    fn sample_state() -> MachineState {
        let mut hart = HartState::default();
        for (i, r) in hart.x.iter_mut().enumerate().skip(1) {
            *r = 0x1000 + i as u64;
        }
        for (i, r) in hart.f.iter_mut().enumerate() {
            *r = 0xffff_0000_0000_0000 | i as u64;
        }
        hart.pc = 0x8020_0000;
        hart.privilege = PrivMode::Supervisor;
        hart.icount = 1_000;
        hart.time_offset_ticks = 7;
        hart.cycle_offset = 8;
        hart.instret_offset = 9;
        hart.mtimecmp = u64::MAX;
        hart.stimecmp = 12345;
        hart.reservation = Some(0x8000_1000);
        hart.wfi = true;
        hart.mstatus = 0xa_0000_0000;
        hart.satp = 8 << 60 | 0x1234;
        hart.senvcfg = 1;
        let uart = UartState {
            ier: 1,
            lcr: 3,
            mcr: 8,
            scr: 0x55,
            dll: 1,
            dlm: 0,
            fcr: 0xc1,
            thre_pending: true,
            rx: b"typed".to_vec().into(),
            rx_dropped: 2,
        };
        let mut plic = PlicState::default();
        plic.priority[1] = 1;
        plic.priority[3] = 7;
        plic.pending = 1 << 3;
        plic.enable = [0, 0xe];
        plic.threshold = [7, 0];
        let net = NetState {
            mac: [2, 0, 0, 0, 0, 1],
            rx_pending: vec![vec![0xab; 60], vec![]],
            stats: NetStats { rx_frames: 3, tx_dropped_malformed: 1, ..NetStats::default() },
        };
        let virtio = vec![
            transport(
                VirtioDeviceState::Blk(BlkState { capacity_sectors: 2048, read_only: false, injected_errors: 1 }),
                1,
            ),
            transport(VirtioDeviceState::Net(net), 2),
            transport(VirtioDeviceState::Rng(RngState { pool: vec![9; 100], starved: true }), 1),
        ];
        let pending_inputs = vec![
            Input { icount: 1_000, kind: InputKind::Console(b"ls\n".to_vec()) },
            Input { icount: 2_000, kind: InputKind::NetFrame(vec![0xff; 64]) },
            Input { icount: 2_000, kind: InputKind::Entropy(vec![1; 32]) },
            Input { icount: 3_000, kind: InputKind::IdleSkip { ticks: 99 } },
            Input { icount: 3_000, kind: InputKind::ClockRate { icount_per_tick: 23 } },
        ];
        let rtc = RtcState {
            base_ns: 1_764_000_000_123_456_789,
            time_high: 0x1871_0b3a,
            alarm_ns: 1_764_000_060_000_000_000,
            alarm_running: true,
            irq_enabled: true,
            irq_pending: false,
        };
        let ended = Some(RunExit::PowerOff { code: 3 });
        let bootargs = "console=ttyS0 ftvm.cmd=dHJ1ZQ==".to_string();
        MachineState { hart, uart, plic, rtc, icount_per_tick: 22, reboots: 2, bootargs, virtio, pending_inputs, ended }
    }

    fn decode(bytes: &[u8]) -> Result<MachineState> {
        decode_state(&mut Reader::new(bytes))
    }

    #[test]
    fn the_state_round_trips_through_its_encoding() {
        let state = sample_state();
        assert_eq!(decode(&encode_state(&state).unwrap()).unwrap(), state);
        for ended in
            [None, Some(RunExit::Reset), Some(RunExit::Budget), Some(RunExit::Idle { next_deadline_ticks: Some(5) })]
        {
            let state = MachineState { ended, ..sample_state() };
            assert_eq!(decode(&encode_state(&state).unwrap()).unwrap(), state);
        }
    }

    #[test]
    fn every_truncation_of_the_state_is_refused() {
        let bytes = encode_state(&sample_state()).unwrap();
        for len in 0..bytes.len() {
            let err = decode(&bytes[..len]).unwrap_err();
            assert!(
                matches!(err, SnapshotError::State(ReadError::Truncated { .. } | ReadError::DoesNotFit { .. })),
                "at {len}: {err}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decode(&longer),
            Err(SnapshotError::State(ReadError::TrailingBytes { offset, extra: 1 })) if offset == bytes.len() as u64
        ));
    }

    /// Offset of the pending-input count in the sample state's encoding.
    fn pending_count_at(bytes: &[u8]) -> usize {
        // The inputs and the end-of-run marker follow the count.
        let tail = {
            let mut e = Encoder::default();
            for input in &sample_state().pending_inputs {
                encode_input(&mut e, input).unwrap();
            }
            encode_ended(&mut e, &sample_state().ended);
            e.buf.len()
        };
        bytes.len() - tail - 4
    }

    #[test]
    fn counts_beyond_their_caps_or_the_bytes_left_are_refused_before_allocating() {
        let bytes = encode_state(&sample_state()).unwrap();
        let at = pending_count_at(&bytes);
        assert_eq!(bytes[at..at + 4], 5u32.to_le_bytes());
        let mut huge = bytes.clone();
        huge[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let Err(SnapshotError::State(err)) = decode(&huge) else { panic!("a huge count is refused") };
        let offset = at as u64;
        let max = MAX_PENDING_INPUTS as u64;
        assert_eq!(err, ReadError::OverLimit { field: "pending inputs", offset, count: u32::MAX.into(), max });
        let mut more_than_left = bytes.clone();
        more_than_left[at..at + 4].copy_from_slice(&60_000u32.to_le_bytes());
        let Err(SnapshotError::State(err)) = decode(&more_than_left) else { panic!("a count past the end is refused") };
        let left = (bytes.len() - at - 4) as u64;
        assert_eq!(err, ReadError::DoesNotFit { field: "pending inputs", offset, count: 60_000, item_bytes: 9, left });
    }

    #[test]
    fn values_outside_their_domain_are_refused() {
        let bytes = encode_state(&sample_state()).unwrap();
        let mut x0 = bytes.clone();
        x0[0] = 1;
        assert!(decode(&x0).unwrap_err().to_string().contains("x0"));
        let mut privilege = bytes.clone();
        privilege[64 * 8 + 8] = 2;
        assert!(decode(&privilege).unwrap_err().to_string().contains("privilege mode 2"));
        let mut past = sample_state();
        past.pending_inputs[0].icount = 999;
        let err = decode(&encode_state(&past).unwrap()).unwrap_err().to_string();
        assert!(err.contains("stamped 999 comes before icount 1000"), "{err}");
        let mut out_of_order = sample_state();
        out_of_order.pending_inputs.swap(0, 3);
        out_of_order.pending_inputs[3].icount = 1_000;
        assert!(decode(&encode_state(&out_of_order).unwrap()).is_err());
        for rate in [0, MAX_ICOUNT_PER_TICK + 1] {
            let stopped = MachineState { icount_per_tick: rate, ..sample_state() };
            let err = decode(&encode_state(&stopped).unwrap()).unwrap_err().to_string();
            assert!(err.contains(&format!("the clock rate of {rate} instructions per tick")), "{err}");
            let mut input = sample_state();
            input.pending_inputs[4].kind = InputKind::ClockRate { icount_per_tick: rate };
            let err = decode(&encode_state(&input).unwrap()).unwrap_err().to_string();
            assert!(err.contains(&format!("a clock-rate input of {rate} instructions")), "{err}");
        }
    }

    #[test]
    fn more_reboots_than_instructions_or_a_command_line_the_device_tree_cannot_hold_is_refused() {
        let many = MachineState { reboots: 1_001, ..sample_state() };
        let err = decode(&encode_state(&many).unwrap()).unwrap_err().to_string();
        assert!(err.contains("1001 reboots by icount 1000"), "{err}");
        let nul = MachineState { bootargs: "console=ttyS0\0x".into(), ..sample_state() };
        let err = decode(&encode_state(&nul).unwrap()).unwrap_err().to_string();
        assert!(err.contains("the kernel command line is not text without NUL bytes"), "{err}");
        let long = MachineState { bootargs: "x".repeat(MAX_BOOTARGS_BYTES + 1), ..sample_state() };
        assert!(matches!(encode_state(&long), Err(SnapshotError::TooLarge { .. })));
    }

    #[test]
    fn the_writer_refuses_what_the_reader_would_refuse() {
        let mut big_input = sample_state();
        big_input
            .pending_inputs
            .push(Input { icount: 5_000, kind: InputKind::Console(vec![b'x'; MAX_INPUT_BYTES + 1]) });
        let err = encode_state(&big_input).unwrap_err();
        assert!(
            matches!(err, SnapshotError::TooLarge { found, max, .. } if found == MAX_INPUT_BYTES as u64 + 1 && max == MAX_INPUT_BYTES as u64)
        );
        let mut big_pool = sample_state();
        big_pool.virtio[2].device =
            VirtioDeviceState::Rng(RngState { pool: vec![0; POOL_MAX_BYTES + 1], starved: false });
        assert!(matches!(encode_state(&big_pool), Err(SnapshotError::TooLarge { .. })));
        let mut many = sample_state();
        many.pending_inputs =
            vec![Input { icount: 1_000, kind: InputKind::IdleSkip { ticks: 1 } }; MAX_PENDING_INPUTS + 1];
        assert!(matches!(encode_state(&many), Err(SnapshotError::TooLarge { .. })));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn the_state_decoder_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn the_state_decoder_never_panics_on_a_mutated_state(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
            let mut bytes = encode_state(&sample_state()).unwrap();
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if let Ok(state) = decode(&bytes) {
                // Whatever decodes re-encodes to the same bytes: the encoding is canonical.
                prop_assert_eq!(encode_state(&state).unwrap(), bytes);
            }
        }
    }
}
