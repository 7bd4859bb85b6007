//! The order-processing workflow from the field, end to end.
//!
//! An API-style producer takes N orders and answers each within a few milliseconds with a task
//! id (the 202-style hand-off). Each order runs
//! `chain(validate_payment → reserve_inventory → create_shipment)` then a group of
//! notifications (email, SMS) joined by a chord into a summary. The third-party calls are
//! simulated flaky (timeouts and 5xx) and retried with exponential back-off and jitter; an order
//! that exhausts its retries is rolled back by its compensations (release inventory, refund
//! payment), reported to the error reporter, and dead-lettered. An embedded worker runs it all
//! on SQLite by default; the demo checks its own books and exits non-zero if they disagree.
//!
//! ```text
//! cargo run --example orders -- [--orders 200] [--broker URL] [--backend URL] [--seed N]
//! ```

use anyhow::{Context, bail};
use celeriac::canvas::{chain, group, saga};
use celeriac::{App, FailureReport, Signature, State, TaskError, TaskResult, Worker, task};
use chrono::Utc;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Orders whose address no carrier serves: shipping fails on every attempt.
fn doomed(order_id: u64) -> bool {
    order_id % 40 == 7
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: u64,
    customer: String,
    amount_cents: u64,
    sku: String,
    quantity: u32,
}

static FLAKY: Mutex<Option<rand::rngs::StdRng>> = Mutex::new(None);
static FLAKE_RATE: Mutex<f64> = Mutex::new(0.12);
static REFUNDS: AtomicU64 = AtomicU64::new(0);
static RELEASES: AtomicU64 = AtomicU64::new(0);

/// What happened to each order, counted by the tasks themselves: how many times each step
/// succeeded, so the books can tell a step that ran twice from one that ran once.
#[derive(Debug, Default, Clone, Copy)]
struct Ledger {
    paid: u32,
    reserved: u32,
    shipped: u32,
    refunded: u32,
    released: u32,
}

static LEDGER: Mutex<BTreeMap<u64, Ledger>> = Mutex::new(BTreeMap::new());

fn record(order_id: u64, f: impl FnOnce(&mut Ledger)) {
    f(LEDGER.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(order_id).or_default());
}

/// The order id at the front of a `pay-<id>-...` / `res-<id>-...` reference.
fn order_of(reference: &str) -> Option<u64> {
    reference.split('-').nth(1)?.parse().ok()
}

/// A simulated third-party call: a few ms of latency, sometimes a timeout or a 5xx.
async fn third_party(service: &str, order_id: u64) -> Result<(), TaskError> {
    let (latency, roll) = {
        let mut guard = FLAKY.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let rng = guard.get_or_insert_with(|| rand::rngs::StdRng::seed_from_u64(1));
        (rng.random_range(2..12), rng.random::<f64>())
    };
    tokio::time::sleep(Duration::from_millis(latency)).await;
    let rate = *FLAKE_RATE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if roll < rate / 2.0 {
        return Err(TaskError::new("Timeout", format!("{service} timed out for order {order_id}")));
    }
    if roll < rate {
        return Err(TaskError::new("HttpError", format!("{service} answered 503 for order {order_id}")));
    }
    Ok(())
}

#[task(name = "orders.validate_payment", autoretry_for = ["Timeout", "HttpError"], retry_backoff = true, retry_backoff_max = 2, max_retries = 4)]
async fn validate_payment(order: Order) -> TaskResult<String> {
    third_party("payment gateway", order.id).await?;
    record(order.id, |l| l.paid += 1);
    Ok(format!("pay-{}-{}", order.id, order.amount_cents))
}

#[task(name = "orders.reserve_inventory", autoretry_for = ["Timeout", "HttpError"], retry_backoff = true, retry_backoff_max = 2, max_retries = 4)]
async fn reserve_inventory(payment: String, order: Order) -> TaskResult<String> {
    third_party("inventory service", order.id).await?;
    record(order.id, |l| l.reserved += 1);
    Ok(format!("res-{}-{}x{}-{payment}", order.id, order.quantity, order.sku))
}

