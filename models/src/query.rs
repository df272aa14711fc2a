//! The twin query language: what users type to find twins, e.g.
//! `type = press and (oee < 0.6 or alarm = active)` or `path ~ "acme/berlin/**" and quality != good`.
//!
//! ```text
//! expr  := and ('or' and)*
//! and   := unary ('and' unary)*
//! unary := 'not' unary | '(' expr ')' | cmp
//! cmp   := ident op literal
//! op    := = | != | < | <= | > | >= | ~
//! ```
//!
//! Keywords (`and`, `or`, `not`, `true`, `false`) are case-insensitive. A literal is a number
//! (`80`, `-0.5`, `1e3`), `true`/`false`, a double-quoted string (escapes `\"` and `\\`), or a bare
//! word (`sensor`, `press-3`, `acme/berlin/**`). `~` takes a path glob (see [`crate::glob`]),
//! parsed with the query.
//!
//! Evaluation against a [`Subject`]:
//! - A field the subject does not have makes the comparison false, whatever the operator: both
//!   `x = 1` and `x != 1` are false when `x` is missing, so `not x = 1` is true for it.
//! - A number field compares numerically with a number literal; NaN never matches. Against a bare
//!   word it compares with the number [`Subject::ordinal`] gives for that word (so `severity >=
//!   high` works when the subject ranks severities), and is false if there is none.
//! - A text field compares with any literal's text: `=`/`!=` exactly, `<`..`>=` byte-wise
//!   lexicographically, `~` as a path glob. A number literal compares as it was spelt, so `name =
//!   42` finds the asset named `42`.
//! - A bool field compares with `true`/`false` by `=` and `!=` only.
//! - Anything else (a type mismatch) is false, not an error.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;

use crate::glob::PathGlob;

/// Longest query text accepted: queries come from users over gRPC and HTTP.
pub const MAX_QUERY_BYTES: usize = 4096;
/// Deepest nesting of parentheses and `not`; bounds the parser's and evaluator's recursion.
pub const MAX_NESTING_DEPTH: usize = 32;
/// Most comparisons in one query; bounds the cost of evaluating it against every twin.
pub const MAX_COMPARISONS: usize = 64;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("query: at position {position}: {message}")]
pub struct QueryError {
    /// 0-based byte offset into the query text.
    pub position: usize,
    pub message: String,
}

/// A value a subject exposes for a field.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue<'a> {
    Num(f64),
    Text(Cow<'a, str>),
    Bool(bool),
}

/// Anything a query can be evaluated against (the runtime implements it over twin snapshots).
pub trait Subject {
    fn field(&self, name: &str) -> Option<FieldValue<'_>>;

    /// The number `word` stands for in the ordered number field `field` (e.g. severity `high` →
    /// 3), so that `severity >= high` can compare. `None` (the default) makes a comparison of a
    /// number field with that word false.
    fn ordinal(&self, field: &str, word: &str) -> Option<f64> {
        let _ = (field, word);
        None
    }
}

/// A parsed query. `Display` renders it canonically; parsing that text gives the same query.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    expr: Expr,
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    /// At least two terms, none of them an `Or` (nested ones are flattened).
    Or(Vec<Expr>),
    /// At least two terms, none of them an `And`.
    And(Vec<Expr>),
    Not(Box<Expr>),
    Cmp(Comparison),
}

#[derive(Debug, Clone)]
struct Comparison {
    field: String,
    op: Op,
    value: Literal,
    /// Byte offset of the field name in the query text (for `Query::check`'s errors); not
    /// part of the query's meaning.
    pos: usize,
}

impl PartialEq for Comparison {
    fn eq(&self, other: &Comparison) -> bool {
        (&self.field, self.op, &self.value) == (&other.field, other.op, &other.value)
    }
}

/// What a field of a [`Subject`] holds, for [`Query::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    Number,
    /// A number also compared with these words, in rank order (`severity >= high`).
    Ranked(&'static [&'static str]),
    /// Free text: compares with any literal's text, `~` as a path glob.
    Text,
    /// Text of a closed set of words, compared by `=` and `!=` only.
    Words(&'static [&'static str]),
    Bool,
}

/// The fields a query may name, for [`Query::check`].
pub trait Schema {
    /// The kind of `field`; `None`: no such field.
    fn kind_of(&self, field: &str) -> Option<FieldKind>;
    /// The field names, for the message naming an unknown one.
    fn known(&self) -> String;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Glob,
}

#[derive(Debug, Clone, PartialEq)]
enum Literal {
    /// A bare number; `text` is its spelling, used against text fields and by `Display`.
    Number {
        value: f64,
        text: String,
    },
    Bool(bool),
    /// A bare word that is not a number, boolean or keyword.
    Word(String),
    /// A quoted string, unescaped.
    Text(String),
    /// The right side of `~`, whether written bare or quoted.
    Glob(PathGlob),
}

impl Query {
    pub fn parse(text: &str) -> Result<Query, QueryError> {
        if text.len() > MAX_QUERY_BYTES {
            return Err(QueryError {
                position: MAX_QUERY_BYTES,
                message: format!(
                    "query is {} bytes; at most {MAX_QUERY_BYTES} are allowed",
                    text.len()
                ),
            });
        }
        let mut parser = Parser {
            lexer: Lexer { text, pos: 0 },
            peeked: None,
            comparisons: 0,
        };
        let expr = parser.parse_or(0)?;
        let end = parser.bump()?;
        match end.tok {
            Tok::End => Ok(Query { expr }),
            Tok::RParen => Err(QueryError {
                position: end.pos,
                message: "found \")\" without a matching \"(\"".to_string(),
            }),
            _ => Err(expected("\"and\", \"or\" or end of query", &end)),
        }
    }

