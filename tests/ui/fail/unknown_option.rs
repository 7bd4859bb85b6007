use celeriac::{TaskResult, task};

#[task(max_retry = 3)]
async fn add(x: i64, y: i64) -> TaskResult<i64> {
    Ok(x + y)
}

fn main() {}
