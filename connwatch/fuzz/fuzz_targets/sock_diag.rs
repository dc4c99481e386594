//! netlink sock_diag datagrams: parsed from their fixed layout by hand, so fuzzed.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    let _ = connwatch::host::sockdiag::parse_datagram(data, &mut out);
});
