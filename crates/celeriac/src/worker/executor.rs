//! Running one task call: builds the request context, runs the task future on its own tokio
//! task (so a panic becomes a FAILURE, not a dead worker), enforces time limits, and turns what
//! happened into a [`Decision`] with Celery's retry rules. Acting on the decision (storing,
//! acking, republishing) is the caller's job: `consumer` for the worker, `eager` inline.

use crate::app::App;
use crate::protocol::{ExceptionInfo, Message, TaskBody};
use crate::retry::RetryDecision;
use crate::task::{Args, ArgumentError, Request, Retry, Task, TaskError, TaskOptions, TaskResult};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What to do with a finished run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decision {
    /// Store SUCCESS with the value.
    Success(Value),
    /// Publish again at `eta` with `retries + 1` (and the retry's new arguments and
    /// options, if any); store RETRY with `exc`.
    Retry { eta: DateTime<Utc>, exc: Option<ExceptionInfo>, changes: Box<Retry> },
    /// Store FAILURE.
    Failure { exc: ExceptionInfo, traceback: Option<String>, timed_out: bool },
    /// Reject the message.
    Reject { requeue: bool, reason: String },
    /// Acknowledge and store nothing.
    Ignore,
    /// The arguments do not fit: FAILURE (TypeError) and dead-letter.
    BadArguments(ArgumentError),
}

/// Effective options: the task's, filled in from the config and the message.
#[derive(Debug, Clone)]
pub(crate) struct Effective {
    pub options: TaskOptions,
    pub acks_late: bool,
    pub ignore_result: bool,
    pub track_started: bool,
    pub time_limit: Option<f64>,
    pub soft_time_limit: Option<f64>,
}

impl Effective {
    pub(crate) fn new(app: &App, task: &dyn Task, message: &Message) -> Self {
        let options = task.options();
        let config = app.config();
        let (hard, soft) = message.headers.time_limits();
        Effective {
            // Compensations are always acknowledged late: a rollback must survive a crash.
            acks_late: crate::canvas::saga::is_compensation(&message.headers.extra)
                || options.acks_late.unwrap_or(config.task_acks_late),
            ignore_result: message.headers.ignore_result || options.ignore_result.unwrap_or(config.task_ignore_result),
            track_started: options.track_started.unwrap_or(config.task_track_started),
            time_limit: hard.or(options.time_limit).or(config.task_time_limit),
            soft_time_limit: soft.or(options.soft_time_limit).or(config.task_soft_time_limit),
            options,
        }
    }
}

/// The request context for `message`.
pub(crate) fn request(
    app: &App,
    message: &Arc<Message>,
    body: &TaskBody,
    hostname: &str,
    redelivered: bool,
    is_eager: bool,
) -> Request {
    let h = &message.headers;
    Request {
        id: h.id.clone(),
        task: h.task.clone(),
        retries: h.retries,
        root_id: h.root_id.clone(),
        parent_id: h.parent_id.clone(),
        group: h.group.clone(),
        group_index: h.group_index,
        eta: h.eta_time(),
        expires: h.expires_time(),
        delivery_info: message.properties.delivery_info.clone(),
        priority: message.properties.priority,
        redelivered: redelivered || h.extra.get("redelivered").and_then(Value::as_bool).unwrap_or(false),
        hostname: hostname.to_owned(),
        args: body.args.clone(),
        kwargs: body.kwargs.clone(),
        is_eager,
        app: app.clone(),
        soft_limit: CancellationToken::new(),
        soft_limit_seconds: None,
        children: Default::default(),
        message: Some(message.clone()),
        embed: body.embed.clone(),
    }
}

/// Runs the task and decides what its result means.
pub(crate) async fn run(task: Arc<dyn Task>, request: Request, effective: &Effective) -> Decision {
    let wraps = request.app.config().task_retry_exceeded_wraps_error;
    let retries = request.retries;
    match run_task(task, request, effective, false).await {
        Some(result) => decide(result, retries, &effective.options, wraps),
        None => timed_out(effective.time_limit.unwrap_or_default()),
    }
}

