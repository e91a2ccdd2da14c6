//! Clock pacing for a busy guest: guest time is counted in instructions, so a guest that
//! computes runs its clock at the interpreter's speed, not the wall clock's. After each
//! run slice the driver reports what it measured, and the pacer answers with inputs
//! (logged like any other, so replay stays exact): a clock-rate change that matches the
//! measured speed (slower still while the guest is ahead), and a forward skip when the
//! guest has fallen behind. An idle guest is paced by the driver's idle skips instead.
//!
//! The bound, while the guest computes: guest time stays within [`BOUND_MS`] of the wall
//! clock. It can run ahead only by what a change of speed within one measuring window
//! ([`WINDOW_BUSY`]) allows, and falls behind by at most [`SKIP_AFTER_TICKS`] before a
//! skip. Pure: no clock, no machine; unit-tested against a model of the machine's clock.

use machine::board::TIMEBASE_HZ;
use machine::machine::MAX_ICOUNT_PER_TICK;
use machine::InputKind;
use std::time::Duration;

/// The documented bound between guest time and the wall clock while the guest computes.
pub const BOUND_MS: u64 = 50;
/// Busy time over which the guest's speed is measured before the rate is set again.
pub const WINDOW_BUSY: Duration = Duration::from_millis(10);
/// A guest this far behind the wall clock is skipped forward (2 ms).
pub const SKIP_AFTER_TICKS: u64 = TIMEBASE_HZ / 500;
/// A guest ahead of the wall clock is slowed so that the wall clock catches up over this
/// much time, at the most by a factor of [`MAX_SLOWDOWN`].
const CATCH_UP: Duration = Duration::from_millis(100);
const MAX_SLOWDOWN: f64 = 16.0;

const _: () = assert!(WINDOW_BUSY.as_millis() as u64 * 3 <= BOUND_MS);
const _: () = assert!(SKIP_AFTER_TICKS * 1000 / TIMEBASE_HZ < BOUND_MS);

/// What the driver measured over one run slice.
#[derive(Debug, Clone, Copy)]
pub struct Slice {
    /// Instructions the slice executed.
    pub instructions: u64,
    /// Wall time the slice took (inside `Machine::run`).
    pub busy: Duration,
    /// Guest time and the wall clock mapped onto guest ticks, after the slice.
    pub guest_ticks: u64,
    pub wall_ticks: u64,
    /// The machine's clock rate now, and the fastest it would take now (the smallest
    /// instructions per tick that keep guest time from going back).
    pub icount_per_tick: u64,
    pub min_icount_per_tick: u64,
}

#[derive(Debug, Default)]
pub struct Pacer {
    window_instructions: u64,
    window_busy: Duration,
}

impl Pacer {
    pub fn new() -> Pacer {
        Pacer::default()
    }

    /// The inputs to push after a slice (none, one or two).
    pub fn after_slice(&mut self, slice: &Slice) -> Vec<InputKind> {
        let mut inputs = Vec::new();
        let behind = slice.wall_ticks.saturating_sub(slice.guest_ticks);
        if behind > SKIP_AFTER_TICKS {
            inputs.push(InputKind::IdleSkip { ticks: behind });
        }
        self.window_instructions += slice.instructions;
        self.window_busy += slice.busy;
        if self.window_busy < WINDOW_BUSY {
            return inputs;
        }
        let speed = self.window_instructions as f64 / self.window_busy.as_secs_f64();
        self.window_instructions = 0;
        self.window_busy = Duration::ZERO;
        let ahead_s = slice.guest_ticks.saturating_sub(slice.wall_ticks) as f64 / TIMEBASE_HZ as f64;
        let pace = ((CATCH_UP.as_secs_f64() - ahead_s) / CATCH_UP.as_secs_f64()).max(1.0 / MAX_SLOWDOWN);
        // Rounded up: a guest clock a little slow is caught up by skips; one a little
        // fast could only be slowed later.
        let wanted = (speed / (TIMEBASE_HZ as f64 * pace)).ceil();
        let wanted = (wanted as u64).clamp(slice.min_icount_per_tick.max(1), MAX_ICOUNT_PER_TICK);
        // Hysteresis: a slower clock at once, a faster one only when the guest lags (or
        // the change is large), so that noise in the measured speed does not log a
        // change every window.
        let now = slice.icount_per_tick;
        let lagging = behind > SKIP_AFTER_TICKS / 2;
        if wanted > now || (wanted < now && lagging) || wanted + 1 < now {
            inputs.push(InputKind::ClockRate { icount_per_tick: wanted });
        }
        inputs
    }
}

/// The most a driver catches a guest up at its start: the guest's real-time clock may lag
/// the host's by the time a machine takes to build (a fresh boot) or by a failover's
/// detection time (a backup taking over from a checkpoint). A larger lag (an old
/// snapshot restored, or a guest that set its own clock) is left alone: no sudden jump.
pub const MAX_START_CATCH_UP: Duration = Duration::from_secs(2);

