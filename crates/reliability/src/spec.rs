//! Model files: named blocks and a system expression, in TOML or JSON.
//!
//! ```toml
//! system = "H * V * parallel(vm[3])"   # optional if given on the command line
//!
//! [blocks]
//! H    = 0.999          # a probability
//! V    = "1-1e-6"       # one minus an unreliability, exact near 1
//! f    = 0.99
//! rest = 0.95
//! vm   = "f * rest"     # a block defined by an expression over other blocks
//! ```
//!
//! The JSON form has the same two keys: `{"system": "...", "blocks": {"H": 0.999, ...}}`.
//! A block defined by an expression is evaluated once and each use of its name is an
//! independent instance of it.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::diagram::{Block, Env};
use crate::error::{ModelError, Result};
use crate::parse::is_block_name;
use crate::prob::Reliability;

/// The most named blocks a model may define.
pub const MAX_BLOCKS: usize = 1000;

/// The value of a named block.
#[derive(Clone, Debug, PartialEq)]
pub enum BlockDef {
    /// A reliability given directly.
    Value(Reliability),
    /// A diagram over other named blocks.
    Diagram(Block),
}

impl BlockDef {
    /// Reads a block's value: a probability (`0.99`, `1-1e-9`) or else an expression.
    pub fn parse(text: &str) -> Result<BlockDef> {
        match text.parse::<Reliability>() {
            Ok(r) => Ok(BlockDef::Value(r)),
            Err(ModelError::NotAProbability { .. }) => Block::parse(text).map(BlockDef::Diagram),
            Err(e) => Err(e),
        }
    }
}

/// A system diagram (optional) with its named blocks.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelSpec {
    /// The expression of the whole system, if the file gives one.
    pub system: Option<String>,
    /// The named blocks, in name order.
    pub blocks: BTreeMap<String, BlockDef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    system: Option<String>,
    #[serde(default)]
    blocks: BTreeMap<String, RawValue>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawValue {
    Number(f64),
    Text(String),
}

impl ModelSpec {
    /// Reads a model file, choosing JSON for a `.json` name and TOML otherwise.
    pub fn from_file_text(file_name: &str, text: &str) -> Result<ModelSpec> {
        if file_name.to_ascii_lowercase().ends_with(".json") {
            Self::from_json(file_name, text)
        } else {
            Self::from_toml(file_name, text)
        }
    }

    /// Reads the TOML form; `file_name` only labels errors.
    pub fn from_toml(file_name: &str, text: &str) -> Result<ModelSpec> {
        let raw: RawSpec = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| line_col(text, s.start)).unwrap_or_default();
            let message = e.message().trim().replace('\n', " ");
            ModelError::ModelFile { message: format!("{file_name}{at}: {message}") }
        })?;
        Self::from_raw(raw)
    }

    /// Reads the JSON form; `file_name` only labels errors.
    pub fn from_json(file_name: &str, text: &str) -> Result<ModelSpec> {
        let raw: RawSpec =
            serde_json::from_str(text).map_err(|e| ModelError::ModelFile { message: format!("{file_name}: {e}") })?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawSpec) -> Result<ModelSpec> {
        let mut spec = ModelSpec { system: raw.system, blocks: BTreeMap::new() };
        for (name, value) in raw.blocks {
            let def = match value {
                RawValue::Number(r) => Reliability::from_r(r).map(BlockDef::Value),
                RawValue::Text(text) => BlockDef::parse(&text),
            };
            spec.insert(&name, def)?;
        }
        Ok(spec)
    }

    /// Adds or replaces a block from `NAME=VALUE` text (as given on a command line).
    pub fn define(&mut self, assignment: &str) -> Result<()> {
        let Some((name, value)) = assignment.split_once('=') else {
            return Err(ModelError::Block {
                name: assignment.trim().to_string(),
                message: "write NAME=VALUE, e.g. M=0.9".into(),
            });
        };
        self.insert(name.trim(), BlockDef::parse(value))
    }

    fn insert(&mut self, name: &str, def: Result<BlockDef>) -> Result<()> {
        if !is_block_name(name) {
            return Err(ModelError::Block {
                name: name.to_string(),
                message:
                    "a block name is letters, digits and _, not starting with a digit, and not series, parallel or kofn"
                        .into(),
            });
        }
        let def = def.map_err(|e| ModelError::BlockValue { name: name.to_string(), source: Box::new(e) })?;
        if !self.blocks.contains_key(name) && self.blocks.len() >= MAX_BLOCKS {
            return Err(ModelError::TooLarge {
                what: "the number of blocks",
                value: MAX_BLOCKS as u64 + 1,
                max: MAX_BLOCKS as u64,
            });
        }
        self.blocks.insert(name.to_string(), def);
        Ok(())
    }

    /// The reliability of every named block, evaluating block expressions in dependency order.
    pub fn resolve(&self) -> Result<Env> {
        self.check_references()?;
        let mut env = Env::new();
        let mut stack = Vec::new();
        for name in self.blocks.keys() {
            self.resolve_one(name, &mut env, &mut stack)?;
        }
        Ok(env)
    }

    /// Every name used in an expression must be defined; said up front, with the full list.
    fn check_references(&self) -> Result<()> {
        for def in self.blocks.values() {
            if let BlockDef::Diagram(block) = def {
                self.check_names(block)?;
            }
        }
        Ok(())
    }

    /// Fails with [`ModelError::UnknownBlock`] if `block` uses a name this spec lacks.
    pub fn check_names(&self, block: &Block) -> Result<()> {
        match block.names().into_iter().find(|n| !self.blocks.contains_key(*n)) {
            None => Ok(()),
            Some(missing) => Err(ModelError::UnknownBlock { name: missing.to_string(), known: self.known() }),
        }
    }

    fn known(&self) -> String {
        if self.blocks.is_empty() {
            return "none; give values with --block NAME=R or a model file".into();
        }
        self.blocks.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
    }

    fn resolve_one(&self, name: &str, env: &mut Env, stack: &mut Vec<String>) -> Result<Reliability> {
        if let Some(r) = env.get(name) {
            return Ok(*r);
        }
        if let Some(at) = stack.iter().position(|n| n == name) {
            let mut chain: Vec<&str> = stack[at..].iter().map(String::as_str).collect();
            chain.push(name);
            return Err(ModelError::CyclicBlocks { chain: chain.join(" -> ") });
        }
        let value = match self.blocks.get(name) {
            None => return Err(ModelError::UnknownBlock { name: name.to_string(), known: self.known() }),
            Some(BlockDef::Value(r)) => *r,
            Some(BlockDef::Diagram(block)) => {
                stack.push(name.to_string());
                for dep in block.names() {
                    self.resolve_one(dep, env, stack)?;
                }
                stack.pop();
                block.evaluate(env)?
            }
        };
        env.insert(name.to_string(), value);
        Ok(value)
    }
}

