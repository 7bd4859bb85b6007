use celeriac::{TaskResult, task};

struct Point {
    x: i64,
    y: i64,
}

#[task]
async fn norm(point: Point) -> TaskResult<i64> {
    Ok(point.x.abs() + point.y.abs())
}

fn main() {}
