//! Worker choice: weighted round robin or least outstanding calls, an optional header that
//! restricts the choice to one pool or worker, and ejection after upstream failures.
//!
//! Counters live behind [`SharedStore`], a compare-and-swap key/value store: proxy-wasm shared
//! data in Envoy (shared by all worker threads of one VM id), a `HashMap` in tests.

use std::cell::RefCell;
use std::collections::HashMap;

use serde::Deserialize;

use crate::config::{Config, Pool, Worker};
use crate::error::FilterError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    #[default]
    WeightedRoundRobin,
    LeastOutstanding,
}

/// A value changed between read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CasMismatch;

/// A shared key/value store with compare-and-swap, as proxy-wasm shared data provides.
pub trait SharedStore {
    /// Current value and its CAS token (`None` when the key is absent).
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes `value` if `cas` still matches (`None`: unconditional).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch>;
}

/// In-memory store with CAS semantics like Envoy's (for tests and native use).
#[derive(Debug, Default)]
pub struct MemoryStore {
    map: std::rc::Rc<RefCell<Entries>>,
}

/// Value and CAS version by key.
type Entries = HashMap<String, (Vec<u8>, u32)>;

impl MemoryStore {
    /// Another handle on the same store (as every context of a VM sees one shared data).
    pub fn share(&self) -> MemoryStore {
        MemoryStore {
            map: std::rc::Rc::clone(&self.map),
        }
    }
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.map.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
        let mut map = self.map.borrow_mut();
        let current = map.get(key).map(|(_, c)| *c);
        if let (Some(want), Some(have)) = (cas, current) {
            if want != have {
                return Err(CasMismatch);
            }
        }
        let next = current.unwrap_or(0).wrapping_add(1).max(1);
        map.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }
}

const CAS_RETRIES: usize = 32;

fn decode(v: Option<Vec<u8>>) -> u64 {
    match v {
        Some(b) if b.len() == 8 => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b);
            u64::from_le_bytes(a)
        }
        _ => 0,
    }
}

/// Reads a counter (absent or malformed: 0).
pub fn load(store: &dyn SharedStore, key: &str) -> u64 {
    decode(store.get(key).0)
}

/// Writes a counter unconditionally.
pub fn store_value(store: &dyn SharedStore, key: &str, value: u64) {
    let _ = store.set(key, &value.to_le_bytes(), None);
}

/// Adds `delta` (saturating at 0) with CAS retries; returns the new value.
pub fn add(store: &dyn SharedStore, key: &str, delta: i64) -> u64 {
    for _ in 0..CAS_RETRIES {
        let (v, cas) = store.get(key);
        let cur = decode(v);
        let next = if delta >= 0 {
            cur.saturating_add(delta.unsigned_abs())
        } else {
            cur.saturating_sub(delta.unsigned_abs())
        };
        if store.set(key, &next.to_le_bytes(), cas).is_ok() {
            return next;
        }
    }
    // Heavy contention: give up on exactness rather than spin; the periodic refresh corrects.
    load(store, key)
}

pub fn outstanding_key(worker: &str) -> String {
    format!("realtime.v1.outstanding.{worker}")
}
pub fn rr_key(pool: &str) -> String {
    format!("realtime.v1.rr.{pool}")
}
pub fn failures_key(worker: &str) -> String {
    format!("realtime.v1.failures.{worker}")
}
pub fn ejected_until_key(worker: &str) -> String {
    format!("realtime.v1.ejected_until_ms.{worker}")
}

/// Smooth weighted round-robin order (nginx style) of worker indexes for the given weights:
/// `[5,1,1]` gives `a a b a c a a` rather than `a a a a a b c`.
pub fn smooth_schedule(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(weights) {
            *c += i64::from(*w);
        }
        let mut best = 0usize;
        let mut best_value = i64::MIN;
        for (i, c) in current.iter().enumerate() {
            if *c > best_value {
                best_value = *c;
                best = i;
            }
        }
        if let Some(c) = current.get_mut(best) {
            *c -= total;
        }
        out.push(best);
    }
    out
}

/// The chosen worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub pool: usize,
    pub worker: usize,
}

impl Choice {
    pub fn pool<'c>(&self, c: &'c Config) -> Option<&'c Pool> {
        c.pools.get(self.pool)
    }
    pub fn worker<'c>(&self, c: &'c Config) -> Option<&'c Worker> {
        c.pools
            .get(self.pool)
            .and_then(|p| p.workers.get(self.worker))
    }
}

fn is_ejected(store: &dyn SharedStore, worker: &Worker, now_ms: u64) -> bool {
    load(store, &ejected_until_key(&worker.id)) > now_ms
}

