//! One-pass reading and writing of task messages, behind [`Message::from_wire`],
//! [`TaskBody::from_wire`] and [`Message::to_wire`].
//!
//! The reference code in `message.rs` (the derived `Deserialize` impls with
//! `#[serde(flatten)] extra`, and the envelope read into `Value`s and converted again with
//! `from_value`) defines the format, and these are shortcuts for the messages Celery actually
//! sends. [`decode`] and [`decode_body`] read straight into the types with private visitors,
//! with no second pass and without serde's flatten buffer, and return `None` whenever they cannot
//! vouch for giving the reference's result. The caller then runs the reference path, which also
//! produces every error, message for message. That is the case for any parse error, input that
//! is not UTF-8, a repeated named key, a v1 message (no `headers.task`), a `compression` header,
//! a foreign content type, a body that is neither a string nor `null`, and the odd numbers and
//! keys listed at [`as_if_from_value`]. [`encode`] writes the envelope from the typed fields and leaves the
//! rare `extra` key that repeats a named field to the reference writer.
//!
//! `message_codec/tests.rs` holds the fast paths to the reference on every fixture and on
//! thousands of mutations of them. Not for: event and pidbox envelopes (`envelope.rs`).

use super::Signature;
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

/// The named fields seen so far, one bit each. A second occurrence is an error, which sends the
/// message to the reference path: there the envelope's `Value` maps keep the last value instead.
struct Seen(u32);

impl Seen {
    fn first<E: de::Error>(&mut self, index: usize, names: &'static [&'static str]) -> Result<(), E> {
        let bit = 1 << index;
        if self.0 & bit != 0 {
            return Err(E::duplicate_field(names[index]));
        }
        self.0 |= bit;
        Ok(())
    }

    fn has(&self, index: usize) -> bool {
        self.0 & (1 << index) != 0
    }
}

/// Deserializes an `Option` through a seed that writes in place: `null` leaves the target as it
/// is (at its default).
struct OrNull<S>(S);

impl<'de, S: DeserializeSeed<'de, Value = ()>> DeserializeSeed<'de> for OrNull<S> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de, S: DeserializeSeed<'de, Value = ()>> Visitor<'de> for OrNull<S> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("option")
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.0.deserialize(d)
    }
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
const HEADER_FIELDS: &[&str] = &TaskHeaders::FIELDS;

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

/// Reads headers into blank [`TaskHeaders`], in place (the struct is large: moving it through
/// every layer of serde costs more than reading a field).
struct HeadersInto<'a>(&'a mut TaskHeaders);

impl<'de> DeserializeSeed<'de> for HeadersInto<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for HeadersInto<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("task message headers")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let h = self.0;
        let mut seen = Seen(0);
        while let Some(key) = map.next_key_seed(KeySeed(header_field))? {
            let field = match key {
                Key::Field(field) => field,
                Key::Other(key) => {
                    h.extra.insert(key, map.next_value()?);
                    continue;
                }
            };
            seen.first(field as usize, HEADER_FIELDS)?;
            match field {
                H::Lang => h.lang = or_default(map.next_value()?),
                H::Task => h.task = map.next_value()?,
                H::Id => h.id = map.next_value()?,
                H::Shadow => h.shadow = map.next_value()?,
                H::Eta => h.eta = map.next_value()?,
                H::Expires => h.expires = map.next_value()?,
                H::Group => h.group = map.next_value()?,
                H::GroupIndex => h.group_index = map.next_value()?,
                H::Retries => h.retries = or_default(map.next_value()?),
                H::Timelimit => h.timelimit = map.next_value::<Option<Limits>>()?.unwrap_or((None, None)),
                H::RootId => h.root_id = map.next_value()?,
                H::ParentId => h.parent_id = map.next_value()?,
                H::Argsrepr => h.argsrepr = map.next_value()?,
                H::Kwargsrepr => h.kwargsrepr = map.next_value()?,
                H::Origin => h.origin = map.next_value()?,
                H::IgnoreResult => h.ignore_result = or_default(map.next_value()?),
                H::ReplacedTaskNesting => h.replaced_task_nesting = or_default(map.next_value()?),
                H::StampedHeaders => h.stamped_headers = map.next_value()?,
                H::Stamps => h.stamps = or_default(map.next_value()?),
            }
        }
        for required in [H::Task, H::Id] {
            if !seen.has(required as usize) {
                return Err(de::Error::missing_field(HEADER_FIELDS[required as usize]));
            }
        }
        Ok(())
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

