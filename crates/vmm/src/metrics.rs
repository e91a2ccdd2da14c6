//! Prometheus metrics (text exposition format 0.0.4), rendered from the typed status: what
//! `GET /metrics` answers on the control API and on `--metrics-listen`. Every family is
//! named `ftvm_…`, carries HELP and TYPE lines and the labels `role` and `vm_id`; a family
//! that does not apply to the replica's role is left out rather than reported as zero.

use crate::status::{Mode, Protection, Role, State, Status};
use std::fmt::Write;

/// The Content-Type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

#[derive(Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

/// A sample's value, formatted as the exposition format wants it.
enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Int(v as u64)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Float(v)
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) if v.is_nan() => f.write_str("NaN"),
            Value::Float(v) if v.is_infinite() => f.write_str(if *v > 0.0 { "+Inf" } else { "-Inf" }),
            Value::Float(v) => write!(f, "{v}"),
        }
    }
}

/// The text being written, with the labels every sample carries.
struct Text {
    out: String,
    labels: String,
}

impl Text {
    fn head(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        };
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, extra: Option<(&str, &str)>, value: Value) {
        let _ = match extra {
            Some((label, v)) => writeln!(self.out, "{name}{{{},{label}=\"{}\"}} {value}", self.labels, escape(v)),
            None => writeln!(self.out, "{name}{{{}}} {value}", self.labels),
        };
    }

    fn one(&mut self, name: &str, kind: Kind, help: &str, value: impl Into<Value>) {
        self.head(name, kind, help);
        self.sample(name, None, value.into());
    }

    fn gauge(&mut self, name: &str, help: &str, value: impl Into<Value>) {
        self.one(name, Kind::Gauge, help, value);
    }

    fn counter(&mut self, name: &str, help: &str, value: impl Into<Value>) {
        self.one(name, Kind::Counter, help, value);
    }

    /// A state set: one sample per state, 1 for the current one.
    fn states(&mut self, name: &str, help: &str, label: &str, states: &[&str], current: &str) {
        self.head(name, Kind::Gauge, help);
        for state in states {
            self.sample(name, Some((label, state)), (*state == current).into());
        }
    }
}

/// A label value as the exposition format quotes it.
fn escape(value: &str) -> String {
    value.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n")
}

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1e3
}

/// The metrics of `status`, in the text exposition format.
pub fn render(status: &Status) -> String {
    let role = match status.role {
        Role::Standalone => "standalone",
        Role::Primary => "primary",
        Role::Backup => "backup",
    };
    let labels = match &status.vm_id {
        Some(id) => format!("role=\"{role}\",vm_id=\"{}\"", escape(id)),
        None => format!("role=\"{role}\""),
    };
    let mut t = Text { out: String::new(), labels };
    common(&mut t, status);
    replication(&mut t, status);
    backup(&mut t, status);
    takeover(&mut t, status);
    lockstep(&mut t, status);
    migrations(&mut t, status);
    t.out
}

fn migrations(t: &mut Text, s: &Status) {
    let Some(m) = &s.migrations else { return };
    let under_way = s.migration.as_ref().is_some_and(|m| m.phase.under_way());
    t.gauge("ftvm_migrating", "Whether a live migration out of this replica is under way.", under_way);
    t.counter("ftvm_migrations_started_total", "Live migrations out of this replica started.", m.started);
    let help = "Live migrations out of this replica called off (the VM ran on here).";
    t.counter("ftvm_migrations_called_off_total", help, m.called_off);
    t.counter("ftvm_migrations_arrived_total", "Times the VM arrived at this replica by live migration.", m.arrived);
    t.counter("ftvm_migration_sent_bytes_total", "Bytes sent to migration destinations.", m.bytes_sent);
    if let Some(ms) = m.last_downtime_ms {
        let help = "The last migration's downtime (the guest paused on the source until it ran on the destination).";
        t.gauge("ftvm_migration_last_downtime_seconds", help, ms / 1e3);
    }
}

