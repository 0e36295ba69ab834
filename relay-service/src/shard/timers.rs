//! When each call of a shard must next see `handle_timeout`: one min-heap per shard, so the
//! loop sleeps until the earliest deadline of all its calls and wakes only the calls that are
//! due, instead of one timer (and one timer-wheel insertion) per call per wake-up.
//!
//! Deadlines only move in one direction cheaply: a call whose deadline comes earlier gets a
//! new entry; one whose deadline moves later keeps its old entry, which fires early, finds the
//! call not due, and is replaced then. So entries never need removing, and a call has at most
//! a few in the heap at once.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// The heap, and the deadline each call is scheduled at (`None`: no live entry).
#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
}

/// A call's scheduled deadline, kept with the call.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled(Option<Instant>);

impl Timers {
    /// Makes sure `key` is woken at `due` or earlier. An entry already at or before `due`
    /// serves (it wakes the call early, which reschedules).
    pub fn schedule(&mut self, key: u64, due: Instant, scheduled: &mut Scheduled) {
        if scheduled.0.is_some_and(|at| at <= due) {
            return;
        }
        scheduled.0 = Some(due);
        self.heap.push(Reverse((due, key)));
    }

    /// The earliest entry's deadline.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Pops the next entry due at `now`: its call and deadline. The caller checks the entry is
    /// the call's live one ([`Timers::fired`]); stale ones are skipped.
    pub fn pop_due(&mut self, now: Instant) -> Option<(u64, Instant)> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => {
                self.heap.pop().map(|Reverse((at, key))| (key, at))
            }
            _ => None,
        }
    }

    /// Whether an entry popped at `at` is the call's live entry; if so the call has none now
    /// (it reschedules after handling its timeout).
    pub fn fired(at: Instant, scheduled: &mut Scheduled) -> bool {
        if scheduled.0 == Some(at) {
            scheduled.0 = None;
            true
        } else {
            false
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ms(base: Instant, n: u64) -> Instant {
        base + Duration::from_millis(n)
    }

    /// Pops everything due at `now` that is live, in order.
    fn fire(timers: &mut Timers, now: Instant, calls: &mut [Scheduled]) -> Vec<u64> {
        let mut fired = Vec::new();
        while let Some((key, at)) = timers.pop_due(now) {
            if Timers::fired(at, &mut calls[key as usize]) {
                fired.push(key);
            }
        }
        fired
    }

    #[test]
    fn calls_fire_in_deadline_order_and_only_when_due() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        let mut calls = [Scheduled::default(); 3];
        timers.schedule(0, ms(t0, 30), &mut calls[0]);
        timers.schedule(1, ms(t0, 10), &mut calls[1]);
        timers.schedule(2, ms(t0, 20), &mut calls[2]);
        assert_eq!(timers.next(), Some(ms(t0, 10)));
        assert!(fire(&mut timers, ms(t0, 9), &mut calls).is_empty());
        assert_eq!(fire(&mut timers, ms(t0, 20), &mut calls), vec![1, 2]);
        assert_eq!(fire(&mut timers, ms(t0, 100), &mut calls), vec![0]);
        assert!(timers.is_empty());
    }

    #[test]
    fn an_earlier_deadline_adds_an_entry_and_the_old_one_goes_stale() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        let mut calls = [Scheduled::default()];
        timers.schedule(0, ms(t0, 50), &mut calls[0]);
        timers.schedule(0, ms(t0, 5), &mut calls[0]);
        assert_eq!(timers.len(), 2);
        assert_eq!(fire(&mut timers, ms(t0, 5), &mut calls), vec![0]);
        // The call was handled and scheduled nothing new: the 50 ms entry is stale.
        assert!(fire(&mut timers, ms(t0, 60), &mut calls).is_empty());
        assert!(timers.is_empty());
    }

    #[test]
    fn a_later_deadline_keeps_the_entry_that_is_already_there() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        let mut calls = [Scheduled::default()];
        timers.schedule(0, ms(t0, 5), &mut calls[0]);
        // Every packet moves str0m's deadline a little later: no new entries.
        for n in 6..1_000 {
            timers.schedule(0, ms(t0, n), &mut calls[0]);
        }
        assert_eq!(timers.len(), 1);
        // The early entry fires; the loop finds the call not due and schedules the real
        // deadline.
        assert_eq!(fire(&mut timers, ms(t0, 5), &mut calls), vec![0]);
        timers.schedule(0, ms(t0, 999), &mut calls[0]);
        assert_eq!(timers.next(), Some(ms(t0, 999)));
    }
}
