//! `--metrics-listen HOST:PORT`: the VM's Prometheus metrics over TCP, since Prometheus
//! cannot scrape a Unix socket. A tiny HTTP responder: one request per connection, read
//! with the control API's bounds and timeouts; `GET /metrics` is answered, anything else
//! refused (404 for another path, 405 for another method).
//!
//! It asks whoever runs the VM for the time being — a backup's waiting loop, then the
//! driver once the backup took over — so that the port stays the same across a takeover.

use crate::api::{self, Answer};
use anyhow::{Context, Result};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use vmm::host::HostEvent;

/// Connections served at once; more are closed at accept (a scraper needs one).
const MAX_CONNECTIONS: usize = 16;

type Route = Arc<Mutex<Option<Sender<HostEvent>>>>;

/// The listening socket and where its requests go.
pub struct MetricsServer {
    route: Route,
    /// Where it listens (the port chosen, when asked for port 0).
    pub addr: SocketAddr,
}

/// Serve `vm`'s `--metrics-listen`, if given, asking `events` for the status.
pub fn bind(vm: &crate::run_cmd::VmArgs, events: &Sender<HostEvent>) -> Result<Option<MetricsServer>> {
    let Some(spec) = &vm.metrics_listen else { return Ok(None) };
    let server = MetricsServer::bind(spec)?;
    server.route_to(events.clone());
    eprintln!("ftvm: metrics on http://{}/metrics", server.addr);
    Ok(Some(server))
}

impl MetricsServer {
    /// Listen on `spec` (HOST:PORT); requests are refused with 503 until [`Self::route_to`].
    pub fn bind(spec: &str) -> Result<MetricsServer> {
        let addr = vmm::replicate::resolve(spec).context("--metrics-listen")?;
        let listener = TcpListener::bind(addr).with_context(|| format!("cannot listen for metrics on {addr}"))?;
        let addr = listener.local_addr().context("the metrics socket has no address")?;
        let route: Route = Arc::new(Mutex::new(None));
        let serving = route.clone();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || accept_loop(listener, serving))
            .context("cannot start the metrics server")?;
        Ok(MetricsServer { route, addr })
    }

    /// Ask `events` for the status from now on.
    pub fn route_to(&self, events: Sender<HostEvent>) {
        *self.route.lock().expect("not poisoned") = Some(events);
    }
}

fn accept_loop(listener: TcpListener, route: Route) {
    crate::accept::serve(listener.incoming(), MAX_CONNECTIONS, crate::accept::Open::default(), move |stream| {
        let _ = handle(stream, &route);
    })
}

fn handle(mut stream: TcpStream, route: &Route) -> std::io::Result<()> {
    stream.set_read_timeout(Some(api::IO_TIMEOUT))?;
    stream.set_write_timeout(Some(api::IO_TIMEOUT))?;
    let answer = match api::read_request(&mut stream) {
        Err(message) => Answer::text(400, message),
        Ok(request) => answer(&request.method, &request.target, route),
    };
    answer.write(&mut stream)
}

/// The answer to one request on the metrics port.
fn answer(method: &str, target: &str, route: &Route) -> Answer {
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return Answer::text(404, format!("no such resource {target}; this port serves GET /metrics only\n"));
    }
    if method != "GET" {
        return Answer { allow: Some("GET"), ..Answer::text(405, format!("/metrics takes GET, not {method}\n")) };
    }
    let events = route.lock().expect("not poisoned").clone();
    match events {
        Some(events) => api::metrics(&events),
        None => Answer::text(503, "the VM is starting\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_answered() {
        let route: Route = Arc::new(Mutex::new(None));
        assert_eq!(answer("GET", "/status", &route).status, 404);
        assert_eq!(answer("GET", "/", &route).status, 404);
        let put = answer("PUT", "/metrics", &route);
        assert_eq!((put.status, put.allow), (405, Some("GET")));
        assert_eq!(answer("GET", "/metrics", &route).status, 503, "nothing to ask yet");
        assert_eq!(answer("GET", "/metrics?x=1", &route).status, 503, "a query string is ignored");
    }
}
