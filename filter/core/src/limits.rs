//! Per-caller limits, across Envoy's worker threads: concurrent calls per principal and call
//! creations per minute per principal (anonymous callers: per client address).
//!
//! Without them the only limit is Envoy's global token bucket, and one caller sending 100
//! creates a second starves everyone and fills the relay's call slots. The counts live in
//! Envoy's shared data (one store per Envoy instance, shared by its worker threads), updated
//! with compare-and-swap. Shared data has no delete, so the state is bounded: subjects hash
//! into [`SLOTS`] slots of a few entries each; a slot that overflows evicts its least-used
//! entry (a limit may then forgive a little, never wrongly refuse a caller that is within it).
//! Concurrent counts are corrected by the load refresh, which learns every live call's owner
//! from the relays (`ListCalls`), so calls that end by themselves are not counted forever.
//!
//! These are limits per Envoy instance: N gateway replicas allow N times as much. Fleet-wide
//! limits need a global rate-limit service (docs/operations.md).

use std::collections::HashMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::routing::SharedStore;

/// Slots per kind of count.
pub const SLOTS: u64 = 1024;
/// Entries per slot.
const RATE_ENTRIES: usize = 4;
const LIVE_ENTRIES: usize = 8;
const CAS_RETRIES: usize = 16;

/// Limits as configured (per pool, and per operator key to override the pool's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Live calls per caller.
    #[serde(default)]
    pub calls_per_caller: Option<u32>,
    /// Call creations per caller per minute.
    #[serde(default)]
    pub creates_per_minute: Option<u32>,
}

impl Limits {
    /// `self`, with each field `over` sets taking its place.
    pub fn overridden_by(self, over: Option<Limits>) -> Limits {
        match over {
            None => self,
            Some(o) => Limits {
                calls_per_caller: o.calls_per_caller.or(self.calls_per_caller),
                creates_per_minute: o.creates_per_minute.or(self.creates_per_minute),
            },
        }
    }

    pub fn validate(&self, at: &str) -> Result<(), String> {
        for (field, v) in [
            ("calls_per_caller", self.calls_per_caller),
            ("creates_per_minute", self.creates_per_minute),
        ] {
            if v == Some(0) || v.is_some_and(|v| v > 1_000_000) {
                return Err(format!(
                    "{at}.limits.{field} must be 1-1000000 (omit it for none)"
                ));
            }
        }
        Ok(())
    }
}

/// What a limit is counted against: the caller's principal, or for a caller without one
/// (anonymous) its client address. `None`: nothing to count against (no address known).
pub fn subject(principal: &str, client_address: Option<&str>) -> Option<String> {
    if !principal.is_empty() {
        return Some(principal.to_string());
    }
    // "ip:port" or "[v6]:port": the port changes per connection, the address is the caller.
    let a = client_address?.trim();
    let ip = match a.rsplit_once(':') {
        Some((ip, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !ip.is_empty() => ip,
        _ => a,
    };
    (!ip.is_empty()).then(|| format!("addr:{ip}"))
}

/// The slot of `subject` and its 64-bit tag.
fn slot_of(subject: &str) -> (u64, u64) {
    let d = Sha256::digest(subject.as_bytes());
    let mut tag = [0u8; 8];
    tag.copy_from_slice(d.get(..8).unwrap_or(&[0; 8]));
    let tag = u64::from_le_bytes(tag);
    (tag % SLOTS, tag)
}

fn rate_key(slot: u64) -> String {
    format!("realtime.v1.rate.{slot}")
}

fn live_key(slot: u64) -> String {
    format!("realtime.v1.live_calls.{slot}")
}

/// (tag, a, b) triples as little-endian u64s.
fn decode(v: Option<Vec<u8>>) -> Vec<(u64, u64, u64)> {
    let v = v.unwrap_or_default();
    v.chunks_exact(24)
        .map(|c| {
            let n = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c.get(i..i + 8).unwrap_or(&[0; 8]));
                u64::from_le_bytes(b)
            };
            (n(0), n(8), n(16))
        })
        .collect()
}

fn encode(entries: &[(u64, u64, u64)]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|(a, b, c)| [a.to_le_bytes(), b.to_le_bytes(), c.to_le_bytes()].concat())
        .collect()
}

/// Over a limit: which, and when to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Over {
    pub limit: u32,
    pub retry_after_s: u32,
}

