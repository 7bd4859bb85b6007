//! Rate limits shared by every worker of a broker (*beyond Celery*, whose `rate_limit` is per
//! worker): a **global** limit per task name, and a **per-key** limit whose key comes from the
//! task's arguments (a keyword or positional parameter such as `customer_id`, or a function of
//! the arguments), so that 20 workers together respect "5/s per customer".
//!
//! Each limit is a bucket in the broker ([`crate::broker::Broker::rate_limit_acquire`]: a Lua
//! GCRA script on Redis, one transaction on SQLite, a map in memory). A worker asks for a
//! start once it holds a concurrency slot, right before the task starts; when none is free it
//! gives the slot back and waits for the turn the bucket's line gave it (so waiting messages
//! come back one per interval, not all at once): up to [`WAIT_HERE`] (1 s) in the worker,
//! holding the message but no slot, longer in the broker (the message is requeued, due at its
//! turn), so it holds no prefetch place either. Other tasks (another key, another task) are not
//! held up behind it.
//!
//! Configured with `task_rate_limits` (TOML) or [`crate::AppBuilder::global_rate_limit`] /
//! [`crate::AppBuilder::key_rate_limit`]. Not here: the per-worker `rate_limit`
//! (`rate_limit.rs`).

use super::rate_limit::RateLimit;
use crate::app::App;
use crate::config::ConfigError;
use crate::task::Task;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A function computing a per-key limit's key from a task's positional and keyword arguments;
/// `None` puts the call under no per-key limit.
pub type KeyFn = dyn Fn(&[Value], &Map<String, Value>) -> Option<String> + Send + Sync;

/// Where a per-key limit's key comes from.
#[derive(Clone)]
pub enum RateKey {
    /// The value of the parameter with this name, given by keyword or by position.
    Param(String),
    /// A function of the arguments.
    Fn(Arc<KeyFn>),
}

impl RateKey {
    /// The parameter `name` (keyword, or positional by the task's parameter names).
    pub fn param(name: impl Into<String>) -> Self {
        RateKey::Param(name.into())
    }

    /// A function of `(args, kwargs)`.
    pub fn from_fn(f: impl Fn(&[Value], &Map<String, Value>) -> Option<String> + Send + Sync + 'static) -> Self {
        RateKey::Fn(Arc::new(f))
    }

    /// The key of one call of `task`.
    fn of(&self, task: &dyn Task, args: &[Value], kwargs: &Map<String, Value>) -> Option<String> {
        match self {
            RateKey::Fn(f) => f(args, kwargs),
            RateKey::Param(name) => {
                let value = kwargs.get(name).or_else(|| {
                    let at = task.params().names.iter().position(|n| n == name)?;
                    args.get(at)
                })?;
                Some(match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
            }
        }
    }
}

impl fmt::Debug for RateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateKey::Param(name) => f.debug_tuple("Param").field(name).finish(),
            RateKey::Fn(_) => f.write_str("Fn(..)"),
        }
    }
}

/// The shared limits of one task.
#[derive(Debug, Clone, Default)]
pub(crate) struct Limits {
    global: Option<RateLimit>,
    per_key: Option<(RateLimit, RateKey)>,
    burst: u32,
}

/// One limit given to the builder: a rate (not parsed yet) and, per key, where the key is.
#[derive(Debug, Clone)]
enum Decl {
    Global(String),
    PerKey(String, RateKey),
}

/// Shared limits as given to the builder, parsed when the app is built.
#[derive(Debug, Clone, Default)]
pub(crate) struct Declared {
    entries: Vec<(String, Decl)>,
}

impl Declared {
    pub(crate) fn global(&mut self, task: &str, rate: &str) {
        self.entries.push((task.to_owned(), Decl::Global(rate.to_owned())));
    }

    pub(crate) fn per_key(&mut self, task: &str, rate: &str, key: RateKey) {
        self.entries.push((task.to_owned(), Decl::PerKey(rate.to_owned(), key)));
    }
}

/// Every task's shared limits.
#[derive(Debug, Clone, Default)]
pub(crate) struct SharedLimits {
    by_task: HashMap<String, Limits>,
}

fn bad(key: String, source: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::BadValue { key, source_name: source.to_owned(), problem: problem.into() }
}

