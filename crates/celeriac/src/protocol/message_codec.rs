//! One-pass reading and writing of task messages, behind [`Message::from_wire`],
//! [`TaskBody::from_wire`] and [`Message::to_wire`].
//!
//! The reference code in `message.rs` (the derived `Deserialize` impls with
//! `#[serde(flatten)] extra`, and the envelope read into `Value`s and converted again with
//! `from_value`) defines the format, and these are shortcuts for the messages Celery actually
//! sends. [`decode`] and [`decode_body`] read straight into the types with private visitors,
//! with no second pass and without serde's flatten buffer, and return `None` whenever they cannot
//! vouch for giving the reference's result. The caller then runs the reference path, which also
//! produces every error, message for message. That is the case for any parse error, a repeated
//! named key, a v1 message (no `headers.task`), a `compression` header, a foreign content type,
//! a body that is neither a string nor `null`, and the odd numbers and keys listed at
//! [`as_if_from_value`]. [`encode`] writes the envelope from the typed fields and leaves the
//! rare `extra` key that repeats a named field to the reference writer.
//!
//! `message_codec/tests.rs` holds the fast paths to the reference on every fixture and on
//! thousands of mutations of them. Not for: event and pidbox envelopes (`envelope.rs`).

use super::message::{DeliveryInfo, Embed, Message, Properties, TaskBody, TaskHeaders};
use super::pyjson::PythonFormatter;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};
use std::borrow::Cow;
use std::fmt;

// ---------------------------------------------------------------------------------------------
// Map keys
// ---------------------------------------------------------------------------------------------

/// A map key: one of the type's named fields, or any other key (for `extra`).
enum Key<F> {
    Field(F),
    Other(String),
}

/// Reads a key, matching it against the named fields with the function.
struct KeySeed<F>(fn(&str) -> Option<F>);

