//! Content keys, and the windows in which attach mode recognises a message
//! it meets a second time: its own publish echoed by trade-feed, a peer
//! bridge's delivery of a message this standby shadows, or a peer's NATS
//! mirror of a message this bridge saw on trade-feed.
//!
//! A key is computed from parsed JSON values, never from their text: a value
//! that went through JavaScript (`JSON.parse` then `JSON.stringify` in
//! trade-feed) comes back with its keys in another order and its numbers
//! written differently (`310.0` as `310`, `1e3` as `1000`, integers past
//! 2^53 rounded). [`canonical`] writes objects with sorted keys and every
//! number as the IEEE double JavaScript would hold, so both sides of a round
//! trip give the same key.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde_json::Value;

/// JSON text of `v` in a form that survives a JavaScript round trip.
#[cfg(test)]
pub fn canonical(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(n.as_f64(), out),
        Value::String(s) => out.push_str(&Value::String(s.clone()).to_string()),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            // Sorted here, whatever order the map keeps (serde_json's
            // `preserve_order` feature would keep insertion order).
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
    }
}

fn write_number(f: Option<f64>, out: &mut String) {
    match f {
        // JSON.stringify writes NaN and the infinities as null, and -0 as 0.
        Some(f) if !f.is_finite() => out.push_str("null"),
        Some(0.0) => out.push('0'),
        // The shortest text that reads back as the same double.
        Some(f) => {
            let _ = write!(out, "{f:e}");
        }
        None => out.push_str("null"),
    }
}

/// Key of a NATS -> legacy message: what trade-feed keeps of a publish
/// (`from` and `date` are rewritten by trade-feed).
pub fn emitted_key(topic: &str, kind: &Value, payload: Option<&Value>) -> String {
    digest(&emitted_text(topic, kind, payload))
}

/// Key of a legacy message as trade-feed broadcast it, sender and clock
/// included: the same on trade-feed and in any bridge's NATS mirror of it.
pub fn legacy_key(
    topic: &str,
    from: &Value,
    date: &Value,
    kind: &Value,
    payload: Option<&Value>,
) -> String {
    let mut k = emitted_text(topic, kind, payload);
    k.push('\u{0}');
    write_canonical(from, &mut k);
    k.push('\u{0}');
    write_canonical(date, &mut k);
    digest(&k)
}

fn emitted_text(topic: &str, kind: &Value, payload: Option<&Value>) -> String {
    let mut k = String::with_capacity(64);
    k.push_str(topic);
    k.push('\u{0}');
    write_canonical(kind, &mut k);
    k.push('\u{0}');
    if let Some(p) = payload {
        write_canonical(p, &mut k);
    }
    k
}

/// 128 bits of the canonical text: keys are held for thousands of messages
/// of up to a megabyte each, so the text itself is not kept. At the bounds
/// used (tens of thousands of keys) a collision is beyond practical odds.
fn digest(text: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut a = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut a);
    let mut b = std::collections::hash_map::DefaultHasher::new();
    0x5eed_u32.hash(&mut b);
    text.hash(&mut b);
    format!("{:016x}{:016x}", a.finish(), b.finish())
}

/// An item held until its key is seen, with when it was held.
struct Held<T> {
    key: String,
    at: Instant,
    item: T,
}

/// What [`Rendezvous::hold`] did with an item.
#[derive(Debug, PartialEq, Eq)]
pub enum Hold<T> {
    /// Held until its key is seen.
    Held,
    /// Its key had already been seen: it is handed back, not held.
    Seen(T),
    /// Held; the oldest item was pushed out by the bound and is handed back.
    Evicted(T),
}

/// Items waiting for their key to be seen, in the order they were held,
/// and sightings that arrived before their item. Both sides are bounded in
/// count, and [`Rendezvous::expire`] bounds them in time.
pub struct Rendezvous<T> {
    next: u64,
    held: BTreeMap<u64, Held<T>>,
    by_key: HashMap<String, VecDeque<u64>>,
    sightings: VecDeque<(String, Instant)>,
    sighted: HashMap<String, usize>,
    cap: usize,
}