impl SharedLimits {
    /// Parses `task_rate_limits` and what the builder declared (the builder wins).
    pub(crate) fn build(config: &crate::Config, declared: &Declared) -> Result<Self, ConfigError> {
        let mut by_task: HashMap<String, Limits> = HashMap::new();
        let parse = |key: String, source: &str, rate: &str| RateLimit::parse(rate).map_err(|p| bad(key, source, p));
        for (task, value) in &config.task_rate_limits {
            let key = |field: &str| format!("task_rate_limits.{task}.{field}");
            let toml::Value::Table(t) = value else {
                return Err(bad(
                    format!("task_rate_limits.{task}"),
                    "the configuration",
                    "expected a table such as { per_key = \"5/s\", key = \"customer_id\", global = \"100/s\" }",
                ));
            };
            let text = |field: &str| -> Result<Option<String>, ConfigError> {
                match t.get(field) {
                    None => Ok(None),
                    Some(toml::Value::String(s)) => Ok(Some(s.clone())),
                    Some(other) => Err(bad(key(field), "the configuration", format!("expected a string, got {other}"))),
                }
            };
            for field in t.keys() {
                if !["global", "per_key", "key", "burst"].contains(&field.as_str()) {
                    return Err(bad(key(field), "the configuration", "unknown field: use global, per_key, key, burst"));
                }
            }
            let limits = by_task.entry(task.clone()).or_default();
            if let Some(rate) = text("global")? {
                limits.global = Some(parse(key("global"), "the configuration", &rate)?);
            }
            match (text("per_key")?, text("key")?) {
                (Some(rate), Some(param)) => {
                    limits.per_key = Some((parse(key("per_key"), "the configuration", &rate)?, RateKey::param(param)))
                }
                (None, None) => {}
                _ => return Err(bad(key("per_key"), "the configuration", "per_key and key go together")),
            }
            match t.get("burst") {
                None => {}
                Some(toml::Value::Integer(n)) if (1..=i64::from(u32::MAX)).contains(n) => limits.burst = *n as u32,
                Some(other) => {
                    return Err(bad(key("burst"), "the configuration", format!("expected a count >= 1, got {other}")));
                }
            }
        }
        for (task, decl) in &declared.entries {
            let limits = by_task.entry(task.clone()).or_default();
            match decl {
                Decl::Global(rate) => {
                    limits.global = Some(parse(format!("global_rate_limit of task {task}"), "the App builder", rate)?)
                }
                Decl::PerKey(rate, k) => {
                    let rate = parse(format!("key_rate_limit of task {task}"), "the App builder", rate)?;
                    limits.per_key = Some((rate, k.clone()));
                }
            }
        }
        Ok(SharedLimits { by_task })
    }

    /// Whether any task has a shared limit.
    pub(crate) fn is_empty(&self) -> bool {
        self.by_task.is_empty()
    }

    /// Takes a start for this call of `task` from each bucket that applies. `None`: start
    /// now; `Some(wait)`: not now, try again after `wait`.
    pub(crate) async fn acquire(
        &self,
        app: &App,
        task: &dyn Task,
        waiter: &str,
        args: &[Value],
        kwargs: &Map<String, Value>,
    ) -> Option<Duration> {
        let limits = self.by_task.get(task.name())?;
        let burst = limits.burst.max(1);
        let mut buckets: Vec<(String, RateLimit)> = Vec::with_capacity(2);
        if let Some((rate, key)) = &limits.per_key
            && let Some(k) = key.of(task, args, kwargs)
        {
            buckets.push((format!("{}:key:{k}", task.name()), *rate));
        }
        if let Some(rate) = limits.global {
            buckets.push((format!("{}:global", task.name()), rate));
        }
        for (bucket, rate) in buckets {
            match app.broker().rate_limit_acquire(&bucket, waiter, spaced(rate.interval()), burst).await {
                Ok(wait) if wait.is_zero() => {}
                Ok(wait) => return Some(wait),
                Err(e) => {
                    tracing::warn!(%bucket, error = %e, "could not take from the shared rate limit; trying again in 1 s");
                    return Some(Duration::from_secs(1));
                }
            }
        }
        None
    }
}

