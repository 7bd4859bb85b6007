//! A Celeriac worker with the tasks of Celery 5.7.0's integration suite
//! (`t/integration/tasks.py`), under their exact names and with the same behaviour, so Celery's
//! own tests can run unchanged against a Rust worker (`tests/conformance/run.sh`).
//!
//! ```text
//! cargo build -p celeriac --example conformance_worker
//! target/debug/examples/conformance_worker worker --broker redis://127.0.0.1:6379/0 \
//!     --backend redis://127.0.0.1:6379/0 -c 4
//! ```
//!
//! The tasks are Python functions with Python's calling rules (defaults, `*args`,
//! `**kwargs`, `TypeError`s worded as Python words them) and Python's `+`, so they are built
//! with [`celeriac::FnTask`] and a small binder here rather than `#[task]`. Tasks that write to
//! Redis do it on DB 0 of `REDIS_HOST`:`REDIS_PORT`, as the suite's tasks do.
//!
//! Not for: anything but the conformance suite.

use celeriac::canvas::{chain, chord, group};
use celeriac::{App, Args, FnTask, Params, Request, Signature, TaskError, TaskOptions, TaskResult};
use serde_json::{Map, Value, json};
use std::future::Future;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const MODULE: &str = "t.integration.tasks";

fn name(short: &str) -> String {
    format!("{MODULE}.{short}")
}

fn sig(short: &str, args: Vec<Value>) -> Signature {
    Signature::new(name(short), args)
}

// ---------------------------------------------------------------------------------------------
// Python calling rules

/// A Python function's parameters.
#[derive(Clone, Default)]
struct Spec {
    func: &'static str,
    positional: Vec<(&'static str, Option<Value>)>,
    kwonly: Vec<(&'static str, Option<Value>)>,
    varargs: bool,
    varkw: bool,
    bind: bool,
}

impl Spec {
    fn new(func: &'static str) -> Self {
        Spec { func, ..Spec::default() }
    }
    fn arg(mut self, n: &'static str) -> Self {
        self.positional.push((n, None));
        self
    }
    fn opt(mut self, n: &'static str, default: Value) -> Self {
        self.positional.push((n, Some(default)));
        self
    }
    fn kw(mut self, n: &'static str, default: Option<Value>) -> Self {
        self.kwonly.push((n, default));
        self
    }
    fn varargs(mut self) -> Self {
        self.varargs = true;
        self
    }
    fn varkw(mut self) -> Self {
        self.varkw = true;
        self
    }
    fn bind(mut self) -> Self {
        self.bind = true;
        self
    }
    fn params(&self) -> Params {
        let names: Vec<&str> = self.positional.iter().map(|(n, _)| *n).collect();
        let mut p = Params::positional(&names, self.bind);
        if self.varargs {
            p = p.with_varargs();
        }
        if self.varkw {
            p = p.with_varkw();
        }
        p
    }
}

/// Arguments bound to parameters.
struct Bound {
    values: Map<String, Value>,
    rest: Vec<Value>,
    #[allow(dead_code)] // `**kwargs` no task here reads
    extra: Map<String, Value>,
}

impl Bound {
    fn get(&self, n: &str) -> Value {
        self.values.get(n).cloned().unwrap_or(Value::Null)
    }
}

fn type_error(msg: String) -> TaskError {
    TaskError::python("builtins", "TypeError", msg)
}

fn plural(n: usize, one: &str) -> String {
    if n == 1 { format!("1 {one}") } else { format!("{n} {one}s") }
}

fn quoted_list(names: &[&str]) -> String {
    let q: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
    match q.len() {
        0 => String::new(),
        1 => q[0].clone(),
        2 => format!("{} and {}", q[0], q[1]),
        _ => format!("{}, and {}", q[..q.len() - 1].join(", "), q[q.len() - 1]),
    }
}

/// Binds arguments as Python does, with Python's `TypeError` messages.
fn bind(spec: &Spec, args: Vec<Value>, kwargs: Map<String, Value>) -> Result<Bound, TaskError> {
    let f = spec.func;
    let mut values = Map::new();
    let mut rest = Vec::new();
    let npos = spec.positional.len();
    if args.len() > npos && !spec.varargs {
        let required = spec.positional.iter().filter(|(_, d)| d.is_none()).count();
        let takes = if required == npos {
            plural(npos, "positional argument")
        } else {
            format!("from {required} to {npos} positional arguments")
        };
        let given = args.len() + usize::from(spec.bind);
        let takes = if spec.bind { takes.replacen(&npos.to_string(), &(npos + 1).to_string(), 1) } else { takes };
        return Err(type_error(format!(
            "{f}() takes {takes} but {given} {} given",
            if given == 1 { "was" } else { "were" }
        )));
    }
    for (i, a) in args.into_iter().enumerate() {
        match spec.positional.get(i) {
            Some((n, _)) => {
                values.insert((*n).to_owned(), a);
            }
            None => rest.push(a),
        }
    }
    let mut extra = Map::new();
    for (k, v) in kwargs {
        let is_pos = spec.positional.iter().any(|(n, _)| *n == k);
        let is_kw = spec.kwonly.iter().any(|(n, _)| *n == k);
        if is_pos && values.contains_key(&k) {
            return Err(type_error(format!("{f}() got multiple values for argument '{k}'")));
        } else if is_pos || is_kw {
            values.insert(k, v);
        } else if spec.varkw {
            extra.insert(k, v);
        } else {
            return Err(type_error(format!("{f}() got an unexpected keyword argument '{k}'")));
        }
    }
    let missing: Vec<&str> =
        spec.positional.iter().filter(|(n, d)| d.is_none() && !values.contains_key(*n)).map(|(n, _)| *n).collect();
    if !missing.is_empty() {
        return Err(type_error(format!(
            "{f}() missing {} {}: {}",
            missing.len(),
            if missing.len() == 1 { "required positional argument" } else { "required positional arguments" },
            quoted_list(&missing)
        )));
    }
    let missing_kw: Vec<&str> =
        spec.kwonly.iter().filter(|(n, d)| d.is_none() && !values.contains_key(*n)).map(|(n, _)| *n).collect();
    if !missing_kw.is_empty() {
        return Err(type_error(format!(
            "{f}() missing {} {}: {}",
            missing_kw.len(),
            if missing_kw.len() == 1 { "required keyword-only argument" } else { "required keyword-only arguments" },
            quoted_list(&missing_kw)
        )));
    }
    for (n, d) in spec.positional.iter().chain(spec.kwonly.iter()) {
        if let Some(d) = d {
            values.entry((*n).to_owned()).or_insert_with(|| d.clone());
        }
    }
    Ok(Bound { values, rest, extra })
}

/// A Python-style task.
fn py_task<F, Fut>(spec: Spec, options: TaskOptions, body: F) -> FnTask
where
    F: Fn(Request, Bound) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = TaskResult<Value>> + Send + 'static,
{
    let task_name = name(spec.func);
    let params = spec.params();
    FnTask::new(task_name, params, move |req: Request, args: Args| {
        let spec = spec.clone();
        let body = body.clone();
        async move {
            let (a, k) = args.into_parts();
            let bound = bind(&spec, a, k)?;
            body(req, bound).await
        }
    })
    .with_options(options)
}

// ---------------------------------------------------------------------------------------------
// Python values

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_i64() || n.is_u64() => "int",
        Value::Number(_) => "float",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

fn as_int(v: &Value) -> Option<i128> {
    match v {
        Value::Bool(b) => Some(i128::from(*b)),
        Value::Number(n) => n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from)).or_else(|| {
            let s = n.to_string();
            if s.contains(['.', 'e', 'E']) { None } else { s.parse().ok() }
        }),
        _ => None,
    }
}

