//! The `celeriac` binary end to end on a SQLite file: call (with `--args` and `--kwargs`),
//! inspect, a worker that dead-letters a task it does not know, result, dlq
//! list/show/replay/replay --all/purge, purge, JSON logs, where settings come from (celeriac.toml,
//! CELERIAC_CONFIG, the environment) and config errors.
//!
//! `user_binary.rs` covers the commands that need registered tasks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Env {
    dir: tempfile::TempDir,
    url: String,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("cli.db").display());
        Env { dir, url }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The binary with `--broker` set and no settings from the caller's environment.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_celeriac"));
        c.arg("--broker").arg(&self.url).args(args);
        for var in
            ["CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CELERIAC_CONFIG", "CELERIAC_LOG", "CELERIAC_LOG_FORMAT"]
        {
            c.env_remove(var);
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Sends `args` (a `call`) and returns the task id it prints.
    fn call(&self, args: &[&str]) -> String {
        let sent = self.run(args);
        assert!(sent.status.success(), "{sent:?}");
        let id = stdout(&sent).trim().to_owned();
        assert_eq!(id.len(), 36, "prints the task id: {id}");
        id
    }

    /// Runs a worker until every id in `ids` is in the dead-letter queue, then stops it with
    /// SIGTERM; returns what it wrote to stderr.
    fn dead_letter_all(&self, extra: &[&str], ids: &[&str]) -> String {
        let log = self.path().join("worker.log");
        let mut args = extra.to_vec();
        args.extend(["worker", "-c", "1"]);
        let worker =
            self.cmd(&args).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
        let listed = until(|| {
            let listed = stdout(&self.run(&["dlq", "list"]));
            // As a dead letter's own task id, not as the "[replayed as ...]" mark of another.
            let mark = |id: &str| format!("[replayed as {id}]");
            ids.iter().all(|id| listed.lines().any(|l| l.contains(id) && !l.contains(&mark(id))))
        });
        stop(worker);
        let stderr = std::fs::read_to_string(&log).unwrap();
        assert!(listed, "the worker dead-lettered {ids:?}: {stderr}");
        stderr
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Polls `f` for up to 20 s.
fn until(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// SIGTERM, then waits for a clean exit.
fn stop(mut worker: Child) {
    let term = Command::new("kill").args(["-TERM", &worker.id().to_string()]).status().unwrap();
    assert!(term.success());
    let status = worker.wait().unwrap();
    assert!(status.success(), "worker exits cleanly on SIGTERM: {status:?}");
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

    // Replay sends it again under a new task id; the dead letter stays, marked with that id.
    let replay = env.run(&["dlq", "replay", &dead_id]);
    assert!(replay.status.success(), "{replay:?}");
    let line = stdout(&replay);
    let new_id = line.trim().strip_prefix(&format!("replayed {dead_id} as task ")).unwrap_or_default().to_owned();
    assert!(new_id.len() == 36 && new_id != task_id, "a new task id: {line}");
    let listed = stdout(&env.run(&["dlq", "list"]));
    assert!(listed.contains(&format!("[replayed as {new_id}]")), "{listed}");
    let again = env.run(&["dlq", "replay", &dead_id]);
    assert!(!again.status.success() && stderr(&again).contains("already replayed"), "{again:?}");
    assert!(stdout(&env.run(&["purge"])).contains("purged 1 message(s) from celery"));
    assert!(stdout(&env.run(&["inspect", "queues"])).contains("dead letters: 1"));
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

    let out = env.cmd(&["inspect", "conf"]).env("CELERIAC_TASK_ACKS_LATE", "yes").output().unwrap();
    assert!(!out.status.success());
    assert_eq!(
        stderr(&out).trim(),
        "error: bad value for `task_acks_late` (from environment variable CELERIAC_TASK_ACKS_LATE): \
         got \"yes\", expected true or false (did you mean true?)"
    );
    let out = env.cmd(&["inspect", "conf"]).env("CELERIAC_WORKER_SOFT_SHUTDOWN_TIMEOUT", "inf").output().unwrap();
    assert!(stderr(&out).contains("got \"inf\", expected a number of seconds"), "{out:?}");
}

#[test]
fn call_kwargs_then_dlq_replay_all_and_dlq_purge() {
    let env = Env::new();
    let with_kwargs = env.call(&["call", "t.ghost", "--kwargs", r#"{"order": 7, "note": "rush"}"#]);
    let with_both = env.call(&["call", "t.ghost", "-a", "[1]", "-k", r#"{"x": [true, null]}"#]);
    let not_an_object = env.run(&["call", "t.ghost", "--kwargs", "[1, 2]"]);
    assert!(!not_an_object.status.success());
    assert!(stderr(&not_an_object).contains("--kwargs is not valid JSON"), "{not_an_object:?}");

    env.dead_letter_all(&[], &[&with_kwargs, &with_both]);
    let listed = stdout(&env.run(&["dlq", "list"]));
    let dead_id = |task: &str| listed.lines().find(|l| l.contains(task)).unwrap().split_whitespace().next().unwrap();
    let shown = stdout(&env.run(&["dlq", "show", dead_id(&with_kwargs)]));
    assert!(shown.contains(r#"body:     {"args":[],"kwargs":{"order":7,"note":"rush"}}"#), "{shown}");
    let shown = stdout(&env.run(&["dlq", "show", dead_id(&with_both)]));
    assert!(shown.contains(r#"body:     {"args":[1],"kwargs":{"x":[true,null]}}"#), "{shown}");

    // --all puts every dead letter back, and says so even when output is not a terminal.
    let replay = env.run(&["dlq", "replay", "--all"]);
    assert!(replay.status.success(), "{replay:?}");
    let replayed = stdout(&replay);
    assert_eq!(replayed.lines().count(), 2, "{replayed}");
    // Each under a new task id, the old dead letters marked with it.
    let new_ids: Vec<String> = replayed
        .lines()
        .map(|l| {
            assert!(l.starts_with("replayed "), "{replayed}");
            l.rsplit("as task ").next().unwrap().trim().to_owned()
        })
        .collect();
    let listed = stdout(&env.run(&["dlq", "list"]));
    for new_id in &new_ids {
        assert!(new_id != &with_kwargs && new_id != &with_both, "{replayed}");
        assert!(listed.contains(&format!("[replayed as {new_id}]")), "{listed}");
    }
    let q = stdout(&env.run(&["inspect", "queues"]));
    assert!(q.lines().any(|l| l.starts_with("celery") && l.split_whitespace().nth(1) == Some("2")), "{q}");
    // A second --all replays nothing new: both were replayed already.
    let nothing_new = env.run(&["dlq", "replay", "--all"]);
    assert!(!nothing_new.status.success() && stderr(&nothing_new).contains("nothing to replay"), "{nothing_new:?}");

    let new_refs: Vec<&str> = new_ids.iter().map(String::as_str).collect();
    env.dead_letter_all(&[], &new_refs);
    let purged = env.run(&["dlq", "purge"]);
    assert!(purged.status.success(), "{purged:?}");
    assert_eq!(stdout(&purged).trim(), "deleted 4 dead letter(s)", "the two replayed ones and their replays");
    assert!(stdout(&env.run(&["dlq", "list"])).contains("no dead letters"));
    assert!(stdout(&env.run(&["inspect", "queues"])).contains("dead letters: 0"));
    let nothing = env.run(&["dlq", "replay", "--all"]);
    assert!(!nothing.status.success());
    assert!(stderr(&nothing).contains("nothing to replay"), "{nothing:?}");
    let missing = env.run(&["dlq", "replay", "999"]);
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("no dead letter with id \"999\""), "the reason is printed: {missing:?}");
}

/// The `fields.message` of every line, after checking that each line is a JSON log record.
fn json_messages(log: &str) -> Vec<String> {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "something was logged");
    lines
        .iter()
        .map(|line| {
            let record: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            assert!(record["level"].is_string() && record["timestamp"].is_string(), "a log record: {line}");
            record["fields"]["message"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    let env = Env::new();
    let id = env.call(&["call", "t.ghost"]);
    let log = env.dead_letter_all(&["--log-format", "json"], &[&id]);
    let messages = json_messages(&log);
    for expected in ["worker ready", "message dead-lettered", "worker stopped"] {
        assert!(messages.iter().any(|m| m == expected), "{expected:?} in {messages:?}");
    }
    assert!(messages.iter().any(|m| m.starts_with("shutdown requested")), "{messages:?}");

    // The same from the environment, as `CELERIAC_LOG_FORMAT` documents.
    let id = env.call(&["call", "t.ghost"]);
    let log_file = env.path().join("env.log");
    let worker = env
        .cmd(&["worker", "-c", "1"])
        .env("CELERIAC_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_file).unwrap())
        .spawn()
        .unwrap();
    assert!(until(|| stdout(&env.run(&["dlq", "list"])).contains(&id)));
    stop(worker);
    assert!(json_messages(&std::fs::read_to_string(&log_file).unwrap()).iter().any(|m| m == "worker ready"));
}

#[test]
fn settings_come_from_celeriac_toml_celeriac_config_and_the_environment() {
    let env = Env::new();
    let conf = |setup: &dyn Fn(&mut Command)| {
        let mut c = env.cmd(&["inspect", "conf"]);
        c.current_dir(env.path());
        setup(&mut c);
        let out = c.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        stdout(&out)
    };
    std::fs::write(
        env.path().join("celeriac.toml"),
        "task_default_queue = \"from_toml\"\nworker_prefetch_multiplier = 2\n",
    )
    .unwrap();

    // celeriac.toml in the working directory.
    let shown = conf(&|_| {});
    assert!(
        shown.contains("task_default_queue = \"from_toml\"") && shown.contains("worker_prefetch_multiplier = 2"),
        "{shown}"
    );
    // The environment wins over the file.
    let shown = conf(&|c| {
        c.env("CELERIAC_WORKER_PREFETCH_MULTIPLIER", "3");
    });
    assert!(
        shown.contains("task_default_queue = \"from_toml\"") && shown.contains("worker_prefetch_multiplier = 3"),
        "{shown}"
    );
    // CELERIAC_CONFIG names another file, read instead of celeriac.toml.
    let other = env.path().join("other.toml");
    std::fs::write(&other, "task_default_queue = \"from_celeriac_config\"\n").unwrap();
    let shown = conf(&|c| {
        c.env("CELERIAC_CONFIG", &other);
    });
    assert!(
        shown.contains("task_default_queue = \"from_celeriac_config\"")
            && shown.contains("worker_prefetch_multiplier = 4"),
        "{shown}"
    );
    // CELERY_RESULT_BACKEND picks the result backend, and it is the one opened.
    let results = env.path().join("results.db");
    let shown = conf(&|c| {
        c.env("CELERY_RESULT_BACKEND", format!("sqlite://{}", results.display()));
    });
    assert!(shown.contains(&format!("result_backend = \"sqlite://{}\"", results.display())), "{shown}");
    assert!(results.exists(), "the backend named by CELERY_RESULT_BACKEND was opened");

    let missing = env.path().join("missing.toml");
    let out = env.cmd(&["inspect", "conf"]).env("CELERIAC_CONFIG", &missing).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&format!("cannot read config file {}", missing.display())), "{out:?}");

    std::fs::write(env.path().join("celeriac.toml"), "task_acks_late = \"yes\"\n").unwrap();
    let out = env.cmd(&["inspect", "conf"]).current_dir(env.path()).output().unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out)
            .contains("bad value for `task_acks_late` (from celeriac.toml): got \"yes\", expected true or false"),
        "{out:?}"
    );
}
