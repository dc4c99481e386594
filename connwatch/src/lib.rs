//! connwatch: find the processes behind CLOSE_WAIT and TIME_WAIT sockets.
//!
//! One pipeline, many views (docs/ARCHITECTURE.md draws it): `probe` loads and attaches
//! the kernel side; `live` is the one event loop, whose records `decode` turns into
//! transitions (`carry` fills in, for `trace`, what the probe did not keep); `monitor` applies them to `table` (CLOSE_WAIT) and `timewait`, and
//! corrects both with the dumps that `namespaces` makes, one visit per namespace per
//! round; `owners` names the holders; `report` builds the per-process report from one
//! snapshot; `views` format it; `cmd` holds the commands (`trace`, `watch`, `snapshot`,
//! `top`, `serve`). The crate is a library too, so that the parsers can be fuzzed
//! (connwatch/fuzz).
pub mod budget;
pub mod carry;
pub mod cli;
pub mod clock;
pub mod cmd;
pub mod decode;
pub mod filter;
pub mod host;
pub mod huge_pages;
pub mod monitor;
pub mod probe;
pub mod report;
pub mod stacks;
pub mod units;
pub mod views;
