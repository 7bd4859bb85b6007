//! Quickstart: a producer enqueues a few hundred tasks, an embedded worker runs them with a
//! progress bar, flaky ones retry with exponential back-off, one fails for good into the
//! dead-letter queue, and a final table shows what happened. Runs on SQLite with no server.
//!
//! ```text
//! cargo run --example quickstart -- [--tasks 300] [--broker URL] [--backend URL]
//! ```
//!
//! The demo checks its own counts and exits non-zero if a task was lost or counted twice.

use anyhow::{Context, bail};
use celeriac::{App, FailureReport, Request, State, TaskError, TaskResult, Worker, task};
use chrono::Utc;
use indicatif::{ProgressBar, ProgressStyle};
use std::time::{Duration, Instant};

/// The order that always fails (to show the dead-letter queue).
const DOOMED: u64 = 13;

/// How many times order `id` fails before it succeeds (deterministic, so counts can be checked).
fn planned_failures(id: u64) -> u32 {
    match id {
        DOOMED => u32::MAX,
        id if id % 17 == 0 => 2,
        id if id % 5 == 0 => 1,
        _ => 0,
    }
}

/// Sends an order confirmation through a flaky mail provider.
#[task(
    name = "quickstart.send_confirmation",
    bind = true,
    autoretry_for = ["SmtpTimeout"],
    retry_backoff = true,
    retry_backoff_max = 2,
    max_retries = 3
)]
async fn send_confirmation(req: Request, order_id: u64, sent_at_ms: i64) -> TaskResult<i64> {
    // Returns when it was sent, so the producer can measure send → done from the result.
    // Simulated I/O with the mail provider.
    tokio::time::sleep(Duration::from_millis(5 + order_id % 15)).await;
    if req.retries < planned_failures(order_id) {
        return Err(TaskError::new("SmtpTimeout", format!("mail provider timed out for order {order_id}")));
    }
    Ok(sent_at_ms)
}

