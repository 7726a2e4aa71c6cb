//! The legacy envelope `{type, from, topic, date, payload}`.
//!
//! Envelopes are assembled as JSON text around the caller's raw JSON values,
//! so payloads are copied byte for byte and never re-encoded on the hot path.

use std::borrow::Cow;
use std::cell::RefCell;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// What a client may send with `publish`: `{topic, type, payload, from?, date?}`.
#[derive(Debug, Deserialize)]
pub struct PublishIn<'a> {
    #[serde(borrow, default)]
    pub topic: Option<&'a RawValue>,
    #[serde(rename = "type", borrow, default)]
    pub kind: Option<&'a RawValue>,
    /// `Some("null")` for `"payload": null`: the legacy hub passes a null payload on.
    #[serde(borrow, default, deserialize_with = "present")]
    pub payload: Option<&'a RawValue>,
}

/// The fields kept from a NATS body that is already an envelope.
#[derive(Debug, Deserialize)]
pub struct EnvelopeIn<'a> {
    #[serde(rename = "type", borrow, default)]
    pub kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub from: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub date: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    pub payload: Option<&'a RawValue>,
}

/// A field that is present is `Some`, even when it is `null` (a plain
/// `Option` turns `null` into `None`, which would drop the field).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Why an input was refused; the label is the metrics `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    NoArgument,
    NotObject,
    NoTopic,
    TopicNotString,
    BinaryPayload,
    InvalidJson,
    TooLarge,
    SubjectTooLong,
}

impl Reject {
    pub fn label(self) -> &'static str {
        match self {
            Reject::NoArgument => "no_argument",
            Reject::NotObject => "not_object",
            Reject::NoTopic => "no_topic",
            Reject::TopicNotString => "topic_not_string",
            Reject::BinaryPayload => "binary_payload",
            Reject::InvalidJson => "invalid_json",
            Reject::TooLarge => "too_large",
            Reject::SubjectTooLong => "subject_too_long",
        }
    }

    pub fn explain(self) -> &'static str {
        match self {
            Reject::NoArgument => "the event carries no argument",
            Reject::NotObject => "the argument is not a JSON object",
            Reject::NoTopic => "the object has no topic",
            Reject::TopicNotString => "the topic is not a string",
            Reject::BinaryPayload => "binary attachments are not JSON",
            Reject::InvalidJson => "the body is not valid JSON",
            Reject::TooLarge => "the message is larger than the configured limit",
            Reject::SubjectTooLong => {
                "the topic maps to a NATS subject longer than the bridge publishes"
            }
        }
    }
}

/// A `publish` argument checked and taken apart.
#[derive(Debug)]
pub struct Publish<'a> {
    /// The topic decoded.
    pub topic: Cow<'a, str>,
    /// `type`; `"message"` when absent or null, as the legacy hub does.
    pub kind: &'a RawValue,
    pub payload: Option<&'a RawValue>,
}

/// The JSON of the default type.
pub const MESSAGE_TYPE_JSON: &str = "\"message\"";

fn first_byte(s: &str) -> Option<u8> {
    s.bytes().find(|b| !b.is_ascii_whitespace())
}

/// Parses the raw arguments of an event (`["publish", {...}]`) and returns
/// the JSON text of the first argument.
pub fn first_arg(raw_event: &str) -> Result<&RawValue, Reject> {
    let args: Vec<&RawValue> = serde_json::from_str(raw_event).map_err(|_| Reject::InvalidJson)?;
    args.get(1).copied().ok_or(Reject::NoArgument)
}

/// Checks a `publish` argument.
pub fn parse_publish(arg: &RawValue) -> Result<Publish<'_>, Reject> {
    let text = arg.get();
    if first_byte(text) != Some(b'{') {
        return Err(Reject::NotObject);
    }
    let p: PublishIn<'_> = serde_json::from_str(text).map_err(|_| Reject::NotObject)?;
    checked(p)
}

/// `first_arg` and `parse_publish` in one pass over the event's text
/// (`["publish", {...}, ...]`), with the same answers: the text is read
/// once instead of twice, and no list of the arguments is built.
pub fn parse_publish_event(raw_event: &str) -> Result<Publish<'_>, Reject> {
    let mut de = serde_json::Deserializer::from_str(raw_event);
    let arg = match serde::Deserializer::deserialize_seq(&mut de, EventArgs) {
        Ok(a) => a,
        Err(_) => return Err(Reject::InvalidJson),
    };
    if de.end().is_err() {
        return Err(Reject::InvalidJson);
    }
    let p = match arg {
        Arg::Missing => return Err(Reject::NoArgument),
        Arg::NotObject => return Err(Reject::NotObject),
        Arg::Object(p) => p,
    };
    checked(p)
}