/// Reads properties into [`Properties::empty`], in place.
struct PropertiesInto<'a>(&'a mut Properties);

impl<'de> DeserializeSeed<'de> for PropertiesInto<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for PropertiesInto<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("message properties")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let p = self.0;
        let mut seen = Seen(0);
        while let Some(key) = map.next_key_seed(KeySeed(property_field))? {
            let field = match key {
                Key::Field(field) => field,
                Key::Other(key) => {
                    p.extra.insert(key, map.next_value()?);
                    continue;
                }
            };
            seen.first(field as usize, PROPERTY_FIELDS)?;
            match field {
                P::CorrelationId => p.correlation_id = map.next_value()?,
                P::ReplyTo => p.reply_to = map.next_value()?,
                P::DeliveryMode => p.delivery_mode = map.next_value()?,
                P::Expiration => p.expiration = map.next_value()?,
                P::DeliveryInfo => map.next_value_seed(DeliveryInfoInto(&mut p.delivery_info))?,
                P::Priority => p.priority = map.next_value()?,
                P::BodyEncoding => p.body_encoding = map.next_value()?,
                P::DeliveryTag => p.delivery_tag = map.next_value()?,
            }
        }
        Ok(())
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

/// Reads `delivery_info` into a default [`DeliveryInfo`], in place.
struct DeliveryInfoInto<'a>(&'a mut DeliveryInfo);

