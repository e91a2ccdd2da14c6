//! `ftvm vm`: the client of the cluster API (`/v1/vms` on any agent).

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long `vm console` keeps trying to attach again after its console closed (a failover
/// takes about a second; placing the VM again, longer).
const REATTACH_LIMIT: Duration = Duration::from_secs(60);

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
    /// Attach the terminal to a VM's console wherever it runs (Ctrl-A x detaches); after a
    /// failover it attaches again to the new primary
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
        Verb::Console { name } => console(&client, &name),
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

/// `ftvm vm console NAME`: the terminal (raw, if it is one) on the VM's console; Ctrl-A x
/// detaches. When the console closes under it (the primary's host failed), it attaches again
/// to wherever the VM runs next. Typing after stdin ends is over; the output still comes.
fn console(client: &Client, name: &str) -> Result<i32> {
    let (stream, host) = attach_when_ready(client, name)?;
    let raw = vmm::host::console::RawMode::enter();
    eprint!("ftvm vm console: attached to {name} on {host} (Ctrl-A x detaches)\r\n");
    let writer = Arc::new(Mutex::new(stream.try_clone()?));
    let detached = Arc::new(AtomicBool::new(false));
    {
        let (writer, detached) = (writer.clone(), detached.clone());
        std::thread::spawn(move || type_into(&writer, &detached));
    }
    let mut reader = stream;
    let mut stdout = std::io::stdout();
    loop {
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    stdout.write_all(&buf[..n])?;
                    stdout.flush()?;
                }
            }
        }
        if detached.load(Ordering::Acquire) {
            drop(raw);
            return Ok(0);
        }
        eprint!("\r\nftvm vm console: {name}'s console closed; attaching again\r\n");
        let deadline = Instant::now() + REATTACH_LIMIT;
        let (stream, host) = loop {
            match client.attach_console(name) {
                Ok(attached) => break attached,
                Err(error) if Instant::now() >= deadline => {
                    drop(raw);
                    return Err(error.context(format!("{name}'s console did not come back within {REATTACH_LIMIT:?}")));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        };
        eprint!("ftvm vm console: attached to {name} on {host}\r\n");
        *writer.lock().unwrap_or_else(|p| p.into_inner()) = stream.try_clone()?;
        reader = stream;
    }
}

/// The first attach: a VM still starting, or a host just failed, is waited for (up to
/// [`REATTACH_LIMIT`]); a VM that does not exist or a wrong token is an error at once.
fn attach_when_ready(client: &Client, name: &str) -> Result<(TcpStream, String)> {
    let deadline = Instant::now() + REATTACH_LIMIT;
    loop {
        match client.attach_console(name) {
            Err(error)
                if error.downcast_ref::<Refused>().is_some_and(|r| r.transient()) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(300));
            }
            attached => return attached,
        }
    }
}

/// An agent's refusal of a console request.
#[derive(Debug)]
struct Refused {
    status: String,
    message: String,
}

impl Refused {
    /// Not running yet (409), a host not answering or busy (502, 503): worth asking again.
    fn transient(&self) -> bool {
        matches!(self.status.as_str(), "409" | "502" | "503")
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the agent refused: {} (HTTP {})", self.message, self.status)
    }
}

impl std::error::Error for Refused {}

/// Stdin to the console (through the Ctrl-A escape) until it ends or the user detaches.
fn type_into(writer: &Mutex<TcpStream>, detached: &AtomicBool) {
    let mut stdin = std::io::stdin();
    let mut escape = vmm::host::console::Escape::default();
    let mut buf = [0u8; 1024];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let (bytes, quit) = escape.filter(&buf[..n]);
        let stream = writer.lock().unwrap_or_else(|p| p.into_inner());
        // A write to a console that just closed is lost, as keys typed at a host going down are.
        let _ = (&*stream).write_all(&bytes);
        if quit {
            detached.store(true, Ordering::Release);
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

impl Client {
    /// `POST /v1/vms/NAME/console` upgraded to a raw pipe: the connection and the host whose
    /// replica answers.
    pub fn attach_console(&self, name: &str) -> Result<(TcpStream, String)> {
        use crate::agent_console::{read_head, HOST_HEADER, UPGRADE};
        let addr = vmm::replicate::resolve(&self.authority)?;
        let timeout = Duration::from_secs(10);
        let mut stream = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("cannot reach the agent at {}", self.authority))?;
        stream.set_read_timeout(Some(timeout))?;
        let request = format!(
            "POST /v1/vms/{name}/console HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Upgrade: {UPGRADE}\r\nConnection: Upgrade\r\nContent-Length: 0\r\n\r\n",
            self.authority, self.token
        );
        stream.write_all(request.as_bytes())?;
        let head = read_head(&mut stream)?;
        let head = String::from_utf8_lossy(&head).to_string();
        let status = head.split_whitespace().nth(1).unwrap_or("?").to_string();
        if status != "101" {
            let mut body = Vec::new();
            let _ = (&mut stream).take(64 * 1024).read_to_end(&mut body);
            let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let message = value["error"].as_str().unwrap_or("no message").to_string();
            return Err(Refused { status, message }.into());
        }
        stream.set_read_timeout(None)?;
        let host = head
            .lines()
            .filter_map(|line| line.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case(HOST_HEADER))
            .map_or("?".to_string(), |(_, v)| v.trim().to_string());
        Ok((stream, host))
    }
}
