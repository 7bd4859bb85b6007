//! rusty-celery 0.5.5: enqueue N no-op tasks, then burn them down with one consumer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use celeriac_peers::{report, Args};
use celery::prelude::*;

static DONE: AtomicUsize = AtomicUsize::new(0);
static TARGET: AtomicUsize = AtomicUsize::new(usize::MAX);
static FINISHED: tokio::sync::Notify = tokio::sync::Notify::const_new();

#[celery::task]
fn noop() -> TaskResult<()> {
    if DONE.fetch_add(1, Ordering::Relaxed) + 1 == TARGET.load(Ordering::Relaxed) {
        FINISHED.notify_one();
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let app = celery::app!(
        broker = RedisBroker { args.url.clone() },
        tasks = [noop],
        task_routes = ["*" => "celery"],
        prefetch_count = 256,
        acks_late = false,
    )
    .await?;
    let started = Instant::now();
    for _ in 0..args.n {
        app.send_task(noop::new()).await?;
    }
    let enqueue = started.elapsed();
    TARGET.store(args.n, Ordering::Relaxed);
    let burn_started = Instant::now();
    celeriac_peers::watch(&DONE, args.n);
    // Its consumer future is not Send: run it here until the last task is done.
    tokio::select! {
        r = app.consume_from(&["celery"]) => { r?; return Err("the consumer stopped early".into()); }
        _ = FINISHED.notified() => {}
    }
    let burn = burn_started.elapsed();
    report("rusty-celery 0.5.5", args.n, enqueue, burn);
    std::process::exit(0);
}