/// Counts one creation for `subject` in the current minute; refuses it when `limit` are
/// counted already.
pub fn take_create(
    store: &dyn SharedStore,
    subject: &str,
    limit: u32,
    now_ms: u64,
) -> Result<(), Over> {
    let (slot, tag) = slot_of(subject);
    let minute = now_ms / 60_000;
    let key = rate_key(slot);
    for _ in 0..CAS_RETRIES {
        let (v, cas) = store.get(&key);
        let mut entries = decode(v);
        // Other subjects' entries of past minutes are free.
        entries.retain(|(t, m, _)| *t == tag || *m == minute);
        let count = match entries.iter_mut().find(|(t, _, _)| *t == tag) {
            Some(e) => {
                if e.1 != minute {
                    *e = (tag, minute, 0);
                }
                if e.2 >= u64::from(limit) {
                    let into_minute = (now_ms % 60_000) / 1000;
                    return Err(Over {
                        limit,
                        retry_after_s: u32::try_from(60 - into_minute).unwrap_or(60).max(1),
                    });
                }
                e.2 += 1;
                e.2
            }
            None => {
                if entries.len() >= RATE_ENTRIES {
                    // Evict the least-used subject of this minute (forgives it a little).
                    if let Some(i) = (0..entries.len()).min_by_key(|i| entries.get(*i).map(|e| e.2))
                    {
                        entries.swap_remove(i);
                    }
                }
                entries.push((tag, minute, 1));
                1
            }
        };
        let _ = count;
        if store.set(&key, &encode(&entries), cas).is_ok() {
            return Ok(());
        }
    }
    // Heavy contention: let it through rather than spin.
    Ok(())
}

/// Counts one live call for `subject`, unless `limit` are live already.
pub fn acquire_call(
    store: &dyn SharedStore,
    subject: &str,
    limit: Option<u32>,
) -> Result<(), Over> {
    update_live(store, subject, |n| match limit {
        Some(l) if n >= u64::from(l) => None,
        _ => Some(n + 1),
    })
    .map_err(|_| Over {
        limit: limit.unwrap_or(0),
        retry_after_s: 5,
    })
}

/// One live call of `subject` ended (or never started).
pub fn release_call(store: &dyn SharedStore, subject: &str) {
    let _ = update_live(store, subject, |n| Some(n.saturating_sub(1)));
}

/// The live calls counted for `subject`.
pub fn live_calls(store: &dyn SharedStore, subject: &str) -> u64 {
    let (slot, tag) = slot_of(subject);
    decode(store.get(&live_key(slot)).0)
        .iter()
        .find(|(t, _, _)| *t == tag)
        .map_or(0, |e| e.1)
}

fn update_live(
    store: &dyn SharedStore,
    subject: &str,
    next: impl Fn(u64) -> Option<u64>,
) -> Result<(), ()> {
    let (slot, tag) = slot_of(subject);
    let key = live_key(slot);
    for _ in 0..CAS_RETRIES {
        let (v, cas) = store.get(&key);
        let mut entries = decode(v);
        let current = entries
            .iter()
            .find(|(t, _, _)| *t == tag)
            .map_or(0, |e| e.1);
        let n = next(current).ok_or(())?;
        entries.retain(|(t, c, _)| *t != tag && *c > 0);
        if n > 0 {
            if entries.len() >= LIVE_ENTRIES {
                // A full slot: the smallest count goes (the refresh brings it back if live).
                if let Some(i) = (0..entries.len()).min_by_key(|i| entries.get(*i).map(|e| e.1)) {
                    entries.swap_remove(i);
                }
            }
            entries.push((tag, n, 0));
        }
        if store.set(&key, &encode(&entries), cas).is_ok() {
            return Ok(());
        }
    }
    Ok(())
}

