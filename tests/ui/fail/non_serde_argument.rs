struct Point {
    x: i64,
    y: i64,
}

#[celeriac::task]
async fn norm(point: Point) -> celeriac::TaskResult<i64> {
    Ok(point.x.abs() + point.y.abs())
}

fn main() {}
