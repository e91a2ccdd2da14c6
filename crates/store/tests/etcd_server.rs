//! A real etcd server for a test: Debian's `etcd` (package etcd-server, installed by
//! scripts/test) on free loopback ports, its data in a temporary directory, stopped by its
//! PID when dropped. Shared by the store's and the ftvm binary's tests (`#[path]`).

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct EtcdServer {
    child: Option<Child>,
    dir: PathBuf,
    pub client_port: u16,
    peer_port: u16,
    address: String,
    /// The network namespace it runs in (None: this one).
    netns: Option<String>,
}

fn free_port(address: &str) -> u16 {
    TcpListener::bind((address, 0)).expect("bind a free port").local_addr().expect("its address").port()
}

impl EtcdServer {
    /// Starts etcd on loopback and waits until it answers.
    pub fn start(name: &str) -> EtcdServer {
        Self::start_on("127.0.0.1", name)
    }

    /// Starts etcd listening on `address` (an address of this network namespace).
    pub fn start_on(address: &str, name: &str) -> EtcdServer {
        Self::launched(name, address, (free_port(address), free_port(address)), None)
    }

    /// Starts etcd inside network namespace `ns` (made by the test), on `address` there.
    pub fn start_in_netns(ns: &str, address: &str, name: &str) -> EtcdServer {
        Self::launched(name, address, (2379, 2380), Some(ns.to_string()))
    }

    /// etcd in a fresh directory for `name`, on `address` with these (client, peer) ports.
    fn launched(name: &str, address: &str, (client_port, peer_port): (u16, u16), netns: Option<String>) -> EtcdServer {
        let dir = std::env::temp_dir().join(format!("ftvm-etcd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the etcd directory");
        let mut server = EtcdServer { child: None, dir, client_port, peer_port, address: address.to_string(), netns };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let client = format!("http://{}:{}", self.address, self.client_port);
        let peer = format!("http://{}:{}", self.address, self.peer_port);
        let log = std::fs::File::create(self.dir.join("etcd.log")).expect("create the etcd log");
        // `ip netns exec` executes etcd in place: the PID is etcd's.
        let mut command = match &self.netns {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns, "etcd"]);
                command
            }
            None => Command::new("etcd"),
        };
        let child = command
            .arg("--name=test")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log"))
            .stderr(log)
            .spawn()
            .expect("etcd not found: install Debian's etcd-server (scripts/test does)");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let urls = self.urls();
        let netns = self.netns.clone();
        let probe = move || {
            let mut kv = store::EtcdKv::new(&urls).expect("a valid URL");
            store::KvStore::get(&mut kv, "/ready-probe").is_ok()
        };
        loop {
            let ready = match &netns {
                None => probe(),
                Some(ns) => in_netns(ns, probe.clone()),
            };
            if ready {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let log = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
                panic!("etcd exited with {status} before answering; its log:\n{log}");
            }
            assert!(Instant::now() < deadline, "etcd did not answer within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://HOST:PORT` of its client port.
    pub fn urls(&self) -> String {
        format!("http://{}:{}", self.address, self.client_port)
    }

    /// The `--store` spec naming it.
    pub fn spec(&self) -> String {
        format!("etcd:{}", self.urls())
    }

    /// Kills it (SIGKILL, by PID) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again after [`EtcdServer::kill`], on the same ports and data.
    pub fn start_again(&mut self) {
        if self.child.is_none() {
            self.launch();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

/// Runs `f` on a thread that has joined network namespace `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let netns = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("the namespace exists");
    std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("the thread in the namespace")
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