impl<'de> DeserializeSeed<'de> for DeliveryInfoInto<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DeliveryInfoInto<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("delivery info")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let d = self.0;
        let mut seen = Seen(0);
        while let Some(key) = map.next_key_seed(KeySeed(delivery_info_field))? {
            let field = match key {
                Key::Field(field) => field,
                Key::Other(key) => {
                    d.extra.insert(key, map.next_value()?);
                    continue;
                }
            };
            seen.first(field as usize, DELIVERY_INFO_FIELDS)?;
            match field {
                Di::Exchange => d.exchange = map.next_value()?,
                Di::RoutingKey => d.routing_key = map.next_value()?,
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Embed
// ---------------------------------------------------------------------------------------------

/// Reads the map's next value into the `Option` field `$slot` in place: `null` is `None`,
/// anything else is read by the seed `$into` into `$blank`.
macro_rules! option_into {
    ($map:ident, $slot:expr, $blank:expr, $into:ident) => {{
        let mut null = false;
        let read = $map.next_value_seed(OrNullFlag(&mut null, $into($slot.insert($blank))));
        if null {
            $slot = None;
        }
        read?
    }};
}

#[derive(Clone, Copy)]
enum Em {
    Callbacks,
    Errbacks,
    Chain,
    Chord,
}

/// The named `embed` fields.
const EMBED_FIELDS: &[&str] = &["callbacks", "errbacks", "chain", "chord"];

fn embed_field(key: &str) -> Option<Em> {
    Some(match key {
        "callbacks" => Em::Callbacks,
        "errbacks" => Em::Errbacks,
        "chain" => Em::Chain,
        "chord" => Em::Chord,
        _ => return None,
    })
}

/// Reads `embed` into a default [`Embed`], in place.
struct EmbedInto<'a>(&'a mut Embed);

impl<'de> DeserializeSeed<'de> for EmbedInto<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EmbedInto<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("embed")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let e = self.0;
        let mut seen = Seen(0);
        while let Some(key) = map.next_key_seed(KeySeed(embed_field))? {
            let field = match key {
                Key::Field(field) => field,
                Key::Other(key) => {
                    e.extra.insert(key, map.next_value()?);
                    continue;
                }
            };
            seen.first(field as usize, EMBED_FIELDS)?;
            match field {
                Em::Callbacks => option_into!(map, e.callbacks, Vec::new(), SignaturesInto),
                Em::Errbacks => option_into!(map, e.errbacks, Vec::new(), SignaturesInto),
                Em::Chain => option_into!(map, e.chain, Vec::new(), SignaturesInto),
                Em::Chord => option_into!(map, e.chord, blank_signature(), SignatureInto),
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Signatures (in `embed`)
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Sg {
    Task,
    Args,
    Kwargs,
    Options,
    SubtaskType,
    Immutable,
}

/// The named [`Signature`] fields.
const SIGNATURE_FIELDS: &[&str] = &["task", "args", "kwargs", "options", "subtask_type", "immutable"];

fn signature_field(key: &str) -> Option<Sg> {
    Some(match key {
        "task" => Sg::Task,
        "args" => Sg::Args,
        "kwargs" => Sg::Kwargs,
        "options" => Sg::Options,
        "subtask_type" => Sg::SubtaskType,
        "immutable" => Sg::Immutable,
        _ => return None,
    })
}

/// A signature with every field at what its absence reads as.
fn blank_signature() -> Signature {
    Signature::new(String::new(), Vec::new())
}

/// Reads a signature into a blank [`Signature`], in place (the derived impl, with its flatten
/// `extra`, buffers every field).
struct SignatureInto<'a>(&'a mut Signature);

impl<'de> DeserializeSeed<'de> for SignatureInto<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for SignatureInto<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a signature")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let sig = self.0;
        let mut seen = Seen(0);
        while let Some(key) = map.next_key_seed(KeySeed(signature_field))? {
            let field = match key {
                Key::Field(field) => field,
                Key::Other(key) => {
                    sig.extra.insert(key, map.next_value()?);
                    continue;
                }
            };
            seen.first(field as usize, SIGNATURE_FIELDS)?;
            match field {
                Sg::Task => sig.task = map.next_value()?,
                Sg::Args => sig.args = map.next_value()?,
                Sg::Kwargs => sig.kwargs = map.next_value()?,
                Sg::Options => sig.options = map.next_value()?,
                Sg::SubtaskType => sig.subtask_type = map.next_value()?,
                Sg::Immutable => sig.immutable = map.next_value()?,
            }
        }
        if !seen.has(Sg::Task as usize) {
            return Err(de::Error::missing_field("task"));
        }
        Ok(())
    }
}

/// Reads a list of signatures into an empty `Vec`, each in place.
struct SignaturesInto<'a>(&'a mut Vec<Signature>);

impl<'de> DeserializeSeed<'de> for SignaturesInto<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for SignaturesInto<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of signatures")
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        loop {
            let mut sig = blank_signature();
            if seq.next_element_seed(SignatureInto(&mut sig))?.is_none() {
                return Ok(());
            }
            self.0.push(sig);
        }
    }
}

/// Reads `[args, kwargs, embed]` into a default [`TaskBody`], in place; exactly three elements,
/// as the reference's tuple.
struct BodyInto<'a>(&'a mut TaskBody);

impl<'de> DeserializeSeed<'de> for BodyInto<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_tuple(3, self)
    }
}

impl<'de> Visitor<'de> for BodyInto<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[args, kwargs, embed]")
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let b = self.0;
        b.args = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(0, &"three elements"))?;
        b.kwargs = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(1, &"three elements"))?;
        let mut null = false;
        let embed = b.embed.insert(Embed::default());
        if seq.next_element_seed(OrNullFlag(&mut null, EmbedInto(embed)))?.is_none() {
            return Err(de::Error::invalid_length(2, &"three elements"));
        }
        if null {
            b.embed = None;
        }
        Ok(())
    }
}

/// [`OrNull`] that also says whether the value was `null`.
struct OrNullFlag<'a, S>(&'a mut bool, S);

impl<'de, S: DeserializeSeed<'de, Value = ()>> DeserializeSeed<'de> for OrNullFlag<'_, S> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de, S: DeserializeSeed<'de, Value = ()>> Visitor<'de> for OrNullFlag<'_, S> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("option")
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        *self.0 = true;
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        *self.0 = true;
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        *self.0 = false;
        self.1.deserialize(d)
    }
}

