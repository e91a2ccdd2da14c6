//! The status of a VM in every role — standalone, primary, backup — as one typed struct:
//! what `GET /status` answers (as JSON), what clients and tests parse back, and what the
//! Prometheus metrics ([`crate::metrics`]) are rendered from. Verdicts read these fields,
//! never log wording (STYLE.md: verdicts are typed).
//!
//! The JSON keeps one shape for all roles: the common fields at the top, a primary's
//! replication under `replication`, a backup's fields at the top level beside the common
//! ones, and a takeover under `took_over`.

use serde::{Deserialize, Serialize};

/// Which part the replica plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs the VM with no replica (or no store at all).
    Standalone,
    /// Runs the VM and replicates it (or took it over from its primary).
    Primary,
    /// Holds the primary's last checkpoint and takes over when the primary falls silent.
    Backup,
}

/// Whether the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    /// Paused through the control API.
    Paused,
    /// A backup: it holds a checkpoint and does not run until it takes over.
    Waiting,
}

/// The replication mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    None,
    Checkpoint,
    Lockstep,
}

/// A primary's protection (replica's [`replica::Protection`], without its details).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protection {
    /// Outputs leave on the backup's acknowledgements; the backup may take over.
    Protected,
    /// Outputs are held until a backup catches up with what was released early.
    CatchingUp,
    /// Outputs leave without acknowledgement; no backup may take over.
    Unprotected,
}

impl From<&replica::Protection> for Protection {
    fn from(p: &replica::Protection) -> Protection {
        match p {
            replica::Protection::Protected => Protection::Protected,
            replica::Protection::CatchingUp { .. } => Protection::CatchingUp,
            replica::Protection::Unprotected => Protection::Unprotected,
        }
    }
}

/// What `GET /status` answers, for every role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub state: State,
    pub role: Role,
    pub mode: Mode,
    /// The VM's name in the ownership store (None: the VM holds no record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    /// Instructions executed (a backup: as of the checkpoint it holds).
    pub icount: u64,
    /// Guest time in seconds (a backup: as of the checkpoint it holds).
    pub guest_time_s: f64,
    /// Times the running guest rebooted (None: a backup, which runs no guest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboots: Option<u64>,
    /// The newest epoch: a primary's last checkpoint taken, a backup's last applied (0: none).
    pub epoch: u64,
    /// A primary's replication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<Replication>,
    /// A backup's side (its fields sit at the top level of the JSON).
    #[serde(flatten)]
    pub backup: Option<BackupSide>,
    /// A primary that took the VM over from another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub took_over: Option<Takeover>,
    /// Lockstep's own figures, on either side (None: not in lockstep).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lockstep: Option<Lockstep>,
    /// A live migration out of this replica (`ftvm ctl migrate`), under way or over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
    /// Every live migration out of and into this replica over its life (None: none yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrations: Option<MigrationTotals>,
}

/// A replica's live migrations over its life (`status.migrations`, and `/metrics`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationTotals {
    /// Migrations out of this replica started (`ctl migrate`), the one under way included.
    pub started: u64,
    /// Of those, called off (the VM ran on here).
    pub called_off: u64,
    /// Times the VM arrived here by a migration (0 or 1: a replica arrives once).
    pub arrived: u64,
    /// Bytes sent to destinations, the migration under way included.
    pub bytes_sent: u64,
    /// The downtime of the last migration: the arrival here (pause on the source to running
    /// here), or a switchover out of here called off (the guest's pause here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_downtime_ms: Option<f64>,
}

/// Lockstep replication, as either side sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Lockstep {
    /// A primary: batches (epochs) cut, inputs streamed and their bytes, digests sent, states
    /// sent (a backup that joined or resynchronized).
    pub batches: u64,
    /// Bytes of the batches (their payloads, framing aside).
    pub batch_bytes: u64,
    pub inputs: u64,
    pub input_bytes: u64,
    pub digests: u64,
    pub states: u64,
    /// Outputs that left (the release mark).
    pub released_outputs: u64,
    /// A primary, bounded lag: batches the backup has not acknowledged yet (it acknowledges
    /// only what its machine has nearly executed); the guest pauses at 48, or once it ran 40 M
    /// instructions past the oldest: how often it paused, and for how long in all.
    #[serde(default)]
    pub unreleased_batches: Option<u64>,
    #[serde(default)]
    pub throttles: u64,
    #[serde(default)]
    pub throttled_ms: f64,
    /// A backup: inputs held and pushed into its machine, digests checked, divergences found
    /// and resynchronizations done, outputs kept after the release mark.
    pub inputs_held: u64,
    pub inputs_pushed: u64,
    pub digests_checked: u64,
    pub divergences: u64,
    pub resyncs: u64,
    pub kept_outputs: u64,
    /// A backup: how many instructions its machine runs behind what it holds.
    pub lag_icount: Option<u64>,
    /// A backup: the divergence it stopped at, waiting for a state (None: in step).
    pub diverged: Option<String>,
}

