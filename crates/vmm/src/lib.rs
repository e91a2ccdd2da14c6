//! ftvm's live-VM runtime (DESIGN.md §3): what runs a VM against the real world, below the
//! binary (which keeps argument parsing, the API server and the wiring) and above the pure
//! cores of `replica` and the board of `machine`.
//!
//! - [`driver`]: runs a machine in slices, paces guest time against the wall clock, stamps
//!   host events as inputs, routes outputs, and applies checkpoint mode's schedule
//!   ([`replica::CheckpointSchedule`]) and output commit.
//! - [`pacer`]: keeps a busy guest's clock within a bound of the wall clock, through
//!   logged inputs.
//! - [`host`]: the host edges — terminal, TAP device, entropy, the MAC announcement.
//! - [`control`]: requests from the control API, answered by the driver between slices.
//! - [`status`]: the status of every role, typed; [`metrics`] renders it for Prometheus.
//! - [`replicate`]: the replication edges — the primary's replication thread, the backup's
//!   waiting loop, and the VM's ownership record in the store.

pub mod control;
pub mod driver;
pub mod host;
pub mod metrics;
pub mod pacer;
pub mod replicate;
pub mod status;
