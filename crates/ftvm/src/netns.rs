//! Network namespaces for the demo and the replication tests: several "hosts" on one
//! machine, each in its own namespace, joined by a bridge in a "switch" namespace. All
//! addresses live inside namespaces this module creates; everything is removed on drop.
//! The end-to-end tests compile this same file into themselves (`tests/common`), so it
//! depends on nothing else of the binary; its own test is `tests/netns.rs`.
//!
//! ```text
//!   <p>-host (primary)     <p>-backup             <p>-client
//!   tap0 ─ br0 ─ veth ─┐   tap0 ─ br0 ─ veth ─┐   veth 10.0.2.100
//!                      └──── <p>-switch: br0 ─┴──────┘
//!   repl 192.168.77.1  ─────────────────────  repl 192.168.77.2   (replication link)
//! ```

use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};

/// Run `ip` with `args`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out =
        Command::new("ip").args(args).stdin(Stdio::null()).output().context("cannot run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Namespaces need root; say so plainly instead of failing on the first `ip`. On a
/// fresh machine `ip` itself may be missing: install iproute2 then, as the guest image
/// build installs its own tools.
pub fn require_root() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("this needs root: it creates network namespaces, a bridge and TAP devices (try sudo)");
    }
    let has_ip =
        Command::new("ip").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !has_ip {
        eprintln!("ftvm: installing iproute2 (for `ip`) with apt-get");
        let installed = Command::new("sh")
            .args([
                "-c",
                "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null",
            ])
            .status()
            .context("cannot run apt-get")?;
        if !installed.success() {
            bail!("`ip` is missing and installing iproute2 failed; install it and try again");
        }
    }
    Ok(())
}

/// The demo/test topology.
pub struct Topology {
    pub prefix: String,
    created: Vec<String>,
}

impl Topology {
    pub fn primary_ns(&self) -> String {
        format!("{}-primary", self.prefix)
    }
    pub fn backup_ns(&self) -> String {
        format!("{}-backup", self.prefix)
    }
    pub fn client_ns(&self) -> String {
        format!("{}-client", self.prefix)
    }
    fn switch_ns(&self) -> String {
        format!("{}-switch", self.prefix)
    }

    /// Address of each host on the replication link.
    pub const PRIMARY_REPL_ADDR: &'static str = "192.168.77.1";
    pub const BACKUP_REPL_ADDR: &'static str = "192.168.77.2";
    /// The client's address on the guests' network (the guest is 10.0.2.15).
    pub const CLIENT_ADDR: &'static str = "10.0.2.100";

    /// Create everything; on failure, remove what was made.
    pub fn create(prefix: &str) -> Result<Topology> {
        require_root()?;
        let mut topo = Topology { prefix: prefix.to_string(), created: Vec::new() };
        topo.build().inspect_err(|_| {
            topo.destroy();
        })?;
        Ok(topo)
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        let _ = ip(&["netns", "del", ns]); // a leftover of an earlier, killed run
        ip(&["netns", "add", ns])?;
        self.created.push(ns.to_string());
        self.exec(ns, &["ip", "link", "set", "lo", "up"])
    }

    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<()> {
        let mut full = vec!["netns", "exec", ns];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Join `ns` to the switch: a veth pair, one end in the switch's bridge.
    fn join_switch(&self, ns: &str, tag: &str) -> Result<()> {
        let (inner, outer) = (format!("veth-{tag}"), format!("sw-{tag}"));
        let switch = self.switch_ns();
        ip(&["link", "add", &inner, "netns", ns, "type", "veth", "peer", "name", &outer, "netns", &switch])?;
        self.exec(&switch, &["ip", "link", "set", &outer, "master", "br0", "up"])?;
        self.exec(ns, &["ip", "link", "set", &inner, "up"])
    }

    /// A host for a VM: a bridge holding the VM's TAP device and the switch uplink.
    fn vm_host(&self, ns: &str, tag: &str) -> Result<()> {
        self.exec(ns, &["ip", "link", "add", "br0", "type", "bridge"])?;
        self.exec(ns, &["ip", "link", "set", "br0", "up"])?;
        self.exec(ns, &["ip", "tuntap", "add", "tap0", "mode", "tap"])?;
        self.exec(ns, &["ip", "link", "set", "tap0", "master", "br0", "up"])?;
        self.join_switch(ns, tag)?;
        self.exec(ns, &["ip", "link", "set", &format!("veth-{tag}"), "master", "br0"])
    }

    fn build(&mut self) -> Result<()> {
        let (switch, primary, backup, client) =
            (self.switch_ns(), self.primary_ns(), self.backup_ns(), self.client_ns());
        for ns in [&switch, &primary, &backup, &client] {
            self.add_ns(ns)?;
        }
        self.exec(&switch, &["ip", "link", "add", "br0", "type", "bridge"])?;
        self.exec(&switch, &["ip", "link", "set", "br0", "up"])?;
        self.vm_host(&primary, "p")?;
        self.vm_host(&backup, "b")?;
        self.join_switch(&client, "c")?;
        self.exec(&client, &["ip", "addr", "add", &format!("{}/24", Self::CLIENT_ADDR), "dev", "veth-c"])?;
        // The replication link: a direct veth pair between the two VM hosts.
        ip(&["link", "add", "repl", "netns", &primary, "type", "veth", "peer", "name", "repl", "netns", &backup])?;
        self.exec(&primary, &["ip", "addr", "add", &format!("{}/24", Self::PRIMARY_REPL_ADDR), "dev", "repl"])?;
        self.exec(&backup, &["ip", "addr", "add", &format!("{}/24", Self::BACKUP_REPL_ADDR), "dev", "repl"])?;
        self.exec(&primary, &["ip", "link", "set", "repl", "up"])?;
        self.exec(&backup, &["ip", "link", "set", "repl", "up"])
    }

    /// Cut (or restore) the replication link in both directions.
    pub fn set_replication_link(&self, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        self.exec(&self.primary_ns(), &["ip", "link", "set", "repl", state])?;
        self.exec(&self.backup_ns(), &["ip", "link", "set", "repl", state])
    }

    fn destroy(&mut self) {
        for ns in self.created.drain(..).rev() {
            let _ = ip(&["netns", "del", &ns]);
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.destroy();
    }
}