/// Where a live migration out of this replica stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Pre-copy: the destination receives checkpoints (a full one, then each epoch's dirty
    /// pages and sectors) while the guest runs.
    Precopy,
    /// Stop-and-copy and switchover: the guest is paused, its final checkpoint sent, the
    /// destination takes the ownership record.
    Switchover,
    /// The destination owns the VM; this replica stops.
    HandedOver,
    /// Called off: the VM runs on here.
    CalledOff,
}

impl MigrationPhase {
    /// Not settled yet: the pre-copy or the switchover.
    pub fn under_way(self) -> bool {
        matches!(self, MigrationPhase::Precopy | MigrationPhase::Switchover)
    }
}

/// A live migration's figures, as the source sees them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Migration {
    pub phase: MigrationPhase,
    /// The destination's address.
    pub to: String,
    /// From `migrate` to now, or to the handover.
    pub total_ms: f64,
    /// Bytes written to the destination.
    pub bytes_sent: u64,
    /// Checkpoints sent: the full one, the pre-copy rounds, the final one.
    pub checkpoints: u64,
    /// From the guest's pause to the destination's `SwitchedOver` answered (this replica's
    /// view of the downtime: the destination runs one message later; its own figure is its
    /// `took_over.migration.downtime_ms`).
    pub paused_ms: Option<f64>,
    /// The final checkpoint's epoch.
    pub final_epoch: Option<u64>,
    /// The final checkpoint's size (what the stop-and-copy copied) and its dirty pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_pages: Option<u64>,
    /// Why it was called off.
    pub error: Option<String>,
}

/// A VM that arrived by live migration, as the destination saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Arrival {
    /// From the guest's pause on the source to it running here, on the two hosts' clocks
    /// (exact on one host; across hosts, off by the offset between their clocks).
    pub downtime_ms: f64,
    /// The source confirmed the handover (false: this replica swapped the record once more
    /// without its word, after the handover timeout or a broken link).
    pub confirmed: bool,
    /// When the source paused the guest, on its clock (µs since the Unix epoch).
    #[serde(default)]
    pub paused_at_unix_us: u64,
    /// Where the downtime went (absent from an ftvm that did not break it down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phases: Option<DowntimePhases>,
}

/// A migration's downtime, step by step on the path that decides it: the first four add up
/// to `downtime_ms`; the last two are parts of them, measured on their own.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DowntimePhases {
    /// From the pause on the source to the final checkpoint applied here (taking it, sending
    /// it, applying it).
    pub final_copy_ms: f64,
    /// From then to the ownership record swapped (the part of the swap the copy did not hide).
    pub record_ms: f64,
    /// From then to the source's `HandedOver` (`SwitchedOver` out, `HandedOver` back).
    pub handover_ms: f64,
    /// From then to the guest running here (the go-live: TAP reader, MAC announcer, the first
    /// slice's start).
    pub start_ms: f64,
    /// The record's compare-and-swap itself (started as the `Switchover` arrived, beside the
    /// final checkpoint's apply).
    pub swap_ms: f64,
    /// Making the swap durable (the file store's directory fsync), while `SwitchedOver` and
    /// `HandedOver` travel.
    pub sync_ms: f64,
    /// Of the final copy, the part until the final checkpoint was whole here (taken, framed,
    /// sent, received); the rest is its apply on the machine's thread.
    #[serde(default)]
    pub transfer_ms: f64,
}

impl Arrival {
    /// The machine runs here now: the downtime ends.
    pub fn running(&mut self, now_unix_us: u64) {
        self.downtime_ms = now_unix_us.saturating_sub(self.paused_at_unix_us) as f64 / 1e3;
        if let Some(p) = &mut self.phases {
            p.start_ms = (self.downtime_ms - p.final_copy_ms - p.record_ms - p.handover_ms).max(0.0);
        }
    }
}

