//! connwatch: find the processes behind CLOSE_WAIT and TIME_WAIT sockets.
//!
//! One pipeline, many views: `probe` loads and attaches the kernel side, `decode` turns
//! its records into transitions, `sockdiag`/`owners`/`netns` observe what exists,
//! `table` and `timewait` follow sockets, `report` aggregates per process, `views`
//! format; `cmd` holds the commands over that flow (`trace`, `watch`, `serve`, `top`). The crate
//! is a library too, so that the parsers can be fuzzed (connwatch/fuzz).
pub mod budget;
pub mod cli;
pub mod clock;
pub mod cmd;
pub mod decode;
pub mod filter;
pub mod kernelinfo;
pub mod live;
pub mod monitor;
pub mod namespaces;
pub mod netns;
pub mod owners;
pub mod probe;
pub mod report;
pub mod shutdown;
pub mod sockdiag;
pub mod table;
pub mod timewait;
pub mod views;
