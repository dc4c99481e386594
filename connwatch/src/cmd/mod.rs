//! The commands: each wires the one flow (probe → `Live` → `Monitor` → report) to a view
//! and an exit. `trace` streams transitions, `watch` and `snapshot` print reports,
//! `top` draws them full-screen, `serve` exposes them as metrics.
pub mod live;
pub mod serve;
pub mod shutdown;
pub mod top;
pub mod trace;
pub mod watch;
