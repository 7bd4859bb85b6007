//! A canvas as Celery's `canvas.py` holds it in memory: a tree of signatures (a task, a chain,
//! a group, a chord) decoded once from Celery's JSON, changed in place (freezing, merging
//! options, linking callbacks), and encoded back exactly as Python writes it.
//!
//! The rules here follow Celery 5.7's classes: how each kind is rebuilt from a dict (which
//! fields survive), `_merge`/`clone`, `link`/`link_error`, the `|` operator (a group followed by
//! a task becomes a chord), and stamping. Applying a canvas lives in `apply`, `chain`, `group`
//! and `chord`; this file knows nothing about brokers or backends.

use crate::protocol::Signature;
use serde_json::{Map, Value};

/// Options whose value a merge never replaces once set (Celery's `_IMMUTABLE_OPTIONS`): a
/// member keeps the group it was frozen into.
const IMMUTABLE_OPTIONS: [&str; 2] = ["group_id", "stamped_headers"];

/// One node of a canvas.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sig {
    /// The signature's own fields. For a chain, group or chord, the members in `kwargs` are
    /// stale: `node` holds them, and [`Sig::to_signature`] writes them back.
    pub base: Signature,
    /// What kind of signature it is, with its members.
    pub node: Node,
}

/// The kinds of signature.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    /// A single task call (also `celery.map` / `celery.starmap`, which are sent as one task).
    Task,
    /// Steps run one after another.
    Chain(Vec<Sig>),
    /// Members run in parallel.
    Group(Vec<Sig>),
    /// A header group and a body that runs with the header's results.
    Chord(Box<ChordParts>),
}

/// The parts of a chord.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChordParts {
    /// Always a group node; its own options matter only once frozen.
    pub header: Sig,
    /// Whether the header is a frozen group (written as a group dict) rather than a plain
    /// list, as Celery keeps it until the chord is frozen.
    pub header_frozen: bool,
    /// The body, if any.
    pub body: Option<Sig>,
}

/// A malformed canvas.
pub(crate) type CanvasError = String;

fn signature_of(value: &Value) -> Result<Signature, CanvasError> {
    serde_json::from_value(value.clone()).map_err(|e| format!("not a signature ({e}): {value}"))
}

fn members(value: Option<&Value>) -> Result<Vec<Sig>, CanvasError> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(Sig::from_value).collect(),
        Some(other) => Err(format!("expected a list of signatures, got {other}")),
    }
}

fn canvas_base(task: &str, kind: &str, options: Map<String, Value>) -> Signature {
    let mut base = Signature::new(task, Vec::new());
    base.options = options;
    base.subtask_type = Some(kind.to_owned());
    base
}

impl Sig {
    /// A plain task signature.
    pub fn task(base: Signature) -> Sig {
        Sig { base, node: Node::Task }
    }

    /// A chain of `steps` with `options`.
    pub fn chain(steps: Vec<Sig>, options: Map<String, Value>) -> Sig {
        Sig { base: canvas_base("celery.chain", "chain", options), node: Node::Chain(steps) }
    }

    /// A group of `members` with `options`.
    pub fn group(members: Vec<Sig>, options: Map<String, Value>) -> Sig {
        Sig { base: canvas_base("celery.group", "group", options), node: Node::Group(members) }
    }

    /// `chord(header, body)` as Celery's constructor builds it: a group or chain header
    /// contributes its tasks, a single signature is a header of one.
    pub fn chord(header: Sig, body: Option<Sig>, options: Map<String, Value>) -> Sig {
        let tasks = match header.node {
            Node::Group(tasks) | Node::Chain(tasks) => tasks,
            _ => vec![header],
        };
        Sig::chord_of(tasks, body, options)
    }

    /// A chord with a header list of `tasks`.
    pub fn chord_of(tasks: Vec<Sig>, body: Option<Sig>, options: Map<String, Value>) -> Sig {
        let mut base = canvas_base("celery.chord", "chord", options);
        base.kwargs.insert("kwargs".into(), Value::Object(Map::new()));
        let header = Sig::group(tasks, Map::new());
        Sig { base, node: Node::Chord(Box::new(ChordParts { header, header_frozen: false, body })) }
    }

