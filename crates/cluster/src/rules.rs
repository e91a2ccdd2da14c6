//! User rules: conditions over observed facts, actions from a fixed set. One rule per line:
//!
//! ```text
//! # comment
//! rule NAME: when FACT OP VALUE [and FACT OP VALUE]... then ACTION [ARGUMENT]
//! ```
//!
//! Facts of a host (a rule with only host facts is checked for every host):
//! `host.missed_heartbeats`, `host.replicas`, `host.memory_mib_free` (numbers),
//! `host.label.KEY` (a string). Facts of a replica (checked for every replica):
//! `replica.lag_epochs`, `replica.failovers` (numbers), `replica.role` (primary|backup|starting),
//! and the facts of its host. OP is one of `< <= > >= == !=` (strings: `==` and `!=`).
//! Actions: `drain_host`, `quarantine_host`, `reprotect_elsewhere` (move the VM's backup to
//! another eligible host, neither the primary's nor its own), `webhook URL` (POST the decision as JSON to an
//! `http://` URL). `migrate` and `rejuvenate_monitor` are refused on load until live migration
//! and microreboot land.
//!
//! A file is checked whole on load; a bad one is refused with the line and the problem, and the
//! agent keeps its last good rules. Safety is out of the rules' reach: no action starts a
//! primary or makes a backup live, so no rule can make two live copies.

use std::fmt;

use crate::observed::{HostView, Observed, ReplicaReport, ReplicaRole};
use crate::spec::Declared;

/// At most this many rules in a file, and this long a line.
pub const MAX_RULES: usize = 256;
pub const MAX_LINE_BYTES: usize = 1024;

/// The rules used without a rules file.
pub const DEFAULT_RULES: &str = "\
# ftvm's default rules (see docs/rules-*.rules for more).
# A host silent for a minute is quarantined: when it comes back it gets no new replicas until
# someone clears /ftvm/hostctl/HOST.
rule quarantine-lost-host: when host.missed_heartbeats >= 60 then quarantine_host
# A backup that falls far behind its primary is replaced by one elsewhere.
rule replace-lagging-backup: when replica.role == primary and replica.lag_epochs >= 400 then reprotect_elsewhere
";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleAction {
    DrainHost,
    QuarantineHost,
    ReprotectElsewhere,
    Webhook(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Number(u64),
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Condition {
    fact: String,
    op: Op,
    value: Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    conditions: Vec<Condition>,
    pub action: RuleAction,
    /// Whether it is checked per replica (else per host).
    per_replica: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
}

/// What a rule decided this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub rule: String,
    /// The same decision about the same subject has the same identity (one event, one action).
    pub identity: String,
    pub host: String,
    pub vm: Option<String>,
    pub action: RuleAction,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct RuleError {
    pub line: usize,
    pub problem: String,
}

const NUMBER_FACTS: &[&str] =
    &["host.missed_heartbeats", "host.replicas", "host.memory_mib_free", "replica.lag_epochs", "replica.failovers"];

impl RuleSet {
    /// Parses and checks a whole file.
    pub fn parse(text: &str) -> Result<RuleSet, RuleError> {
        let mut rules: Vec<Rule> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let error = |problem: String| RuleError { line: number, problem };
            if line.len() > MAX_LINE_BYTES {
                return Err(error(format!("longer than {MAX_LINE_BYTES} bytes")));
            }
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let rule = parse_rule(line).map_err(error)?;
            if rules.iter().any(|r| r.name == rule.name) {
                return Err(error(format!("a second rule named {:?}", rule.name)));
            }
            if rules.len() == MAX_RULES {
                return Err(error(format!("more than {MAX_RULES} rules")));
            }
            rules.push(rule);
        }
        Ok(RuleSet { rules })
    }

    pub fn default_rules() -> RuleSet {
        RuleSet::parse(DEFAULT_RULES).expect("the default rules parse")
    }

    /// The decisions of this round, taken by one host only (the first alive one by name),
    /// so that a rule acts once however many agents run.
    pub fn evaluate(&self, me: &str, _declared: &Declared, observed: &Observed) -> Vec<Decision> {
        let janitor = observed.hosts.iter().find(|(_, view)| view.alive()).map(|(name, _)| name.as_str());
        if janitor != Some(me) {
            return Vec::new();
        }
        let mut decisions = Vec::new();
        for rule in &self.rules {
            for (host, view) in &observed.hosts {
                if !rule.per_replica {
                    if rule.conditions.iter().all(|c| c.holds(view, None)) {
                        decisions.push(rule.decide(host, None));
                    }
                    continue;
                }
                for replica in view.report.replicas.iter().filter(|_| view.alive()) {
                    if rule.conditions.iter().all(|c| c.holds(view, Some(replica))) {
                        decisions.push(rule.decide(host, Some(replica)));
                    }
                }
            }
        }
        decisions
    }
}

