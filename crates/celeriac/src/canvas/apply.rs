//! Applying a signature of any kind, as Celery's `apply_async` does, in the client and in the
//! worker alike: the context it is applied from ([`Ctx`]: the app and the worker task running
//! now), the call's partial arguments and options ([`Call`]), freezing (assigning ids up
//! front) and sending one task (`Task.apply_async` → `app.send_task`). Chains, groups and
//! chords have their own files.

use super::result::Res;
use super::tree::{Node, Sig};
use crate::Error;
use crate::app::App;
use futures::future::BoxFuture;
use serde_json::{Map, Value};
use std::sync::{Arc, Mutex, PoisonError};

/// The worker task a canvas is applied from (Celery's `current_worker_task`).
#[derive(Debug, Clone)]
pub(crate) struct Current {
    /// Its id: the `parent_id` of what it sends without an explicit one.
    pub id: String,
    /// Its root: the `root_id` of what it sends.
    pub root_id: Option<String>,
    /// Its message priority (inherited with `task_inherit_parent_priority`).
    pub priority: Option<u8>,
    /// Results of what it sent (`request.children`), as result tuples.
    pub trail: Arc<Mutex<Vec<Value>>>,
}

impl Current {
    fn add_trail(&self, res: &Res) {
        self.trail.lock().unwrap_or_else(PoisonError::into_inner).push(res.as_tuple());
    }
}

/// Where a canvas is applied from.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub app: App,
    pub current: Option<Current>,
    /// Headers added to every message sent (Celeriac's saga state).
    pub headers: Map<String, Value>,
    /// While a group is applied: its messages, published together at the end (one broker
    /// batch instead of a round trip per member).
    pub outbox: Option<Outbox>,
}

/// Messages built and not sent yet: `(queue, message)`.
pub(crate) type Outbox = Arc<Mutex<Vec<(String, crate::protocol::Message)>>>;

impl Ctx {
    /// A client context (no current task).
    pub fn client(app: &App) -> Ctx {
        Ctx { app: app.clone(), current: None, headers: Map::new(), outbox: None }
    }

    /// `task_allow_error_cb_on_chord_header`.
    pub fn allow_error_cb_on_chord_header(&self) -> bool {
        self.app.config().task_allow_error_cb_on_chord_header
    }
}

/// The partial arguments and options of one `apply_async` call.
#[derive(Debug, Clone, Default)]
pub(crate) struct Call {
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub options: Map<String, Value>,
}

impl Call {
    /// A call with partial `args` only.
    pub fn args(args: Vec<Value>) -> Call {
        Call { args, ..Call::default() }
    }

    /// Sets an option.
    pub fn opt(mut self, key: &str, value: impl Into<Value>) -> Call {
        let value = value.into();
        if !value.is_null() {
            self.options.insert(key.to_owned(), value);
        }
        self
    }
}

/// What freezing may set (`freeze(_id, group_id, chord, root_id, parent_id, group_index)`).
#[derive(Debug, Clone, Default)]
pub(crate) struct Freeze {
    pub id: Option<String>,
    pub group_id: Option<String>,
    pub chord: Option<Value>,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub group_index: Option<Value>,
}

pub(crate) fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub(crate) fn canvas_error(name: &str, problem: impl std::fmt::Display) -> Error {
    Error::Canvas { task: name.to_owned(), problem: problem.to_string() }
}

/// Takes a string option out of `options` (a keyword parameter of Celery's functions).
pub(crate) fn take_str(options: &mut Map<String, Value>, key: &str) -> Option<String> {
    match options.remove(key) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    }
}

/// Takes any option out, `None` for null.
pub(crate) fn take(options: &mut Map<String, Value>, key: &str) -> Option<Value> {
    options.remove(key).filter(|v| !v.is_null())
}

/// Freezes `sig` in place and returns its result.
pub(crate) fn freeze(ctx: &Ctx, sig: &mut Sig, f: Freeze) -> Result<Res, Error> {
    match sig.node {
        Node::Task => Ok(freeze_task(ctx, sig, f)),
        Node::Chain(_) => super::chain::freeze(ctx, sig, f),
        Node::Group(_) => Ok(super::group::freeze(ctx, sig, f)),
        Node::Chord(_) => super::chord::freeze(ctx, sig, f),
    }
}

/// `Signature.freeze`: the task id (kept if set), and the ids and chord it is frozen into.
pub(crate) fn freeze_task(ctx: &Ctx, sig: &mut Sig, f: Freeze) -> Res {
    let opts = &mut sig.base.options;
    let tid = match opts.get("task_id").and_then(Value::as_str) {
        Some(id) => id.to_owned(),
        None => {
            let id = f.id.unwrap_or_else(new_id);
            opts.insert("task_id".into(), Value::String(id.clone()));
            id
        }
    };
    if let Some(r) = f.root_id {
        opts.insert("root_id".into(), Value::String(r));
    }
    if let Some(p) = f.parent_id {
        opts.insert("parent_id".into(), Value::String(p));
    }
    if !opts.contains_key("reply_to") {
        opts.insert("reply_to".into(), Value::String(ctx.app.oid().to_owned()));
    }
    if let Some(g) = f.group_id
        && !opts.contains_key("group_id")
    {
        opts.insert("group_id".into(), Value::String(g));
    }
    if let Some(c) = f.chord {
        opts.insert("chord".into(), c);
    }
    if let Some(i) = f.group_index {
        opts.insert("group_index".into(), i);
    }
    Res::task(tid)
}

