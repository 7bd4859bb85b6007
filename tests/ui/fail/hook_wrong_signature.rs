fn succeeded(_request: &celeriac::Request) {}

#[celeriac::task(on_success = succeeded)]
async fn add(x: i64, y: i64) -> celeriac::TaskResult<i64> {
    Ok(x + y)
}

fn main() {}