struct Args {
    tasks: u64,
    broker: Option<String>,
    backend: Option<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args { tasks: 300, broker: None, backend: None };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--tasks" => args.tasks = value()?.parse().context("--tasks takes a number")?,
            "--broker" => args.broker = Some(value()?),
            "--backend" => args.backend = Some(value()?),
            "-h" | "--help" => {
                println!("usage: quickstart [--tasks N] [--broker URL] [--backend URL]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if args.tasks <= DOOMED {
        bail!("--tasks must be more than {DOOMED} so the doomed order is included");
    }
    Ok(args)
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    celeriac::cli::init_logging("error", celeriac::cli::LogFormat::Human);
    let args = parse_args()?;
    let default_db = std::env::temp_dir().join(format!("celeriac-quickstart-{}.db", std::process::id()));
    let broker = args.broker.clone().unwrap_or_else(|| format!("sqlite://{}", default_db.display()));
    let mut builder = App::builder().broker_url(&broker).task(send_confirmation).error_reporter(|f: &FailureReport| {
        // Stand-in for an error tracker such as Sentry: every final failure arrives here once.
        println!("[error reporter] {} {} failed after {} retries: {}", f.task_name, f.task_id, f.retries, f.exc);
    });
    if let Some(b) = &args.backend {
        builder = builder.result_backend(b);
    }
    let app = builder.build().await?;
    for q in app.broker().stats().await? {
        if q.ready + q.scheduled + q.leased > 0 {
            bail!("queue {} on {broker} is not empty; use a fresh broker", q.queue);
        }
    }
    println!("broker {} · backend {}", app.broker().url(), app.backend().url());

    // Producer: hand off every order and get a task id back at once (the 202-style hand-off).
    let started = Instant::now();
    let mut ids = Vec::new();
    let mut enqueue_us = Vec::new();
    for order in 1..=args.tasks {
        let t = Instant::now();
        let r = send_confirmation::delay(&app, order, Utc::now().timestamp_millis()).await?;
        enqueue_us.push(t.elapsed().as_micros() as i64);
        ids.push((order, r));
    }
    let enqueue_time = started.elapsed();

    // Embedded worker.
    let mut worker = Worker::new(&app);
    worker.options_mut().concurrency = 32;
    worker.options_mut().poll_wait = Duration::from_millis(100);
    let stats = worker.stats();
    let (shutdown, handle) = worker.spawn();
    let bar = ProgressBar::new(args.tasks).with_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} finished · {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let deadline = Instant::now() + Duration::from_secs(50);
    loop {
        let s = stats.snapshot();
        let finished = s.succeeded + s.failed;
        bar.set_position(finished);
        bar.set_message(format!("{} retries, {} dead-lettered", s.retried, s.dead_lettered));
        if finished >= args.tasks || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish();
    shutdown.graceful();
    let summary = handle.await?;
    let elapsed = started.elapsed();

    // Read every result back and check the books.
    let (mut done, mut failed, mut other) = (0u64, 0u64, 0u64);
    let mut latencies = Vec::new();
    for (order, r) in &ids {
        let meta = r.meta().await?;
        match meta.status {
            State::Success => {
                done += 1;
                if let (Some(done_at), Some(sent_at)) = (meta.date_done_time(), meta.result.as_i64()) {
                    latencies.push(done_at.timestamp_millis() - sent_at);
                }
            }
            State::Failure => {
                failed += 1;
                if *order != DOOMED {
                    bail!("order {order} failed but should have succeeded");
                }
            }
            s => {
                other += 1;
                eprintln!("order {order} ended in state {s}");
            }
        }
    }
    latencies.sort_unstable();
    enqueue_us.sort_unstable();
    let dead = app.broker().dead_letters(100).await?;
    let expected_retries: u64 = (1..=args.tasks).map(|id| u64::from(planned_failures(id).min(3))).sum();

    println!();
    println!("┌──────────────────────────────┬──────────────┐");
    let row = |k: &str, v: String| println!("│ {k:<28} │ {v:>12} │");
    row("tasks enqueued", args.tasks.to_string());
    row("done (SUCCESS)", done.to_string());
    row("retried (runs)", summary.retried.to_string());
    row("failed for good", failed.to_string());
    row("dead-lettered", dead.len().to_string());
    row("not finished", other.to_string());
    row("enqueue p50 / p99 (µs)", format!("{} / {}", percentile(&enqueue_us, 0.5), percentile(&enqueue_us, 0.99)));
    row("enqueue rate (tasks/s)", format!("{:.0}", args.tasks as f64 / enqueue_time.as_secs_f64()));
    row("send→done p50 (ms)", percentile(&latencies, 0.5).to_string());
    row("send→done p99 (ms)", percentile(&latencies, 0.99).to_string());
    row("wall time (s)", format!("{:.1}", elapsed.as_secs_f64()));
    println!("└──────────────────────────────┴──────────────┘");

    let mut problems = Vec::new();
    if done + failed + other != args.tasks {
        problems.push(format!("{} results for {} tasks", done + failed + other, args.tasks));
    }
    if other > 0 {
        problems.push(format!("{other} task(s) never finished"));
    }
    if done != args.tasks - 1 || failed != 1 {
        problems.push(format!("expected {} done and 1 failed, got {done} and {failed}", args.tasks - 1));
    }
    if summary.retried != expected_retries {
        problems.push(format!("expected {expected_retries} retries, counted {}", summary.retried));
    }
    if summary.succeeded != done || summary.failed != failed {
        problems.push(format!(
            "worker counted {} succeeded / {} failed, backend has {done} / {failed}",
            summary.succeeded, summary.failed
        ));
    }
    let doomed_id = ids.iter().find(|(o, _)| *o == DOOMED).map(|(_, r)| r.id().to_owned());
    if dead.len() != 1 || dead[0].task_id != doomed_id {
        problems.push(format!("expected exactly the doomed order in the dead-letter queue, found {}", dead.len()));
    }
    if args.broker.is_none() {
        let _ = std::fs::remove_file(&default_db);
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", default_db.display()));
        }
    }
    if !problems.is_empty() {
        bail!("the books do not balance: {}", problems.join("; "));
    }
    println!("all {} tasks accounted for: none lost, none counted twice", args.tasks);
    Ok(())
}