#[task(name = "orders.create_shipment", autoretry_for = ["Timeout", "HttpError"], retry_backoff = true, retry_backoff_max = 2, max_retries = 3)]
async fn create_shipment(reservation: String, order: Order) -> TaskResult<String> {
    if doomed(order.id) {
        return Err(TaskError::new("HttpError", format!("carrier answered 503: no carrier serves order {}", order.id)));
    }
    third_party("carrier", order.id).await?;
    record(order.id, |l| l.shipped += 1);
    Ok(format!("ship-{}-{}", order.id, reservation.len()))
}

#[task(name = "orders.notify_email", autoretry_for = ["Timeout", "HttpError"], retry_backoff = true, retry_backoff_max = 2, max_retries = 5)]
async fn notify_email(shipment: String) -> TaskResult<String> {
    third_party("mail provider", 0).await?;
    Ok(format!("email:{shipment}"))
}

#[task(name = "orders.notify_sms", autoretry_for = ["Timeout", "HttpError"], retry_backoff = true, retry_backoff_max = 2, max_retries = 5)]
async fn notify_sms(shipment: String) -> TaskResult<String> {
    third_party("sms gateway", 0).await?;
    Ok(format!("sms:{shipment}"))
}

#[task(name = "orders.summary")]
async fn summary(notifications: Vec<String>, order_id: u64, submitted_ms: i64) -> TaskResult<i64> {
    if notifications.len() != 2 {
        return Err(TaskError::value_error(format!(
            "order {order_id}: expected 2 notifications, got {notifications:?}"
        )));
    }
    Ok(submitted_ms)
}

#[task(name = "orders.release_inventory")]
async fn release_inventory(reservation: String) -> TaskResult<()> {
    RELEASES.fetch_add(1, Ordering::SeqCst);
    if let Some(id) = order_of(&reservation) {
        record(id, |l| l.released += 1);
    }
    tracing::debug!(%reservation, "inventory released");
    Ok(())
}

#[task(name = "orders.refund_payment")]
async fn refund_payment(payment: String) -> TaskResult<()> {
    REFUNDS.fetch_add(1, Ordering::SeqCst);
    if let Some(id) = order_of(&payment) {
        record(id, |l| l.refunded += 1);
    }
    tracing::debug!(%payment, "payment refunded");
    Ok(())
}

/// The workflow of one order.
fn workflow(order: &Order, submitted_ms: i64) -> Signature {
    let arg = |v: &Order| serde_json::to_value(v).unwrap_or_default();
    let after = |name: &str| Signature::new(name, vec![arg(order)]);
    chain([
        Signature::new("orders.validate_payment", vec![arg(order)])
            .compensate_with(Signature::new("orders.refund_payment", vec![])),
        after("orders.reserve_inventory").compensate_with(Signature::new("orders.release_inventory", vec![])),
        after("orders.create_shipment"),
        group([Signature::new("orders.notify_email", vec![]), Signature::new("orders.notify_sms", vec![])]),
        Signature::new("orders.summary", vec![order.id.into(), submitted_ms.into()]),
    ])
}