/// FAILURE with `TimeLimitExceeded` for a run stopped at its hard limit of `limit` seconds.
pub(crate) fn timed_out(limit: f64) -> Decision {
    Decision::Failure { exc: ExceptionInfo::time_limit_exceeded(limit), traceback: None, timed_out: true }
}

/// Runs the task on its own tokio task (a blocking thread for `blocking` tasks, or when
/// `force_blocking`, as in a pool process) with the soft timer armed; a panic becomes a
/// failure. `None` when the hard limit passed first: an async task is dropped at its next
/// await point, a blocking one cannot be stopped here (its thread runs on, detached).
pub(crate) async fn run_task(
    task: Arc<dyn Task>,
    mut request: Request,
    effective: &Effective,
    force_blocking: bool,
) -> Option<TaskResult<Value>> {
    let args = Args::new(request.task.clone(), request.args.clone(), request.kwargs.clone());
    request.soft_limit_seconds = effective.soft_time_limit;
    let soft = request.soft_limit.clone();
    let blocking = force_blocking || effective.options.blocking;
    let future = task.run(request, args);
    let spawned = if blocking {
        // The runtime's worker threads stay free for other tasks and for the timers below.
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || runtime.block_on(future))
    } else {
        tokio::spawn(future)
    };
    // Aborted when dropped: a run the worker stops (immediate shutdown, grace over, terminate)
    // must not go on in the background while its message is requeued or marked lost.
    let mut handle = tokio_util::task::AbortOnDropHandle::new(spawned);
    let soft_timer = effective.soft_time_limit.map(|s| {
        let soft = soft.clone();
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(s)).await;
            soft.cancel();
        }))
    });
    let joined = match effective.time_limit {
        Some(limit) => match tokio::time::timeout(Duration::from_secs_f64(limit), &mut handle).await {
            Ok(joined) => joined,
            Err(_) => {
                handle.abort();
                if blocking {
                    tracing::warn!(
                        limit,
                        "a blocking task passed its hard time limit: it is marked failed, but its thread cannot be \
                         stopped in the async pool (use worker_pool = \"process\" to stop it for real)"
                    );
                }
                return None;
            }
        },
        None => (&mut handle).await,
    };
    drop(soft_timer);
    Some(joined.unwrap_or_else(|join_error| {
        Err(TaskError::Failure {
            exc: ExceptionInfo::new("Panic", panic_message(join_error), "celeriac"),
            traceback: None,
        })
    }))
}

fn panic_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return "task was cancelled".to_owned();
    }
    let payload = e.into_panic();
    if let Some(s) = payload.downcast_ref::<&str>() {
        format!("task panicked: {s}")
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("task panicked: {s}")
    } else {
        "task panicked".to_owned()
    }
}

/// Applies Celery's retry rules to a task's result. Past `max_retries`, `wraps` fails with
/// `MaxRetriesExceededError` carrying the last error; otherwise with the last error itself
/// when there is one, as Celery does.
pub(crate) fn decide(result: Result<Value, TaskError>, retries: u32, options: &TaskOptions, wraps: bool) -> Decision {
    let policy = &options.retry;
    let now = Utc::now();
    let after = |countdown: f64| now + chrono::Duration::milliseconds((countdown * 1000.0) as i64);
    match result {
        Ok(v) => Decision::Success(v),
        Err(TaskError::Ignore) => Decision::Ignore,
        Err(TaskError::Reject { requeue, reason }) => Decision::Reject { requeue, reason },
        Err(TaskError::Arguments(e)) => Decision::BadArguments(e),
        Err(TaskError::Failure { exc, traceback }) => match policy.on_error(&exc, retries) {
            RetryDecision::Retry { countdown } => Decision::Retry {
                eta: after(countdown),
                exc: Some(exc),
                changes: Box::new(Retry { countdown: Some(countdown), ..Retry::default() }),
            },
            RetryDecision::Fail => Decision::Failure { exc, traceback, timed_out: false },
            RetryDecision::MaxRetriesExceeded => max_exceeded(Some(exc), traceback, wraps),
        },
        Err(TaskError::Retry(r)) => match policy.on_retry_request(r.countdown, retries, r.max_retries) {
            RetryDecision::Retry { countdown } => {
                let eta = r.eta.unwrap_or_else(|| after(countdown));
                Decision::Retry { eta, exc: r.exc.clone(), changes: r }
            }
            _ => max_exceeded(r.exc.clone(), None, wraps),
        },
    }
}

