use celeriac::{TaskResult, task};

#[task]
fn add(x: i64, y: i64) -> TaskResult<i64> {
    Ok(x + y)
}

fn main() {}