    /// True if `subject` satisfies the query (see the module docs for missing fields and types).
    pub fn matches(&self, subject: &dyn Subject) -> bool {
        self.expr.matches(subject)
    }

    /// If the query is a conjunction that pins `level = X` at top level, that level name (lets the
    /// runtime narrow its scan). Otherwise None. Narrowing is sound: every match has that level.
    pub fn pinned_level(&self) -> Option<&str> {
        self.conjuncts().iter().find_map(|term| match term {
            Expr::Cmp(Comparison {
                field,
                op: Op::Eq,
                value: Literal::Word(level) | Literal::Text(level),
                ..
            }) if field == "level" => Some(level.as_str()),
            _ => None,
        })
    }

    /// If the query pins `path ~ GLOB` at top level (conjunction), the glob (for narrowing).
    /// Otherwise None.
    pub fn pinned_path_glob(&self) -> Option<&PathGlob> {
        self.conjuncts().iter().find_map(|term| match term {
            Expr::Cmp(Comparison {
                field,
                op: Op::Glob,
                value: Literal::Glob(glob),
                ..
            }) if field == "path" => Some(glob),
            _ => None,
        })
    }

    /// Checks every comparison against `schema`, so nonsense is an error, not an empty
    /// answer: the field must exist; a number field takes a number (or, when ranked, one of
    /// its words; `NaN` and `inf` are words, never numbers); a word field takes one of its
    /// words by `=` or `!=`; a bool field `true` or `false` by `=` or `!=`; `~` needs a text
    /// field.
    pub fn check(&self, schema: &dyn Schema) -> Result<(), QueryError> {
        self.expr.check(schema)
    }

    /// The terms every match must satisfy: those of a top-level `and`, or the whole query.
    fn conjuncts(&self) -> &[Expr] {
        match &self.expr {
            Expr::And(terms) => terms,
            other => std::slice::from_ref(other),
        }
    }
}

impl Expr {
    fn check(&self, schema: &dyn Schema) -> Result<(), QueryError> {
        match self {
            Expr::Or(terms) | Expr::And(terms) => terms.iter().try_for_each(|t| t.check(schema)),
            Expr::Not(term) => term.check(schema),
            Expr::Cmp(cmp) => cmp.check(schema),
        }
    }

    fn matches(&self, subject: &dyn Subject) -> bool {
        match self {
            Expr::Or(terms) => terms.iter().any(|t| t.matches(subject)),
            Expr::And(terms) => terms.iter().all(|t| t.matches(subject)),
            Expr::Not(term) => !term.matches(subject),
            Expr::Cmp(cmp) => cmp.matches(subject),
        }
    }
}

impl Comparison {
    fn check(&self, schema: &dyn Schema) -> Result<(), QueryError> {
        let field = &self.field;
        let err = |message: String| {
            Err(QueryError {
                position: self.pos,
                message,
            })
        };
        let Some(kind) = schema.kind_of(field) else {
            return err(format!(
                "unknown field {:?}; fields: {}",
                crate::asset::quote_prefix(field),
                schema.known()
            ));
        };
        let literal = || crate::asset::quote_prefix(&self.value.to_string());
        let field = &crate::asset::quote_prefix(field);
        let equality = matches!(self.op, Op::Eq | Op::Ne);
        match (kind, &self.value) {
            (FieldKind::Text, _) => Ok(()),
            (_, Literal::Glob(_)) => err(format!(
                "{field} is not a text field: ~ (a path glob) does not apply"
            )),
            (FieldKind::Number | FieldKind::Ranked(_), Literal::Number { .. }) => Ok(()),
            (FieldKind::Ranked(words), Literal::Word(w)) => {
                if words.contains(&w.as_str()) {
                    Ok(())
                } else {
                    err(format!(
                        "{field} takes a number or one of {}; found {}",
                        words.join(", "),
                        literal()
                    ))
                }
            }
            (FieldKind::Number | FieldKind::Ranked(_), _) => err(format!(
                "{field} is a number; {} is not a number (NaN and inf are not allowed)",
                literal()
            )),
            (FieldKind::Words(words), Literal::Word(w) | Literal::Text(w)) if equality => {
                if words.contains(&w.as_str()) {
                    Ok(())
                } else {
                    err(format!(
                        "{field} is one of {}; found {}",
                        words.join(", "),
                        literal()
                    ))
                }
            }
            (FieldKind::Words(words), _) => err(format!(
                "{field} is one of {} and compares by = or != only; found {} {}",
                words.join(", "),
                self.op.as_str(),
                literal()
            )),
            (FieldKind::Bool, Literal::Bool(_)) if equality => Ok(()),
            (FieldKind::Bool, _) => err(format!(
                "{field} is true or false and compares by = or != only; found {} {}",
                self.op.as_str(),
                literal()
            )),
        }
    }

    fn matches(&self, subject: &dyn Subject) -> bool {
        let Some(field) = subject.field(&self.field) else {
            return false;
        };
        match (&field, &self.value) {
            (FieldValue::Text(text), Literal::Glob(glob)) => glob.matches(text),
            (_, Literal::Glob(_)) => false,
            (FieldValue::Num(x), Literal::Number { value, .. }) => self.op.holds_num(*x, *value),
            (FieldValue::Num(x), Literal::Word(word)) => subject
                .ordinal(&self.field, word)
                .is_some_and(|value| self.op.holds_num(*x, value)),
            (FieldValue::Text(text), literal) => literal
                .as_text()
                .is_some_and(|l| self.op.holds(text.as_ref().cmp(l))),
            (FieldValue::Bool(b), Literal::Bool(l)) => match self.op {
                Op::Eq => b == l,
                Op::Ne => b != l,
                _ => false,
            },
            _ => false,
        }
    }
}