fn int_value(i: i128) -> Value {
    match i64::try_from(i) {
        Ok(v) => Value::from(v),
        Err(_) => serde_json::from_str(&i.to_string()).unwrap_or(Value::Null),
    }
}

/// Python's `a + b`.
fn py_add(a: &Value, b: &Value) -> Result<Value, TaskError> {
    let unsupported =
        || type_error(format!("unsupported operand type(s) for +: '{}' and '{}'", type_name(a), type_name(b)));
    match (a, b) {
        (Value::String(x), Value::String(y)) => Ok(Value::String(format!("{x}{y}"))),
        (Value::Array(x), Value::Array(y)) => Ok(Value::Array(x.iter().chain(y).cloned().collect())),
        (Value::Number(_) | Value::Bool(_), Value::Number(_) | Value::Bool(_)) => match (as_int(a), as_int(b)) {
            (Some(x), Some(y)) => Ok(int_value(x + y)),
            _ => {
                let f = |v: &Value| v.as_f64().or_else(|| v.as_bool().map(|b| f64::from(u8::from(b))));
                Ok(Value::from(f(a).unwrap_or(0.0) + f(b).unwrap_or(0.0)))
            }
        },
        _ => Err(unsupported()),
    }
}

/// Python's `a * b` for numbers (and `str`/`list` times an int).
fn py_mul(a: &Value, b: &Value) -> Result<Value, TaskError> {
    match (a, b) {
        (Value::String(s), n) | (n, Value::String(s)) if as_int(n).is_some() => {
            Ok(Value::String(s.repeat(as_int(n).unwrap_or(0).max(0) as usize)))
        }
        _ => match (as_int(a), as_int(b)) {
            (Some(x), Some(y)) => Ok(int_value(x * y)),
            _ => match (a.as_f64(), b.as_f64()) {
                (Some(x), Some(y)) => Ok(Value::from(x * y)),
                _ => Err(type_error(format!(
                    "unsupported operand type(s) for *: '{}' and '{}'",
                    type_name(a),
                    type_name(b)
                ))),
            },
        },
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn iterate(v: &Value) -> Result<Vec<Value>, TaskError> {
    match v {
        Value::Array(a) => Ok(a.clone()),
        Value::Object(o) => Ok(o.keys().map(|k| Value::String(k.clone())).collect()),
        other => Err(type_error(format!("'{}' object is not iterable", type_name(other)))),
    }
}

/// Python's `sum(iterable)`.
fn py_sum(v: &Value) -> Result<Value, TaskError> {
    let mut total = Value::from(0);
    for item in iterate(v)? {
        total = py_add(&total, &item)?;
    }
    Ok(total)
}

fn expected_exception(args: Vec<Value>) -> TaskError {
    TaskError::from_exception(celeriac::ExceptionInfo {
        exc_type: "ExpectedException".into(),
        exc_message: args,
        exc_module: MODULE.into(),
    })
}

fn value_error(message: &str) -> TaskError {
    TaskError::python("builtins", "ValueError", message)
}

fn seconds(v: &Value) -> Duration {
    Duration::from_secs_f64(v.as_f64().unwrap_or(0.0).max(0.0))
}

// ---------------------------------------------------------------------------------------------
// Redis side effects (DB 0 of REDIS_HOST:REDIS_PORT, as `get_redis_connection()`)

static REDIS: tokio::sync::OnceCell<redis::aio::ConnectionManager> = tokio::sync::OnceCell::const_new();

async fn redis_conn() -> Result<redis::aio::ConnectionManager, TaskError> {
    REDIS
        .get_or_try_init(|| async {
            let host = std::env::var("REDIS_HOST").unwrap_or_else(|_| "localhost".into());
            let port = std::env::var("REDIS_PORT").unwrap_or_else(|_| "6379".into());
            let client = redis::Client::open(format!("redis://{host}:{port}/0"))?;
            redis::aio::ConnectionManager::new(client).await
        })
        .await
        .cloned()
        .map_err(|e| TaskError::python("redis.exceptions", "ConnectionError", e.to_string()))
}

/// What redis-py sends for a value; `None` for what it refuses (None, bool, containers).
fn redis_arg(v: &Value) -> Result<String, TaskError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        // kombu's JSON writes Python bytes as `{"__type__": "bytes", "__value__": "<utf-8>"}`.
        Value::Object(o) if o.get("__type__").and_then(Value::as_str) == Some("bytes") => {
            Ok(o.get("__value__").and_then(Value::as_str).unwrap_or_default().to_owned())
        }
        Value::Number(n) => Ok(n.to_string()),
        other => Err(TaskError::python(
            "redis.exceptions",
            "DataError",
            format!("Invalid input of type: '{}'. Convert to a bytes, string, int or float first.", type_name(other)),
        )),
    }
}

