//! `celeriac beat` (run until a signal), `celeriac beat --list`, and beat inside a worker.

use super::BeatArgs;
use crate::app::App;
use crate::beat::{Beat, BeatOptions};
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

type Failure = Box<dyn std::error::Error + Send + Sync>;

pub(super) async fn run(app: &App, args: BeatArgs) -> Result<ExitCode, Failure> {
    let lease = Duration::try_from_secs_f64(args.lease)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("--lease {} is not a number of seconds above 0", args.lease))?;
    let beat = Beat::new(app).await?.options(BeatOptions { lease, ..BeatOptions::default() });
    if args.list {
        list(&beat).await?;
        return Ok(ExitCode::SUCCESS);
    }
    if app.beat_entries().is_empty() {
        tracing::warn!(
            "beat has no entries: add [beat_schedule.<name>] tables to the config or AppBuilder::beat_entry"
        );
    }
    let stop = CancellationToken::new();
    let signals = tokio::spawn(stop_on_signal(stop.clone()));
    let sent = beat.run(stop).await;
    signals.abort();
    println!("beat sent {sent} task(s)");
    Ok(ExitCode::SUCCESS)
}

async fn stop_on_signal(stop: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            stop.cancel();
            return;
        }
    }
    if tokio::signal::ctrl_c().await.is_ok() {
        stop.cancel();
    }
}

async fn list(beat: &Beat) -> Result<(), Failure> {
    let now = chrono::Utc::now();
    match beat.leader().await? {
        Some(l) => println!("leader: {} (token {})", l.holder, l.token),
        None => println!("leader: none (no beat is running)"),
    }
    let entries = beat.list(now).await?;
    if entries.is_empty() {
        println!("no beat entries (beat_schedule is empty)");
    }
    let when = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map_or_else(|| "-".to_owned(), |t| t.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string())
    };
    println!(
        "{:<20} {:<28} {:<32} {:<18} {:<14} {:<26} NEXT RUN",
        "ENTRY", "TASK", "SCHEDULE", "ZONE", "MISSED", "LAST RUN"
    );
    for s in entries {
        let next = if s.entry.enabled { when(s.next) } else { "disabled".to_owned() };
        println!(
            "{:<20} {:<28} {:<32} {:<18} {:<14} {:<26} {}",
            s.entry.name,
            s.entry.task,
            s.entry.schedule.to_string(),
            s.timezone.name(),
            s.entry.missed.to_string(),
            when(s.last.map(|l| l.tick)),
            next
        );
    }
    Ok(())
}

/// Starts beat beside a worker (`worker --beat`); cancel the token to stop it.
pub(super) async fn spawn_in_worker(app: &App) -> Result<(CancellationToken, tokio::task::JoinHandle<u64>), Failure> {
    let beat = Beat::new(app).await?;
    let stop = CancellationToken::new();
    Ok((stop.clone(), tokio::spawn(beat.run(stop))))
}
