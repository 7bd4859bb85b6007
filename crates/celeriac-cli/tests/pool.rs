//! Time limits and the process pool, on a user's binary (the pool's children are this same
//! executable started again, so they have its tasks): a task spinning in a CPU loop and one
//! blocked in `std::thread::sleep` are killed at their hard limit and fail with
//! `TimeLimitExceeded`, a soft limit lets a task clean up, the worker goes on serving after
//! each, and children are replaced after `--max-tasks-per-child` tasks or past
//! `--max-memory-per-child`. SQLite in a temp dir: no server needed.
//!
//! `harness = false` (the binary needs its own `main` to be the command line), as
//! `user_binary.rs`; the runner is in `support/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use celeriac::{App, AsyncResult, Request, TaskResult, task};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use support::{AS_CLI, Env, process_alive};

const WAIT: Duration = Duration::from_secs(60);

/// Writes this process's id to `marker`, then spins forever.
#[task(name = "pool.spin", blocking = true, time_limit = 1)]
async fn spin(marker: String) -> TaskResult<()> {
    std::fs::write(&marker, std::process::id().to_string())?;
    let mut x = 0u64;
    loop {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

/// Writes this process's id to `marker`, then sleeps a minute without an await point. Its
/// hard limit comes with the call.
#[task(name = "pool.sleep_sync", blocking = true)]
async fn sleep_sync(marker: String) -> TaskResult<()> {
    std::fs::write(&marker, std::process::id().to_string())?;
    std::thread::sleep(Duration::from_secs(60));
    Ok(())
}

/// Works in small blocking steps until the soft limit, then cleans up (writes `marker`) and
/// fails with `SoftTimeLimitExceeded`.
#[task(name = "pool.soft", bind = true, blocking = true, soft_time_limit = 0.5, time_limit = 20)]
async fn soft(req: Request, marker: String) -> TaskResult<()> {
    while !req.is_soft_time_limit_exceeded() {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::write(&marker, "cleaned up")?;
    Err(req.soft_time_limit_exceeded())
}

/// The id of the process that runs it.
#[task(name = "pool.pid")]
async fn whoami() -> TaskResult<u32> {
    Ok(std::process::id())
}

/// Leaks `mib` MiB (written, so it is resident), returns the process id.
#[task(name = "pool.leak", blocking = true)]
async fn leak(mib: usize) -> TaskResult<u32> {
    let block: &'static mut [u8] = Box::leak(vec![1u8; mib << 20].into_boxed_slice());
    std::hint::black_box(block);
    Ok(std::process::id())
}

/// Ends its process with exit code 3 in the middle of the task.
#[task(name = "pool.crash")]
async fn crash() -> TaskResult<()> {
    std::process::exit(3)
}

/// Asks for a retry on its first run (when `marker` does not exist yet), succeeds on the second.
#[task(name = "pool.flaky")]
async fn flaky(marker: String) -> TaskResult<u32> {
    if std::fs::metadata(&marker).is_err() {
        std::fs::write(&marker, "tried")?;
        return Err(celeriac::TaskError::retry().countdown(0.0).into());
    }
    Ok(std::process::id())
}

fn main() -> ExitCode {
    if std::env::var_os(AS_CLI).is_some() {
        return celeriac::cli::main(
            App::builder()
                .from_env()
                .task(spin)
                .task(sleep_sync)
                .task(soft)
                .task(whoami)
                .task(leak)
                .task(crash)
                .task(flaky),
        );
    }
    support::run_tests(&[
        ("hard_limit_kills_a_spinning_and_a_sleeping_task", hard_limit_kills_a_spinning_and_a_sleeping_task),
        ("soft_limit_lets_the_task_clean_up_in_both_pools", soft_limit_lets_the_task_clean_up_in_both_pools),
        ("async_pool_marks_a_blocking_task_at_its_hard_limit", async_pool_marks_a_blocking_task_at_its_hard_limit),
        ("children_are_replaced_after_max_tasks_per_child", children_are_replaced_after_max_tasks_per_child),
        ("a_child_over_max_memory_per_child_is_replaced", a_child_over_max_memory_per_child_is_replaced),
        (
            "a_dying_child_fails_its_task_and_retries_cross_the_pool",
            a_dying_child_fails_its_task_and_retries_cross_the_pool,
        ),
        ("an_immediate_shutdown_kills_the_busy_child", an_immediate_shutdown_kills_the_busy_child),
    ])
}

/// A client of `env`'s database, on its own runtime.
struct Client {
    rt: tokio::runtime::Runtime,
    app: App,
}

impl Client {
    /// Made before the worker starts, so the file and its tables exist before several
    /// processes open it at once.
    fn new(env: &Env) -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let app = rt
            .block_on(
                App::builder()
                    .broker_url(&env.url)
                    .task(spin)
                    .task(sleep_sync)
                    .task(soft)
                    .task(whoami)
                    .task(leak)
                    .build(),
            )
            .unwrap();
        Client { rt, app }
    }

    fn send(&self, sig: celeriac::Signature) -> AsyncResult {
        self.rt.block_on(sig.delay(&self.app)).unwrap()
    }

    /// Runs `pool.pid` and returns the process that ran it.
    fn pid(&self) -> u32 {
        let res = self.send(whoami::s());
        self.rt.block_on(res.get::<u32>(WAIT)).unwrap()
    }

    /// Waits for a failure and returns its exception type, module and first argument.
    fn failure(&self, res: &AsyncResult) -> (String, String, serde_json::Value) {
        match self.rt.block_on(res.get::<serde_json::Value>(WAIT)) {
            Err(celeriac::Error::TaskFailed { exc, .. }) => {
                (exc.exc_type, exc.exc_module, exc.exc_message.first().cloned().unwrap_or_default())
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }
}

/// The task started (its marker, with the id of the process running it, appeared) → its
/// FAILURE stored: seconds, the process, and the failure's type, module and limit.
async fn time_to_failure(res: AsyncResult, marker: std::path::PathBuf) -> (f64, u32, (String, String, f64)) {
    let deadline = Instant::now() + WAIT;
    let child = loop {
        if let Ok(text) = std::fs::read_to_string(&marker)
            && let Ok(pid) = text.trim().parse::<u32>()
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "{} never appeared", marker.display());
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let started = Instant::now();
    let failure = match res.get::<serde_json::Value>(WAIT).await {
        Err(celeriac::Error::TaskFailed { exc, .. }) => {
            let limit = exc.exc_message.first().and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN);
            (exc.exc_type, exc.exc_module, limit)
        }
        other => panic!("expected a failure, got {other:?}"),
    };
    (started.elapsed().as_secs_f64(), child, failure)
}

fn hard_limit_kills_a_spinning_and_a_sleeping_task() {
    let env = Env::new();
    let client = Client::new(&env);
    let mut worker = env.worker(&["-c", "2", "--pool", "process"]);
    let first = client.pid();
    assert_ne!(first, worker.pid(), "tasks run in a pool process, not in the worker");

    let spin_marker = env.path("spin.pid");
    let sleep_marker = env.path("sleep.pid");
    let spinning = client.send(spin::s(spin_marker.display().to_string()));
    let sleeping = client.send(sleep_sync::s(sleep_marker.display().to_string()).set("time_limit", 1.5));
    let ((spin_took, spin_child, spin_exc), (sleep_took, sleep_child, sleep_exc)) = client.rt.block_on(async {
        tokio::join!(time_to_failure(spinning, spin_marker), time_to_failure(sleeping, sleep_marker))
    });
    println!("stopped after {spin_took:.3} s (CPU loop, limit 1 s) and {sleep_took:.3} s (thread::sleep, limit 1.5 s)");
    assert_eq!(spin_exc, ("TimeLimitExceeded".to_owned(), "billiard.exceptions".to_owned(), 1.0));
    assert_eq!(sleep_exc, ("TimeLimitExceeded".to_owned(), "billiard.exceptions".to_owned(), 1.5));
    // Measured from when the task wrote its marker, so slightly under the limit is possible.
    assert!((0.8..3.0).contains(&spin_took), "the CPU loop stopped after {spin_took} s, limit 1 s");
    assert!((1.3..3.5).contains(&sleep_took), "the sleep stopped after {sleep_took} s, limit 1.5 s");
    // Stopped for real: the children that ran them are gone.
    for child in [spin_child, sleep_child] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while process_alive(child) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!process_alive(child), "pool process {child} still runs after its hard limit");
    }
    // The worker goes on with replacements.
    let after = client.pid();
    assert!(![spin_child, sleep_child, worker.pid()].contains(&after), "{after}");
    assert!(worker.stop(Duration::from_secs(20)), "the worker stops on SIGTERM:\n{}", worker.log());
    assert!(!process_alive(after), "pool processes end with the worker");
}

fn soft_limit_lets_the_task_clean_up_in_both_pools() {
    for pool in ["process", "async"] {
        let env = Env::new();
        let client = Client::new(&env);
        let mut worker = env.worker(&["-c", "1", "--pool", pool]);
        let marker = env.path("cleanup.txt");
        let started = Instant::now();
        let res = client.send(soft::s(marker.display().to_string()));
        let (exc_type, module, arg) = client.failure(&res);
        let took = started.elapsed().as_secs_f64();
        println!("{pool} pool: soft limit 0.5 s, FAILURE stored after {took:.3} s");
        assert_eq!((exc_type.as_str(), module.as_str()), ("SoftTimeLimitExceeded", "billiard.exceptions"), "{pool}");
        assert_eq!(arg.as_f64(), Some(0.5), "{pool}: the limit in force");
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "cleaned up", "{pool}");
        assert!(took < 10.0, "{pool}: ended at the soft limit, not the hard one ({took} s)");
        // Healthy afterwards.
        let _ = client.pid();
        assert!(worker.stop(Duration::from_secs(20)), "{pool}:\n{}", worker.log());
    }
}