async fn rpush(key: &Value, value: &Value) -> Result<(), TaskError> {
    let mut c = redis_conn().await?;
    let (key, value) = (redis_arg(key)?, redis_arg(value)?);
    redis::cmd("RPUSH")
        .arg(key)
        .arg(value)
        .query_async::<i64>(&mut c)
        .await
        .map(|_| ())
        .map_err(|e| TaskError::python("redis.exceptions", "RedisError", e.to_string()))
}

async fn incr(key: &Value) -> Result<(), TaskError> {
    let mut c = redis_conn().await?;
    redis::cmd("INCR")
        .arg(redis_arg(key)?)
        .query_async::<i64>(&mut c)
        .await
        .map(|_| ())
        .map_err(|e| TaskError::python("redis.exceptions", "RedisError", e.to_string()))
}

// ---------------------------------------------------------------------------------------------
// The tasks

fn opts() -> TaskOptions {
    TaskOptions::default()
}

fn ignore(v: bool) -> TaskOptions {
    TaskOptions { ignore_result: Some(v), ..TaskOptions::default() }
}

fn retry_opts(max: Option<u32>, delay: Option<f64>) -> TaskOptions {
    let mut o = TaskOptions::default();
    if let Some(m) = max {
        o.retry.max_retries = Some(m);
    }
    if let Some(d) = delay {
        o.retry.default_retry_delay = d;
    }
    o
}

fn ok(v: impl Into<Value>) -> TaskResult<Value> {
    Ok(v.into())
}

/// `retry`'s per-process `self.attempt`.
static ATTEMPT: AtomicU32 = AtomicU32::new(0);

fn retry_exc(req: &Request) -> celeriac::Retry {
    req.retry()
}

