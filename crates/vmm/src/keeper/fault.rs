//! Fault points in the monitor (the `fail` crate, as TiKV uses it): compiled in with the
//! `failpoints` cargo feature, switched on by the `FAILPOINTS` environment variable
//! (`name=action;...`, see the fail crate). Besides fail's own actions (`panic`,
//! `sleep(MS)`, `pause`, `print`), `return(KIND)` injects what fail has no word for:
//! `abort`, `segv`, `hang` (an endless loop) — and where the point guards data the
//! monitor keeps, `corrupt` (see [`corrupts`]).
//!
//! The points: `driver::slice` (the run loop), `keeper::checkpoint-take`,
//! `keeper::checkpoint-commit`, `keeper::checkpoint-apply`, `keeper::checkpoint-corrupt`
//! (checkpoint taking), `machine::input` (device emulation, in the machine crate),
//! `replicate::send` (replication sends), `keeper::recover` (a new monitor's recovery,
//! between laying the image and restoring the state), `keeper::vm-ended` (the VM ended,
//! before the keeper is told), `keeper::handover-prepare` (a planned handover's next
//! monitor, once it laid the image), `keeper::handover-final` (the old monitor, as it
//! begins its final checkpoint).
//!
//! A keeper's monitors share `FAILPOINTS`; `FAILPOINTS_ATTEMPT_N` (same syntax) adds fault
//! points for monitor N alone (1 for the first; a spare counts from its start), so that a
//! test can fault one monitor, then strike its successors elsewhere.

/// Evaluate fault point `name`: nothing unless it is configured.
#[inline]
pub fn point(name: &str) {
    if let Some(kind) = eval(name) {
        inject(name, &kind);
    }
}

/// Whether fault point `name` asks for `return(corrupt)` (the caller damages its own
/// data); any other configured action happens here.
#[inline]
pub fn corrupts(name: &str) -> bool {
    match eval(name) {
        Some(kind) if kind == "corrupt" => true,
        Some(kind) => {
            inject(name, &kind);
            false
        }
        None => false,
    }
}

#[cfg(feature = "failpoints")]
fn eval(name: &str) -> Option<String> {
    fail::eval(name, |arg| arg.unwrap_or_default())
}

#[cfg(not(feature = "failpoints"))]
fn eval(_name: &str) -> Option<String> {
    None
}

/// Do what `return(KIND)` asked for.
pub fn inject(name: &str, kind: &str) {
    match kind {
        "abort" => std::process::abort(),
        "segv" => {
            // Rust's own SIGSEGV handler (stack-overflow detection) takes the first one,
            // finds no guard page hit, and puts the default action back: the second kills.
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSEGV);
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSEGV);
        }
        "hang" => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        "exit" => std::process::exit(70),
        _ => panic!("fault point {name}: {kind}"),
    }
}

/// Configure the fault points named in `FAILPOINTS` (a no-op without the feature). The
/// returned guard keeps them configured.
#[cfg(feature = "failpoints")]
pub fn setup() -> Option<fail::FailScenario<'static>> {
    let scenario = fail::FailScenario::setup();
    let attempt = std::env::var(super::ENV_ATTEMPT).unwrap_or_default();
    if let Ok(spec) = std::env::var(format!("FAILPOINTS_ATTEMPT_{attempt}")) {
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let configured = match part.split_once('=') {
                Some((name, actions)) => fail::cfg(name.trim(), actions.trim()),
                None => Err(format!("{part:?} is not NAME=ACTIONS")),
            };
            if let Err(e) = configured {
                eprintln!("ftvm: FAILPOINTS_ATTEMPT_{attempt}: {e}");
            }
        }
    }
    Some(scenario)
}

#[cfg(not(feature = "failpoints"))]
pub fn setup() -> Option<()> {
    None
}

/// Whether this build has fault points.
pub const ENABLED: bool = cfg!(feature = "failpoints");
