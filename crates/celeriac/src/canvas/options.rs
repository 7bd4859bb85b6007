//! Builder methods on [`Signature`] for `apply_async` options, with Celery's option names.

use crate::Error;
use crate::app::App;
use crate::protocol::{Signature, time};
use crate::result::AsyncResult;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

impl Signature {
    /// `.si()`: do not prepend the parent's result.
    pub fn immutable(mut self) -> Self {
        self.immutable = true;
        self
    }

    /// Sets any `apply_async` option by Celery's name (Celery's `.set()`).
    pub fn set(mut self, option: &str, value: impl Into<Value>) -> Self {
        self.options.insert(option.to_owned(), value.into());
        self
    }

    /// Adds a keyword argument.
    pub fn kwarg(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.kwargs.insert(name.to_owned(), value.into());
        self
    }

    /// Run no earlier than `seconds` from now.
    pub fn countdown(self, seconds: f64) -> Self {
        self.set("countdown", seconds_value(seconds))
    }

    /// Run no earlier than `eta`.
    pub fn eta(self, eta: DateTime<Utc>) -> Self {
        self.set("eta", time::to_iso(&eta))
    }

    /// Revoke instead of running if not started within `seconds`.
    pub fn expires_in(self, seconds: f64) -> Self {
        self.set("expires", seconds_value(seconds))
    }

    /// Revoke instead of running if not started by `at`.
    pub fn expires_at(self, at: DateTime<Utc>) -> Self {
        self.set("expires", time::to_iso(&at))
    }

    /// Send to `queue` instead of the routed one.
    pub fn queue(self, queue: &str) -> Self {
        self.set("queue", queue)
    }

    /// Message priority 0-9.
    pub fn priority(self, priority: u8) -> Self {
        self.set("priority", priority)
    }

    /// Use this task id instead of a fresh UUID.
    pub fn with_task_id(self, id: &str) -> Self {
        self.set("task_id", id)
    }

    /// Extra message headers.
    pub fn headers(self, headers: Map<String, Value>) -> Self {
        self.set("headers", Value::Object(headers))
    }

    /// Run `callback` with this task's result on success (`link`).
    pub fn link(mut self, callback: Signature) -> Self {
        push_option(&mut self.options, "link", callback);
        self
    }

    /// Run `errback` with this task's id on failure (`link_error`).
    pub fn link_error(mut self, errback: Signature) -> Self {
        push_option(&mut self.options, "link_error", errback);
        self
    }

    /// Sends the call; returns a handle on its result.
    pub async fn apply_async(self, app: &App) -> Result<AsyncResult, Error> {
        app.send_signature(self).await
    }

    /// Sends the call with no further options (Celery's `delay`).
    pub async fn delay(self, app: &App) -> Result<AsyncResult, Error> {
        self.apply_async(app).await
    }
}

/// Whole seconds as an integer (as Python writes `countdown=5`), others as a float.
fn seconds_value(seconds: f64) -> Value {
    if seconds.fract() == 0.0 && seconds.abs() < 1e15 { Value::from(seconds as i64) } else { Value::from(seconds) }
}

fn push_option(options: &mut Map<String, Value>, key: &str, sig: Signature) {
    let value = serde_json::to_value(sig).unwrap_or(Value::Null);
    match options.get_mut(key) {
        Some(Value::Array(list)) => list.push(value),
        _ => {
            options.insert(key.to_owned(), Value::Array(vec![value]));
        }
    }
}

impl Signature {
    /// Stamps this signature, its callbacks and errbacks, and every signature in it with
    /// `stamps` (Celery 5.3's stamping, with a visitor that returns the same stamps for every
    /// signature): each becomes a message header listed in `stamped_headers`.
    pub fn stamp(self, stamps: &Map<String, Value>) -> Self {
        match super::tree::Sig::from_signature(self.clone()) {
            Ok(mut sig) => {
                sig.stamp(stamps);
                sig.to_signature()
            }
            Err(_) => self,
        }
    }
}
