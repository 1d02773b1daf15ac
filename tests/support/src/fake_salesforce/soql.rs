//! The SOQL subset the fake understands (see the module header).

use serde_json::Value;

use super::ids::{format_datetime, parse_datetime};
use super::SfError;

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Str(String),
    Comma,
    Op(&'static str),
}

fn tokenize(soql: &str) -> Result<Vec<Token>, SfError> {
    let mut tokens = Vec::new();
    let mut chars = soql.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            ',' => {
                chars.next();
                tokens.push(Token::Comma);
            }
            '\'' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some('\\') => match chars.next() {
                            Some(e) => s.push(e),
                            None => break,
                        },
                        Some('\'') => {
                            tokens.push(Token::Str(s));
                            break;
                        }
                        Some(c) => s.push(c),
                        None => {
                            return Err(SfError::malformed_query("unterminated string literal"))
                        }
                    }
                }
            }
            '=' | '!' | '<' | '>' => {
                chars.next();
                let eq = chars.peek() == Some(&'=');
                if eq {
                    chars.next();
                }
                let op = match (c, eq) {
                    ('=', false) => "=",
                    ('!', true) => "!=",
                    ('<', false) => "<",
                    ('<', true) => "<=",
                    ('>', false) => ">",
                    ('>', true) => ">=",
                    _ => return Err(SfError::malformed_query(format!("unexpected token '{c}'"))),
                };
                tokens.push(Token::Op(op));
            }
            c if c.is_alphanumeric() || "_.:+-".contains(c) => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_alphanumeric() || "_.:+-".contains(c) {
                        word.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                tokens.push(Token::Word(word));
            }
            c => return Err(SfError::malformed_query(format!("unexpected token '{c}'"))),
        }
    }
    Ok(tokens)
}

#[derive(Debug)]
pub(super) enum Literal {
    Text(String),
    Null,
}

#[derive(Debug)]
pub(super) struct Condition {
    pub(super) field: String,
    pub(super) op: &'static str,
    pub(super) value: Literal,
}

#[derive(Debug)]
pub(super) struct Soql {
    pub(super) fields: Vec<String>,
    pub(super) object: String,
    pub(super) conditions: Vec<Condition>,
    pub(super) order_by: Option<(String, bool)>,
    pub(super) limit: Option<usize>,
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek_keyword(&self, keyword: &str) -> bool {
        matches!(self.tokens.get(self.pos), Some(Token::Word(w)) if w.eq_ignore_ascii_case(keyword))
    }

    fn keyword(&mut self, keyword: &str) -> Result<(), SfError> {
        if self.peek_keyword(keyword) {
            self.pos += 1;
            Ok(())
        } else {
            Err(SfError::malformed_query(format!(
                "expecting '{keyword}', found {}",
                self.describe_next()
            )))
        }
    }

    fn word(&mut self) -> Result<String, SfError> {
        match self.tokens.get(self.pos) {
            Some(Token::Word(w)) => {
                self.pos += 1;
                Ok(w.clone())
            }
            _ => Err(SfError::malformed_query(format!(
                "unexpected token: {}",
                self.describe_next()
            ))),
        }
    }

    fn describe_next(&self) -> String {
        match self.tokens.get(self.pos) {
            None => "end of query".to_owned(),
            Some(Token::Word(w)) => format!("'{w}'"),
            Some(Token::Str(s)) => format!("'{s}'"),
            Some(Token::Comma) => "','".to_owned(),
            Some(Token::Op(op)) => format!("'{op}'"),
        }
    }

    fn condition(&mut self) -> Result<Condition, SfError> {
        let field = self.word()?;
        let op = match self.tokens.get(self.pos) {
            Some(Token::Op(op)) => *op,
            _ => {
                return Err(SfError::malformed_query(format!(
                    "unexpected token: {}",
                    self.describe_next()
                )))
            }
        };
        self.pos += 1;
        let value = match self.tokens.get(self.pos) {
            Some(Token::Str(s)) => Literal::Text(s.clone()),
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("null") => Literal::Null,
            Some(Token::Word(w)) => match parse_datetime(w) {
                Some(ms) => Literal::Text(format_datetime(ms)),
                None => Literal::Text(w.to_ascii_lowercase()),
            },
            _ => {
                return Err(SfError::malformed_query(format!(
                    "unexpected token: {}",
                    self.describe_next()
                )))
            }
        };
        self.pos += 1;
        Ok(Condition { field, op, value })
    }
}

pub(super) fn parse_soql(soql: &str) -> Result<Soql, SfError> {
    let mut p = Parser {
        tokens: tokenize(soql)?,
        pos: 0,
    };
    p.keyword("SELECT")?;
    let mut fields = vec![p.word()?];
    while p.tokens.get(p.pos) == Some(&Token::Comma) {
        p.pos += 1;
        fields.push(p.word()?);
    }
    p.keyword("FROM")?;
    let object = p.word()?;
    let mut conditions = Vec::new();
    if p.peek_keyword("WHERE") {
        p.pos += 1;
        conditions.push(p.condition()?);
        while p.peek_keyword("AND") {
            p.pos += 1;
            conditions.push(p.condition()?);
        }
    }
    let mut order_by = None;
    if p.peek_keyword("ORDER") {
        p.pos += 1;
        p.keyword("BY")?;
        let field = p.word()?;
        let mut ascending = true;
        if p.peek_keyword("ASC") {
            p.pos += 1;
        } else if p.peek_keyword("DESC") {
            p.pos += 1;
            ascending = false;
        }
        order_by = Some((field, ascending));
    }
    let mut limit = None;
    if p.peek_keyword("LIMIT") {
        p.pos += 1;
        let n = p.word()?;
        limit = Some(
            n.parse::<usize>()
                .map_err(|_| SfError::malformed_query(format!("invalid LIMIT '{n}'")))?,
        );
    }
    if p.pos != p.tokens.len() {
        return Err(SfError::malformed_query(format!(
            "unexpected token: {}",
            p.describe_next()
        )));
    }
    Ok(Soql {
        fields,
        object,
        conditions,
        order_by,
        limit,
    })
}

/// A field value as SOQL compares it: text (booleans and numbers as their
/// lower-case text), or nothing for null.
pub(super) fn comparable(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string().to_ascii_lowercase()),
    }
}

pub(super) fn matches(cond: &Condition, value: &Value) -> bool {
    let actual = comparable(value);
    let expected = match &cond.value {
        Literal::Null => None,
        Literal::Text(t) => Some(t.clone()),
    };
    let (actual, expected) = match (actual, expected, cond.op) {
        (a, e, "=") => return a == e,
        (a, e, "!=") => return a != e,
        (Some(a), Some(e), _) => (a, e),
        // An ordering comparison with null is never true.
        _ => return false,
    };
    // Datetimes are fixed-width text here, so text order is time order.
    match cond.op {
        "<" => actual < expected,
        "<=" => actual <= expected,
        ">" => actual > expected,
        ">=" => actual >= expected,
        _ => false,
    }
}