/// The checks both parsers share once the object is read: a topic that is
/// a string, and the default type.
fn checked(p: PublishIn<'_>) -> Result<Publish<'_>, Reject> {
    let topic_raw = p.topic.ok_or(Reject::NoTopic)?;
    // Borrowed unless it has escapes (serde reads a `Cow` as owned, always).
    let topic: Cow<'_, str> = match serde_json::from_str::<&str>(topic_raw.get()) {
        Ok(t) => Cow::Borrowed(t),
        Err(_) => Cow::Owned(
            serde_json::from_str::<String>(topic_raw.get()).map_err(|_| Reject::TopicNotString)?,
        ),
    };
    let kind = match p.kind {
        Some(k) if k.get() != "null" => k,
        _ => message_type(),
    };
    Ok(Publish {
        topic,
        kind,
        payload: p.payload,
    })
}

/// The second element of an event's argument list, as `parse_publish_event` sees it.
enum Arg<'a> {
    Missing,
    NotObject,
    Object(PublishIn<'a>),
}

struct EventArgs;

impl<'de> serde::de::Visitor<'de> for EventArgs {
    type Value = Arg<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an event's argument list")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Arg<'de>, A::Error> {
        use serde::de::IgnoredAny;
        if seq.next_element::<IgnoredAny>()?.is_none() {
            return Ok(Arg::Missing);
        }
        let arg = seq
            .next_element::<ArgOf<'de>>()?
            .map_or(Arg::Missing, |a| a.0);
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(arg)
    }
}

struct ArgOf<'a>(Arg<'a>);

impl<'de> Deserialize<'de> for ArgOf<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ArgVisitor).map(ArgOf)
    }
}

#[derive(Deserialize)]
#[serde(field_identifier)]
enum Key {
    #[serde(rename = "topic")]
    Topic,
    #[serde(rename = "type")]
    Kind,
    #[serde(rename = "payload")]
    Payload,
    #[serde(other)]
    Other,
}

struct ArgVisitor;

impl<'de> serde::de::Visitor<'de> for ArgVisitor {
    type Value = Arg<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Arg<'de>, A::Error> {
        use serde::de::IgnoredAny;
        let (mut topic, mut kind, mut payload) = (None, None, None);
        // A field given twice makes the object unreadable, as for `parse_publish`.
        let mut twice = false;
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Topic if topic.is_none() => {
                    topic = Some(map.next_value::<Option<&'de RawValue>>()?)
                }
                Key::Kind if kind.is_none() => {
                    kind = Some(map.next_value::<Option<&'de RawValue>>()?)
                }
                Key::Payload if payload.is_none() => {
                    payload = Some(map.next_value::<&'de RawValue>()?)
                }
                Key::Topic | Key::Kind | Key::Payload => {
                    twice = true;
                    map.next_value::<IgnoredAny>()?;
                }
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if twice {
            return Ok(Arg::NotObject);
        }
        Ok(Arg::Object(PublishIn {
            topic: topic.flatten(),
            kind: kind.flatten(),
            payload,
        }))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Arg<'de>, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Arg::NotObject)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Arg<'de>, E> {
        Ok(Arg::NotObject)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Arg<'de>, E> {
        Ok(Arg::NotObject)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Arg<'de>, E> {
        Ok(Arg::NotObject)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Arg<'de>, E> {
        Ok(Arg::NotObject)
    }
    fn visit_str<E>(self, _: &str) -> Result<Arg<'de>, E> {
        Ok(Arg::NotObject)
    }
    fn visit_unit<E>(self) -> Result<Arg<'de>, E> {
        Ok(Arg::NotObject)
    }
}

/// An envelope on its way out, serialized field by field in the legacy
/// order. Raw fields are copied verbatim.
#[derive(Debug, Serialize)]
pub struct EnvelopeOut<'a> {
    #[serde(rename = "type")]
    pub kind: &'a RawValue,
    pub from: Field<'a>,
    pub topic: &'a str,
    pub date: Field<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<&'a RawValue>,
}

/// The envelope as JSON, in bytes of exactly its length. It is written to a
/// buffer kept per thread and copied out: a buffer sized by estimate has to
/// grow while it is written or ends up larger than the text, and `Bytes` made
/// from a vector whose capacity is not its length costs one more allocation.
pub fn envelope_bytes(env: &EnvelopeOut<'_>) -> Bytes {
    /// Larger buffers, left by a large message, are not kept.
    const KEEP: usize = 64 * 1024;
    thread_local! {
        static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|scratch| {
        let mut buf = scratch.borrow_mut();
        buf.clear();
        serde_json::to_writer(&mut *buf, env).expect("an envelope serializes");
        let bytes = Bytes::copy_from_slice(&buf);
        if buf.capacity() > KEEP {
            *buf = Vec::new();
        }
        bytes
    })
}

