//! The cluster: what the user declared ([`spec`]), what the agents observe ([`observed`]),
//! and one round of the control loop ([`round`]) — a pure function from those two to the
//! actions of one host, so that the loop converges from any state it finds itself in, a
//! corrupted agent's included (DESIGN.md §8). [`rules`] maps observed facts to actions from a
//! fixed set; [`keys`] says where each piece lives in the store. The agent in the binary is
//! the edge: it reads the store and its processes, runs a round, and carries the actions out.

pub mod keys;
pub mod observed;
pub mod round;
pub mod rules;
pub mod spec;

pub use observed::{HostReport, HostState, HostView, Observed, ReplicaReport, ReplicaRole};
pub use round::{round, Action, ClaimFrom, StopReason};
pub use spec::{Declared, DeclaredVm, Placement, Protection, SpecError, VmSpec};