/// Applies `sig` with a call's partial arguments and options.
pub(crate) fn apply_async<'a>(ctx: &'a Ctx, sig: Sig, call: Call) -> BoxFuture<'a, Result<Res, Error>> {
    Box::pin(async move {
        match sig.node {
            Node::Task => apply_task(ctx, sig, call).await,
            Node::Chain(_) => super::chain::apply_async(ctx, sig, call).await,
            Node::Group(_) => super::group::apply_async(ctx, sig, call).await,
            Node::Chord(_) => super::chord::apply_async(ctx, sig, call).await,
        }
    })
}

/// `Signature.apply_async` for a task: partial arguments merged in, then sent.
async fn apply_task(ctx: &Ctx, sig: Sig, call: Call) -> Result<Res, Error> {
    let options: Map<String, Value> = call.options.into_iter().filter(|(_, v)| !v.is_null()).collect();
    let (args, kwargs, options) = if call.args.is_empty() && call.kwargs.is_empty() && options.is_empty() {
        (sig.base.args.clone(), sig.base.kwargs.clone(), sig.base.options.clone())
    } else {
        sig.merge(&call.args, &call.kwargs, Some(&options), false)
    };
    let mut base = sig.base;
    base.args = args;
    base.kwargs = kwargs;
    base.options = options;
    send_task(ctx, base).await
}

/// `Task.apply_async` + `app.send_task`: the registered task's defaults, the parent and root
/// from the current worker task, then one message on the routed queue. With
/// `task_always_eager` the task runs inline instead.
pub(crate) async fn send_task(ctx: &Ctx, mut sig: crate::protocol::Signature) -> Result<Res, Error> {
    let app = &ctx.app;
    let add_to_parent = match sig.options.remove("add_to_parent") {
        Some(Value::Bool(b)) => b,
        _ => true,
    };
    let task_id = match sig.options.get("task_id").and_then(Value::as_str) {
        Some(id) => id.to_owned(),
        None => {
            let id = new_id();
            sig.options.insert("task_id".into(), Value::String(id.clone()));
            id
        }
    };
    if let Some(cur) = &ctx.current {
        if sig.options.get("root_id").is_none_or(Value::is_null) {
            let root = cur.root_id.clone().unwrap_or_else(|| cur.id.clone());
            sig.options.insert("root_id".into(), Value::String(root));
        }
        if sig.options.get("parent_id").is_none_or(Value::is_null) {
            sig.options.insert("parent_id".into(), Value::String(cur.id.clone()));
        }
        if app.config().task_inherit_parent_priority
            && sig.options.get("priority").is_none_or(Value::is_null)
            && let Some(p) = cur.priority
        {
            sig.options.insert("priority".into(), Value::from(p));
        }
    }
    if !ctx.headers.is_empty() {
        let mut headers = match sig.options.remove("headers") {
            Some(Value::Object(h)) => h,
            _ => Map::new(),
        };
        for (k, v) in &ctx.headers {
            headers.entry(k.clone()).or_insert_with(|| v.clone());
        }
        sig.options.insert("headers".into(), Value::Object(headers));
    }
    match &ctx.outbox {
        Some(outbox) if !app.config().task_always_eager => {
            let built = super::send::build_message(app, &sig, chrono::Utc::now())?;
            outbox.lock().unwrap_or_else(PoisonError::into_inner).push(built);
        }
        _ => super::send::send_one(app, sig).await?,
    }
    let res = Res::task(task_id);
    if add_to_parent && let Some(cur) = &ctx.current {
        cur.add_trail(&res);
    }
    Ok(res)
}

/// Sends a signature given as JSON (a callback, an errback, a chord body) with partial
/// arguments; logs and returns `None` when it cannot be applied.
pub(crate) async fn apply_value(ctx: &Ctx, value: &Value, call: Call) -> Option<Res> {
    let name = value.get("task").and_then(Value::as_str).unwrap_or("?");
    apply_decoded(ctx, name, Sig::from_value(value), call).await
}

/// [`apply_value`] for a signature already decoded (a message's `embed`).
pub(crate) async fn apply_signature(ctx: &Ctx, sig: &crate::protocol::Signature, call: Call) -> Option<Res> {
    apply_decoded(ctx, &sig.task, Sig::from_signature(sig.clone()), call).await
}

async fn apply_decoded(ctx: &Ctx, name: &str, sig: Result<Sig, String>, call: Call) -> Option<Res> {
    match sig {
        Ok(sig) => match apply_async(ctx, sig, call).await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(task = %name, error = %e, "could not apply the signature");
                None
            }
        },
        Err(e) => {
            tracing::error!(task = %name, error = %e, "not a signature; not applied");
            None
        }
    }
}