/// Picks a worker for `model` (index into `config.models`) and counts one outstanding call
/// on it. `restrict` is the routing header's value, if the request had one.
/// Picks a worker of `model`: in the first of its pools that `admitted` serves (or the pool,
/// or the worker's pool, that `restrict` names), by the pool's policy. `refused` is the answer
/// when no pool serves the caller.
pub fn pick(
    config: &Config,
    model: usize,
    restrict: Option<&str>,
    admitted: &dyn Fn(&crate::config::Pool) -> bool,
    refused: FilterError,
    store: &dyn SharedStore,
    now_ms: u64,
) -> Result<Choice, FilterError> {
    let m = config.models.get(model).ok_or(FilterError::Internal)?;
    let serves = |pi: &usize| config.pools.get(*pi).is_some_and(admitted);
    let (pool_idx, only_worker) = match restrict.map(str::trim).filter(|s| !s.is_empty()) {
        None => (*m.pools.iter().find(|pi| serves(pi)).ok_or(refused)?, None),
        Some(name) => {
            let mut found = None;
            for &pi in &m.pools {
                let Some(p) = config.pools.get(pi) else {
                    continue;
                };
                if p.name == name {
                    found = Some((pi, None));
                    break;
                }
                if let Some(wi) = p.workers.iter().position(|w| w.id == name) {
                    found = Some((pi, Some(wi)));
                    break;
                }
            }
            let found = found.ok_or(FilterError::InvalidRoutingHeader)?;
            if !serves(&found.0) {
                return Err(refused);
            }
            found
        }
    };
    let pool = config.pools.get(pool_idx).ok_or(FilterError::Internal)?;
    let eligible: Vec<bool> = pool
        .workers
        .iter()
        .enumerate()
        .map(|(i, w)| only_worker.is_none_or(|o| o == i) && !is_ejected(store, w, now_ms))
        .collect();
    let no_worker = FilterError::NoHealthyWorker {
        retry_after_s: config.retry_after_s,
    };
    if !eligible.iter().any(|e| *e) {
        return Err(no_worker);
    }
    let n = add(store, &rr_key(&pool.name), 1).wrapping_sub(1);
    let chosen = match pool.policy {
        Policy::WeightedRoundRobin => {
            let len = pool.schedule.len().max(1) as u64;
            (0..len)
                .filter_map(|i| {
                    let slot = usize::try_from((n.wrapping_add(i)) % len).ok()?;
                    pool.schedule.get(slot).copied()
                })
                .find(|wi| eligible.get(*wi).copied().unwrap_or(false))
        }
        Policy::LeastOutstanding => {
            let len = pool.workers.len();
            let start = usize::try_from(n % len.max(1) as u64).unwrap_or(0);
            let mut best: Option<(u128, usize)> = None;
            for k in 0..len {
                let wi = (start + k) % len;
                if !eligible.get(wi).copied().unwrap_or(false) {
                    continue;
                }
                let Some(w) = pool.workers.get(wi) else {
                    continue;
                };
                // outstanding / weight, compared without division
                let score = u128::from(load(store, &outstanding_key(&w.id))) * 1_000_000
                    / u128::from(w.weight.max(1));
                if best.is_none_or(|(b, _)| score < b) {
                    best = Some((score, wi));
                }
            }
            best.map(|(_, wi)| wi)
        }
    };
    let wi = chosen.ok_or(no_worker)?;
    let w = pool.workers.get(wi).ok_or(FilterError::Internal)?;
    add(store, &outstanding_key(&w.id), 1);
    Ok(Choice {
        pool: pool_idx,
        worker: wi,
    })
}

/// A call on `worker` ended or never started: one outstanding call less.
pub fn release(store: &dyn SharedStore, worker: &str) {
    add(store, &outstanding_key(worker), -1);
}

/// A setup on `worker` reached the upstream and succeeded.
pub fn record_success(store: &dyn SharedStore, worker: &str) {
    let key = failures_key(worker);
    if load(store, &key) != 0 {
        store_value(store, &key, 0);
    }
}

/// A setup on `worker` failed because of the upstream. Returns true when this failure
/// ejected the worker.
pub fn record_upstream_failure(
    store: &dyn SharedStore,
    config: &Config,
    worker: &str,
    now_ms: u64,
) -> bool {
    if config.eject_after_failures == 0 {
        return false;
    }
    let n = add(store, &failures_key(worker), 1);
    if n >= u64::from(config.eject_after_failures) {
        store_value(
            store,
            &ejected_until_key(worker),
            now_ms.saturating_add(config.eject_ms),
        );
        store_value(store, &failures_key(worker), 0);
        return true;
    }
    false
}

/// Creates every worker's outstanding counter (at 0) if it does not exist yet, so later
/// compare-and-swap updates from many worker threads never race on its creation.
pub fn create_counters(store: &dyn SharedStore, config: &Config) {
    for (_, w) in config.workers() {
        let key = outstanding_key(&w.id);
        if store.get(&key).0.is_none() {
            store_value(store, &key, 0);
        }
    }
}