/// Reads `[args, kwargs, embed]` in one pass; `None` when the reference path must decide.
///
/// From JSON text, the derived `Embed`'s flatten buffer gives every `extra` value exactly as
/// `Value` reads it, whenever it reads at all; so on success this is the reference's result, and
/// on any error the reference runs again to give its own.
pub(super) fn decode_body(bytes: &[u8]) -> Option<TaskBody> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut body = TaskBody::default();
    let mut de = serde_json::Deserializer::from_str(text);
    BodyInto(&mut body).deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(body)
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

/// The envelope fields a message is not read into directly.
#[derive(Default)]
struct EnvelopeRest<'a> {
    body: Option<Body<'a>>,
    content_encoding: Option<String>,
    content_type: Option<String>,
}

/// Reads a v2 task envelope into a message of blank headers and empty properties, in place.
struct EnvelopeInto<'a>(&'a mut Message);

impl<'de> DeserializeSeed<'de> for EnvelopeInto<'_> {
    type Value = EnvelopeRest<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<EnvelopeRest<'de>, D::Error> {
        d.deserialize_map(self)
    }
}

const ENVELOPE_FIELDS: &[&str] = &["body", "content-encoding", "content-type", "headers", "properties"];

impl<'de> Visitor<'de> for EnvelopeInto<'_> {
    type Value = EnvelopeRest<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a kombu envelope")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EnvelopeRest<'de>, A::Error> {
        let m = self.0;
        let mut rest = EnvelopeRest::default();
        let mut seen = Seen(0);
        while let Some(key) = map.next_key_seed(KeySeed(envelope_field))? {
            let field = match key {
                Key::Field(field) => field,
                Key::Other(_) => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            seen.first(field as usize, ENVELOPE_FIELDS)?;
            match field {
                Env::Body => rest.body = Some(map.next_value()?),
                Env::ContentEncoding => rest.content_encoding = Some(map.next_value()?),
                Env::ContentType => rest.content_type = Some(map.next_value()?),
                Env::Headers => map.next_value_seed(HeadersInto(&mut m.headers))?,
                Env::Properties => map.next_value_seed(OrNull(PropertiesInto(&mut m.properties)))?,
            }
        }
        if !seen.has(Env::Body as usize) {
            return Err(de::Error::missing_field("body"));
        }
        // No headers (or no `task` in them, which fails above): v1, for the reference path.
        if !seen.has(Env::Headers as usize) {
            return Err(de::Error::missing_field("headers"));
        }
        Ok(rest)
    }
}

/// Reads a plain v2 task message in one pass; `None` when the reference path must decide.
pub(super) fn decode(bytes: &[u8]) -> Option<Message> {
    // One UTF-8 check of the whole input rather than one per string.
    let text = std::str::from_utf8(bytes).ok()?;
    let mut m = Message {
        body: Vec::new(),
        content_encoding: String::new(),
        content_type: String::new(),
        headers: TaskHeaders::blank(),
        properties: Properties::empty(),
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let rest = EnvelopeInto(&mut m).deserialize(&mut de).ok()?;
    de.end().ok()?;
    if matches!(m.headers.extra.get("compression"), Some(Value::String(_))) {
        return None;
    }
    m.content_type = rest.content_type.unwrap_or_else(super::message::json_type);
    if !m.content_type.eq_ignore_ascii_case("application/json") {
        return None;
    }
    m.content_encoding = rest.content_encoding.unwrap_or_else(super::message::utf8);
    m.body = match (rest.body?, m.properties.body_encoding.as_deref()) {
        (Body::Text(s), Some("base64")) => BASE64.decode(s.as_bytes()).ok()?,
        (Body::Text(s), _) => s.into_owned().into_bytes(),
        (Body::Null, _) => Vec::new(),
    };
    as_if_from_value(&mut m.headers, &mut m.properties)?;
    Some(m)
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
