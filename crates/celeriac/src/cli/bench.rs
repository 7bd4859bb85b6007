//! `celeriac bench`: throughput and latency of this build against a real broker, with the
//! counts checked (every task enqueued runs once and, where stored, its result is there).
//! Prints one JSON line per figure and a table. Producer and worker run in this process; the
//! RSS reported is the whole process's peak.

use crate::app::{App, AppBuilder};
use crate::canvas::{chain, chord};
use crate::{Signature, TaskResult, Worker, task};
use serde_json::json;
use std::time::{Duration, Instant};

/// Does nothing (the no-op task of the benchmarks).
#[task(name = "celeriac.bench.noop", ignore_result = true)]
pub async fn noop() -> TaskResult<()> {
    Ok(())
}

/// Does nothing and stores a result.
#[task(name = "celeriac.bench.echo")]
pub async fn echo(n: u64) -> TaskResult<u64> {
    Ok(n)
}

/// Does nothing, acknowledged after it ran.
#[task(name = "celeriac.bench.late", ignore_result = true, acks_late = true)]
pub async fn late() -> TaskResult<()> {
    Ok(())
}

/// Sums a chord header.
#[task(name = "celeriac.bench.count")]
pub async fn count(values: Vec<u64>) -> TaskResult<usize> {
    Ok(values.len())
}

/// Registers the benchmark tasks.
pub fn register(builder: AppBuilder) -> AppBuilder {
    builder.task(noop).task(echo).task(late).task(count)
}

/// One measured figure.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Scenario name.
    pub scenario: String,
    /// What was counted (tasks, chords, round trips).
    pub tasks: u64,
    /// Throughput, per second.
    pub per_second: f64,
    /// Latency percentiles in ms, where measured.
    pub p50_ms: Option<f64>,
    /// 99th percentile in ms.
    pub p99_ms: Option<f64>,
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() { 0.0 } else { sorted[((sorted.len() - 1) as f64 * p).round() as usize] }
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

async fn empty_queue(app: &App) -> Result<(), Failure> {
    let queue = app.config().task_default_queue.clone();
    app.broker().purge(&queue).await?;
    Ok(())
}

fn worker(app: &App, concurrency: usize) -> Worker {
    let mut w = Worker::new(app);
    w.options_mut().concurrency = concurrency;
    w.options_mut().poll_wait = Duration::from_millis(50);
    w.options_mut().prefetch_multiplier = 64;
    w
}

async fn burn_down(app: &App, name: &str, sig: Signature, tasks: u64, concurrency: usize) -> Result<Figure, Failure> {
    empty_queue(app).await?;
    for _ in 0..tasks {
        app.send_signature(sig.clone()).await?;
    }
    let w = worker(app, concurrency);
    let stats = w.stats();
    let started = Instant::now();
    let (shutdown, handle) = w.spawn();
    let deadline = started + Duration::from_secs(600);
    while stats.snapshot().processed < tasks && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    shutdown.graceful();
    let summary = handle.await?;
    if summary.processed != tasks || summary.succeeded != tasks {
        return Err(format!(
            "{name}: {tasks} enqueued but {} processed, {} succeeded",
            summary.processed, summary.succeeded
        )
        .into());
    }
    Ok(Figure {
        scenario: name.into(),
        tasks,
        per_second: tasks as f64 / elapsed.as_secs_f64(),
        p50_ms: None,
        p99_ms: None,
    })
}

