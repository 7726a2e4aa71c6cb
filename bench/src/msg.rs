//! The messages the load generator sends: TraderX `Position` updates whose
//! payload carries a `bench` mark `[publisher, sequence, sent_ns]`, and the
//! cheap scan that finds the mark again in whatever envelope arrives.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::Instant;

/// The first account id; account `i` of a case is `FIRST_ACCOUNT + i`.
pub const FIRST_ACCOUNT: u64 = 22214;

const SECURITIES: [&str; 8] = [
    "IBM", "MSFT", "AAPL", "GOOGL", "AMZN", "NVDA", "JPM", "ORCL",
];

/// Nanoseconds since the bench started (monotonic; every publisher and
/// subscriber lives in this process, so one clock serves both ends).
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

pub fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn topic(account: u64) -> String {
    format!("/accounts/{account}/positions")
}

pub fn subject(account: u64) -> String {
    format!("positions.account.{account}.updated")
}

/// A `Position` payload as trade-processor publishes it, with the mark.
/// About 200 bytes; the envelope around it brings a delivery to ~300.
pub fn position(out: &mut String, account: u64, publisher: u32, seq: u64, sent_ns: u64) {
    out.clear();
    let security = SECURITIES[(seq % SECURITIES.len() as u64) as usize];
    let quantity = (seq % 997) as i64 * 100 - 40_000;
    let _ = write!(
        out,
        "{{\"accountId\":{account},\"security\":\"{security}\",\"quantity\":{quantity},\
         \"updated\":{},\"side\":\"Buy\",\"book\":\"EQ-US-LARGECAP\",\
         \"lastTradeId\":\"5f0c8e2a-{publisher:04x}-4b7e-9d2c-{seq:012x}\",\
         \"bench\":[{publisher},{seq},{sent_ns}]}}",
        epoch_ms()
    );
}

/// The envelope a NATS publisher (trade-processor on state 006) sends.
pub fn nats_envelope(out: &mut String, subject: &str, payload: &str) {
    out.clear();
    let _ = write!(
        out,
        "{{\"type\":\"Position\",\"from\":\"trade-processor\",\"topic\":\"{subject}\",\
         \"date\":{},\"payload\":{payload}}}",
        epoch_ms()
    );
}

/// The mark found in a received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub publisher: u32,
    pub seq: u64,
    pub sent_ns: u64,
}

/// Finds `"bench":[p,s,t]` in a message; `None` for anything else (System
/// notices, pings).
pub fn find_mark(bytes: &[u8]) -> Option<Mark> {
    const KEY: &[u8] = b"\"bench\":[";
    let at = memchr::memmem::rfind(bytes, KEY)? + KEY.len();
    let mut nums = [0u64; 3];
    let mut i = at;
    for (n, slot) in nums.iter_mut().enumerate() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            *slot = slot
                .checked_mul(10)?
                .checked_add(u64::from(bytes[i] - b'0'))?;
            i += 1;
        }
        if i == start {
            return None;
        }
        let want = if n < 2 { b',' } else { b']' };
        if bytes.get(i) != Some(&want) {
            return None;
        }
        i += 1;
    }
    Some(Mark {
        publisher: u32::try_from(nums[0]).ok()?,
        seq: nums[1],
        sent_ns: nums[2],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_round_trips_through_an_envelope() {
        let mut p = String::new();
        position(&mut p, 22214, 7, 123_456, 987_654_321);
        let mut e = String::new();
        nats_envelope(&mut e, "positions.account.22214.updated", &p);
        let v: serde_json::Value = serde_json::from_str(&e).unwrap();
        assert_eq!(v["payload"]["accountId"], 22214);
        assert!(e.len() > 250 && e.len() < 400, "{}", e.len());
        assert_eq!(
            find_mark(e.as_bytes()),
            Some(Mark {
                publisher: 7,
                seq: 123_456,
                sent_ns: 987_654_321
            })
        );
    }

    #[test]
    fn no_mark_in_other_messages() {
        assert_eq!(find_mark(b"2"), None);
        assert_eq!(
            find_mark(br#"42["publish",{"from":"System","payload":{"message":"New Joiner"}}]"#),
            None
        );
        assert_eq!(find_mark(br#"{"bench":[1,2]}"#), None);
        assert_eq!(find_mark(br#"{"bench":[1,,3]}"#), None);
    }
}
