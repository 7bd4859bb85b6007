//! `celeriac bench`: throughput and latency of this build against a real broker, every count
//! checked (each task enqueued runs once and, where stored, its result is there), or the run
//! fails.
//!
//! The producer (this process) and the worker (a child process: this binary again, `bench
//! --child`) are apart, so the worker's peak RSS is its own. Burn-down scenarios enqueue first,
//! then start the worker and time it from its start (the queue already full) until the last
//! task settled; the worker reports its own time and memory. Prints one JSON line per figure and a table.

use crate::app::{App, AppBuilder};
use crate::canvas::{chain, chord};
use crate::{Signature, TaskResult, Worker, task};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Does nothing (the no-op task of the benchmarks).
#[task(name = "celeriac.bench.noop", ignore_result = true)]
pub async fn noop() -> TaskResult<()> {
    Ok(())
}

/// Does nothing and stores its argument as the result.
#[task(name = "celeriac.bench.echo")]
pub async fn echo(n: u64) -> TaskResult<u64> {
    Ok(n)
}

/// Does nothing, acknowledged after it ran.
#[task(name = "celeriac.bench.late", ignore_result = true, acks_late = true)]
pub async fn late() -> TaskResult<()> {
    Ok(())
}

/// Returns when it started (µs since the epoch), for enqueue→start latency.
#[task(name = "celeriac.bench.stamp")]
pub async fn stamp(_sent_us: i64) -> TaskResult<i64> {
    Ok(chrono::Utc::now().timestamp_micros())
}

/// Counts a chord header.
#[task(name = "celeriac.bench.count")]
pub async fn count(values: Vec<u64>) -> TaskResult<usize> {
    Ok(values.len())
}

/// Registers the benchmark tasks.
pub fn register(builder: AppBuilder) -> AppBuilder {
    builder.task(noop).task(echo).task(late).task(stamp).task(count)
}

/// The scenarios, in the order `all` runs them.
pub const SCENARIOS: [&str; 8] = ["enqueue", "noop", "results", "acks-late", "latency", "chain", "chord", "sqlite"];

/// One measured figure: printed as one JSON line.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Scenario name (`noop`, `enqueue (batched)`, `chord of 10000`, ...).
    pub scenario: String,
    /// The JSON fields.
    pub fields: serde_json::Map<String, Value>,
}

impl Figure {
    fn new(scenario: impl Into<String>) -> Self {
        Figure { scenario: scenario.into(), fields: serde_json::Map::new() }
    }

    fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.fields.insert(key.to_owned(), value.into());
        self
    }
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() { 0.0 } else { sorted[((sorted.len() - 1) as f64 * p).round() as usize] }
}

/// `VmHWM` (peak) or `VmRSS` (now) of this process, MiB.
fn rss_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

/// What the worker child reports when it exits.
#[derive(Debug, Clone, Default)]
struct ChildReport {
    processed: u64,
    succeeded: u64,
    seconds: f64,
    rss_idle_mib: f64,
    rss_peak_mib: f64,
}

/// The worker side: runs a worker until `exit_after` tasks are processed (or, with 0, until
/// stdin closes), then prints one JSON line with its counts, time and memory.
pub async fn child(app: &App, concurrency: usize, exit_after: u64) -> Result<(), Failure> {
    let idle = rss_mib("VmRSS:");
    let mut w = Worker::new(app);
    w.options_mut().concurrency = concurrency;
    let stats = w.stats();
    let (shutdown, handle) = w.spawn();
    println!("{}", json!({"ready": true, "rss_idle_mib": round(idle, 1)}));
    let started = Instant::now();
    if exit_after > 0 {
        loop {
            if stats.snapshot().processed >= exit_after {
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    } else {
        // Until the parent closes our stdin.
        let _ = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        })
        .await;
    }
    let seconds = started.elapsed().as_secs_f64();
    shutdown.graceful();
    let summary = handle.await?;
    println!(
        "{}",
        json!({"processed": summary.processed, "succeeded": summary.succeeded, "seconds": seconds,
               "rss_idle_mib": round(idle, 1), "rss_peak_mib": round(rss_mib("VmHWM:"), 1)})
    );
    Ok(())
}

/// A running worker child.
struct WorkerProcess {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    idle: f64,
}

