//! Declared state: the VMs the user asked for, by name, with their images, memory, disk,
//! network, protection, number of replicas and placement constraints. Checked when declared
//! (a clear error naming the field) and again when read back from the store (a value that
//! does not check out is garbage, not a VM).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The longest VM name (its ownership id adds a `.` and the declaring revision).
pub const MAX_NAME_BYTES: usize = 40;
pub const MEMORY_MIB_RANGE: std::ops::RangeInclusive<u64> = 16..=65536;
const MAX_PATH_BYTES: usize = 1024;
const MAX_APPEND_BYTES: usize = 2048;
const MAX_LABELS: usize = 32;
const MAX_COMMAND_WORDS: usize = 64;
const MAX_LABEL_BYTES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Protection {
    /// One replica, no backup.
    None,
    /// A primary and a backup on another host, checkpointed every epoch.
    #[default]
    Checkpoint,
}

/// Where a VM's replicas may run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Placement {
    /// No two replicas of the VM on one host.
    pub distinct_hosts: bool,
    /// Every replica's host carries these labels.
    pub labels: BTreeMap<String, String>,
    /// No replica on a host carrying any of these labels.
    pub avoid_labels: BTreeMap<String, String>,
    /// A host must keep this much memory free beyond the VM's own.
    pub min_free_memory_mib: u64,
}

impl Default for Placement {
    fn default() -> Self {
        Placement {
            distinct_hosts: true,
            labels: BTreeMap::new(),
            avoid_labels: BTreeMap::new(),
            min_free_memory_mib: 0,
        }
    }
}

/// A VM as declared (`POST /v1/vms`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    /// None: the default guest built into the agent's installation.
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default)]
    pub append: Option<String>,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// A disk image on the host that first places the VM; later hosts receive it through
    /// the replication stream.
    #[serde(default)]
    pub disk: Option<String>,
    /// None: derived from the name.
    #[serde(default)]
    pub mac: Option<String>,
    /// None: no network device.
    #[serde(default)]
    pub bridge: Option<String>,
    #[serde(default)]
    pub protection: Protection,
    /// None: what the protection needs (1 for none, 2 for checkpoint).
    #[serde(default)]
    pub replicas: Option<u32>,
    #[serde(default)]
    pub placement: Placement,
    /// A command the guest runs (as `ftvm run -- COMMAND`); empty: the console.
    #[serde(default)]
    pub command: Vec<String>,
}

fn default_memory_mib() -> u64 {
    256
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("VM name {0:?} is invalid: use 1 to {MAX_NAME_BYTES} of A-Z a-z 0-9 _ - (not starting with '-')")]
    Name(String),
    #[error("memory_mib {0} is outside {lo}..={hi}", lo = MEMORY_MIB_RANGE.start(), hi = MEMORY_MIB_RANGE.end())]
    Memory(u64),
    #[error("{field} {value:?} is invalid: {problem}")]
    Field { field: &'static str, value: String, problem: &'static str },
    #[error("replicas {replicas} does not fit protection {protection}: it takes {needed}")]
    Replicas { replicas: u32, protection: &'static str, needed: u32 },
}

impl VmSpec {
    /// The spec with its defaults filled in, or the first problem found.
    pub fn checked(mut self) -> Result<VmSpec, SpecError> {
        check_name(&self.name)?;
        if !MEMORY_MIB_RANGE.contains(&self.memory_mib) {
            return Err(SpecError::Memory(self.memory_mib));
        }
        for (field, value) in [("kernel", &self.kernel), ("initrd", &self.initrd), ("disk", &self.disk)] {
            if let Some(path) = value {
                check_path(field, path)?;
            }
        }
        if let Some(append) = &self.append {
            if append.len() > MAX_APPEND_BYTES || append.chars().any(char::is_control) {
                return Err(field("append", append, "at most 2048 bytes, no control characters"));
            }
        }
        let mac = match &self.mac {
            Some(mac) => parse_mac(mac).ok_or_else(|| field("mac", mac, "six hex bytes separated by ':'"))?,
            None => derived_mac(&self.name),
        };
        self.mac = Some(format_mac(mac));
        if let Some(bridge) = &self.bridge {
            check_interface("bridge", bridge)?;
        }
        let needed = self.needed_replicas();
        let replicas = *self.replicas.get_or_insert(needed);
        if replicas != needed {
            let protection = match self.protection {
                Protection::None => "none",
                Protection::Checkpoint => "checkpoint",
            };
            return Err(SpecError::Replicas { replicas, protection, needed });
        }
        let command_bytes: usize = self.command.iter().map(|w| w.len() + 1).sum();
        if self.command.len() > MAX_COMMAND_WORDS || command_bytes > MAX_APPEND_BYTES {
            return Err(field("command", &self.command.join(" "), "at most 64 words and 2048 bytes"));
        }
        if self.command.iter().any(|w| w.chars().any(char::is_control)) {
            return Err(field("command", &self.command.join(" "), "no control characters"));
        }
        for labels in [&self.placement.labels, &self.placement.avoid_labels] {
            check_labels(labels)?;
        }
        Ok(self)
    }

    fn needed_replicas(&self) -> u32 {
        match self.protection {
            Protection::None => 1,
            Protection::Checkpoint => 2,
        }
    }