impl Op {
    fn holds(self, ordering: Ordering) -> bool {
        match self {
            Op::Eq => ordering == Ordering::Equal,
            Op::Ne => ordering != Ordering::Equal,
            Op::Lt => ordering == Ordering::Less,
            Op::Le => ordering != Ordering::Greater,
            Op::Gt => ordering == Ordering::Greater,
            Op::Ge => ordering != Ordering::Less,
            Op::Glob => false,
        }
    }

    /// NaN on either side never matches, not even `!=`.
    fn holds_num(self, x: f64, y: f64) -> bool {
        x.partial_cmp(&y).is_some_and(|o| self.holds(o))
    }

    fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Glob => "~",
        }
    }
}

impl Literal {
    /// The literal as text, for comparing with a text field.
    fn as_text(&self) -> Option<&str> {
        match self {
            Literal::Number { text, .. } | Literal::Word(text) | Literal::Text(text) => Some(text),
            Literal::Bool(true) => Some("true"),
            Literal::Bool(false) => Some("false"),
            Literal::Glob(_) => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, PartialEq)]
enum Tok<'a> {
    LParen,
    RParen,
    Op(Op),
    /// A run of word characters: field name, keyword, number or bare word; the parser decides.
    Word(&'a str),
    /// A quoted string, unescaped.
    Str(String),
    End,
}

#[derive(Debug, Clone, PartialEq)]
struct Token<'a> {
    tok: Tok<'a>,
    pos: usize,
}

struct Lexer<'a> {
    text: &'a str,
    pos: usize,
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '*' | '?' | '/' | '-' | '+')
}

impl<'a> Lexer<'a> {
    fn next_token(&mut self) -> Result<Token<'a>, QueryError> {
        let rest = &self.text[self.pos..];
        let skipped = rest.len() - rest.trim_start().len();
        self.pos += skipped;
        let start = self.pos;
        let Some(c) = self.text[start..].chars().next() else {
            return Ok(Token {
                tok: Tok::End,
                pos: start,
            });
        };
        let next = self.text[start + c.len_utf8()..].chars().next();
        let (tok, len) = match (c, next) {
            ('(', _) => (Tok::LParen, 1),
            (')', _) => (Tok::RParen, 1),
            ('=', _) => (Tok::Op(Op::Eq), 1),
            ('~', _) => (Tok::Op(Op::Glob), 1),
            ('!', Some('=')) => (Tok::Op(Op::Ne), 2),
            ('<', Some('=')) => (Tok::Op(Op::Le), 2),
            ('<', _) => (Tok::Op(Op::Lt), 1),
            ('>', Some('=')) => (Tok::Op(Op::Ge), 2),
            ('>', _) => (Tok::Op(Op::Gt), 1),
            ('!', _) => {
                return Err(QueryError {
                    position: start,
                    message: "unexpected character '!'; did you mean \"!=\" or \"not\"?"
                        .to_string(),
                });
            }
            ('"', _) => return self.string(start),
            (c, _) if is_word_char(c) => {
                let len = self.text[start..]
                    .find(|c: char| !is_word_char(c))
                    .unwrap_or(self.text.len() - start);
                (Tok::Word(&self.text[start..start + len]), len)
            }
            (c, _) => {
                return Err(QueryError {
                    position: start,
                    message: format!("unexpected character {c:?}"),
                });
            }
        };
        self.pos += len;
        Ok(Token { tok, pos: start })
    }

    /// A string whose opening quote is at `start`.
    fn string(&mut self, start: usize) -> Result<Token<'a>, QueryError> {
        let unterminated = || QueryError {
            position: start,
            message: "unterminated string starting here".to_string(),
        };
        let mut out = String::new();
        let mut chars = self.text[start + 1..].char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos = start + 1 + i + 1;
                    return Ok(Token {
                        tok: Tok::Str(out),
                        pos: start,
                    });
                }
                '\\' => match chars.next() {
                    Some((_, e @ ('"' | '\\'))) => out.push(e),
                    Some((_, e)) => {
                        return Err(QueryError {
                            position: start + 1 + i,
                            message: format!(
                                "unknown escape \"\\{e}\" in string; only \\\" and \\\\ are allowed"
                            ),
                        });
                    }
                    None => return Err(unterminated()),
                },
                c => out.push(c),
            }
        }
        Err(unterminated())
    }
}

// ---------------------------------------------------------------------------------------------
// Parser

struct Parser<'a> {
    lexer: Lexer<'a>,
    peeked: Option<Token<'a>>,
    comparisons: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Keyword {
    And,
    Or,
    Not,
}

fn keyword(word: &str) -> Option<Keyword> {
    [
        ("and", Keyword::And),
        ("or", Keyword::Or),
        ("not", Keyword::Not),
    ]
    .into_iter()
    .find(|(k, _)| word.eq_ignore_ascii_case(k))
    .map(|(_, kw)| kw)
}

/// `[A-Za-z_][A-Za-z0-9_.-]*`
fn is_ident(word: &str) -> bool {
    let mut chars = word.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// `[A-Za-z0-9_*?][A-Za-z0-9_.*?/-]*`: slug-like, and may start with a glob wildcard.
fn is_bare_word(word: &str) -> bool {
    let mut chars = word.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '*' | '?'))
        && chars
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '*' | '?' | '/' | '-'))
}