impl WorkerProcess {
    fn spawn(broker: &str, backend: &str, concurrency: usize, exit_after: u64) -> Result<Self, Failure> {
        let exe = std::env::current_exe()?;
        // `BENCH_WORKER_WRAPPER="valgrind --tool=callgrind"` (or `perf record -g --`)
        // runs the worker under a profiler.
        let wrapper = std::env::var("BENCH_WORKER_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(words).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = command
            .args(["--broker", broker, "--backend", backend, "--loglevel", "warn", "bench", "--child"])
            .args(["-c", &concurrency.to_string(), "--tasks", &exit_after.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout from the worker")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready: Value = serde_json::from_str(&lines.next().ok_or("the worker exited before it was ready")??)?;
        let idle = ready["rss_idle_mib"].as_f64().unwrap_or(0.0);
        Ok(WorkerProcess { child, lines, idle })
    }

    /// Stops (closes stdin when it runs until told) and reads the report.
    fn finish(mut self) -> Result<ChildReport, Failure> {
        drop(self.child.stdin.take());
        let line = self.lines.next().ok_or("the worker exited without a report")??;
        let v: Value = serde_json::from_str(&line)?;
        let status = self.child.wait()?;
        if !status.success() {
            return Err(format!("the worker exited with {status}").into());
        }
        Ok(ChildReport {
            processed: v["processed"].as_u64().unwrap_or(0),
            succeeded: v["succeeded"].as_u64().unwrap_or(0),
            seconds: v["seconds"].as_f64().unwrap_or(0.0),
            rss_idle_mib: v["rss_idle_mib"].as_f64().unwrap_or(self.idle),
            rss_peak_mib: v["rss_peak_mib"].as_f64().unwrap_or(0.0),
        })
    }
}

/// The run's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Tasks per burn-down scenario.
    pub tasks: u64,
    /// Worker concurrency.
    pub concurrency: usize,
    /// Offered rate for `latency` (tasks/s); 0: half the measured `results` capacity.
    pub rate: f64,
}

async fn purge(app: &App) -> Result<(), Failure> {
    let queue = app.config().task_default_queue.clone();
    app.broker().purge(&queue).await?;
    Ok(())
}

/// Enqueues `n` copies of `sig` in batches of 1000; returns tasks/s and the ids.
async fn enqueue_batched(app: &App, sig: &Signature, n: u64) -> Result<(f64, Vec<String>), Failure> {
    use futures::StreamExt;
    let started = Instant::now();
    let mut ids = Vec::with_capacity(n as usize);
    // Batches of 1,000, two in flight: the next is built while the last is on its way.
    let sizes = (0..n.div_ceil(1000)).map(|i| (n - i * 1000).min(1000));
    let mut sent =
        futures::stream::iter(sizes).map(|k| app.send_batch((0..k).map(|_| sig.clone()).collect())).buffered(2);
    while let Some(batch) = sent.next().await {
        ids.extend(batch?.into_iter().map(|r| r.id().to_owned()));
    }
    Ok((n as f64 / started.elapsed().as_secs_f64(), ids))
}

fn urls(app: &App) -> (String, String) {
    (app.config().broker_url.clone(), app.config().result_backend_url().to_owned())
}

/// Burn-down: `n` pre-enqueued `sig`s drained by a fresh worker.
async fn burn_down(
    app: &App,
    name: &str,
    sig: Signature,
    s: &Settings,
    check_results: bool,
) -> Result<Figure, Failure> {
    purge(app).await?;
    let (_, ids) = enqueue_batched(app, &sig, s.tasks).await?;
    let (broker, backend) = urls(app);
    let worker = WorkerProcess::spawn(&broker, &backend, s.concurrency, s.tasks)?;
    let report = worker.finish()?;
    if report.processed != s.tasks || report.succeeded != s.tasks {
        return Err(format!(
            "{name}: {} enqueued but {} processed, {} succeeded",
            s.tasks, report.processed, report.succeeded
        )
        .into());
    }
    let queue = &app.config().task_default_queue;
    let left = app
        .broker()
        .stats()
        .await?
        .into_iter()
        .filter(|q| &q.queue == queue)
        .map(|q| q.ready + q.scheduled + q.leased)
        .sum::<u64>();
    if left != 0 {
        return Err(format!("{name}: {left} messages still in the broker after the run").into());
    }
    if check_results {
        let metas = app.backend().get_many(&ids).await?;
        let stored = metas.iter().filter(|m| m.as_ref().is_some_and(|m| m.status == crate::State::Success)).count();
        if stored as u64 != s.tasks {
            return Err(format!("{name}: {} tasks but {stored} results stored", s.tasks).into());
        }
    }
    Ok(Figure::new(name)
        .with("tasks", s.tasks)
        .with("tasks_per_s", round(s.tasks as f64 / report.seconds, 1))
        .with("worker_rss_mib", report.rss_peak_mib)
        .with("worker_rss_idle_mib", report.rss_idle_mib))
}

/// Runs one scenario (or `all`) and returns its figures.
pub async fn run(app: &App, scenario: &str, s: &Settings) -> Result<Vec<Figure>, Failure> {
    let wanted: Vec<&str> =
        if scenario == "all" { SCENARIOS.to_vec() } else { scenario.split(',').map(str::trim).collect() };
    if let Some(bad) = wanted.iter().find(|w| !SCENARIOS.contains(w)) {
        return Err(format!("unknown scenario {bad:?}: use {} or all", SCENARIOS.join(", ")).into());
    }
    let mut out = Vec::new();
    let mut capacity: Option<f64> = None;
    for w in wanted {
        match w {
            "enqueue" => {
                purge(app).await?;
                let single_n = s.tasks.min(20_000);
                let started = Instant::now();
                for _ in 0..single_n {
                    noop::delay(app).await?;
                }
                let single = single_n as f64 / started.elapsed().as_secs_f64();
                out.push(
                    Figure::new("enqueue (delay in a loop)")
                        .with("tasks", single_n)
                        .with("tasks_per_s", round(single, 1)),
                );
                purge(app).await?;
                let (batched, _) = enqueue_batched(app, &noop::s(), s.tasks).await?;
                out.push(
                    Figure::new("enqueue (batched)").with("tasks", s.tasks).with("tasks_per_s", round(batched, 1)),
                );
                purge(app).await?;
            }
            "noop" => out.push(burn_down(app, "noop", noop::s(), s, false).await?),
            "results" => {
                let f = burn_down(app, "results", echo::s(7), s, true).await?;
                capacity = f.fields.get("tasks_per_s").and_then(Value::as_f64);
                out.push(f);
            }
            "acks-late" => out.push(burn_down(app, "acks-late", late::s(), s, false).await?),
            "latency" => out.extend(latency(app, s, capacity).await?),
            "chain" => out.push(chains(app, s).await?),
            "chord" => out.extend(chords(app, s).await?),
            "sqlite" => out.push(sqlite(s).await?),
            _ => {}
        }
    }
    Ok(out)
}

async fn latency(app: &App, s: &Settings, capacity: Option<f64>) -> Result<Vec<Figure>, Failure> {
    purge(app).await?;
    let (broker, backend) = urls(app);
    let mut figures = Vec::new();
    // Round trips first, one at a time.
    let worker = WorkerProcess::spawn(&broker, &backend, s.concurrency, 0)?;
    let rounds = s.tasks.clamp(100, 2_000);
    let mut ms = Vec::with_capacity(rounds as usize);
    for n in 0..rounds {
        let t = Instant::now();
        let got: u64 = echo::delay(app, n).await?.get(Duration::from_secs(10)).await?;
        if got != n {
            return Err(format!("delay().get(): sent {n}, got {got}").into());
        }
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    figures.push(
        Figure::new("delay().get()")
            .with("tasks", rounds)
            .with("p50_ms", round(percentile(&ms, 0.5), 3))
            .with("p90_ms", round(percentile(&ms, 0.9), 3))
            .with("p99_ms", round(percentile(&ms, 0.99), 3)),
    );
    // Then a fixed offered rate: half the capacity measured by `results` (or --rate).
    let rate = if s.rate > 0.0 { s.rate } else { capacity.map(|c| c / 2.0).unwrap_or(5_000.0) };
    let total = ((rate * 5.0) as u64).clamp(1_000, s.tasks.max(1_000));
    let per_ms = rate / 1000.0;
    let started = Instant::now();
    let mut sent = 0u64;
    let mut ids = Vec::with_capacity(total as usize);
    let mut sent_at = std::collections::HashMap::with_capacity(total as usize);
    while sent < total {
        let due = ((started.elapsed().as_secs_f64() * 1000.0 * per_ms) as u64).min(total);
        if due > sent {
            let now_us = chrono::Utc::now().timestamp_micros();
            let batch: Vec<Signature> = (sent..due).map(|_| stamp::s(now_us)).collect();
            for r in app.send_batch(batch).await? {
                sent_at.insert(r.id().to_owned(), now_us);
                ids.push(r.id().to_owned());
            }
            sent = due;
        } else {
            tokio::time::sleep(Duration::from_micros(250)).await;
        }
    }
    let offered = total as f64 / started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    let metas = loop {
        let metas = app.backend().get_many(&ids).await?;
        if metas.iter().all(|m| m.as_ref().is_some_and(|m| m.status.is_ready())) || Instant::now() > deadline {
            break metas;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let report = worker.finish()?;
    let mut to_start = Vec::with_capacity(metas.len());
    let mut to_result = Vec::with_capacity(metas.len());
    for (id, meta) in ids.iter().zip(&metas) {
        let Some(meta) = meta else { return Err(format!("latency: no result for {id}").into()) };
        let sent = sent_at[id] as f64;
        let started = meta.result.as_i64().ok_or("latency: a result is not a time")? as f64;
        let done = meta.date_done_time().map(|t| t.timestamp_micros() as f64).ok_or("latency: no date_done")?;
        to_start.push((started - sent) / 1000.0);
        to_result.push((done - sent) / 1000.0);
    }
    to_start.sort_by(f64::total_cmp);
    to_result.sort_by(f64::total_cmp);
    for (name, v) in [("latency enqueue→start", &to_start), ("latency enqueue→result", &to_result)] {
        figures.push(
            Figure::new(name)
                .with("tasks", total)
                .with("offered_per_s", round(offered, 1))
                .with("p50_ms", round(percentile(v, 0.5), 3))
                .with("p90_ms", round(percentile(v, 0.9), 3))
                .with("p99_ms", round(percentile(v, 0.99), 3))
                .with("worker_rss_mib", report.rss_peak_mib),
        );
    }
    Ok(figures)
}

async fn chains(app: &App, s: &Settings) -> Result<Figure, Failure> {
    purge(app).await?;
    let (broker, backend) = urls(app);
    let worker = WorkerProcess::spawn(&broker, &backend, s.concurrency, 0)?;
    let n = (s.tasks / 3).clamp(1, 20_000);
    let started = Instant::now();
    let mut results = Vec::with_capacity(n as usize);
    for i in 0..n {
        results.push(chain([echo::s(i), echo::si(i), echo::si(i)]).delay(app).await?);
    }
    for r in &results {
        r.get::<Value>(Duration::from_secs(120)).await?;
    }
    let secs = started.elapsed().as_secs_f64();
    let report = worker.finish()?;
    if report.succeeded != n * 3 {
        return Err(format!("chain: {} chains of 3 but {} tasks succeeded", n, report.succeeded).into());
    }
    Ok(Figure::new("chain of 3")
        .with("tasks", n * 3)
        .with("tasks_per_s", round((n * 3) as f64 / secs, 1))
        .with("worker_rss_mib", report.rss_peak_mib))
}

async fn chords(app: &App, s: &Settings) -> Result<Vec<Figure>, Failure> {
    purge(app).await?;
    let (broker, backend) = urls(app);
    let worker = WorkerProcess::spawn(&broker, &backend, s.concurrency, 0)?;
    let mut figures = Vec::new();
    for size in [100u64, 10_000] {
        let started = Instant::now();
        let r = chord((0..size).map(echo::s), Signature::new("celeriac.bench.count", vec![])).delay(app).await?;
        let sent = started.elapsed().as_secs_f64();
        let n: usize = r.get(Duration::from_secs(300)).await?;
        if n as u64 != size {
            return Err(format!("chord of {size}: the body saw {n} results").into());
        }
        figures.push(
            Figure::new(format!("chord of {size}"))
                .with("tasks", size)
                .with("seconds", round(started.elapsed().as_secs_f64(), 3))
                .with("sent_after_s", round(sent, 3)),
        );
    }
    let report = worker.finish()?;
    for f in &mut figures {
        f.fields.insert("worker_rss_mib".into(), report.rss_peak_mib.into());
    }
    Ok(figures)
}

/// The embedded default: SQLite broker and backend in a temporary file, results stored.
async fn sqlite(s: &Settings) -> Result<Figure, Failure> {
    let path = std::env::temp_dir().join(format!("celeriac-bench-{}.db", std::process::id()));
    let url = format!("sqlite://{}", path.display());
    let app = register(App::builder().broker_url(&url)).build().await?;
    let mut f = burn_down(&app, "sqlite (durable, results)", echo::s(7), s, true).await?;
    f.fields.insert("broker".into(), "sqlite".into());
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Ok(f)
}

/// Prints the figures as JSON lines, then a table.
pub fn report(broker: &str, figures: &[Figure]) {
    for f in figures {
        let mut line = serde_json::Map::new();
        line.insert("scenario".into(), f.scenario.clone().into());
        line.insert("broker".into(), broker.into());
        for (k, v) in &f.fields {
            line.insert(k.clone(), v.clone());
        }
        println!("{}", Value::Object(line));
    }
    println!();
    println!(
        "{:<28} {:>9} {:>12} {:>9} {:>9} {:>9} {:>9}",
        "scenario", "tasks", "tasks/s", "p50 ms", "p99 ms", "seconds", "RSS MiB"
    );
    let num = |f: &Figure, k: &str, digits: usize| {
        f.fields.get(k).and_then(Value::as_f64).map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "-".into())
    };
    for f in figures {
        println!(
            "{:<28} {:>9} {:>12} {:>9} {:>9} {:>9} {:>9}",
            f.scenario,
            num(f, "tasks", 0),
            num(f, "tasks_per_s", 0),
            num(f, "p50_ms", 3),
            num(f, "p99_ms", 3),
            num(f, "seconds", 3),
            num(f, "worker_rss_mib", 1)
        );
    }
}