/// Overwrites outstanding counts with the relay's live-call counts (workers it does not list
/// have none).
pub fn apply_live_counts(store: &dyn SharedStore, config: &Config, live: &HashMap<String, u32>) {
    for (_, w) in config.workers() {
        let n = live.get(&w.id).copied().unwrap_or(0);
        store_value(store, &outstanding_key(&w.id), u64::from(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pick` for a caller every pool serves.
    fn pick_any(
        c: &Config,
        model: usize,
        restrict: Option<&str>,
        s: &dyn SharedStore,
        now_ms: u64,
    ) -> Result<Choice, FilterError> {
        pick(
            c,
            model,
            restrict,
            &|_| true,
            FilterError::MissingApiKey,
            s,
            now_ms,
        )
    }
    use crate::config::tests::sample;

    #[test]
    fn smooth_schedule_interleaves() {
        assert_eq!(smooth_schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_schedule(&[2, 1]), vec![0, 1, 0]);
        assert_eq!(smooth_schedule(&[1]), vec![0]);
    }

    #[test]
    fn weighted_round_robin_follows_weights() {
        let c = sample();
        let s = MemoryStore::default();
        let ids: Vec<String> = (0..6)
            .map(|_| {
                let ch = pick_any(&c, 0, None, &s, 0).unwrap();
                ch.worker(&c).unwrap().id.clone()
            })
            .collect();
        assert_eq!(ids, ["a", "b", "a", "a", "b", "a"]);
        assert_eq!(load(&s, &outstanding_key("a")), 4);
        assert_eq!(load(&s, &outstanding_key("b")), 2);
    }

    #[test]
    fn least_outstanding_prefers_idle_and_falls_back_on_release() {
        let mut c = sample();
        c.pools[0].policy = Policy::LeastOutstanding;
        let s = MemoryStore::default();
        store_value(&s, &outstanding_key("a"), 3);
        store_value(&s, &outstanding_key("b"), 1);
        // a: 3/2 = 1.5, b: 1/1 = 1 → b
        assert_eq!(pick_any(&c, 0, None, &s, 0).unwrap().worker, 1);
        // a: 1.5, b: 2 → a
        assert_eq!(pick_any(&c, 0, None, &s, 0).unwrap().worker, 0);
        release(&s, "a");
        release(&s, "a");
        release(&s, "a");
        release(&s, "a");
        release(&s, "a"); // saturates at 0
        assert_eq!(load(&s, &outstanding_key("a")), 0);
        let live = HashMap::from([("b".to_string(), 7u32)]);
        apply_live_counts(&s, &c, &live);
        assert_eq!(load(&s, &outstanding_key("b")), 7);
        assert_eq!(load(&s, &outstanding_key("c")), 0);
    }

    #[test]
    fn routing_header_restricts_to_pool_or_worker() {
        let c = sample();
        let s = MemoryStore::default();
        let ch = pick_any(&c, 0, Some("canary"), &s, 0).unwrap();
        assert_eq!(ch.worker(&c).unwrap().id, "c");
        for _ in 0..3 {
            let ch = pick_any(&c, 0, Some("b"), &s, 0).unwrap();
            assert_eq!(ch.worker(&c).unwrap().id, "b");
        }
        assert_eq!(
            pick_any(&c, 0, Some("echo1"), &s, 0).unwrap_err(),
            FilterError::InvalidRoutingHeader
        );
        assert_eq!(
            pick_any(&c, 0, Some("nope"), &s, 0).unwrap_err(),
            FilterError::InvalidRoutingHeader
        );
    }

    #[test]
    fn ejected_worker_gets_no_calls_until_the_time_passes() {
        let c = sample();
        let s = MemoryStore::default();
        assert!(!record_upstream_failure(&s, &c, "a", 1000));
        record_success(&s, "a");
        assert!(!record_upstream_failure(&s, &c, "a", 1000));
        assert!(!record_upstream_failure(&s, &c, "a", 1000));
        assert!(record_upstream_failure(&s, &c, "a", 1000));
        for _ in 0..5 {
            let ch = pick_any(&c, 0, None, &s, 2000).unwrap();
            assert_eq!(ch.worker(&c).unwrap().id, "b");
        }
        // restricted to the ejected worker: no healthy worker
        assert!(matches!(
            pick_any(&c, 0, Some("a"), &s, 2000),
            Err(FilterError::NoHealthyWorker { .. })
        ));
        // after the ejection time it is back
        let later = 1000 + c.eject_ms;
        let got: Vec<usize> = (0..3)
            .map(|_| pick_any(&c, 0, None, &s, later).unwrap().worker)
            .collect();
        assert!(got.contains(&0));
    }

    #[test]
    fn cas_conflicts_are_retried() {
        struct Flaky {
            inner: MemoryStore,
            fail_next: std::cell::Cell<u32>,
        }
        impl SharedStore for Flaky {
            fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
                self.inner.get(key)
            }
            fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
                if self.fail_next.get() > 0 {
                    self.fail_next.set(self.fail_next.get() - 1);
                    return Err(CasMismatch);
                }
                self.inner.set(key, value, cas)
            }
        }
        let s = Flaky {
            inner: MemoryStore::default(),
            fail_next: std::cell::Cell::new(3),
        };
        assert_eq!(add(&s, "k", 5), 5);
        assert_eq!(add(&s, "k", -2), 3);
        // stale CAS is refused by the memory store
        let m = MemoryStore::default();
        m.set("x", b"1", None).unwrap();
        let (_, cas) = m.get("x");
        m.set("x", b"2", None).unwrap();
        assert_eq!(m.set("x", b"3", cas), Err(CasMismatch));
    }
}
