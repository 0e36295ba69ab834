//! The relay's reading of datagrams on the shared media port (anyone can send them): the
//! STUN USERNAME walk that finds the call's ufrag, the MESSAGE-INTEGRITY check, and the
//! XOR-MAPPED-ADDRESS reader of the upstream leg. Any bytes. Properties: no panic; a ufrag it
//! finds is a non-empty piece of the datagram without `:`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_service::stun;

fuzz_target!(|data: &[u8]| {
    if let Some(ufrag) = stun::local_ufrag(data) {
        assert!(!ufrag.is_empty() && !ufrag.contains(':'));
        let range = data.as_ptr_range();
        assert!(
            range.contains(&ufrag.as_ptr()),
            "the ufrag is read from the datagram"
        );
    }
    // A datagram of random bytes signed with this password is a 2^-160 event.
    let _ = stun::signed_with(data, "fuzz-password-never-used-to-sign");
    let tid = if data.len() >= 20 {
        let mut t = [0u8; 12];
        t.copy_from_slice(&data[8..20]);
        t
    } else {
        [0u8; 12]
    };
    let _ = stun::mapped_address(data, &tid);
});