impl Rule {
    fn decide(&self, host: &str, replica: Option<&ReplicaReport>) -> Decision {
        let subject = match replica {
            Some(r) => format!("{}-{}-{host}", r.vm, r.uid),
            None => host.to_string(),
        };
        let message = match replica {
            Some(r) => format!("rule {} on {} ({host}): {}", self.name, r.vm, self.action),
            None => format!("rule {} on host {host}: {}", self.name, self.action),
        };
        Decision {
            rule: self.name.clone(),
            identity: subject,
            host: host.to_string(),
            vm: replica.map(|r| r.vm.clone()),
            action: self.action.clone(),
            message,
        }
    }
}

impl fmt::Display for RuleAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleAction::DrainHost => write!(f, "drain_host"),
            RuleAction::QuarantineHost => write!(f, "quarantine_host"),
            RuleAction::ReprotectElsewhere => write!(f, "reprotect_elsewhere"),
            RuleAction::Webhook(url) => write!(f, "webhook {url}"),
        }
    }
}

impl Condition {
    fn fact_value(&self, host: &HostView, replica: Option<&ReplicaReport>) -> Option<Value> {
        let report = &host.report;
        Some(match self.fact.as_str() {
            "host.missed_heartbeats" => Value::Number(host.missed_heartbeats()),
            "host.replicas" => Value::Number(report.replicas.len() as u64),
            "host.memory_mib_free" => Value::Number(report.memory_mib_free),
            "replica.lag_epochs" => Value::Number(replica?.lag_epochs?),
            "replica.failovers" => Value::Number(u64::from(replica?.took_over_generation.is_some())),
            "replica.role" => Value::Text(
                match replica?.role {
                    ReplicaRole::Primary => "primary",
                    ReplicaRole::Backup => "backup",
                    ReplicaRole::Starting => "starting",
                }
                .to_string(),
            ),
            fact => Value::Text(report.labels.get(fact.strip_prefix("host.label.")?)?.clone()),
        })
    }

    fn holds(&self, host: &HostView, replica: Option<&ReplicaReport>) -> bool {
        let Some(found) = self.fact_value(host, replica) else { return false };
        match (&found, &self.value) {
            (Value::Number(a), Value::Number(b)) => match self.op {
                Op::Lt => a < b,
                Op::Le => a <= b,
                Op::Gt => a > b,
                Op::Ge => a >= b,
                Op::Eq => a == b,
                Op::Ne => a != b,
            },
            (Value::Text(a), Value::Text(b)) => match self.op {
                Op::Eq => a == b,
                Op::Ne => a != b,
                _ => false,
            },
            _ => false,
        }
    }
}

fn parse_rule(line: &str) -> Result<Rule, String> {
    let rest = line.strip_prefix("rule ").ok_or("a rule starts with `rule NAME:`")?;
    let (name, rest) = rest.split_once(':').ok_or("missing `:` after the rule's name")?;
    let name = name.trim();
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)) {
        return Err(format!("rule name {name:?} is not 1 to 64 of A-Z a-z 0-9 - _"));
    }
    let rest = rest.trim().strip_prefix("when ").ok_or("expected `when` after the rule's name")?;
    let (conditions_text, action_text) = rest.split_once(" then ").ok_or("missing `then ACTION`")?;
    let mut conditions = Vec::new();
    for text in conditions_text.split(" and ") {
        conditions.push(parse_condition(text.trim())?);
    }
    let action = parse_action(action_text.trim())?;
    let per_replica = conditions.iter().any(|c| c.fact.starts_with("replica."));
    if action == RuleAction::ReprotectElsewhere && !per_replica {
        return Err("reprotect_elsewhere needs a replica.* condition (which VM?)".into());
    }
    Ok(Rule { name: name.to_string(), conditions, action, per_replica })
}

fn parse_condition(text: &str) -> Result<Condition, String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let [fact, op, value] = words[..] else { return Err(format!("condition {text:?} is not `FACT OP VALUE`")) };
    let op = match op {
        "<" => Op::Lt,
        "<=" => Op::Le,
        ">" => Op::Gt,
        ">=" => Op::Ge,
        "==" => Op::Eq,
        "!=" => Op::Ne,
        other => return Err(format!("unknown operator {other:?}; use < <= > >= == !=")),
    };
    let numeric = NUMBER_FACTS.contains(&fact);
    let textual = fact == "replica.role" || fact.strip_prefix("host.label.").is_some_and(|k| !k.is_empty());
    let value = match (numeric, textual) {
        (true, _) => Value::Number(value.parse().map_err(|_| format!("{fact} is a number; {value:?} is not"))?),
        (_, true) if matches!(op, Op::Eq | Op::Ne) => Value::Text(value.to_string()),
        (_, true) => return Err(format!("{fact} is text: compare it with == or !=")),
        _ => {
            return Err(format!(
                "unknown fact {fact:?}; facts: {}, replica.role, host.label.KEY",
                NUMBER_FACTS.join(", ")
            ))
        }
    };
    if fact == "replica.role"
        && !matches!(&value, Value::Text(v) if ["primary", "backup", "starting"].contains(&v.as_str()))
    {
        return Err("replica.role is primary, backup or starting".into());
    }
    Ok(Condition { fact: fact.to_string(), op, value })
}

