//! A task whose error is the user's own `std::error::Error` type: it converts into
//! `TaskError` (named after the type, so `autoretry_for` can list it), and `?` works inside.

use celeriac::{Task, TaskError, task};

#[derive(Debug)]
enum ParseError {
    Empty,
    NotANumber(std::num::ParseIntError),
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Empty => f.write_str("empty input"),
            ParseError::NotANumber(e) => write!(f, "not a number: {e}"),
        }
    }
}

impl std::error::Error for ParseError {}

impl From<std::num::ParseIntError> for ParseError {
    fn from(e: std::num::ParseIntError) -> Self {
        ParseError::NotANumber(e)
    }
}

#[task(autoretry_for = [ParseError])]
async fn parse(text: String) -> Result<i64, ParseError> {
    if text.is_empty() {
        return Err(ParseError::Empty);
    }
    Ok(text.trim().parse::<i64>()?)
}

fn main() {
    assert_eq!(parse.options().retry.autoretry_for, ["ParseError"]);
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
    assert_eq!(runtime.block_on(parse::call(" 42 ".into())).ok(), Some(42));
    let error = runtime.block_on(parse::call("forty-two".into())).expect_err("not a number");
    let TaskError::Failure { exc, .. } = TaskError::from(error) else {
        panic!("a std error becomes a failure");
    };
    assert_eq!(exc.exc_type, "ParseError");
    assert!(matches!(runtime.block_on(parse::call(String::new())), Err(ParseError::Empty)));
}
