//! The process pool (`worker_pool = "process"`): tasks run in child processes, so a hard time
//! limit stops them for real (SIGKILL), even in a CPU loop or a blocking call, and leaking
//! children are replaced (`worker_max_tasks_per_child`, `worker_max_memory_per_child`).
//!
//! A child is the worker binary itself, started again with [`POOL_CHILD_ENV`] naming a Unix
//! socket (`celeriac::cli::main` notices it before anything else and serves jobs, see
//! `child.rs`), so it has the same tasks registered. The worker sends one job at a time to an
//! idle child and waits for its reply; retry rules, result storage and acking stay in the
//! worker. Not for: the async pool, which is `executor.rs` alone.

#[cfg(feature = "cli")]
mod child;
mod wire;

#[cfg(feature = "cli")]
pub(crate) use child::serve as serve_child;

use super::executor::{self, Decision, Effective};
use crate::protocol::{ExceptionInfo, Message};
use crate::task::Request;
use std::io;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};

/// The environment variable that makes the worker binary a pool process: it holds the path
/// of the socket to serve jobs from.
pub const POOL_CHILD_ENV: &str = "CELERIAC_POOL_CHILD_SOCKET";

/// How long a new child may take to build its app and say hello.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a retired child may take to exit after its socket is closed, before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// Set by `celeriac::cli::main`: this binary serves as its own pool process.
static REEXEC: AtomicBool = AtomicBool::new(false);

/// Where a worker runs its tasks (`worker_pool`, `worker --pool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pool {
    /// On the worker's tokio runtime: soft limits, and hard limits at the task's next await
    /// point. A `blocking` task runs on a blocking thread and cannot be stopped.
    #[default]
    Async,
    /// In child processes of the worker binary: the hard limit kills the child, and children
    /// are recycled. Needs a binary whose `main` is `celeriac::cli::main`.
    Process,
}

impl Pool {
    /// `"async"` (or `"tokio"`), `"process"` (or Celery's `"prefork"`); `None` for anything else.
    pub fn parse(name: &str) -> Option<Pool> {
        match name.trim().to_ascii_lowercase().as_str() {
            "async" | "tokio" => Some(Pool::Async),
            "process" | "prefork" => Some(Pool::Process),
            _ => None,
        }
    }
}

/// Marks this binary as able to serve as its own pool process (`celeriac::cli::main` does).
#[cfg(feature = "cli")]
pub(crate) fn enable_process_pool() {
    REEXEC.store(true, Ordering::Relaxed);
}

/// When a child is replaced, checked after each task it ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Recycle {
    /// `worker_max_tasks_per_child`.
    pub max_tasks: Option<u64>,
    /// `worker_max_memory_per_child`, resident KiB.
    pub max_memory_kib: Option<u64>,
}

impl Recycle {
    /// Why a child that ran `tasks` tasks and holds `rss_kib` must go, if it must.
    fn reason(&self, tasks: u64, rss_kib: impl FnOnce() -> Option<u64>) -> Option<String> {
        if let Some(max) = self.max_tasks.filter(|max| tasks >= *max) {
            return Some(format!("ran {tasks} task(s), worker_max_tasks_per_child is {max}"));
        }
        let max = self.max_memory_kib?;
        let rss = rss_kib()?;
        (rss > max).then(|| format!("resident memory {rss} KiB is over worker_max_memory_per_child {max} KiB"))
    }
}

/// Resident memory of process `pid` in KiB (`VmRSS` in `/proc/<pid>/status`).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.trim_start_matches("VmRSS:").split_whitespace().next()?.parse().ok()
}

/// The pool the options ask for: `None` for the async pool.
pub(crate) async fn for_options(options: &super::WorkerOptions) -> io::Result<Option<Arc<ProcessPool>>> {
    if options.pool != Pool::Process {
        return Ok(None);
    }
    let recycle = Recycle { max_tasks: options.max_tasks_per_child, max_memory_kib: options.max_memory_per_child };
    ProcessPool::start(options.concurrency, recycle, options.hostname.clone()).await.map(Some)
}

/// One child process and its end of the socket.
struct PoolChild {
    process: tokio::process::Child,
    stream: UnixStream,
    pid: u32,
    /// Tasks it has run.
    tasks: u64,
}