/// `-?(digits[.digits?] | .digits)([eE][+-]?digits)?`; stricter than `f64::from_str`, which would
/// also take `inf`, `nan` and `+1` (those stay words).
fn is_number(word: &str) -> bool {
    let b = word.as_bytes();
    let digits_from = |mut i: usize| {
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    let mut i = usize::from(b.first() == Some(&b'-'));
    let int_end = digits_from(i);
    let mut mantissa_digits = int_end - i;
    i = int_end;
    if b.get(i) == Some(&b'.') {
        let frac_end = digits_from(i + 1);
        mantissa_digits += frac_end - (i + 1);
        i = frac_end;
    }
    if mantissa_digits == 0 {
        return false;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let exp_end = digits_from(i);
        if exp_end == i {
            return false;
        }
        i = exp_end;
    }
    i == b.len()
}

fn describe(tok: &Tok<'_>) -> String {
    match tok {
        Tok::LParen => "\"(\"".to_string(),
        Tok::RParen => "\")\"".to_string(),
        Tok::Op(op) => format!("\"{}\"", op.as_str()),
        Tok::Word(word) => match keyword(word) {
            Some(_) => format!("keyword {word:?}"),
            None => format!("{word:?}"),
        },
        Tok::Str(s) => format!("string {s:?}"),
        Tok::End => "end of query".to_string(),
    }
}

/// "expected `what`, found …" at `token`, or "unexpected end of query, expected `what`".
fn expected(what: &str, token: &Token<'_>) -> QueryError {
    let message = match token.tok {
        Tok::End => format!("unexpected end of query, expected {what}"),
        ref tok => format!("expected {what}, found {}", describe(tok)),
    };
    QueryError {
        position: token.pos,
        message,
    }
}

impl<'a> Parser<'a> {
    fn peek(&mut self) -> Result<&Token<'a>, QueryError> {
        if self.peeked.is_none() {
            self.peeked = Some(self.lexer.next_token()?);
        }
        Ok(self.peeked.as_ref().expect("just filled"))
    }

    fn bump(&mut self) -> Result<Token<'a>, QueryError> {
        match self.peeked.take() {
            Some(token) => Ok(token),
            None => self.lexer.next_token(),
        }
    }

    /// Consumes the next token if it is `kw`.
    fn eat_keyword(&mut self, kw: Keyword) -> Result<bool, QueryError> {
        let found = matches!(self.peek()?.tok, Tok::Word(w) if keyword(w) == Some(kw));
        if found {
            self.bump()?;
        }
        Ok(found)
    }

    fn parse_or(&mut self, depth: usize) -> Result<Expr, QueryError> {
        let mut terms = vec![self.parse_and(depth)?];
        while self.eat_keyword(Keyword::Or)? {
            terms.push(self.parse_and(depth)?);
        }
        Ok(combine(terms, Expr::Or, |e| match e {
            Expr::Or(inner) => Ok(inner),
            other => Err(other),
        }))
    }

    fn parse_and(&mut self, depth: usize) -> Result<Expr, QueryError> {
        let mut terms = vec![self.parse_unary(depth)?];
        while self.eat_keyword(Keyword::And)? {
            terms.push(self.parse_unary(depth)?);
        }
        Ok(combine(terms, Expr::And, |e| match e {
            Expr::And(inner) => Ok(inner),
            other => Err(other),
        }))
    }

    fn parse_unary(&mut self, depth: usize) -> Result<Expr, QueryError> {
        let token = self.bump()?;
        let nest = |pos| {
            if depth >= MAX_NESTING_DEPTH {
                Err(QueryError {
                    position: pos,
                    message: format!(
                        "nesting deeper than {MAX_NESTING_DEPTH} levels of parentheses and \"not\""
                    ),
                })
            } else {
                Ok(depth + 1)
            }
        };
        match token.tok {
            Tok::Word(word) if keyword(word) == Some(Keyword::Not) => {
                let depth = nest(token.pos)?;
                Ok(Expr::Not(Box::new(self.parse_unary(depth)?)))
            }
            Tok::LParen => {
                let depth = nest(token.pos)?;
                let inner = self.parse_or(depth)?;
                let close = self.bump()?;
                if close.tok == Tok::RParen {
                    Ok(inner)
                } else {
                    let what = if close.tok == Tok::End {
                        format!("\")\" to close the \"(\" at position {}", token.pos)
                    } else {
                        format!(
                            "\"and\", \"or\" or \")\" to close the \"(\" at position {}",
                            token.pos
                        )
                    };
                    Err(expected(&what, &close))
                }
            }
            Tok::Word(word) => self.parse_comparison(word, token.pos),
            _ => Err(expected("a comparison, \"(\" or \"not\"", &token)),
        }
    }

    /// The comparison whose field name `field` is at `pos`.
    fn parse_comparison(&mut self, field: &str, pos: usize) -> Result<Expr, QueryError> {
        if keyword(field).is_some() || !is_ident(field) {
            return Err(QueryError {
                position: pos,
                message: format!(
                    "expected a field name ([A-Za-z_][A-Za-z0-9_.-]*), found {}",
                    describe(&Tok::Word(field))
                ),
            });
        }
        if self.comparisons == MAX_COMPARISONS {
            return Err(QueryError {
                position: pos,
                message: format!("more than {MAX_COMPARISONS} comparisons"),
            });
        }
        self.comparisons += 1;

        let op_token = self.bump()?;
        let Tok::Op(op) = op_token.tok else {
            return Err(expected(
                "a comparison operator (=, !=, <, <=, >, >=, ~)",
                &op_token,
            ));
        };

        let token = self.bump()?;
        let at = |message: String| QueryError {
            position: token.pos,
            message,
        };
        let value = match (&token.tok, op) {
            (Tok::Word(word), _) if keyword(word).is_some() => {
                return Err(at(format!(
                    "expected a value, found keyword {word:?}; quote it to compare with the word"
                )));
            }
            (Tok::Word(word), Op::Glob) if is_number(word) => {
                return Err(at(format!("~ needs a glob pattern, found number {word}")));
            }
            (Tok::Word(pattern), Op::Glob) => {
                Literal::Glob(PathGlob::parse(pattern).map_err(|e| at(e.to_string()))?)
            }
            (Tok::Str(pattern), Op::Glob) => {
                Literal::Glob(PathGlob::parse(pattern).map_err(|e| at(e.to_string()))?)
            }
            (Tok::Str(text), _) => Literal::Text(text.clone()),
            (Tok::Word(word), _) if is_number(word) => {
                let value: f64 = word
                    .parse()
                    .map_err(|_| at(format!("{word:?} is not a number")))?;
                if !value.is_finite() {
                    return Err(at(format!("number {word} is out of range")));
                }
                Literal::Number {
                    value,
                    text: word.to_string(),
                }
            }
            (Tok::Word(word), _) if word.eq_ignore_ascii_case("true") => Literal::Bool(true),
            (Tok::Word(word), _) if word.eq_ignore_ascii_case("false") => Literal::Bool(false),
            (Tok::Word(word), _) if is_bare_word(word) => Literal::Word(word.to_string()),
            (Tok::Word(word), _) => {
                return Err(at(format!(
                    "expected a value (a number, true, false, a quoted string or a word), found {word:?}"
                )));
            }
            (_, Op::Glob) => return Err(expected("a glob pattern", &token)),
            _ => return Err(expected("a value", &token)),
        };
        Ok(Expr::Cmp(Comparison {
            field: field.to_string(),
            op,
            value,
            pos,
        }))
    }
}