fn lockstep(t: &mut Text, s: &Status) {
    let Some(l) = &s.lockstep else { return };
    t.counter("ftvm_lockstep_batches_total", "Lockstep epochs (batches of inputs) cut by the primary.", l.batches);
    t.counter("ftvm_lockstep_inputs_total", "Inputs the primary streamed to the backup.", l.inputs);
    t.counter("ftvm_lockstep_input_bytes_total", "Bytes of the inputs streamed.", l.input_bytes);
    t.counter("ftvm_lockstep_states_total", "Whole states sent (a backup joining or resynchronizing).", l.states);
    t.counter("ftvm_lockstep_inputs_held_total", "Inputs the backup holds or has executed.", l.inputs_held);
    t.counter(
        "ftvm_lockstep_digests_checked_total",
        "Digests the backup compared with the primary's.",
        l.digests_checked,
    );
    let help = "Divergences the backup found (each stops lockstep until a state resynchronizes it).";
    t.counter("ftvm_lockstep_divergences_total", help, l.divergences);
    t.counter("ftvm_lockstep_resyncs_total", "Resynchronizations by a whole state after a divergence.", l.resyncs);
    t.gauge("ftvm_lockstep_diverged", "Whether the backup stands diverged, waiting for a state.", l.diverged.is_some());
    if let Some(lag) = l.lag_icount {
        t.gauge("ftvm_lockstep_lag_instructions", "Instructions the backup runs behind what it holds.", lag);
    }
}

fn common(t: &mut Text, s: &Status) {
    let mode = match s.mode {
        Mode::None => "none",
        Mode::Checkpoint => "checkpoint",
        Mode::Lockstep => "lockstep",
    };
    t.head("ftvm_info", Kind::Gauge, "The replica's replication mode (always 1).");
    t.sample("ftvm_info", Some(("mode", mode)), 1.into());
    let state = match s.state {
        State::Running => "running",
        State::Paused => "paused",
        State::Waiting => "waiting",
    };
    let help = "Whether the guest runs, is paused, or waits as a backup (1 for the current state).";
    t.states("ftvm_state", help, "state", &["running", "paused", "waiting"], state);
    t.gauge("ftvm_icount", "Instructions the guest executed (a backup: as of the checkpoint it holds).", s.icount);
    t.gauge("ftvm_guest_time_seconds", "Guest time (a backup: as of the checkpoint it holds).", s.guest_time_s);
    if let Some(n) = s.reboots {
        t.counter("ftvm_reboots_total", "Times the guest rebooted (the VM booted again).", n);
    }
    t.gauge("ftvm_epoch", "The newest epoch: a primary's last checkpoint, a backup's last applied.", s.epoch);
    if let Some(g) = s.generation() {
        t.gauge("ftvm_generation", "The ownership generation this replica acts under.", g);
    }
    if let Some(c) = s.peer_connected() {
        t.gauge("ftvm_peer_connected", "Whether the replica hears its peer (a primary its backup, and back).", c);
    }
    if let Some(d) = s.diverged_checkpoints() {
        let help = "Checkpoints whose digest, checked by the backup after applying, differed from the primary's.";
        t.counter("ftvm_diverged_checkpoints_total", help, d);
    }
}

