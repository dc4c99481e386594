//! The probe's ring-buffer records: any bytes decode to a transition or an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = connwatch::decode::decode(data) {
        // Formatting a decoded transition must not panic either.
        let _ = t.old.to_string();
        let _ = t.new.to_string();
        let _ = t.duration_ns();
    }
});