    pub fn replica_count(&self) -> u32 {
        self.replicas.unwrap_or_else(|| self.needed_replicas())
    }
}

fn field(field: &'static str, value: &str, problem: &'static str) -> SpecError {
    let mut value = value.to_string();
    value.truncate(80);
    SpecError::Field { field, value, problem }
}

pub fn check_name(name: &str) -> Result<(), SpecError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    match valid {
        true => Ok(()),
        false => Err(SpecError::Name(name.chars().take(80).collect())),
    }
}

fn check_path(name: &'static str, path: &str) -> Result<(), SpecError> {
    match path.starts_with('/') && path.len() <= MAX_PATH_BYTES && !path.chars().any(char::is_control) {
        true => Ok(()),
        false => Err(field(name, path, "an absolute path of at most 1024 bytes")),
    }
}

/// A network interface name as Linux takes it.
pub fn check_interface(name: &'static str, value: &str) -> Result<(), SpecError> {
    let valid = !value.is_empty()
        && value.len() <= 15
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    match valid {
        true => Ok(()),
        false => Err(field(name, value, "1 to 15 of A-Z a-z 0-9 _ - .")),
    }
}

/// Host labels: at most 32, keys and values of `[A-Za-z0-9._-]`, at most 64 bytes each.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), SpecError> {
    if labels.len() > MAX_LABELS {
        return Err(field("labels", &format!("{} labels", labels.len()), "at most 32 labels"));
    }
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= MAX_LABEL_BYTES
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    match labels.iter().find(|(k, v)| !ok(k) || !ok(v)) {
        Some((k, v)) => Err(field("labels", &format!("{k}={v}"), "keys and values of 1 to 64 of A-Z a-z 0-9 . _ -")),
        None => Ok(()),
    }
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// A locally administered unicast MAC from the VM's name (FNV-1a), stable across hosts.
pub fn derived_mac(name: &str) -> [u8; 6] {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let b = hash.to_be_bytes();
    [0x52, 0x54, b[0] & 0xfe, b[1], b[2], b[3]]
}

/// A declared VM as the store holds it: the spec, and the store revision that declared it
/// (its `uid`: a VM deleted and declared again is another VM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclaredVm {
    pub spec: VmSpec,
    pub uid: u64,
    /// By the declaring agent's clock (display only).
    pub created_ms: u64,
}

/// Everything declared, by VM name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Declared {
    pub vms: BTreeMap<String, DeclaredVm>,
    /// Per host, a state set from outside (a rule's drain or quarantine).
    pub host_states: BTreeMap<String, crate::HostState>,
    /// Per VM name, a backup to move elsewhere (a rule's `reprotect_elsewhere`).
    pub replacing: BTreeMap<String, Replacement>,
}

/// "Move this VM's backup off `host`": the control loop places a new backup on another
/// eligible host (not the primary's, not this one), and the key is removed once the primary
/// is protected by a backup elsewhere. With no other eligible host the backup stays where it
/// is: protection on the same host beats none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replacement {
    /// The declaration it is about (a request about an earlier one is dropped).
    pub uid: u64,
    pub host: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<VmSpec, String> {
        let spec: VmSpec = serde_json::from_str(json).map_err(|e| e.to_string())?;
        spec.checked().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_filled_in() {
        let web = spec(r#"{"name":"web"}"#).unwrap();
        assert_eq!((web.memory_mib, web.protection, web.replicas), (256, Protection::Checkpoint, Some(2)));
        assert_eq!(web.mac, Some(format_mac(derived_mac("web"))));
        assert!(web.placement.distinct_hosts);
        let single = spec(r#"{"name":"one","protection":"none","mac":"52:54:00:AA:bb:01"}"#).unwrap();
        assert_eq!((single.replicas, single.mac.as_deref()), (Some(1), Some("52:54:00:aa:bb:01")));
    }

    #[test]
    fn bad_specs_name_the_field() {
        for (json, message) in [
            (r#"{"name":"a/b"}"#, "VM name \"a/b\" is invalid: use 1 to 40 of A-Z a-z 0-9 _ - (not starting with '-')"),
            (r#"{"name":"a","memory_mib":1}"#, "memory_mib 1 is outside 16..=65536"),
            (r#"{"name":"a","mac":"zz"}"#, "mac \"zz\" is invalid: six hex bytes separated by ':'"),
            (r#"{"name":"a","kernel":"Image"}"#, "kernel \"Image\" is invalid: an absolute path of at most 1024 bytes"),
            (r#"{"name":"a","replicas":3}"#, "replicas 3 does not fit protection checkpoint: it takes 2"),
            (r#"{"name":"a","bridge":"a bridge"}"#, "bridge \"a bridge\" is invalid: 1 to 15 of A-Z a-z 0-9 _ - ."),
        ] {
            assert_eq!(spec(json).unwrap_err(), message, "{json}");
        }
        assert!(spec(r#"{"name":"a","colour":"red"}"#).unwrap_err().contains("unknown field `colour`"));
    }

    #[test]
    fn derived_macs_are_locally_administered_unicast() {
        for name in ["a", "web", "db-2"] {
            let mac = derived_mac(name);
            assert_eq!((mac[0], mac[2] & 1), (0x52, 0), "{name}");
        }
        assert_ne!(derived_mac("a"), derived_mac("b"));
    }
}
