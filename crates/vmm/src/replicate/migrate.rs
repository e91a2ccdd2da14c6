//! Live migration, the destination's side: an `ftvm backup` that goes live by a planned
//! switchover rather than a failover. The protocol is the backup core's
//! ([`replica::Backup::handover`]); this is what the waiting loop adds at its edge: fault
//! points at the switchover's steps, the log line, and the figures for status.
//!
//! Fault points (feature `failpoints`, see [`crate::keeper::fault`]):
//! `migrate::dest-claim` just before the destination swaps the record for a switchover,
//! `migrate::dest-claimed` just after it swapped it, before it answers `SwitchedOver`.
//! The source's are in [`crate::mode::migrate`].

use crate::keeper::fault;
use crate::log::{self, Source};
use crate::status::{Arrival, DowntimePhases};
use replica::{Backup, SwapAnswer};

/// Now, on the wall clock the source's pause is stamped with.
pub(crate) fn unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// When this replica's steps of a switchover happened (unix µs), for the downtime's breakdown.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Timeline {
    /// The last checkpoint handed to the machine's thread to be applied.
    handed_us: u64,
    /// The last checkpoint applied (the final one, once the switchover is under way).
    applied_us: u64,
    swap_started_us: u64,
    swapped_us: u64,
    /// How long making the swap durable took (while `SwitchedOver` and `HandedOver` travel).
    sync_us: u64,
}

impl Timeline {
    pub(crate) fn handed(&mut self) {
        self.handed_us = unix_us();
    }

    pub(crate) fn applied(&mut self) {
        self.applied_us = unix_us();
    }

    pub(crate) fn synced(&mut self, took_us: u64) {
        self.sync_us = took_us;
    }
}

/// Before a swap of the record: a switchover's steps have fault points.
pub(crate) fn before_claim(backup: &Backup, timeline: &mut Timeline) {
    if backup.switching_over() {
        fault::point("migrate::dest-claim");
        timeline.swap_started_us = unix_us();
    }
}

/// After a swap of the record.
pub(crate) fn after_claim(backup: &Backup, answer: &Result<SwapAnswer, String>, timeline: &mut Timeline) {
    if backup.switching_over() && matches!(answer, Ok(SwapAnswer::Swapped { .. })) {
        timeline.swapped_us = unix_us();
        log::line(Source::Backup, "switchover: the ownership record is this replica's; waiting for the handover");
        fault::point("migrate::dest-claimed");
    }
}

/// The figures of an arrival by switchover, as the protocol hands the VM to the machine
/// (the driver ends the downtime as the machine first runs: [`Arrival::running`]).
pub(crate) fn arrival(handover: Option<replica::Handover>, timeline: &Timeline) -> Option<Arrival> {
    let handover = handover?;
    let paused = handover.paused_at_unix_us;
    let ms = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1e3;
    let (now, copied) = (unix_us(), timeline.applied_us.max(paused));
    let recorded = timeline.swapped_us.max(copied);
    Some(Arrival {
        downtime_ms: ms(paused, now),
        confirmed: handover.confirmed,
        paused_at_unix_us: paused,
        phases: Some(DowntimePhases {
            final_copy_ms: ms(paused, copied),
            record_ms: ms(copied, recorded),
            handover_ms: ms(recorded, now),
            start_ms: 0.0,
            swap_ms: ms(timeline.swap_started_us, timeline.swapped_us.max(timeline.swap_started_us)),
            sync_ms: timeline.sync_us as f64 / 1e3,
            transfer_ms: ms(paused, timeline.handed_us.max(paused)),
        }),
    })
}

pub(crate) fn log_arrival(epoch: u64, icount: u64, generation: u64, handover: replica::Handover) {
    let how = if handover.confirmed {
        "the source handed it over"
    } else {
        "the source did not confirm in time, so this replica swapped the record once more"
    };
    log::line(
        Source::Backup,
        format_args!(
            "migration: going live at epoch {epoch} (icount {icount}), ownership generation {generation}: {how}"
        ),
    );
}
