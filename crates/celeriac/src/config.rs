//! Configuration with Celery's setting names, from a builder, a TOML file and the environment.
//!
//! Precedence, lowest first: defaults, the TOML file (`celeriac.toml` or `CELERIAC_CONFIG`),
//! environment (`CELERY_BROKER_URL`, `CELERY_RESULT_BACKEND`, `CELERIAC_<SETTING>`), then the
//! builder. An unknown key or a bad value is a [`ConfigError`] that names the key and the
//! closest valid one.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default broker and backend: a SQLite file in the working directory.
pub const DEFAULT_URL: &str = "sqlite://celeriac.db";

/// All settings. Names and defaults are Celery's unless marked *Celeriac*.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where tasks are queued: `sqlite://path`, `memory://`.
    pub broker_url: String,
    /// Where results are stored: `sqlite://path`, `memory://`. Defaults to the broker's URL.
    pub result_backend: Option<String>,
    /// Transport options: `visibility_timeout` (lease seconds), `polling_interval` (seconds).
    pub broker_transport_options: BTreeMap<String, toml::Value>,
    /// Result backend options: `global_keyprefix` (Redis).
    pub result_backend_transport_options: BTreeMap<String, toml::Value>,
    /// Seconds results are kept (default one day); 0 keeps them forever.
    pub result_expires: Option<f64>,
    /// Store name, args, kwargs, worker, retries and queue with results.
    pub result_extended: bool,
    /// Acknowledge after the task ran instead of before.
    pub task_acks_late: bool,
    /// With `acks_late`, acknowledge failed and timed-out tasks too (Celery's default true).
    pub task_acks_on_failure_or_timeout: bool,
    /// Queue for tasks with no route.
    pub task_default_queue: String,
    /// Task name or glob (`"billing.*"`) to queue name.
    pub task_routes: BTreeMap<String, String>,
    /// Run tasks inline in `apply_async` (for tests).
    pub task_always_eager: bool,
    /// In eager mode, return failures from `apply_async` instead of storing them.
    pub task_eager_propagates: bool,
    /// Do not store results by default.
    pub task_ignore_result: bool,
    /// Store STARTED when a task starts.
    pub task_track_started: bool,
    /// Default hard time limit in seconds.
    pub task_time_limit: Option<f64>,
    /// Default soft time limit in seconds.
    pub task_soft_time_limit: Option<f64>,
    /// Default priority (0-9) for tasks without one.
    pub task_default_priority: Option<u8>,
    /// Task serializer; only `json` is supported.
    pub task_serializer: String,
    /// Accepted content types; only `json` is supported.
    pub accept_content: Vec<String>,
    /// Concurrent tasks per worker (default: number of CPUs).
    pub worker_concurrency: Option<usize>,
    /// Messages reserved per slot: 4 by default, 1 = one per slot, 0 = unlimited.
    pub worker_prefetch_multiplier: usize,
    /// Fetch a message only when a slot is free.
    pub worker_disable_prefetch: bool,
    /// Seconds running tasks get to finish after a shutdown signal (*Celeriac* default 30).
    pub worker_soft_shutdown_timeout: f64,
    /// Turn off `rate_limit`.
    pub worker_disable_rate_limits: bool,
    /// *Celeriac*: also dead-letter tasks that failed for good (so they can be replayed).
    pub worker_dead_letter_failures: bool,
    /// Send `task-*` events (monitoring such as Flower turns them on by itself).
    pub worker_send_task_events: bool,
    /// Tasks sent by a running task get its priority when they have none.
    pub task_inherit_parent_priority: bool,
    /// A chord's `link_error` also goes to each header task (Celery's default false).
    pub task_allow_error_cb_on_chord_header: bool,
    /// Seconds the member completing a chord waits for a nested header's results.
    pub result_chord_join_timeout: f64,
    /// *Celeriac*: past `max_retries`, fail with `MaxRetriesExceededError` carrying the last
    /// error (true), or with the last error itself, as Celery does when `retry(exc=...)` or
    /// `autoretry_for` gave one (false).
    pub task_retry_exceeded_wraps_error: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            broker_url: DEFAULT_URL.to_owned(),
            result_backend: None,
            broker_transport_options: BTreeMap::new(),
            result_backend_transport_options: BTreeMap::new(),
            result_expires: Some(86_400.0),
            result_extended: false,
            task_acks_late: false,
            task_acks_on_failure_or_timeout: true,
            task_default_queue: "celery".to_owned(),
            task_routes: BTreeMap::new(),
            task_always_eager: false,
            task_eager_propagates: false,
            task_ignore_result: false,
            task_track_started: false,
            task_time_limit: None,
            task_soft_time_limit: None,
            task_default_priority: None,
            task_serializer: "json".to_owned(),
            accept_content: vec!["json".to_owned()],
            worker_concurrency: None,
            worker_prefetch_multiplier: 4,
            worker_disable_prefetch: false,
            worker_soft_shutdown_timeout: 30.0,
            worker_disable_rate_limits: false,
            worker_dead_letter_failures: true,
            worker_send_task_events: false,
            task_inherit_parent_priority: false,
            task_allow_error_cb_on_chord_header: false,
            result_chord_join_timeout: 3.0,
            task_retry_exceeded_wraps_error: true,
        }
    }
}