fn replication(t: &mut Text, s: &Status) {
    let Some(r) = &s.replication else { return };
    t.gauge("ftvm_protected", "Whether the backup holds every output released and streams.", r.protected);
    let protection = match r.protection {
        Protection::Protected => "protected",
        Protection::CatchingUp => "catching_up",
        Protection::Unprotected => "unprotected",
    };
    let help = "The primary's protection (1 for the current one).";
    t.states("ftvm_protection", help, "protection", &["protected", "catching_up", "unprotected"], protection);
    if let Some(a) = r.acked_epoch {
        t.gauge("ftvm_acked_epoch", "The newest epoch the backup acknowledged.", a);
    }
    if let (Some(epochs), Some(ms)) = (r.lag_epochs, r.lag_ms) {
        t.gauge("ftvm_lag_epochs", "Epochs taken and not yet acknowledged by the backup.", epochs);
        t.gauge("ftvm_lag_seconds", "The same lag in time (epochs times the epoch length).", seconds(ms));
    }
    if let Some(e) = r.released_epoch {
        t.gauge("ftvm_released_epoch", "Outputs are released up to this epoch.", e);
    }
    t.gauge("ftvm_held_outputs", "Outputs held for output commit.", r.held_outputs);
    t.gauge(
        "ftvm_replication_log_bytes",
        "Bytes of checkpoints kept for the backup until it acknowledges.",
        r.log_bytes,
    );
    t.counter("ftvm_replication_sent_bytes_total", "Bytes sent to the backup.", r.bytes_sent);
    t.counter("ftvm_unprotected_total", "Times the primary went unprotected.", r.unprotected_count);
    let help = "Checkpoints resumed over a new connection rather than sent again.";
    t.counter("ftvm_resumed_checkpoints_total", help, r.resumed_checkpoints);
    let c = &r.checkpoints;
    t.counter("ftvm_checkpoints_total", "Checkpoints taken for the backup.", c.count);
    let help = "Time the guest was paused for checkpoints.";
    t.counter("ftvm_checkpoint_pause_seconds_total", help, c.pause_total_ms / 1e3);
    t.gauge("ftvm_checkpoint_pause_max_seconds", "The longest pause for a checkpoint.", c.pause_max_ms / 1e3);
    t.counter("ftvm_checkpoint_bytes_total", "Bytes of checkpoints taken.", c.bytes);
    t.counter("ftvm_checkpoint_pages_total", "Pages of guest RAM in checkpoints taken.", c.pages);
    if let Some(last) = &r.last_checkpoint {
        let help = "The pause for the last checkpoint.";
        t.gauge("ftvm_last_checkpoint_pause_seconds", help, last.pause_ms / 1e3);
    }
}

fn backup(t: &mut Text, s: &Status) {
    let Some(b) = &s.backup else { return };
    t.gauge("ftvm_stale", "Whether the backup's state is older than outputs that left (it cannot take over).", b.stale);
    t.gauge("ftvm_newest_generation", "The newest ownership generation the backup heard of.", b.newest_generation);
    t.gauge("ftvm_pending_handshakes", "Connections in their handshake.", b.pending_handshakes);
    let help = "Connections closed before or during their handshake.";
    t.counter("ftvm_refused_connections_total", help, b.refused_connections);
    let help = "Bytes of the checkpoint being received.";
    t.gauge("ftvm_partial_checkpoint_bytes", help, b.partial_checkpoint_bytes);
    t.counter("ftvm_applied_checkpoints_total", "Checkpoints applied to the backup's machine.", b.applied_checkpoints);
    if let Some(ms) = b.silence_ms {
        t.gauge("ftvm_silence_seconds", "Time since the primary was last heard.", seconds(ms));
    }
}