struct Args {
    orders: u64,
    broker: Option<String>,
    backend: Option<String>,
    seed: u64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args { orders: 200, broker: None, backend: None, seed: 42 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--orders" => args.orders = value()?.parse().context("--orders takes a number")?,
            "--broker" => args.broker = Some(value()?),
            "--backend" => args.backend = Some(value()?),
            "--seed" => args.seed = value()?.parse().context("--seed takes a number")?,
            "-h" | "--help" => {
                println!("usage: orders [--orders N] [--broker URL] [--backend URL] [--seed N]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if args.orders < 8 {
        bail!("--orders must be at least 8 so one order is doomed to fail");
    }
    Ok(args)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    celeriac::cli::init_logging("error", celeriac::cli::LogFormat::Human);
    let args = parse_args()?;
    *FLAKY.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
        Some(rand::rngs::StdRng::seed_from_u64(args.seed));
    let default_db = std::env::temp_dir().join(format!("celeriac-orders-{}.db", std::process::id()));
    let broker = args.broker.clone().unwrap_or_else(|| format!("sqlite://{}", default_db.display()));
    let reports: Arc<Mutex<Vec<FailureReport>>> = Arc::default();
    let sink = reports.clone();
    let mut builder = App::builder()
        .broker_url(&broker)
        .task(validate_payment)
        .task(reserve_inventory)
        .task(create_shipment)
        .task(notify_email)
        .task(notify_sms)
        .task(summary)
        .task(release_inventory)
        .task(refund_payment)
        .error_reporter(move |f: &FailureReport| {
            // Stand-in for Sentry: one event per final failure, with its workflow context.
            println!(
                "[error reporter] order workflow {} step {} failed after {} retries ({}); compensations: {}",
                f.root_id.as_deref().unwrap_or("-"),
                f.task_name,
                f.retries,
                f.exc.exc_type,
                f.compensations.join(" → ")
            );
            sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(f.clone());
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

    // The embedded worker starts first, as a deployed one would already be running.
    let mut worker = Worker::new(&app);
    worker.options_mut().concurrency = 64;
    worker.options_mut().poll_wait = Duration::from_millis(100);
    let stats = worker.stats();
    let (shutdown, handle) = worker.spawn();

    // The API: each order answered with a task id within a few ms.
    let started = Instant::now();
    let mut submitted = Vec::new();
    let mut handoff_ms = Vec::new();
    for id in 1..=args.orders {
        let order = Order {
            id,
            customer: format!("customer-{}", id % 37),
            amount_cents: 1_000 + id * 7,
            sku: format!("SKU-{}", id % 11),
            quantity: 1 + (id % 3) as u32,
        };
        let t = Instant::now();
        let first_step = uuid::Uuid::new_v4().to_string();
        let mut flow = workflow(&order, Utc::now().timestamp_millis());
        if let Some(serde_json::Value::Array(tasks)) = flow.kwargs.get_mut("tasks")
            && let Some(first) = tasks.first_mut().and_then(serde_json::Value::as_object_mut)
            && let Some(serde_json::Value::Object(options)) = first.get_mut("options")
        {
            options.insert("task_id".into(), first_step.clone().into());
        }
        let result = flow.delay(&app).await?;
        handoff_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        submitted.push((order.id, first_step, result));
    }

    let bar = ProgressBar::new(args.orders).with_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} orders settled · {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let deadline = Instant::now() + Duration::from_secs(55);
    let mut settled: Vec<Option<(State, Option<String>)>> = vec![None; submitted.len()];
    loop {
        for (i, (_, first, result)) in submitted.iter().enumerate() {
            if settled[i].is_some() {
                continue;
            }
            let meta = result.meta().await?;
            match meta.status {
                State::Success => settled[i] = Some((State::Success, meta.date_done.clone())),
                State::Failure => match saga::rollback(&app, first).await? {
                    Some(rb) if rb.state != "running" => settled[i] = Some((State::Failure, Some(rb.state))),
                    Some(_) => {}
                    // Failed at the first step: nothing to undo, so no rollback is recorded.
                    None if meta.extra.get("rollback").is_none() => settled[i] = Some((State::Failure, None)),
                    None => {}
                },
                _ => {}
            }
        }
        let n = settled.iter().filter(|s| s.is_some()).count() as u64;
        let s = stats.snapshot();
        bar.set_position(n);
        bar.set_message(format!("{} retries, {} dead-lettered", s.retried, s.dead_lettered));
        if n == args.orders || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish();
    shutdown.graceful();
    let summary_counts = handle.await?;
    let wall = started.elapsed();

    // The books.
    let mut done = 0u64;
    let mut compensated = 0u64;
    let mut failed_first = 0u64;
    let ledger = LEDGER.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let mut e2e_ms = Vec::new();
    let mut problems = Vec::new();
    for (i, (order_id, first, result)) in submitted.iter().enumerate() {
        match &settled[i] {
            Some((State::Success, date_done)) => {
                done += 1;
                let meta = result.meta().await?;
                if let (Some(submitted_ms), Some(t)) =
                    (meta.result.as_i64(), date_done.as_deref().and_then(celeriac::protocol::time::parse_iso))
                {
                    e2e_ms.push((t.timestamp_millis() - submitted_ms) as f64);
                }
                if saga::rollback(&app, first).await?.is_some() {
                    problems.push(format!("order {order_id} succeeded but was rolled back"));
                }
                let l = ledger.get(order_id).copied().unwrap_or_default();
                if (l.paid, l.reserved, l.shipped, l.refunded, l.released) != (1, 1, 1, 0, 0) {
                    problems.push(format!("order {order_id} done, but its steps ran {l:?} (each once expected)"));
                }
            }
            Some((_, Some(state))) => {
                compensated += 1;
                if state != "done" {
                    problems.push(format!("order {order_id}: rollback ended {state}"));
                }
                let l = ledger.get(order_id).copied().unwrap_or_default();
                // Every step that succeeded is undone once; nothing is shipped.
                if l.paid != 1 || l.refunded != 1 || l.released != l.reserved || l.reserved > 1 || l.shipped != 0 {
                    problems.push(format!("order {order_id} rolled back, but its books say {l:?}"));
                }
            }
            Some((_, None)) => {
                failed_first += 1;
                let l = ledger.get(order_id).copied().unwrap_or_default();
                if (l.paid, l.refunded, l.released) != (0, 0, 0) {
                    problems.push(format!("order {order_id} failed at payment, but its books say {l:?}"));
                }
            }
            _ => problems.push(format!("order {order_id} never settled (lost?)")),
        }
    }
    handoff_ms.sort_by(f64::total_cmp);
    e2e_ms.sort_by(f64::total_cmp);
    let dead = app.broker().dead_letters(10_000).await?;
    let reported = reports.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len() as u64;
    let doomed_count = (1..=args.orders).filter(|id| doomed(*id)).count() as u64;

    println!();
    println!("┌────────────────────────────────────┬──────────────┐");
    let row = |k: &str, v: String| println!("│ {k:<34} │ {v:>12} │");
    row("orders submitted", args.orders.to_string());
    row("orders done", done.to_string());
    row("orders compensated (rolled back)", compensated.to_string());
    if failed_first > 0 {
        row("orders failed at payment (no undo)", failed_first.to_string());
    }
    row(
        "  refunds / inventory releases",
        format!("{} / {}", REFUNDS.load(Ordering::SeqCst), RELEASES.load(Ordering::SeqCst)),
    );
    row("retries (all steps)", summary_counts.retried.to_string());
    row("dead-lettered", dead.len().to_string());
    row("error reports", reported.to_string());
    row("tasks run", summary_counts.processed.to_string());
    row(
        "hand-off p50 / p99 (ms)",
        format!("{:.2} / {:.2}", percentile(&handoff_ms, 0.5), percentile(&handoff_ms, 0.99)),
    );
    row("end-to-end p50 (ms)", format!("{:.0}", percentile(&e2e_ms, 0.5)));
    row("end-to-end p99 (ms)", format!("{:.0}", percentile(&e2e_ms, 0.99)));
    row("wall time (s)", format!("{:.1}", wall.as_secs_f64()));
    println!("└────────────────────────────────────┴──────────────┘");

    if done + compensated + failed_first != args.orders {
        problems.push(format!(
            "{done} done + {compensated} compensated + {failed_first} failed at payment != {} orders",
            args.orders
        ));
    }
    if compensated < doomed_count {
        problems.push(format!("expected at least the {doomed_count} doomed order(s) compensated, got {compensated}"));
    }
    let failed = compensated + failed_first;
    if dead.len() as u64 != failed || reported != failed {
        problems.push(format!("each failed order should be dead-lettered and reported once: {failed} failed, {} dead letters, {reported} reports", dead.len()));
    }
    if REFUNDS.load(Ordering::SeqCst) != compensated {
        problems.push(format!("{} refunds for {compensated} compensated orders", REFUNDS.load(Ordering::SeqCst)));
    }
    let reserved_then_failed: u64 = ledger.values().filter(|l| l.reserved == 1 && l.shipped == 0).count() as u64;
    if RELEASES.load(Ordering::SeqCst) != reserved_then_failed {
        problems.push(format!(
            "{} inventory releases for {reserved_then_failed} orders that reserved stock and did not ship",
            RELEASES.load(Ordering::SeqCst)
        ));
    }
    if summary_counts.retried == 0 {
        problems.push("no retries happened: the flaky services were not exercised".to_owned());
    }
    if args.broker.is_none() {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", default_db.display()));
        }
    }
    if !problems.is_empty() {
        bail!("the books do not balance:\n  {}", problems.join("\n  "));
    }
    println!("all {} orders accounted for: none lost, none counted twice", args.orders);
    Ok(())
}
