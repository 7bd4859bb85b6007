//! Configuration with Celery's setting names, from a builder, a TOML file and the environment.
//!
//! Precedence, lowest first: defaults, the TOML file (`celeriac.toml` or `CELERIAC_CONFIG`),
//! environment (`CELERY_BROKER_URL`, `CELERY_RESULT_BACKEND`, `CELERIAC_<SETTING>`), then the
//! builder. An unknown key or a bad value is a [`ConfigError`] that names the key and what
//! would work: the closest valid setting, or the kind of value the setting takes.

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
    /// Beat entries, name to table (`task`, `cron` or `every` or `at`, `args`, `kwargs`,
    /// `queue`, `options`, `timezone`, `enabled`, `missed`); see [`crate::beat`].
    pub beat_schedule: BTreeMap<String, toml::Value>,
    /// IANA time zone for crontab beat entries without their own (UTC when unset).
    pub timezone: Option<String>,
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
    /// Where tasks run: `"async"` (the worker's tokio runtime, the default) or `"process"`
    /// (child processes that are killed at the hard time limit; `"prefork"` is accepted too).
    pub worker_pool: String,
    /// With the process pool: tasks a child runs before it is replaced (none by default).
    pub worker_max_tasks_per_child: Option<u64>,
    /// With the process pool: resident memory in KiB above which a child is replaced after
    /// the task that crossed it (none by default).
    pub worker_max_memory_per_child: Option<u64>,
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
    /// *Celeriac*: seconds a revoke stays in force (persisted in the broker; Celery's
    /// `CELERY_WORKER_REVOKE_EXPIRES`, 3 hours).
    pub worker_revoke_expires: f64,
    /// *Celeriac*: rate limits shared by all workers, per task name: a table such as
    /// `{ "billing.charge" = { global = "100/s", per_key = "5/s", key = "customer_id" } }`
    /// (`docs/OPERATIONS.md`, "Rate limits").
    pub task_rate_limits: BTreeMap<String, toml::Value>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            broker_url: DEFAULT_URL.to_owned(),
            beat_schedule: BTreeMap::new(),
            timezone: None,
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
            worker_pool: "async".to_owned(),
            worker_max_tasks_per_child: None,
            worker_max_memory_per_child: None,
            task_inherit_parent_priority: false,
            task_allow_error_cb_on_chord_header: false,
            result_chord_join_timeout: 3.0,
            task_retry_exceeded_wraps_error: true,
            worker_revoke_expires: 10_800.0,
            task_rate_limits: BTreeMap::new(),
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
const RESERVED_ENV: &[&str] = &[
    "CELERIAC_CONFIG",
    "CELERIAC_LOG",
    "CELERIAC_LOG_FORMAT",
    "CELERIAC_REQUIRE_SERVICES",
    crate::worker::POOL_CHILD_ENV,
];

impl Config {
    /// Every setting name, sorted.
    pub fn keys() -> Vec<String> {
        SETTINGS.iter().map(|(key, _)| (*key).to_owned()).collect()
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
            let value = kind_of(&key).map_or_else(|| env_value(&raw), |kind| kind.read_env(&raw));
            self.set(&key, value, &format!("environment variable {name}"), &format!("{raw:?}"))?;
        }
        Ok(())
    }

    /// Sets one setting from a TOML value, with errors that name the key, the value given and
    /// what would work instead.
    pub fn set_value(&mut self, key: &str, value: toml::Value, source_name: &str) -> Result<(), ConfigError> {
        let written = value.to_string();
        self.set(key, value, source_name, &written)
    }

    /// [`Config::set_value`], showing a bad value as `written` (an environment variable's text
    /// as it was typed rather than as it parsed).
    fn set(&mut self, key: &str, value: toml::Value, source_name: &str, written: &str) -> Result<(), ConfigError> {
        let Some(kind) = kind_of(key) else {
            return Err(ConfigError::UnknownKey {
                key: key.to_owned(),
                source_name: source_name.to_owned(),
                suggestion: closest(key, SETTINGS.iter().map(|(k, _)| *k)),
            });
        };
        let bad = |key: &str, problem: String| ConfigError::BadValue {
            key: key.to_owned(),
            source_name: source_name.to_owned(),
            problem,
        };
        let mut table = match toml::Value::try_from(&*self) {
            Ok(toml::Value::Table(t)) => t,
            _ => toml::Table::new(),
        };
        table.insert(key.to_owned(), value.clone());
        let updated: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| bad(key, kind.problem(written, &value, Some(e.message()))))?;
        if let Some((at, problem)) = invalid(key, kind, &value, written) {
            return Err(bad(&at, problem));
        }
        *self = updated;
        Ok(())
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
        self.broker_transport_options.get(name).and_then(as_seconds)
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

