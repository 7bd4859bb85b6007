#[celeriac::task(bind = true)]
async fn whoami() -> celeriac::TaskResult<String> {
    Ok(String::new())
}

fn main() {}