impl PoolChild {
    /// Starts the worker binary again as a pool process and waits for its hello.
    async fn spawn() -> io::Result<PoolChild> {
        let exe = std::env::current_exe()?;
        let socket = socket_path();
        let listener = UnixListener::bind(&socket)?;
        let spawned = tokio::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env(POOL_CHILD_ENV, &socket)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn();
        let mut process = match spawned {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_file(&socket);
                return Err(e);
            }
        };
        let accepted = tokio::select! {
            a = listener.accept() => a.map(|(stream, _)| stream),
            status = process.wait() => Err(io::Error::other(format!(
                "the pool process exited before it was ready ({})",
                status.map(|s| exit_text(&s)).unwrap_or_else(|e| e.to_string())
            ))),
            _ = tokio::time::sleep(STARTUP_TIMEOUT) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the pool process did not connect within {STARTUP_TIMEOUT:?}"),
            )),
        };
        let _ = std::fs::remove_file(&socket);
        let mut stream = accepted?;
        let hello = tokio::time::timeout(STARTUP_TIMEOUT, wire::read_frame::<_, wire::Hello>(&mut stream))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the pool process did not say hello"))??
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the pool process hung up before its hello"))?;
        let pid = process.id().unwrap_or_default();
        if hello.pid != pid {
            return Err(io::Error::other(format!("pool process {pid} answered as process {}", hello.pid)));
        }
        tracing::debug!(pid, "pool process started");
        Ok(PoolChild { process, stream, pid, tasks: 0 })
    }

    /// Sends a job and reads the reply.
    async fn exchange(&mut self, job: &wire::Job) -> io::Result<wire::Reply> {
        wire::write_frame(&mut self.stream, job).await?;
        wire::read_frame(&mut self.stream)
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the pool process closed its socket"))
    }

    /// Whether it is still running.
    fn alive(&mut self) -> bool {
        matches!(self.process.try_wait(), Ok(None))
    }

    /// SIGKILL, and reap it.
    async fn kill(mut self) {
        let _ = self.process.start_kill();
        let _ = tokio::time::timeout(EXIT_GRACE, self.process.wait()).await;
    }

    /// How it ended (waiting briefly for it to end), for the WorkerLostError message.
    async fn exit_text(mut self) -> String {
        match tokio::time::timeout(EXIT_GRACE, self.process.wait()).await {
            Ok(Ok(status)) => exit_text(&status),
            _ => {
                let _ = self.process.start_kill();
                "its socket failed".to_owned()
            }
        }
    }

    /// Closes its socket so it exits on its own; kills it if it does not within the grace.
    async fn retire(self) {
        let PoolChild { mut process, stream, .. } = self;
        drop(stream);
        if tokio::time::timeout(EXIT_GRACE, process.wait()).await.is_err() {
            let _ = process.start_kill();
            let _ = process.wait().await;
        }
    }
}

/// `signal 9 (SIGKILL)` or `exitcode 1`, as billiard words it.
fn exit_text(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.signal(), status.code()) {
        (Some(9), _) => "signal 9 (SIGKILL)".to_owned(),
        (Some(s), _) => format!("signal {s}"),
        (None, Some(c)) => format!("exitcode {c}"),
        (None, None) => status.to_string(),
    }
}

/// A fresh socket path in the temp directory (short: Unix socket paths are limited to about
/// 100 bytes).
fn socket_path() -> PathBuf {
    let id = uuid::Uuid::new_v4().simple().to_string();
    std::env::temp_dir().join(format!("celeriac-pool-{}-{}.sock", std::process::id(), &id[..12]))
}

/// The worker's side of the pool: idle children, started ahead and replaced as they go.
pub(crate) struct ProcessPool {
    /// Children kept ready (the worker's concurrency).
    size: usize,
    recycle: Recycle,
    /// Node name, for the request context in the children.
    hostname: String,
    idle: Mutex<Vec<PoolChild>>,
    closed: AtomicBool,
}

