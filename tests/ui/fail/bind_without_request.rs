use celeriac::{TaskResult, task};

#[task(bind = true)]
async fn whoami() -> TaskResult<String> {
    Ok(String::new())
}

fn main() {}