impl Status {
    /// The ownership generation this replica acts under: a primary's current one (or the
    /// one it took over with), a backup's state's.
    pub fn generation(&self) -> Option<u64> {
        match (&self.replication, &self.took_over, &self.backup) {
            (Some(r), _, _) => Some(r.generation),
            (None, Some(t), _) => Some(t.generation),
            (None, None, Some(b)) => b.state_generation,
            (None, None, None) => None,
        }
    }

    /// Whether the replica hears its peer: a primary its backup, a backup its primary.
    pub fn peer_connected(&self) -> Option<bool> {
        match (&self.replication, &self.backup) {
            (Some(r), _) => Some(r.backup_connected),
            (None, Some(b)) => Some(b.primary_connected),
            (None, None) => None,
        }
    }

    /// Checkpoints whose digest check failed on this replica while it was a backup.
    pub fn diverged_checkpoints(&self) -> Option<u64> {
        match (&self.backup, &self.took_over) {
            (Some(b), _) => Some(b.diverged_checkpoints),
            (None, Some(t)) => Some(t.diverged_checkpoints),
            (None, None) => None,
        }
    }
}

/// A primary's side of checkpoint replication.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replication {
    /// The backup holds a checkpoint covering every output released, and is streaming.
    pub protected: bool,
    pub protection: Protection,
    /// The ownership generation the primary holds.
    pub generation: u64,
    pub backup_connected: bool,
    /// The newest epoch the backup acknowledged (this run).
    pub acked_epoch: Option<u64>,
    /// Epochs taken and not yet acknowledged.
    pub lag_epochs: Option<u64>,
    /// The same, in milliseconds of epochs.
    pub lag_ms: Option<u64>,
    /// Outputs are released up to this epoch.
    pub released_epoch: Option<u64>,
    /// Times the primary went unprotected.
    pub unprotected_count: u64,
    /// Checkpoints resumed over a new connection rather than sent again.
    pub resumed_checkpoints: u64,
    /// Bytes of checkpoints kept for a backup that has not acknowledged them.
    pub log_bytes: u64,
    pub bytes_sent: u64,
    /// Outputs held for output commit.
    pub held_outputs: u64,
    pub last_error: Option<String>,
    pub last_checkpoint: Option<LastCheckpoint>,
    pub checkpoints: CheckpointTotals,
}

/// What the last checkpoint cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastCheckpoint {
    pub epoch: u64,
    pub full: bool,
    pub pause_ms: f64,
    pub bytes: u64,
    pub pages: u64,
}

/// Checkpoints since replication started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointTotals {
    pub count: u64,
    /// The guest's pauses for checkpoints, added up.
    pub pause_total_ms: f64,
    pub pause_avg_ms: f64,
    pub pause_max_ms: f64,
    pub bytes: u64,
    pub pages: u64,
    pub bytes_per_s: f64,
}

/// A backup's side: what it holds and hears.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupSide {
    pub primary_connected: bool,
    pub applied_epoch: Option<u64>,
    /// The generation the applied state counts for (it may take over by swapping it).
    pub state_generation: Option<u64>,
    /// The newest generation heard of.
    pub newest_generation: u64,
    /// The state is older than outputs that left: this backup cannot take over.
    pub stale: bool,
    pub pending_handshakes: u64,
    /// Connections closed before or during their handshake (strangers, timeouts).
    pub refused_connections: u64,
    /// Bytes of the checkpoint being received.
    pub partial_checkpoint_bytes: u64,
    /// Checkpoints applied to the machine.
    pub applied_checkpoints: u64,
    /// Checkpoints whose digest, checked after applying, differed from the primary's.
    pub diverged_checkpoints: u64,
    /// Milliseconds since the primary was last heard (None: never).
    pub silence_ms: Option<u64>,
}

