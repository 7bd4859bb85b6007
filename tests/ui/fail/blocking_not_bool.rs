#[celeriac::task(blocking = "yes")]
async fn crunch(n: u64) -> celeriac::TaskResult<u64> {
    Ok(n)
}

fn main() {}
