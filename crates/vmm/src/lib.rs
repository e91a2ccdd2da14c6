//! ftvm's live-VM runtime (DESIGN.md §3): what runs a VM against the real world, below the
//! binary (which keeps argument parsing, the API server and the wiring) and above the pure
//! cores of `replica` and the board of `machine`.
//!
//! - [`vm`]: the machine's contract (DESIGN.md §6) as the [`vm::Vm`] trait, implemented
//!   for `machine::Machine`.
//! - [`driver`]: runs a [`vm::Vm`] in slices, paces guest time against the wall clock,
//!   stamps host events as inputs and routes outputs, through the replication mode.
//! - [`mode`]: the replication-mode seam — the [`mode::Mode`] trait (standalone, checkpoint
//!   primary applying [`replica::CheckpointSchedule`], checkpoint backup, whose takeover is
//!   a change of mode in the same driver) and the [`mode::Observer`] trait.
//! - [`record`]: `--record`: an [`mode::Observer`] streaming the input log (crates/journal).
//! - [`log`]: the one way the runtime writes a line for the operator.
//! - [`pacer`]: keeps a busy guest's clock within a bound of the wall clock, through
//!   logged inputs.
//! - [`host`]: the host edges — terminal, TAP device, entropy, the MAC announcement.
//! - [`control`]: requests from the control API, answered by the driver between slices.
//! - [`status`]: the status of every role, typed; [`metrics`] renders it for Prometheus.
//! - [`keeper`]: the keeper that lets a VM outlive its monitor process (`--resilient`).
//! - [`replicate`]: the replication edges — the primary's replication thread, the backup's
//!   protocol thread, and the VM's ownership record in the store.

pub mod control;
pub mod driver;
pub mod host;
pub mod keeper;
pub mod log;
pub mod metrics;
pub mod mode;
pub mod pacer;
pub mod record;
pub mod replicate;
pub mod status;
pub mod vm;
