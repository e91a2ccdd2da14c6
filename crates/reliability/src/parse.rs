//! The block-diagram expression language.
//!
//! ```text
//! expr     := product ( '|' product )*          parallel: works if any side works
//! product  := primary ( '*' primary )*          series:   works if every side works
//! primary  := NAME | NUMBER | '(' expr ')'
//!           | 'series' '(' args ')' | 'parallel' '(' args ')'
//!           | 'kofn' '(' INTEGER ',' args ')'
//! args     := arg ( ',' arg )*
//! arg      := expr | primary '[' INTEGER ']'     NAME[3]: three independent copies
//! NAME     := [A-Za-z_][A-Za-z0-9_]*  (not series, parallel, kofn)
//! NUMBER   := a decimal probability in [0, 1], e.g. 0.999
//! ```
//!
//! `*` binds tighter than `|`, as in arithmetic: `H * V * (M | M)`.

use crate::diagram::{Block, Operand};
use crate::error::{ModelError, Result};
use crate::prob::Reliability;

/// The longest expression accepted.
pub const MAX_EXPR_BYTES: usize = 64 * 1024;
/// The deepest nesting of parentheses and gates accepted.
pub const MAX_DEPTH: usize = 64;

const KEYWORDS: [&str; 3] = ["series", "parallel", "kofn"];

/// Whether `name` can name a block.
pub fn is_block_name(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') && !KEYWORDS.contains(&name)
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Name(String),
    Number(String),
    Open,
    Close,
    OpenBracket,
    CloseBracket,
    Comma,
    Star,
    Bar,
    End,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Name(n) => format!("`{n}`"),
            Tok::Number(n) => format!("`{n}`"),
            Tok::Open => "`(`".into(),
            Tok::Close => "`)`".into(),
            Tok::OpenBracket => "`[`".into(),
            Tok::CloseBracket => "`]`".into(),
            Tok::Comma => "`,`".into(),
            Tok::Star => "`*`".into(),
            Tok::Bar => "`|`".into(),
            Tok::End => "the end".into(),
        }
    }
}

/// Tokens with their 1-based column.
fn lex(text: &str) -> Result<Vec<(Tok, usize)>> {
    let chars: Vec<char> = text.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let column = i + 1;
        let single = match c {
            '(' => Some(Tok::Open),
            ')' => Some(Tok::Close),
            '[' => Some(Tok::OpenBracket),
            ']' => Some(Tok::CloseBracket),
            ',' => Some(Tok::Comma),
            '*' => Some(Tok::Star),
            '|' => Some(Tok::Bar),
            _ => None,
        };
        if let Some(tok) = single {
            toks.push((tok, column));
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            toks.push((Tok::Name(chars[start..i].iter().collect()), column));
        } else if c.is_ascii_digit() || c == '.' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.' || is_exp_sign(&chars, i)) {
                i += 1;
            }
            toks.push((Tok::Number(chars[start..i].iter().collect()), column));
        } else {
            return Err(error(column, format!("unexpected character `{c}`")));
        }
    }
    toks.push((Tok::End, chars.len() + 1));
    Ok(toks)
}

/// A sign right after the `e` of an exponent belongs to the number (`1e-3`).
fn is_exp_sign(chars: &[char], i: usize) -> bool {
    (chars[i] == '-' || chars[i] == '+') && i > 0 && matches!(chars[i - 1], 'e' | 'E')
}

fn error(column: usize, message: String) -> ModelError {
    ModelError::Parse { column, message }
}

