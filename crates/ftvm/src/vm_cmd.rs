//! `ftvm vm`: the client of the cluster API (`/v1/vms` on any agent).

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct VmArgs {
    /// An agent's API: http://HOST:PORT
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:7780")]
    pub api: String,
    /// The API token: the file's first line (else FTVM_TOKEN)
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    #[command(subcommand)]
    pub verb: Verb,
}

#[derive(clap::Subcommand, Debug)]
pub enum Verb {
    /// Declare a VM
    Create {
        name: String,
        #[arg(long, value_name = "none|checkpoint", default_value = "checkpoint")]
        protection: String,
        #[arg(long, value_name = "MIB", default_value_t = 256)]
        memory_mib: u64,
        #[arg(long, value_name = "FILE")]
        kernel: Option<String>,
        #[arg(long, value_name = "FILE")]
        initrd: Option<String>,
        #[arg(long, value_name = "FILE")]
        disk: Option<String>,
        #[arg(long, value_name = "MAC")]
        mac: Option<String>,
        #[arg(long, value_name = "BR")]
        bridge: Option<String>,
        /// Host labels every replica's host must carry (k=v,...)
        #[arg(long, value_name = "K=V,...")]
        labels: Option<String>,
        /// The command the guest runs
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// List the VMs
    List,
    /// Show one VM (spec, state, replicas)
    Show { name: String },
    /// Delete a VM (its replicas stop)
    Delete { name: String },
    /// Follow a VM's console wherever it runs
    Console { name: String },
}

pub fn run(args: VmArgs) -> Result<i32> {
    let token = crate::agent_cmd::load_token(args.token_file.as_deref())?;
    let client = Client::new(&args.api, &token)?;
    match args.verb {
        Verb::Create { name, protection, memory_mib, kernel, initrd, disk, mac, bridge, labels, command } => {
            let mut placement = json!({});
            if let Some(labels) = labels {
                let pairs: serde_json::Map<String, Value> = labels
                    .split(',')
                    .filter_map(|p| p.split_once('='))
                    .map(|(k, v)| (k.to_string(), Value::from(v)))
                    .collect();
                placement["labels"] = Value::Object(pairs);
            }
            let spec = json!({
                "name": name, "protection": protection, "memory_mib": memory_mib, "kernel": kernel,
                "initrd": initrd, "disk": disk, "mac": mac, "bridge": bridge, "placement": placement,
                "command": command,
            });
            print_json(&client.call("POST", "/v1/vms", Some(&spec))?)
        }
        Verb::List => {
            let list = client.call("GET", "/v1/vms", None)?;
            println!("{:<20} {:<12} {:<6} {:<8} REPLICAS", "NAME", "STATE", "GEN", "OWNER");
            for vm in list["vms"].as_array().into_iter().flatten() {
                let replicas: Vec<String> = vm["replicas"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| format!("{}@{}", r["role"].as_str().unwrap_or("?"), r["host"].as_str().unwrap_or("?")))
                    .collect();
                println!(
                    "{:<20} {:<12} {:<6} {:<8} {}",
                    vm["name"].as_str().unwrap_or("?"),
                    vm["state"].as_str().unwrap_or("?"),
                    vm["generation"].as_u64().map_or("-".into(), |g| g.to_string()),
                    vm["owner"].as_str().unwrap_or("-"),
                    replicas.join(" ")
                );
            }
            Ok(0)
        }
        Verb::Show { name } => print_json(&client.call("GET", &format!("/v1/vms/{name}"), None)?),
        Verb::Delete { name } => print_json(&client.call("DELETE", &format!("/v1/vms/{name}"), None)?),
        Verb::Console { name } => {
            bail!(
                "ftvm vm console {name}: not in this build yet (a replica's console is in its agent's work directory)"
            )
        }
    }
}

fn print_json(value: &Value) -> Result<i32> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(0)
}

/// A client of one agent's API.
pub struct Client {
    authority: String,
    token: String,
}

impl Client {
    pub fn new(url: &str, token: &str) -> Result<Client> {
        let authority = url.strip_prefix("http://").context("--api takes http://HOST:PORT")?;
        let authority = authority.trim_end_matches('/').trim_end_matches("/v1").to_string();
        Ok(Client { authority, token: token.to_string() })
    }

    /// One request; the JSON answer, or an error carrying the API's message.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let auth = format!("Authorization: Bearer {}", self.token);
        let timeout = Duration::from_secs(10);
        let (status, answer) = store::http::request(&self.authority, method, path, &[auth], &body, timeout, timeout)
            .with_context(|| format!("cannot reach the agent at {}", self.authority))?;
        let value: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            let message = value["error"].as_str().unwrap_or("no message");
            bail!("the agent refused: {message} (HTTP {status})");
        }
        Ok(value)
    }
}