    /// Decodes Celery's JSON form of any signature.
    pub fn from_value(value: &Value) -> Result<Sig, CanvasError> {
        Sig::from_signature(signature_of(value)?)
    }

    /// Rebuilds a signature as Celery's `Signature.from_dict` does: a chain or group keeps
    /// only its members and options; a chord keeps its own fields, and a group given as its
    /// header contributes only its tasks.
    pub fn from_signature(sig: Signature) -> Result<Sig, CanvasError> {
        match sig.subtask_type.as_deref() {
            Some("chain") => Ok(Sig::chain(members(sig.kwargs.get("tasks"))?, sig.options)),
            Some("group") => Ok(Sig::group(members(sig.kwargs.get("tasks"))?, sig.options)),
            Some("chord") => {
                let mut base = sig;
                let header = match base.kwargs.remove("header") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(items)) => items.iter().map(Sig::from_value).collect::<Result<_, _>>()?,
                    Some(one) => match Sig::from_value(&one)? {
                        Sig { node: Node::Group(tasks) | Node::Chain(tasks), .. } => tasks,
                        single => vec![single],
                    },
                };
                let body = match base.kwargs.remove("body") {
                    None | Some(Value::Null) => None,
                    Some(b) => Some(Sig::from_value(&b)?),
                };
                if base.kwargs.is_empty() {
                    base.kwargs.insert("kwargs".into(), Value::Object(Map::new()));
                }
                // Unknown top-level keys become options, as `Signature(**ex)` does.
                for (k, v) in std::mem::take(&mut base.extra) {
                    base.options.insert(k, v);
                }
                let header = Sig::group(header, Map::new());
                Ok(Sig { base, node: Node::Chord(Box::new(ChordParts { header, header_frozen: false, body })) })
            }
            _ => Ok(Sig::task(sig)),
        }
    }

    /// The signature in Celery's JSON form.
    pub fn to_signature(&self) -> Signature {
        let mut sig = self.base.clone();
        match &self.node {
            Node::Task => {}
            Node::Chain(tasks) | Node::Group(tasks) => {
                sig.kwargs.insert("tasks".into(), list_value(tasks));
            }
            Node::Chord(parts) => {
                let header =
                    if parts.header_frozen { parts.header.to_value() } else { list_value(parts.header.tasks()) };
                sig.kwargs.insert("header".into(), header);
                sig.kwargs.insert("body".into(), parts.body.as_ref().map(Sig::to_value).unwrap_or(Value::Null));
            }
        }
        sig
    }

    /// The JSON value of [`Sig::to_signature`].
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The task name (`celery.chain` etc. for canvases).
    pub fn name(&self) -> &str {
        &self.base.task
    }

    /// `options.task_id`.
    pub fn id(&self) -> Option<&str> {
        self.base.options.get("task_id").and_then(Value::as_str)
    }

    /// An option.
    pub fn opt(&self, key: &str) -> Option<&Value> {
        self.base.options.get(key).filter(|v| !v.is_null())
    }

    /// A string option.
    pub fn opt_str(&self, key: &str) -> Option<String> {
        self.opt(key).and_then(Value::as_str).map(str::to_owned)
    }

    /// Sets an option (Celery's `.set(**options)` for one key).
    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.base.options.insert(key.to_owned(), value.into());
    }

    /// Whether this is a group.
    pub fn is_group(&self) -> bool {
        matches!(self.node, Node::Group(_))
    }

    /// Whether this is a chain.
    pub fn is_chain(&self) -> bool {
        matches!(self.node, Node::Chain(_))
    }

    /// Whether this is a chord.
    pub fn is_chord(&self) -> bool {
        matches!(self.node, Node::Chord(_))
    }

    /// A group with no members (`_is_empty_group`).
    pub fn is_empty_group(&self) -> bool {
        matches!(&self.node, Node::Group(t) if t.is_empty())
    }

    /// The members of a chain or group, the header tasks of a chord; empty for a task.
    pub fn tasks(&self) -> &[Sig] {
        match &self.node {
            Node::Chain(t) | Node::Group(t) => t,
            Node::Chord(parts) => parts.header.tasks(),
            Node::Task => &[],
        }
    }

    /// Mutable members (see [`Sig::tasks`]).
    pub fn tasks_mut(&mut self) -> Option<&mut Vec<Sig>> {
        match &mut self.node {
            Node::Chain(t) | Node::Group(t) => Some(t),
            Node::Chord(parts) => parts.header.tasks_mut(),
            Node::Task => None,
        }
    }

    /// A chord's parts.
    pub fn chord_parts(&self) -> Option<&ChordParts> {
        match &self.node {
            Node::Chord(p) => Some(p),
            _ => None,
        }
    }

    /// A chord's parts, mutable.
    pub fn chord_parts_mut(&mut self) -> Option<&mut ChordParts> {
        match &mut self.node {
            Node::Chord(p) => Some(p),
            _ => None,
        }
    }

    /// A chord's body.
    pub fn body(&self) -> Option<&Sig> {
        self.chord_parts().and_then(|p| p.body.as_ref())
    }

    /// A chord's body, mutable.
    pub fn body_mut(&mut self) -> Option<&mut Sig> {
        self.chord_parts_mut().and_then(|p| p.body.as_mut())
    }

    /// `Signature._merge`: partial `args` go in front of the stored ones and `kwargs` over
    /// them (neither for an immutable signature unless `force`); `options` override stored
    /// ones except the immutable options already set.
    pub fn merge(
        &self,
        args: &[Value],
        kwargs: &Map<String, Value>,
        options: Option<&Map<String, Value>>,
        force: bool,
    ) -> (Vec<Value>, Map<String, Value>, Map<String, Value>) {
        let new_options = match options {
            Some(options) => {
                let stamped: Vec<String> = self
                    .base
                    .options
                    .get("stamped_headers")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                    .unwrap_or_default();
                let locked = |k: &str| {
                    (IMMUTABLE_OPTIONS.contains(&k) || stamped.iter().any(|s| s == k))
                        && self.base.options.contains_key(k)
                };
                let mut merged = self.base.options.clone();
                for (k, v) in options {
                    if !locked(k) {
                        merged.insert(k.clone(), v.clone());
                    }
                }
                merged
            }
            None => self.base.options.clone(),
        };
        if self.base.immutable && !force {
            return (self.base.args.clone(), self.base.kwargs.clone(), new_options);
        }
        let mut all_args = args.to_vec();
        all_args.extend(self.base.args.iter().cloned());
        let mut all_kwargs = self.base.kwargs.clone();
        for (k, v) in kwargs {
            all_kwargs.insert(k.clone(), v.clone());
        }
        (all_args, all_kwargs, new_options)
    }

    /// `clone(args, kwargs, **options)`: a copy with the partial arguments and options
    /// merged in. As in Celery, rebuilding a chain or group this way keeps only its members
    /// and options, so partial arguments given to one are dropped.
    pub fn clone_with(&self, args: &[Value], kwargs: &Map<String, Value>, options: &Map<String, Value>) -> Sig {
        let mut copy = self.clone();
        if args.is_empty() && kwargs.is_empty() && options.is_empty() {
            return copy;
        }
        let (a, k, o) = self.merge(args, kwargs, Some(options), false);
        copy.base.options = o;
        match copy.node {
            Node::Chain(_) | Node::Group(_) => {}
            Node::Task => {
                copy.base.args = a;
                copy.base.kwargs = k;
            }
            Node::Chord(_) => {
                copy.base.args = a;
                // The chord's own kwargs (without header and body) are what merged.
                copy.base.kwargs = k;
            }
        }
        copy
    }

    /// `set_immutable`: a group or chord header passes it to its members.
    pub fn set_immutable(&mut self, immutable: bool) {
        match &mut self.node {
            Node::Task | Node::Chain(_) => self.base.immutable = immutable,
            Node::Group(tasks) => tasks.iter_mut().for_each(|t| t.set_immutable(immutable)),
            Node::Chord(parts) => parts.header.set_immutable(immutable),
        }
    }

    /// The list stored under an option (a single value becomes a list of one).
    pub fn list_option(&self, key: &str) -> Vec<Value> {
        match self.base.options.get(key) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items.clone(),
            Some(one) => vec![one.clone()],
        }
    }

    fn list_option_mut(&mut self, key: &str) -> &mut Vec<Value> {
        let entry = self.base.options.entry(key.to_owned()).or_insert_with(|| Value::Array(Vec::new()));
        if !entry.is_array() {
            let one = std::mem::take(entry);
            *entry = Value::Array(if one.is_null() { Vec::new() } else { vec![one] });
        }
        match entry {
            Value::Array(items) => items,
            _ => unreachable!("just made an array"),
        }
    }

    /// `append_to_list_option`: adds `value` unless an equal one is there.
    pub fn append_to_list_option(&mut self, key: &str, value: Value) {
        let items = self.list_option_mut(key);
        if !items.contains(&value) {
            items.push(value);
        }
    }

    /// `extend_list_option`.
    pub fn extend_list_option(&mut self, key: &str, values: Vec<Value>) {
        self.list_option_mut(key).extend(values);
    }

    /// `link(callback)`: a group links a copy, made immutable, to its first task; a chord to
    /// its body; anything else to itself.
    pub fn link(&mut self, callback: Value) {
        match &mut self.node {
            Node::Group(tasks) => {
                if let Some(first) = tasks.first_mut() {
                    let mut cb = match Sig::from_value(&callback) {
                        Ok(s) => s,
                        Err(_) => return first.append_to_list_option("link", callback),
                    };
                    cb.set_immutable(true);
                    first.append_to_list_option("link", cb.to_value());
                }
            }
            Node::Chord(parts) => match parts.body.as_mut() {
                Some(body) => body.link(callback),
                None => self.append_to_list_option("link", callback),
            },
            _ => self.append_to_list_option("link", callback),
        }
    }

    /// `link_error(errback)`: a group gives each member a copy; a chord gives it to its body
    /// (and, with `allow_on_header`, a copy made immutable to each header task; a chord in the
    /// header links it itself); anything else keeps it in its own `link_error` option.
    pub fn link_error(&mut self, errback: Value, allow_on_header: bool) {
        match &mut self.node {
            Node::Group(tasks) => {
                for t in tasks {
                    t.link_error(errback.clone(), allow_on_header);
                }
            }
            Node::Chord(parts) => {
                if allow_on_header {
                    let mut copy = Sig::from_value(&errback).ok();
                    if let Some(c) = copy.as_mut() {
                        c.base.immutable = true;
                    }
                    let immutable = copy.map(|c| c.to_value()).unwrap_or_else(|| errback.clone());
                    for t in parts.header.tasks_mut().into_iter().flatten() {
                        t.link_error(immutable.clone(), allow_on_header);
                    }
                }
                for t in parts.header.tasks_mut().into_iter().flatten() {
                    if t.is_chord() {
                        t.link_error(errback.clone(), allow_on_header);
                    }
                }
                if let Some(body) = parts.body.as_mut() {
                    body.link_error(errback, allow_on_header);
                }
            }
            _ => self.append_to_list_option("link_error", errback),
        }
    }

    /// A chain's tasks with the chain's callbacks moved to the last one and its errbacks given
    /// to every one (`unchain_tasks`).
    pub fn unchain_tasks(&self, allow: bool) -> Vec<Sig> {
        let mut tasks: Vec<Sig> = self.tasks().to_vec();
        if let Some(last) = tasks.last_mut() {
            for cb in self.list_option("link") {
                last.link(cb);
            }
        }
        for eb in self.list_option("link_error") {
            for t in &mut tasks {
                // `Signature.link_error` on a group or chord has its own rules.
                t.link_error(eb.clone(), allow);
            }
        }
        tasks
    }

    /// `maybe_unroll_group`: a group of one is its only task.
    pub fn unroll_single(self) -> Sig {
        match self.node {
            Node::Group(mut tasks) if tasks.len() == 1 => tasks.remove(0),
            node => Sig { base: self.base, node },
        }
    }

    /// The `|` operator with Celery's rules: a group followed by a task becomes a chord; a
    /// chord followed by a task takes it into its body; chains are flattened. `allow` is
    /// `task_allow_error_cb_on_chord_header`, for errbacks moved onto a chord.
    pub fn or(self, other: Sig, allow: bool) -> Sig {
        match self.node {
            Node::Chain(_) => self.chain_or(other, allow),
            Node::Group(_) => {
                if other.is_empty_group() {
                    return self;
                }
                Sig::chord(self, Some(other), Map::new())
            }
            Node::Chord(_) => {
                let other_is_single_group = matches!(&other.node, Node::Group(t) if t.len() == 1);
                if !other.is_group() && !other.is_chain() || other_is_single_group {
                    let other = other.unroll_single();
                    let mut sig = self;
                    if let Some(parts) = sig.chord_parts_mut() {
                        parts.body = Some(match parts.body.take() {
                            Some(body) => body.or(other, allow),
                            None => other,
                        });
                    }
                    return sig;
                }
                task_or(self, other, allow)
            }
            Node::Task => task_or(self, other, allow),
        }
    }

    fn chain_or(self, other: Sig, allow: bool) -> Sig {
        if other.is_empty_group() {
            return self;
        }
        match other.node {
            Node::Group(_) => {
                let other = other.unroll_single();
                if !other.is_group() {
                    return self.chain_or(other, allow);
                }
                let mut tasks = self.unchain_tasks(allow);
                if tasks.is_empty() {
                    return other;
                }
                if let Some(last) = tasks.last_mut().filter(|t| t.is_chord()) {
                    if let Some(parts) = last.chord_parts_mut() {
                        parts.body = parts.body.take().map(|b| b.or(other.clone(), allow));
                    }
                    return Sig::chain(tasks, Map::new());
                }
                tasks.push(other);
                Sig::chain(tasks, Map::new())
            }
            Node::Chain(_) => {
                let mut acc = self;
                for t in other.unchain_tasks(allow) {
                    acc = acc.or(t, allow);
                }
                acc
            }
            _ => {
                let last_is_group = self.tasks().last().is_some_and(Sig::is_group);
                let last_is_chord = self.tasks().last().is_some_and(Sig::is_chord);
                if last_is_group {
                    let mut sig = self;
                    let Some(tasks) = sig.tasks_mut() else { return sig };
                    let Some(group) = tasks.pop() else { return sig };
                    tasks.push(Sig::chord(group, Some(other), Map::new()));
                    // Two chords in a row: the second joins the first one's body.
                    let n = tasks.len();
                    if n > 1 && tasks[n - 2].is_chord() {
                        let second = tasks.pop();
                        if let (Some(second), Some(parts)) = (second, tasks[n - 2].chord_parts_mut()) {
                            parts.body = parts.body.take().map(|b| b.or(second, allow));
                        }
                    }
                    sig
                } else if last_is_chord && !other.is_chord() {
                    let mut sig = self;
                    if let Some(last) = sig.tasks_mut().and_then(|t| t.last_mut())
                        && let Some(parts) = last.chord_parts_mut()
                    {
                        parts.body = parts.body.take().map(|b| b.or(other, allow));
                    }
                    sig
                } else {
                    let mut tasks = self.unchain_tasks(allow);
                    tasks.push(other);
                    Sig::chain(tasks, Map::new())
                }
            }
        }
    }

    /// Whether a chord's body is a chain that does not start with a group
    /// (`_is_chain_led_by_task`).
    pub fn is_chain_led_by_task(&self) -> bool {
        matches!(&self.node, Node::Chain(t) if t.first().is_some_and(|f| !f.is_group()))
    }

    /// Stamps this signature, its links and its members with `stamps` (Celery's
    /// `stamp(visitor)` with a visitor that returns the same stamps for every signature).
    pub fn stamp(&mut self, stamps: &Map<String, Value>) {
        let links: Vec<(String, Vec<Value>)> =
            ["link", "link_error"].iter().map(|k| (k.to_string(), self.list_option(k))).collect();
        for (key, items) in links {
            if items.is_empty() {
                continue;
            }
            let stamped: Vec<Value> = items
                .into_iter()
                .map(|v| match Sig::from_value(&v) {
                    Ok(mut s) => {
                        s.stamp(stamps);
                        s.to_value()
                    }
                    Err(_) => v,
                })
                .collect();
            self.base.options.insert(key, Value::Array(stamped));
        }
        match &mut self.node {
            Node::Task => {}
            Node::Chain(tasks) | Node::Group(tasks) => tasks.iter_mut().for_each(|t| t.stamp(stamps)),
            Node::Chord(parts) => {
                for t in parts.header.tasks_mut().into_iter().flatten() {
                    t.stamp(stamps);
                }
                if let Some(b) = parts.body.as_mut() {
                    b.stamp(stamps);
                }
            }
        }
        if matches!(self.node, Node::Task) {
            let mut names: Vec<String> = self
                .base
                .options
                .get("stamped_headers")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            for (k, v) in stamps {
                if !names.contains(k) {
                    names.push(k.clone());
                }
                self.base.options.insert(k.clone(), v.clone());
            }
            self.base.options.insert("stamped_headers".into(), Value::from(names));
        }
    }
}