fn register(builder: celeriac::AppBuilder) -> celeriac::AppBuilder {
    let mut tasks: Vec<FnTask> = vec![
        py_task(Spec::new("identity").arg("x"), opts(), |_, b| async move { ok(b.get("x")) }),
        py_task(Spec::new("add").arg("x").arg("y").opt("z", Value::Null), opts(), |_, b| async move {
            let sum = py_add(&b.get("x"), &b.get("y"))?;
            let z = b.get("z");
            if truthy(&z) { py_add(&sum, &z) } else { Ok(sum) }
        }),
        py_task(Spec::new("mul").arg("x").arg("y"), opts(), |_, b| async move { py_mul(&b.get("x"), &b.get("y")) }),
        py_task(Spec::new("write_to_file_and_return_int").arg("file_name").arg("i"), opts(), |_, b| async move {
            use std::io::Write as _;
            let path = b.get("file_name").as_str().unwrap_or_default().to_owned();
            let i = b.get("i");
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| TaskError::python("builtins", "OSError", e.to_string()))?;
            writeln!(f, "{i}").map_err(|e| TaskError::python("builtins", "OSError", e.to_string()))?;
            Ok(i)
        }),
        py_task(Spec::new("add_not_typed").arg("x").arg("y"), opts(), |_, b| async move {
            py_add(&b.get("x"), &b.get("y"))
        }),
        py_task(Spec::new("add_ignore_result").arg("x").arg("y"), ignore(true), |_, b| async move {
            py_add(&b.get("x"), &b.get("y"))
        }),
        py_task(Spec::new("add_with_result").arg("x").arg("y"), ignore(false), |_, b| async move {
            py_add(&b.get("x"), &b.get("y"))
        }),
        py_task(Spec::new("raise_error").varargs(), opts(), |_, _| async move { Err(value_error("deliberate error")) }),
        py_task(Spec::new("chain_add").arg("x").arg("y"), opts(), |req, b| async move {
            let (x, y) = (b.get("x"), b.get("y"));
            req.send(chain([sig("add", vec![x.clone(), x]), sig("add", vec![y])]))
                .await
                .map_err(|e| TaskError::new("SendError", e.to_string()))?;
            ok(Value::Null)
        }),
        py_task(Spec::new("chord_add").arg("x").arg("y"), opts(), |req, b| async move {
            let (x, y) = (b.get("x"), b.get("y"));
            req.send(chord([sig("add", vec![x.clone(), x])], sig("add", vec![y])))
                .await
                .map_err(|e| TaskError::new("SendError", e.to_string()))?;
            ok(Value::Null)
        }),
        py_task(Spec::new("delayed_sum").arg("numbers").opt("pause_time", json!(1)), opts(), |_, b| async move {
            tokio::time::sleep(seconds(&b.get("pause_time"))).await;
            py_sum(&b.get("numbers"))
        }),
        py_task(
            Spec::new("delayed_sum_with_soft_guard").arg("numbers").opt("pause_time", json!(1)),
            opts(),
            |req, b| async move {
                tokio::select! {
                    _ = tokio::time::sleep(seconds(&b.get("pause_time"))) => py_sum(&b.get("numbers")),
                    _ = req.soft_time_limit_reached() => ok(0),
                }
            },
        ),
        py_task(Spec::new("tsum").arg("nums"), opts(), |_, b| async move { py_sum(&b.get("nums")) }),
        py_task(Spec::new("xsum").arg("nums"), opts(), |_, b| async move {
            let mut total = Value::from(0);
            for n in iterate(&b.get("nums"))? {
                let part = if n.is_array() || n.is_object() { py_sum(&n)? } else { n };
                total = py_add(&total, &part)?;
            }
            Ok(total)
        }),
        py_task(Spec::new("sum_and_record").bind().arg("values").arg("redis_key"), opts(), |req, b| async move {
            let result = py_sum(&b.get("values"))?;
            rpush(&b.get("redis_key"), &Value::String(req.id.clone())).await?;
            Ok(result)
        }),
        py_task(Spec::new("add_replaced").bind().arg("x").arg("y"), opts(), |req, b| async move {
            Err(req.replace(sig("add", vec![b.get("x"), b.get("y")])).await)
        }),
        py_task(
            Spec::new("record_replaced_task_nesting").bind().arg("replacements").opt("nesting", Value::Null),
            opts(),
            |req, b| async move {
                let mut nesting = match b.get("nesting") {
                    Value::Array(a) => a,
                    _ => Vec::new(),
                };
                nesting.push(Value::from(req.replaced_task_nesting()));
                let replacements = as_int(&b.get("replacements")).unwrap_or(0);
                if replacements > 0 {
                    let mut next =
                        sig("record_replaced_task_nesting", vec![int_value(replacements - 1), Value::Array(nesting)]);
                    if let Some(reply_to) = req.properties().get("reply_to").cloned() {
                        next = next.set("reply_to", reply_to);
                    }
                    return Err(req.replace(next).await);
                }
                Ok(Value::Array(nesting))
            },
        ),
        py_task(Spec::new("add_replaced_with_chain").bind().arg("x").arg("y"), opts(), |req, b| async move {
            Err(req.replace(chain([sig("add", vec![b.get("x"), b.get("y")]), sig("identity", vec![])])).await)
        }),
        py_task(
            Spec::new("replace_with_chain").bind().varargs().kw("link_msg", Some(Value::Null)),
            opts(),
            |req, b| async move {
                let mut link = sig("redis_echo", vec![]);
                let msg = b.get("link_msg");
                if !msg.is_null() {
                    link.args = vec![msg];
                    link = link.immutable();
                }
                let c = chain([sig("identity", b.rest.clone()), sig("identity", vec![])]).link(link);
                Err(req.replace(c).await)
            },
        ),
        py_task(
            Spec::new("replace_with_chain_which_raises").bind().varargs().kw("link_msg", Some(Value::Null)),
            opts(),
            |req, b| async move {
                let mut link = sig("redis_echo", vec![]);
                let msg = b.get("link_msg");
                if !msg.is_null() {
                    link.args = vec![msg];
                    link = link.immutable();
                }
                let c = chain([sig("identity", b.rest.clone()), sig("raise_error", vec![])]).link_error(link);
                Err(req.replace(c).await)
            },
        ),
        py_task(Spec::new("replace_with_empty_chain").bind().varargs(), opts(), |req, _| async move {
            Err(req.replace(chain(Vec::<Signature>::new())).await)
        }),
        py_task(Spec::new("replace_with_chain_which_contains_a_group").bind(), opts(), |req, _| async move {
            let c = chain([
                sig("add", vec![json!(1), json!(2)]),
                group([sig("add", vec![json!(1)]), sig("add", vec![json!(1)])]),
            ]);
            Err(req.replace(c).await)
        }),
        py_task(Spec::new("add_to_all").bind().arg("nums").arg("val"), opts(), |req, b| async move {
            let val = b.get("val");
            let subtasks: Vec<Signature> =
                iterate(&b.get("nums"))?.into_iter().map(|n| sig("add", vec![n, val.clone()])).collect();
            Err(req.replace(group(subtasks)).await)
        }),
        py_task(Spec::new("add_to_all_to_chord").bind().arg("nums").arg("val"), opts(), |req, b| async move {
            let val = b.get("val");
            for n in iterate(&b.get("nums"))? {
                req.add_to_chord(sig("add", vec![n, val.clone()])).await.map_err(|e| value_error(&e.to_string()))?;
            }
            ok(0)
        }),
        py_task(Spec::new("add_chord_to_chord").bind().arg("nums").arg("val"), opts(), |req, b| async move {
            let val = b.get("val");
            let subtasks: Vec<Signature> =
                iterate(&b.get("nums"))?.into_iter().map(|n| sig("add", vec![n, val.clone()])).collect();
            req.add_to_chord(chord(subtasks, sig("tsum", vec![]))).await.map_err(|e| value_error(&e.to_string()))?;
            ok(0)
        }),
        py_task(
            Spec::new("print_unicode")
                .opt("log_message", json!("håå®ƒ valmuefrø"))
                .opt("print_message", json!("hiöäüß")),
            opts(),
            |_, b| async move {
                tracing::warn!("{}", b.get("log_message").as_str().unwrap_or_default());
                println!("{}", b.get("print_message").as_str().unwrap_or_default());
                ok(Value::Null)
            },
        ),
        py_task(Spec::new("return_exception").arg("e"), opts(), |_, b| async move { ok(json!([b.get("e"), true])) }),
        py_task(Spec::new("sleeping").arg("i").varkw(), opts(), |_, b| async move {
            tokio::time::sleep(seconds(&b.get("i"))).await;
            ok(Value::Null)
        }),
        py_task(Spec::new("ids").bind().arg("i"), opts(), |req, b| async move {
            ok(json!([req.root_id, req.parent_id, b.get("i")]))
        }),
        py_task(Spec::new("collect_ids").bind().arg("res").arg("i"), opts(), |req, b| async move {
            ok(json!([b.get("res"), [req.root_id, req.parent_id, b.get("i")]]))
        }),
        py_task(
            Spec::new("retry").bind().opt("return_value", Value::Null),
            retry_opts(None, Some(1.0)),
            |req, b| async move {
                let rv = b.get("return_value");
                if truthy(&rv) {
                    let attempt = ATTEMPT.load(Ordering::SeqCst);
                    if attempt >= 3 {
                        ATTEMPT.store(0, Ordering::SeqCst);
                        return Ok(rv);
                    }
                    ATTEMPT.store(attempt + 1, Ordering::SeqCst);
                }
                Err(retry_exc(&req).exc(expected_exception(vec![])).countdown(5.0).into())
            },
        ),
        py_task(
            Spec::new("retry_unpickleable").bind().arg("foo").arg("bar").kw("retry_kwargs", None),
            retry_opts(None, Some(1.0)),
            |req, b| async move {
                let exc = celeriac::ExceptionInfo {
                    exc_type: "UnpickleableException".into(),
                    exc_message: vec![b.get("foo")],
                    exc_module: MODULE.into(),
                };
                let mut r = req.retry().exc(TaskError::from_exception(exc));
                let kw = b.get("retry_kwargs");
                if let Some(c) = kw.get("countdown").and_then(Value::as_f64) {
                    r = r.countdown(c);
                }
                if let Some(m) = kw.get("max_retries") {
                    r = r.max_retries(m.as_u64().map(|m| m as u32));
                }
                Err(r.into())
            },
        ),
        py_task(
            Spec::new("retry_with_args_after_kwargs").bind().arg("foo").arg("bar").opt("label", Value::Null),
            retry_opts(Some(1), None),
            |req, b| async move {
                if req.retries == 0 {
                    let args = vec![py_add(&b.get("foo"), &json!(1))?, py_add(&b.get("bar"), &json!(1))?];
                    return Err(req.retry().args(args).countdown(0.0).into());
                }
                ok(json!({"foo": b.get("foo"), "bar": b.get("bar"), "label": b.get("label"),
                          "retries": req.retries, "is_eager": req.is_eager}))
            },
        ),
        py_task(
            Spec::new("retry_with_kwargs_after_args").bind().arg("foo").arg("bar"),
            retry_opts(Some(1), None),
            |req, b| async move {
                if req.retries == 0 {
                    let mut kw = Map::new();
                    kw.insert("foo".into(), py_add(&b.get("foo"), &json!(1))?);
                    return Err(req.retry().kwargs(kw).countdown(0.0).into());
                }
                ok(json!({"foo": b.get("foo"), "bar": b.get("bar"), "retries": req.retries, "is_eager": req.is_eager}))
            },
        ),
        py_task(
            Spec::new("retry_once")
                .bind()
                .varargs()
                .kw("expires", Some(Value::Null))
                .kw("max_retries", Some(json!(1)))
                .kw("countdown", Some(json!(0.1))),
            retry_opts(Some(1), None),
            |req, b| async move {
                if req.retries > 0 {
                    return ok(req.retries);
                }
                let mut r = req.retry().countdown(b.get("countdown").as_f64().unwrap_or(0.1));
                r = r.max_retries(b.get("max_retries").as_u64().map(|m| m as u32));
                let expires = b.get("expires");
                if !expires.is_null() {
                    r = r.option("expires", expires);
                }
                Err(r.into())
            },
        ),
        py_task(Spec::new("retry_once_ignore_result").bind(), ignore(true), |req, _| async move {
            if req.retries == 0 {
                return Err(req.retry().countdown(0.0).into());
            }
            ok(req.retries)
        }),
        py_task(Spec::new("retry_once_with_result").bind(), ignore(false), |req, _| async move {
            if req.retries == 0 {
                return Err(req.retry().countdown(0.0).into());
            }
            ok(req.retries)
        }),
        py_task(
            Spec::new("retry_once_priority")
                .bind()
                .varargs()
                .kw("expires", Some(json!(60.0)))
                .kw("max_retries", Some(json!(1)))
                .kw("countdown", Some(json!(0.1))),
            retry_opts(Some(1), None),
            |req, b| async move {
                if req.retries > 0 {
                    return ok(req.priority);
                }
                let r = req
                    .retry()
                    .countdown(b.get("countdown").as_f64().unwrap_or(0.1))
                    .max_retries(b.get("max_retries").as_u64().map(|m| m as u32));
                Err(r.into())
            },
        ),
        py_task(
            Spec::new("retry_once_headers")
                .bind()
                .varargs()
                .kw("max_retries", Some(json!(1)))
                .kw("countdown", Some(json!(0.1))),
            retry_opts(Some(1), None),
            |req, b| async move {
                if req.retries > 0 {
                    return ok(Value::Object(req.headers()));
                }
                let r = req
                    .retry()
                    .countdown(b.get("countdown").as_f64().unwrap_or(0.1))
                    .max_retries(b.get("max_retries").as_u64().map(|m| m as u32));
                Err(r.into())
            },
        ),
        py_task(
            Spec::new("redis_echo").arg("message").opt("redis_key", json!("redis-echo")),
            opts(),
            |_, b| async move {
                rpush(&b.get("redis_key"), &b.get("message")).await?;
                ok(Value::Null)
            },
        ),
        py_task(
            Spec::new("redis_echo_group_id").bind().arg("_").opt("redis_key", json!("redis-group-ids")),
            opts(),
            |req, b| async move {
                rpush(&b.get("redis_key"), &req.group.clone().map(Value::String).unwrap_or(Value::Null)).await?;
                ok(Value::Null)
            },
        ),
        py_task(Spec::new("redis_count").opt("redis_key", json!("redis-count")), opts(), |_, b| async move {
            incr(&b.get("redis_key")).await?;
            ok(Value::Null)
        }),
        py_task(Spec::new("second_order_replace1").bind().opt("state", json!(false)), opts(), |req, b| async move {
            if !truthy(&b.get("state")) {
                rpush(&json!("redis-echo"), &json!("In A")).await?;
                let c = chain([
                    sig("second_order_replace2", vec![]),
                    sig("second_order_replace1", vec![]).kwarg("state", true).immutable(),
                ]);
                return Err(req.replace(c).await);
            }
            rpush(&json!("redis-echo"), &json!("Out A")).await?;
            ok(Value::Null)
        }),
        py_task(Spec::new("second_order_replace2").bind().opt("state", json!(false)), opts(), |req, b| async move {
            if !truthy(&b.get("state")) {
                rpush(&json!("redis-echo"), &json!("In B")).await?;
                let c = chain([
                    sig("redis_echo", vec![json!("In/Out C")]),
                    sig("second_order_replace2", vec![]).kwarg("state", true).immutable(),
                ]);
                return Err(req.replace(c).await);
            }
            rpush(&json!("redis-echo"), &json!("Out B")).await?;
            ok(Value::Null)
        }),
        py_task(Spec::new("build_chain_inside_task").bind(), opts(), |req, _| async move {
            let c = chain([
                sig("add", vec![json!(1), json!(1)]),
                sig("add", vec![json!(2)]),
                group([sig("add", vec![json!(3)]), sig("add", vec![json!(4)])]),
                sig("add", vec![json!(5)]),
            ]);
            let r = req.send(c).await.map_err(|e| TaskError::new("SendError", e.to_string()))?;
            Ok(r.as_tuple())
        }),
        py_task(Spec::new("fail").varargs(), opts(), |_, b| async move {
            let mut args = vec![json!("Task expected to fail")];
            args.extend(b.rest);
            Err(expected_exception(args))
        }),
        py_task(Spec::new("fail_unpickleable").arg("foo").arg("bar"), opts(), |_, b| async move {
            Err(TaskError::from_exception(celeriac::ExceptionInfo {
                exc_type: "UnpickleableException".into(),
                exc_message: vec![b.get("foo")],
                exc_module: MODULE.into(),
            }))
        }),
        py_task(Spec::new("fail_replaced").bind().varargs(), opts(), |req, b| async move {
            Err(req.replace(sig("fail", b.rest.clone()).immutable()).await)
        }),
        py_task(Spec::new("return_priority").bind().varargs(), opts(), |req, _| async move {
            ok(format!("Priority: {}", req.priority))
        }),
        py_task(Spec::new("return_request_eta").bind(), opts(), |req, _| async move {
            let eta = req.eta.map(|t| celeriac::protocol::time::to_iso(&t));
            ok(eta)
        }),
        py_task(Spec::new("return_properties").bind(), opts(), |req, _| async move { Ok(req.properties()) }),
        py_task(Spec::new("return_request_time_limits").bind(), opts(), |req, _| async move {
            ok(json!({"time_limit": req.time_limit(), "soft_time_limit": req.soft_time_limit()}))
        }),
        py_task(
            Spec::new("task_with_declared_time_limits").bind(),
            TaskOptions { time_limit: Some(60.0), soft_time_limit: Some(45.0), ..TaskOptions::default() },
            |req, _| async move { ok(json!({"time_limit": req.time_limit(), "soft_time_limit": req.soft_time_limit()})) },
        ),
        py_task(
            Spec::new("soft_time_limit_must_exceed_time_limit"),
            TaskOptions { time_limit: Some(1.0), soft_time_limit: Some(2.0), ..TaskOptions::default() },
            |_, _| async move { ok(Value::Null) },
        ),
        py_task(Spec::new("return_nested_signature_chain_chain"), opts(), |_, _| async move {
            ok(json!({"task": "celery.chain", "args": [], "kwargs": {"tasks": [canvas("chain", vec![add_sig()])]},
                      "options": {}, "subtask_type": "chain", "immutable": false}))
        }),
        py_task(Spec::new("return_nested_signature_chain_group"), opts(), |_, _| async move {
            ok(canvas("chain", vec![canvas("group", vec![add_sig()])]))
        }),
        py_task(Spec::new("return_nested_signature_chain_chord"), opts(), |_, _| async move {
            ok(canvas("chain", vec![chord_json(vec![add_sig()], add_sig())]))
        }),
        py_task(Spec::new("return_nested_signature_group_chain"), opts(), |_, _| async move {
            ok(canvas("group", vec![canvas("chain", vec![add_sig()])]))
        }),
        py_task(Spec::new("return_nested_signature_group_group"), opts(), |_, _| async move {
            ok(canvas("group", vec![add_sig()]))
        }),
        py_task(Spec::new("return_nested_signature_group_chord"), opts(), |_, _| async move {
            ok(canvas("group", vec![chord_json(vec![add_sig()], add_sig())]))
        }),
        py_task(Spec::new("return_nested_signature_chord_chain"), opts(), |_, _| async move {
            ok(chord_json(vec![add_sig()], add_sig()))
        }),
        py_task(Spec::new("return_nested_signature_chord_group"), opts(), |_, _| async move {
            ok(chord_json(vec![add_sig()], add_sig()))
        }),
        py_task(Spec::new("return_nested_signature_chord_chord"), opts(), |_, _| async move {
            ok(chord_json(vec![chord_json(vec![add_sig()], add_sig())], add_sig()))
        }),
        py_task(Spec::new("rebuild_signature").arg("sig_dict"), opts(), |_, b| async move {
            check_signature(&b.get("sig_dict"))?;
            ok(Value::Null)
        }),
        py_task(Spec::new("errback_old_style").arg("request_id"), opts(), |_, b| async move {
            incr(&b.get("request_id")).await?;
            Ok(b.get("request_id"))
        }),
        py_task(Spec::new("errback_new_style").arg("request").arg("exc").arg("tb"), opts(), |_, b| async move {
            let id = b.get("request").get("id").cloned().unwrap_or(Value::Null);
            incr(&id).await?;
            Ok(id)
        }),
        py_task(Spec::new("errback_old_style_with_args").arg("request_id").arg("label"), opts(), |_, b| async move {
            rpush(&b.get("request_id"), &b.get("label")).await?;
            ok(Value::Null)
        }),
        py_task(
            Spec::new("errback_new_style_with_args").arg("request").arg("exc").arg("tb").arg("label"),
            opts(),
            |_, b| async move {
                let id = b.get("request").get("id").cloned().unwrap_or(Value::Null);
                rpush(&id, &b.get("label")).await?;
                ok(Value::Null)
            },
        ),
        py_task(Spec::new("replaced_with_me"), opts(), |_, _| async move { ok(true) }),
        py_task(Spec::new("add_pydantic").arg("data"), opts(), |_, b| async move { add_pydantic(b.get("data")) }),
        py_task(Spec::new("add_pydantic_string_annotations").arg("data"), opts(), |_, b| async move {
            add_pydantic(b.get("data"))
        }),
        py_task(
            Spec::new("replace_with_stamped_task").bind().opt("replace_with", Value::Null),
            opts(),
            |req, b| async move {
                let with = b.get("replace_with");
                let target: Signature = if with.is_null() {
                    sig("replaced_with_me", vec![])
                } else {
                    serde_json::from_value(with).map_err(|e| type_error(e.to_string()))?
                };
                let mut stamps = Map::new();
                stamps.insert("StampOnReplace".into(), json!("This is the replaced task"));
                Err(req.replace(target.stamp(&stamps)).await)
            },
        ),
        py_task(
            Spec::new("store_success_then_reject").bind(),
            TaskOptions { acks_late: Some(true), ..TaskOptions::default() },
            |req, _| async move {
                if !req.redelivered {
                    let record =
                        celeriac::protocol::ResultMeta::new(&req.id, celeriac::State::Success, json!("first-pass"));
                    req.app()
                        .backend()
                        .store(&record, req.app().config().result_expires_duration())
                        .await
                        .map_err(|e| TaskError::new("BackendError", e.to_string()))?;
                    return Err(TaskError::reject(true, "first delivery"));
                }
                ok("dedup-pass")
            },
        ),
        py_task(
            Spec::new("reject_then_succeed").bind(),
            TaskOptions { acks_late: Some(true), ..TaskOptions::default() },
            |req, _| async move {
                if !req.redelivered {
                    return Err(TaskError::reject(true, "first delivery"));
                }
                ok("second-pass")
            },
        ),
        py_task(Spec::new("reject_without_requeue"), opts(), |_, _| async move {
            Err(TaskError::reject(false, "rejected"))
        }),
    ];
    // `ClassBasedAutoRetryTask`: autoretry for ValueError, one retry, back-off.
    let mut auto = TaskOptions::default();
    auto.retry.autoretry_for = vec!["ValueError".into()];
    auto.retry.max_retries = Some(1);
    auto.retry.backoff = Some(celeriac::retry::Backoff { factor: 1, maximum: 600, jitter: true });
    tasks.push(
        FnTask::new("auto_retry_class_task", Params::positional(&[], true), |req: Request, _args: Args| async move {
            if req.retries > 0 {
                return ok(req.retries);
            }
            Err(TaskError::python("builtins", "ValueError", ""))
        })
        .with_options(auto),
    );
    // `celery.contrib.testing.tasks.ping`.
    tasks.push(FnTask::new("celery.ping", Params::positional(&[], false), |_, _| async move { ok("pong") }));
    let mut builder = builder;
    for t in tasks {
        builder = builder.task(t);
    }
    builder
}

