//! Results of an applied canvas as Celery links them: an `AsyncResult` or a `GroupResult`,
//! each with an optional parent (the step before it in a chain), encoded as Celery's result
//! tuples (`((id, parent), None)` / `((id, parent), [children])`) for `children` and for
//! saved group results.
//!
//! Freezing a chain links results by changing parents of results already made, as Python's
//! shared objects do, so nodes are shared (`Arc<Mutex<..>>`); the lock is never held across an
//! await.

use serde_json::Value;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A shared result node.
#[derive(Debug, Clone)]
pub(crate) struct Res(Arc<Mutex<ResNode>>);

#[derive(Debug)]
pub(crate) struct ResNode {
    pub id: String,
    /// `Some` for a group result: its members.
    pub results: Option<Vec<Res>>,
    pub parent: Option<Res>,
}

impl Res {
    /// The result of one task.
    pub fn task(id: impl Into<String>) -> Res {
        Res(Arc::new(Mutex::new(ResNode { id: id.into(), results: None, parent: None })))
    }

    /// The result of a group.
    pub fn group(id: impl Into<String>, results: Vec<Res>) -> Res {
        Res(Arc::new(Mutex::new(ResNode { id: id.into(), results: Some(results), parent: None })))
    }

    fn lock(&self) -> MutexGuard<'_, ResNode> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The id.
    pub fn id(&self) -> String {
        self.lock().id.clone()
    }

    /// Whether this is a group result.
    pub fn is_group(&self) -> bool {
        self.lock().results.is_some()
    }

    /// A group result's members.
    pub fn results(&self) -> Vec<Res> {
        self.lock().results.clone().unwrap_or_default()
    }

    /// The parent.
    pub fn parent(&self) -> Option<Res> {
        self.lock().parent.clone()
    }

    /// Sets the parent.
    pub fn set_parent(&self, parent: Option<Res>) {
        self.lock().parent = parent;
    }

    /// Whether both are the same node (Python's `is`).
    pub fn same(&self, other: &Res) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The first ancestor (or itself) without a parent.
    pub fn root(&self) -> Res {
        let mut node = self.clone();
        let mut seen = 0;
        while let Some(p) = node.parent() {
            node = p;
            seen += 1;
            if seen > 100_000 {
                break; // a cycle; Celery raises "Recursive result parents"
            }
        }
        node
    }

    /// Celery's `as_tuple()`.
    pub fn as_tuple(&self) -> Value {
        let (id, results, parent) = {
            let n = self.lock();
            (n.id.clone(), n.results.clone(), n.parent.clone())
        };
        let head = Value::Array(vec![Value::String(id), parent.map(|p| p.as_tuple()).unwrap_or(Value::Null)]);
        let tail = match results {
            Some(rs) => Value::Array(rs.iter().map(Res::as_tuple).collect()),
            None => Value::Null,
        };
        Value::Array(vec![head, tail])
    }

    /// Rebuilds a result from Celery's tuple form (`result_from_tuple`).
    pub fn from_tuple(value: &Value) -> Option<Res> {
        let pair = value.as_array()?;
        let head = pair.first()?;
        let (id, parent) = match head {
            Value::Array(h) => (h.first()?.as_str()?.to_owned(), h.get(1).filter(|p| !p.is_null())),
            Value::String(s) => (s.clone(), None),
            _ => return None,
        };
        let res = match pair.get(1) {
            Some(Value::Array(children)) => Res::group(id, children.iter().filter_map(Res::from_tuple).collect()),
            _ => Res::task(id),
        };
        if let Some(p) = parent {
            res.set_parent(Res::from_tuple(p));
        }
        Some(res)
    }

    /// Every task id under this result, depth first (a group's members).
    pub fn leaf_ids(&self) -> Vec<String> {
        let (id, results) = {
            let n = self.lock();
            (n.id.clone(), n.results.clone())
        };
        match results {
            Some(rs) => rs.iter().flat_map(Res::leaf_ids).collect(),
            None => vec![id],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tuples_are_celerys() {
        let a = Res::task("a");
        let g = Res::group("g", vec![Res::task("b"), Res::task("c")]);
        g.set_parent(Some(a.clone()));
        assert_eq!(a.as_tuple(), json!([["a", null], null]));
        assert_eq!(g.as_tuple(), json!([["g", [["a", null], null]], [[["b", null], null], [["c", null], null]]]));
        let back = Res::from_tuple(&g.as_tuple()).unwrap();
        assert_eq!(back.as_tuple(), g.as_tuple());
        assert_eq!(back.leaf_ids(), ["b", "c"]);
    }
}
