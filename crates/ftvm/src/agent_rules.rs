//! The agent's side of the user rules ([`cluster::rules`]): loading the file (a bad one is
//! refused naming the line; after a re-execution the last good copy is kept instead) and
//! carrying out a decision with the store.

use anyhow::{Context, Result};
use cluster::keys;
use cluster::rules::{Decision, RuleAction, RuleSet};
use cluster::HostState;
use std::path::Path;
use store::KvStore;

/// The rules of `path` (None: the default rules). A good file is copied to `last_good`; a bad
/// one fails the start, unless this is a re-execution with a last good copy, which is used.
pub fn load(path: Option<&Path>, last_good: &Path, reexecuted: bool) -> Result<RuleSet> {
    let Some(path) = path else { return Ok(RuleSet::default_rules()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read --rules {}", path.display()));
    let parsed = text.and_then(|text| {
        let rules = RuleSet::parse(&text).with_context(|| format!("--rules {}", path.display()))?;
        Ok((rules, text))
    });
    match parsed {
        Ok((rules, text)) => {
            let _ = std::fs::write(last_good, text);
            Ok(rules)
        }
        Err(error) if reexecuted && last_good.exists() => {
            eprintln!("ftvm agent: {error:#}; keeping the last good rules");
            let text = std::fs::read_to_string(last_good)?;
            Ok(RuleSet::parse(&text)?)
        }
        Err(error) => Err(error),
    }
}

/// Does what a rule decided, through the store: a host state, a request to move a VM's backup
/// elsewhere ([`keys::replace`]), or a webhook call.
pub fn carry_out(kv: &mut Box<dyn KvStore>, decision: &Decision, observed: &cluster::Observed) -> Result<()> {
    match &decision.action {
        RuleAction::DrainHost | RuleAction::QuarantineHost => {
            let state = match decision.action {
                RuleAction::DrainHost => HostState::Draining,
                _ => HostState::Quarantined,
            };
            kv.put(&keys::hostctl(&decision.host), &serde_json::to_vec(&state)?)?;
        }
        RuleAction::ReprotectElsewhere => {
            // The round moves the backup (the one the primary replicates to, else any) off its
            // host once another can take it, then removes the request.
            let Some(vm) = &decision.vm else { return Ok(()) };
            let mine: Vec<_> = observed.live_replicas().filter(|(_, r)| &r.vm == vm).collect();
            let primary = mine.iter().find(|(_, r)| r.role == cluster::ReplicaRole::Primary);
            let backups = || mine.iter().filter(|(_, r)| r.role == cluster::ReplicaRole::Backup);
            let backup = backups()
                .find(|(_, r)| primary.is_some_and(|(_, p)| r.listen.is_some() && r.listen == p.backup_to))
                .or_else(|| backups().next());
            if let Some((host, replica)) = backup {
                let replacement = cluster::spec::Replacement { uid: replica.uid, host: host.to_string() };
                kv.put(&keys::replace(vm), &serde_json::to_vec(&replacement)?)?;
            }
        }
        RuleAction::Webhook(url) => {
            let url = url.clone();
            let body = serde_json::json!({
                "rule": decision.rule, "host": decision.host, "vm": decision.vm, "message": decision.message,
            });
            std::thread::spawn(move || {
                let Some(rest) = url.strip_prefix("http://") else { return };
                let (authority, path) =
                    rest.split_once('/').map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
                let timeout = std::time::Duration::from_secs(3);
                if let Err(error) =
                    store::http::post_json(authority, &path, body.to_string().as_bytes(), timeout, timeout)
                {
                    eprintln!("ftvm agent: webhook {url}: {error}");
                }
            });
        }
    }
    Ok(())
}
