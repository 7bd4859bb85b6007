//! The command line: `worker`, `call`, `result`, `purge`, `dlq`, `revoke`, `inspect`.
//!
//! A user binary gets every subcommand with its own tasks registered:
//!
//! ```no_run
//! # use celeriac::{App, TaskResult, task};
//! #[task]
//! async fn add(x: i64, y: i64) -> TaskResult<i64> { Ok(x + y) }
//!
//! fn main() -> std::process::ExitCode {
//!     celeriac::cli::main(App::builder().from_env().task(add))
//! }
//! ```

mod beat;
pub mod bench;
mod commands;

use crate::app::AppBuilder;
use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use std::process::ExitCode;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(name = "celeriac", version, about = "A Celery-compatible task queue in Rust")]
pub struct Cli {
    /// Broker URL (overrides `broker_url`, `CELERY_BROKER_URL`).
    #[arg(long, short = 'b', global = true)]
    pub broker: Option<String>,
    /// Result backend URL (overrides `result_backend`, `CELERY_RESULT_BACKEND`).
    #[arg(long, global = true)]
    pub backend: Option<String>,
    /// Log level or filter (`info`, `debug`, `celeriac=trace`).
    #[arg(long, short = 'l', global = true, default_value = "info", env = "CELERIAC_LOG")]
    pub loglevel: String,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "CELERIAC_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a worker until SIGINT/SIGTERM (twice to stop at once).
    Worker(WorkerArgs),
    /// Send a task by name.
    Call(CallArgs),
    /// Show a task's stored result.
    Result {
        /// Task id.
        id: String,
        /// Wait for it to be ready.
        #[arg(long)]
        wait: bool,
        /// Seconds to wait.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Show a workflow (chain, group, chord) as a tree with each task's state, and its rollback.
    Workflow {
        /// The workflow's result id or first task id.
        id: String,
    },
    /// Delete every waiting message of a queue.
    Purge {
        /// Queue (default `task_default_queue`).
        #[arg(long, short = 'Q')]
        queue: Option<String>,
    },
    /// The dead-letter queue.
    Dlq {
        /// What to do with it.
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Measure throughput and latency against the configured broker (checks every count).
    Bench {
        /// enqueue, noop, results, acks-late, latency, chain, chord, sqlite (comma-separated),
        /// or all.
        #[arg(long, default_value = "all")]
        scenario: String,
        /// Tasks per burn-down scenario.
        #[arg(long, default_value_t = 20_000)]
        tasks: u64,
        /// Worker concurrency.
        #[arg(long, short = 'c', default_value_t = 64)]
        concurrency: usize,
        /// Offered rate for `latency`, tasks/s (default: half the `results` capacity).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Run as the benchmark's worker process (started by `bench` itself).
        #[arg(long, hide = true)]
        child: bool,
    },
    /// Send scheduled tasks (`beat_schedule`); any number may run, one leads and sends.
    Beat(BeatArgs),
    /// Revoke tasks for every worker (persisted in the broker, so restarts keep it).
    Revoke {
        /// Task ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Stop them if they are running.
        #[arg(long)]
        terminate: bool,
        /// Seconds the revoke stays in force (default `worker_revoke_expires`, 10800).
        #[arg(long)]
        expires: Option<f64>,
    },
    /// Look at queues and this binary's tasks.
    Inspect {
        /// What to show.
        #[command(subcommand)]
        what: InspectWhat,
    },
}

/// `worker` options.
#[derive(Debug, ClapArgs)]
pub struct WorkerArgs {
    /// Queues to consume, comma-separated.
    #[arg(long, short = 'Q', value_delimiter = ',')]
    pub queues: Vec<String>,
    /// Concurrent tasks (default `worker_concurrency` or CPUs).
    #[arg(long, short = 'c')]
    pub concurrency: Option<usize>,
    /// `worker_prefetch_multiplier`.
    #[arg(long)]
    pub prefetch_multiplier: Option<usize>,
    /// `worker_disable_prefetch`.
    #[arg(long)]
    pub disable_prefetch: bool,
    /// Node name (default `celeriac@<host>`).
    #[arg(long, short = 'n')]
    pub hostname: Option<String>,
    /// Send task events (`worker_send_task_events`), as Celery's `-E`.
    #[arg(long = "task-events", short = 'E')]
    pub task_events: bool,
    /// Also run beat in this worker (for small setups; other beats elect one leader with it).
    #[arg(long, short = 'B')]
    pub beat: bool,
    /// Where tasks run (`worker_pool`): `async` or `process` (child processes, killed at the
    /// hard time limit; `prefork` means `process`).
    #[arg(long, short = 'P', value_parser = parse_pool)]
    pub pool: Option<crate::worker::Pool>,
    /// Process pool: tasks a child runs before it is replaced (`worker_max_tasks_per_child`).
    #[arg(long)]
    pub max_tasks_per_child: Option<u64>,
    /// Process pool: resident KiB above which a child is replaced (`worker_max_memory_per_child`).
    #[arg(long)]
    pub max_memory_per_child: Option<u64>,
}

fn parse_pool(name: &str) -> Result<crate::worker::Pool, String> {
    crate::worker::Pool::parse(name).ok_or_else(|| format!("{name:?} is not a pool: use async or process"))
}

/// `beat` options.
#[derive(Debug, ClapArgs)]
pub struct BeatArgs {
    /// Show each entry with its last and next run and the current leader, then exit.
    #[arg(long)]
    pub list: bool,
    /// Lease seconds: a dead leader is replaced within about this long.
    #[arg(long, default_value_t = 10.0)]
    pub lease: f64,
}

/// `call` options.
#[derive(Debug, ClapArgs)]
pub struct CallArgs {
    /// Task name.
    pub task: String,
    /// Positional arguments as a JSON array.
    #[arg(long, short = 'a', default_value = "[]")]
    pub args: String,
    /// Keyword arguments as a JSON object.
    #[arg(long, short = 'k', default_value = "{}")]
    pub kwargs: String,
    /// Queue (default: routed).
    #[arg(long, short = 'Q')]
    pub queue: Option<String>,
    /// Seconds before it may run.
    #[arg(long)]
    pub countdown: Option<f64>,
    /// Seconds until it expires.
    #[arg(long)]
    pub expires: Option<f64>,
    /// Priority 0-9.
    #[arg(long)]
    pub priority: Option<u8>,
    /// Wait for the result and print it.
    #[arg(long)]
    pub wait: bool,
    /// Seconds to wait.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
}

/// `dlq` actions.
#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// List dead letters, newest first.
    List {
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Which ones.
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// Show one dead letter with its message.
    Show {
        /// Dead-letter id.
        id: String,
    },
    /// Put dead letters back on their queues as new tasks (new id, fresh retry budget,
    /// header `replayed_from`); the dead letter records `replayed_as`.
    Replay {
        /// Dead-letter ids.
        ids: Vec<String>,
        /// Replay all of them not replayed yet (or all that match the filters).
        #[arg(long)]
        all: bool,
        /// Which ones (with `--all`).
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// Delete every dead letter (or those that match the filters).
    Purge {
        /// Which ones.
        #[command(flatten)]
        filter: DlqFilter,
    },
}

/// Dead-letter filters; every one given must match.
#[derive(Debug, Default, ClapArgs)]
pub struct DlqFilter {
    /// Task name.
    #[arg(long)]
    pub task: Option<String>,
    /// Error type (`KeyError`, `Reject`, `NotRegistered`, ...).
    #[arg(long)]
    pub error: Option<String>,
    /// Dead-lettered at or after: RFC 3339 or an age (`90s`, `15m`, `1h`, `2d`).
    #[arg(long)]
    pub since: Option<String>,
    /// Dead-lettered before: RFC 3339 or an age.
    #[arg(long)]
    pub until: Option<String>,
}

/// `inspect` targets.
#[derive(Debug, Subcommand)]
pub enum InspectWhat {
    /// Ready, scheduled (ETA) and leased messages per queue, and dead letters.
    Queues,
    /// Tasks registered in this binary.
    Registered,
    /// Settings in force (URLs without passwords).
    Conf,
}

/// Runs the command line with the tasks registered on `builder`; returns the exit code.
pub fn main(builder: AppBuilder) -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.loglevel, cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Started again by its own worker as a pool process: serve jobs, nothing else.
    if let Some(socket) = std::env::var_os(crate::worker::POOL_CHILD_ENV) {
        return match runtime.block_on(commands::pool_child(builder, cli, socket.into())) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: pool process: {e}");
                ExitCode::FAILURE
            }
        };
    }
    crate::worker::pool::enable_process_pool();
    let outcome = runtime.block_on(commands::run(builder, cli));
    // A blocking task past its hard limit in the async pool still holds its thread: do not
    // wait for it on the way out.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The `celeriac` binary: the command line with no tasks of its own.
pub fn run_without_tasks() -> ExitCode {
    main(AppBuilder::default().from_env())
}

/// Sets up `tracing` output: human-readable lines or JSON.
pub fn init_logging(filter: &str, format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
