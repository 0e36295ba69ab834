//! The order of a soak's calls: the three kinds spread evenly through the run, so every
//! stretch of it (and every sample taken along the way) sees the same mix.

/// What a soak call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Connects, sends audio and events, hangs up through the gateway.
    Complete,
    /// Connects, sends a little audio, then its socket disappears without a close: the relay
    /// must notice (`--peer-timeout-secs`) and end the call as `client_timeout`.
    Vanish,
    /// Creates the call and never sends a datagram: the relay ends it as `ice_timeout`.
    NeverConnect,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Complete => "complete",
            Kind::Vanish => "vanish",
            Kind::NeverConnect => "never_connect",
        }
    }
}

/// `complete + vanish + never` calls, interleaved: call `j` of a kind with `n` calls sits at
/// fraction `(j + ½) / n` of the run, and the run is those positions in order.
pub fn interleave(complete: usize, vanish: usize, never: usize) -> Vec<Kind> {
    let mut slots: Vec<(f64, u8, Kind)> = Vec::with_capacity(complete + vanish + never);
    for (rank, (kind, n)) in [
        (Kind::Complete, complete),
        (Kind::Vanish, vanish),
        (Kind::NeverConnect, never),
    ]
    .into_iter()
    .enumerate()
    {
        for j in 0..n {
            slots.push(((j as f64 + 0.5) / n as f64, rank as u8, kind));
        }
    }
    slots.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    slots.into_iter().map(|(_, _, k)| k).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(v: &[Kind], k: Kind) -> usize {
        v.iter().filter(|x| **x == k).count()
    }

    #[test]
    fn every_call_is_scheduled_once() {
        let v = interleave(10_000, 1_000, 1_000);
        assert_eq!(v.len(), 12_000);
        assert_eq!(count(&v, Kind::Complete), 10_000);
        assert_eq!(count(&v, Kind::Vanish), 1_000);
        assert_eq!(count(&v, Kind::NeverConnect), 1_000);
        assert!(interleave(0, 0, 0).is_empty());
        assert_eq!(interleave(0, 3, 0), vec![Kind::Vanish; 3]);
    }

    #[test]
    fn every_stretch_of_the_run_has_the_same_mix() {
        let v = interleave(10_000, 1_000, 1_000);
        for chunk in v.chunks(1_200) {
            assert!(
                (995..=1_005).contains(&count(chunk, Kind::Complete)),
                "{chunk:?}"
            );
            assert!((98..=102).contains(&count(chunk, Kind::Vanish)));
            assert!((98..=102).contains(&count(chunk, Kind::NeverConnect)));
        }
    }
}