/// `Signature.__or__` for a task (or a chord whose right side is a group or chain).
fn task_or(left: Sig, other: Sig, allow: bool) -> Sig {
    match other.node {
        Node::Chain(_) => {
            let mut tasks = vec![left];
            tasks.extend(other.unchain_tasks(allow));
            Sig::chain(tasks, Map::new())
        }
        Node::Group(_) => Sig::chain(vec![left, other.unroll_single()], Map::new()),
        _ => Sig::chain(vec![left, other], Map::new()),
    }
}

fn list_value(sigs: &[Sig]) -> Value {
    Value::Array(sigs.iter().map(Sig::to_value).collect())
}

/// Writes [`Sig::to_signature`]'s JSON straight from the tree, without building the nested
/// signatures and values first (for a chord of 10,000 that copy cost more than sending it).
impl serde::Serialize for Sig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let b = &self.base;
        // The keys and their order of `Signature`'s derived form (its `extra` last).
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("task", &b.task)?;
        map.serialize_entry("args", &b.args)?;
        map.serialize_entry("kwargs", &Kwargs(self))?;
        map.serialize_entry("options", &b.options)?;
        map.serialize_entry("subtask_type", &b.subtask_type)?;
        map.serialize_entry("immutable", &b.immutable)?;
        for (k, v) in &b.extra {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// A node's `kwargs` with its members written in, as [`Sig::to_signature`] inserts them: a
/// key already there keeps its place, a new one goes last.
struct Kwargs<'a>(&'a Sig);