/// What a setting's value must be: how an environment variable's text is read, and what an
/// error says would work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `true` or `false`.
    Bool,
    /// Text; from the environment, taken as written (`CELERIAC_TASK_DEFAULT_QUEUE=2024`).
    Text,
    /// A broker or backend URL (text).
    Url,
    /// A number of seconds, 0 or more, that fits a `Duration`.
    Seconds,
    /// A whole number, 0 or more.
    Count,
    /// A whole number, 1 or more.
    PositiveCount,
    /// A message priority, 0-9.
    Priority,
    /// A list of strings.
    List,
    /// Task name or glob to queue name.
    Routes,
    /// A table of transport options.
    Options,
}

/// Every setting and its kind, sorted by name. [`Config::keys`] and every error message come
/// from this table; a test checks it against the fields of [`Config`].
const SETTINGS: &[(&str, Kind)] = &[
    ("accept_content", Kind::List),
    ("beat_schedule", Kind::Options),
    ("broker_transport_options", Kind::Options),
    ("broker_url", Kind::Url),
    ("result_backend", Kind::Url),
    ("result_backend_transport_options", Kind::Options),
    ("result_chord_join_timeout", Kind::Seconds),
    ("result_expires", Kind::Seconds),
    ("result_extended", Kind::Bool),
    ("task_acks_late", Kind::Bool),
    ("task_acks_on_failure_or_timeout", Kind::Bool),
    ("task_allow_error_cb_on_chord_header", Kind::Bool),
    ("task_always_eager", Kind::Bool),
    ("task_default_priority", Kind::Priority),
    ("task_default_queue", Kind::Text),
    ("task_eager_propagates", Kind::Bool),
    ("task_ignore_result", Kind::Bool),
    ("task_inherit_parent_priority", Kind::Bool),
    ("task_rate_limits", Kind::Options),
    ("task_retry_exceeded_wraps_error", Kind::Bool),
    ("task_routes", Kind::Routes),
    ("task_serializer", Kind::Text),
    ("task_soft_time_limit", Kind::Seconds),
    ("task_time_limit", Kind::Seconds),
    ("task_track_started", Kind::Bool),
    ("timezone", Kind::Text),
    ("worker_concurrency", Kind::PositiveCount),
    ("worker_dead_letter_failures", Kind::Bool),
    ("worker_disable_prefetch", Kind::Bool),
    ("worker_disable_rate_limits", Kind::Bool),
    ("worker_max_memory_per_child", Kind::PositiveCount),
    ("worker_max_tasks_per_child", Kind::PositiveCount),
    ("worker_pool", Kind::Text),
    ("worker_prefetch_multiplier", Kind::Count),
    ("worker_revoke_expires", Kind::Seconds),
    ("worker_send_task_events", Kind::Bool),
    ("worker_soft_shutdown_timeout", Kind::Seconds),
];

/// Transport options that are seconds (the SQLite and Redis brokers read them as durations).
const TRANSPORT_SECONDS: &[&str] = &["visibility_timeout", "polling_interval"];

fn kind_of(key: &str) -> Option<Kind> {
    SETTINGS.iter().find(|(k, _)| *k == key).map(|(_, kind)| *kind)
}

