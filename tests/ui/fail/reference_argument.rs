#[celeriac::task]
async fn shout(text: &str) -> celeriac::TaskResult<String> {
    Ok(text.to_uppercase())
}

#[celeriac::task]
async fn checksum(data: &[u8]) -> celeriac::TaskResult<u64> {
    Ok(data.iter().map(|b| u64::from(*b)).sum())
}

fn main() {}
