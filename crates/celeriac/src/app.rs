//! The application: configuration, the broker and backend it opened, the registered tasks and
//! the app-wide error reporters. Cheap to clone; everything else receives an `App`.

use crate::backend::{self, ResultBackend};
use crate::broker::{self, Broker};
use crate::config::{Config, ConfigError, closest};
use crate::reporter::ErrorReporter;
use crate::result::AsyncResult;
use crate::task::Task;
use crate::{Error, Signature};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// A Celeriac application.
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    tasks: HashMap<String, Arc<dyn Task>>,
    reporters: Vec<Arc<dyn ErrorReporter>>,
    origin: String,
    oid: String,
    /// Beat entries: `beat_schedule` from the config, then those added in code.
    beat_entries: Vec<crate::beat::Entry>,
    /// Rate limits shared by all workers (`worker/shared_limit.rs`).
    shared_limits: crate::worker::shared_limit::SharedLimits,
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App")
            .field("broker", &self.inner.broker.url())
            .field("backend", &self.inner.backend.url())
            .field("tasks", &self.task_names())
            .finish()
    }
}

impl App {
    /// A builder starting from Celery's defaults (SQLite in the working directory).
    pub fn builder() -> AppBuilder {
        AppBuilder::default()
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The broker.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.inner.broker
    }

    /// The result backend.
    pub fn backend(&self) -> &Arc<dyn ResultBackend> {
        &self.inner.backend
    }

    /// The task registered under `name`.
    pub fn task(&self, name: &str) -> Option<&Arc<dyn Task>> {
        self.inner.tasks.get(name)
    }

    /// Registered task names, sorted, without Celery's built-ins (`celery.accumulate`, ...).
    pub fn task_names(&self) -> Vec<String> {
        let builtin = crate::canvas::builtins::names();
        let mut names: Vec<String> =
            self.inner.tasks.keys().filter(|n| !builtin.contains(&n.as_str())).cloned().collect();
        names.sort();
        names
    }

    /// App-wide error reporters.
    pub fn error_reporters(&self) -> &[Arc<dyn ErrorReporter>] {
        &self.inner.reporters
    }

    /// The `origin` header of messages this process sends (`gen<pid>@<host>`).
    pub fn origin(&self) -> &str {
        &self.inner.origin
    }

    /// This app's unique id (Celery's `thread_oid`): the `reply_to` of messages it sends.
    pub fn oid(&self) -> &str {
        &self.inner.oid
    }

    /// A handle on the result of `task_id`.
    pub fn async_result(&self, task_id: impl Into<String>) -> AsyncResult {
        AsyncResult::new(task_id, self.clone())
    }

    /// Sends a task by name (it need not be registered here: a Python worker may run it).
    pub async fn send_task(
        &self,
        name: &str,
        args: Vec<serde_json::Value>,
        kwargs: serde_json::Map<String, serde_json::Value>,
    ) -> Result<AsyncResult, Error> {
        let mut sig = Signature::new(name, args);
        sig.kwargs = kwargs;
        self.send_signature(sig).await
    }

    /// Sends a signature with its options (`task_id`, `countdown`, `eta`, `expires`, `queue`,
    /// `priority`, `headers`, ...). In eager mode it runs inline instead.
    pub async fn send_signature(&self, signature: Signature) -> Result<AsyncResult, Error> {
        crate::canvas::send::apply_async(self, signature).await
    }

    /// Sends many plain task signatures at once: one broker round trip (Redis: one pipeline),
    /// in order. Canvases (chains, groups, chords) go through [`App::send_signature`].
    pub async fn send_batch(&self, signatures: Vec<Signature>) -> Result<Vec<AsyncResult>, Error> {
        crate::canvas::send::send_batch(self, signatures).await
    }

    /// The members of the group `group_id` sent from here (or by a worker of this backend).
    pub async fn group_result(&self, group_id: &str) -> Result<Option<crate::GroupResult>, Error> {
        let saved = self.backend().restore_group(group_id).await?;
        Ok(saved.and_then(|v| crate::canvas::result::Res::from_tuple(&v)).map(|res| {
            crate::GroupResult::new(group_id, res.leaf_ids().into_iter().map(|id| self.async_result(id)).collect())
        }))
    }

    /// The workflow sent under `id` (its result id or first task id) as a tree with states.
    pub async fn workflow(&self, id: &str) -> Result<Option<crate::canvas::workflow::Workflow>, Error> {
        crate::canvas::workflow::workflow(self, id).await
    }

    /// Beat entries: the `beat_schedule` setting's, then [`AppBuilder::beat_entry`]'s (one added
    /// in code replaces a configured one of the same name).
    pub fn beat_entries(&self) -> &[crate::beat::Entry] {
        &self.inner.beat_entries
    }

    /// The `timezone` setting (UTC when unset): crontab entries without their own zone use it.
    pub fn timezone(&self) -> chrono_tz::Tz {
        self.inner.config.timezone.as_deref().and_then(|tz| crate::beat::parse_tz(tz).ok()).unwrap_or(chrono_tz::UTC)
    }

    /// Suggests a registered name close to `name`, for "not registered" errors.
    pub fn suggest_task(&self, name: &str) -> Option<String> {
        closest(name, self.inner.tasks.keys().map(String::as_str))
    }

    /// The rate limits shared by all workers.
    pub(crate) fn shared_limits(&self) -> &crate::worker::shared_limit::SharedLimits {
        &self.inner.shared_limits
    }

