//! Task states with Celery's names and precedence (`celery/states.py`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// The state of a task as stored in a result backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum State {
    /// Unknown id, or waiting to run. Never stored; a missing result reads as PENDING.
    Pending,
    /// A worker received the message (not stored by default).
    Received,
    /// A worker started running it (stored only with `track_started`).
    Started,
    /// Finished and returned a value. Final; never overwritten.
    Success,
    /// Failed for good. Final.
    Failure,
    /// Failed and will run again later.
    Retry,
    /// Revoked or expired before it ran. Final.
    Revoked,
    /// Rejected by the task.
    Rejected,
    /// The task asked to be ignored.
    Ignored,
    /// A custom state string written by someone else (Celery allows `update_state(state=...)`).
    Custom(String),
}

impl State {
    /// The wire string, e.g. `"SUCCESS"`.
    pub fn as_str(&self) -> &str {
        match self {
            State::Pending => "PENDING",
            State::Received => "RECEIVED",
            State::Started => "STARTED",
            State::Success => "SUCCESS",
            State::Failure => "FAILURE",
            State::Retry => "RETRY",
            State::Revoked => "REVOKED",
            State::Rejected => "REJECTED",
            State::Ignored => "IGNORED",
            State::Custom(s) => s,
        }
    }

    /// Parses a wire string; unknown strings become [`State::Custom`].
    pub fn parse(s: &str) -> State {
        match s {
            "PENDING" => State::Pending,
            "RECEIVED" => State::Received,
            "STARTED" => State::Started,
            "SUCCESS" => State::Success,
            "FAILURE" => State::Failure,
            "RETRY" => State::Retry,
            "REVOKED" => State::Revoked,
            "REJECTED" => State::Rejected,
            "IGNORED" => State::Ignored,
            other => State::Custom(other.to_owned()),
        }
    }

    /// Celery's READY_STATES: SUCCESS, FAILURE, REVOKED.
    pub fn is_ready(&self) -> bool {
        matches!(self, State::Success | State::Failure | State::Revoked)
    }

    /// Celery's PROPAGATE_STATES: `get()` raises for these.
    pub fn propagates(&self) -> bool {
        matches!(self, State::Failure | State::Revoked)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for State {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for State {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(State::parse(&s))
    }
}
