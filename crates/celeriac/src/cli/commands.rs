//! What each subcommand does.

use super::{CallArgs, Cli, Command, DlqAction, DlqFilter, InspectWhat, WorkerArgs};
use crate::app::{App, AppBuilder};
use crate::broker::{DeadLetter, DeadLetterFilter, replay_dead_letter};
use crate::protocol::{Message, TaskBody};
use crate::{Error, Signature, Worker};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};
use std::process::ExitCode;
use std::time::Duration;

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// The broker and backend given on the command line.
fn with_urls(mut builder: AppBuilder, cli: &Cli) -> AppBuilder {
    if let Some(b) = &cli.broker {
        builder = builder.broker_url(b);
    }
    if let Some(b) = &cli.backend {
        builder = builder.result_backend(b);
    }
    builder
}

/// A pool process of a `worker --pool process`: the same app, serving jobs from `socket`.
pub(super) async fn pool_child(builder: AppBuilder, cli: Cli, socket: std::path::PathBuf) -> Result<(), Failure> {
    let app = with_urls(builder, &cli).build().await?;
    crate::worker::pool::serve_child(&app, &socket).await?;
    Ok(())
}

/// Builds the app with CLI overrides and runs the subcommand.
pub(super) async fn run(builder: AppBuilder, cli: Cli) -> Result<ExitCode, Failure> {
    let mut builder = with_urls(builder, &cli);
    if matches!(cli.command, Command::Bench { .. }) {
        builder = super::bench::register(builder);
    }
    let app = builder.build().await?;
    match cli.command {
        Command::Worker(args) => worker(&app, args).await,
        Command::Call(args) => call(&app, args).await,
        Command::Result { id, wait, timeout } => result(&app, &id, wait, timeout).await,
        Command::Workflow { id } => match app.workflow(&id).await? {
            Some(w) => {
                print!("{w}");
                Ok(ExitCode::SUCCESS)
            }
            None => Err(format!(
                "no workflow recorded under {id:?} (workflows are recorded when a chain, group or chord is sent)"
            )
            .into()),
        },
        Command::Purge { queue } => {
            let queue = queue.unwrap_or_else(|| app.config().task_default_queue.clone());
            let n = app.broker().purge(&queue).await?;
            println!("purged {n} message(s) from {queue}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq { action } => dlq(&app, action).await,
        Command::Revoke { ids, terminate, expires } => {
            let expires = expires
                .map(|s| {
                    Duration::try_from_secs_f64(s).map_err(|_| format!("--expires {s} is not a number of seconds"))
                })
                .transpose()?;
            app.revoke(&ids, terminate, expires).await?;
            let what = if terminate { "revoked (running ones terminated)" } else { "revoked" };
            println!("{what}: {}", ids.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { what } => inspect(&app, what).await,
        Command::Beat(args) => super::beat::run(&app, args).await,
        Command::Bench { scenario, tasks, concurrency, rate, child } => {
            if child {
                super::bench::child(&app, concurrency, tasks).await?;
                return Ok(ExitCode::SUCCESS);
            }
            let settings = super::bench::Settings { tasks, concurrency, rate };
            let figures = super::bench::run(&app, &scenario, &settings).await?;
            super::bench::report(&app.broker().url(), &figures);
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn worker(app: &App, args: WorkerArgs) -> Result<ExitCode, Failure> {
    let mut worker = Worker::new(app);
    let o = worker.options_mut();
    if !args.queues.is_empty() {
        o.queues = args.queues;
    }
    if let Some(c) = args.concurrency {
        o.concurrency = c.max(1);
    }
    if let Some(m) = args.prefetch_multiplier {
        o.prefetch_multiplier = m;
    }
    o.disable_prefetch |= args.disable_prefetch;
    o.send_task_events |= args.task_events;
    if let Some(p) = args.pool {
        o.pool = p;
    }
    if let Some(n) = args.max_tasks_per_child {
        o.max_tasks_per_child = Some(n.max(1));
    }
    if let Some(kib) = args.max_memory_per_child {
        o.max_memory_per_child = Some(kib.max(1));
    }
    if let Some(h) = args.hostname {
        o.hostname = h;
    }
    if app.task_names().is_empty() {
        tracing::warn!(
            "this worker has no tasks registered: every message will be dead-lettered as unknown. Build a worker binary with celeriac::cli::main(App::builder().task(...))"
        );
    }
    let beat = if args.beat { Some(super::beat::spawn_in_worker(app).await?) } else { None };
    let summary = worker.run_until_signal().await;
    if let Some((stop, beat)) = beat {
        stop.cancel();
        beat.await.ok();
    }
    println!(
        "processed {} (succeeded {}, retried {}, failed {}, dead-lettered {}, revoked {})",
        summary.processed, summary.succeeded, summary.retried, summary.failed, summary.dead_lettered, summary.revoked
    );
    Ok(ExitCode::SUCCESS)
}

fn parse_json<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T, Failure> {
    serde_json::from_str(text).map_err(|e| format!("--{what} is not valid JSON ({e}): {text}").into())
}

async fn call(app: &App, args: CallArgs) -> Result<ExitCode, Failure> {
    let mut sig = Signature::new(&args.task, parse_json::<Vec<Value>>("args", &args.args)?);
    sig.kwargs = parse_json::<Map<String, Value>>("kwargs", &args.kwargs)?;
    if let Some(q) = &args.queue {
        sig = sig.queue(q);
    }
    if let Some(c) = args.countdown {
        sig = sig.countdown(c);
    }
    if let Some(e) = args.expires {
        sig = sig.expires_in(e);
    }
    if let Some(p) = args.priority {
        sig = sig.priority(p);
    }
    let res = app.send_signature(sig).await?;
    println!("{}", res.id());
    if args.wait {
        return result(app, res.id(), true, args.timeout).await;
    }
    Ok(ExitCode::SUCCESS)
}

async fn result(app: &App, id: &str, wait: bool, timeout: f64) -> Result<ExitCode, Failure> {
    let res = app.async_result(id);
    let meta = if wait {
        let spinner = ProgressBar::new_spinner().with_message(format!("waiting for {id}"));
        spinner.enable_steady_tick(Duration::from_millis(100));
        let got = res.wait_meta(Duration::from_secs_f64(timeout)).await;
        spinner.finish_and_clear();
        match got {
            Ok(m) => m,
            Err(e @ Error::Timeout { .. }) => {
                eprintln!("{e}");
                return Ok(ExitCode::from(2));
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        res.meta().await?
    };
    println!("{}", serde_json::to_string_pretty(&meta)?);
    Ok(if meta.status.propagates() { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

impl DlqFilter {
    fn parse(&self) -> Result<DeadLetterFilter, Failure> {
        let now = chrono::Utc::now();
        let time = |t: &Option<String>, flag: &str| {
            t.as_deref()
                .map(|t| crate::broker::ops::parse_time(t, now).map_err(|e| format!("--{flag}: {e}")))
                .transpose()
        };
        Ok(DeadLetterFilter {
            task: self.task.clone(),
            error: self.error.clone(),
            since: time(&self.since, "since")?,
            until: time(&self.until, "until")?,
        })
    }
}

/// Dead letters that pass `filter`, newest first, at most `limit`.
async fn matching(app: &App, filter: &DeadLetterFilter, limit: usize) -> Result<Vec<DeadLetter>, Failure> {
    let all = app.broker().dead_letters(if filter.is_empty() { limit } else { usize::MAX >> 1 }).await?;
    Ok(all.into_iter().filter(|d| filter.matches(d)).take(limit).collect())
}

async fn dlq(app: &App, action: DlqAction) -> Result<ExitCode, Failure> {
    let broker = app.broker();
    match action {
        DlqAction::List { limit, filter } => {
            let letters = matching(app, &filter.parse()?, limit).await?;
            if letters.is_empty() {
                println!("no dead letters{}", if filter.parse()?.is_empty() { "" } else { " match" });
            }
            for d in letters {
                let replayed = d.replayed_as.as_deref().map(|t| format!(" [replayed as {t}]")).unwrap_or_default();
                println!(
                    "{:>6}  {}  {:<10} {:<36} {:<30} {:<20} {}{replayed}",
                    d.id,
                    d.created_at.format("%Y-%m-%d %H:%M:%S"),
                    d.queue,
                    d.task_id.as_deref().unwrap_or("-"),
                    d.task_name.as_deref().unwrap_or("-"),
                    d.error_type.as_deref().unwrap_or("-"),
                    d.reason
                );
            }
        }
        DlqAction::Show { id } => {
            let d = broker.dead_letter_by_id(&id).await?.ok_or_else(|| format!("no dead letter with id {id:?}"))?;
            println!(
                "id:       {}\nqueue:    {}\ntask id:  {}\ntask:     {}\nerror:    {}\nretries:  {}\nreason:   {}\nat:       {}\nreplayed: {}",
                d.id,
                d.queue,
                d.task_id.as_deref().unwrap_or("-"),
                d.task_name.as_deref().unwrap_or("-"),
                d.error_type.as_deref().unwrap_or("-"),
                d.retries.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
                d.reason,
                d.created_at,
                d.replayed_as.as_deref().map(|t| format!("as task {t}")).unwrap_or_else(|| "no".into()),
            );
            match Message::from_wire(&d.payload) {
                Ok(m) => {
                    let body = m.task_body().map(|b: TaskBody| serde_json::json!({"args": b.args, "kwargs": b.kwargs}));
                    println!("headers:  {}", serde_json::to_string(&m.headers)?);
                    match body {
                        Ok(b) => println!("body:     {b}"),
                        Err(e) => println!("body:     (undecodable: {e})"),
                    }
                }
                Err(_) => println!("raw:      {}", String::from_utf8_lossy(&d.payload)),
            }
            if let Some(tb) = &d.traceback {
                println!("traceback:\n{tb}");
            }
        }
        DlqAction::Replay { ids, all, filter } => {
            let filter = filter.parse()?;
            if !ids.is_empty() && !filter.is_empty() {
                return Err("give dead-letter ids or filters with --all, not both".into());
            }
            let ids = if all {
                let letters = matching(app, &filter, usize::MAX >> 1).await?;
                letters.into_iter().filter(|d| d.replayed_as.is_none()).map(|d| d.id).collect()
            } else {
                ids
            };
            if ids.is_empty() {
                return Err("nothing to replay: give dead-letter ids or --all (with filters)".into());
            }
            let bar = ProgressBar::new(ids.len() as u64).with_style(
                ProgressStyle::with_template("replaying {bar:30} {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            let mut failed = 0;
            for id in ids {
                // `suspend`, not `println`: a hidden bar (output not a terminal) drops `println` lines.
                match replay_dead_letter(broker.as_ref(), &id).await {
                    Ok(task_id) => bar.suspend(|| println!("replayed {id} as task {task_id}")),
                    Err(e) => {
                        failed += 1;
                        bar.suspend(|| eprintln!("{e}"));
                    }
                }
                bar.inc(1);
            }
            bar.finish_and_clear();
            if failed > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        DlqAction::Purge { filter } => {
            let filter = filter.parse()?;
            if filter.is_empty() {
                println!("deleted {} dead letter(s)", broker.purge_dead_letters().await?);
            } else {
                let mut n = 0;
                for d in matching(app, &filter, usize::MAX >> 1).await? {
                    n += u64::from(broker.remove_dead_letter(&d.id).await?);
                }
                println!("deleted {n} dead letter(s)");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn inspect(app: &App, what: InspectWhat) -> Result<ExitCode, Failure> {
    match what {
        InspectWhat::Queues => {
            println!("{:<20} {:>8} {:>10} {:>8}", "queue", "ready", "scheduled", "leased");
            for s in app.broker().stats().await? {
                println!("{:<20} {:>8} {:>10} {:>8}", s.queue, s.ready, s.scheduled, s.leased);
            }
            println!("dead letters: {}", app.broker().dead_letters(usize::MAX >> 1).await?.len());
        }
        InspectWhat::Registered => {
            for name in app.task_names() {
                println!("{name}");
            }
        }
        InspectWhat::Conf => {
            let mut conf = app.config().clone();
            conf.broker_url = app.broker().url();
            conf.result_backend = Some(app.backend().url());
            println!("{}", toml::to_string(&conf)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}