impl ProcessPool {
    /// Starts `size` children.
    pub(crate) async fn start(size: usize, recycle: Recycle, hostname: String) -> io::Result<Arc<ProcessPool>> {
        if !REEXEC.load(Ordering::Relaxed) {
            return Err(io::Error::other(
                "the process pool needs a worker binary whose main is celeriac::cli::main (it starts that binary \
                 again as its pool processes, so they have the same tasks registered)",
            ));
        }
        let size = size.max(1);
        let children = futures::future::try_join_all((0..size).map(|_| PoolChild::spawn())).await?;
        tracing::info!(
            processes = size,
            max_tasks_per_child = ?recycle.max_tasks,
            max_memory_per_child_kib = ?recycle.max_memory_kib,
            "process pool started"
        );
        Ok(Arc::new(ProcessPool {
            size,
            recycle,
            hostname,
            idle: Mutex::new(children),
            closed: AtomicBool::new(false),
        }))
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<PoolChild>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle live child, or a new one.
    async fn checkout(&self) -> io::Result<PoolChild> {
        loop {
            let Some(mut child) = self.idle().pop() else { break };
            if child.alive() {
                return Ok(child);
            }
            tracing::warn!(pid = child.pid, "an idle pool process died: replacing it");
        }
        PoolChild::spawn().await
    }

    /// Puts a child back, or retires it when it is due or the pool is full or closed.
    fn check_in(self: &Arc<Self>, child: PoolChild) {
        let pid = child.pid;
        if let Some(reason) = self.recycle.reason(child.tasks, || rss_kib(pid)) {
            tracing::info!(pid, %reason, "replacing pool process");
            tokio::spawn(child.retire());
            self.replenish();
            return;
        }
        self.keep(child);
    }

    fn keep(&self, child: PoolChild) {
        let mut idle = self.idle();
        if self.closed.load(Ordering::Relaxed) || idle.len() >= self.size {
            drop(idle);
            tokio::spawn(child.retire());
        } else {
            idle.push(child);
        }
    }

    /// Starts a replacement in the background, so the next task does not wait for it.
    fn replenish(self: &Arc<Self>) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            match PoolChild::spawn().await {
                Ok(child) => pool.keep(child),
                Err(e) => tracing::error!(error = %e, "could not start a replacement pool process"),
            }
        });
    }

    /// Runs one call in a child and decides what its result means. At the hard limit the
    /// child is killed and the call fails with `TimeLimitExceeded`; a child that dies fails
    /// it with `WorkerLostError`. Dropping this future (terminate, immediate shutdown) kills
    /// the child that runs the call.
    pub(crate) async fn run(
        self: &Arc<Self>,
        message: &Message,
        redelivered: bool,
        effective: &Effective,
        request: &Request,
    ) -> Decision {
        let lost = |text: String| Decision::Failure {
            exc: ExceptionInfo::worker_lost(&text),
            traceback: None,
            timed_out: false,
        };
        let mut child = match self.checkout().await {
            Ok(c) => c,
            Err(e) => return lost(format!("could not start a pool process: {e}")),
        };
        let job = wire::Job {
            message: String::from_utf8_lossy(&message.to_wire()).into_owned(),
            hostname: self.hostname.clone(),
            redelivered,
            soft_time_limit: effective.soft_time_limit,
        };
        let exchange = child.exchange(&job);
        let answered = match effective.time_limit {
            Some(limit) => tokio::time::timeout(Duration::from_secs_f64(limit), exchange).await.ok(),
            None => Some(exchange.await),
        };
        match answered {
            None => {
                let limit = effective.time_limit.unwrap_or_default();
                tracing::warn!(task_id = %request.id, pid = child.pid, limit, "hard time limit exceeded: pool process killed");
                child.kill().await;
                self.replenish();
                executor::timed_out(limit)
            }
            Some(Err(e)) => {
                let pid = child.pid;
                let how = child.exit_text().await;
                tracing::error!(task_id = %request.id, pid, error = %e, exit = %how, "pool process lost during a task");
                self.replenish();
                lost(format!("Worker exited prematurely: {how}"))
            }
            Some(Ok(reply)) => {
                child.tasks += 1;
                self.check_in(child);
                request.children.lock().unwrap_or_else(PoisonError::into_inner).extend(reply.children);
                let wraps = request.app.config().task_retry_exceeded_wraps_error;
                executor::decide(reply.result.into(), request.retries, &effective.options, wraps)
            }
        }
    }

    /// Stops every idle child (at shutdown, once no task runs).
    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        let children = std::mem::take(&mut *self.idle());
        futures::future::join_all(children.into_iter().map(PoolChild::retire)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_process_pool_needs_a_binary_that_can_serve_as_its_children() {
        // Nothing here called `celeriac::cli::main`: starting this test binary again would not
        // give a pool process, so the pool refuses to start.
        let Err(e) = ProcessPool::start(1, Recycle::default(), "w".into()).await else { panic!("started") };
        assert!(e.to_string().contains("celeriac::cli::main"), "{e}");
    }

    #[test]
    fn pool_names() {
        assert_eq!(Pool::parse("process"), Some(Pool::Process));
        assert_eq!(Pool::parse("Prefork"), Some(Pool::Process));
        assert_eq!(Pool::parse("async"), Some(Pool::Async));
        assert_eq!(Pool::parse("threads"), None);
    }

    #[test]
    fn resident_memory_is_read_from_proc_status() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(12345));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        let own = rss_kib(std::process::id()).expect("this process has a VmRSS");
        assert!(own > 100, "{own} KiB");
    }

    #[test]
    fn children_are_recycled_by_task_count_or_memory() {
        let none = Recycle::default();
        assert_eq!(none.reason(1_000_000, || Some(u64::MAX)), None);
        let tasks = Recycle { max_tasks: Some(3), max_memory_kib: None };
        assert_eq!(tasks.reason(2, || None), None);
        assert!(tasks.reason(3, || None).unwrap().contains("worker_max_tasks_per_child is 3"));
        let memory = Recycle { max_tasks: None, max_memory_kib: Some(50_000) };
        assert_eq!(memory.reason(1, || Some(50_000)), None, "at the limit is not over it");
        assert!(memory.reason(1, || Some(50_001)).unwrap().contains("50001 KiB"));
        assert_eq!(memory.reason(1, || None), None, "unknown memory keeps the child");
    }
}