/// " at line L, column C" for a byte offset into `text` (both 1-based).
fn line_col(text: &str, offset: usize) -> String {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!(" at line {line}, column {column}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
system = "H * V * parallel(vm[2])"
[blocks]
H = 0.999
V = "1-1e-6"
f = 0.9
rest = 0.8
vm = "f * rest"
"#;

    #[test]
    fn toml_with_nested_blocks_resolves() {
        let spec = ModelSpec::from_toml("m.toml", TOML).unwrap();
        let env = spec.resolve().unwrap();
        assert!((env["vm"].r() - 0.72).abs() < 1e-15);
        let system = Block::parse(spec.system.as_deref().unwrap()).unwrap().evaluate(&env).unwrap();
        let want = 0.999 * (1.0 - 1e-6) * (1.0 - 0.28f64 * 0.28);
        assert!((system.r() - want).abs() < 1e-15);
    }

    #[test]
    fn json_form_is_the_same() {
        let json = r#"{"system": "H * M", "blocks": {"H": 0.5, "M": "1-0.5"}}"#;
        let spec = ModelSpec::from_file_text("m.JSON", json).unwrap();
        assert!((Block::parse("H * M").unwrap().evaluate(&spec.resolve().unwrap()).unwrap().r() - 0.25).abs() < 1e-15);
    }

    #[test]
    fn cycles_are_reported_with_their_chain() {
        let spec = ModelSpec::from_toml("c.toml", "[blocks]\na = \"b * 0.9\"\nb = \"a\"\n").unwrap();
        assert_eq!(spec.resolve().unwrap_err().to_string(), "blocks refer to each other in a cycle: a -> b -> a");
    }

    #[test]
    fn unknown_reference_lists_defined_blocks() {
        let spec = ModelSpec::from_toml("u.toml", "[blocks]\na = \"b * c\"\nb = 0.9\n").unwrap();
        assert_eq!(spec.resolve().unwrap_err().to_string(), "unknown block `c` (defined: a, b)");
    }

    #[test]
    fn bad_values_name_the_block() {
        let chain = |err: ModelError| match &err {
            ModelError::BlockValue { source, .. } => format!("{err}: {source}"),
            _ => panic!("a block's bad value is a BlockValue error: {err}"),
        };
        let err = ModelSpec::from_toml("b.toml", "[blocks]\nM = 1.5\n").unwrap_err();
        assert_eq!(chain(err), "block `M`: probability 1.5 is outside [0, 1]");
        let err = ModelSpec::from_toml("b.toml", "[blocks]\nM = \"a +\"\n").unwrap_err();
        assert_eq!(chain(err), "block `M`: malformed expression at column 3: unexpected character `+`");
    }

    #[test]
    fn malformed_files_give_one_line_with_position() {
        let err = ModelSpec::from_toml("x.toml", "[blocks]\nM = \n").unwrap_err().to_string();
        assert!(err.starts_with("x.toml at line 2, column"), "{err}");
        assert!(!err.contains('\n'));
        let err = ModelSpec::from_toml("x.toml", "sytem = \"a\"\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `sytem`"), "{err}");
        let err = ModelSpec::from_json("x.json", "{\"blocks\": [}").unwrap_err().to_string();
        assert!(err.starts_with("x.json: ") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn define_from_command_line() {
        let mut spec = ModelSpec::default();
        spec.define("M=0.9").unwrap();
        spec.define(" N = M | M ").unwrap();
        assert!((spec.resolve().unwrap()["N"].q() - 0.01).abs() < 1e-15);
        assert!(spec.define("M").is_err());
        assert!(spec.define("series=0.9").is_err());
    }
}
