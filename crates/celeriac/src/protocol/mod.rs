//! Celery's wire formats: task messages (protocol v2, reading v1), signatures, result records
//! and exceptions. Each type owns its encoding (`from_wire` / `to_wire`) and writes the same
//! bytes Python's `json.dumps` writes, so golden fixtures captured from Celery round-trip.
//!
//! This module imports nothing else from the crate: brokers, backends and the worker build on
//! it, never the other way round.

mod envelope;
mod exception;
mod message;
mod message_codec;
pub mod pyjson;
mod repr;
mod result_meta;
mod signature;
mod state;
pub mod time;

pub use envelope::Envelope;
pub use exception::{BILLIARD_EXCEPTIONS, BUILTINS, CELERY_EXCEPTIONS, ExceptionInfo};
pub use message::{DeliveryInfo, Embed, Message, Properties, ProtocolError, TaskBody, TaskHeaders};
pub use repr::{args_repr, py_repr};
pub use result_meta::{ResultMeta, result_tuple};
pub use signature::Signature;
pub use state::State;
