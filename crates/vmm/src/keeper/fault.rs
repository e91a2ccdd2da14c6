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
//! `replicate::send` (replication sends).

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
    Some(fail::FailScenario::setup())
}

#[cfg(not(feature = "failpoints"))]
pub fn setup() -> Option<()> {
    None
}

/// Whether this build has fault points.
pub const ENABLED: bool = cfg!(feature = "failpoints");
