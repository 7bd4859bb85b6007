//! The `argsrepr` / `kwargsrepr` headers: Celery's `saferepr` (`celery/utils/saferepr.py`) of JSON
//! values, as `as_task_v2` writes them (`saferepr(args, 1024)`).
//!
//! `saferepr` is not Python's `repr()`: a string is put in single quotes with only `'` escaped
//! (backslashes and control characters are copied as they are), containers nested three deep
//! print as `[...]` / `{...}`, and past 1024 characters the text is cut with `, ...` and the open
//! brackets are closed. Copying those rules makes our headers read in Flower and in logs exactly
//! like Python's. Not for: anything that is parsed back; these headers are informational.

use super::pyjson;
use serde_json::{Map, Value};

/// Celery's `argsrepr_maxsize` and `kwargsrepr_maxsize` (`celery/app/amqp.py`).
const MAX_SIZE: usize = 1024;

/// `saferepr`'s default `maxlevels`: containers at this depth print as `[...]` / `{...}`.
const MAX_LEVELS: usize = 3;

/// Python-style representation of a JSON value, exactly as Celery writes `kwargsrepr`
/// (`saferepr(kwargs, 1024)`): `{'x': 2, 'y': 3}`, `None`, `True`, `'text'`.
pub fn py_repr(value: &Value) -> String {
    let mut tokens = Vec::new();
    push_value(value, 0, &mut tokens);
    render(&tokens, MAX_SIZE)
}

/// `argsrepr` of an args tuple, exactly as Celery writes it (`saferepr(args, 1024)`):
/// `(2, 3)`, `(1,)`, `()`.
pub fn args_repr(args: &[Value]) -> String {
    let mut tokens = Vec::new();
    push_seq(args.iter(), "(", if args.len() == 1 { ",)" } else { ")" }, 0, &mut tokens);
    render(&tokens, MAX_SIZE)
}

/// One piece of output, as `saferepr`'s `reprstream` yields them.
enum Token {
    /// An opening bracket.
    Open(&'static str),
    /// A closing bracket: still written after the cut when its container was opened before it.
    Close(&'static str),
    /// A separator (`", "`, `": "`) or an elided container (`[...]`): written whole, and dropped
    /// after the cut.
    Plain(String),
    /// A string (value or dict key), quoted and cut like `_format_chars`.
    Quoted(String),
    /// `str()` of a number, `None`, `True`, `False`: cut like `truncate`.
    Text(String),
}

fn push_value(value: &Value, depth: usize, out: &mut Vec<Token>) {
    match value {
        Value::Null => out.push(Token::Text("None".to_owned())),
        Value::Bool(b) => out.push(Token::Text(if *b { "True" } else { "False" }.to_owned())),
        Value::Number(n) => out.push(Token::Text(match n.as_f64() {
            Some(f) if n.is_f64() => pyjson::python_float_repr(f),
            _ => n.to_string(),
        })),
        Value::String(s) => out.push(Token::Quoted(s.clone())),
        Value::Array(items) => push_seq(items.iter(), "[", "]", depth, out),
        Value::Object(map) => push_map(map, depth, out),
    }
}

fn push_seq<'a>(
    items: impl Iterator<Item = &'a Value>,
    open: &'static str,
    close: &'static str,
    depth: usize,
    out: &mut Vec<Token>,
) {
    if depth >= MAX_LEVELS {
        out.push(Token::Plain(format!("{open}...{close}")));
        return;
    }
    out.push(Token::Open(open));
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(Token::Plain(", ".to_owned()));
        }
        push_value(item, depth + 1, out);
    }
    out.push(Token::Close(close));
}

fn push_map(map: &Map<String, Value>, depth: usize, out: &mut Vec<Token>) {
    if depth >= MAX_LEVELS {
        out.push(Token::Plain("{...}".to_owned()));
        return;
    }
    out.push(Token::Open("{"));
    for (i, (key, value)) in map.iter().enumerate() {
        if i > 0 {
            out.push(Token::Plain(", ".to_owned()));
        }
        out.push(Token::Quoted(key.clone()));
        out.push(Token::Plain(": ".to_owned()));
        push_value(value, depth + 1, out);
    }
    out.push(Token::Close("}"));
}

/// `_saferepr` (Celery 5.7): writes tokens while fewer than `max_len` characters are out. Past
/// the limit a closing bracket is still written; anything else becomes `, ...` followed by the
/// closing brackets of the containers that are still open.
fn render(tokens: &[Token], max_len: usize) -> String {
    let mut out = String::new();
    // Python counts down and may go below zero: a token is written whole (cut by `truncate`).
    let mut left = max_len as isize;
    for (i, token) in tokens.iter().enumerate() {
        if left <= 0 {
            if let Token::Close(text) = token {
                out.push_str(text);
                continue;
            }
            out.push_str(", ...");
            // Containers opened from here on are not shown, so their brackets cancel out.
            let mut depth = 0usize;
            for rest in &tokens[i..] {
                match rest {
                    Token::Open(_) => depth += 1,
                    Token::Close(_) if depth > 0 => depth -= 1,
                    Token::Close(text) => out.push_str(text),
                    _ => {}
                }
            }
            break;
        }
        let limit = left.unsigned_abs();
        let piece = match token {
            Token::Open(text) | Token::Close(text) => (*text).to_owned(),
            Token::Plain(text) => text.clone(),
            Token::Quoted(s) => format!("'{}'", truncate(s, limit).replace('\'', "\\'")),
            Token::Text(s) => truncate(s, limit),
        };
        left -= piece.chars().count() as isize;
        out.push_str(&piece);
    }
    out
}

/// `celery.utils.text.truncate`: from `max_len` characters on, keep the first `max_len` up to
/// their last space and add `...`.
fn truncate(s: &str, max_len: usize) -> String {
    if s.chars().count() < max_len {
        return s.to_owned();
    }
    let head: String = s.chars().take(max_len).collect();
    let kept = head.rsplit_once(' ').map_or(head.as_str(), |(before, _)| before);
    format!("{kept}...")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_escape_only_single_quotes() {
        // saferepr((1, 'a\\b', "it's", True, None, 1.5, -0.0, 2**64 - 1), 1024) in Celery 5.7.0.
        let args = [
            json!(1),
            json!("a\\b"),
            json!("it's"),
            json!(true),
            json!(null),
            json!(1.5),
            json!(-0.0),
            json!(u64::MAX),
        ];
        assert_eq!(args_repr(&args), r"(1, 'a\b', 'it\'s', True, None, 1.5, -0.0, 18446744073709551615)");
        assert_eq!(args_repr(&[]), "()");
        assert_eq!(args_repr(&[json!([])]), "([],)");
    }

    #[test]
    fn deep_containers_and_long_text_are_cut_like_celery() {
        assert_eq!(py_repr(&json!({"k'ey": [1, [2, [3, [4]]]], "e": []})), r"{'k\'ey': [1, [2, [...]]], 'e': []}");
        let long = args_repr(&[json!("x".repeat(2000))]);
        assert_eq!(long, format!("('{}...',)", "x".repeat(1023)));
        let numbers: Vec<Value> = (0..400).map(Value::from).collect();
        assert!(args_repr(&[Value::Array(numbers)]).ends_with(", 225, 22..., ...],)"));
    }
}
