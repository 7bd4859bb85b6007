use celeriac::{TaskResult, task};

#[task]
async fn echo<T: Clone>(value: T) -> TaskResult<T> {
    Ok(value)
}

fn main() {}
