//! What the worker and its pool processes say to each other over their socket: length-prefixed
//! JSON frames (a 4-byte big-endian length, then the JSON text), one job and one reply at a time.
//!
//! Not for: starting or stopping processes (`pool/mod.rs`) or running the task (`pool/child.rs`).

use crate::protocol::ExceptionInfo;
use crate::task::{ArgumentError, Retry, TaskError, TaskResult};
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Frames larger than this are refused: a task message is far smaller, so a bigger length
/// means the stream is out of step.
const MAX_FRAME: u32 = 256 * 1024 * 1024;

/// The first frame a child sends, once its app is built and it can take jobs.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Hello {
    /// The child's process id, checked against the one the worker started.
    pub pid: u32,
}

/// One task to run, as the worker received it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Job {
    /// The message as it came from the broker (`Message::to_wire`).
    pub message: String,
    /// Node name of the worker, for the request context.
    pub hostname: String,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
    /// The soft limit the worker resolved (config, task, message, remote control).
    pub soft_time_limit: Option<f64>,
}

/// How the run ended, and what it sent on the way.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Reply {
    /// The task's result.
    pub result: Outcome,
    /// Result tuples of what the run sent (`request.children`).
    pub children: Vec<Value>,
}

/// A task's `TaskResult<Value>` in a form that crosses the socket. Externally tagged: an
/// internally tagged enum would buffer numbers and lose them under `arbitrary_precision`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Outcome {
    /// `Ok(value)`.
    Ok(Value),
    /// `TaskError::Failure`.
    Failure { exc: ExceptionInfo, traceback: Option<String> },
    /// `TaskError::Retry`.
    Retry {
        countdown: Option<f64>,
        eta: Option<DateTime<Utc>>,
        exc: Option<ExceptionInfo>,
        /// Whether the retry overrides `max_retries` (then `max_retries`, `None` = unlimited).
        overrides_max_retries: bool,
        max_retries: Option<u32>,
        args: Option<Vec<Value>>,
        kwargs: Option<Map<String, Value>>,
        options: Map<String, Value>,
    },
    /// `TaskError::Reject`.
    Reject { requeue: bool, reason: String },
    /// `TaskError::Ignore`.
    Ignore,
    /// `TaskError::Arguments`.
    Arguments { task: String, argument: String, problem: String },
}

impl From<TaskResult<Value>> for Outcome {
    fn from(result: TaskResult<Value>) -> Self {
        match result {
            Ok(v) => Outcome::Ok(v),
            Err(TaskError::Failure { exc, traceback }) => Outcome::Failure { exc, traceback },
            Err(TaskError::Retry(r)) => Outcome::Retry {
                countdown: r.countdown,
                eta: r.eta,
                exc: r.exc,
                overrides_max_retries: r.max_retries.is_some(),
                max_retries: r.max_retries.flatten(),
                args: r.args,
                kwargs: r.kwargs,
                options: r.options,
            },
            Err(TaskError::Reject { requeue, reason }) => Outcome::Reject { requeue, reason },
            Err(TaskError::Ignore) => Outcome::Ignore,
            Err(TaskError::Arguments(e)) => {
                Outcome::Arguments { task: e.task, argument: e.argument, problem: e.problem }
            }
        }
    }
}

impl From<Outcome> for TaskResult<Value> {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Ok(v) => Ok(v),
            Outcome::Failure { exc, traceback } => Err(TaskError::Failure { exc, traceback }),
            Outcome::Retry { countdown, eta, exc, overrides_max_retries, max_retries, args, kwargs, options } => {
                Err(TaskError::Retry(Box::new(Retry {
                    countdown,
                    eta,
                    exc,
                    max_retries: overrides_max_retries.then_some(max_retries),
                    args,
                    kwargs,
                    options,
                })))
            }
            Outcome::Reject { requeue, reason } => Err(TaskError::Reject { requeue, reason }),
            Outcome::Ignore => Err(TaskError::Ignore),
            Outcome::Arguments { task, argument, problem } => {
                Err(TaskError::Arguments(ArgumentError { task, argument, problem }))
            }
        }
    }
}

/// Writes `value` as one frame.
pub(crate) async fn write_frame<W, T>(w: &mut W, value: &T) -> std::io::Result<()>
where
    W: AsyncWriteExt + Unpin,
    T: Serialize,
{
    let body = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    let len = u32::try_from(body.len()).ok().filter(|n| *n <= MAX_FRAME).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("frame of {} bytes is too large", body.len()))
    })?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(&body).await?;
    w.flush().await
}

/// Reads one frame; `None` at a clean end of the stream (the other side closed it).
pub(crate) async fn read_frame<R, T>(r: &mut R) -> std::io::Result<Option<T>>
where
    R: AsyncReadExt + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("frame length {len} is too large")));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body).map(Some).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn round_trip(result: TaskResult<Value>) -> TaskResult<Value> {
        let text = serde_json::to_vec(&Outcome::from(result)).unwrap();
        serde_json::from_slice::<Outcome>(&text).unwrap().into()
    }

    #[test]
    fn every_task_result_crosses_the_socket_unchanged() {
        let retry = TaskError::retry()
            .countdown(2.5)
            .eta(Utc::now())
            .max_retries(None)
            .args(vec![json!(1.5), json!(12345678901234567890u64)])
            .option("expires", 60)
            .exc(TaskError::value_error("flaky"));
        let cases: Vec<TaskResult<Value>> = vec![
            Ok(json!({"tenth": 0.1, "big": 12345678901234567890u64, "n": [1, 2.0, -0.0]})),
            Err(TaskError::Failure {
                exc: ExceptionInfo::soft_time_limit_exceeded(0.5),
                traceback: Some("caused by: x".into()),
            }),
            Err(retry.into()),
            Err(TaskError::retry().into()),
            Err(TaskError::reject(true, "busy")),
            Err(TaskError::Ignore),
            Err(TaskError::Arguments(ArgumentError { task: "t".into(), argument: "x".into(), problem: "p".into() })),
        ];
        for case in cases {
            assert_eq!(round_trip(case.clone()), case);
        }
        // Unlimited retries (`Some(None)`) and "no override" (`None`) stay apart.
        let Err(TaskError::Retry(r)) = round_trip(Err(TaskError::retry().max_retries(None).into())) else { panic!() };
        assert_eq!(r.max_retries, Some(None));
        let Err(TaskError::Retry(r)) = round_trip(Err(TaskError::retry().into())) else { panic!() };
        assert_eq!(r.max_retries, None);
    }

    #[tokio::test]
    async fn frames_are_length_prefixed_json() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, &Hello { pid: 42 }).await.unwrap();
        drop(a);
        let mut raw = Vec::new();
        b.read_to_end(&mut raw).await.unwrap();
        assert_eq!(raw, [&[0u8, 0, 0, 10][..], br#"{"pid":42}"#].concat());
        let hello: Hello = read_frame(&mut &raw[..]).await.unwrap().unwrap();
        assert_eq!(hello.pid, 42);
        assert!(read_frame::<_, Hello>(&mut &raw[..0]).await.unwrap().is_none(), "a clean end is not an error");
        assert!(read_frame::<_, Hello>(&mut &[0xff, 0xff, 0xff, 0xff][..]).await.is_err());
    }
}