    /// Revokes tasks for every worker, now and after restarts: the ids are persisted in the
    /// broker until `expires` (default `worker_revoke_expires`, 3 h) and Celery's `revoke`
    /// is broadcast; with `terminate`, running tasks are stopped. Tasks that have not started
    /// are stored as REVOKED.
    pub async fn revoke(
        &self,
        ids: &[String],
        terminate: bool,
        expires: Option<std::time::Duration>,
    ) -> Result<(), Error> {
        crate::worker::revoke::revoke(self, ids, terminate, expires).await
    }
}

/// Builds an [`App`].
#[derive(Default)]
pub struct AppBuilder {
    config: Config,
    load_env: bool,
    settings: Vec<(String, toml::Value)>,
    tasks: Vec<Arc<dyn Task>>,
    reporters: Vec<Arc<dyn ErrorReporter>>,
    broker: Option<Arc<dyn Broker>>,
    backend: Option<Arc<dyn ResultBackend>>,
    beat_entries: Vec<crate::beat::Entry>,
    shared_limits: crate::worker::shared_limit::Declared,
}

impl AppBuilder {
    /// Starts from `config` instead of the defaults.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Also reads `celeriac.toml` (or `CELERIAC_CONFIG`) and the environment at build time;
    /// builder settings still win.
    pub fn from_env(mut self) -> Self {
        self.load_env = true;
        self
    }

    /// Sets any setting by its Celery name; checked at [`AppBuilder::build`].
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.settings.push((key.to_owned(), value.into()));
        self
    }

    /// `broker_url`.
    pub fn broker_url(self, url: &str) -> Self {
        self.set("broker_url", url)
    }

    /// `result_backend`.
    pub fn result_backend(self, url: &str) -> Self {
        self.set("result_backend", url)
    }

    /// Registers a task (usually the type `#[task]` generated).
    pub fn task(mut self, task: impl Task) -> Self {
        self.tasks.push(Arc::new(task));
        self
    }

    /// *Beyond Celery*: at most `rate` (`"100/s"`, `"10/m"`) starts of `task` across all
    /// workers of the broker together (Celery's `rate_limit` is per worker).
    pub fn global_rate_limit(mut self, task: &str, rate: &str) -> Self {
        self.shared_limits.global(task, rate);
        self
    }

    /// *Beyond Celery*: at most `rate` starts of `task` per value of `key` (a parameter such
    /// as `customer_id`, or a function of the arguments) across all workers together.
    pub fn key_rate_limit(mut self, task: &str, rate: &str, key: crate::worker::RateKey) -> Self {
        self.shared_limits.per_key(task, rate, key);
        self
    }

    /// Adds an app-wide error reporter (called for every final failure).
    pub fn error_reporter(mut self, reporter: impl ErrorReporter) -> Self {
        self.reporters.push(Arc::new(reporter));
        self
    }

    /// Uses an already-open broker instead of opening `broker_url`.
    pub fn broker(mut self, broker: Arc<dyn Broker>) -> Self {
        self.broker = Some(broker);
        self
    }

    /// Uses an already-open backend instead of opening `result_backend`.
    pub fn backend(mut self, backend: Arc<dyn ResultBackend>) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Adds a beat entry (see [`crate::beat`]); it replaces a `beat_schedule` entry of the same
    /// name.
    pub fn beat_entry(mut self, entry: crate::beat::Entry) -> Self {
        self.beat_entries.push(entry);
        self
    }

    /// Checks settings and task options, opens the broker and backend.
    pub async fn build(self) -> Result<App, Error> {
        let mut config = if self.load_env { Config::load()? } else { self.config };
        for (key, value) in self.settings {
            config.set_value(&key, value, "the App builder")?;
        }
        let mut tasks: HashMap<String, Arc<dyn Task>> = HashMap::new();
        // Celery's built-in tasks every app has (`celery.accumulate`, `celery.map`, ...); a
        // task registered under the same name replaces one.
        for task in crate::canvas::builtins::all() {
            tasks.insert(task.name().to_owned(), task);
        }
        for task in self.tasks {
            if let Some(rate) = task.options().rate_limit {
                crate::worker::RateLimit::parse(&rate).map_err(|problem| ConfigError::BadValue {
                    key: format!("rate_limit of task {}", task.name()),
                    source_name: "#[task] options".to_owned(),
                    problem,
                })?;
            }
            tasks.insert(task.name().to_owned(), task);
        }
        let broker = match self.broker {
            Some(b) => b,
            None => broker::from_url(&config.broker_url, &config).await?,
        };
        let backend = match self.backend {
            Some(b) => b,
            None if config.result_backend_url() == config.broker_url && config.broker_url.starts_with("memory://") => {
                backend::from_url("memory://").await?
            }
            None => backend::open(config.result_backend_url(), &config).await?,
        };
        let mut beat_entries =
            crate::beat::entries_from_config(&config.beat_schedule).map_err(|e| ConfigError::BadValue {
                key: format!("beat_schedule.{}", e.entry),
                source_name: "the configuration".to_owned(),
                problem: e.problem,
            })?;
        for entry in self.beat_entries {
            beat_entries.retain(|e| e.name != entry.name);
            beat_entries.push(entry);
        }
        let host = hostname();
        let shared_limits = crate::worker::shared_limit::SharedLimits::build(&config, &self.shared_limits)?;
        Ok(App {
            inner: Arc::new(Inner {
                config,
                broker,
                backend,
                tasks,
                reporters: self.reporters,
                origin: format!("gen{}@{host}", std::process::id()),
                oid: uuid::Uuid::new_v4().to_string(),
                beat_entries,
                shared_limits,
            }),
        })
    }
}

/// This machine's host name (from the environment or `/etc/hostname`), `localhost` if unknown.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_owned()).filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "localhost".to_owned())
}