/// The spacing asked of a bucket for `interval`: 4% and 5 ms more, to absorb the
/// milliseconds between a grant and the task's start that vary from one start to the next
/// (tens of ms on a loaded machine with SQLite, whose grant is a committed transaction), so
/// starts, not only grants, keep to the rate in every window: "5/s" grants every 213 ms,
/// 4.7 starts a second.
fn spaced(interval: Duration) -> Duration {
    interval.mul_f64(1.04) + Duration::from_millis(5)
}

/// A wait up to this long is slept in the worker (holding the message, not a slot); a longer
/// one in the broker.
pub(crate) const WAIT_HERE: Duration = Duration::from_secs(1);

/// When a message that found no room in its bucket comes back: at its turn in the bucket's
/// line, plus up to 10% (at most 50 ms) so that two turns never land on the same instant.
pub(crate) fn retry_at(wait: Duration) -> chrono::DateTime<chrono::Utc> {
    let jitter = wait.mul_f64(0.1).min(Duration::from_millis(50)).mul_f64(rand_fraction());
    chrono::Utc::now() + chrono::Duration::from_std(wait + jitter).unwrap_or(chrono::Duration::seconds(1))
}

/// A number in [0, 1) from a fresh UUID (no random crate needed for jitter).
fn rand_fraction() -> f64 {
    (uuid::Uuid::new_v4().as_u128() & 0xFFFF_FFFF) as f64 / 4_294_967_296.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml_text: &str) -> crate::Config {
        let mut c = crate::Config::default();
        let table: toml::Table = toml::from_str(toml_text).unwrap();
        c.task_rate_limits = table.into_iter().collect();
        c
    }

    #[test]
    fn config_tables_parse_and_bad_ones_name_the_field() {
        let ok = config(
            r#"
            "billing.charge" = { global = "100/s", per_key = "5/s", key = "customer_id", burst = 2 }
            "mail.send" = { global = "10/m" }
            "#,
        );
        let limits = SharedLimits::build(&ok, &Declared::default()).unwrap();
        let charge = &limits.by_task["billing.charge"];
        assert_eq!(charge.global, Some(RateLimit::parse("100/s").unwrap()));
        assert_eq!(charge.per_key.as_ref().map(|(r, _)| *r), Some(RateLimit::parse("5/s").unwrap()));
        assert_eq!(charge.burst, 2);
        assert!(limits.by_task["mail.send"].per_key.is_none());
        for (text, field) in [
            (r#"t = { per_key = "5/s" }"#, "task_rate_limits.t.per_key"),
            (r#"t = { global = "fast" }"#, "task_rate_limits.t.global"),
            (r#"t = { glboal = "5/s" }"#, "task_rate_limits.t.glboal"),
            (r#"t = { global = "5/s", burst = 0 }"#, "task_rate_limits.t.burst"),
        ] {
            let e = SharedLimits::build(&config(text), &Declared::default()).unwrap_err();
            assert!(e.to_string().contains(field), "{text}: {e}");
        }
    }

    #[test]
    fn the_key_comes_from_a_keyword_a_position_or_a_function() {
        let task = crate::FnTask::new(
            "t",
            crate::Params { names: vec!["customer_id".into(), "amount".into()], ..Default::default() },
            |_, _| async { Ok(Value::Null) },
        );
        let key = RateKey::param("customer_id");
        let kwargs: Map<String, Value> = serde_json::from_str(r#"{"customer_id": "A"}"#).unwrap();
        assert_eq!(key.of(&task, &[], &kwargs).as_deref(), Some("A"));
        assert_eq!(key.of(&task, &[Value::from(7), Value::from(1)], &Map::new()).as_deref(), Some("7"));
        assert_eq!(key.of(&task, &[], &Map::new()), None);
        let f = RateKey::from_fn(|args, _| args.first().and_then(Value::as_str).map(|s| s.to_uppercase()));
        assert_eq!(f.of(&task, &[Value::from("b")], &Map::new()).as_deref(), Some("B"));
    }

    #[test]
    fn retries_come_back_after_the_wait_with_bounded_jitter() {
        let wait = Duration::from_millis(200);
        for _ in 0..50 {
            let at = retry_at(wait) - chrono::Utc::now();
            assert!(at >= chrono::Duration::milliseconds(190) && at <= chrono::Duration::milliseconds(230), "{at}");
        }
    }
}