/// A member slot of [`Kwargs`].
enum Member<'a> {
    List(&'a [Sig]),
    One(&'a Sig),
    Null,
}

impl serde::Serialize for Member<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Member::List(sigs) => serializer.collect_seq(sigs.iter()),
            Member::One(sig) => sig.serialize(serializer),
            Member::Null => serializer.serialize_unit(),
        }
    }
}

impl serde::Serialize for Kwargs<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let sig = self.0;
        let members: Vec<(&str, Member)> = match &sig.node {
            Node::Task => Vec::new(),
            Node::Chain(tasks) | Node::Group(tasks) => vec![("tasks", Member::List(tasks))],
            Node::Chord(parts) => vec![
                (
                    "header",
                    if parts.header_frozen { Member::One(&parts.header) } else { Member::List(parts.header.tasks()) },
                ),
                ("body", parts.body.as_ref().map_or(Member::Null, Member::One)),
            ],
        };
        let mut map = serializer.serialize_map(None)?;
        for (k, v) in &sig.base.kwargs {
            match members.iter().find(|(name, _)| name == k) {
                Some((_, member)) => map.serialize_entry(k, member)?,
                None => map.serialize_entry(k, v)?,
            }
        }
        for (name, member) in &members {
            if !sig.base.kwargs.contains_key(*name) {
                map.serialize_entry(name, member)?;
            }
        }
        map.end()
    }
}

