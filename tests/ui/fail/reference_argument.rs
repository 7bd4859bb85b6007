use celeriac::{TaskResult, task};

#[task]
async fn shout(x: &str) -> TaskResult<String> {
    Ok(x.to_uppercase())
}

fn main() {}
