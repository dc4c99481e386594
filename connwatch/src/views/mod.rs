//! Output formats: one module per view over the same flow.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
pub mod metrics;
pub mod report;
pub mod top;
pub mod trace;