/// `chain(a, b, c)` as Celery builds it: like `a | b | c` (`_fold_chain`).
pub(crate) fn fold_chain(tasks: Vec<Sig>, allow: bool) -> Sig {
    let mut acc = Sig::chain(Vec::new(), Map::new());
    for t in tasks {
        acc = acc.or(t, allow);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(name: &str) -> Sig {
        Sig::task(Signature::new(name, vec![]))
    }

    #[test]
    fn a_group_followed_by_a_task_becomes_a_chord() {
        let c = fold_chain(vec![t("a"), Sig::group(vec![t("b"), t("c")], Map::new()), t("d")], false);
        let tasks = c.tasks();
        assert_eq!(tasks.len(), 2);
        assert!(tasks[1].is_chord());
        assert_eq!(tasks[1].body().map(Sig::name), Some("d"));
    }

    #[test]
    fn nested_chains_are_flattened_and_single_groups_unrolled() {
        let inner = Sig::chain(vec![t("b"), t("c")], Map::new());
        let c = fold_chain(vec![t("a"), inner, Sig::group(vec![t("d")], Map::new())], false);
        let names: Vec<&str> = c.tasks().iter().map(Sig::name).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
    }

    #[test]
    fn chords_round_trip_in_celerys_json_form() {
        let v = json!({"task": "celery.chord", "args": [], "kwargs": {"kwargs": {}, "header": [
            {"task": "a", "args": [1], "kwargs": {}, "options": {}, "subtask_type": null, "immutable": false}],
            "body": {"task": "b", "args": [], "kwargs": {}, "options": {}, "subtask_type": null, "immutable": false}},
            "options": {}, "subtask_type": "chord", "immutable": false});
        assert_eq!(Sig::from_value(&v).unwrap().to_value(), v);
    }

    #[test]
    fn written_straight_from_the_tree_as_to_signature_writes_it() {
        // Members in kwargs keys that are there already (kept in place) and new (last), a
        // frozen and an unfrozen header, nested canvases, extra keys, a chord without a body.
        let mut a = t("a");
        a.base.args = vec![json!(1), json!("x")];
        a.base.extra.insert("chord_size".into(), json!(3));
        let mut group = Sig::group(vec![a.clone(), Sig::chain(vec![t("b"), t("c")], Map::new())], Map::new());
        group.base.kwargs.insert("tasks".into(), json!("stale"));
        group.base.kwargs.insert("later".into(), json!({"k": [1, 2]}));
        let mut frozen = Sig::chord_of(vec![a.clone(), group.clone()], Some(t("d")), Map::new());
        if let Node::Chord(parts) = &mut frozen.node {
            parts.header_frozen = true;
        }
        frozen.base.kwargs.insert("body".into(), json!(null));
        let canvases = [
            a,
            group.clone(),
            Sig::chain(vec![group, frozen.clone()], Map::new()),
            frozen,
            Sig::chord_of(vec![t("e")], None, Map::new()),
        ];
        for sig in &canvases {
            let direct = serde_json::to_vec(sig).unwrap();
            let before = serde_json::to_vec(&sig.to_signature()).unwrap();
            assert_eq!(String::from_utf8(direct).unwrap(), String::from_utf8(before).unwrap());
        }
    }

    #[test]
    fn merge_keeps_immutable_options_and_immutable_args() {
        let mut s = t("a");
        s.base.args = vec![json!(1)];
        s.set("group_id", "g1");
        let mut opts = Map::new();
        opts.insert("group_id".into(), json!("g2"));
        opts.insert("queue".into(), json!("q"));
        let (args, _, options) = s.merge(&[json!(0)], &Map::new(), Some(&opts), false);
        assert_eq!(args, [json!(0), json!(1)]);
        assert_eq!(options["group_id"], "g1");
        assert_eq!(options["queue"], "q");
        s.base.immutable = true;
        assert_eq!(s.merge(&[json!(0)], &Map::new(), None, false).0, [json!(1)]);
    }
}
