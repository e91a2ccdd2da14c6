//! The SBI (RISC-V Supervisor Binary Interface v2.0), answered by the monitor itself
//! so that Linux starts straight in S-mode with no firmware image: base, TIME, IPI,
//! RFENCE, HSM, SRST, DBCN, and the legacy console, timer and shutdown calls.
//!
//! No PMU extension, on purpose. The hart has only the three fixed counters (`cycle` and
//! `instret` count retired instructions; the hpmcounters read zero), so SBI PMU could
//! offer nothing that Linux's legacy PMU driver (used when PMU is absent) does not
//! already give `perf`: the cycles and instructions events from those CSRs. Offering it
//! would also make Linux narrow scounteren to `time` alone (its default
//! `perf_user_access` = 1), which changes nothing for the vDSO but hides `rdcycle` from
//! programs that use it. The counters are readable from boot instead
//! (`machine::boot_state`), as OpenSBI leaves them.

use crate::board::Board;
use crate::io::OutputKind;
use rv64::{Hart, Interrupt};

const EXT_BASE: u64 = 0x10;
const EXT_TIME: u64 = 0x5449_4d45;
const EXT_IPI: u64 = 0x73_5049;
const EXT_RFENCE: u64 = 0x5246_4e43;
const EXT_HSM: u64 = 0x48_534d;
const EXT_SRST: u64 = 0x5352_5354;
const EXT_DBCN: u64 = 0x4442_434e;
const LEGACY_SET_TIMER: u64 = 0x00;
const LEGACY_PUTCHAR: u64 = 0x01;
const LEGACY_GETCHAR: u64 = 0x02;
const LEGACY_CLEAR_IPI: u64 = 0x03;
const LEGACY_SEND_IPI: u64 = 0x04;
const LEGACY_REMOTE_FENCE_I: u64 = 0x05;
const LEGACY_REMOTE_SFENCE_VMA: u64 = 0x06;
const LEGACY_REMOTE_SFENCE_VMA_ASID: u64 = 0x07;
const LEGACY_SHUTDOWN: u64 = 0x08;

const SUCCESS: i64 = 0;
const ERR_FAILED: i64 = -1;
const ERR_NOT_SUPPORTED: i64 = -2;
const ERR_INVALID_PARAM: i64 = -3;
const ERR_INVALID_ADDRESS: i64 = -5;
const ERR_ALREADY_AVAILABLE: i64 = -6;

/// SBI implementation ID for ftvm (unregistered; reported by sbi_get_impl_id).
const IMPL_ID: u64 = 0x4654;
const SPEC_VERSION_2_0: u64 = 2 << 24;
/// At most this many bytes per DBCN console write (the guest gets a short count).
const DBCN_MAX_WRITE: u64 = 4096;

/// Answer the SBI call the hart stopped at. Returns a power event when the guest
/// asked to power off or reset.
pub fn handle(hart: &mut Hart, board: &mut Board) -> Option<OutputKind> {
    let x = hart.state.x;
    let (eid, fid, a0, a1, a2) = (x[17], x[16], x[10], x[11], x[12]);
    let icount = hart.state.icount;
    let mut power = None;
    let (error, value) = match eid {
        LEGACY_SET_TIMER => {
            hart.set_stimecmp(a0);
            legacy(SUCCESS)
        }
        LEGACY_PUTCHAR => {
            board.outputs.console(icount, &[a0 as u8]);
            legacy(SUCCESS)
        }
        LEGACY_GETCHAR => legacy(board.uart.state.rx.pop_front().map_or(-1, |b| b as i64)),
        LEGACY_CLEAR_IPI => {
            hart.set_pending(Interrupt::SupervisorSoftware, false);
            legacy(SUCCESS)
        }
        LEGACY_SEND_IPI => {
            hart.set_pending(Interrupt::SupervisorSoftware, true);
            legacy(SUCCESS)
        }
        LEGACY_REMOTE_FENCE_I | LEGACY_REMOTE_SFENCE_VMA | LEGACY_REMOTE_SFENCE_VMA_ASID => {
            hart.flush_tlb();
            legacy(SUCCESS)
        }
        LEGACY_SHUTDOWN => {
            power = Some(OutputKind::PowerOff { code: 0 });
            legacy(SUCCESS)
        }
        EXT_BASE => base(fid, a0),
        EXT_TIME if fid == 0 => {
            hart.set_stimecmp(a0);
            (SUCCESS, 0)
        }
        EXT_IPI if fid == 0 => {
            if hart_in_mask(a0, a1) {
                hart.set_pending(Interrupt::SupervisorSoftware, true);
            }
            (SUCCESS, 0)
        }
        EXT_RFENCE if fid <= 6 => {
            hart.flush_tlb();
            (SUCCESS, 0)
        }
        EXT_HSM => hsm(fid, a0),
        EXT_SRST if fid == 0 => match (a0, a1) {
            (0, reason) => {
                power = Some(OutputKind::PowerOff { code: if reason == 0 { 0 } else { 1 } });
                (SUCCESS, 0)
            }
            (1 | 2, _) => {
                power = Some(OutputKind::Reset);
                (SUCCESS, 0)
            }
            _ => (ERR_INVALID_PARAM, 0),
        },
        EXT_DBCN => dbcn(fid, a0, a1, a2, icount, board),
        _ => (ERR_NOT_SUPPORTED, 0),
    };
    if eid <= LEGACY_SHUTDOWN {
        // Legacy calls return in a0 alone; a1 keeps the guest's value.
        let a1 = hart.state.x[11];
        hart.complete_sbi(error, a1);
    } else {
        hart.complete_sbi(error, value);
    }
    power
}