impl<'de, F> DeserializeSeed<'de> for KeySeed<F> {
    type Value = Key<F>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key<F>, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl<'de, F> Visitor<'de> for KeySeed<F> {
    type Value = Key<F>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field identifier")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<F>, E> {
        Ok(match (self.0)(s) {
            Some(field) => Key::Field(field),
            None => Key::Other(s.to_owned()),
        })
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Key<F>, E> {
        Ok(match (self.0)(&s) {
            Some(field) => Key::Field(field),
            None => Key::Other(s),
        })
    }
}

/// Stores a named field's value. A second occurrence is an error, which sends the message to the
/// reference path: there the envelope's `Value` maps keep the last value instead.
macro_rules! set_once {
    ($slot:ident, $name:literal, $value:expr) => {{
        if $slot.is_some() {
            return Err(de::Error::duplicate_field($name));
        }
        $slot = Some($value);
    }};
}

/// `null` reads as the default (the reference's `null_default`).
fn or_default<T: Default>(value: Option<T>) -> T {
    value.unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum H {
    Lang,
    Task,
    Id,
    Shadow,
    Eta,
    Expires,
    Group,
    GroupIndex,
    Retries,
    Timelimit,
    RootId,
    ParentId,
    Argsrepr,
    Kwargsrepr,
    Origin,
    IgnoreResult,
    ReplacedTaskNesting,
    StampedHeaders,
    Stamps,
}

/// The named header fields, as written.
const HEADER_FIELDS: &[&str] = &[
    "lang",
    "task",
    "id",
    "shadow",
    "eta",
    "expires",
    "group",
    "group_index",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "ignore_result",
    "replaced_task_nesting",
    "stamped_headers",
    "stamps",
];

fn header_field(key: &str) -> Option<H> {
    Some(match key {
        "lang" => H::Lang,
        "task" => H::Task,
        "id" => H::Id,
        "shadow" => H::Shadow,
        "eta" => H::Eta,
        "expires" => H::Expires,
        "group" => H::Group,
        "group_index" => H::GroupIndex,
        "retries" => H::Retries,
        "timelimit" => H::Timelimit,
        "root_id" => H::RootId,
        "parent_id" => H::ParentId,
        "argsrepr" => H::Argsrepr,
        "kwargsrepr" => H::Kwargsrepr,
        "origin" => H::Origin,
        "ignore_result" => H::IgnoreResult,
        "replaced_task_nesting" => H::ReplacedTaskNesting,
        "stamped_headers" => H::StampedHeaders,
        "stamps" => H::Stamps,
        _ => return None,
    })
}

type Limits = (Option<Number>, Option<Number>);

/// [`TaskHeaders`] read in one pass.
struct FastHeaders(TaskHeaders);

impl<'de> Deserialize<'de> for FastHeaders {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(HeadersVisitor)
    }
}

struct HeadersVisitor;

impl<'de> Visitor<'de> for HeadersVisitor {
    type Value = FastHeaders;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("task message headers")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FastHeaders, A::Error> {
        let mut lang: Option<String> = None;
        let mut task: Option<String> = None;
        let mut id: Option<String> = None;
        let mut shadow: Option<Option<String>> = None;
        let mut eta: Option<Option<String>> = None;
        let mut expires: Option<Option<String>> = None;
        let mut group: Option<Option<String>> = None;
        let mut group_index: Option<Option<u64>> = None;
        let mut retries: Option<u32> = None;
        let mut timelimit: Option<Limits> = None;
        let mut root_id: Option<Option<String>> = None;
        let mut parent_id: Option<Option<String>> = None;
        let mut argsrepr: Option<Option<String>> = None;
        let mut kwargsrepr: Option<Option<String>> = None;
        let mut origin: Option<Option<String>> = None;
        let mut ignore_result: Option<bool> = None;
        let mut replaced_task_nesting: Option<u32> = None;
        let mut stamped_headers: Option<Option<Value>> = None;
        let mut stamps: Option<Map<String, Value>> = None;
        let mut extra = Map::new();
        while let Some(key) = map.next_key_seed(KeySeed(header_field))? {
            match key {
                Key::Field(H::Lang) => set_once!(lang, "lang", or_default(map.next_value()?)),
                Key::Field(H::Task) => set_once!(task, "task", map.next_value()?),
                Key::Field(H::Id) => set_once!(id, "id", map.next_value()?),
                Key::Field(H::Shadow) => set_once!(shadow, "shadow", map.next_value()?),
                Key::Field(H::Eta) => set_once!(eta, "eta", map.next_value()?),
                Key::Field(H::Expires) => set_once!(expires, "expires", map.next_value()?),
                Key::Field(H::Group) => set_once!(group, "group", map.next_value()?),
                Key::Field(H::GroupIndex) => set_once!(group_index, "group_index", map.next_value()?),
                Key::Field(H::Retries) => set_once!(retries, "retries", or_default(map.next_value()?)),
                Key::Field(H::Timelimit) => {
                    set_once!(timelimit, "timelimit", map.next_value::<Option<Limits>>()?.unwrap_or((None, None)))
                }
                Key::Field(H::RootId) => set_once!(root_id, "root_id", map.next_value()?),
                Key::Field(H::ParentId) => set_once!(parent_id, "parent_id", map.next_value()?),
                Key::Field(H::Argsrepr) => set_once!(argsrepr, "argsrepr", map.next_value()?),
                Key::Field(H::Kwargsrepr) => set_once!(kwargsrepr, "kwargsrepr", map.next_value()?),
                Key::Field(H::Origin) => set_once!(origin, "origin", map.next_value()?),
                Key::Field(H::IgnoreResult) => {
                    set_once!(ignore_result, "ignore_result", or_default(map.next_value()?))
                }
                Key::Field(H::ReplacedTaskNesting) => {
                    set_once!(replaced_task_nesting, "replaced_task_nesting", or_default(map.next_value()?))
                }
                Key::Field(H::StampedHeaders) => set_once!(stamped_headers, "stamped_headers", map.next_value()?),
                Key::Field(H::Stamps) => set_once!(stamps, "stamps", or_default(map.next_value()?)),
                Key::Other(key) => {
                    extra.insert(key, map.next_value()?);
                }
            }
        }
        Ok(FastHeaders(TaskHeaders {
            lang: lang.unwrap_or_default(),
            task: task.ok_or_else(|| de::Error::missing_field("task"))?,
            id: id.ok_or_else(|| de::Error::missing_field("id"))?,
            shadow: shadow.flatten(),
            eta: eta.flatten(),
            expires: expires.flatten(),
            group: group.flatten(),
            group_index: group_index.flatten(),
            retries: retries.unwrap_or_default(),
            timelimit: timelimit.unwrap_or((None, None)),
            root_id: root_id.flatten(),
            parent_id: parent_id.flatten(),
            argsrepr: argsrepr.flatten(),
            kwargsrepr: kwargsrepr.flatten(),
            origin: origin.flatten(),
            ignore_result: ignore_result.unwrap_or_default(),
            replaced_task_nesting: replaced_task_nesting.unwrap_or_default(),
            stamped_headers: stamped_headers.flatten(),
            stamps: stamps.unwrap_or_default(),
            extra,
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// Properties and delivery info
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum P {
    CorrelationId,
    ReplyTo,
    DeliveryMode,
    Expiration,
    DeliveryInfo,
    Priority,
    BodyEncoding,
    DeliveryTag,
}

/// The named property fields.
const PROPERTY_FIELDS: &[&str] = &[
    "correlation_id",
    "reply_to",
    "delivery_mode",
    "expiration",
    "delivery_info",
    "priority",
    "body_encoding",
    "delivery_tag",
];

fn property_field(key: &str) -> Option<P> {
    Some(match key {
        "correlation_id" => P::CorrelationId,
        "reply_to" => P::ReplyTo,
        "delivery_mode" => P::DeliveryMode,
        "expiration" => P::Expiration,
        "delivery_info" => P::DeliveryInfo,
        "priority" => P::Priority,
        "body_encoding" => P::BodyEncoding,
        "delivery_tag" => P::DeliveryTag,
        _ => return None,
    })
}

/// [`Properties`] read in one pass.
struct FastProperties(Properties);

impl<'de> Deserialize<'de> for FastProperties {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(PropertiesVisitor)
    }
}

struct PropertiesVisitor;

impl<'de> Visitor<'de> for PropertiesVisitor {
    type Value = FastProperties;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("message properties")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FastProperties, A::Error> {
        let mut correlation_id: Option<Option<String>> = None;
        let mut reply_to: Option<Option<String>> = None;
        let mut delivery_mode: Option<Option<u8>> = None;
        let mut expiration: Option<Option<String>> = None;
        let mut delivery_info: Option<FastDeliveryInfo> = None;
        let mut priority: Option<u8> = None;
        let mut body_encoding: Option<Option<String>> = None;
        let mut delivery_tag: Option<Option<String>> = None;
        let mut extra = Map::new();
        while let Some(key) = map.next_key_seed(KeySeed(property_field))? {
            match key {
                Key::Field(P::CorrelationId) => set_once!(correlation_id, "correlation_id", map.next_value()?),
                Key::Field(P::ReplyTo) => set_once!(reply_to, "reply_to", map.next_value()?),
                Key::Field(P::DeliveryMode) => set_once!(delivery_mode, "delivery_mode", map.next_value()?),
                Key::Field(P::Expiration) => set_once!(expiration, "expiration", map.next_value()?),
                Key::Field(P::DeliveryInfo) => set_once!(delivery_info, "delivery_info", map.next_value()?),
                Key::Field(P::Priority) => set_once!(priority, "priority", map.next_value()?),
                Key::Field(P::BodyEncoding) => set_once!(body_encoding, "body_encoding", map.next_value()?),
                Key::Field(P::DeliveryTag) => set_once!(delivery_tag, "delivery_tag", map.next_value()?),
                Key::Other(key) => {
                    extra.insert(key, map.next_value()?);
                }
            }
        }
        Ok(FastProperties(Properties {
            correlation_id: correlation_id.flatten(),
            reply_to: reply_to.flatten(),
            delivery_mode: delivery_mode.flatten(),
            expiration: expiration.flatten(),
            delivery_info: delivery_info.map(|d| d.0).unwrap_or_default(),
            priority: priority.unwrap_or_default(),
            body_encoding: body_encoding.flatten(),
            delivery_tag: delivery_tag.flatten(),
            extra,
        }))
    }
}

#[derive(Clone, Copy)]
enum Di {
    Exchange,
    RoutingKey,
}

/// The named `delivery_info` fields.
const DELIVERY_INFO_FIELDS: &[&str] = &["exchange", "routing_key"];

fn delivery_info_field(key: &str) -> Option<Di> {
    match key {
        "exchange" => Some(Di::Exchange),
        "routing_key" => Some(Di::RoutingKey),
        _ => None,
    }
}

/// [`DeliveryInfo`] read in one pass.
struct FastDeliveryInfo(DeliveryInfo);

impl<'de> Deserialize<'de> for FastDeliveryInfo {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(DeliveryInfoVisitor)
    }
}

struct DeliveryInfoVisitor;

impl<'de> Visitor<'de> for DeliveryInfoVisitor {
    type Value = FastDeliveryInfo;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("delivery info")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FastDeliveryInfo, A::Error> {
        let mut exchange: Option<String> = None;
        let mut routing_key: Option<String> = None;
        let mut extra = Map::new();
        while let Some(key) = map.next_key_seed(KeySeed(delivery_info_field))? {
            match key {
                Key::Field(Di::Exchange) => set_once!(exchange, "exchange", map.next_value()?),
                Key::Field(Di::RoutingKey) => set_once!(routing_key, "routing_key", map.next_value()?),
                Key::Other(key) => {
                    extra.insert(key, map.next_value()?);
                }
            }
        }
        Ok(FastDeliveryInfo(DeliveryInfo {
            exchange: exchange.unwrap_or_default(),
            routing_key: routing_key.unwrap_or_default(),
            extra,
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// Embed
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Em {
    Callbacks,
    Errbacks,
    Chain,
    Chord,
}

fn embed_field(key: &str) -> Option<Em> {
    Some(match key {
        "callbacks" => Em::Callbacks,
        "errbacks" => Em::Errbacks,
        "chain" => Em::Chain,
        "chord" => Em::Chord,
        _ => return None,
    })
}

/// [`Embed`] read in one pass.
struct FastEmbed(Embed);

impl<'de> Deserialize<'de> for FastEmbed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(EmbedVisitor)
    }
}

struct EmbedVisitor;

impl<'de> Visitor<'de> for EmbedVisitor {
    type Value = FastEmbed;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("embed")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FastEmbed, A::Error> {
        let mut callbacks = None;
        let mut errbacks = None;
        let mut chain = None;
        let mut chord = None;
        let mut extra = Map::new();
        while let Some(key) = map.next_key_seed(KeySeed(embed_field))? {
            match key {
                Key::Field(Em::Callbacks) => set_once!(callbacks, "callbacks", map.next_value()?),
                Key::Field(Em::Errbacks) => set_once!(errbacks, "errbacks", map.next_value()?),
                Key::Field(Em::Chain) => set_once!(chain, "chain", map.next_value()?),
                Key::Field(Em::Chord) => set_once!(chord, "chord", map.next_value()?),
                Key::Other(key) => {
                    extra.insert(key, map.next_value()?);
                }
            }
        }
        Ok(FastEmbed(Embed {
            callbacks: callbacks.flatten(),
            errbacks: errbacks.flatten(),
            chain: chain.flatten(),
            chord: chord.flatten(),
            extra,
        }))
    }
}

/// Reads `[args, kwargs, embed]` in one pass; `None` when the reference path must decide.
///
/// From JSON text, the derived `Embed`'s flatten buffer gives every `extra` value exactly as
/// `Value` reads it, whenever it reads at all; so on success this is the reference's result, and
/// on any error the reference runs again to give its own.
pub(super) fn decode_body(bytes: &[u8]) -> Option<TaskBody> {
    let (args, kwargs, embed) =
        serde_json::from_slice::<(Vec<Value>, Map<String, Value>, Option<FastEmbed>)>(bytes).ok()?;
    Some(TaskBody { args, kwargs, embed: embed.map(|e| e.0) })
}

// ---------------------------------------------------------------------------------------------
// The envelope, read in one pass
// ---------------------------------------------------------------------------------------------

/// `body` as sent: a string (borrowed from the input unless it has escapes) or `null`.
enum Body<'a> {
    Text(Cow<'a, str>),
    Null,
}

impl<'de> Deserialize<'de> for Body<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(BodyVisitor)
    }
}

struct BodyVisitor;

impl<'de> Visitor<'de> for BodyVisitor {
    type Value = Body<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or null")
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Body<'de>, E> {
        Ok(Body::Text(Cow::Borrowed(s)))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Body<'de>, E> {
        Ok(Body::Text(Cow::Owned(s.to_owned())))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Body<'de>, E> {
        Ok(Body::Text(Cow::Owned(s)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Body<'de>, E> {
        Ok(Body::Null)
    }
}

#[derive(Clone, Copy)]
enum Env {
    Body,
    ContentEncoding,
    ContentType,
    Headers,
    Properties,
}

fn envelope_field(key: &str) -> Option<Env> {
    Some(match key {
        "body" => Env::Body,
        "content-encoding" => Env::ContentEncoding,
        "content-type" => Env::ContentType,
        "headers" => Env::Headers,
        "properties" => Env::Properties,
        _ => return None,
    })
}

/// A v2 task envelope, read straight into the message types.
struct FastEnvelope<'a> {
    body: Body<'a>,
    content_encoding: Option<String>,
    content_type: Option<String>,
    headers: TaskHeaders,
    /// `None` when absent or `null`.
    properties: Option<Properties>,
}

impl<'de> Deserialize<'de> for FastEnvelope<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(FastEnvelopeVisitor)
    }
}

struct FastEnvelopeVisitor;

impl<'de> Visitor<'de> for FastEnvelopeVisitor {
    type Value = FastEnvelope<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a kombu envelope")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FastEnvelope<'de>, A::Error> {
        let mut body = None;
        let mut content_encoding = None;
        let mut content_type = None;
        let mut headers: Option<FastHeaders> = None;
        let mut properties: Option<Option<FastProperties>> = None;
        while let Some(key) = map.next_key_seed(KeySeed(envelope_field))? {
            match key {
                Key::Field(Env::Body) => set_once!(body, "body", map.next_value()?),
                Key::Field(Env::ContentEncoding) => {
                    set_once!(content_encoding, "content-encoding", map.next_value()?)
                }
                Key::Field(Env::ContentType) => set_once!(content_type, "content-type", map.next_value()?),
                Key::Field(Env::Headers) => set_once!(headers, "headers", map.next_value()?),
                Key::Field(Env::Properties) => set_once!(properties, "properties", map.next_value()?),
                Key::Other(_) => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(FastEnvelope {
            body: body.ok_or_else(|| de::Error::missing_field("body"))?,
            content_encoding,
            content_type,
            // No headers (or no `task` in them, which fails above): v1, for the reference path.
            headers: headers.ok_or_else(|| de::Error::missing_field("headers"))?.0,
            properties: properties.flatten().map(|p| p.0),
        })
    }
}

/// Reads a plain v2 task message in one pass; `None` when the reference path must decide.
pub(super) fn decode(bytes: &[u8]) -> Option<Message> {
    let env: FastEnvelope<'_> = serde_json::from_slice(bytes).ok()?;
    let mut headers = env.headers;
    let mut properties = env.properties.unwrap_or_else(Properties::empty);
    if matches!(headers.extra.get("compression"), Some(Value::String(_))) {
        return None;
    }
    let content_type = env.content_type.unwrap_or_else(super::message::json_type);
    if !content_type.eq_ignore_ascii_case("application/json") {
        return None;
    }
    let body = match (env.body, properties.body_encoding.as_deref()) {
        (Body::Text(s), Some("base64")) => BASE64.decode(s.as_bytes()).ok()?,
        (Body::Text(s), _) => s.into_owned().into_bytes(),
        (Body::Null, _) => Vec::new(),
    };
    as_if_from_value(&mut headers, &mut properties)?;
    Some(Message {
        body,
        content_encoding: env.content_encoding.unwrap_or_else(super::message::utf8),
        content_type,
        headers,
        properties,
    })
}

/// serde_json's key for a number kept as text (`arbitrary_precision`).
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// Makes what the one pass read equal to what the reference's second pass makes of it.
///
/// The reference reads `properties` and every header value into `Value`s, then converts them
/// with `from_value`, the `extra` maps through serde's flatten buffer. That second pass re-reads
/// every number from its text: `-0` becomes `0`, an integer too large for 128 bits that `f64`
/// prints back the same way becomes a float, and a 65- to 128-bit integer in an `extra` value
/// is refused (serde's buffer has no room for it). The same conversions are applied here, number
/// by number; headers and properties seldom hold numbers outside the typed fields, so this
/// costs next to nothing. `None` where the reference fails, or where serde_json's number token
/// appears as a key of `stamps`, `properties` or `delivery_info` (the reference's first pass
/// treats such a map as a number).
fn as_if_from_value(h: &mut TaskHeaders, p: &mut Properties) -> Option<()> {
    let token = |m: &Map<String, Value>| !m.is_empty() && m.contains_key(NUMBER_TOKEN);
    if token(&h.stamps) || token(&p.extra) || token(&p.delivery_info.extra) {
        return None;
    }
    for n in [&mut h.timelimit.0, &mut h.timelimit.1].into_iter().flatten() {
        *n = Number::deserialize(n.clone()).ok()?;
    }
    let value = |n: Number| Value::deserialize(n).ok();
    let buffered = |n: Number| n.deserialize_any(BufferedNumber).ok();
    if let Some(v) = &mut h.stamped_headers {
        renumber(v, &value)?;
    }
    h.stamps.values_mut().try_for_each(|v| renumber(v, &value))?;
    h.extra.values_mut().try_for_each(|v| renumber(v, &buffered))?;
    p.extra.values_mut().try_for_each(|v| renumber(v, &buffered))?;
    p.delivery_info.extra.values_mut().try_for_each(|v| renumber(v, &buffered))
}

/// Replaces every number in `v` with `again(number)`; `None` if that fails for one.
fn renumber(v: &mut Value, again: &dyn Fn(Number) -> Option<Value>) -> Option<()> {
    match v {
        Value::Number(n) => {
            *v = again(n.clone())?;
            Some(())
        }
        Value::Array(items) => items.iter_mut().try_for_each(|item| renumber(item, again)),
        Value::Object(map) => map.values_mut().try_for_each(|item| renumber(item, again)),
        Value::Null | Value::Bool(_) | Value::String(_) => Some(()),
    }
}

/// A number as serde's flatten buffer takes it from a `Value` and then gives it to `Value`'s
/// visitor: 64-bit integers and floats as such, number text through `Number`'s parser, and
/// 128-bit integers refused (the visitor's default).
struct BufferedNumber;

impl<'de> Visitor<'de> for BufferedNumber {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        // `Number` hands out its text as the one entry `{NUMBER_TOKEN: text}`.
        map.next_key::<IgnoredAny>()?;
        let text: String = map.next_value()?;
        text.parse().map(Value::Number).map_err(de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------------
// The envelope, written in one pass
// ---------------------------------------------------------------------------------------------

/// Serializes `value` at the end of `out` with Python's formatting.
fn write<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> Option<()> {
    value.serialize(&mut serde_json::Serializer::with_formatter(&mut *out, PythonFormatter)).ok()
}

/// Whether `extra` repeats a named field: the reference writer then writes the field once, with
/// the `extra` value, which the one-pass writer does not do.
fn repeats_a_field(extra: &Map<String, Value>, fields: &[&str]) -> bool {
    !extra.is_empty() && extra.keys().any(|k| fields.contains(&k.as_str()))
}

/// The envelope bytes, straight from the typed fields; `None` when the reference writer must
/// write them.
pub(super) fn encode(m: &Message) -> Option<Vec<u8>> {
    if repeats_a_field(&m.headers.extra, HEADER_FIELDS)
        || repeats_a_field(&m.properties.extra, PROPERTY_FIELDS)
        || repeats_a_field(&m.properties.delivery_info.extra, DELIVERY_INFO_FIELDS)
    {
        return None;
    }
    let base64 = m.properties.body_encoding.as_deref() == Some("base64");
    let mut out = Vec::with_capacity(m.body.len() * 4 / 3 + 1024);
    out.extend_from_slice(b"{\"body\": ");
    if base64 {
        // The base64 alphabet needs no escaping.
        let len = base64::encoded_len(m.body.len(), true)?;
        out.push(b'"');
        let start = out.len();
        out.resize(start + len, 0);
        let written = BASE64.encode_slice(&m.body, &mut out[start..]).ok()?;
        out.truncate(start + written);
        out.push(b'"');
    } else {
        write(&mut out, &String::from_utf8_lossy(&m.body))?;
    }
    out.extend_from_slice(b", \"content-encoding\": ");
    write(&mut out, &m.content_encoding)?;
    out.extend_from_slice(b", \"content-type\": ");
    write(&mut out, &m.content_type)?;
    out.extend_from_slice(b", \"headers\": ");
    write(&mut out, &m.headers)?;
    out.extend_from_slice(b", \"properties\": ");
    write(&mut out, &m.properties)?;
    out.push(b'}');
    Some(out)
}

#[cfg(test)]
mod tests;
