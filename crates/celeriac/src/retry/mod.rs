//! Retry policy: when a failed task runs again and how long it waits first.
//!
//! `backoff` holds Celery's exponential back-off arithmetic; `policy` decides between retry and
//! final failure from a task's options. Publishing the retry is the worker's job.

mod backoff;
mod policy;

pub use backoff::{Backoff, exponential_backoff_interval};
pub use policy::{RetryDecision, RetryPolicy};