/// Parses a block-diagram expression.
pub fn parse(text: &str) -> Result<Block> {
    if text.len() > MAX_EXPR_BYTES {
        return Err(ModelError::TooLarge {
            what: "the expression length in bytes",
            value: text.len() as u64,
            max: MAX_EXPR_BYTES as u64,
        });
    }
    let toks = lex(text)?;
    let mut parser = Parser { toks, pos: 0, depth: 0 };
    let (block, _) = parser.expr()?;
    match parser.peek() {
        Tok::End => Ok(block),
        Tok::OpenBracket => {
            Err(parser.here("copies `[n]` are only allowed as an argument of series(), parallel() or kofn()"))
        }
        other => {
            let found = other.describe();
            Err(parser.here(&format!("expected `*`, `|` or the end, found {found}")))
        }
    }
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        // lex always ends the list with Tok::End, and the parser never moves past it.
        &self.toks[self.pos.min(self.toks.len() - 1)].0
    }

    fn column(&self) -> usize {
        self.toks[self.pos.min(self.toks.len() - 1)].1
    }

    fn here(&self, message: &str) -> ModelError {
        error(self.column(), message.to_string())
    }

    fn advance(&mut self) -> Tok {
        let tok = self.peek().clone();
        if tok != Tok::End {
            self.pos += 1;
        }
        tok
    }

    fn expect(&mut self, want: Tok) -> Result<()> {
        if *self.peek() == want {
            self.advance();
            Ok(())
        } else {
            let found = self.peek().describe();
            Err(self.here(&format!("expected {}, found {found}", want.describe())))
        }
    }

    /// Returns the block and whether it was a single primary (so `[n]` may follow it).
    fn expr(&mut self) -> Result<(Block, bool)> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.here(&format!("nested deeper than {MAX_DEPTH} levels")));
        }
        let (first, single) = self.product()?;
        let mut alternatives = vec![Operand::one(first)];
        while *self.peek() == Tok::Bar {
            self.advance();
            alternatives.push(Operand::one(self.product()?.0));
        }
        self.depth -= 1;
        if alternatives.len() == 1 {
            let only = alternatives.remove(0).block;
            return Ok((only, single));
        }
        Ok((Block::Parallel(alternatives), false))
    }

    fn product(&mut self) -> Result<(Block, bool)> {
        let first = self.primary()?;
        let mut factors = vec![Operand::one(first)];
        while *self.peek() == Tok::Star {
            self.advance();
            factors.push(Operand::one(self.primary()?));
        }
        if factors.len() == 1 {
            return Ok((factors.remove(0).block, true));
        }
        Ok((Block::Series(factors), false))
    }

    fn primary(&mut self) -> Result<Block> {
        let column = self.column();
        match self.advance() {
            Tok::Name(name) if KEYWORDS.contains(&name.as_str()) => self.gate(&name),
            Tok::Name(name) => Ok(Block::Named(name)),
            Tok::Number(text) => {
                let r: f64 = text.parse().map_err(|_| error(column, format!("`{text}` is not a number")))?;
                Reliability::from_r(r).map(Block::Literal).map_err(|e| error(column, e.to_string()))
            }
            Tok::Open => {
                let (inner, _) = self.expr()?;
                self.expect(Tok::Close)?;
                Ok(inner)
            }
            other => {
                Err(error(column, format!("expected a block name, a probability or `(`, found {}", other.describe())))
            }
        }
    }

    fn gate(&mut self, keyword: &str) -> Result<Block> {
        self.expect(Tok::Open)?;
        let k = if keyword == "kofn" {
            let k = self.integer("k of kofn(k, ...)")?;
            self.expect(Tok::Comma)?;
            Some(k)
        } else {
            None
        };
        let mut inputs = vec![self.arg()?];
        while *self.peek() == Tok::Comma {
            self.advance();
            inputs.push(self.arg()?);
        }
        self.expect(Tok::Close)?;
        Ok(match (keyword, k) {
            ("series", _) => Block::Series(inputs),
            ("parallel", _) => Block::Parallel(inputs),
            (_, k) => Block::KofN { k: k.unwrap_or(1), inputs },
        })
    }

    fn arg(&mut self) -> Result<Operand> {
        let (block, single) = self.expr()?;
        if *self.peek() != Tok::OpenBracket {
            return Ok(Operand::one(block));
        }
        if !single {
            return Err(self.here("copies `[n]` apply to one block or a parenthesized group; write (a * b)[n]"));
        }
        self.advance();
        let column = self.column();
        let copies = self.integer("the number of copies in [n]")?;
        if copies == 0 {
            return Err(error(column, "the number of copies in [n] must be at least 1".into()));
        }
        self.expect(Tok::CloseBracket)?;
        Ok(Operand { block, copies })
    }

    fn integer(&mut self, what: &str) -> Result<u64> {
        let column = self.column();
        match self.advance() {
            Tok::Number(text) => {
                text.parse::<u64>().map_err(|_| error(column, format!("{what} must be a whole number, found `{text}`")))
            }
            other => Err(error(column, format!("{what} must be a whole number, found {}", other.describe()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(n: &str) -> Operand {
        Operand::one(Block::Named(n.into()))
    }

    #[test]
    fn star_binds_tighter_than_bar() {
        let got = parse("a * b | c").unwrap();
        let want = Block::Parallel(vec![Operand::one(Block::Series(vec![named("a"), named("b")])), named("c")]);
        assert_eq!(got, want);
    }

    #[test]
    fn gates_and_copies() {
        let got = parse("kofn(2, M[3])").unwrap();
        let want = Block::KofN { k: 2, inputs: vec![Operand { block: Block::Named("M".into()), copies: 3 }] };
        assert_eq!(got, want);
        let grouped = parse("parallel((f * r)[2], x)").unwrap();
        assert!(matches!(grouped, Block::Parallel(ref v) if v[0].copies == 2 && v.len() == 2));
    }

    #[test]
    fn literals_are_probabilities() {
        assert_eq!(parse("0.5").unwrap(), Block::Literal(Reliability::from_r(0.5).unwrap()));
        assert_eq!(parse("1e-3").unwrap(), Block::Literal(Reliability::from_r(1e-3).unwrap()));
    }

    #[test]
    fn errors_name_the_column_and_problem() {
        let cases = [
            ("H * (V", "malformed expression at column 7: expected `)`, found the end"),
            ("H * ", "malformed expression at column 5: expected a block name, a probability or `(`, found the end"),
            ("H + V", "malformed expression at column 3: unexpected character `+`"),
            ("H * 1.5", "malformed expression at column 5: probability 1.5 is outside [0, 1]"),
            ("M[3]", "malformed expression at column 2: copies `[n]` are only allowed as an argument of series(), parallel() or kofn()"),
            ("parallel(a * b[2])", "malformed expression at column 15: copies `[n]` apply to one block or a parenthesized group; write (a * b)[n]"),
            ("kofn(x, a)", "malformed expression at column 6: k of kofn(k, ...) must be a whole number, found `x`"),
            ("parallel(a[0])", "malformed expression at column 12: the number of copies in [n] must be at least 1"),
            ("a b", "malformed expression at column 3: expected `*`, `|` or the end, found `b`"),
            ("", "malformed expression at column 1: expected a block name, a probability or `(`, found the end"),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text).unwrap_err().to_string(), want, "for {text:?}");
        }
    }

    #[test]
    fn deep_nesting_is_refused() {
        let text = format!("{}a{}", "(".repeat(100), ")".repeat(100));
        assert!(parse(&text).unwrap_err().to_string().contains("nested deeper than 64"));
    }

    #[test]
    fn block_names() {
        assert!(is_block_name("M_1"));
        assert!(!is_block_name("1M"));
        assert!(!is_block_name("kofn"));
        assert!(!is_block_name(""));
    }
}
