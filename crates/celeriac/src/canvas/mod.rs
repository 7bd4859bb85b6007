//! Building and sending task calls: [`Signature`](crate::Signature) options
//! (`countdown`, `eta`, `expires`, `queue`, `priority`, ...) and the client side of sending.
//! Chains, groups and chords are signatures too (`primitives`), applied by `apply`; the
//! worker continues workflows in `dispatch`; `saga` rolls failed chains back; `workflow` shows
//! a workflow as a tree.

pub(crate) mod apply;
pub(crate) mod builtins;
mod chain;
mod chord;
pub(crate) mod dispatch;
mod group;
mod options;
mod primitives;
pub(crate) mod replace;
pub(crate) mod result;
pub mod saga;
pub(crate) mod send;
pub(crate) mod tree;
pub mod workflow;

pub use primitives::{chain, chord, group};