/// Runs `scenario` (`enqueue`, `noop`, `results`, `acks-late`, `latency`, `chain`, `chord`,
/// `all`) with `tasks` tasks.
pub async fn run(app: &App, scenario: &str, tasks: u64, concurrency: usize) -> Result<Vec<Figure>, Failure> {
    let mut out = Vec::new();
    let all = scenario == "all";
    if all || scenario == "enqueue" {
        empty_queue(app).await?;
        let started = Instant::now();
        for _ in 0..tasks {
            noop::delay(app).await?;
        }
        out.push(Figure {
            scenario: "enqueue".into(),
            tasks,
            per_second: tasks as f64 / started.elapsed().as_secs_f64(),
            p50_ms: None,
            p99_ms: None,
        });
        empty_queue(app).await?;
    }
    if all || scenario == "noop" {
        out.push(burn_down(app, "noop", noop::s(), tasks, concurrency).await?);
    }
    if all || scenario == "results" {
        let fig = burn_down(app, "results", echo::s(7), tasks, concurrency).await?;
        out.push(fig);
    }
    if all || scenario == "acks-late" {
        out.push(burn_down(app, "acks-late", late::s(), tasks, concurrency).await?);
    }
    if all || scenario == "latency" {
        let (shutdown, handle) = worker(app, concurrency).spawn();
        let rounds = tasks.min(2_000);
        let mut ms = Vec::with_capacity(rounds as usize);
        let started = Instant::now();
        for n in 0..rounds {
            let t = Instant::now();
            let got: u64 = echo::delay(app, n).await?.get(Duration::from_secs(10)).await?;
            if got != n {
                return Err(format!("latency: sent {n}, got {got}").into());
            }
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let per_second = rounds as f64 / started.elapsed().as_secs_f64();
        shutdown.graceful();
        handle.await?;
        ms.sort_by(f64::total_cmp);
        out.push(Figure {
            scenario: "delay().get()".into(),
            tasks: rounds,
            per_second,
            p50_ms: Some(percentile(&ms, 0.5)),
            p99_ms: Some(percentile(&ms, 0.99)),
        });
    }
    if all || scenario == "chain" {
        let (shutdown, handle) = worker(app, concurrency).spawn();
        let chains = (tasks / 3).clamp(1, 5_000);
        let started = Instant::now();
        let mut results = Vec::with_capacity(chains as usize);
        for n in 0..chains {
            results.push(chain([echo::s(n), echo::si(n), echo::si(n)]).delay(app).await?);
        }
        for r in &results {
            r.get::<serde_json::Value>(Duration::from_secs(120)).await?;
        }
        let per_second = (chains * 3) as f64 / started.elapsed().as_secs_f64();
        shutdown.graceful();
        handle.await?;
        out.push(Figure { scenario: "chain of 3".into(), tasks: chains * 3, per_second, p50_ms: None, p99_ms: None });
    }
    if all || scenario == "chord" {
        let (shutdown, handle) = worker(app, concurrency).spawn();
        for size in [100u64, 10_000] {
            let started = Instant::now();
            let r = chord((0..size).map(echo::s), Signature::new("celeriac.bench.count", vec![])).delay(app).await?;
            let n: usize = r.get(Duration::from_secs(300)).await?;
            if n as u64 != size {
                return Err(format!("chord of {size}: body saw {n} results").into());
            }
            let secs = started.elapsed().as_secs_f64();
            out.push(Figure {
                scenario: format!("chord of {size}"),
                tasks: size,
                per_second: size as f64 / secs,
                p50_ms: Some(secs * 1000.0),
                p99_ms: None,
            });
        }
        shutdown.graceful();
        handle.await?;
    }
    if out.is_empty() {
        return Err(format!(
            "unknown scenario {scenario:?}: use enqueue, noop, results, acks-late, latency, chain, chord or all"
        )
        .into());
    }
    Ok(out)
}

/// Prints the figures as JSON lines and a table.
pub fn report(broker: &str, figures: &[Figure]) {
    let rss = rss_mib();
    for f in figures {
        println!(
            "{}",
            json!({"scenario": f.scenario, "broker": broker, "tasks": f.tasks, "per_s": (f.per_second * 10.0).round() / 10.0,
                   "p50_ms": f.p50_ms, "p99_ms": f.p99_ms, "rss_mib": (rss * 10.0).round() / 10.0})
        );
    }
    println!("\n{:<16} {:>8} {:>12} {:>10} {:>10}", "scenario", "tasks", "per second", "p50 ms", "p99 ms");
    for f in figures {
        let ms = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
        println!("{:<16} {:>8} {:>12.0} {:>10} {:>10}", f.scenario, f.tasks, f.per_second, ms(f.p50_ms), ms(f.p99_ms));
    }
    println!("peak RSS of this process (producer + worker): {rss:.1} MiB");
}