/// Guest ticks by which guest time is behind the host's wall clock at a driver's start,
/// judged by the guest's RTC (0 when it is ahead or too far behind to catch up).
pub fn start_lag_ticks(host_unix_ns: u64, guest_rtc_unix_ns: u64) -> u64 {
    let lag_ns = host_unix_ns.saturating_sub(guest_rtc_unix_ns);
    if lag_ns > MAX_START_CATCH_UP.as_nanos() as u64 {
        return 0;
    }
    lag_ns / (1_000_000_000 / TIMEBASE_HZ)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The machine's clock: `time = icount / ipt + offset`, a rate change keeping time
    /// where it is and never making the offset negative (as `Machine` applies it).
    struct Clock {
        icount: u64,
        ipt: u64,
        offset: u64,
    }

    impl Clock {
        fn time(&self) -> u64 {
            self.icount / self.ipt + self.offset
        }
        fn min_ipt(&self) -> u64 {
            self.icount / (self.time() + 1) + 1
        }
        fn apply(&mut self, input: &InputKind) {
            match *input {
                InputKind::IdleSkip { ticks } => self.offset += ticks,
                InputKind::ClockRate { icount_per_tick } => {
                    let now = self.time();
                    let ipt = icount_per_tick.max(if self.icount / icount_per_tick > now { self.min_ipt() } else { 1 });
                    self.ipt = ipt;
                    self.offset = now - self.icount / ipt;
                }
                _ => unreachable!("the pacer only paces"),
            }
        }
    }

    struct Run {
        worst_ahead_ms: f64,
        worst_behind_ms: f64,
        inputs: usize,
    }

    /// A guest that computes for `seconds` of wall time in slices of `slice` instructions
    /// at the given speed (instructions per second of wall time, as a function of time).
    fn busy_guest(seconds: f64, slice: u64, speed: impl Fn(f64) -> f64) -> Run {
        let mut clock = Clock { icount: 0, ipt: 10, offset: 0 };
        let mut pacer = Pacer::new();
        let mut wall_s = 0.0;
        let mut run = Run { worst_ahead_ms: 0.0, worst_behind_ms: 0.0, inputs: 0 };
        while wall_s < seconds {
            let busy = slice as f64 / speed(wall_s);
            clock.icount += slice;
            wall_s += busy;
            let wall_ticks = (wall_s * TIMEBASE_HZ as f64) as u64;
            let error_ms = (clock.time() as f64 - wall_ticks as f64) / 1e4;
            run.worst_ahead_ms = run.worst_ahead_ms.max(error_ms);
            run.worst_behind_ms = run.worst_behind_ms.max(-error_ms);
            let report = Slice {
                instructions: slice,
                busy: Duration::from_secs_f64(busy),
                guest_ticks: clock.time(),
                wall_ticks,
                icount_per_tick: clock.ipt,
                min_icount_per_tick: clock.min_ipt(),
            };
            for input in pacer.after_slice(&report) {
                clock.apply(&input);
                run.inputs += 1;
            }
        }
        run
    }

    fn assert_within_bound(run: &Run) {
        let bound = BOUND_MS as f64;
        assert!(run.worst_ahead_ms <= bound, "guest ahead by {:.1} ms", run.worst_ahead_ms);
        assert!(run.worst_behind_ms <= bound, "guest behind by {:.1} ms", run.worst_behind_ms);
    }

    #[test]
    fn a_guest_at_four_times_the_nominal_speed_keeps_pace() {
        let run = busy_guest(20.0, 2_000_000, |_| 390e6);
        assert_within_bound(&run);
        assert!(run.inputs < 20 * 30, "{} inputs in 20 s", run.inputs);
    }

    #[test]
    fn sudden_changes_of_speed_stay_within_the_bound() {
        // A compiler tier kicking in (x2.5), then a loaded host (/4), then back.
        let run = busy_guest(12.0, 2_000_000, |t| match t {
            t if t < 3.0 => 220e6,
            t if t < 6.0 => 550e6,
            t if t < 9.0 => 137e6,
            _ => 300e6,
        });
        assert_within_bound(&run);
    }

    #[test]
    fn short_slices_and_a_noisy_speed_log_few_inputs() {
        // Replication's slices (250 k instructions); the speed wobbles by ±3 %.
        let run = busy_guest(10.0, 250_000, |t| 300e6 * (1.0 + 0.03 * (t * 37.0).sin()));
        assert_within_bound(&run);
        assert!(run.inputs < 10 * 40, "{} inputs in 10 s", run.inputs);
    }

    #[test]
    fn a_guest_slower_than_nominal_is_skipped_forward() {
        let run = busy_guest(5.0, 2_000_000, |_| 40e6);
        assert_within_bound(&run);
    }

    #[test]
    fn a_guest_far_ahead_is_slowed_at_most_sixteenfold_and_never_pushed_back() {
        let mut pacer = Pacer::new();
        let slice = Slice {
            instructions: 4_000_000,
            busy: Duration::from_millis(10),
            guest_ticks: 50_000_000,
            wall_ticks: 10_000_000, // 4 s ahead
            icount_per_tick: 40,
            min_icount_per_tick: 1,
        };
        assert_eq!(pacer.after_slice(&slice), vec![InputKind::ClockRate { icount_per_tick: 640 }]);
    }

    #[test]
    fn a_driver_catches_up_a_short_lag_only() {
        let host = 1_764_000_000_000_000_000;
        assert_eq!(start_lag_ticks(host, host - 30_000_000), 300_000, "30 ms of building the machine");
        assert_eq!(start_lag_ticks(host, host + 5), 0, "a guest ahead is not moved back");
        assert_eq!(start_lag_ticks(host, host - 3_000_000_000), 0, "an old snapshot keeps its time");
    }

    #[test]
    fn a_rate_the_machine_cannot_take_is_not_asked_for() {
        let mut pacer = Pacer::new();
        let slice = Slice {
            instructions: 2_000_000,
            busy: Duration::from_millis(10),
            guest_ticks: 1_000_000,
            wall_ticks: 1_000_000,
            icount_per_tick: 30,
            min_icount_per_tick: 29,
        };
        assert_eq!(pacer.after_slice(&slice), vec![], "20 would be wanted, 29 allowed: within the hysteresis");
    }
}
