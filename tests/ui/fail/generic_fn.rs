#[celeriac::task]
async fn echo<T: Clone>(value: T) -> celeriac::TaskResult<T> {
    Ok(value)
}

fn main() {}
