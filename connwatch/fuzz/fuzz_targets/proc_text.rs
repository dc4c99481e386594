//! Text read from /proc and tracefs: netstat counters, port ranges, cgroup lines,
//! tracepoint formats, namespace links, fd links.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = connwatch::host::owners::parse_socket_link(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = connwatch::host::kernelinfo::netstat_counter(text, "TcpExt", "TCPTimeWaitOverflow");
    let _ = connwatch::host::kernelinfo::parse_port_range(text);
    let _ = connwatch::host::cgroup::parse_cgroup(text);
    let _ = connwatch::probe::layout_mismatches(text);
    let _ = connwatch::host::netns::parse_ns_link(text);
});