impl Kind {
    /// What would work, for error messages.
    fn expected(self) -> &'static str {
        match self {
            Kind::Bool => "true or false",
            Kind::Text => "a string",
            Kind::Url => "a URL such as \"sqlite://celeriac.db\", \"redis://127.0.0.1:6379/0\" or \"memory://\"",
            Kind::Seconds => "a number of seconds (0 or more), such as 30 or 2.5",
            Kind::Count => "a whole number (0 or more), such as 4",
            Kind::PositiveCount => "a whole number (1 or more), such as 8",
            Kind::Priority => "a whole number from 0 to 9",
            Kind::List => "a list of strings, such as [\"json\"]",
            Kind::Routes => "a table of task name or glob to queue name, such as { \"billing.*\" = \"billing\" }",
            Kind::Options => "a table, such as { visibility_timeout = 10 }",
        }
    }

    /// An environment variable's text as a value of this kind.
    fn read_env(self, raw: &str) -> toml::Value {
        match self {
            Kind::Text | Kind::Url => toml::Value::String(raw.to_owned()),
            _ => env_value(raw),
        }
    }

    /// "got X, expected Y", with the decoder's detail for nested values and a guess for
    /// booleans written another way (`yes`, `on`, `True`).
    fn problem(self, written: &str, value: &toml::Value, detail: Option<&str>) -> String {
        let mut text = format!("got {written}, expected {}", self.expected());
        if self == Kind::Bool
            && let Some(guess) = bool_guess(value)
        {
            text.push_str(&format!(" (did you mean {guess}?)"));
        }
        if matches!(self, Kind::List | Kind::Routes | Kind::Options)
            && let Some(detail) = detail
        {
            text.push_str(&format!(" ({detail})"));
        }
        text
    }
}

fn bool_guess(value: &toml::Value) -> Option<bool> {
    let text = match value {
        toml::Value::String(s) => s.trim().to_ascii_lowercase(),
        toml::Value::Integer(i) => i.to_string(),
        _ => return None,
    };
    match text.as_str() {
        "true" | "yes" | "y" | "on" | "1" => Some(true),
        "false" | "no" | "n" | "off" | "0" => Some(false),
        _ => None,
    }
}

fn as_seconds(value: &toml::Value) -> Option<f64> {
    match value {
        toml::Value::Integer(i) => Some(*i as f64),
        toml::Value::Float(f) => Some(*f),
        _ => None,
    }
}

fn valid_seconds(value: &toml::Value) -> bool {
    as_seconds(value).is_some_and(|s| Duration::try_from_secs_f64(s).is_ok())
}