/// How this replica took the VM over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Takeover {
    /// The epoch of the checkpoint it went live from.
    pub epoch: u64,
    /// The ownership generation it swapped the record to.
    pub generation: u64,
    /// From the last authenticated frame of the old primary to going live.
    pub last_frame_to_live_ms: u64,
    /// Checkpoints whose digest check failed while it was a backup.
    pub diverged_checkpoints: u64,
    /// It went live by a planned switchover (live migration), not a failover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Arrival>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn primary() -> Status {
        Status {
            state: State::Running,
            role: Role::Primary,
            mode: Mode::Checkpoint,
            vm_id: Some("vm-demo".into()),
            icount: 123_456_789,
            guest_time_s: 12.5,
            reboots: Some(1),
            epoch: 40,
            replication: Some(Replication {
                protected: true,
                protection: Protection::Protected,
                generation: 3,
                backup_connected: true,
                acked_epoch: Some(38),
                lag_epochs: Some(2),
                lag_ms: Some(50),
                released_epoch: Some(38),
                unprotected_count: 1,
                resumed_checkpoints: 2,
                log_bytes: 4096,
                bytes_sent: 1_000_000,
                held_outputs: 5,
                last_error: None,
                last_checkpoint: Some(LastCheckpoint { epoch: 40, full: false, pause_ms: 0.75, bytes: 8192, pages: 2 }),
                checkpoints: CheckpointTotals {
                    count: 40,
                    pause_total_ms: 30.0,
                    pause_avg_ms: 0.75,
                    pause_max_ms: 12.5,
                    bytes: 900_000,
                    pages: 200,
                    bytes_per_s: 90_000.0,
                },
            }),
            backup: None,
            took_over: None,
            lockstep: None,
            migration: None,
            migrations: None,
        }
    }

    pub(crate) fn backup() -> Status {
        Status {
            state: State::Waiting,
            role: Role::Backup,
            mode: Mode::Checkpoint,
            vm_id: Some("vm-demo".into()),
            icount: 1000,
            guest_time_s: 0.25,
            reboots: None,
            epoch: 7,
            replication: None,
            backup: Some(BackupSide {
                primary_connected: true,
                applied_epoch: Some(7),
                state_generation: Some(2),
                newest_generation: 2,
                stale: false,
                pending_handshakes: 1,
                refused_connections: 9,
                partial_checkpoint_bytes: 0,
                applied_checkpoints: 7,
                diverged_checkpoints: 1,
                silence_ms: Some(4),
            }),
            took_over: None,
            lockstep: None,
            migration: None,
            migrations: None,
        }
    }

    fn round_trip(status: &Status) -> Status {
        serde_json::from_value(serde_json::to_value(status).unwrap()).unwrap()
    }

    #[test]
    fn every_role_parses_back_as_it_was_served() {
        let mut took_over = primary();
        took_over.replication = None;
        took_over.took_over = Some(Takeover {
            epoch: 9,
            generation: 4,
            last_frame_to_live_ms: 130,
            diverged_checkpoints: 0,
            migration: None,
        });
        let standalone = Status { role: Role::Standalone, mode: Mode::None, vm_id: None, ..took_over.clone() };
        for status in [primary(), backup(), took_over, standalone] {
            assert_eq!(round_trip(&status), status);
        }
    }

    #[test]
    fn the_json_keeps_the_field_names_clients_read() {
        let p = serde_json::to_value(primary()).unwrap();
        assert_eq!((&p["role"], &p["state"], &p["mode"]), (&"primary".into(), &"running".into(), &"checkpoint".into()));
        assert_eq!(p["replication"]["protected"], true);
        assert_eq!(p["replication"]["protection"], "protected");
        assert_eq!(p["replication"]["acked_epoch"], 38);
        assert_eq!(p["replication"]["checkpoints"]["pause_avg_ms"], 0.75);
        assert!(p.get("stale").is_none() && p.get("took_over").is_none(), "{p}");
        let b = serde_json::to_value(backup()).unwrap();
        assert_eq!((&b["role"], &b["state"]), (&"backup".into(), &"waiting".into()));
        assert_eq!(
            (&b["stale"], &b["primary_connected"], &b["pending_handshakes"]),
            (&false.into(), &true.into(), &1.into())
        );
        assert_eq!(b["diverged_checkpoints"], 1);
        assert!(b.get("replication").is_none(), "{b}");
    }

    #[test]
    fn a_status_without_the_backup_fields_is_no_backup() {
        let mut json = serde_json::to_value(backup()).unwrap();
        json.as_object_mut().unwrap().remove("stale");
        let parsed: Status = serde_json::from_value(json).unwrap();
        assert_eq!(parsed.backup, None);
    }

    #[test]
    fn derived_fields_follow_the_role() {
        assert_eq!(
            (primary().generation(), primary().peer_connected(), primary().diverged_checkpoints()),
            (Some(3), Some(true), None)
        );
        assert_eq!(
            (backup().generation(), backup().peer_connected(), backup().diverged_checkpoints()),
            (Some(2), Some(true), Some(1))
        );
    }
}