fn parse_action(text: &str) -> Result<RuleAction, String> {
    let mut words = text.split_whitespace();
    let action = match (words.next(), words.next()) {
        (Some("drain_host"), None) => RuleAction::DrainHost,
        (Some("quarantine_host"), None) => RuleAction::QuarantineHost,
        (Some("reprotect_elsewhere"), None) => RuleAction::ReprotectElsewhere,
        (Some("webhook"), Some(url)) if url.starts_with("http://") && url.len() <= 512 => {
            RuleAction::Webhook(url.to_string())
        }
        (Some("webhook"), _) => return Err("webhook takes one http:// URL".into()),
        (Some(action @ ("migrate" | "rejuvenate_monitor")), _) => {
            return Err(format!("{action} needs live migration / microreboot, which this build does not have yet"))
        }
        _ => {
            return Err(format!(
                "unknown action {text:?}; actions: drain_host, quarantine_host, reprotect_elsewhere, webhook URL"
            ))
        }
    };
    match words.next() {
        Some(extra) => Err(format!("unexpected {extra:?} after the action")),
        None => Ok(action),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observed::HostReport;

    #[test]
    fn the_default_rules_and_the_examples_parse() {
        assert_eq!(RuleSet::default_rules().rules.len(), 2);
        for example in
            [include_str!("../../../docs/rules-defense.rules"), include_str!("../../../docs/rules-recovery.rules")]
        {
            RuleSet::parse(example).unwrap();
        }
    }

    #[test]
    fn a_bad_file_is_refused_naming_the_line_and_the_problem() {
        for (text, message) in [
            ("# ok\nrule a when x", "line 2: missing `:` after the rule's name"),
            ("rule a: when host.replicas >= lots then drain_host", "line 1: host.replicas is a number; \"lots\" is not"),
            ("rule a: when host.cpu > 1 then drain_host", "line 1: unknown fact \"host.cpu\"; facts: host.missed_heartbeats, host.replicas, host.memory_mib_free, replica.lag_epochs, replica.failovers, replica.role, host.label.KEY"),
            ("rule a: when host.replicas > 1 then reboot", "line 1: unknown action \"reboot\"; actions: drain_host, quarantine_host, reprotect_elsewhere, webhook URL"),
            ("rule a: when host.replicas > 1 then drain_host\nrule a: when host.replicas > 2 then drain_host", "line 2: a second rule named \"a\""),
            ("rule a: when host.replicas > 1 then reprotect_elsewhere", "line 1: reprotect_elsewhere needs a replica.* condition (which VM?)"),
            ("rule a: when host.label.zone > a then drain_host", "line 1: host.label.zone is text: compare it with == or !="),
            ("rule a: when replica.lag_epochs > 1 then migrate", "line 1: migrate needs live migration / microreboot, which this build does not have yet"),
        ] {
            assert_eq!(RuleSet::parse(text).unwrap_err().to_string(), message, "{text}");
        }
    }

    fn observed(missed: u64, zone: &str) -> Observed {
        let report = HostReport {
            name: "h2".into(),
            labels: [("zone".to_string(), zone.to_string())].into_iter().collect(),
            address: String::new(),
            api: String::new(),
            memory_mib_free: 0,
            seq: 0,
            time_ms: 0,
            replicas: Vec::new(),
        };
        let me = HostReport { name: "h1".into(), labels: Default::default(), ..report.clone() };
        Observed {
            hosts: [
                ("h1".to_string(), HostView { report: me, silent_ms: 0 }),
                ("h2".to_string(), HostView { report, silent_ms: missed * 1000 }),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn host_rules_fire_once_from_the_first_alive_host() {
        let rules =
            RuleSet::parse("rule q: when host.missed_heartbeats >= 5 and host.label.zone == lab then quarantine_host")
                .unwrap();
        let declared = Declared::default();
        let fired = rules.evaluate("h1", &declared, &observed(9, "lab"));
        assert_eq!(fired.len(), 1);
        assert_eq!((fired[0].host.as_str(), &fired[0].action), ("h2", &RuleAction::QuarantineHost));
        assert!(rules.evaluate("h2", &declared, &observed(9, "lab")).is_empty(), "only the first alive host decides");
        assert!(rules.evaluate("h1", &declared, &observed(2, "lab")).is_empty());
        assert!(rules.evaluate("h1", &declared, &observed(9, "office")).is_empty());
    }
}
