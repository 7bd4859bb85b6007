#[celeriac::task]
async fn add(x: i64, y: i64) -> i64 {
    x + y
}

#[celeriac::task]
async fn log(line: String) {
    println!("{line}");
}

fn main() {}
