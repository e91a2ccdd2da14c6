//! What can be wrong with an input log, each error naming the byte offset or the image.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum JournalError {
    #[error("not an ftvm input log: {}", describe_start(found))]
    NotALog { found: Vec<u8> },
    #[error("input log format version {found}; this ftvm reads version {supported}")]
    OtherVersion { found: u32, supported: u32 },
    #[error("the log is cut short at byte {offset}: the {what} there lacks {missing} bytes")]
    Truncated { offset: u64, what: &'static str, missing: u64 },
    #[error("corrupt record at byte {offset}: {problem}")]
    Corrupt { offset: u64, problem: String },
    #[error("malformed {what} record at byte {offset}")]
    Malformed {
        offset: u64,
        what: &'static str,
        #[source]
        source: bounded_reader::ReadError,
    },
    #[error("the log was recorded with another {image}: {problem}")]
    OtherImage { image: &'static str, problem: String },
    #[error("cannot read {what}")]
    Read {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the input log")]
    Write(#[source] std::io::Error),
    #[error("cannot record this run: {0}")]
    Unrecordable(String),
}

fn describe_start(found: &[u8]) -> String {
    match found {
        [] => "the file is empty".to_string(),
        found => format!("it starts with {found:02x?}, not \"FTVMILOG\""),
    }
}

pub type Result<T, E = JournalError> = std::result::Result<T, E>;
