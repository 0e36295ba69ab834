//! How much the filter keeps in Envoy's shared data: every write goes through
//! [`set_accounted`], which returns how the store's total size changed so the glue can keep
//! two gauges (`realtime_filter.shared_data.bytes` and `.keys`). Shared data has no delete
//! and the filter's keys are bounded by design (limit slots, worker counters, replica
//! state); the gauges let an operator, and the churn soak, see that it stays bounded.

use crate::routing::{CasMismatch, SharedStore};

/// Gauge names (Envoy puts them under its Wasm custom-stat namespace).
pub const SHARED_DATA_BYTES: &str = "realtime_filter.shared_data.bytes";
pub const SHARED_DATA_KEYS: &str = "realtime_filter.shared_data.keys";

/// How one write changed the store: value bytes and keys (0 or 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SizeChange {
    pub bytes: i64,
    pub keys: i64,
}

/// Unconditional writes retried with the value's own CAS token this many times, so the
/// old size they replace is known; after that the write goes through unconditionally.
const UNCONDITIONAL_RETRIES: usize = 4;

fn len_of(v: &Option<Vec<u8>>) -> i64 {
    v.as_ref()
        .map(|v| i64::try_from(v.len()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Writes like [`SharedStore::set`] and says how the store's size changed.
///
/// The old value is read first. A conditional write whose token is already stale fails
/// without writing (it would fail anyway). An unconditional write is made conditional on the
/// token just read, so the replaced value is the one measured; only when other writers keep
/// winning does it fall back to a blind write. The one inexact case is two workers creating
/// the same key at once (no token exists for an absent key): both count the key, a drift of
/// one key that the bounded key set caps.
pub fn set_accounted(
    store: &dyn SharedStore,
    key: &str,
    value: &[u8],
    cas: Option<u32>,
) -> Result<SizeChange, CasMismatch> {
    let new_len = i64::try_from(value.len()).unwrap_or(i64::MAX);
    let change = |old: &Option<Vec<u8>>| SizeChange {
        bytes: new_len - len_of(old),
        keys: i64::from(old.is_none()),
    };
    if cas.is_some() {
        let (old, current) = store.get(key);
        if current != cas {
            return Err(CasMismatch);
        }
        store.set(key, value, cas)?;
        return Ok(change(&old));
    }
    for _ in 0..UNCONDITIONAL_RETRIES {
        let (old, current) = store.get(key);
        if store.set(key, value, current).is_ok() {
            return Ok(change(&old));
        }
    }
    let (old, _) = store.get(key);
    store.set(key, value, None)?;
    Ok(change(&old))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::MemoryStore;

    #[test]
    fn the_changes_sum_to_the_stores_size() {
        let store = MemoryStore::default();
        let mut bytes = 0;
        let mut keys = 0;
        let mut apply = |key: &str, value: &[u8], cas| {
            let c = set_accounted(&store, key, value, cas).unwrap();
            bytes += c.bytes;
            keys += c.keys;
            (bytes, keys)
        };
        assert_eq!(apply("a", b"12345", None), (5, 1));
        assert_eq!(apply("b", b"xy", None), (7, 2));
        assert_eq!(apply("a", b"1", None), (3, 2), "a shrank by four bytes");
        let (_, cas) = store.get("b");
        assert_eq!(apply("b", b"wxyz", cas), (5, 2), "a conditional write");
        assert_eq!(
            apply("c", b"", None),
            (5, 3),
            "an empty value is still a key"
        );
    }

    #[test]
    fn a_stale_conditional_write_fails_and_changes_nothing() {
        let store = MemoryStore::default();
        set_accounted(&store, "k", b"one", None).unwrap();
        let (_, stale) = store.get("k");
        set_accounted(&store, "k", b"two!", None).unwrap();
        assert_eq!(
            set_accounted(&store, "k", b"three", stale),
            Err(CasMismatch)
        );
        assert_eq!(store.get("k").0.as_deref(), Some(&b"two!"[..]));
    }
}