fn takeover(t: &mut Text, s: &Status) {
    let Some(k) = &s.took_over else { return };
    t.gauge("ftvm_takeover_epoch", "The epoch of the checkpoint this replica went live from.", k.epoch);
    t.gauge("ftvm_takeover_generation", "The ownership generation this replica took the VM over with.", k.generation);
    let help = "From the old primary's last authenticated frame to going live.";
    t.gauge("ftvm_takeover_last_frame_to_live_seconds", help, seconds(k.last_frame_to_live_ms));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::tests::{backup, primary};
    use crate::status::Takeover;

    #[test]
    fn a_primary_renders_exactly() {
        assert_eq!(render(&primary()), PRIMARY);
    }

    #[test]
    fn a_backup_renders_exactly() {
        assert_eq!(render(&backup()), BACKUP);
    }

    #[test]
    fn migrations_render_their_counts_bytes_and_last_downtime_only_once_there_were_any() {
        let mut s = primary();
        assert!(!render(&s).contains("migration"), "no migration, no family");
        s.migrations = Some(crate::status::MigrationTotals {
            started: 2,
            called_off: 1,
            arrived: 1,
            bytes_sent: 5_000_000,
            last_downtime_ms: Some(4.5),
        });
        let text = render(&s);
        for line in [
            "ftvm_migrating{role=\"primary\",vm_id=\"vm-demo\"} 0\n",
            "ftvm_migrations_started_total{role=\"primary\",vm_id=\"vm-demo\"} 2\n",
            "ftvm_migrations_called_off_total{role=\"primary\",vm_id=\"vm-demo\"} 1\n",
            "ftvm_migrations_arrived_total{role=\"primary\",vm_id=\"vm-demo\"} 1\n",
            "ftvm_migration_sent_bytes_total{role=\"primary\",vm_id=\"vm-demo\"} 5000000\n",
            "ftvm_migration_last_downtime_seconds{role=\"primary\",vm_id=\"vm-demo\"} 0.0045\n",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn a_takeover_renders_its_own_families_and_standalone_has_no_vm_id() {
        let mut s = primary();
        s.replication = None;
        s.vm_id = None;
        s.took_over = Some(Takeover {
            epoch: 9,
            generation: 4,
            last_frame_to_live_ms: 130,
            diverged_checkpoints: 0,
            migration: None,
        });
        let text = render(&s);
        assert!(text.contains("ftvm_takeover_last_frame_to_live_seconds{role=\"primary\"} 0.13\n"), "{text}");
        assert!(text.contains("ftvm_generation{role=\"primary\"} 4\n"), "{text}");
        assert!(text.contains("ftvm_diverged_checkpoints_total{role=\"primary\"} 0\n"), "{text}");
        assert!(!text.contains("ftvm_protected"), "{text}");
    }

    #[test]
    fn every_family_has_help_and_type_and_every_sample_its_family() {
        for text in [render(&primary()), render(&backup())] {
            let mut declared = Vec::new();
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("# TYPE ") {
                    let (name, kind) = rest.split_once(' ').unwrap();
                    assert!(kind == "gauge" || kind == "counter", "{line}");
                    assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
                    declared.push(name.to_string());
                } else if !line.starts_with("# HELP ") {
                    let name = line.split('{').next().unwrap();
                    assert!(name.starts_with("ftvm_") && declared.last().map(String::as_str) == Some(name), "{line}");
                }
            }
            let help = text.lines().filter(|l| l.starts_with("# HELP ")).count();
            assert_eq!(help, declared.len());
        }
    }

    #[test]
    fn label_values_and_odd_numbers_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), r#"a\"b\\c\nd"#);
        assert_eq!(Value::Float(f64::NAN).to_string(), "NaN");
        assert_eq!(Value::Float(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Value::Float(0.00075).to_string(), "0.00075");
        assert_eq!(Value::Int(u64::MAX).to_string(), "18446744073709551615");
    }

    const PRIMARY: &str = r#"# HELP ftvm_info The replica's replication mode (always 1).
# TYPE ftvm_info gauge
ftvm_info{role="primary",vm_id="vm-demo",mode="checkpoint"} 1
# HELP ftvm_state Whether the guest runs, is paused, or waits as a backup (1 for the current state).
# TYPE ftvm_state gauge
ftvm_state{role="primary",vm_id="vm-demo",state="running"} 1
ftvm_state{role="primary",vm_id="vm-demo",state="paused"} 0
ftvm_state{role="primary",vm_id="vm-demo",state="waiting"} 0
# HELP ftvm_icount Instructions the guest executed (a backup: as of the checkpoint it holds).
# TYPE ftvm_icount gauge
ftvm_icount{role="primary",vm_id="vm-demo"} 123456789
# HELP ftvm_guest_time_seconds Guest time (a backup: as of the checkpoint it holds).
# TYPE ftvm_guest_time_seconds gauge
ftvm_guest_time_seconds{role="primary",vm_id="vm-demo"} 12.5
# HELP ftvm_reboots_total Times the guest rebooted (the VM booted again).
# TYPE ftvm_reboots_total counter
ftvm_reboots_total{role="primary",vm_id="vm-demo"} 1
# HELP ftvm_epoch The newest epoch: a primary's last checkpoint, a backup's last applied.
# TYPE ftvm_epoch gauge
ftvm_epoch{role="primary",vm_id="vm-demo"} 40
# HELP ftvm_generation The ownership generation this replica acts under.
# TYPE ftvm_generation gauge
ftvm_generation{role="primary",vm_id="vm-demo"} 3
# HELP ftvm_peer_connected Whether the replica hears its peer (a primary its backup, and back).
# TYPE ftvm_peer_connected gauge
ftvm_peer_connected{role="primary",vm_id="vm-demo"} 1
# HELP ftvm_protected Whether the backup holds every output released and streams.
# TYPE ftvm_protected gauge
ftvm_protected{role="primary",vm_id="vm-demo"} 1
# HELP ftvm_protection The primary's protection (1 for the current one).
# TYPE ftvm_protection gauge
ftvm_protection{role="primary",vm_id="vm-demo",protection="protected"} 1
ftvm_protection{role="primary",vm_id="vm-demo",protection="catching_up"} 0
ftvm_protection{role="primary",vm_id="vm-demo",protection="unprotected"} 0
# HELP ftvm_acked_epoch The newest epoch the backup acknowledged.
# TYPE ftvm_acked_epoch gauge
ftvm_acked_epoch{role="primary",vm_id="vm-demo"} 38
# HELP ftvm_lag_epochs Epochs taken and not yet acknowledged by the backup.
# TYPE ftvm_lag_epochs gauge
ftvm_lag_epochs{role="primary",vm_id="vm-demo"} 2
# HELP ftvm_lag_seconds The same lag in time (epochs times the epoch length).
# TYPE ftvm_lag_seconds gauge
ftvm_lag_seconds{role="primary",vm_id="vm-demo"} 0.05
# HELP ftvm_released_epoch Outputs are released up to this epoch.
# TYPE ftvm_released_epoch gauge
ftvm_released_epoch{role="primary",vm_id="vm-demo"} 38
# HELP ftvm_held_outputs Outputs held for output commit.
# TYPE ftvm_held_outputs gauge
ftvm_held_outputs{role="primary",vm_id="vm-demo"} 5
# HELP ftvm_replication_log_bytes Bytes of checkpoints kept for the backup until it acknowledges.
# TYPE ftvm_replication_log_bytes gauge
ftvm_replication_log_bytes{role="primary",vm_id="vm-demo"} 4096
# HELP ftvm_replication_sent_bytes_total Bytes sent to the backup.
# TYPE ftvm_replication_sent_bytes_total counter
ftvm_replication_sent_bytes_total{role="primary",vm_id="vm-demo"} 1000000
# HELP ftvm_unprotected_total Times the primary went unprotected.
# TYPE ftvm_unprotected_total counter
ftvm_unprotected_total{role="primary",vm_id="vm-demo"} 1
# HELP ftvm_resumed_checkpoints_total Checkpoints resumed over a new connection rather than sent again.
# TYPE ftvm_resumed_checkpoints_total counter
ftvm_resumed_checkpoints_total{role="primary",vm_id="vm-demo"} 2
# HELP ftvm_checkpoints_total Checkpoints taken for the backup.
# TYPE ftvm_checkpoints_total counter
ftvm_checkpoints_total{role="primary",vm_id="vm-demo"} 40
# HELP ftvm_checkpoint_pause_seconds_total Time the guest was paused for checkpoints.
# TYPE ftvm_checkpoint_pause_seconds_total counter
ftvm_checkpoint_pause_seconds_total{role="primary",vm_id="vm-demo"} 0.03
# HELP ftvm_checkpoint_pause_max_seconds The longest pause for a checkpoint.
# TYPE ftvm_checkpoint_pause_max_seconds gauge
ftvm_checkpoint_pause_max_seconds{role="primary",vm_id="vm-demo"} 0.0125
# HELP ftvm_checkpoint_bytes_total Bytes of checkpoints taken.
# TYPE ftvm_checkpoint_bytes_total counter
ftvm_checkpoint_bytes_total{role="primary",vm_id="vm-demo"} 900000
# HELP ftvm_checkpoint_pages_total Pages of guest RAM in checkpoints taken.
# TYPE ftvm_checkpoint_pages_total counter
ftvm_checkpoint_pages_total{role="primary",vm_id="vm-demo"} 200
# HELP ftvm_last_checkpoint_pause_seconds The pause for the last checkpoint.
# TYPE ftvm_last_checkpoint_pause_seconds gauge
ftvm_last_checkpoint_pause_seconds{role="primary",vm_id="vm-demo"} 0.00075
"#;

    const BACKUP: &str = r#"# HELP ftvm_info The replica's replication mode (always 1).
# TYPE ftvm_info gauge
ftvm_info{role="backup",vm_id="vm-demo",mode="checkpoint"} 1
# HELP ftvm_state Whether the guest runs, is paused, or waits as a backup (1 for the current state).
# TYPE ftvm_state gauge
ftvm_state{role="backup",vm_id="vm-demo",state="running"} 0
ftvm_state{role="backup",vm_id="vm-demo",state="paused"} 0
ftvm_state{role="backup",vm_id="vm-demo",state="waiting"} 1
# HELP ftvm_icount Instructions the guest executed (a backup: as of the checkpoint it holds).
# TYPE ftvm_icount gauge
ftvm_icount{role="backup",vm_id="vm-demo"} 1000
# HELP ftvm_guest_time_seconds Guest time (a backup: as of the checkpoint it holds).
# TYPE ftvm_guest_time_seconds gauge
ftvm_guest_time_seconds{role="backup",vm_id="vm-demo"} 0.25
# HELP ftvm_epoch The newest epoch: a primary's last checkpoint, a backup's last applied.
# TYPE ftvm_epoch gauge
ftvm_epoch{role="backup",vm_id="vm-demo"} 7
# HELP ftvm_generation The ownership generation this replica acts under.
# TYPE ftvm_generation gauge
ftvm_generation{role="backup",vm_id="vm-demo"} 2
# HELP ftvm_peer_connected Whether the replica hears its peer (a primary its backup, and back).
# TYPE ftvm_peer_connected gauge
ftvm_peer_connected{role="backup",vm_id="vm-demo"} 1
# HELP ftvm_diverged_checkpoints_total Checkpoints whose digest, checked by the backup after applying, differed from the primary's.
# TYPE ftvm_diverged_checkpoints_total counter
ftvm_diverged_checkpoints_total{role="backup",vm_id="vm-demo"} 1
# HELP ftvm_stale Whether the backup's state is older than outputs that left (it cannot take over).
# TYPE ftvm_stale gauge
ftvm_stale{role="backup",vm_id="vm-demo"} 0
# HELP ftvm_newest_generation The newest ownership generation the backup heard of.
# TYPE ftvm_newest_generation gauge
ftvm_newest_generation{role="backup",vm_id="vm-demo"} 2
# HELP ftvm_pending_handshakes Connections in their handshake.
# TYPE ftvm_pending_handshakes gauge
ftvm_pending_handshakes{role="backup",vm_id="vm-demo"} 1
# HELP ftvm_refused_connections_total Connections closed before or during their handshake.
# TYPE ftvm_refused_connections_total counter
ftvm_refused_connections_total{role="backup",vm_id="vm-demo"} 9
# HELP ftvm_partial_checkpoint_bytes Bytes of the checkpoint being received.
# TYPE ftvm_partial_checkpoint_bytes gauge
ftvm_partial_checkpoint_bytes{role="backup",vm_id="vm-demo"} 0
# HELP ftvm_applied_checkpoints_total Checkpoints applied to the backup's machine.
# TYPE ftvm_applied_checkpoints_total counter
ftvm_applied_checkpoints_total{role="backup",vm_id="vm-demo"} 7
# HELP ftvm_silence_seconds Time since the primary was last heard.
# TYPE ftvm_silence_seconds gauge
ftvm_silence_seconds{role="backup",vm_id="vm-demo"} 0.004
"#;
}
