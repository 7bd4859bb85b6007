//! apalis-redis 1.0.0: enqueue N no-op jobs, then burn them down with one worker (its defaults).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use apalis::prelude::*;
use apalis_redis::RedisStorage;
use celeriac_peers::{report, Args};
use serde::{Deserialize, Serialize};

static DONE: AtomicUsize = AtomicUsize::new(0);
static TARGET: AtomicUsize = AtomicUsize::new(usize::MAX);
static FINISHED: tokio::sync::Notify = tokio::sync::Notify::const_new();

#[derive(Debug, Deserialize, Serialize)]
struct Noop {
    n: u64,
}

async fn noop(_job: Noop) -> Result<(), BoxDynError> {
    if DONE.fetch_add(1, Ordering::Relaxed) + 1 == TARGET.load(Ordering::Relaxed) {
        FINISHED.notify_one();
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let conn = apalis_redis::connect(args.url.as_str()).await?;
    let mut storage = RedisStorage::new(conn);
    let started = Instant::now();
    for n in 0..args.n as u64 {
        storage.push(Noop { n }).await?;
    }
    let enqueue = started.elapsed();
    TARGET.store(args.n, Ordering::Relaxed);
    let burn_started = Instant::now();
    celeriac_peers::watch(&DONE, args.n);
    let worker = WorkerBuilder::new("bench").backend(storage).build(noop);
    let handle = tokio::spawn(async move { worker.run().await });
    FINISHED.notified().await;
    let burn = burn_started.elapsed();
    report("apalis-redis 1.0.0", args.n, enqueue, burn);
    handle.abort();
    std::process::exit(0);
}
