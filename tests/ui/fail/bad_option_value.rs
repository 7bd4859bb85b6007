use celeriac::{TaskResult, task};

#[task(max_retries = "three")]
async fn add(x: i64, y: i64) -> TaskResult<i64> {
    Ok(x + y)
}

#[task(priority = 12)]
async fn urgent() -> TaskResult<()> {
    Ok(())
}

fn main() {}
