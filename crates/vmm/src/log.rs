//! The runtime's one way to tell the operator something: a line on standard error, with
//! the prefix that says who speaks. Verdicts never depend on these lines (STYLE.md:
//! verdicts are typed); they are for people.

use std::fmt::Display;
use std::io::Write;

/// Who speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The runtime itself: `ftvm: warning: …`.
    Warning,
    /// The primary's replication thread: `ftvm: replication: …`.
    Replication,
    /// The backup's waiting loop: `ftvm backup: …`.
    Backup,
}

/// Write one line (a failing stderr is ignored: there is nobody left to tell).
pub fn line(source: Source, message: impl Display) {
    let prefix = match source {
        Source::Warning => "ftvm: warning: ",
        Source::Replication => "ftvm: replication: ",
        Source::Backup => "ftvm backup: ",
    };
    let _ = writeln!(std::io::stderr().lock(), "{prefix}{message}");
}

pub fn warn(message: impl Display) {
    line(Source::Warning, message)
}