/// A setting that is unknown or has a bad value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The key is not a setting.
    #[error("unknown setting `{key}` (from {source_name}){}", suggestion.as_ref().map(|s| format!("; did you mean `{s}`?")).unwrap_or_default())]
    UnknownKey {
        /// The key as written.
        key: String,
        /// Where it came from (file path or environment variable).
        source_name: String,
        /// The closest valid setting name.
        suggestion: Option<String>,
    },
    /// The value does not fit the setting.
    #[error("bad value for `{key}` (from {source_name}): {problem}")]
    BadValue {
        /// The setting.
        key: String,
        /// Where it came from.
        source_name: String,
        /// What is wrong and what is expected.
        problem: String,
    },
    /// The config file cannot be read or parsed.
    #[error("cannot read config file {path}: {problem}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        problem: String,
    },
}

/// Environment variables that are not settings but belong to Celeriac.
const RESERVED_ENV: &[&str] = &["CELERIAC_CONFIG", "CELERIAC_LOG", "CELERIAC_LOG_FORMAT", "CELERIAC_REQUIRE_SERVICES"];

impl Config {
    /// Every setting name.
    pub fn keys() -> Vec<String> {
        match toml::Value::try_from(Config::default()) {
            Ok(toml::Value::Table(t)) => t.keys().cloned().collect(),
            _ => Vec::new(),
        }
        .into_iter()
        .chain(
            [
                "result_backend",
                "result_expires",
                "task_time_limit",
                "task_soft_time_limit",
                "task_default_priority",
                "worker_concurrency",
            ]
            .map(str::to_owned),
        )
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
    }

    /// Defaults, then `celeriac.toml` (or the file `CELERIAC_CONFIG` names) if present, then the
    /// environment.
    pub fn load() -> Result<Config, ConfigError> {
        let mut config = Config::default();
        let path = std::env::var_os("CELERIAC_CONFIG").map(PathBuf::from);
        match path {
            Some(p) => config.merge_file(&p)?,
            None if Path::new("celeriac.toml").exists() => config.merge_file(Path::new("celeriac.toml"))?,
            None => {}
        }
        config.merge_env(std::env::vars())?;
        Ok(config)
    }

    /// Merges a TOML file's settings.
    pub fn merge_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::File { path: path.to_owned(), problem: e.to_string() })?;
        self.merge_toml(&text, &path.display().to_string())
    }

    /// Merges settings from TOML text; `source_name` appears in errors.
    pub fn merge_toml(&mut self, text: &str, source_name: &str) -> Result<(), ConfigError> {
        let table: toml::Table = toml::from_str(text)
            .map_err(|e| ConfigError::File { path: PathBuf::from(source_name), problem: e.to_string() })?;
        for (key, value) in table {
            self.set_value(&key, value, source_name)?;
        }
        Ok(())
    }

    /// Merges `CELERY_BROKER_URL`, `CELERY_RESULT_BACKEND` and `CELERIAC_<SETTING>` variables.
    pub fn merge_env(&mut self, vars: impl IntoIterator<Item = (String, String)>) -> Result<(), ConfigError> {
        for (name, raw) in vars {
            let key = match name.as_str() {
                "CELERY_BROKER_URL" => "broker_url".to_owned(),
                "CELERY_RESULT_BACKEND" => "result_backend".to_owned(),
                n if RESERVED_ENV.contains(&n) => continue,
                n => match n.strip_prefix("CELERIAC_") {
                    Some(rest) => rest.to_ascii_lowercase(),
                    None => continue,
                },
            };
            self.set_value(&key, env_value(&raw), &format!("environment variable {name}"))?;
        }
        Ok(())
    }

    /// Sets one setting from a TOML value, with errors that name the key.
    pub fn set_value(&mut self, key: &str, value: toml::Value, source_name: &str) -> Result<(), ConfigError> {
        let keys = Config::keys();
        if !keys.iter().any(|k| k == key) {
            return Err(ConfigError::UnknownKey {
                key: key.to_owned(),
                source_name: source_name.to_owned(),
                suggestion: closest(key, keys.iter().map(String::as_str)),
            });
        }
        let mut table = match toml::Value::try_from(&*self) {
            Ok(toml::Value::Table(t)) => t,
            _ => toml::Table::new(),
        };
        table.insert(key.to_owned(), value.clone());
        let updated: Config =
            toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| ConfigError::BadValue {
                key: key.to_owned(),
                source_name: source_name.to_owned(),
                problem: format!("{value} does not fit: {}", e.message()),
            })?;
        updated.validate(key, source_name)?;
        *self = updated;
        Ok(())
    }

    fn validate(&self, key: &str, source_name: &str) -> Result<(), ConfigError> {
        let bad = |problem: &str| {
            Err(ConfigError::BadValue {
                key: key.to_owned(),
                source_name: source_name.to_owned(),
                problem: problem.to_owned(),
            })
        };
        match key {
            "task_serializer" if self.task_serializer != "json" => bad("only \"json\" is supported"),
            "accept_content" if self.accept_content.iter().any(|c| c != "json" && c != "application/json") => {
                bad("only [\"json\"] is supported")
            }
            "worker_concurrency" if self.worker_concurrency == Some(0) => bad("must be at least 1"),
            "task_default_priority" if self.task_default_priority.is_some_and(|p| p > 9) => bad("must be 0-9"),
            _ => Ok(()),
        }
    }

    /// The result backend URL (the broker's when not set).
    pub fn result_backend_url(&self) -> &str {
        self.result_backend.as_deref().unwrap_or(&self.broker_url)
    }

    /// `result_expires` as a duration (`None` = keep forever).
    pub fn result_expires_duration(&self) -> Option<Duration> {
        self.result_expires.filter(|s| *s > 0.0).map(Duration::from_secs_f64)
    }

    /// A transport option as seconds.
    pub fn transport_seconds(&self, name: &str) -> Option<f64> {
        match self.broker_transport_options.get(name)? {
            toml::Value::Integer(i) => Some(*i as f64),
            toml::Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// `worker_concurrency`, or the number of CPUs.
    pub fn concurrency(&self) -> usize {
        self.worker_concurrency.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    }

    /// The queue `task` is routed to: `task_routes` (exact name, then globs), else
    /// `default` (the task's own `queue` option), else `task_default_queue`.
    pub fn route(&self, task: &str, default: Option<&str>) -> String {
        if let Some(q) = self.task_routes.get(task) {
            return q.clone();
        }
        for (pattern, queue) in &self.task_routes {
            if glob_match(pattern, task) {
                return queue.clone();
            }
        }
        default.map(str::to_owned).unwrap_or_else(|| self.task_default_queue.clone())
    }
}

/// An environment string as a TOML value: numbers, booleans and arrays parse, the rest is text.
fn env_value(raw: &str) -> toml::Value {
    let parsed: Result<toml::Table, _> = toml::from_str(&format!("v = {raw}"));
    match parsed.ok().and_then(|mut t| t.remove("v")) {
        Some(v) => v,
        None => toml::Value::String(raw.to_owned()),
    }
}

/// `*` matches any run of characters, `?` one character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], t) || (!t.is_empty() && go(p, &t[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &t[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), text.as_bytes())
}