fn add_sig() -> Value {
    json!({"task": name("add"), "args": [], "kwargs": {}, "options": {}, "subtask_type": null, "immutable": false})
}

fn canvas(kind: &str, tasks: Vec<Value>) -> Value {
    json!({"task": format!("celery.{kind}"), "args": [], "kwargs": {"tasks": tasks}, "options": {},
           "subtask_type": kind, "immutable": false})
}

fn chord_json(header: Vec<Value>, body: Value) -> Value {
    json!({"task": "celery.chord", "args": [], "kwargs": {"kwargs": {}, "header": header, "body": body},
           "options": {}, "subtask_type": "chord", "immutable": false})
}

/// `rebuild_signature`'s check: every node of the canvas is a signature.
fn check_signature(v: &Value) -> Result<(), TaskError> {
    let s: Signature =
        serde_json::from_value(v.clone()).map_err(|_| type_error(format!("{v} is not a signature object")))?;
    match s.subtask_type.as_deref() {
        Some("chain") | Some("group") => {
            for t in s.kwargs.get("tasks").and_then(Value::as_array).into_iter().flatten() {
                check_signature(t)?;
            }
        }
        Some("chord") => {
            match s.kwargs.get("header") {
                Some(Value::Array(items)) => items.iter().try_for_each(check_signature)?,
                Some(one) => check_signature(one)?,
                None => {}
            }
            if let Some(b) = s.kwargs.get("body").filter(|b| !b.is_null()) {
                check_signature(b)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn add_pydantic(data: Value) -> TaskResult<Value> {
    let get = |k: &str| {
        data.get(k).and_then(as_int).ok_or_else(|| {
            TaskError::python(
                "pydantic_core._pydantic_core",
                "ValidationError",
                format!("1 validation error for AddParameterModel\n{k}\n  Field required"),
            )
        })
    };
    ok(json!({"result": int_value(get("x")? + get("y")?)}))
}

fn main() -> ExitCode {
    let builder = App::builder()
        .from_env()
        // t/integration/conftest.py: `result_extended=True`; Celery's failure for an
        // exhausted retry is the retry's own exception.
        .set("result_extended", true)
        .set("task_retry_exceeded_wraps_error", false)
        .set("worker_dead_letter_failures", false);
    celeriac::cli::main(register(builder))
}
