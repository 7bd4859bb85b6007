//! Deciding, for a failed run, whether to retry and after how long (Celery's `autoretry_for`,
//! `retry()` and `max_retries` rules, spec §8.2–8.3).

use super::Backoff;
use crate::protocol::ExceptionInfo;

/// The retry-related options of one task.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// `max_retries` (3); `None` retries forever.
    pub max_retries: Option<u32>,
    /// `default_retry_delay` in seconds (180).
    pub default_retry_delay: f64,
    /// `autoretry_for`: exception type names that trigger a retry; `"Exception"` matches all.
    pub autoretry_for: Vec<String>,
    /// `retry_backoff`: `None` when off.
    pub backoff: Option<Backoff>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_retries: Some(3), default_retry_delay: 180.0, autoretry_for: Vec::new(), backoff: None }
    }
}

/// What to do after a failed run.
#[derive(Debug, Clone, PartialEq)]
pub enum RetryDecision {
    /// Publish again after `countdown` seconds with `retries + 1`.
    Retry {
        /// Seconds to wait.
        countdown: f64,
    },
    /// Give up: the retry budget is spent.
    MaxRetriesExceeded,
    /// Not a retryable error: fail now.
    Fail,
}

impl RetryPolicy {
    /// Whether `exc` is listed in `autoretry_for`.
    pub fn autoretries(&self, exc: &ExceptionInfo) -> bool {
        self.autoretry_for.iter().any(|kind| {
            kind == "Exception" || *kind == exc.exc_type || *kind == format!("{}.{}", exc.exc_module, exc.exc_type)
        })
    }

    /// Decision for an error raised after `retries` retries (automatic retry).
    pub fn on_error(&self, exc: &ExceptionInfo, retries: u32) -> RetryDecision {
        if !self.autoretries(exc) {
            return RetryDecision::Fail;
        }
        let countdown = match self.backoff {
            Some(b) => b.countdown(retries) as f64,
            None => self.default_retry_delay,
        };
        self.on_retry_request(Some(countdown), retries, None)
    }

    /// Decision for an explicit retry request (`TaskError::Retry`) after `retries` retries.
    pub fn on_retry_request(
        &self,
        countdown: Option<f64>,
        retries: u32,
        max_retries: Option<Option<u32>>,
    ) -> RetryDecision {
        let max = max_retries.unwrap_or(self.max_retries);
        match max {
            Some(max) if retries + 1 > max => RetryDecision::MaxRetriesExceeded,
            _ => RetryDecision::Retry { countdown: countdown.unwrap_or(self.default_retry_delay).max(0.0) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exc(t: &str) -> ExceptionInfo {
        ExceptionInfo::new(t, "x", "rust")
    }

    #[test]
    fn autoretry_matches_listed_kinds_only() {
        let p = RetryPolicy { autoretry_for: vec!["Timeout".into()], ..Default::default() };
        assert_eq!(p.on_error(&exc("Timeout"), 0), RetryDecision::Retry { countdown: 180.0 });
        assert_eq!(p.on_error(&exc("Other"), 0), RetryDecision::Fail);
        let all = RetryPolicy { autoretry_for: vec!["Exception".into()], ..Default::default() };
        assert!(all.autoretries(&exc("Anything")));
    }

    #[test]
    fn budget_is_max_retries_then_failure() {
        let p = RetryPolicy {
            autoretry_for: vec!["E".into()],
            backoff: Some(Backoff { factor: 2, maximum: 600, jitter: false }),
            ..Default::default()
        };
        assert_eq!(p.on_error(&exc("E"), 0), RetryDecision::Retry { countdown: 2.0 });
        assert_eq!(p.on_error(&exc("E"), 2), RetryDecision::Retry { countdown: 8.0 });
        assert_eq!(p.on_error(&exc("E"), 3), RetryDecision::MaxRetriesExceeded);
        let forever = RetryPolicy { max_retries: None, ..p };
        assert!(matches!(forever.on_error(&exc("E"), 50), RetryDecision::Retry { .. }));
    }
}