fn async_pool_marks_a_blocking_task_at_its_hard_limit() {
    let env = Env::new();
    let client = Client::new(&env);
    let mut worker = env.worker(&["-c", "2"]);
    let marker = env.path("sleep.pid");
    let res = client.send(sleep_sync::s(marker.display().to_string()).set("time_limit", 1));
    let (took, ran_in, exc) = client.rt.block_on(time_to_failure(res, marker));
    println!("async pool: blocking sleep marked failed after {took:.3} s (limit 1 s)");
    assert_eq!(ran_in, worker.pid(), "the async pool runs tasks in the worker itself");
    assert_eq!(exc, ("TimeLimitExceeded".to_owned(), "billiard.exceptions".to_owned(), 1.0));
    assert!((0.8..3.0).contains(&took), "{took}");
    assert_eq!(client.pid(), worker.pid(), "the worker goes on serving");
    // The sleeping thread cannot be stopped, but it does not hold up the worker's exit.
    let stopping = Instant::now();
    assert!(worker.stop(Duration::from_secs(20)), "{}", worker.log());
    assert!(stopping.elapsed() < Duration::from_secs(15), "exit waited for the detached thread");
}

fn children_are_replaced_after_max_tasks_per_child() {
    let env = Env::new();
    let client = Client::new(&env);
    let worker = env.worker(&["-c", "1", "--pool", "process", "--max-tasks-per-child", "3"]);
    let pids: Vec<u32> = (0..7).map(|_| client.pid()).collect();
    println!("pids with max 3 tasks per child: {pids:?}");
    assert!(!pids.contains(&worker.pid()));
    assert!(pids[..3].iter().all(|p| *p == pids[0]), "{pids:?}");
    assert!(pids[3..6].iter().all(|p| *p == pids[3]), "{pids:?}");
    assert_ne!(pids[0], pids[3], "{pids:?}");
    assert!(pids[6] != pids[3] && pids[6] != pids[0], "{pids:?}");
    assert!(!process_alive(pids[0]), "a replaced child exits");
}

