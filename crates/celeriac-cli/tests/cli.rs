//! The `celeriac` binary end to end on a SQLite file: call, inspect, a worker that dead-letters
//! a task it does not know, result, dlq list/show/replay/purge, purge, config errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};
use std::time::{Duration, Instant};

struct Env {
    _dir: tempfile::TempDir,
    url: String,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("cli.db").display());
        Env { _dir: dir, url }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_celeriac"));
        c.arg("--broker").arg(&self.url).args(args).env_remove("CELERY_BROKER_URL").env_remove("CELERIAC_CONFIG");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn call_worker_dlq_result_replay_purge() {
    let env = Env::new();
    let sent = env.run(&["call", "t.nobody_has_this", "--args", "[1, 2]"]);
    assert!(sent.status.success(), "{sent:?}");
    let task_id = stdout(&sent).trim().to_owned();
    assert_eq!(task_id.len(), 36, "prints the task id: {task_id}");

    let q = stdout(&env.run(&["inspect", "queues"]));
    assert!(q.lines().any(|l| l.starts_with("celery") && l.split_whitespace().nth(1) == Some("1")), "{q}");

    // A worker with no tasks: the message is dead-lettered as unknown, not dropped.
    let worker = env.cmd(&["worker", "-c", "1"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut listed = String::new();
    while Instant::now() < deadline {
        listed = stdout(&env.run(&["dlq", "list"]));
        if listed.contains(&task_id) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let term = Command::new("kill").args(["-TERM", &worker.id().to_string()]).status().unwrap();
    assert!(term.success());
    let out = worker.wait_with_output().unwrap();
    assert!(out.status.success(), "worker exits cleanly on SIGTERM: {out:?}");
    assert!(stdout(&out).contains("dead-lettered 1"), "{}", stdout(&out));
    assert!(listed.contains("unknown task \"t.nobody_has_this\""), "{listed}");
    let dead_id = listed.split_whitespace().next().unwrap().to_owned();

    let shown = stdout(&env.run(&["dlq", "show", &dead_id]));
    assert!(shown.contains("t.nobody_has_this") && shown.contains("\"args\":[1,2]"), "{shown}");

    let result = env.run(&["result", &task_id]);
    assert_eq!(result.status.code(), Some(1), "a FAILURE result exits 1");
    assert!(stdout(&result).contains("NotRegistered"), "{}", stdout(&result));

    let replay = env.run(&["dlq", "replay", &dead_id]);
    assert!(replay.status.success(), "{replay:?}");
    assert!(stdout(&env.run(&["dlq", "list"])).contains("empty"));
    assert!(stdout(&env.run(&["purge"])).contains("purged 1 message(s) from celery"));
    assert!(stdout(&env.run(&["inspect", "queues"])).contains("dead letters: 0"));
    let missing = env.run(&["dlq", "replay", "999"]);
    assert!(!missing.status.success());

    let waited = env.run(&["result", "no-such-id", "--wait", "--timeout", "0.2"]);
    assert_eq!(waited.status.code(), Some(2), "a wait that times out exits 2");
    assert!(String::from_utf8_lossy(&waited.stderr).contains("timed out"));
}

#[test]
fn config_errors_name_the_key_and_the_fix() {
    let env = Env::new();
    let out = env.cmd(&["inspect", "conf"]).env("CELERIAC_WORKER_CONCURENCY", "2").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("worker_concurency") && err.contains("did you mean `worker_concurrency`"), "{err}");

    let out = env.cmd(&["inspect", "conf"]).env("CELERIAC_WORKER_PREFETCH_MULTIPLIER", "many").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("worker_prefetch_multiplier") && err.contains("many"), "{err}");

    let ok = env.cmd(&["inspect", "conf"]).env("CELERIAC_TASK_ACKS_LATE", "true").output().unwrap();
    assert!(ok.status.success(), "{ok:?}");
    assert!(stdout(&ok).contains("task_acks_late = true"));

    let bad_args = env.run(&["call", "x", "--args", "[1,"]);
    assert!(String::from_utf8_lossy(&bad_args.stderr).contains("--args is not valid JSON"));
}