/// A field that is either passed through as received or made here.
#[derive(Debug, Clone, Copy)]
pub enum Field<'a> {
    Raw(&'a RawValue),
    Str(&'a str),
    Num(u64),
}

impl Serialize for Field<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Field::Raw(r) => r.serialize(s),
            Field::Str(v) => s.serialize_str(v),
            Field::Num(n) => s.serialize_u64(*n),
        }
    }
}

/// `"message"`, the type the legacy hub gives untyped publishes.
pub fn message_type() -> &'static RawValue {
    static MESSAGE: std::sync::OnceLock<Box<RawValue>> = std::sync::OnceLock::new();
    MESSAGE.get_or_init(|| RawValue::from_string(MESSAGE_TYPE_JSON.to_string()).expect("valid"))
}

/// Milliseconds since the Unix epoch, as the legacy hub's `Date.now()`.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How a NATS body is turned into a legacy envelope.
#[derive(Debug)]
pub enum NatsBody<'a> {
    /// An object with a string `type` and a `payload`: kept as it is.
    Envelope(EnvelopeIn<'a>),
    /// Anything else that is JSON: wrapped as the route's type.
    Bare(&'a RawValue),
}

/// Classifies a NATS body; `Err` when it is not UTF-8 JSON.
///
/// `from_bridge`: the message carries a bridge's origin header, so its body
/// is the envelope a bridge made of a legacy publish, whatever its `type` (the
/// legacy hub passes any JSON on) and even without a `payload` (a publish
/// without one has none).
pub fn parse_nats_body(body: &[u8], from_bridge: bool) -> Result<NatsBody<'_>, Reject> {
    let text = std::str::from_utf8(body).map_err(|_| Reject::InvalidJson)?;
    let raw: &RawValue = serde_json::from_str(text).map_err(|_| Reject::InvalidJson)?;
    let text = raw.get();
    if first_byte(text) == Some(b'{') {
        if let Ok(env) = serde_json::from_str::<EnvelopeIn<'_>>(text) {
            let typed = env.kind.is_some_and(|k| first_byte(k.get()) == Some(b'"'));
            if (typed && env.payload.is_some()) || (from_bridge && env.kind.is_some()) {
                return Ok(NatsBody::Envelope(env));
            }
        }
    }
    Ok(NatsBody::Bare(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arg(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn publish_checks() {
        let cases: &[(&str, Result<&str, Reject>)] = &[
            (
                r#"{"topic":"/trades","type":"TradeOrder","payload":{"a":1}}"#,
                Ok("/trades"),
            ),
            (r#"{"topic":"/a\/b","payload":1}"#, Ok("/a/b")),
            (r#"[1,2]"#, Err(Reject::NotObject)),
            (r#""just text""#, Err(Reject::NotObject)),
            (r#"42"#, Err(Reject::NotObject)),
            (r#"null"#, Err(Reject::NotObject)),
            (r#"{"type":"X","payload":{}}"#, Err(Reject::NoTopic)),
            (r#"{"topic":7}"#, Err(Reject::TopicNotString)),
            (r#"{"topic":null}"#, Err(Reject::NoTopic)),
        ];
        for (input, want) in cases {
            let a = arg(input);
            let got = parse_publish(&a).map(|p| p.topic.into_owned());
            assert_eq!(
                got.as_deref().map_err(|e| *e),
                want.map_err(|e| e),
                "{input}"
            );
        }
    }

    /// The one-pass parse answers as `first_arg` then `parse_publish` do.
    #[test]
    fn one_pass_publish_parse_agrees() {
        let events = [
            r#"["publish",{"topic":"/trades","type":"TradeOrder","payload":{"a":[1,{"b":"]"}]}}]"#,
            r#"["publish",{"topic":"/a\/b","payload":1}]"#,
            r#" [ "publish" , {"payload":null,"topic":"/t","type":null} , 3, {"x":1} ] "#,
            r#"["publish",{"topic":"/t","type":"X","extra":{"topic":1}}]"#,
            r#"["publish",{"top\u0069c":"/escaped-key"}]"#,
            r#"["publish",{"topic":"/t","topic":"/u"}]"#,
            r#"["publish",{"topic":"/t","payload":1,"payload":2}]"#,
            r#"["publish",{"type":"X","payload":{}}]"#,
            r#"["publish",{"topic":7}]"#,
            r#"["publish",{"topic":null}]"#,
            r#"["publish",[1,2]]"#,
            r#"["publish","just text"]"#,
            r#"["publish",42]"#,
            r#"["publish",-4.5e3]"#,
            r#"["publish",true]"#,
            r#"["publish",null]"#,
            r#"["publish"]"#,
            r#"[]"#,
            r#"{"publish":1}"#,
            r#"["publish",{"topic":"/t"]"#,
            r#"["publish",{"topic":"/t"}"#,
            r#"["publish",{"topic":"/t"}] x"#,
            r#"["publish",{"topic":"/t","payload":nul}]"#,
            "",
        ];
        for e in events {
            let two = first_arg(e).and_then(parse_publish).map(|p| {
                (
                    p.topic.into_owned(),
                    p.kind.get().to_string(),
                    p.payload.map(|r| r.get().to_string()),
                )
            });
            let one = parse_publish_event(e).map(|p| {
                (
                    p.topic.into_owned(),
                    p.kind.get().to_string(),
                    p.payload.map(|r| r.get().to_string()),
                )
            });
            assert_eq!(one, two, "{e}");
        }
    }

    #[test]
    fn type_defaults_to_message() {
        let a = arg(r#"{"topic":"/t","payload":{}}"#);
        assert_eq!(parse_publish(&a).unwrap().kind.get(), MESSAGE_TYPE_JSON);
        let a = arg(r#"{"topic":"/t","type":null}"#);
        assert_eq!(parse_publish(&a).unwrap().kind.get(), MESSAGE_TYPE_JSON);
        let a = arg(r#"{"topic":"/t","type":"Trade"}"#);
        assert_eq!(parse_publish(&a).unwrap().kind.get(), "\"Trade\"");
    }

    #[test]
    fn null_payload_is_kept() {
        let a = arg(r#"{"topic":"/t","payload":null}"#);
        assert_eq!(
            parse_publish(&a).unwrap().payload.map(|p| p.get()),
            Some("null")
        );
        let a = arg(r#"{"topic":"/t"}"#);
        assert!(parse_publish(&a).unwrap().payload.is_none());
        assert!(matches!(
            parse_nats_body(br#"{"type":"Trade","payload":null}"#, false),
            Ok(NatsBody::Envelope(e)) if e.payload.map(|p| p.get()) == Some("null")
        ));
    }

    #[test]
    fn envelope_is_valid_json_in_legacy_field_order() {
        let payload = arg("{\"q\":\"é ™\"}");
        let kind = arg("\"Position\"");
        let env = EnvelopeOut {
            kind: &kind,
            from: Field::Str("abc"),
            topic: "/x",
            date: Field::Num(17),
            payload: Some(&payload),
        };
        let s = serde_json::to_string(&env).unwrap();
        assert_eq!(
            s,
            r#"{"type":"Position","from":"abc","topic":"/x","date":17,"payload":{"q":"é ™"}}"#
        );
        let env = EnvelopeOut {
            kind: message_type(),
            from: Field::Str("a"),
            topic: "/x",
            date: Field::Num(1),
            payload: None,
        };
        assert_eq!(
            serde_json::to_string(&env).unwrap(),
            r#"{"type":"message","from":"a","topic":"/x","date":1}"#
        );
    }

    #[test]
    fn nats_bodies() {
        assert!(matches!(
            parse_nats_body(
                br#"{"type":"Trade","from":"svc","date":5,"payload":{"id":"1"}}"#,
                false
            ),
            Ok(NatsBody::Envelope(_))
        ));
        // a payload that happens to have a `type` field but no payload is bare
        assert!(matches!(
            parse_nats_body(br#"{"type":"Buy","quantity":5}"#, false),
            Ok(NatsBody::Bare(_))
        ));
        // a bridge's envelope of a legacy publish without payload, or with a
        // type that is not a string, is still an envelope
        for body in [
            &br#"{"type":"Trade","from":"a","topic":"t.1","date":5}"#[..],
            br#"{"type":5,"from":"a","topic":"t.1","date":5,"payload":1}"#,
        ] {
            assert!(matches!(
                parse_nats_body(body, false),
                Ok(NatsBody::Bare(_))
            ));
            assert!(matches!(
                parse_nats_body(body, true),
                Ok(NatsBody::Envelope(_))
            ));
        }
        assert!(matches!(
            parse_nats_body(br#"{"a":1}"#, true),
            Ok(NatsBody::Bare(_))
        ));
        assert!(
            matches!(parse_nats_body(b"[1]", false), Ok(NatsBody::Bare(r)) if r.get() == "[1]")
        );
        assert!(
            matches!(parse_nats_body(b" 12 ", false), Ok(NatsBody::Bare(r)) if r.get() == "12")
        );
        assert_eq!(
            parse_nats_body(b"{nope", false).unwrap_err(),
            Reject::InvalidJson
        );
        assert_eq!(
            parse_nats_body(b"", false).unwrap_err(),
            Reject::InvalidJson
        );
        assert_eq!(
            parse_nats_body(&[0xff, 0xfe], false).unwrap_err(),
            Reject::InvalidJson
        );
    }
}
