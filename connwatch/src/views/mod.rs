//! Output formats: one module per view over the same flow.
pub mod metrics;
pub mod report;
pub mod top;
pub mod trace;
