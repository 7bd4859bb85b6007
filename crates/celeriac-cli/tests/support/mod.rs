//! What a test binary that is also a user's command line needs (`harness = false` tests): a
//! small libtest-like runner, a SQLite file in a temp dir, and this executable started as the
//! command line on it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Output, Stdio};
use std::time::{Duration, Instant};

/// Set when this executable should behave as the user's command line.
pub const AS_CLI: &str = "USER_BINARY_AS_CLI";

/// Runs `tests` as libtest would, as far as it matters here: name filters, `--skip NAME`,
/// `--list`; other flags are ignored (with the value of those that take one).
pub fn run_tests(tests: &[(&str, fn())]) -> ExitCode {
    let (mut filters, mut skips, mut list) = (Vec::new(), Vec::new(), false);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--list" => list = true,
            "--skip" => skips.extend(args.next()),
            "--test-threads" | "--format" | "--color" | "--logfile" | "-Z" => drop(args.next()),
            flag if flag.starts_with('-') => {}
            name => filters.push(name.to_owned()),
        }
    }
    if list {
        for (name, _) in tests {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    let selected: Vec<_> = tests
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .filter(|(name, _)| !skips.iter().any(|s| name.contains(s.as_str())))
        .collect();
    println!("\nrunning {} tests", selected.len());
    let mut failed = Vec::new();
    for (name, test) in &selected {
        let outcome = std::panic::catch_unwind(test);
        println!("test {name} ... {}", if outcome.is_ok() { "ok" } else { "FAILED" });
        if outcome.is_err() {
            failed.push(*name);
        }
    }
    let verdict = if failed.is_empty() { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {} passed; {} failed; 0 ignored; 0 measured; {} filtered out\n",
        selected.len() - failed.len(),
        failed.len(),
        tests.len() - selected.len()
    );
    if failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// A temp dir with a SQLite file, and this executable as the user's command line on it.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub url: String,
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("user.db").display());
        Env { dir, url }
    }

    /// A file in the temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.env(AS_CLI, "1").arg("--broker").arg(&self.url).args(args);
        for var in ["CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CELERIAC_CONFIG", "CELERIAC_LOG_FORMAT"] {
            c.env_remove(var);
        }
        c
    }

    /// Runs the command line with `args` to the end.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// The binary's own worker with `args` after `worker`, in the background; its log goes to
    /// `worker.log` in the temp dir.
    pub fn worker(&self, args: &[&str]) -> WorkerProcess {
        let log = std::fs::File::create(self.path("worker.log")).unwrap();
        let child =
            self.cmd(&[&["worker"], args].concat()).stdout(Stdio::null()).stderr(Stdio::from(log)).spawn().unwrap();
        WorkerProcess { child: Some(child), log: self.path("worker.log") }
    }
}

/// A worker process, stopped with SIGTERM when dropped.
pub struct WorkerProcess {
    child: Option<Child>,
    log: PathBuf,
}

impl WorkerProcess {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    /// Sends SIGTERM (a second one asks for an immediate stop).
    pub fn terminate(&self) {
        let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
    }

    /// Waits up to `within` for the process to exit; whether it did.
    pub fn exited_within(&mut self, within: Duration) -> bool {
        let Some(child) = self.child.as_mut() else { return true };
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// What the worker logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits up to `within`; whether it exited by then (it is killed if not).
    pub fn stop(&mut self, within: Duration) -> bool {
        let Some(mut child) = self.child.take() else { return true };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(20));
    }
}

/// Whether process `pid` still exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