/// The candidate closest to `word` by edit distance, if reasonably close.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let best = candidates.into_iter().map(|c| (edit_distance(word, c), c)).min_by_key(|(d, _)| *d)?;
    (best.0 <= word.len().max(3) / 2 + 1).then(|| best.1.to_owned())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_suggest_the_closest_setting() {
        let mut c = Config::default();
        let err = c.merge_toml("worker_prefetch_multiplyer = 2", "test.toml").unwrap_err();
        match err {
            ConfigError::UnknownKey { key, suggestion, .. } => {
                assert_eq!(key, "worker_prefetch_multiplyer");
                assert_eq!(suggestion.as_deref(), Some("worker_prefetch_multiplier"));
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn bad_values_name_the_key() {
        let mut c = Config::default();
        let err = c.merge_toml("worker_concurrency = \"lots\"", "test.toml").unwrap_err().to_string();
        assert!(err.contains("worker_concurrency") && err.contains("lots"), "{err}");
        let err = c.merge_toml("task_serializer = \"pickle\"", "test.toml").unwrap_err().to_string();
        assert!(err.contains("only \"json\""), "{err}");
    }

    #[test]
    fn toml_and_env_layer_in_order() {
        let mut c = Config::default();
        c.merge_toml(
            "broker_url = \"sqlite://a.db\"\ntask_acks_late = true\n[task_routes]\n\"billing.*\" = \"billing\"\n",
            "t",
        )
        .unwrap();
        c.merge_env([
            ("CELERY_BROKER_URL".to_owned(), "memory://".to_owned()),
            ("CELERIAC_WORKER_PREFETCH_MULTIPLIER".to_owned(), "1".to_owned()),
            ("CELERIAC_REQUIRE_SERVICES".to_owned(), "1".to_owned()),
            ("PATH".to_owned(), "/bin".to_owned()),
        ])
        .unwrap();
        assert_eq!(c.broker_url, "memory://");
        assert_eq!(c.result_backend_url(), "memory://");
        assert!(c.task_acks_late);
        assert_eq!(c.worker_prefetch_multiplier, 1);
        assert_eq!(c.route("billing.charge", None), "billing");
        assert_eq!(c.route("mail.send", Some("mail")), "mail");
        assert_eq!(c.route("other", None), "celery");
        let err = c.merge_env([("CELERIAC_TASK_ACKS_LAET".to_owned(), "true".to_owned())]).unwrap_err().to_string();
        assert!(err.contains("task_acks_late") && err.contains("CELERIAC_TASK_ACKS_LAET"), "{err}");
    }

    #[test]
    fn globs() {
        assert!(glob_match("a.*", "a.b.c"));
        assert!(glob_match("*.send", "mail.send"));
        assert!(!glob_match("a.?", "a.bc"));
    }
}
