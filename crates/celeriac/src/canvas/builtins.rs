//! Celery's built-in tasks, registered in every app as Celery registers them at finalize:
//! `celery.accumulate` (what a replaced group ends in), `celery.map` and `celery.starmap`
//! (`xmap`/`xstarmap` signatures call a task on each item, in this process), and
//! `celery.backend_cleanup`.

use super::apply::Ctx;
use crate::task::{Args, FnTask, Params, Request, Task, TaskError};
use serde_json::Value;
use std::sync::Arc;

/// Names of the built-in tasks.
pub(crate) fn names() -> [&'static str; 4] {
    ["celery.accumulate", "celery.map", "celery.starmap", "celery.backend_cleanup"]
}

fn arg_or_kw(args: &[Value], kwargs: &serde_json::Map<String, Value>, i: usize, name: &str) -> Option<Value> {
    args.get(i).cloned().or_else(|| kwargs.get(name).cloned())
}

/// `celery.accumulate(*args, index=None)`: the positional arguments, or the one at `index`.
async fn accumulate(_req: Request, args: Args) -> Result<Value, TaskError> {
    let (args, kwargs) = args.into_parts();
    match kwargs.get("index").and_then(Value::as_i64) {
        Some(i) => {
            let at = if i < 0 { args.len() as i64 + i } else { i };
            usize::try_from(at)
                .ok()
                .and_then(|at| args.get(at).cloned())
                .ok_or_else(|| TaskError::python(crate::protocol::BUILTINS, "IndexError", "tuple index out of range"))
        }
        None => Ok(Value::Array(args)),
    }
}

/// `celery.map(task, it)` / `celery.starmap(task, it)`: calls `task` on each item here.
async fn map(req: Request, args: Args, star: bool) -> Result<Value, TaskError> {
    let (args, kwargs) = args.into_parts();
    let task = arg_or_kw(&args, &kwargs, 0, "task").unwrap_or(Value::Null);
    let it = arg_or_kw(&args, &kwargs, 1, "it").unwrap_or(Value::Null);
    let name = task.get("task").and_then(Value::as_str).unwrap_or_default().to_owned();
    let items = it.as_array().cloned().unwrap_or_default();
    let ctx = Ctx::client(req.app());
    let mut sig = crate::protocol::Signature::new(name, Vec::new());
    // `task(*item)`: the task itself is called, not the signature with its stored arguments.
    sig.immutable = false;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let call_args = match (star, item) {
            (true, Value::Array(a)) => a,
            (_, other) => vec![other],
        };
        out.push(super::dispatch::run_inline(&ctx, &sig, call_args).await?);
    }
    Ok(Value::Array(out))
}

/// `celery.backend_cleanup`: deletes expired results.
async fn backend_cleanup(req: Request, _args: Args) -> Result<Value, TaskError> {
    req.app().backend().cleanup().await.map_err(|e| TaskError::new("BackendError", e.to_string()))?;
    Ok(Value::Null)
}

/// The built-in tasks.
pub(crate) fn all() -> Vec<Arc<dyn Task>> {
    let varargs = || Params::positional(&[], false).with_varargs().with_varkw();
    vec![
        Arc::new(FnTask::new("celery.accumulate", varargs(), accumulate)),
        Arc::new(FnTask::new("celery.map", Params::positional(&["task", "it"], false), |r, a| map(r, a, false))),
        Arc::new(FnTask::new("celery.starmap", Params::positional(&["task", "it"], false), |r, a| map(r, a, true))),
        Arc::new(FnTask::new("celery.backend_cleanup", Params::positional(&[], false), backend_cleanup)),
    ]
}
