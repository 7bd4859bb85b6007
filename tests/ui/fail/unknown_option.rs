#[celeriac::task(max_retry = 3)]
async fn add(x: i64, y: i64) -> celeriac::TaskResult<i64> {
    Ok(x + y)
}

fn main() {}
