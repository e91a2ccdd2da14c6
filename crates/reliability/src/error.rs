//! The one error type of the crate. Every message is a single line that names the input at
//! fault; a variant that wraps another error names only its own part and carries the
//! other as its `source`, so a front end prints the chain (anyhow's `{:#}`).

use thiserror::Error;

/// Why a model could not be built or evaluated.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ModelError {
    /// A probability was given outside [0, 1] (or as NaN).
    #[error("probability {value} is outside [0, 1]")]
    ProbabilityOutOfRange { value: f64 },

    /// Text that should have been a probability was not a number.
    #[error("`{text}` is not a probability (write e.g. 0.999, or 1-1e-9 for one very close to 1)")]
    NotAProbability { text: String },

    /// A count that must be positive (replicas, voters, copies) was zero.
    #[error("{what} must be at least 1")]
    ZeroCount { what: &'static str },

    /// The k of a k-of-n vote was outside 1..=n.
    #[error("k-of-n needs 1 <= k <= n, got k = {k}, n = {n}")]
    KOutOfRange { k: u64, n: u64 },

    /// A size limit that protects the evaluator from huge inputs was exceeded.
    #[error("{what} is {value}, above the limit of {max}")]
    TooLarge { what: &'static str, value: u64, max: u64 },

    /// Two inputs that must agree in length do not.
    #[error("{what}")]
    Mismatch { what: String },

    /// A block-diagram expression could not be parsed.
    #[error("malformed expression at column {column}: {message}")]
    Parse { column: usize, message: String },

    /// An expression names a block that has no value.
    #[error("unknown block `{name}` (defined: {known})")]
    UnknownBlock { name: String, known: String },

    /// Named blocks refer to each other in a loop.
    #[error("blocks refer to each other in a cycle: {chain}")]
    CyclicBlocks { chain: String },

    /// A named block's own value is wrong; `message` says how.
    #[error("block `{name}`: {message}")]
    Block { name: String, message: String },

    /// A named block's value is wrong; the source says how.
    #[error("block `{name}`")]
    BlockValue { name: String, source: Box<ModelError> },

    /// A model file (TOML or JSON) is not in the documented format.
    #[error("{message}")]
    ModelFile { message: String },

    /// A fault-injection results file is not in the documented format.
    #[error("results file: {message}")]
    ResultsFile { message: String },

    /// A duration or failure rate could not be read.
    #[error("`{text}` is not a {what} ({hint})")]
    BadQuantity { text: String, what: &'static str, hint: &'static str },

    /// A figure could not be drawn.
    #[error("plot: {message}")]
    Plot { message: String },

    /// An availability input is missing or out of range.
    #[error("{message}")]
    Availability { message: String },
}

/// Results of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