/// Checks what decoding alone does not: ranges, seconds that fit a `Duration` (not negative,
/// NaN or infinite), and the only serializer. Returns the key at fault (a transport option
/// is `broker_transport_options.<name>`) and the problem.
fn invalid(key: &str, kind: Kind, value: &toml::Value, written: &str) -> Option<(String, String)> {
    let problem = |text: String| Some((key.to_owned(), text));
    match (key, kind) {
        ("task_serializer", _) if value.as_str() != Some("json") => {
            problem(format!("got {written}, expected \"json\" (the only serializer Celeriac supports)"))
        }
        ("worker_pool", _) if value.as_str().is_none_or(|p| crate::worker::Pool::parse(p).is_none()) => {
            problem(format!("got {written}, expected \"async\" or \"process\" (\"prefork\" means \"process\")"))
        }
        ("accept_content", _)
            if value
                .as_array()
                .is_some_and(|a| a.iter().any(|c| !matches!(c.as_str(), Some("json" | "application/json")))) =>
        {
            problem(format!("got {written}, expected [\"json\"] (the only content type Celeriac supports)"))
        }
        ("beat_schedule", _) => {
            let table: BTreeMap<String, toml::Value> = value.as_table()?.clone().into_iter().collect();
            let e = crate::beat::entries_from_config(&table).err()?;
            Some((format!("beat_schedule.{}", e.entry), e.problem))
        }
        ("timezone", _) => {
            let e = crate::beat::parse_tz(value.as_str()?).err()?;
            problem(e.to_string())
        }
        ("broker_transport_options", _) => {
            let options = value.as_table()?;
            TRANSPORT_SECONDS.iter().find_map(|name| {
                let v = options.get(*name).filter(|v| !valid_seconds(v))?;
                Some((format!("{key}.{name}"), format!("got {v}, expected {}", Kind::Seconds.expected())))
            })
        }
        (_, Kind::Seconds) if !valid_seconds(value) => problem(kind.problem(written, value, None)),
        (_, Kind::PositiveCount) if value.as_integer().is_some_and(|n| n < 1) => {
            problem(kind.problem(written, value, None))
        }
        (_, Kind::Priority) if value.as_integer().is_some_and(|n| n > 9) => problem(kind.problem(written, value, None)),
        _ => None,
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
        assert!(err.contains("got \"pickle\", expected \"json\""), "{err}");
    }

    /// The error for `var=raw` from the environment.
    fn env_error(var: &str, raw: &str) -> String {
        let mut c = Config::default();
        let err = c.merge_env([(var.to_owned(), raw.to_owned())]).expect_err(var).to_string();
        assert_eq!(c, Config::default(), "a rejected value changes nothing ({var}={raw})");
        err
    }

    #[test]
    fn bad_values_name_the_key_the_value_and_what_would_work() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "CELERIAC_TASK_ACKS_LATE",
                "yes",
                &[
                    "`task_acks_late`",
                    "environment variable CELERIAC_TASK_ACKS_LATE",
                    "got \"yes\", expected true or false",
                    "did you mean true?",
                ],
            ),
            ("CELERIAC_TASK_TRACK_STARTED", "Off", &["got \"Off\", expected true or false", "did you mean false?"]),
            ("CELERIAC_RESULT_EXTENDED", "1", &["got \"1\", expected true or false", "did you mean true?"]),
            (
                "CELERIAC_WORKER_PREFETCH_MULTIPLIER",
                "-1",
                &["`worker_prefetch_multiplier`", "got \"-1\"", "whole number (0 or more)"],
            ),
            ("CELERIAC_WORKER_PREFETCH_MULTIPLIER", "2.5", &["got \"2.5\"", "whole number (0 or more)"]),
            ("CELERIAC_WORKER_CONCURRENCY", "0", &["`worker_concurrency`", "got \"0\"", "whole number (1 or more)"]),
            ("CELERIAC_WORKER_CONCURRENCY", "many", &["got \"many\"", "whole number (1 or more)"]),
            ("CELERIAC_TASK_DEFAULT_PRIORITY", "12", &["`task_default_priority`", "got \"12\"", "from 0 to 9"]),
            ("CELERIAC_RESULT_EXPIRES", "1d", &["`result_expires`", "got \"1d\"", "a number of seconds"]),
            ("CELERIAC_WORKER_SOFT_SHUTDOWN_TIMEOUT", "-5", &["got \"-5\"", "a number of seconds (0 or more)"]),
            // Values a `Duration` cannot hold would otherwise panic in the worker.
            ("CELERIAC_TASK_TIME_LIMIT", "inf", &["`task_time_limit`", "got \"inf\"", "a number of seconds"]),
            ("CELERIAC_TASK_SOFT_TIME_LIMIT", "nan", &["got \"nan\"", "a number of seconds"]),
            ("CELERIAC_RESULT_EXPIRES", "1e30", &["got \"1e30\"", "a number of seconds"]),
            (
                "CELERIAC_BROKER_TRANSPORT_OPTIONS",
                "{ visibility_timeout = \"10s\" }",
                &["`broker_transport_options.visibility_timeout`", "got \"10s\"", "a number of seconds"],
            ),
            (
                "CELERIAC_BROKER_TRANSPORT_OPTIONS",
                "10",
                &["got \"10\"", "a table, such as { visibility_timeout = 10 }"],
            ),
            (
                "CELERIAC_TASK_ROUTES",
                "{ \"a.*\" = 1 }",
                &["`task_routes`", "a table of task name or glob to queue name"],
            ),
            ("CELERIAC_ACCEPT_CONTENT", "[\"pickle\"]", &["pickle", "expected [\"json\"] (the only content type"]),
            ("CELERIAC_WORKER_POOL", "threads", &["`worker_pool`", "got \"threads\"", "\"async\" or \"process\""]),
            ("CELERIAC_WORKER_MAX_TASKS_PER_CHILD", "0", &["got \"0\"", "whole number (1 or more)"]),
            ("CELERIAC_WORKER_MAX_MEMORY_PER_CHILD", "lots", &["got \"lots\"", "whole number (1 or more)"]),
        ];
        for (var, raw, needles) in cases {
            let err = env_error(var, raw);
            for needle in *needles {
                assert!(err.contains(needle), "{var}={raw}: {err:?} should contain {needle:?}");
            }
        }
        let mut c = Config::default();
        let err = c.merge_toml("task_acks_late = \"yes\"", "celeriac.toml").unwrap_err().to_string();
        assert_eq!(
            err,
            "bad value for `task_acks_late` (from celeriac.toml): got \"yes\", expected true or false (did you mean true?)"
        );
    }

    #[test]
    fn good_values_of_every_kind_are_accepted() {
        let mut c = Config::default();
        c.merge_env(
            [
                ("CELERIAC_TASK_ACKS_LATE", "true"),
                ("CELERIAC_WORKER_PREFETCH_MULTIPLIER", "0"),
                ("CELERIAC_WORKER_CONCURRENCY", "3"),
                ("CELERIAC_TASK_DEFAULT_PRIORITY", "9"),
                ("CELERIAC_RESULT_EXPIRES", "0"),
                ("CELERIAC_WORKER_SOFT_SHUTDOWN_TIMEOUT", "2.5"),
                ("CELERIAC_TASK_TIME_LIMIT", "30"),
                ("CELERIAC_BROKER_TRANSPORT_OPTIONS", "{ visibility_timeout = 1.5, polling_interval = 1 }"),
                // Text settings take the text as written, even when it looks like a number.
                ("CELERIAC_TASK_DEFAULT_QUEUE", "2024"),
                ("CELERIAC_WORKER_POOL", "prefork"),
                ("CELERIAC_WORKER_MAX_MEMORY_PER_CHILD", "200000"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .unwrap();
        assert!(c.task_acks_late);
        assert_eq!((c.worker_prefetch_multiplier, c.worker_concurrency), (0, Some(3)));
        assert_eq!(c.task_default_priority, Some(9));
        assert_eq!(c.result_expires_duration(), None, "0 keeps results forever");
        assert_eq!(c.worker_soft_shutdown_timeout, 2.5);
        assert_eq!(c.task_time_limit, Some(30.0));
        assert_eq!(c.transport_seconds("visibility_timeout"), Some(1.5));
        assert_eq!(c.task_default_queue, "2024");
        assert_eq!((c.worker_pool.as_str(), c.worker_max_memory_per_child), ("prefork", Some(200_000)));
    }

    #[test]
    fn result_backend_comes_from_celery_result_backend() {
        let mut c = Config::default();
        c.merge_env([
            ("CELERY_BROKER_URL".to_owned(), "memory://".to_owned()),
            ("CELERY_RESULT_BACKEND".to_owned(), "sqlite://results.db".to_owned()),
        ])
        .unwrap();
        assert_eq!((c.broker_url.as_str(), c.result_backend_url()), ("memory://", "sqlite://results.db"));
        c.merge_env([("CELERIAC_RESULT_BACKEND".to_owned(), "sqlite://other.db".to_owned())]).unwrap();
        assert_eq!(c.result_backend_url(), "sqlite://other.db", "the CELERIAC_ form works too");
    }

    #[test]
    fn the_settings_table_lists_every_field() {
        // Every field spelled out (no `..Default::default()`): a new field does not compile here
        // until it is added, and then this test fails until `SETTINGS` has it too.
        let every = Config {
            broker_url: DEFAULT_URL.to_owned(),
            beat_schedule: BTreeMap::new(),
            timezone: Some("UTC".to_owned()),
            result_backend: Some(DEFAULT_URL.to_owned()),
            broker_transport_options: BTreeMap::new(),
            result_backend_transport_options: BTreeMap::new(),
            result_expires: Some(1.0),
            result_extended: false,
            task_acks_late: false,
            task_acks_on_failure_or_timeout: true,
            task_default_queue: "celery".to_owned(),
            task_routes: BTreeMap::new(),
            task_always_eager: false,
            task_eager_propagates: false,
            task_ignore_result: false,
            task_track_started: false,
            task_time_limit: Some(1.0),
            task_soft_time_limit: Some(1.0),
            task_default_priority: Some(1),
            task_serializer: "json".to_owned(),
            accept_content: vec!["json".to_owned()],
            worker_concurrency: Some(1),
            worker_prefetch_multiplier: 4,
            worker_disable_prefetch: false,
            worker_soft_shutdown_timeout: 30.0,
            worker_disable_rate_limits: false,
            worker_dead_letter_failures: true,
            worker_send_task_events: false,
            worker_pool: "process".to_owned(),
            worker_max_tasks_per_child: Some(1),
            worker_max_memory_per_child: Some(1),
            task_inherit_parent_priority: false,
            task_allow_error_cb_on_chord_header: false,
            result_chord_join_timeout: 3.0,
            task_retry_exceeded_wraps_error: true,
            worker_revoke_expires: 10_800.0,
            task_rate_limits: BTreeMap::new(),
        };
        let Ok(toml::Value::Table(fields)) = toml::Value::try_from(&every) else { panic!("a config is a table") };
        assert_eq!(fields.keys().cloned().collect::<Vec<_>>(), Config::keys());
        let mut sorted = Config::keys();
        sorted.sort();
        assert_eq!(sorted, Config::keys(), "SETTINGS is sorted");
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