impl<T> Rendezvous<T> {
    /// At most `cap` items and `cap` early sightings.
    pub fn new(cap: usize) -> Rendezvous<T> {
        Rendezvous {
            next: 0,
            held: BTreeMap::new(),
            by_key: HashMap::new(),
            sightings: VecDeque::new(),
            sighted: HashMap::new(),
            cap: cap.max(1),
        }
    }

    /// Items held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Whether an item held satisfies `f`.
    pub fn any(&self, f: impl Fn(&T) -> bool) -> bool {
        self.held.values().any(|h| f(&h.item))
    }

    /// Holds `item` until `key` is seen, unless it was seen already.
    pub fn hold(&mut self, key: String, item: T, now: Instant) -> Hold<T> {
        if self.take_sighting(&key) {
            return Hold::Seen(item);
        }
        let seq = self.next;
        self.next += 1;
        self.by_key.entry(key.clone()).or_default().push_back(seq);
        self.held.insert(seq, Held { key, at: now, item });
        if self.held.len() > self.cap {
            if let Some(old) = self.pop_oldest() {
                return Hold::Evicted(old);
            }
        }
        Hold::Held
    }

    /// `key` was seen: hands back the oldest item held under it. Without
    /// one, the sighting is kept for an item still on its way if `keep`.
    pub fn sight(&mut self, key: &str, now: Instant, keep: bool) -> Option<T> {
        if let Some(seq) = self.by_key.get_mut(key).and_then(VecDeque::pop_front) {
            if self.by_key.get(key).is_some_and(VecDeque::is_empty) {
                self.by_key.remove(key);
            }
            return self.held.remove(&seq).map(|h| h.item);
        }
        if keep {
            self.sightings.push_back((key.to_string(), now));
            *self.sighted.entry(key.to_string()).or_default() += 1;
            if self.sightings.len() > self.cap {
                self.drop_oldest_sighting();
            }
        }
        None
    }

    /// Hands back the items held longer than `window`, oldest first, and
    /// forgets sightings older than that.
    pub fn expire(&mut self, now: Instant, window: Duration) -> Vec<T> {
        while self
            .sightings
            .front()
            .is_some_and(|(_, at)| now.duration_since(*at) > window)
        {
            self.drop_oldest_sighting();
        }
        let mut out = Vec::new();
        while self
            .held
            .first_key_value()
            .is_some_and(|(_, h)| now.duration_since(h.at) > window)
        {
            out.extend(self.pop_oldest());
        }
        out
    }

    /// Restarts the clock of every held item.
    pub fn touch(&mut self, now: Instant) {
        for h in self.held.values_mut() {
            h.at = now;
        }
    }

    /// Hands back every held item, oldest first, with its key.
    pub fn drain(&mut self) -> Vec<(String, T)> {
        self.by_key.clear();
        std::mem::take(&mut self.held)
            .into_values()
            .map(|h| (h.key, h.item))
            .collect()
    }

    fn pop_oldest(&mut self) -> Option<T> {
        let (_, h) = self.held.pop_first()?;
        if let Some(q) = self.by_key.get_mut(&h.key) {
            q.pop_front();
            if q.is_empty() {
                self.by_key.remove(&h.key);
            }
        }
        Some(h.item)
    }