/// The load refresh's correction: the live calls per principal that the relays reported
/// replace every slot's counts (principals they did not list have none).
pub fn apply_live_principals(store: &dyn SharedStore, live: &HashMap<String, u32>) {
    let mut by_slot: HashMap<u64, Vec<(u64, u64, u64)>> = HashMap::new();
    for (principal, n) in live {
        if principal.is_empty() || *n == 0 {
            continue;
        }
        let (slot, tag) = slot_of(principal);
        let entries = by_slot.entry(slot).or_default();
        if entries.len() < LIVE_ENTRIES {
            entries.push((tag, u64::from(*n), 0));
        }
    }
    for slot in 0..SLOTS {
        let key = live_key(slot);
        let fresh = by_slot.remove(&slot).unwrap_or_default();
        let (old, _) = store.get(&key);
        if old.as_deref().is_none_or(<[u8]>::is_empty) && fresh.is_empty() {
            continue;
        }
        let _ = store.set(&key, &encode(&fresh), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::MemoryStore;

    #[test]
    fn subjects_are_principals_or_client_addresses() {
        assert_eq!(
            subject("p_abc", Some("10.0.0.1:5555")).as_deref(),
            Some("p_abc")
        );
        assert_eq!(
            subject("", Some("10.0.0.1:5555")).as_deref(),
            Some("addr:10.0.0.1")
        );
        assert_eq!(
            subject("", Some("[2001:db8::1]:443")).as_deref(),
            Some("addr:[2001:db8::1]")
        );
        assert_eq!(subject("", None), None);
    }

    #[test]
    fn creations_per_minute_are_counted_per_subject_and_reset_each_minute() {
        let s = MemoryStore::default();
        let t0 = 600_000; // a minute boundary
        for _ in 0..3 {
            assert!(take_create(&s, "p_a", 3, t0 + 1_000).is_ok());
        }
        let over = take_create(&s, "p_a", 3, t0 + 15_000).unwrap_err();
        assert_eq!(
            over,
            Over {
                limit: 3,
                retry_after_s: 45
            }
        );
        assert!(
            take_create(&s, "p_b", 3, t0 + 15_000).is_ok(),
            "another caller is not affected"
        );
        assert!(
            take_create(&s, "p_a", 3, t0 + 60_000).is_ok(),
            "a new minute"
        );
    }

    #[test]
    fn live_calls_are_limited_released_and_corrected_by_the_refresh() {
        let s = MemoryStore::default();
        assert!(acquire_call(&s, "p_a", Some(2)).is_ok());
        assert!(acquire_call(&s, "p_a", Some(2)).is_ok());
        assert_eq!(acquire_call(&s, "p_a", Some(2)).unwrap_err().limit, 2);
        assert!(acquire_call(&s, "p_b", Some(2)).is_ok());
        release_call(&s, "p_a");
        assert!(acquire_call(&s, "p_a", Some(2)).is_ok());
        assert_eq!(live_calls(&s, "p_a"), 2);
        // The relays say p_a has none left (its calls ended by themselves), p_c has one.
        let live = HashMap::from([("p_c".to_string(), 1), ("p_b".to_string(), 1)]);
        apply_live_principals(&s, &live);
        assert_eq!(
            (
                live_calls(&s, "p_a"),
                live_calls(&s, "p_b"),
                live_calls(&s, "p_c")
            ),
            (0, 1, 1)
        );
        release_call(&s, "p_a");
        assert_eq!(live_calls(&s, "p_a"), 0, "never below zero");
    }

    #[test]
    fn many_subjects_stay_within_bounded_state() {
        let s = MemoryStore::default();
        for i in 0..20_000 {
            let _ = take_create(&s, &format!("p_{i}"), 5, 0);
            let _ = acquire_call(&s, &format!("p_{i}"), None);
        }
        for slot in 0..SLOTS {
            assert!(decode(s.get(&rate_key(slot)).0).len() <= RATE_ENTRIES);
            assert!(decode(s.get(&live_key(slot)).0).len() <= LIVE_ENTRIES);
        }
        // A subject within its limit is never refused by others' traffic.
        assert!(take_create(&s, "p_fresh", 1, 0).is_ok());
    }

    #[test]
    fn limits_override_field_by_field_and_refuse_zero() {
        let pool = Limits {
            calls_per_caller: Some(2),
            creates_per_minute: Some(10),
        };
        let key = Limits {
            calls_per_caller: Some(50),
            creates_per_minute: None,
        };
        assert_eq!(
            pool.overridden_by(Some(key)),
            Limits {
                calls_per_caller: Some(50),
                creates_per_minute: Some(10)
            }
        );
        assert!(Limits {
            calls_per_caller: Some(0),
            creates_per_minute: None
        }
        .validate("p")
        .is_err());
    }
}
