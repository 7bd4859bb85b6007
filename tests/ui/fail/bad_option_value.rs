#[celeriac::task(max_retries = "three")]
async fn add(x: i64, y: i64) -> celeriac::TaskResult<i64> {
    Ok(x + y)
}

#[celeriac::task(priority = 12)]
async fn urgent() -> celeriac::TaskResult<()> {
    Ok(())
}

fn main() {}