/// One term as itself, several as `wrap(terms)`, with terms of the same kind spliced in so
/// `(a and b) and c` is the same query as `a and b and c`.
fn combine(
    terms: Vec<Expr>,
    wrap: fn(Vec<Expr>) -> Expr,
    same_kind: fn(Expr) -> Result<Vec<Expr>, Expr>,
) -> Expr {
    if terms.len() == 1 {
        return terms.into_iter().next().expect("one term");
    }
    let mut flat = Vec::with_capacity(terms.len());
    for term in terms {
        match same_kind(term) {
            Ok(inner) => flat.extend(inner),
            Err(term) => flat.push(term),
        }
    }
    wrap(flat)
}

// ---------------------------------------------------------------------------------------------
// Display

#[derive(Clone, Copy, PartialEq, Eq)]
enum Context {
    Top,
    Or,
    And,
    Not,
}

fn write_expr(f: &mut fmt::Formatter<'_>, expr: &Expr, context: Context) -> fmt::Result {
    let (terms, separator, parens) = match expr {
        Expr::Or(terms) => (
            terms,
            " or ",
            matches!(context, Context::And | Context::Not),
        ),
        Expr::And(terms) => (terms, " and ", context == Context::Not),
        Expr::Not(inner) => {
            f.write_str("not ")?;
            return write_expr(f, inner, Context::Not);
        }
        Expr::Cmp(cmp) => return write!(f, "{} {} {}", cmp.field, cmp.op.as_str(), cmp.value),
    };
    let inner = if separator == " or " {
        Context::Or
    } else {
        Context::And
    };
    if parens {
        f.write_str("(")?;
    }
    for (i, term) in terms.iter().enumerate() {
        if i > 0 {
            f.write_str(separator)?;
        }
        write_expr(f, term, inner)?;
    }
    if parens {
        f.write_str(")")?;
    }
    Ok(())
}

fn write_quoted(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in text.chars() {
        if matches!(c, '"' | '\\') {
            f.write_str("\\")?;
        }
        write!(f, "{c}")?;
    }
    f.write_str("\"")
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Number { text, .. } | Literal::Word(text) => f.write_str(text),
            Literal::Bool(b) => write!(f, "{b}"),
            Literal::Text(text) => write_quoted(f, text),
            Literal::Glob(glob) => write_quoted(f, &glob.to_string()),
        }
    }
}

impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_expr(f, &self.expr, Context::Top)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::event::Severity;

    type Fields = HashMap<&'static str, FieldValue<'static>>;

    impl Subject for Fields {
        fn field(&self, name: &str) -> Option<FieldValue<'_>> {
            self.get(name).cloned()
        }

        fn ordinal(&self, field: &str, word: &str) -> Option<f64> {
            match field {
                "severity" => Severity::parse(word).map(|s| s.index() as f64),
                _ => None,
            }
        }
    }

    fn text(s: &'static str) -> FieldValue<'static> {
        FieldValue::Text(Cow::Borrowed(s))
    }

    fn fields(pairs: &[(&'static str, FieldValue<'static>)]) -> Fields {
        pairs.iter().cloned().collect()
    }

    /// A press in alarm with a poor OEE: the subject most tests ask about.
    fn press() -> Fields {
        fields(&[
            ("level", text("machine")),
            ("type", text("press")),
            ("name", text("press-3")),
            ("path", text("acme/berlin/assembly/line-1/press-3")),
            ("state", text("running")),
            ("alarm", text("active")),
            ("oee", FieldValue::Num(0.55)),
            ("temperature", FieldValue::Num(82.5)),
            ("severity", FieldValue::Num(Severity::High.index() as f64)),
            ("offset", FieldValue::Num(-2.5)),
            ("drift", FieldValue::Num(f64::NAN)),
            ("enabled", FieldValue::Bool(true)),
        ])
    }

    fn check(query: &str, subject: &dyn Subject, expected: bool) {
        let parsed = Query::parse(query).unwrap_or_else(|e| panic!("{query:?}: {e}"));
        assert_eq!(
            parsed.matches(subject),
            expected,
            "{query:?} (parsed as {parsed})"
        );
    }

    fn parse_err(query: &str) -> QueryError {
        Query::parse(query).expect_err(query)
    }

    fn nums(a: f64, b: f64, c: f64) -> Fields {
        fields(&[
            ("a", FieldValue::Num(a)),
            ("b", FieldValue::Num(b)),
            ("c", FieldValue::Num(c)),
        ])
    }

    #[test]
    fn and_binds_tighter_than_or() {
        let q = "a = 1 or b = 2 and c = 3";
        check(q, &nums(1.0, 0.0, 0.0), true);
        check(q, &nums(0.0, 2.0, 3.0), true);
        check(q, &nums(0.0, 2.0, 0.0), false);
        assert_eq!(Query::parse(q).expect("valid").to_string(), q);
    }

    #[test]
    fn parentheses_override_precedence() {
        let q = "(a = 1 or b = 2) and c = 3";
        check(q, &nums(1.0, 0.0, 0.0), false);
        check(q, &nums(1.0, 0.0, 3.0), true);
        check(q, &nums(0.0, 2.0, 3.0), true);
        check("((((a = 1))))", &nums(1.0, 0.0, 0.0), true);
    }

    #[test]
    fn not_applies_to_the_term_after_it() {
        check("not state = running", &press(), false);
        check("not state = idle", &press(), true);
        // `not` binds tighter than `and`: (not type = pump) and oee < 0.6.
        check("not type = pump and oee < 0.6", &press(), true);
        check("not (type = press and oee < 0.6)", &press(), false);
        check("not not state = running", &press(), true);
    }

    #[test]
    fn missing_field_fails_every_comparison_so_not_flips_it_to_true() {
        check("vibration = 3", &press(), false);
        check("vibration != 3", &press(), false);
        check("vibration ~ \"**\"", &press(), false);
        check("not vibration = 3", &press(), true);
    }

    #[test]
    fn examples_from_the_docs_evaluate() {
        check("level = machine and oee < 0.6", &press(), true);
        check(
            "type = press and (oee < 0.6 or alarm = active)",
            &press(),
            true,
        );
        check(
            "path ~ \"acme/berlin/**\" and state != down",
            &press(),
            true,
        );
        check("path ~ acme/paris/**", &press(), false);
        check("name = \"press-3\"", &press(), true);
        check("temperature > 80", &press(), true);
        check("severity >= high", &press(), true);
        check("severity > high", &press(), false);
    }

    #[test]
    fn numbers_compare_numerically() {
        let p = press();
        check("temperature > 82.4", &p, true);
        check("temperature >= 82.5", &p, true);
        check("temperature <= 82.5", &p, true);
        check("temperature < 82.5", &p, false);
        check("temperature = 8.25e1", &p, true);
        check("temperature != 8.25E+1", &p, false);
        check("offset < -2", &p, true);
        check("offset = -2.5", &p, true);
        check("oee > .5", &p, true);
    }

    #[test]
    fn nan_never_matches_not_even_not_equal() {
        for op in ["=", "!=", "<", "<=", ">", ">="] {
            check(&format!("drift {op} 1"), &press(), false);
        }
    }

    #[test]
    fn number_field_against_a_word_or_string_is_false() {
        check("temperature = hot", &press(), false);
        check("temperature != hot", &press(), false);
        check("temperature = \"82.5\"", &press(), false);
        check("temperature > true", &press(), false);
        check("temperature ~ \"**\"", &press(), false);
        // `severity` has ordinals but `unknown` is not one of them.
        check("severity < unknown", &press(), false);
    }

    #[test]
    fn text_fields_compare_exactly_and_lexicographically() {
        let p = press();
        check("type = press", &p, true);
        check("type = Press", &p, false);
        check("type != pump", &p, true);
        check("type > pra", &p, true);
        check("type < pump", &p, true);
        check("type >= \"press\"", &p, true);
        check("type = 1", &p, false);
    }

    #[test]
    fn number_and_bool_literals_compare_with_text_fields_as_spelt() {
        let subject = fields(&[("name", text("42")), ("label", text("true"))]);
        check("name = 42", &subject, true);
        check("name = 42.0", &subject, false);
        check("label = TRUE", &subject, true);
    }

    #[test]
    fn bool_fields_compare_with_true_and_false() {
        let p = press();
        check("enabled = true", &p, true);
        check("enabled = False", &p, false);
        check("enabled != false", &p, true);
        check("enabled > false", &p, false);
        check("enabled = \"true\"", &p, false);
        check("enabled = 1", &p, false);
    }

    #[test]
    fn tilde_matches_text_fields_as_path_globs() {
        let p = press();
        check("path ~ \"acme/*/assembly/**\"", &p, true);
        check("path ~ acme/*/assembly", &p, false);
        check("path ~ **/press-?", &p, true);
        check("name ~ press-*", &p, true);
        check("path ~ \"*/berlin/**/temp*\"", &p, false);
    }

    #[test]
    fn keywords_are_case_insensitive() {
        check(
            "NOT type = pump AND oee < 0.6 Or state = down",
            &press(),
            true,
        );
        assert_eq!(
            Query::parse("a = 1 AND b = 2").expect("valid"),
            Query::parse("a = 1 and b = 2").expect("valid")
        );
    }

    #[test]
    fn whitespace_is_optional_around_operators_and_parentheses() {
        assert_eq!(
            Query::parse("(type=press)and(oee<0.6 or temperature>=-1)").expect("valid"),
            Query::parse("type = press and (oee < 0.6 or temperature >= -1)").expect("valid")
        );
    }

    #[test]
    fn quoted_strings_unescape_quotes_and_backslashes() {
        let subject = fields(&[("note", text(r#"say "hi" \o/"#))]);
        check(r#"note = "say \"hi\" \\o/""#, &subject, true);
    }

    #[test]
    fn identifiers_may_contain_dots_and_dashes() {
        let subject = fields(&[("spindle.speed-rpm", FieldValue::Num(1200.0))]);
        check("spindle.speed-rpm > 1000", &subject, true);
    }

    #[test]
    fn errors_point_at_the_offending_byte() {
        let cases: &[(&str, usize, &str)] = &[
            ("value >", 7, "unexpected end of query, expected a value"),
            ("value >> 3", 7, "expected a value, found \">\""),
            (
                "(value > 1",
                10,
                "unexpected end of query, expected \")\" to close the \"(\" at position 0",
            ),
            (
                "(value > 1 x",
                11,
                "expected \"and\", \"or\" or \")\" to close the \"(\" at position 0, found \"x\"",
            ),
            ("name = \"abc", 7, "unterminated string starting here"),
            ("name = \"abc\\", 7, "unterminated string starting here"),
            (
                "value abc",
                6,
                "expected a comparison operator (=, !=, <, <=, >, >=, ~), found \"abc\"",
            ),
            (
                "value",
                5,
                "unexpected end of query, expected a comparison operator (=, !=, <, <=, >, >=, ~)",
            ),
            (
                "",
                0,
                "unexpected end of query, expected a comparison, \"(\" or \"not\"",
            ),
            (
                "  ",
                2,
                "unexpected end of query, expected a comparison, \"(\" or \"not\"",
            ),
            (
                "a = 1 and",
                9,
                "unexpected end of query, expected a comparison, \"(\" or \"not\"",
            ),
            (
                "a = 1 b = 2",
                6,
                "expected \"and\", \"or\" or end of query, found \"b\"",
            ),
            ("a = 1)", 5, "found \")\" without a matching \"(\""),
            (
                "a ! 1",
                2,
                "unexpected character '!'; did you mean \"!=\" or \"not\"?",
            ),
            ("temp = é", 7, "unexpected character 'é'"),
            (
                "a = 1 and (",
                11,
                "unexpected end of query, expected a comparison, \"(\" or \"not\"",
            ),
            (
                "and = 1",
                0,
                "expected a field name ([A-Za-z_][A-Za-z0-9_.-]*), found keyword \"and\"",
            ),
            (
                "9x = 1",
                0,
                "expected a field name ([A-Za-z_][A-Za-z0-9_.-]*), found \"9x\"",
            ),
            (
                "x = or",
                4,
                "expected a value, found keyword \"or\"; quote it to compare with the word",
            ),
            (
                "x = -abc",
                4,
                "expected a value (a number, true, false, a quoted string or a word), found \"-abc\"",
            ),
            ("x = (", 4, "expected a value, found \"(\""),
            ("x = 1e999", 4, "number 1e999 is out of range"),
            (
                "x = \"a\\nb\"",
                6,
                "unknown escape \"\\n\" in string; only \\\" and \\\\ are allowed",
            ),
            ("path ~ 42", 7, "~ needs a glob pattern, found number 42"),
            ("path ~ (", 7, "expected a glob pattern, found \"(\""),
            (
                "path ~ \"acme//x\"",
                7,
                "path glob \"acme//x\": segment 1 is empty (two '/' in a row)",
            ),
            (
                "a = 1 or path ~ acme/x**",
                16,
                "path glob \"acme/x**\": segment 1 \"x**\" mixes `**` with other characters; `**` must be a whole segment",
            ),
        ];
        for (query, position, message) in cases {
            assert_eq!(
                parse_err(query),
                QueryError {
                    position: *position,
                    message: message.to_string()
                },
                "{query:?}"
            );
        }
    }

    #[test]
    fn error_display_names_the_position() {
        assert_eq!(
            parse_err("value >").to_string(),
            "query: at position 7: unexpected end of query, expected a value"
        );
    }

    #[test]
    fn rejects_text_over_4096_bytes() {
        let padding = " ".repeat(MAX_QUERY_BYTES - 5);
        assert!(Query::parse(&format!("a = 1{padding}")).is_ok());
        let err = parse_err(&format!("a = 1 {padding}"));
        assert_eq!(err.position, MAX_QUERY_BYTES);
        assert_eq!(err.message, "query is 4097 bytes; at most 4096 are allowed");
    }

    #[test]
    fn rejects_nesting_deeper_than_32() {
        let nested = |n: usize| format!("{}a = 1{}", "(".repeat(n), ")".repeat(n));
        assert!(Query::parse(&nested(MAX_NESTING_DEPTH)).is_ok());
        let err = parse_err(&nested(MAX_NESTING_DEPTH + 1));
        assert_eq!(err.position, MAX_NESTING_DEPTH);
        assert_eq!(
            err.message,
            "nesting deeper than 32 levels of parentheses and \"not\""
        );

        // `not` nests too: without the limit this would recurse a thousand times.
        let nots = |n: usize| format!("{}a = 1", "not ".repeat(n));
        assert!(Query::parse(&nots(MAX_NESTING_DEPTH)).is_ok());
        assert_eq!(parse_err(&nots(1000)).position, 4 * MAX_NESTING_DEPTH);
        assert!(
            parse_err(&format!("not ({})", nots(MAX_NESTING_DEPTH)))
                .message
                .contains("nesting")
        );
    }

    #[test]
    fn rejects_more_than_64_comparisons() {
        let chain = |n: usize| vec!["a = 1"; n].join(" or ");
        assert!(Query::parse(&chain(MAX_COMPARISONS)).is_ok());
        let err = parse_err(&chain(MAX_COMPARISONS + 1));
        assert_eq!(err.position, MAX_COMPARISONS * "a = 1 or ".len());
        assert_eq!(err.message, "more than 64 comparisons");
    }

    #[test]
    fn pinned_level_comes_only_from_a_top_level_conjunction() {
        let pinned = |q: &str| {
            Query::parse(q)
                .expect("valid")
                .pinned_level()
                .map(str::to_owned)
        };
        assert_eq!(pinned("level = sensor").as_deref(), Some("sensor"));
        assert_eq!(
            pinned("value > 80 and level = \"sensor\"").as_deref(),
            Some("sensor")
        );
        assert_eq!(
            pinned("(level = line and a = 1) and b = 2").as_deref(),
            Some("line")
        );
        assert_eq!(pinned("level = sensor or value > 80"), None);
        assert_eq!(pinned("not level = sensor"), None);
        assert_eq!(pinned("level != sensor"), None);
        assert_eq!(pinned("value > 80 and (level = sensor or a = 1)"), None);
        assert_eq!(pinned("level = 3"), None);
    }

    #[test]
    fn pinned_path_glob_comes_only_from_a_top_level_conjunction() {
        let pinned = |q: &str| {
            Query::parse(q)
                .expect("valid")
                .pinned_path_glob()
                .map(|g| g.to_string())
        };
        assert_eq!(
            pinned("level = sensor and path ~ acme/berlin/**").as_deref(),
            Some("acme/berlin/**")
        );
        assert_eq!(pinned("path ~ \"/acme/*/\"").as_deref(), Some("acme/*"));
        assert_eq!(pinned("path ~ acme/** or a = 1"), None);
        assert_eq!(pinned("not path ~ acme/**"), None);
        assert_eq!(pinned("name ~ acme"), None);
        assert_eq!(pinned("path = acme"), None);
    }

    #[test]
    fn display_parses_back_to_the_same_query() {
        let queries = [
            "level = sensor and value > 80",
            "type = press and (oee < 0.6 or alarm = active)",
            "path ~ \"acme/berlin/**\" and quality != good",
            "not state = running",
            "NOT (a = 1 OR b = 2) and not not c <= -1.5e3",
            "name = \"temp-1\" or note = \"say \\\"hi\\\" \\\\\"",
            "((a = 1 and b = 2) or (c = 3 or d = 4)) and (e = TRUE or f ~ **/x?)",
            "severity >= high and path ~ /acme/**/**/",
        ];
        for text in queries {
            let query = Query::parse(text).expect("valid");
            let rendered = query.to_string();
            assert_eq!(
                Query::parse(&rendered).expect("rendering parses"),
                query,
                "{text:?} rendered as {rendered:?}"
            );
        }
        assert_eq!(
            Query::parse("((a = 1 and b = 2) or (c = 3 or d = 4)) and (e = TRUE or f ~ **/x?)")
                .expect("valid")
                .to_string(),
            "(a = 1 and b = 2 or c = 3 or d = 4) and (e = true or f ~ \"**/x?\")"
        );
        assert_eq!(
            Query::parse("NOT (a = 1 OR b = 2)")
                .expect("valid")
                .to_string(),
            "not (a = 1 or b = 2)"
        );
    }

    struct AnySchema;

    impl Schema for AnySchema {
        fn kind_of(&self, field: &str) -> Option<FieldKind> {
            match field {
                "level" => Some(FieldKind::Words(&["machine", "sensor"])),
                "severity" => Some(FieldKind::Ranked(&["low", "high"])),
                "stale" => Some(FieldKind::Bool),
                "path" | "name" => Some(FieldKind::Text),
                f if f.starts_with('v') => Some(FieldKind::Number),
                _ => None,
            }
        }

        fn known(&self) -> String {
            "level, severity, stale, path, name, v*".into()
        }
    }

    proptest::proptest! {
        /// What users type (over gRPC and HTTP) is a query or a short error, never a panic;
        /// a parsed query that passes the schema renders and parses back to itself.
        #[test]
        fn any_text_is_a_query_or_a_short_error(
            text in proptest::prop_oneof![
                proptest::string::string_regex("[a-z() =<>!~\"*/.0-9-]{0,60}").expect("regex"),
                ".{0,200}",
            ]
        ) {
            match Query::parse(&text) {
                Ok(q) => {
                    let _ = q.check(&AnySchema);
                    proptest::prop_assert_eq!(Query::parse(&q.to_string()), Ok(q));
                }
                Err(e) => proptest::prop_assert!(e.message.len() < 1024, "{}", e.message),
            }
        }
    }

    #[test]
    fn check_names_the_field_and_the_words_it_takes() {
        let check = |q: &str| Query::parse(q).expect("parses").check(&AnySchema);
        assert!(check("level = machine and severity >= high and v1 > 3").is_ok());
        let e = check("oee > 1").expect_err("unknown");
        assert_eq!(e.position, 0);
        assert!(e.message.contains("unknown field \"oee\""), "{}", e.message);
        let e = check("level = machine and v > NaN").expect_err("NaN");
        assert_eq!(e.position, 20, "{}", e.message);
        assert!(check("severity > apocalypse").is_err());
        assert!(check("level < machine").is_err());
        assert!(check("stale = 1").is_err());
    }
}
