//! Per-task rate limits with Celery's syntax (`"10/s"`, `"100/m"`, `"0.5/h"`, `"10"` = per
//! second), enforced per worker as Celery does, by spacing starts evenly.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// A parsed rate: tasks per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    per_second: f64,
}

impl RateLimit {
    /// Parses Celery's rate syntax.
    pub fn parse(text: &str) -> Result<RateLimit, String> {
        let (count, unit) = text.trim().split_once('/').unwrap_or((text.trim(), "s"));
        let count: f64 =
            count.trim().parse().map_err(|_| format!("{text:?} is not a rate like \"10/s\", \"100/m\" or \"5/h\""))?;
        let per = match unit.trim() {
            "s" | "" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => return Err(format!("unknown unit {other:?} in rate {text:?}: use s, m or h")),
        };
        if count.is_nan() || count <= 0.0 {
            return Err(format!("rate {text:?} must be positive"));
        }
        Ok(RateLimit { per_second: count / per })
    }

    /// Time between two starts.
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.per_second)
    }
}

/// Start times per task name.
#[derive(Debug, Default)]
pub(crate) struct RateLimiter {
    next: Mutex<HashMap<String, Instant>>,
}

impl RateLimiter {
    /// Reserves the next start for `task`; returns when it may start.
    pub(crate) fn reserve(&self, task: &str, limit: RateLimit) -> Instant {
        let mut next = self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let slot = next.get(task).copied().filter(|t| *t > now).unwrap_or(now);
        next.insert(task.to_owned(), slot + limit.interval());
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_celery_rates() {
        assert_eq!(RateLimit::parse("10/s").unwrap().interval(), Duration::from_millis(100));
        assert_eq!(RateLimit::parse("60/m").unwrap().interval(), Duration::from_secs(1));
        assert_eq!(RateLimit::parse("2").unwrap().interval(), Duration::from_millis(500));
        assert!(RateLimit::parse("ten/s").is_err());
        assert!(RateLimit::parse("1/d").is_err());
        assert!(RateLimit::parse("0/s").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn starts_are_spaced_by_the_interval() {
        let limiter = RateLimiter::default();
        let rate = RateLimit::parse("4/s").unwrap();
        let t0 = Instant::now();
        let slots: Vec<_> = (0..3).map(|_| limiter.reserve("t", rate) - t0).collect();
        assert_eq!(slots, [Duration::ZERO, Duration::from_millis(250), Duration::from_millis(500)]);
        assert_eq!(limiter.reserve("other", rate) - t0, Duration::ZERO);
    }
}
