//! Building and sending task calls: [`Signature`](crate::Signature) options
//! (`countdown`, `eta`, `expires`, `queue`, `priority`, ...) and the client side of sending.
//! Chains, groups and chords come next, on top of the same signature type.

pub(crate) mod dispatch;
mod options;
pub(crate) mod send;
