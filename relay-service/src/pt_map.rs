//! Payload-type mapping between the two legs.
//!
//! Each leg negotiates its own payload-type numbers: a browser may offer Opus as 111
//! and the relay's upstream offer may end up with another number. Forwarding raw
//! numbers would make the receiver drop or misdecode audio, so each direction maps
//! a packet's payload type to the other leg's payload type for the same codec.

use str0m::format::{Codec, PayloadParams};
use str0m::media::Pt;

/// What identifies "the same codec" on both legs. Format parameters (for Opus:
/// `useinbandfec`, `stereo`, ...) do not change how a packet is decoded, so they are
/// not part of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecKey {
    pub codec: Codec,
    pub clock_rate: u32,
    pub channels: Option<u8>,
}

impl CodecKey {
    pub fn of(params: &PayloadParams) -> Self {
        let spec = params.spec();
        CodecKey {
            codec: spec.codec,
            clock_rate: spec.clock_rate.get(),
            channels: spec.channels,
        }
    }
}

/// A table from incoming payload type (0..=127) to outgoing payload type.
#[derive(Debug, Clone)]
pub struct PtMap {
    table: [Option<u8>; 128],
}

impl PtMap {
    /// `from`: the receiving leg's payload types with their codecs.
    /// `to`: the sending leg's, restricted to those its remote accepted.
    pub fn build(from: &[(u8, CodecKey)], to: &[(u8, CodecKey)]) -> Self {
        let mut table = [None; 128];
        for (pt, key) in from {
            if let Some((out, _)) = to.iter().find(|(_, k)| k == key) {
                if let Some(slot) = table.get_mut(*pt as usize) {
                    *slot = Some(*out);
                }
            }
        }
        PtMap { table }
    }

    /// Builds the map from str0m's negotiated parameters of both legs.
    /// `to_accepted` is the sending leg's `Media::remote_pts()`; empty means "all".
    pub fn from_params(from: &[PayloadParams], to: &[PayloadParams], to_accepted: &[Pt]) -> Self {
        let from: Vec<_> = from.iter().map(|p| (*p.pt(), CodecKey::of(p))).collect();
        let to: Vec<_> = to
            .iter()
            .filter(|p| to_accepted.is_empty() || to_accepted.contains(&p.pt()))
            .map(|p| (*p.pt(), CodecKey::of(p)))
            .collect();
        Self::build(&from, &to)
    }

    pub fn map(&self, pt: u8) -> Option<u8> {
        self.table.get(pt as usize).copied().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opus() -> CodecKey {
        CodecKey {
            codec: Codec::Opus,
            clock_rate: 48_000,
            channels: Some(2),
        }
    }
    fn pcmu() -> CodecKey {
        CodecKey {
            codec: Codec::PCMU,
            clock_rate: 8_000,
            channels: Some(1),
        }
    }

    #[test]
    fn opus_maps_across_different_numbers() {
        let m = PtMap::build(&[(109, opus()), (0, pcmu())], &[(111, opus())]);
        assert_eq!(m.map(109), Some(111));
        // A codec the other leg did not negotiate has no mapping: the packet is dropped
        // and counted rather than sent with a number the receiver can't decode.
        assert_eq!(m.map(0), None);
        assert_eq!(m.map(111), None);
        assert_eq!(m.map(200), None);
    }

    #[test]
    fn same_numbers_map_to_themselves() {
        let m = PtMap::build(&[(111, opus())], &[(111, opus())]);
        assert_eq!(m.map(111), Some(111));
    }
}
