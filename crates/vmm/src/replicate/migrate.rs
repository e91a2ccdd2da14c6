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
use crate::status::Arrival;
use replica::{Backup, SwapAnswer};

/// Before a swap of the record: a switchover's steps have fault points.
pub(crate) fn before_claim(backup: &Backup) {
    if backup.switching_over() {
        fault::point("migrate::dest-claim");
    }
}

/// After a swap of the record.
pub(crate) fn after_claim(backup: &Backup, answer: &Result<SwapAnswer, String>) {
    if backup.switching_over() && matches!(answer, Ok(SwapAnswer::Swapped { .. })) {
        log::line(Source::Backup, "switchover: the ownership record is this replica's; waiting for the handover");
        fault::point("migrate::dest-claimed");
    }
}

/// The figures of an arrival by switchover, as the machine is handed to the live VM.
pub(crate) fn arrival(handover: Option<replica::Handover>) -> Option<Arrival> {
    let handover = handover?;
    let now_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
    Some(Arrival {
        downtime_ms: now_us.saturating_sub(handover.paused_at_unix_us) as f64 / 1e3,
        confirmed: handover.confirmed,
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