fn a_child_over_max_memory_per_child_is_replaced() {
    let env = Env::new();
    // 100 MB in KiB, as Celery counts it: well above an idle child, below one that leaked 150 MiB.
    let client = Client::new(&env);
    let worker = env.worker(&["-c", "1", "--pool", "process", "--max-memory-per-child", "100000"]);
    let before = [client.pid(), client.pid()];
    assert_eq!(before[0], before[1], "an idle child stays under the limit");
    let leaked = client.send(leak::s(150));
    let leaker = client.rt.block_on(leaked.get::<u32>(WAIT)).unwrap();
    assert_eq!(leaker, before[0], "the task that crosses the limit completes in its child");
    let after = client.pid();
    println!("memory limit 100000 KiB: child {leaker} leaked 150 MiB, replaced by {after}");
    assert_ne!(after, leaker, "the child over the limit was replaced");
    assert_ne!(after, worker.pid());
}

fn a_dying_child_fails_its_task_and_retries_cross_the_pool() {
    let env = Env::new();
    let client = Client::new(&env);
    let worker = env.worker(&["-c", "1", "--pool", "process"]);
    let first = client.pid();
    let crashed = client.send(crash::s());
    let (exc_type, module, message) = client.failure(&crashed);
    assert_eq!((exc_type.as_str(), module.as_str()), ("WorkerLostError", "billiard.exceptions"));
    assert_eq!(message, "Worker exited prematurely: exitcode 3");
    let replacement = client.pid();
    assert!(![first, worker.pid()].contains(&replacement), "a new child took over: {replacement}");
    // A retry asked for in a child is published by the worker, and the retry runs.
    let marker = env.path("flaky.txt");
    let res = client.send(flaky::s(marker.display().to_string()));
    assert_eq!(client.rt.block_on(res.get::<u32>(WAIT)).unwrap(), replacement);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "tried", "the first run asked for the retry");
    let meta = client.rt.block_on(res.meta()).unwrap();
    assert_eq!(meta.status, celeriac::State::Success);
}

fn an_immediate_shutdown_kills_the_busy_child() {
    let env = Env::new();
    let client = Client::new(&env);
    let mut worker = env.worker(&["-c", "1", "--pool", "process"]);
    let marker = env.path("sleep.pid");
    // No time limit: only the shutdown can stop it.
    let res = client.send(sleep_sync::s(marker.display().to_string()));
    let child: u32 = loop {
        if let Ok(pid) = std::fs::read_to_string(&marker).unwrap_or_default().trim().parse() {
            break pid;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    worker.terminate();
    std::thread::sleep(Duration::from_millis(300));
    assert!(process_alive(child), "a graceful stop lets the running task go on");
    worker.terminate();
    assert!(worker.exited_within(Duration::from_secs(10)), "the second SIGTERM stops at once:\n{}", worker.log());
    assert!(!process_alive(child), "the child running the task was killed");
    let (exc_type, _, _) = client.failure(&res);
    assert_eq!(exc_type, "WorkerLostError");
}