fn max_exceeded(last: Option<ExceptionInfo>, traceback: Option<String>, wraps: bool) -> Decision {
    match last {
        Some(exc) if !wraps => Decision::Failure { exc, traceback, timed_out: false },
        last => Decision::Failure {
            // Task name and id are filled in by the caller, which knows them.
            exc: ExceptionInfo::max_retries_exceeded("{task}", "{id}", last.as_ref()),
            traceback,
            timed_out: false,
        },
    }
}

/// Fills the task name and id into a MaxRetriesExceededError message.
pub(crate) fn name_failure(decision: Decision, task: &str, id: &str) -> Decision {
    match decision {
        Decision::Failure { mut exc, traceback, timed_out } if exc.exc_type == "MaxRetriesExceededError" => {
            if let Some(Value::String(m)) = exc.exc_message.first_mut() {
                *m = m.replacen("{task}", task, 1).replacen("{id}", id, 1);
            }
            Decision::Failure { exc, traceback, timed_out }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::{Backoff, RetryPolicy};

    fn opts(max: Option<u32>) -> TaskOptions {
        TaskOptions {
            retry: RetryPolicy {
                max_retries: max,
                autoretry_for: vec!["Flaky".into()],
                backoff: Some(Backoff { factor: 1, maximum: 600, jitter: false }),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn flaky_errors_retry_until_the_budget_is_spent() {
        let flaky = || Err(TaskError::new("Flaky", "503"));
        assert!(matches!(decide(flaky(), 0, &opts(Some(2)), true), Decision::Retry { .. }));
        let Decision::Failure { exc, .. } = decide(flaky(), 2, &opts(Some(2)), false) else { panic!() };
        assert_eq!(exc.exc_type, "Flaky", "Celery's way: the last error itself");
        assert!(matches!(decide(flaky(), 1, &opts(Some(2)), true), Decision::Retry { .. }));
        let Decision::Failure { exc, .. } = name_failure(decide(flaky(), 2, &opts(Some(2)), true), "t.x", "id1") else {
            panic!()
        };
        assert_eq!(exc.exc_type, "MaxRetriesExceededError");
        assert!(exc.message().starts_with("Can't retry t.x[id1]"), "{}", exc.message());
        assert_eq!(exc.exc_message[1]["exc_type"], "Flaky", "carries the last error");
        assert!(matches!(decide(Err(TaskError::new("Fatal", "x")), 0, &opts(Some(2)), true), Decision::Failure { .. }));
    }

    #[test]
    fn explicit_retry_uses_its_countdown_and_eta() {
        let before = Utc::now();
        let Decision::Retry { eta, .. } =
            decide(Err(TaskError::retry().countdown(60.0).into()), 0, &opts(Some(3)), true)
        else {
            panic!()
        };
        assert!(eta >= before + chrono::Duration::seconds(59) && eta <= Utc::now() + chrono::Duration::seconds(61));
        let fixed = before + chrono::Duration::hours(1);
        let Decision::Retry { eta, .. } = decide(Err(TaskError::retry().eta(fixed).into()), 0, &opts(Some(3)), true)
        else {
            panic!()
        };
        assert_eq!(eta, fixed);
        let unlimited = TaskError::retry().max_retries(None).into();
        assert!(matches!(decide(Err(unlimited), 99, &opts(Some(3)), true), Decision::Retry { .. }));
    }
}
