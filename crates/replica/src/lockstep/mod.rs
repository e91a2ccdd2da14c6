//! Lockstep replication's pure core (DESIGN.md §5): the primary and the backup execute the
//! same instruction stream; only the inputs cross the wire.
//!
//! Lockstep rides on the replication protocol ([`crate::Primary`], [`crate::Backup`]): each
//! epoch's opaque payload is a [`Batch`] — the inputs stamped since the last epoch, the icount
//! up to which the backup may now execute, the primary's release mark and now and then a
//! digest. So the handshake, authentication, resend of damaged frames, the kept log resent
//! after a reconnect, acknowledgements, heartbeats and the ownership rule (generation +
//! compare-and-swap) are the checkpoint protocol's, unchanged. What differs:
//!
//! - **A batch is held, not applied:** the backup acknowledges an epoch as soon as it holds
//!   its batch ([`Follower::hold`]); its machine executes behind, never past the last input
//!   held ([`Follower::next`]).
//! - **Output rule:** an output produced at icount X belongs to the epoch cut next, whose
//!   batch carries every input the machine took before X; it leaves when the protocol
//!   releases that epoch ([`Leader::release`]), i.e. once the backup acknowledged it.
//! - **Start:** the first batch of a stream says what the backup's machine starts from
//!   ([`Start::Boot`]: its own images, checked by digest; [`Start::State`]: a full
//!   checkpoint, for a backup joining a running primary or resynchronizing). The protocol
//!   asks for such a batch wherever it would ask for a full checkpoint.
//! - **Divergence:** a digest that differs, a guest that idles or ends where the primary's
//!   did not, or an input the machine refuses stops the follower; it refuses every later
//!   batch ([`Refused`]), which the protocol treats as a failed apply: it reconnects and the
//!   primary sends a [`Start::State`] (the resynchronization).
//! - **Failover:** a backup that wins the ownership record executes the rest of what it
//!   holds, sends again the outputs produced after the primary's last release mark
//!   ([`Follower::take_unreleased`]: some may have left, none is lost), then goes live.

//! # Inputs where the machine stands
//!
//! A primary whose idle waits are cut short runs its idle guest between idle skips stamped
//! at one icount; the follower pushes them back to back. Both give one state because the
//! machine applies an input stamped where it stands as it is pushed (`Machine::push_input`):
//! before that, the two sides' digests differed at such icounts (an idle guest "diverged"
//! after boot, again after every resynchronization).

pub mod batch;
pub mod follower;
pub mod leader;

pub use batch::{is_lockstep, Batch, BatchError, StampedInput, Start};
pub use follower::{Divergence, Follower, FollowerStatus, Next, Refused, RunEnd};
pub use leader::{Leader, LeaderConfig, LeaderTotals};