    fn take_sighting(&mut self, key: &str) -> bool {
        let Some(n) = self.sighted.get_mut(key) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            self.sighted.remove(key);
        }
        if let Some(i) = self.sightings.iter().position(|(k, _)| k == key) {
            self.sightings.remove(i);
        }
        true
    }

    fn drop_oldest_sighting(&mut self) {
        if let Some((k, _)) = self.sightings.pop_front() {
            if let Some(n) = self.sighted.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    self.sighted.remove(&k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What trade-feed does to a value: JSON.parse then JSON.stringify.
    /// Here: the text a JavaScript engine writes for the same value.
    fn through_js(js_text: &str) -> Value {
        serde_json::from_str(js_text).unwrap()
    }

    #[test]
    fn keys_survive_a_javascript_round_trip() {
        let cases = [
            (
                r#"{"quantity":310.0,"b":1,"a":2}"#,
                r#"{"a":2,"b":1,"quantity":310}"#,
            ),
            (
                r#"{"x":1e3,"y":1.50,"z":-0.0}"#,
                r#"{"x":1000,"y":1.5,"z":0}"#,
            ),
            (
                r#"{"big":12345678901234567890}"#,
                r#"{"big":12345678901234567000}"#,
            ),
            (r#"{"u":1.76478123457e12}"#, r#"{"u":1764781234570}"#),
            (
                r#"{"tiny":1E-7,"neg":-2.50}"#,
                r#"{"tiny":1e-7,"neg":-2.5}"#,
            ),
            (
                r#"{"s":"caf\u00e9 \u2122 \ud83d\ude80"}"#,
                r#"{"s":"café ™ 🚀"}"#,
            ),
            (
                r#"[{"b":[1.0,{"d":2,"c":1}]}]"#,
                r#"[{"b":[1,{"c":1,"d":2}]}]"#,
            ),
        ];
        for (ours, theirs) in cases {
            let a: Value = serde_json::from_str(ours).unwrap();
            assert_eq!(canonical(&a), canonical(&through_js(theirs)), "{ours}");
        }
        assert_ne!(canonical(&json!({"a": 1})), canonical(&json!({"a": "1"})));
        assert_ne!(canonical(&json!([1, 2])), canonical(&json!([2, 1])));
        assert_ne!(canonical(&json!({"a": null})), canonical(&json!({})));
    }

    #[test]
    fn keys_separate_topic_type_and_payload() {
        let k = |t: &str, kind: &str, p: Value| emitted_key(t, &json!(kind), Some(&p));
        assert_ne!(k("/a", "T", json!(1)), k("/b", "T", json!(1)));
        assert_ne!(k("/a", "T", json!(1)), k("/a", "U", json!(1)));
        assert_ne!(
            emitted_key("/a", &json!("T"), None),
            k("/a", "T", json!(null))
        );
        let l = |from: &str, date: u64| {
            legacy_key(
                "/a",
                &json!(from),
                &json!(date),
                &json!("T"),
                Some(&json!({})),
            )
        };
        assert_ne!(l("x", 1), l("y", 1));
        assert_ne!(l("x", 1), l("x", 2));
    }

    #[test]
    fn rendezvous_matches_in_either_order() {
        let t0 = Instant::now();
        let mut r = Rendezvous::new(10);
        assert_eq!(r.hold("a".into(), 1, t0), Hold::Held);
        assert_eq!(r.hold("a".into(), 2, t0), Hold::Held);
        assert_eq!(r.sight("a", t0, true), Some(1), "oldest first");
        // a sighting before its item
        assert_eq!(r.sight("b", t0, true), None);
        assert_eq!(r.hold("b".into(), 3, t0), Hold::Seen(3));
        assert_eq!(
            r.hold("b".into(), 4, t0),
            Hold::Held,
            "one sighting, one item"
        );
        // a sighting not kept
        assert_eq!(r.sight("c", t0, false), None);
        assert_eq!(r.hold("c".into(), 5, t0), Hold::Held);
        let left: Vec<i32> = r.drain().into_iter().map(|(_, v)| v).collect();
        assert_eq!(left, [2, 4, 5]);
        assert!(r.is_empty());
    }

    #[test]
    fn rendezvous_is_bounded_in_count_and_time() {
        let t0 = Instant::now();
        let mut r = Rendezvous::new(2);
        r.hold("a".into(), 1, t0);
        r.hold("b".into(), 2, t0);
        assert_eq!(r.hold("c".into(), 3, t0), Hold::Evicted(1));
        assert_eq!(r.sight("a", t0, false), None, "the evicted item is gone");
        let later = t0 + Duration::from_secs(10);
        assert_eq!(r.hold("d".into(), 4, later), Hold::Evicted(2));
        assert_eq!(r.expire(later, Duration::from_secs(5)), [3]);
        assert_eq!(r.len(), 1);
        r.touch(later + Duration::from_secs(20));
        assert!(r
            .expire(later + Duration::from_secs(21), Duration::from_secs(5))
            .is_empty());
        // sightings expire too
        r.sight("x", t0, true);
        r.expire(later, Duration::from_secs(5));
        assert_eq!(r.hold("x".into(), 9, later), Hold::Held);
        for i in 0..10 {
            r.sight(&format!("s{i}"), later, true);
        }
        assert!(r.sightings.len() <= 2);
    }
}