/// A legacy call's result (a0 only).
fn legacy(a0: i64) -> (i64, u64) {
    (a0, 0)
}

fn hart_in_mask(mask: u64, base: u64) -> bool {
    base == u64::MAX || (base == 0 && mask & 1 != 0)
}

fn base(fid: u64, a0: u64) -> (i64, u64) {
    match fid {
        0 => (SUCCESS, SPEC_VERSION_2_0),
        1 => (SUCCESS, IMPL_ID),
        2 => (SUCCESS, 1),
        3 => {
            let supported = matches!(a0, EXT_TIME | EXT_IPI | EXT_RFENCE | EXT_HSM | EXT_SRST | EXT_DBCN | 0..=8);
            (SUCCESS, supported as u64)
        }
        4..=6 => (SUCCESS, 0), // mvendorid, marchid, mimpid
        _ => (ERR_NOT_SUPPORTED, 0),
    }
}

fn hsm(fid: u64, hartid: u64) -> (i64, u64) {
    match fid {
        0 if hartid == 0 => (ERR_ALREADY_AVAILABLE, 0), // hart_start: hart 0 is running
        0 => (ERR_INVALID_PARAM, 0),
        1 => (ERR_FAILED, 0),             // hart_stop: the only hart can't stop
        2 if hartid == 0 => (SUCCESS, 0), // hart_get_status: STARTED
        2 => (ERR_INVALID_PARAM, 0),
        3 => (ERR_NOT_SUPPORTED, 0), // hart_suspend
        _ => (ERR_NOT_SUPPORTED, 0),
    }
}

fn dbcn(fid: u64, a0: u64, a1: u64, a2: u64, icount: u64, board: &mut Board) -> (i64, u64) {
    match fid {
        0 => {
            // console_write(num_bytes, base_lo, base_hi)
            let len = a0.min(DBCN_MAX_WRITE) as usize;
            let mut buf = vec![0; len];
            if a2 != 0 || board.ram.read(a1, &mut buf).is_none() {
                return (ERR_INVALID_ADDRESS, 0);
            }
            board.outputs.console(icount, &buf);
            (SUCCESS, len as u64)
        }
        1 => {
            // console_read(num_bytes, base_lo, base_hi)
            let n = (a0 as usize).min(board.uart.state.rx.len());
            let bytes: Vec<u8> = board.uart.state.rx.iter().take(n).copied().collect();
            if a2 != 0 || board.ram.write(a1, &bytes).is_none() {
                return (ERR_INVALID_ADDRESS, 0);
            }
            board.uart.state.rx.drain(..n);
            (SUCCESS, n as u64)
        }
        2 => {
            board.outputs.console(icount, &[a0 as u8]);
            (SUCCESS, 0)
        }
        _ => (ERR_NOT_SUPPORTED, 0),
    }
}
